"""Delivery workers: claim → plan → send → settle, for one destination.

Claim: each worker claims a batch of jobs sized to fill whole event bulk jobs
(:func:`~router.plan.claim_size`), after the jobs an earlier batch held over, and keeps them leased
while the batch is out. A batch the queue left short of a full event job, while other batches are
out, gives its jobs back and claims again when one of them settles.

Plan: the batch is planned with the current mappings, in this process or in planning processes of
their own (:class:`~router.planner.Planner`, ``[delivery] planners``): transformed, the steps each
job's progress already holds left out, merged into bulk jobs by stage (:mod:`router.plan`). The
jobs behind its last full event job are held over for the next batch. A job that cannot be planned
never holds up the others: a batch whose planning fails as a whole is split until the jobs that
fail alone are found; they become dead letters and the rest is planned again.

Send: stage by stage (profile upserts, then events, then list jobs in rounds; requests of one stage
that share a profile one after another), each request paced by the client below Klaviyo's limits
(a ``Retry-After`` pauses its endpoint). Each answer settles the step of every job it carried
(:func:`~router.plan.apply_outcome`). An accepted bulk profile import is followed to its end: the
profiles it refused become dead letters, and the list jobs wait for the imports of their profiles.
Before each wave the worker checks what failed so far: a job one step of which failed, and the
later jobs of its profile, send nothing more in this batch; the rest is planned again without them
and goes on.

Settle: every job by the worst outcome of its steps (:mod:`router.plan` decides which), with the
steps Klaviyo accepted stored as its progress, so a later attempt sends only the steps still missing:

- ``OK`` → ``ack``; a message with no Klaviyo equivalent (alias, page when off) is acked as skipped;
- ``HELD`` (an earlier job of its profile failed, another item of its bulk job was refused, or
  delivery is stopping) → ``release``: back to the queue without an attempt counted;
- ``RETRY`` (429, 408, 5xx, timeout) → ``retry`` at the time :class:`RetryPolicy` picks (never
  before Klaviyo's ``Retry-After``), or dead letter once attempts or age run out;
- ``DEAD`` (a permanent refusal with Klaviyo's detail, only the items a bulk job names by
  ``source.pointer``; a message the transform refuses, one refused in part once its usable steps
  are accepted) → dead letter with the reason;
- ``RELEASE`` (401/403) → the destination is paused (``/ready`` reports it), the batch's jobs and
  the held-over ones are released untouched, and one worker probes every ``pause_probe`` seconds
  until Klaviyo takes the key again.

What settled jobs were sent without (a dropped phone, an ignored consent channel) is logged as
``transform_warning`` and counted. Any other exception while sending counts an attempt for the
batch's jobs, so nothing loops forever. Per-profile order comes from the queue (a job waits while
an earlier one of its profile is in flight or waiting for a retry; a key's consecutive jobs are
leased together, in order) and, within a batch, from the stages and the held-back jobs above.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import aiohttp
import structlog

from router.destination import Destination
from router.health import Outage, PausedDestinations
from router.klaviyo.batch import LIST_STAGE, MAX_EVENTS
from router.klaviyo.client import NOT_SENT, KlaviyoClient, Outcome, scrub
from router.klaviyo.imports import IMPORT_PATH, ImportResult, follow, job_id
from router.klaviyo.ratelimit import RateLimits
from router.klaviyo.shared_ratelimit import shared_pacers
from router.mapping import MappingSets
from router.metrics import Metrics
from router.plan import (
    DEAD,
    HELD,
    NOTHING_LEFT,
    OK,
    RELEASE,
    RETRY,
    STEP_BITS,
    Leftover,
    Plan,
    Send,
    Verdict,
    apply_outcome,
    blocked,
    claim_size,
    next_wave,
    unexpected,
)
from router.planner import Planner
from router.queue import Job, Queue, QueueUnavailable
from router.retry import RetryPolicy
from router.settings import Settings

log = structlog.get_logger("router.deliver")
_DEFAULTS: Final = Settings()
#: Longest pause (s) between a worker's tries while the queue is out of reach.
QUEUE_BACKOFF: Final = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliverySettings:
    """How hard and how patiently to deliver. Defaults are the ``[delivery]`` defaults of
    :class:`~router.settings.Settings` (one place documents them); :meth:`from_settings` builds
    the workers' settings from a loaded config."""

    #: Concurrent workers per destination (each sends one claimed batch at a time).
    workers: int = _DEFAULTS.delivery_workers
    #: Jobs claimed per batch (bulk jobs carry up to 1000 events / 10 000 profiles).
    batch_size: int = _DEFAULTS.delivery_batch_size
    #: How long a claimed job stays leased before another worker may take it (renewed while sent).
    lease_seconds: float = _DEFAULTS.delivery_lease
    #: Pause between claims when nothing is due: the deliverer's idle workers claim once per
    #: ``idle_poll`` between them (a batch settling lets them claim at once).
    idle_poll: float = 0.2
    #: While a destination is paused, how often one worker tries again.
    pause_probe: float = _DEFAULTS.delivery_pause_probe
    #: Seconds to wait for Klaviyo's answer.
    timeout: float = _DEFAULTS.delivery_timeout
    #: Fraction of Klaviyo's documented rate limits to use (below 1 leaves room for other clients).
    rate_limit_scale: float = _DEFAULTS.delivery_rate_limit_scale
    #: Size claims to fill whole event bulk jobs and hold over, for the next batch, what the last
    #: full one leaves (off: ``batch_size`` jobs each, all sent).
    fill_event_jobs: bool = True
    #: With ``fill_event_jobs``: how long a batch that would send a partial event job because the
    #: queue had no more jobs it could take may wait for this deliverer's other batches to settle
    #: (their profiles' later jobs become due then) and claim again (0: never wait).
    fill_wait: float = 1.0
    #: Processes that plan batches for :func:`deliver_all` (0: in the workers' process).
    planners: int = _DEFAULTS.delivery_planners
    #: How long to follow a bulk profile import job to learn which profiles it refused.
    import_wait: float = 120.0
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(
            max_attempts=_DEFAULTS.delivery_max_attempts, max_age=_DEFAULTS.delivery_max_age
        )
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliverySettings:
        """The ``[delivery]`` part of a loaded config, as the workers take it."""
        return cls(
            workers=settings.delivery_workers,
            batch_size=settings.delivery_batch_size,
            lease_seconds=settings.delivery_lease,
            timeout=settings.delivery_timeout,
            rate_limit_scale=settings.delivery_rate_limit_scale,
            pause_probe=settings.delivery_pause_probe,
            planners=settings.delivery_planners,
            retry=RetryPolicy(max_attempts=settings.delivery_max_attempts, max_age=settings.delivery_max_age),
        )


class Deliverer:
    """Delivers one destination's queued jobs until stopped."""

    def __init__(
        self,
        queue: Queue,
        destination: Destination,
        client: KlaviyoClient,
        *,
        settings: DeliverySettings | None = None,
        paused: PausedDestinations | None = None,
        metrics: Metrics | None = None,
        planner: Planner | None = None,
        outage: Outage | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``planner``: where batches are planned, and with which mappings (default: in this process,
        with the destination's mappings as they are now: :class:`~router.errors.MappingError` if
        they are broken). ``outage``: where the workers log the queue being out of reach, shared by
        every deliverer of a process so that an outage is logged once (default: this one's own)."""
        self.queue = queue
        self.destination = destination
        self.client = client
        self.settings = settings or DeliverySettings()
        self.paused = paused or PausedDestinations()
        self._metrics = metrics
        self._planner = planner or Planner(MappingSets([destination.mappings_dir]))
        self._clock = clock
        self._outage = outage or queue_outage()
        #: Set when delivery stops: requests still waiting for their turn are not sent.
        self._stopping = asyncio.Event()
        #: Events per job of the last batch planned (sizes the next claim).
        self._events_per_job: float | None = None
        #: Held by the one worker claiming and planning the first batch (see _claim_and_plan_sized).
        self._first = asyncio.Lock()
        #: Jobs planned but held over by earlier batches (see :func:`router.plan.plan_payloads`).
        self._held: list[_Held] = []
        #: Batches being sent or settled; set (and replaced) when one is done (see _claim_filled).
        self._out = 0
        self._settled = asyncio.Event()
        self._probe = asyncio.Lock()
        self._last_probe = 0.0
        #: When a worker's claim last found nothing due, and an event set when jobs may be due again
        #: (a batch settled, a claim found jobs); None while claims find jobs (see _while_nothing_due).
        self._nothing_due: tuple[float, asyncio.Event] | None = None
        #: Batches settled so far (a claim that found nothing while one settled proves nothing).
        self._settles = 0
        self.log = log.bind(destination=destination.name)

    # ------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Run the configured number of workers until ``stop`` is set."""
        self.log.info("delivery_started", workers=self.settings.workers)
        self._stopping = stop
        try:
            async with asyncio.TaskGroup() as group:
                for n in range(self.settings.workers):
                    group.create_task(self._worker(stop, n))
        finally:
            await self.release_held()
        self.log.info("delivery_stopped")

    async def _worker(self, stop: asyncio.Event, number: int) -> None:
        unreachable = 0  # batches in a row that found the queue out of reach
        while not stop.is_set():
            if self.paused.is_paused(self.destination.name):
                await self._probe_paused(stop, number)
                continue
            await self._while_nothing_due()
            settles = self._settles
            try:
                done = await self.deliver_once()
                unreachable = 0
                self._outage.succeeded()
                if done:
                    self._jobs_may_be_due()
                elif settles == self._settles:
                    gate = self._nothing_due
                    self._nothing_due = (time.monotonic(), gate[1] if gate else asyncio.Event())
            except QueueUnavailable as exc:  # back off, doubling up to QUEUE_BACKOFF, until it answers
                unreachable += 1
                self._outage.failed(exc)
                await _sleep_unless(stop, min(QUEUE_BACKOFF, self.settings.idle_poll * 2**unreachable))
                continue
            except Exception:
                self.log.exception("delivery_batch_failed", worker=number)
                done = 0
            if not done:
                await _sleep_unless(stop, self.settings.idle_poll)

    async def _while_nothing_due(self) -> None:
        """Wait while the last claim of a worker found nothing due, less than ``idle_poll`` ago, and
        no batch has settled since: one claim per ``idle_poll`` asks the queue for every idle worker
        (the first worker after that time), not one per worker. A claim that finds nothing costs
        the database about what one that finds a batch does, under the destination's claim lock
        that the claims of every process take in turn."""
        while (gate := self._nothing_due) is not None:
            at, due = gate
            left = at + self.settings.idle_poll - time.monotonic()
            if left <= 0:
                self._nothing_due = (time.monotonic(), due)  # this worker's claim asks for the others
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await due.wait()

    def _jobs_may_be_due(self) -> None:
        """A batch settled or a claim found jobs: workers waiting in :meth:`_while_nothing_due` go."""
        if self._nothing_due is not None:
            self._nothing_due[1].set()
            self._nothing_due = None

    async def _probe_paused(self, stop: asyncio.Event, number: int) -> None:
        """While paused, one batch per probe interval (by whichever worker gets there first)."""
        if not await _sleep_unless(stop, self.settings.pause_probe) or self._probe.locked():
            return
        if self._clock() - self._last_probe < self.settings.pause_probe:
            return
        async with self._probe:
            self._last_probe = self._clock()
            try:
                await self.deliver_once()
            except Exception:
                self.log.exception("delivery_probe_failed", worker=number)

    async def deliver_once(self) -> int:
        """Claim one batch, deliver it and settle every job; returns the number of jobs settled.

        Jobs the batch holds over (behind its last full event job) stay leased for the next one;
        :meth:`release_held` gives them back (``run`` does when it stops).
        """
        claimed = await self._claim_filled()
        if claimed is None:
            return 0
        work, _, heartbeat, _ = claimed
        self._out += 1
        try:
            try:
                await self._send(work)
            except Exception as exc:  # a bug, not an answer: an attempt for every job, so it cannot loop
                self.log.exception("delivery_batch_failed", jobs=len(work.verdicts))
                work.worsen(range(len(work.verdicts)), RETRY, unexpected("delivery failed", exc))
            except BaseException:  # cancelled: what Klaviyo took is kept, the rest goes back untried
                await _stop(heartbeat)
                await self._release(work.verdicts)
                raise
            await _stop(heartbeat)
            await self._settle(work)
        finally:
            self._out -= 1
            self._settles += 1
            self._settled.set()
            self._settled = asyncio.Event()
            self._jobs_may_be_due()
        return len(work.verdicts)

    async def _claim_filled(self) -> _Claimed | None:
        """:meth:`_claim_and_plan_sized`; but when the queue had too few jobs to fill an event job while
        other batches of this deliverer are out, give the jobs back and claim again once one of
        those settles (within ``fill_wait``).

        At the end of a backlog most jobs left wait behind a profile's jobs in those batches; a
        partial event job sent now would take one of the ten requests a second that Klaviyo allows.
        The jobs are released, not held, as held jobs would keep their profiles' later ones waiting.
        A claim that is short by the events per job so far is given back before it is planned;
        one found short only once planned, after.
        """
        deadline = time.monotonic() + self.settings.fill_wait
        while True:
            # a batch settling from here on wakes the wait below, even while this claim or its
            # release is still under way (the event is replaced by a new one at each settle)
            settled = self._settled
            claimed = await self._claim_and_plan_sized(may_wait=time.monotonic() < deadline)
            left = deadline - time.monotonic()
            if claimed is not _GAVE_BACK:
                if claimed is None or left <= 0 or not self._short_of_events(claimed):
                    return claimed
                await _stop(claimed.heartbeat)
                await self.queue.release(claimed.leased)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(left, 0.0)):
                    await settled.wait()

    def _short_of_events(self, claimed: _Claimed) -> bool:
        """Whether ``claimed`` would send a partial event job only because the queue ran short,
        while another batch is out whose settling may free more."""
        return (
            self.settings.fill_event_jobs
            and claimed.short
            and 0 < claimed.work.events < MAX_EVENTS
            and self._out > 0
        )

    async def _claim_and_plan_sized(self, *, may_wait: bool = False) -> _Claimed | _GaveBack | None:
        """:meth:`_claim_and_plan`, one worker at a time until a batch has been planned: the first
        goes out sooner without the others' claims and plans before it, and its events per job
        size theirs."""
        if self._events_per_job is None:
            async with self._first:
                if self._events_per_job is None:
                    return await self._claim_and_plan(may_wait=may_wait)
        return await self._claim_and_plan(may_wait=may_wait)

    async def _claim_and_plan(self, *, may_wait: bool = False) -> _Claimed | _GaveBack | None:
        """Claim a batch sized to fill event jobs, plan it after the jobs held over from the last
        batches, and hold over what it leaves out.

        Returns the planned batch, or None when nothing is due. With ``may_wait``, a claim too
        short to fill an event job while other batches are out (:meth:`_too_short_to_plan`) is
        released with the held-over jobs, unplanned: :data:`_GAVE_BACK`. On failure the claimed
        and the held-over jobs are released.
        """
        held, carried = await self._take_held()
        size = self.settings.batch_size
        if self.settings.fill_event_jobs:
            size = claim_size(size, self._events_per_job, carried.events)
        leased = [job.id for job in held]
        try:
            fresh = await self.queue.claim(
                self.destination.name, size, lease_seconds=self.settings.lease_seconds
            )
        except BaseException:
            await self.queue.release(leased)
            raise
        jobs = held + fresh
        if not jobs:
            return None
        leased = [job.id for job in jobs]
        if may_wait and self._too_short_to_plan(len(fresh), size, carried):
            await self.queue.release(leased)
            return _GAVE_BACK
        heartbeat = asyncio.create_task(self._keep_leased(leased))
        try:
            work = await self._plan(jobs, carried)
        except BaseException:
            await _stop(heartbeat)
            await self.queue.release(leased)
            raise
        leased[:] = [
            verdict.job.id for verdict in work.verdicts
        ]  # the held-over ones have their own heartbeat
        if work.held:
            self._hold(work.held, work.leftover)
        if work.verdicts:
            self._events_per_job = work.events / len(work.verdicts)
        return _Claimed(work, leased, heartbeat, short=len(fresh) < size)

    def _too_short_to_plan(self, claimed: int, asked: int, carried: Leftover) -> bool:
        """Whether a claim of ``claimed`` jobs (``asked`` for) after the held-over ``carried`` would,
        by the events per job of the last batch, make only a partial event job because the queue
        ran short, while another batch is out whose settling may free more (as
        :meth:`_short_of_events` finds once it is planned): planning it would be work thrown away."""
        per_job = self._events_per_job
        if per_job is None or not self.settings.fill_event_jobs or claimed >= asked or self._out <= 0:
            return False
        return 0 < carried.events + claimed * per_job < MAX_EVENTS

    def _hold(self, jobs: list[Job], leftover: Leftover) -> None:
        """Keep jobs planned but not sent, leased, for the next batch to send first."""
        heartbeat = asyncio.create_task(self._keep_leased([job.id for job in jobs]))
        self._held.append(_Held(jobs, leftover, heartbeat))

    async def _take_held(self) -> tuple[list[Job], Leftover]:
        """Every held-over job, oldest batch first, and their plans as one."""
        held, self._held = self._held, []
        jobs: list[Job] = []
        leftover = NOTHING_LEFT
        for entry in held:
            await _stop(entry.heartbeat)
            jobs += entry.jobs
            leftover = leftover.then(entry.leftover)
        return jobs, leftover

    async def release_held(self) -> None:
        """Give the held-over jobs back to the queue (on stopping, or when the destination pauses)."""
        jobs, _ = await self._take_held()
        if jobs:
            await self.queue.release([job.id for job in jobs])

    async def _keep_leased(self, job_ids: list[int]) -> None:
        """While a batch is being delivered (rate-limit waits can be long), renew its lease at a third
        of its length, so no other worker takes jobs still on their way."""
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                await self.queue.extend(job_ids, lease_seconds=lease)
            except Exception:
                self.log.exception("lease_renewal_failed", jobs=len(job_ids))

    async def _plan(self, jobs: list[Job], carried: Leftover) -> Plan:
        """Plan ``jobs`` (the first ``carried.jobs`` held over, planned as ``carried``).

        When planning fails as a whole (a planning process died, or something failed outside any
        one payload), the batch is split until the jobs that fail alone are found: those become
        dead letters, the rest is planned again. A job is blamed only when others could be
        planned: if nothing could, or the rest fails again, every job counts an attempt instead.
        """
        fill = self.settings.fill_event_jobs
        try:
            return await self._planner.plan(jobs, self.destination, carry_partial=fill, carried=carried)
        except Exception as exc:
            self.log.exception("batch_planning_failed", jobs=len(jobs))
            error = exc
        fresh = jobs[carried.jobs :]
        search = _Search()
        await self._culprits(fresh, 0, search)
        culprits = search.culprits if search.planned else {}
        rest = [*jobs[: carried.jobs], *(job for n, job in enumerate(fresh) if n not in culprits)]
        try:
            if not search.planned:
                raise error
            work = await self._planner.plan(rest, self.destination, carry_partial=fill, carried=carried)
        except Exception as exc:
            self.log.error("batch_planning_failed_again", jobs=len(rest), error=repr(exc)[:200])
            work = Plan([Verdict(job, RETRY, unexpected("planning failed", exc)) for job in rest], [])
        for n, reason in sorted(culprits.items()):
            self.log.warning("job_cannot_be_planned", **fresh[n].log_context(), reason=reason)
            work.verdicts.append(Verdict(fresh[n], DEAD, reason))
        return work

    async def _culprits(self, jobs: Sequence[Job], offset: int, search: _Search) -> None:
        """Find the jobs that cannot be planned, by halving (``search.culprits``: index in the
        batch's fresh jobs → why; ``search.planned``: whether any part could be planned)."""
        try:
            await self._planner.plan_payloads(
                [job.payload for job in jobs], self.destination, progress=[job.progress for job in jobs]
            )
            search.planned = True
            return
        except Exception as exc:
            if len(jobs) == 1:
                search.culprits[offset] = unexpected("planning failed", exc)
                return
        half = len(jobs) // 2
        await self._culprits(jobs[:half], offset, search)
        await self._culprits(jobs[half:], offset + half, search)

    # ------------------------------------------------------------ send and settle

    async def _send(self, work: Plan) -> None:
        """Send the plan wave by wave (see the module docstring): at the end every job has each
        step accepted, or a state that says why not."""
        follows: list[asyncio.Task[None]] = []
        try:
            await self._waves(work, follows)
        except BaseException:
            for task in follows:
                task.cancel()
            await asyncio.gather(*follows, return_exceptions=True)
            raise
        await asyncio.gather(*follows)
        if not self.paused.is_paused(self.destination.name):
            return
        if all(verdict.state != RELEASE for verdict in work.verdicts):
            self.paused.resume(self.destination.name)

    async def _waves(self, work: Plan, follows: list[asyncio.Task[None]]) -> None:
        remaining = list(work.sends)
        while remaining:
            if remaining[0].stage >= LIST_STAGE and follows:
                # a list job waits for the imports of its profiles: one Klaviyo refused is not added
                await asyncio.gather(*follows)
                follows.clear()
            if self._stopping.is_set():
                work.worsen(_jobs_of(remaining), HELD, NOT_SENT)
                return
            if any(verdict.state != OK for verdict in work.verdicts):
                remaining = await self._without_blocked(work, remaining)
                if not remaining:
                    return
            wave = next_wave(remaining, work.verdicts)
            sent = {id(send) for send in wave}
            remaining = [send for send in remaining if id(send) not in sent]
            outcomes = await asyncio.gather(*(self._send_one(send) for send in wave))
            for send, outcome in zip(wave, outcomes, strict=True):
                apply_outcome(work, send, outcome)
                if outcome.kind == "ok" and send.request.path == IMPORT_PATH:
                    follows.append(asyncio.create_task(self._follow_import(work, send, outcome)))
            refused = next((outcome for outcome in outcomes if outcome.kind == "auth"), None)
            if refused is not None:
                self.paused.pause(self.destination.name, refused.detail)
                work.worsen(range(len(work.verdicts)), RELEASE, refused.detail)
                await self.release_held()
                return

    async def _without_blocked(self, work: Plan, remaining: list[Send]) -> list[Send]:
        """``remaining``, or, when the next wave carries a job that must not send more now
        (:func:`~router.plan.blocked`), the jobs of ``remaining`` planned again without those
        (which are held back)."""
        stopped = blocked(work.verdicts)
        if not any(
            index in stopped for send in next_wave(remaining, work.verdicts) for index in send.carried()
        ):
            return remaining
        jobs = _jobs_of(remaining)
        work.worsen((index for index in jobs if index in stopped), HELD, HELD_BACK)
        keep = tuple(index for index in jobs if index not in stopped)
        self.log.info("batch_replanned", jobs=len(keep), held=len(jobs) - len(keep))
        if not keep:
            return []
        planned = await self._planner.plan_payloads(
            [work.verdicts[index].job.payload for index in keep],
            self.destination,
            progress=[work.verdicts[index].progress for index in keep],
        )
        sends = planned.sends(keep)
        work.refuse(planned.refused, sends, keep)
        return sends

    async def _send_one(self, send: Send) -> Outcome:
        request = send.request
        try:
            outcome = await self.client.send(request, give_up=self._stopping)
        except Exception as exc:  # a bug: the jobs count an attempt, and the batch goes on
            self.log.exception("klaviyo_request_crashed", path=request.path, jobs=len(request.sources))
            return Outcome(
                "retry", 0, f"unexpected error sending to Klaviyo: {type(exc).__name__}: {scrub(exc)}"
            )
        if outcome.kind not in ("ok", "auth", "unsent"):
            self.log.warning(
                "klaviyo_request_failed",
                path=request.path,
                status=outcome.status,
                result=outcome.kind,
                jobs=len(request.sources),
                detail=outcome.detail,
            )
        return outcome

    async def _follow_import(self, work: Plan, send: Send, outcome: Outcome) -> None:
        """Learn which profiles an accepted bulk import refused: their step was not done after all,
        and those jobs become dead letters (a cancelled job: every one is retried)."""
        job = job_id(outcome.body)
        if job is None:
            return
        try:
            result = await follow(
                _Stoppable(self.client, self._stopping), job, wait=self.settings.import_wait
            )
        except Exception as exc:  # an unreadable answer: nothing is known to be refused
            result = ImportResult(unknown=f"job {job}: {type(exc).__name__}: {scrub(exc)}")
        if result.unknown:
            self.log.warning("import_job_unchecked", reason=result.unknown, jobs=len(send.request.sources))
        undone = ~STEP_BITS[send.kind]
        if result.cancelled:
            for index in send.carried():
                work.verdicts[index].accepted &= undone
                work.verdicts[index].worsen(RETRY, f"Klaviyo cancelled bulk import job {job}")
        items = send.request.item_sources
        for item, reason in result.refused.items():
            for source in items[item] if item < len(items) else ():
                work.verdicts[send.job(source)].accepted &= undone
                work.verdicts[send.job(source)].worsen(DEAD, reason)

    async def _settle(self, work: Plan) -> None:
        now = self._clock()
        work.apply_refusals()
        verdicts = work.verdicts
        done = [v.job.id for v in verdicts if v.state == OK]
        if done:
            await self.queue.ack(done)
        held = await self._release(v for v in verdicts if v.state in (HELD, RELEASE))
        retried = dead = 0
        for verdict in verdicts:
            if verdict.state == RETRY:
                if await self._retry(verdict, now):
                    retried += 1
                else:
                    dead += 1
            elif verdict.state == DEAD:
                await self.queue.dead_letter(verdict.job.id, reason=verdict.reason, progress=verdict.accepted)
                self.log.warning("job_dead_lettered", **verdict.job.log_context(), reason=verdict.reason)
                dead += 1
        self._warn(work)
        skipped = sum(1 for v in verdicts if v.state == OK and v.reason)
        counts = {
            "delivered": len(done) - skipped,
            "skipped": skipped,
            "retried": retried,
            "dead": dead,
        }
        if self._metrics is not None:
            lags = [now - v.job.created_at for v in verdicts if v.state == OK and not v.reason]
            for result, count in counts.items():
                if count:
                    self._metrics.observe_settled(
                        self.destination.name, result, count, lags if result == "delivered" else []
                    )
        self.log.info("batch_settled", jobs=len(verdicts), requests=len(work.sends), held=held, **counts)

    async def _release(self, verdicts: Iterable[Verdict]) -> int:
        """Give jobs back without an attempt, each with what this batch achieved for it; how many."""
        by_progress: dict[int, list[int]] = {}
        for verdict in verdicts:
            by_progress.setdefault(verdict.accepted, []).append(verdict.job.id)
        for progress, ids in by_progress.items():
            await self.queue.release(ids, progress=progress)
        return sum(len(ids) for ids in by_progress.values())

    def _warn(self, work: Plan) -> None:
        """Log and count what settled jobs were sent without (a dropped phone, an ignored consent
        channel); a job retried or released is planned again, and warns then."""
        for index, warning in work.warnings:
            job = work.verdicts[index]
            if job.state not in (OK, DEAD):
                continue
            self.log.warning(
                "transform_warning", **job.job.log_context(), warning=warning.code, detail=warning.message
            )
            if self._metrics is not None:
                self._metrics.transform_warnings.labels(self.destination.name, warning.code).inc()

    async def _retry(self, verdict: Verdict, now: float) -> bool:
        job = verdict.job
        attempts = job.attempts + 1
        policy = self.settings.retry
        at = policy.decide(
            attempts=attempts, created_at=job.created_at, now=now, retry_after=verdict.retry_after
        )
        if at is None:
            reason = f"{policy.give_up_reason(attempts=attempts, created_at=job.created_at, now=now)}; last error: {verdict.reason}"
            await self.queue.dead_letter(job.id, reason=reason, progress=verdict.accepted)
            self.log.warning("job_dead_lettered", **job.log_context(), reason=reason)
            return False
        await self.queue.retry(job.id, at=at, error=verdict.reason, progress=verdict.accepted)
        return True


@dataclass(slots=True)
class _Search:
    """What splitting a batch whose planning failed found (see :meth:`Deliverer._plan`)."""

    culprits: dict[int, str] = field(default_factory=dict)
    #: Some part of the batch could be planned: the failure is its culprits', not the planner's.
    planned: bool = False


#: Why a job sent nothing more in a batch although nothing of its own failed.
HELD_BACK: Final = "held back: an earlier request of its profile was not delivered"


def _jobs_of(sends: Iterable[Send]) -> list[int]:
    """The batch indexes of every job ``sends`` carry, in order."""
    return sorted({index for send in sends for index in send.carried()})


class _Stoppable:
    """A client's paced ``get`` that gives up once delivery is stopping (following an import)."""

    def __init__(self, client: KlaviyoClient, stopping: asyncio.Event) -> None:
        self._client = client
        self._stopping = stopping

    async def get(self, path: str) -> Outcome:
        return await self._client.get(path, give_up=self._stopping)


class _GaveBack(enum.Enum):
    """What a claim given back unplanned, to wait for more jobs, returns (:meth:`Deliverer._claim_and_plan`)."""

    SHORT = enum.auto()


_GAVE_BACK: Final = _GaveBack.SHORT


class _Claimed(NamedTuple):
    """A claimed batch, planned: ``leased`` are the ids still leased (renewed by ``heartbeat``);
    ``short``: the queue gave fewer jobs than asked for."""

    work: Plan
    leased: list[int]
    heartbeat: asyncio.Task[None]
    short: bool


@dataclass(slots=True)
class _Held:
    """Jobs a batch held over: still leased (renewed by ``heartbeat``), planned as ``leftover``."""

    jobs: list[Job]
    leftover: Leftover
    heartbeat: asyncio.Task[None]


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def queue_outage() -> Outage:
    """How delivery workers log the queue out of reach: ``delivery_queue_failed`` when their
    batches start failing for it, at most a line a minute while it lasts, ``delivery_queue_recovered``
    at the first batch after it (:class:`~router.health.Outage`)."""
    return Outage("delivery_queue", level="warning")


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when the time ran out, False when ``stop`` was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
        return False
    return True


async def deliver_all(
    queue: Queue,
    destinations: Sequence[Destination],
    stop: asyncio.Event,
    *,
    settings: DeliverySettings | None = None,
    paused: PausedDestinations | None = None,
    metrics: Metrics | None = None,
    mappings: MappingSets | None = None,
    limits: Mapping[str, RateLimits] | None = None,
) -> None:
    """Deliver every destination's jobs until ``stop`` is set (``serve`` and ``work`` run this).

    ``mappings``: the sets to plan with, which the caller reloads (default: read now, never reloaded).
    ``limits``: the pacer of each destination by name, when others share it (``serve``'s syncs).
    """
    settings = settings or DeliverySettings()
    paused = paused or PausedDestinations()
    mappings = mappings or MappingSets(destination.mappings_dir for destination in destinations)
    connections = max(8, settings.workers * 2)
    # the clients' own connection slots bound what is in flight: the connector never queues
    connector = aiohttp.TCPConnector(limit=connections * len(destinations))
    planner = Planner(mappings, settings.planners)
    outage = queue_outage()
    try:
        await planner.start()
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as group:
            for destination in destinations:
                client = KlaviyoClient(
                    session,
                    destination,
                    limits=(limits or {}).get(destination.name)
                    or RateLimits(
                        scale=settings.rate_limit_scale, pacer=shared_pacers(queue, destination.name)
                    ),
                    timeout=settings.timeout,
                    observe=metrics.observe_request if metrics is not None else None,
                    connections=connections,
                )
                deliverer = Deliverer(
                    queue,
                    destination,
                    client,
                    settings=settings,
                    paused=paused,
                    metrics=metrics,
                    planner=planner,
                    outage=outage,
                )
                group.create_task(deliverer.run(stop))
    finally:
        planner.close()
