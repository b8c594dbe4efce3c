"""Delivery workers: claim → transform → batch → send → settle, for one destination.

Each claimed batch of jobs is transformed with the current mappings, merged into Klaviyo's bulk
jobs (:mod:`router.klaviyo.batch`), sent in order (profile upserts before the list jobs that need
them), and every job is settled by the worst outcome among the requests that carried it:

- every request done → ``ack``;
- a retryable failure (429, 408, 5xx, timeout) → ``retry`` at the time :class:`RetryPolicy` picks
  (never before Klaviyo's ``Retry-After``), or dead letter once attempts or age run out;
- a permanent refusal (400, 404, 409, 413, 422) → dead letter with Klaviyo's detail; for a bulk
  job that names items by ``source.pointer``, only those items' jobs — the others are retried at once;
- 401/403 → the destination is paused (``/ready`` reports it), the batch's jobs are released
  untouched, and one worker probes now and then until Klaviyo takes the key again.

A message the transform refuses is dead-lettered with the reason; one with no Klaviyo equivalent
(alias, page when off) is acknowledged as skipped. Per-profile order comes from the queue (a job
waits while an earlier one of its profile is in flight or waiting for a retry; consecutive ones are
leased together, in order) and from :func:`hold_back` (a profile's later jobs in a batch are retried
behind an earlier one that is).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import structlog

from router.destination import Destination
from router.errors import MappingError, Skipped, TransformError
from router.health import PausedDestinations
from router.klaviyo.batch import batch, profiles_in
from router.klaviyo.client import KlaviyoClient, Outcome
from router.klaviyo.imports import IMPORT_PATH, follow, job_id
from router.klaviyo.ratelimit import RateLimits
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import Mappings, load_mappings
from router.metrics import Metrics
from router.queue import Job, Queue
from router.retry import RetryPolicy
from router.settings import Settings
from router.transform import transform

log = structlog.get_logger("router.deliver")
_DEFAULTS: Final = Settings()

#: Settle states, worst last: a job takes the worst of its requests' outcomes.
OK, RETRY, DEAD, RELEASE = 0, 1, 2, 3
RANK: Final = {"ok": OK, "retry": RETRY, "permanent": DEAD, "auth": RELEASE}


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
    #: Pause between claims when the queue is empty.
    idle_poll: float = 0.2
    #: While a destination is paused, how often one worker tries again.
    pause_probe: float = _DEFAULTS.delivery_pause_probe
    #: Seconds to wait for Klaviyo's answer.
    timeout: float = _DEFAULTS.delivery_timeout
    #: Fraction of Klaviyo's documented rate limits to use (below 1 leaves room for other clients).
    rate_limit_scale: float = _DEFAULTS.delivery_rate_limit_scale
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
            retry=RetryPolicy(max_attempts=settings.delivery_max_attempts, max_age=settings.delivery_max_age),
        )


@dataclass(slots=True)
class _Verdict:
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


@dataclass(slots=True)
class Plan:
    """A claimed batch turned into requests; ``verdicts[i]`` is the settle state of ``jobs[i]``."""

    verdicts: list[_Verdict]
    requests: list[KlaviyoRequest]
    skipped: int = 0


def plan(jobs: Sequence[Job], destination: Destination, mappings: Mappings) -> Plan:
    """Transform every job and merge the results into bulk requests (pure)."""
    verdicts = [_Verdict(job) for job in jobs]
    produced: list[KlaviyoRequest] = []
    skipped = 0
    for index, job in enumerate(jobs):
        try:
            produced.extend(transform(job.message(), destination, mappings, index=index))
        except TransformError as exc:
            verdicts[index].worsen(DEAD, f"transform: {exc.message}")
        except Skipped as exc:
            verdicts[index].reason = exc.message
            skipped += 1
        except ValueError as exc:  # an unreadable payload
            verdicts[index].worsen(DEAD, f"payload is not valid JSON: {exc}")
    return Plan(verdicts, batch(produced), skipped)


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


def _is_list_job(request: KlaviyoRequest) -> bool:
    return request.path in LIST_PATHS or bool(request.body.get("data", {}).get("relationships"))


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.destination = destination
        self.client = client
        self.settings = settings or DeliverySettings()
        self.paused = paused or PausedDestinations()
        self._metrics = metrics
        self._clock = clock
        self._mappings: Mappings | None = None
        self._probe = asyncio.Lock()
        self._last_probe = 0.0
        self.log = log.bind(destination=destination.name)

    # ------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Run the configured number of workers until ``stop`` is set."""
        self.log.info("delivery_started", workers=self.settings.workers)
        async with asyncio.TaskGroup() as group:
            for n in range(self.settings.workers):
                group.create_task(self._worker(stop, n))
        self.log.info("delivery_stopped")

    async def _worker(self, stop: asyncio.Event, number: int) -> None:
        while not stop.is_set():
            if self.paused.is_paused(self.destination.name):
                await self._probe_paused(stop, number)
                continue
            try:
                done = await self.deliver_once()
            except Exception:
                self.log.exception("delivery_batch_failed", worker=number)
                done = 0
            if not done:
                await _sleep_unless(stop, self.settings.idle_poll)

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
        """Claim one batch, deliver it and settle every job; returns the number of jobs claimed."""
        jobs = await self.queue.claim(
            self.destination.name, self.settings.batch_size, lease_seconds=self.settings.lease_seconds
        )
        if not jobs:
            return 0
        heartbeat = asyncio.create_task(self._keep_leased([job.id for job in jobs]))
        try:
            work = plan(jobs, self.destination, self.mappings())
            await self._send(work)
        except BaseException:
            await _stop(heartbeat)
            await self.queue.release([job.id for job in jobs])
            raise
        await _stop(heartbeat)
        await self._settle(work)
        return len(jobs)

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

    def mappings(self) -> Mappings:
        """The current mappings: reloaded when the files change; a broken edit keeps the last good set."""
        try:
            self._mappings = load_mappings(self.destination.mappings_dir)
        except MappingError as exc:
            if self._mappings is None:
                raise
            self.log.error("mappings_invalid_kept_previous", error=exc.message)
        assert self._mappings is not None
        return self._mappings

    # ------------------------------------------------------------ send and settle

    async def _send(self, work: Plan) -> None:
        """Send the batch in phases: profiles and events together, then every list job together."""
        for phase in phases(work.requests):
            outcomes = await asyncio.gather(*(self.client.send(request) for request in phase))
            for request, outcome in zip(phase, outcomes, strict=True):
                apply_outcome(work, request, outcome)
                if outcome.kind not in ("ok", "auth"):
                    self.log.warning(
                        "klaviyo_request_failed",
                        path=request.path,
                        status=outcome.status,
                        result=outcome.kind,
                        jobs=len(request.sources),
                        detail=outcome.detail,
                    )
            await asyncio.gather(
                *(
                    self._follow_import(work, request, outcome)
                    for request, outcome in zip(phase, outcomes, strict=True)
                    if request.path == IMPORT_PATH and outcome.kind == "ok"
                )
            )
            refused = next((o for o in outcomes if o.kind == "auth"), None)
            if refused is not None:
                self.paused.pause(self.destination.name, refused.detail)
                self.log.error("destination_paused", status=refused.status, reason=refused.detail)
                for verdict in work.verdicts:
                    verdict.worsen(RELEASE, refused.detail)
                return
        if self.paused.is_paused(self.destination.name):
            self.paused.resume(self.destination.name)
            self.log.info("destination_resumed")

    async def _follow_import(self, work: Plan, request: KlaviyoRequest, outcome: Outcome) -> None:
        """Learn which profiles an accepted bulk import refused; those jobs become dead letters."""
        job = job_id(outcome.body)
        if job is None:
            return
        result = await follow(self.client, job, wait=self.settings.import_wait)
        if result.unknown:
            self.log.warning("import_job_unchecked", reason=result.unknown, jobs=len(request.sources))
        if result.cancelled:
            for source in request.sources:
                work.verdicts[source].worsen(RETRY, f"Klaviyo cancelled bulk import job {job}")
        items = request.item_sources
        for index, reason in result.refused.items():
            for source in items[index] if index < len(items) else ():
                work.verdicts[source].worsen(DEAD, reason)

    async def _settle(self, work: Plan) -> None:
        hold_back(work)
        now = self._clock()
        done = [v.job.id for v in work.verdicts if v.state == OK]
        released = [v.job.id for v in work.verdicts if v.state == RELEASE]
        if done:
            await self.queue.ack(done)
        if released:
            await self.queue.release(released)
        retried = dead = 0
        for verdict in work.verdicts:
            if verdict.state == RETRY:
                if await self._retry(verdict, now):
                    retried += 1
                else:
                    dead += 1
            elif verdict.state == DEAD:
                await self.queue.dead_letter(verdict.job.id, reason=verdict.reason)
                self.log.warning("job_dead_lettered", **verdict.job.log_context(), reason=verdict.reason)
                dead += 1
        skipped = sum(1 for v in work.verdicts if v.state == OK and v.reason)  # not released (401)
        counts = {
            "delivered": len(done) - skipped,
            "skipped": skipped,
            "retried": retried,
            "dead": dead,
        }
        if self._metrics is not None:
            lags = [now - v.job.created_at for v in work.verdicts if v.state == OK and not v.reason]
            for result, count in counts.items():
                if count:
                    self._metrics.observe_settled(
                        self.destination.name, result, count, lags if result == "delivered" else []
                    )
        self.log.info("batch_settled", jobs=len(work.verdicts), requests=len(work.requests), **counts)

    async def _retry(self, verdict: _Verdict, now: float) -> bool:
        job = verdict.job
        attempts = job.attempts + 1
        policy = self.settings.retry
        if verdict.innocent:
            at: float | None = now
        else:
            at = policy.decide(
                attempts=attempts, created_at=job.created_at, now=now, retry_after=verdict.retry_after
            )
        if at is None:
            reason = f"{policy.give_up_reason(attempts=attempts, created_at=job.created_at, now=now)}; last error: {verdict.reason}"
            await self.queue.dead_letter(job.id, reason=reason)
            self.log.warning("job_dead_lettered", **job.log_context(), reason=reason)
            return False
        await self.queue.retry(job.id, at=at, error=verdict.reason)
        return True


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
) -> None:
    """Deliver every destination's jobs until ``stop`` is set (``serve`` and ``work`` run this)."""
    settings = settings or DeliverySettings()
    paused = paused or PausedDestinations()
    connector = aiohttp.TCPConnector(limit=max(8, settings.workers * 2 * len(destinations)))
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as group:
        for destination in destinations:
            client = KlaviyoClient(
                session,
                destination,
                limits=RateLimits(scale=settings.rate_limit_scale),
                timeout=settings.timeout,
                observe=metrics.observe_request if metrics is not None else None,
            )
            deliverer = Deliverer(
                queue, destination, client, settings=settings, paused=paused, metrics=metrics
            )
            group.create_task(deliverer.run(stop))
