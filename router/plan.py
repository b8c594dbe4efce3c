"""Claimed jobs → the requests that carry them, and what each answer means for each job (pure).

:func:`plan_payloads` transforms a batch's payloads and merges the results into Klaviyo's bulk
jobs (:mod:`router.klaviyo.batch`); its :class:`Planned` is plain data, so a planning process
can do this and send it back (:mod:`router.planner`). :meth:`Plan.of` pairs it with the jobs.
Each job then takes the worst outcome among the requests that carried it (:func:`apply_outcome`):

- every request done → ``OK`` (acked);
- a retryable failure (429, 408, 5xx, timeout) → ``RETRY``;
- a permanent refusal (400, 404, 409, 413, 422) → ``DEAD``; for a bulk job that names items by
  ``source.pointer``, only those items' jobs — the others are retried at once (``innocent``);
- 401/403 → ``RELEASE``: the destination is paused and the jobs go back untouched.

Klaviyo's tightest limit for event traffic is ``event-bulk-create-jobs``: 10 requests a second,
each of at most 1000 events. A batch that sends 1000 + 300 events spends two of those requests
where 1.3 were needed. So a worker sizes its claims a little over whole event jobs
(:func:`claim_size`), and a batch holds over the jobs behind its last full event job
(``carry_partial``): they stay leased, and the next batch sends them first with what they were
planned into (:class:`Leftover`), so nothing is claimed or transformed twice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson

from router.destination import Destination
from router.errors import PartlyRefused, Skipped, TransformError
from router.klaviyo.batch import MAX_EVENTS, Part, assemble, prepare, profiles_in
from router.klaviyo.client import Outcome
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import Mappings
from router.queue import Job
from router.transform import TransformWarning, transform

#: Settle states, worst last: a job takes the worst of its requests' outcomes.
OK, RETRY, DEAD, RELEASE = 0, 1, 2, 3
RANK: Final = {"ok": OK, "retry": RETRY, "permanent": DEAD, "auth": RELEASE}
#: Claims aim this much past whole event jobs: the overshoot is held over, not sent half empty.
#: A claim can bring fewer jobs than asked (those of a key in flight elsewhere wait), and a batch
#: short of one full event job sends what it has; 12 % over makes that rare with the bench mix.
OVERSHOOT: Final = 0.12


@dataclass(slots=True)
class Verdict:
    """The running settle state of one claimed job."""

    job: Job
    state: int = OK
    reason: str = ""
    retry_after: float | None = None
    #: Retry at once: the job was refused only because another item of its bulk job was bad.
    innocent: bool = False

    def worsen(
        self, state: int, reason: str, retry_after: float | None = None, innocent: bool = False
    ) -> None:
        if state > self.state or (state == self.state == RETRY and not innocent):
            self.state, self.reason, self.innocent = state, reason, innocent
            if retry_after is not None:
                self.retry_after = max(self.retry_after or 0.0, retry_after)


@dataclass(frozen=True, slots=True)
class Leftover:
    """Jobs a batch held over, as planned: what the transform made of each (job ``i`` is source
    ``i``), ready to go into the next batch's bulk jobs ahead of its own (plain data)."""

    #: How many jobs.
    jobs: int = 0
    parts: tuple[Part, ...] = ()
    refused: tuple[tuple[int, str], ...] = ()
    skipped: tuple[tuple[int, str], ...] = ()
    #: Event requests among the parts.
    events: int = 0
    warnings: tuple[tuple[int, TransformWarning], ...] = ()

    def then(self, other: Leftover) -> Leftover:
        """This leftover's jobs followed by ``other``'s."""
        shift = self.jobs
        return Leftover(
            self.jobs + other.jobs,
            self.parts + tuple(_shifted(part, shift) for part in other.parts),
            self.refused + tuple((index + shift, reason) for index, reason in other.refused),
            self.skipped + tuple((index + shift, reason) for index, reason in other.skipped),
            self.events + other.events,
            self.warnings + tuple((index + shift, warning) for index, warning in other.warnings),
        )


NOTHING_LEFT: Final = Leftover()


@dataclass(frozen=True, slots=True)
class Planned:
    """A batch's payloads planned (plain data: a planning process sends it back)."""

    requests: list[KlaviyoRequest]
    #: (index, reason) of every job the transform refused: dead letters.
    refused: list[tuple[int, str]]
    #: (index, reason) of every job with no Klaviyo equivalent: acked as skipped.
    skipped: list[tuple[int, str]]
    #: The first ``kept`` jobs are planned; the others are held over, planned as ``leftover``.
    kept: int
    #: Event requests the kept jobs made (sizes later claims).
    events: int
    leftover: Leftover = NOTHING_LEFT
    #: (index, warning) of what the kept jobs were sent without (see :class:`TransformWarning`).
    warnings: list[tuple[int, TransformWarning]] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    """A claimed batch turned into requests; ``verdicts[i]`` is the settle state of ``jobs[i]``."""

    verdicts: list[Verdict]
    requests: list[KlaviyoRequest]
    skipped: int = 0
    #: Jobs held over to the next batch (still leased), and what they were planned into.
    held: list[Job] = field(default_factory=list)
    leftover: Leftover = NOTHING_LEFT
    events: int = 0
    #: (index into ``verdicts``, warning): logged and counted when the job is settled.
    warnings: list[tuple[int, TransformWarning]] = field(default_factory=list)

    @classmethod
    def of(cls, jobs: Sequence[Job], planned: Planned) -> Plan:
        verdicts = [Verdict(job) for job in jobs[: planned.kept]]
        for index, reason in planned.refused:
            verdicts[index].worsen(DEAD, reason)
        for index, reason in planned.skipped:
            verdicts[index].reason = reason
        return cls(
            verdicts,
            planned.requests,
            len(planned.skipped),
            list(jobs[planned.kept :]),
            planned.leftover,
            planned.events,
            planned.warnings,
        )


def plan(
    jobs: Sequence[Job],
    destination: Destination,
    mappings: Mappings,
    *,
    carry_partial: bool = False,
    carried: Leftover = NOTHING_LEFT,
) -> Plan:
    """Transform every job and merge the results into bulk requests (pure). The first
    ``carried.jobs`` jobs are a last batch's held-over ones, planned as ``carried``."""
    payloads = [job.payload for job in jobs[carried.jobs :]]
    return Plan.of(
        jobs, plan_payloads(payloads, destination, mappings, carry_partial=carry_partial, carried=carried)
    )


def plan_payloads(
    payloads: Sequence[bytes],
    destination: Destination,
    mappings: Mappings,
    *,
    carry_partial: bool = False,
    carried: Leftover = NOTHING_LEFT,
) -> Planned:
    """Transform each payload and merge the requests into bulk jobs, after those of ``carried``
    (its jobs are sources ``0 .. carried.jobs - 1``; payload ``i`` is source ``carried.jobs + i``).
    A payload the transform refuses in part (:class:`PartlyRefused`) has its usable requests sent
    and is refused: it becomes a dead letter once they are.

    ``carry_partial``: when full event jobs come before a partial one, the jobs from the one that
    made its first event on are held over: planned, but not sent (:attr:`Planned.leftover`). They
    are the batch's last, so for every ordering key they follow the ones kept. The next batch sends
    them first; a partial event job would take one of the ten requests a second Klaviyo allows.
    """
    parts = list(carried.parts)
    refused = list(carried.refused)
    skipped = list(carried.skipped)
    warnings = list(carried.warnings)
    noted: list[TransformWarning] = []
    for index, payload in enumerate(payloads, start=carried.jobs):
        try:
            parts.extend(
                map(
                    prepare,
                    transform(orjson.loads(payload), destination, mappings, index=index, warnings=noted),
                )
            )
        except PartlyRefused as exc:  # its usable part is sent, then it is dead-lettered
            parts.extend(map(prepare, exc.requests))
            refused.append((index, f"transform: {exc.message}"))
        except TransformError as exc:
            refused.append((index, f"transform: {exc.message}"))
            noted.clear()
        except Skipped as exc:
            skipped.append((index, exc.message))
        except ValueError as exc:  # an unreadable payload
            refused.append((index, f"payload is not valid JSON: {exc}"))
        if noted:
            warnings.extend((index, warning) for warning in noted)
            noted.clear()
    events = [part for part in parts if part.kind == "event"]
    total = carried.jobs + len(payloads)
    rest = len(events) % MAX_EVENTS
    if not (carry_partial and len(events) > MAX_EVENTS and rest):
        return Planned(assemble(parts), refused, skipped, total, len(events), warnings=warnings)
    kept = events[len(events) - rest].sources[0]
    leftover = Leftover(
        total - kept,
        tuple(_shifted(part, -kept) for part in parts if part.sources[0] >= kept),
        tuple((index - kept, reason) for index, reason in refused if index >= kept),
        tuple((index - kept, reason) for index, reason in skipped if index >= kept),
        rest,
        tuple((index - kept, warning) for index, warning in warnings if index >= kept),
    )
    return Planned(
        assemble([part for part in parts if part.sources[0] < kept]),
        [entry for entry in refused if entry[0] < kept],
        [entry for entry in skipped if entry[0] < kept],
        kept,
        len(events) - rest,
        leftover,
        [entry for entry in warnings if entry[0] < kept],
    )


def _shifted(part: Part, by: int) -> Part:
    """``part`` with its sources renumbered by ``by`` (and those of a request it sends as it is)."""
    if not by:
        return part
    request = part.request
    if request is not None:
        request = dataclasses.replace(
            request,
            sources=_plus(request.sources, by),
            item_sources=tuple(_plus(sources, by) for sources in request.item_sources),
        )
    return dataclasses.replace(part, sources=_plus(part.sources, by), request=request)


def _plus(sources: tuple[int, ...], by: int) -> tuple[int, ...]:
    return tuple(source + by for source in sources)


def claim_size(batch_size: int, events_per_job: float | None, carried_events: int = 0) -> int:
    """Jobs to claim so a batch's events fill whole event jobs, near ``batch_size`` (pure).

    From the events per job of the last batch: the whole number of event jobs closest to what
    ``batch_size`` jobs make, a little over (the part over is held over to the next batch), less
    the events of the jobs held over from the last (``carried_events``), kept between half and
    twice ``batch_size``. Without events, ``batch_size``. Before the first batch, twice
    ``batch_size``: enough for a full event job when at least every second job is an event.
    """
    if events_per_job is None:
        return 2 * batch_size
    if not events_per_job:
        return batch_size
    jobs_per_event_job = MAX_EVENTS / events_per_job
    event_jobs = max(1, round(batch_size / jobs_per_event_job))
    wanted = math.ceil(event_jobs * jobs_per_event_job * (1 + OVERSHOOT) - carried_events / events_per_job)
    return min(max(wanted, batch_size // 2, 1), 2 * batch_size)


def apply_outcome(plan: Plan, request: KlaviyoRequest, outcome: Outcome) -> None:
    """Record what one request's answer means for each job it carried."""
    state = RANK[outcome.kind]
    if state == OK:
        return
    items = len(request.item_sources)
    if state == DEAD and outcome.failed_items and items and all(0 <= i < items for i in outcome.failed_items):
        named = {s for i in outcome.failed_items for s in request.item_sources[i]}
        for i, sources in enumerate(request.item_sources):
            for source in sources:
                if i in outcome.failed_items:
                    plan.verdicts[source].worsen(DEAD, outcome.failed_items[i])
                elif source not in named:
                    plan.verdicts[source].worsen(
                        RETRY,
                        f"retried: another item of the same bulk job was refused ({outcome.detail})",
                        innocent=True,
                    )
        return
    for source in request.sources:
        plan.verdicts[source].worsen(state, outcome.detail, outcome.retry_after)


#: Paths of requests that act on list membership or consent: they go after the profile upserts.
LIST_PATHS: Final = frozenset(
    {"/api/profile-subscription-bulk-create-jobs", "/api/profile-subscription-bulk-delete-jobs"}
)


def phases(requests: Sequence[KlaviyoRequest]) -> list[list[KlaviyoRequest]]:
    """Requests that may go out together: profile upserts and events first, then list jobs.

    A list job (subscribe, unsubscribe, membership through a bulk import with a list) must not
    reach Klaviyo before the upsert of its profile. :func:`batch` collapses a profile's operations
    on one list to the last, but consent is per profile, so its jobs on different lists keep their
    order: a list job goes in the phase after the last one holding any of its profiles.
    """
    first = [r for r in requests if not _is_list_job(r)]
    later: list[list[KlaviyoRequest]] = []
    last_phase: dict[str, int] = {}
    for request in requests:
        if not _is_list_job(request):
            continue
        profiles = profiles_in(request)
        n = max((last_phase[p] + 1 for p in profiles if p in last_phase), default=0)
        if n == len(later):
            later.append([])
        later[n].append(request)
        last_phase.update(dict.fromkeys(profiles, n))
    return [phase for phase in (first, *later) if phase]


#: Paths whose bodies never name a list, so placing them needs no look into (or decoding of) the body.
LISTLESS_PATHS: Final = frozenset({"/api/events", "/api/event-bulk-create-jobs", "/api/profile-import"})


def _is_list_job(request: KlaviyoRequest) -> bool:
    if request.path in LIST_PATHS:
        return True
    return request.path not in LISTLESS_PATHS and bool(request.body.get("data", {}).get("relationships"))


def hold_back(plan: Plan) -> None:
    """Retry a profile's later jobs behind an earlier job of the batch that is retried (pure).

    The queue leases consecutive jobs of one ordering key together. When an earlier one must be
    retried, the later ones (already applied) go back too, due at once: the queue keeps them behind
    the earlier one, and sending them again after it leaves Klaviyo as if applied in order.
    """
    waiting: set[str] = set()
    for verdict in plan.verdicts:
        key = verdict.job.ordering_key
        if key is None:
            continue
        if verdict.state in (RETRY, RELEASE):
            waiting.add(key)
        elif verdict.state == OK and key in waiting and not verdict.reason:  # a reason: skipped
            verdict.worsen(
                RETRY, "retried: an earlier job of the same profile is retried first", innocent=True
            )
