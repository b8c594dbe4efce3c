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
(:func:`claim_size`), and a batch gives back the jobs behind its last full event job
(``give_back_partial``) for the next batch to carry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson

from router.destination import Destination
from router.errors import Skipped, TransformError
from router.klaviyo.batch import MAX_EVENTS, Part, assemble, prepare, profiles_in
from router.klaviyo.client import Outcome
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import Mappings
from router.queue import Job
from router.transform import transform

#: Settle states, worst last: a job takes the worst of its requests' outcomes.
OK, RETRY, DEAD, RELEASE = 0, 1, 2, 3
RANK: Final = {"ok": OK, "retry": RETRY, "permanent": DEAD, "auth": RELEASE}
#: Claims aim this much past whole event jobs: the overshoot is given back, not sent half empty.
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
class Planned:
    """A batch's payloads planned (plain data: a planning process sends it back)."""

    requests: list[KlaviyoRequest]
    #: (index, reason) of every job the transform refused: dead letters.
    refused: list[tuple[int, str]]
    #: (index, reason) of every job with no Klaviyo equivalent: acked as skipped.
    skipped: list[tuple[int, str]]
    #: The first ``kept`` jobs are planned; the others are given back to the queue.
    kept: int
    #: Event requests the kept jobs made (sizes later claims).
    events: int


@dataclass(slots=True)
class Plan:
    """A claimed batch turned into requests; ``verdicts[i]`` is the settle state of ``jobs[i]``."""

    verdicts: list[Verdict]
    requests: list[KlaviyoRequest]
    skipped: int = 0
    #: Claimed jobs left out of this batch, to release untouched.
    given_back: list[Job] = field(default_factory=list)
    events: int = 0

    @classmethod
    def of(cls, jobs: Sequence[Job], planned: Planned) -> Plan:
        verdicts = [Verdict(job) for job in jobs[: planned.kept]]
        for index, reason in planned.refused:
            verdicts[index].worsen(DEAD, reason)
        for index, reason in planned.skipped:
            verdicts[index].reason = reason
        return cls(
            verdicts, planned.requests, len(planned.skipped), list(jobs[planned.kept :]), planned.events
        )


def plan(
    jobs: Sequence[Job], destination: Destination, mappings: Mappings, *, give_back_partial: bool = False
) -> Plan:
    """Transform every job and merge the results into bulk requests (pure)."""
    payloads = [job.payload for job in jobs]
    return Plan.of(jobs, plan_payloads(payloads, destination, mappings, give_back_partial=give_back_partial))


def plan_payloads(
    payloads: Sequence[bytes],
    destination: Destination,
    mappings: Mappings,
    *,
    give_back_partial: bool = False,
) -> Planned:
    """Transform each payload (job ``i`` is source ``i``) and merge the requests into bulk jobs.

    ``give_back_partial``: when full event jobs come before a partial one, the jobs from the one
    that made its first event on are given back. They are the batch's last, so for every ordering
    key they follow the ones kept. Re-planning them costs far less than the event request a
    partial job would take of the ten a second Klaviyo allows.
    """
    parts: list[Part] = []
    refused: list[tuple[int, str]] = []
    skipped: list[tuple[int, str]] = []
    for index, payload in enumerate(payloads):
        try:
            parts.extend(map(prepare, transform(orjson.loads(payload), destination, mappings, index=index)))
        except TransformError as exc:
            refused.append((index, f"transform: {exc.message}"))
        except Skipped as exc:
            skipped.append((index, exc.message))
        except ValueError as exc:  # an unreadable payload
            refused.append((index, f"payload is not valid JSON: {exc}"))
    events = [part for part in parts if part.kind == "event"]
    kept = len(payloads)
    rest = len(events) % MAX_EVENTS
    if give_back_partial and len(events) > MAX_EVENTS and rest:
        kept = events[len(events) - rest].sources[0]
        parts = [part for part in parts if part.sources[0] < kept]
        refused = [entry for entry in refused if entry[0] < kept]
        skipped = [entry for entry in skipped if entry[0] < kept]
        events = events[: len(events) - rest]
    return Planned(assemble(parts), refused, skipped, kept, len(events))


def claim_size(batch_size: int, events_per_job: float | None) -> int:
    """Jobs to claim so a batch's events fill whole event jobs, near ``batch_size`` (pure).

    From the events per job of the last batch: the whole number of event jobs closest to what
    ``batch_size`` jobs make, a little over (the part over is given back), kept between half and
    twice ``batch_size``. Without events, ``batch_size``. Before the first batch, twice
    ``batch_size``: enough for a full event job when at least every second job is an event.
    """
    if events_per_job is None:
        return 2 * batch_size
    if not events_per_job:
        return batch_size
    jobs_per_event_job = MAX_EVENTS / events_per_job
    event_jobs = max(1, round(batch_size / jobs_per_event_job))
    wanted = math.ceil(event_jobs * jobs_per_event_job * (1 + OVERSHOOT))
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
