"""Claimed jobs → the requests that carry them, and what each answer means for each job (pure).

:func:`plan_payloads` transforms a batch's payloads and merges the results into Klaviyo's bulk
jobs (:mod:`router.klaviyo.batch`), in stages: profile upserts, then events, then list jobs (a
profile's n-th list operation in the n-th round). Its :class:`Planned` is plain data, so a
planning process can do this and send it back (:mod:`router.planner`). :meth:`Plan.of` pairs it
with the jobs. A payload the transform refuses in part (:class:`~router.errors.PartlyRefused`) has
its usable requests planned and becomes a dead letter once they are accepted; what a payload is
sent without (:class:`~router.transform.TransformWarning`) travels with the plan, for the worker to
log once the job is settled.

A job's requests are its *steps* (an identify: the profile upsert and a subscription). Klaviyo's
answer to each request settles the step of every job it carried (:func:`apply_outcome`): an
accepted step sets the bit of its kind in the job's ``accepted`` (:data:`STEP_BITS`), which the
queue keeps as the job's progress; a later attempt plans only the steps still missing, so nothing
Klaviyo took is sent again because another step failed. A job then takes the worst outcome of
its steps:

- every step accepted → ``OK`` (acked);
- a step not sent, through no fault of its own (an earlier job of its profile failed, another
  item of its bulk job was refused, delivery is stopping) → ``HELD``: back to the queue untried;
- a retryable failure (429, 408, 5xx, timeout) → ``RETRY``;
- a permanent refusal (400, 404, 409, 413, 422) → ``DEAD``; for a bulk job that names items by
  ``source.pointer``, only those items' jobs (the others are ``HELD``);
- 401/403 → ``RELEASE``: the destination is paused and the jobs go back untried.

Per-profile order: a stage goes out once the one before is answered, and requests of one stage
that share a profile one after the other (:func:`next_wave`); a job's later steps, and the later
jobs of its profile, are not sent once a step failed (:func:`blocked`) but held back for the
queue to bring again behind it.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import orjson

from router.destination import Destination
from router.errors import PartlyRefused, Skipped, TransformError
from router.klaviyo.batch import MAX_EVENTS, Part, prepare, staged
from router.klaviyo.client import Outcome
from router.klaviyo.requests import KINDS, KlaviyoRequest
from router.mapping import Mappings
from router.queue import Job
from router.transform import TransformWarning, transform

#: Settle states, worst last: a job takes the worst of its steps' outcomes.
OK, HELD, RETRY, DEAD, RELEASE = 0, 1, 2, 3, 4
RANK: Final = {"ok": OK, "unsent": HELD, "retry": RETRY, "permanent": DEAD, "auth": RELEASE}
#: The progress bit of each kind of step (stored in the queue: never reorder, only append).
STEP_BITS: Final = {kind: 1 << n for n, kind in enumerate(KINDS)}
#: Claims aim this much past whole event jobs: the overshoot is held over, not sent half empty.
#: A claim can bring fewer jobs than asked (those of a key in flight elsewhere wait), and a batch
#: short of one full event job sends what it has; 12 % over makes that rare with the bench mix.
OVERSHOOT: Final = 0.12
#: Longest reason kept from an unexpected error.
MAX_REASON: Final = 500


@dataclass(slots=True)
class Verdict:
    """The running settle state of one claimed job."""

    job: Job
    state: int = OK
    reason: str = ""
    retry_after: float | None = None
    #: Progress bits (:data:`STEP_BITS`) of the steps Klaviyo accepted in this batch.
    accepted: int = 0
    #: Why the transform refused the rest of a job it made some requests of: once those are
    #: accepted, the job is a dead letter for this reason (:meth:`Plan.refuse`).
    refusal: str = ""

    def worsen(self, state: int, reason: str, retry_after: float | None = None) -> None:
        if state > self.state or (state == self.state == RETRY):
            self.state, self.reason = state, reason
        if state == RETRY and retry_after is not None:
            self.retry_after = max(self.retry_after or 0.0, retry_after)

    @property
    def progress(self) -> int:
        """Every step done: before this batch, and in it."""
        return self.job.progress | self.accepted


@dataclass(frozen=True, slots=True)
class Leftover:
    """Jobs transformed and prepared, not yet merged into bulk jobs: what the transform made of
    each (plain data; job ``i`` is source ``i``, or ``start + i`` for payloads prepared apart by
    :func:`prepare_payloads`). Those a batch held over go into the next batch's bulk jobs ahead
    of its own (:func:`plan_prepared`)."""

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

    #: The requests, stage by stage (see :func:`router.klaviyo.batch.staged`).
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
    #: The stage of each request, and the kind of step it carries for its jobs.
    stages: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        parts: Sequence[Part],
        refused: list[tuple[int, str]],
        skipped: list[tuple[int, str]],
        kept: int,
        events: int,
        leftover: Leftover = NOTHING_LEFT,
        warnings: list[tuple[int, TransformWarning]] | None = None,
    ) -> Planned:
        sends = staged(parts)
        return cls(
            [entry.request for entry in sends],
            refused,
            skipped,
            kept,
            events,
            leftover,
            warnings or [],
            [entry.stage for entry in sends],
            [entry.kind for entry in sends],
        )

    def sends(self, jobs: tuple[int, ...] | None = None) -> list[Send]:
        return [
            Send(stage, kind, request, jobs)
            for stage, kind, request in zip(self.stages, self.kinds, self.requests, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class Send:
    """One request of a plan: its stage, the kind of step it is for each job it carries, and
    which of the batch's jobs its sources are (``jobs[source]``; None: the sources are the batch's
    indexes, as in a batch's own plan, not a plan of part of it)."""

    stage: int
    kind: str
    request: KlaviyoRequest
    jobs: tuple[int, ...] | None = None

    def job(self, source: int) -> int:
        """The batch index of one of the request's sources."""
        return source if self.jobs is None else self.jobs[source]

    def carried(self) -> list[int]:
        """The batch indexes of every job the request carries."""
        jobs = self.jobs
        return list(self.request.sources) if jobs is None else [jobs[s] for s in self.request.sources]


@dataclass(slots=True)
class Plan:
    """A claimed batch turned into requests; ``verdicts[i]`` is the settle state of its job ``i``."""

    verdicts: list[Verdict]
    sends: list[Send]
    skipped: int = 0
    #: Jobs held over to the next batch (still leased), and what they were planned into.
    held: list[Job] = field(default_factory=list)
    leftover: Leftover = NOTHING_LEFT
    events: int = 0
    #: (index into ``verdicts``, warning): logged and counted when the job is settled.
    warnings: list[tuple[int, TransformWarning]] = field(default_factory=list)

    @property
    def requests(self) -> list[KlaviyoRequest]:
        return [send.request for send in self.sends]

    @classmethod
    def of(cls, jobs: Sequence[Job], planned: Planned) -> Plan:
        work = cls(
            [Verdict(job) for job in jobs[: planned.kept]],
            planned.sends(),
            len(planned.skipped),
            list(jobs[planned.kept :]),
            planned.leftover,
            planned.events,
            planned.warnings,
        )
        work.refuse(planned.refused, work.sends)
        for index, reason in planned.skipped:
            work.verdicts[index].reason = reason
        return work

    def refuse(
        self, refused: Iterable[tuple[int, str]], sends: Sequence[Send], jobs: tuple[int, ...] | None = None
    ) -> None:
        """Dead-letter the jobs the transform refused (``(index, reason)``; ``jobs[index]`` is the
        batch index, as for :class:`Send`): at once when ``sends`` carry nothing of a job, else
        once what they carry of it is accepted (a job refused in part: :meth:`apply_refusals`)."""
        carried = {index for send in sends for index in send.carried()}
        for index, reason in refused:
            job = index if jobs is None else jobs[index]
            if job in carried:
                self.verdicts[job].refusal = reason
            else:
                self.verdicts[job].worsen(DEAD, reason)

    def apply_refusals(self) -> None:
        """Every job refused in part whose requests were all accepted becomes a dead letter (one
        that must go again keeps its refusal for the next attempt's plan to find)."""
        for verdict in self.verdicts:
            if verdict.refusal and verdict.state == OK:
                verdict.worsen(DEAD, verdict.refusal)

    def worsen(self, jobs: Iterable[int], state: int, reason: str) -> None:
        """Give every job of ``jobs`` (batch indexes) at least ``state``."""
        for index in jobs:
            self.verdicts[index].worsen(state, reason)


def plan(
    jobs: Sequence[Job],
    destination: Destination,
    mappings: Mappings,
    *,
    carry_partial: bool = False,
    carried: Leftover = NOTHING_LEFT,
) -> Plan:
    """Transform every job (the steps its progress lacks) and merge the results into bulk requests
    (pure). The first ``carried.jobs`` jobs are a last batch's held-over ones, planned as ``carried``."""
    fresh = jobs[carried.jobs :]
    return Plan.of(
        jobs,
        plan_payloads(
            [job.payload for job in fresh],
            destination,
            mappings,
            carry_partial=carry_partial,
            carried=carried,
            progress=[job.progress for job in fresh],
        ),
    )


def plan_payloads(
    payloads: Sequence[bytes],
    destination: Destination,
    mappings: Mappings,
    *,
    carry_partial: bool = False,
    carried: Leftover = NOTHING_LEFT,
    progress: Sequence[int] = (),
) -> Planned:
    """Transform each payload and merge the requests into bulk jobs, after those of ``carried``
    (its jobs are sources ``0 .. carried.jobs - 1``; payload ``i`` is source ``carried.jobs + i``):
    :func:`prepare_payloads`, then :func:`plan_prepared`, in one go.

    ``progress``: for each payload, the bits (:data:`STEP_BITS`) of the steps already done: those
    are left out (none when empty). ``carry_partial``: see :func:`plan_prepared`.
    """
    prepared = _Prepared(
        list(carried.parts), list(carried.refused), list(carried.skipped), list(carried.warnings)
    )
    prepared.add(payloads, destination, mappings, carried.jobs, progress)
    return assemble_prepared(*prepared.cut(carried.jobs + len(payloads), carry_partial))


def prepare_payloads(
    payloads: Sequence[bytes], destination: Destination, mappings: Mappings, *, start: int = 0
) -> Leftover:
    """The first step of planning, done for each payload on its own (so parts of a batch can be
    prepared in separate processes): transform it and encode what its requests add to bulk jobs
    (:func:`router.klaviyo.batch.prepare`); payload ``i`` is source ``start + i``.

    A payload the transform refuses in part (:class:`PartlyRefused`) has its usable requests kept
    and is refused: it becomes a dead letter once they are sent. A payload that cannot be planned
    (the transform refuses it, it is not JSON, its requests cannot be encoded, or the transform
    fails unexpectedly: the same input always fails the same way) is refused with the reason,
    alone: the others go on.
    """
    prepared = _Prepared([], [], [], [])
    prepared.add(payloads, destination, mappings, start, ())
    return prepared.leftover(len(payloads))


def plan_prepared(pieces: Sequence[Leftover], *, carry_partial: bool = False) -> Planned:
    """Merge prepared jobs into bulk jobs: :func:`cut_prepared`, then :func:`assemble_prepared`."""
    return assemble_prepared(*cut_prepared(pieces, carry_partial=carry_partial))


def cut_prepared(pieces: Sequence[Leftover], *, carry_partial: bool = False) -> tuple[Leftover, Leftover]:
    """Prepared jobs, ``pieces`` in order (the first numbered from 0, held-over jobs say, each of the
    others from the jobs before it: :func:`prepare_payloads`'s ``start``), as the jobs planned now
    and those held over (numbered from 0 again; :data:`NOTHING_LEFT` unless ``carry_partial``).

    ``carry_partial``: when full event jobs come before a partial one, the jobs from the one that
    made its first event on are held over: planned, but not sent (:attr:`Planned.leftover`). They
    are the batch's last, so for every ordering key they follow the ones kept. The next batch sends
    them first; a partial event job would take one of the ten requests a second Klaviyo allows.
    """
    joined = _Prepared([], [], [], [])
    for piece in pieces:
        joined.parts += piece.parts
        joined.refused += piece.refused
        joined.skipped += piece.skipped
        joined.warnings += piece.warnings
    return joined.cut(sum(piece.jobs for piece in pieces), carry_partial)


def assemble_prepared(kept: Leftover, held: Leftover = NOTHING_LEFT) -> Planned:
    """The jobs planned now (:func:`cut_prepared`) merged into bulk jobs, in stages
    (:func:`router.klaviyo.batch.staged`), with those held over."""
    return Planned.of(
        kept.parts, list(kept.refused), list(kept.skipped), kept.jobs, kept.events, held, list(kept.warnings)
    )


@dataclass(slots=True)
class _Prepared:
    """Jobs being planned: the parts of their requests, and what was refused, skipped, warned."""

    parts: list[Part]
    refused: list[tuple[int, str]]
    skipped: list[tuple[int, str]]
    warnings: list[tuple[int, TransformWarning]]

    def add(
        self,
        payloads: Sequence[bytes],
        destination: Destination,
        mappings: Mappings,
        start: int,
        progress: Sequence[int],
    ) -> None:
        """Prepare ``payloads`` as sources ``start`` on (see :func:`prepare_payloads`)."""
        parts, refused, skipped, warnings = self.parts, self.refused, self.skipped, self.warnings
        noted: list[TransformWarning] = []
        for index, payload in enumerate(payloads, start=start):
            done = progress[index - start] if progress else 0
            try:
                try:
                    requests = transform(
                        orjson.loads(payload), destination, mappings, index=index, warnings=noted
                    )
                except PartlyRefused as exc:  # its usable part is sent, then it is dead-lettered
                    requests = exc.requests
                    refused.append((index, f"transform: {exc.message}"))
                parts.extend(prepare(r) for r in requests if not done & STEP_BITS[r.kind])
            except TransformError as exc:
                refused.append((index, f"transform: {exc.message}"))
                noted.clear()
            except Skipped as exc:
                skipped.append((index, exc.message))
            except orjson.JSONEncodeError as exc:
                refused.append((index, f"cannot be encoded for Klaviyo: {exc}"))
            except ValueError as exc:  # an unreadable payload
                refused.append((index, f"payload is not valid JSON: {exc}"))
            except MemoryError:
                raise  # not this payload's fault: the batch fails (see Deliverer._plan)
            except Exception as exc:  # a pure function failing: it fails the same way every time
                refused.append((index, unexpected("planning failed", exc)))
            if noted:
                warnings.extend((index, warning) for warning in noted)
                noted.clear()

    def leftover(self, jobs: int) -> Leftover:
        events = sum(1 for part in self.parts if part.kind == "event")
        return Leftover(
            jobs, tuple(self.parts), tuple(self.refused), tuple(self.skipped), events, tuple(self.warnings)
        )

    def cut(self, total: int, carry_partial: bool) -> tuple[Leftover, Leftover]:
        """The jobs (sources ``0 .. total - 1``) planned now, and those held over (see
        :func:`cut_prepared`)."""
        parts, refused, skipped, warnings = self.parts, self.refused, self.skipped, self.warnings
        events = [part for part in parts if part.kind == "event"]
        rest = len(events) % MAX_EVENTS
        if not (carry_partial and len(events) > MAX_EVENTS and rest):
            kept = Leftover(total, tuple(parts), tuple(refused), tuple(skipped), len(events), tuple(warnings))
            return kept, NOTHING_LEFT
        first = events[len(events) - rest].sources[0]
        held = Leftover(
            total - first,
            tuple(_shifted(part, -first) for part in parts if part.sources[0] >= first),
            tuple((index - first, reason) for index, reason in refused if index >= first),
            tuple((index - first, reason) for index, reason in skipped if index >= first),
            rest,
            tuple((index - first, warning) for index, warning in warnings if index >= first),
        )
        kept = Leftover(
            first,
            tuple(part for part in parts if part.sources[0] < first),
            tuple(entry for entry in refused if entry[0] < first),
            tuple(entry for entry in skipped if entry[0] < first),
            len(events) - rest,
            tuple(entry for entry in warnings if entry[0] < first),
        )
        return kept, held


def unexpected(what: str, exc: BaseException) -> str:
    """A dead letter's reason for an unexpected exception (its type and text, cut short)."""
    return f"{what}: {type(exc).__name__}: {exc}"[:MAX_REASON]


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
    return Part(
        part.kind,
        part.path,
        _plus(part.sources, by),
        part.ordering_key,
        part.items,
        part.profile,
        part.key,
        part.envelope,
        request,
    )


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


def apply_outcome(plan: Plan, send: Send, outcome: Outcome) -> None:
    """Record what one request's answer means for the step it is of each job it carried."""
    state = RANK[outcome.kind]
    verdicts = plan.verdicts
    if state == OK:
        bit = STEP_BITS[send.kind]
        for index in send.carried():
            verdicts[index].accepted |= bit
        return
    items = send.request.item_sources
    failed = outcome.failed_items
    if state == DEAD and failed and items and all(0 <= i < len(items) for i in failed):
        named = {source for i in failed for source in items[i]}
        for i, sources in enumerate(items):
            for source in sources:
                if i in failed:
                    verdicts[send.job(source)].worsen(DEAD, failed[i])
                elif source not in named:
                    verdicts[send.job(source)].worsen(
                        HELD, f"held back: another item of the same bulk job was refused ({outcome.detail})"
                    )
        return
    for index in send.carried():
        verdicts[index].worsen(state, outcome.detail, outcome.retry_after)


def blocked(verdicts: Sequence[Verdict]) -> set[int]:
    """The jobs whose requests must not be sent now (batch indexes; pure).

    A job a step of which failed, and every later job of its profile (ordering key) when it comes
    back to the queue (held, retried, released): sending those first would apply them out of order.
    A dead letter does not hold its profile's later jobs back, as in the queue.
    """
    waiting: set[str] = set()
    found: set[int] = set()
    for index, verdict in enumerate(verdicts):
        key = verdict.job.ordering_key
        if verdict.state != OK:
            found.add(index)
            if key is not None and verdict.state != DEAD:
                waiting.add(key)
        elif key is not None and key in waiting:
            found.add(index)
    return found


def next_wave(sends: Sequence[Send], verdicts: Sequence[Verdict]) -> list[Send]:
    """The requests to send together next (pure): those of the first stage of ``sends`` that share
    no profile with a request before them in that stage (those wait for its answer)."""
    stage = [send for send in sends if send.stage == sends[0].stage]
    if len(stage) == 1:
        return stage
    wave: list[Send] = []
    seen: set[str] = set()
    for send in stage:
        keys = {key for index in send.carried() if (key := verdicts[index].job.ordering_key) is not None}
        if seen.isdisjoint(keys):
            wave.append(send)
        seen.update(keys)
    return wave
