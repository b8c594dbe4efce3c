"""What ``/ready`` reports: destinations paused or stalled, and queue depth / disk pressure.

:class:`PausedDestinations` is written by the delivery worker (401/403 from Klaviyo pauses a
destination) and read by ``/ready`` and the metrics. :class:`Backpressure` samples the queue depth
(:meth:`~router.queue.Queue.depth`, a counter the queue keeps) and the free disk space every few
seconds so that ingest decides on ``503`` without a query per request.
:class:`Stalls` samples each destination's oldest due job from the queue, so any node (an
ingest-only one too) sees a destination whose delivery makes no headway, whatever the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from router.metrics import Metrics
from router.queue import Queue

log = structlog.get_logger("router.health")


class PausedDestinations:
    """Destinations delivery has paused, with the reason; thread-unsafe, event-loop only."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._paused: dict[str, str] = {}
        self._metrics = metrics

    def pause(self, destination: str, reason: str) -> None:
        """Mark ``destination`` paused (e.g. Klaviyo answered 401/403); ``/ready`` turns 503."""
        if destination not in self._paused:
            log.warning("destination_paused", destination=destination, reason=reason)
        self._paused[destination] = reason
        if self._metrics is not None:
            self._metrics.destination_paused.labels(destination).set(1)

    def resume(self, destination: str) -> None:
        """Clear the pause of ``destination``."""
        if self._paused.pop(destination, None) is not None:
            log.info("destination_resumed", destination=destination)
        if self._metrics is not None:
            self._metrics.destination_paused.labels(destination).set(0)

    def is_paused(self, destination: str) -> bool:
        """True while ``destination`` is paused."""
        return destination in self._paused

    def snapshot(self) -> dict[str, str]:
        """Paused destinations and why."""
        return dict(self._paused)


class Stalls:
    """Destinations whose oldest due job (:meth:`~router.queue.Queue.oldest_due`) has stayed the same
    for ``stall_after`` seconds or more: delivery is not getting anywhere with it (nothing delivers
    that destination, or the same job keeps failing before it is settled)."""

    def __init__(
        self,
        queue: Queue,
        destinations: Sequence[str],
        *,
        stall_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.destinations = list(destinations)
        #: 0: never report a stall.
        self.stall_after = stall_after
        self._clock = clock
        #: destination → (its oldest due job, since when it has been).
        self._heads: dict[str, tuple[int, float]] = {}
        self._stalled: set[str] = set()

    async def refresh(self) -> None:
        """Sample every destination's oldest due job now."""
        if not self.stall_after:
            return
        now = self._clock()
        for destination in self.destinations:
            head = await self.queue.oldest_due(destination)
            if head is None:
                self._heads.pop(destination, None)
            elif self._heads.get(destination, (None, 0.0))[0] != head:
                self._heads[destination] = (head, now)
        stalled = self.stalled()
        for destination, why in stalled.items():
            if destination not in self._stalled:
                log.error("destination_stalled", destination=destination, reason=why)
        for destination in self._stalled - stalled.keys():
            log.info("destination_unstalled", destination=destination)
        self._stalled = set(stalled)

    def stalled(self) -> dict[str, str]:
        """Stalled destinations and why."""
        if not self.stall_after:
            return {}
        now = self._clock()
        return {
            destination: f"job {job} is its oldest due job for {now - since:.0f} s (stall_after {self.stall_after:g} s)"
            for destination, (job, since) in sorted(self._heads.items())
            if now - since >= self.stall_after
        }

    async def run(self, interval: float) -> None:
        """Sample every ``interval`` seconds until cancelled."""
        await sample_every(interval, self.refresh, "stall_sample")


class Backpressure:
    """Sampled queue depth and free disk space, and whether ingest must answer 503."""

    def __init__(
        self,
        queue: Queue,
        *,
        data_dir: Path,
        max_queue_depth: int,
        min_free_disk_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.queue = queue
        self.data_dir = data_dir
        self.max_queue_depth = max_queue_depth
        self.min_free_disk_bytes = min_free_disk_bytes
        self.metrics = metrics
        #: Jobs pending or in flight at the last sample.
        self.depth = 0
        #: Free bytes on the data folder's disk at the last sample.
        self.disk_free: int | None = None
        self.sampled_at = 0.0

    async def refresh(self) -> None:
        """Sample the queue depth (the backend's counter of active jobs: no count of the jobs kept
        for retention) and the free disk space now."""
        self.depth = await self.queue.depth()
        self.disk_free = _free_bytes(self.data_dir)
        self.sampled_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.depth)
            if self.disk_free is not None:
                self.metrics.disk_free.set(self.disk_free)

    def overloaded(self) -> str | None:
        """Why new events cannot be taken now, or None."""
        if self.depth >= self.max_queue_depth:
            return (
                f"the queue holds {self.depth} jobs, at its limit of {self.max_queue_depth} (max_queue_depth)"
            )
        return _disk_short(self.disk_free, self.min_free_disk_bytes)

    def note_enqueued(self, jobs: int) -> None:
        """Count jobs enqueued since the last sample, so a burst cannot overshoot the limit by much."""
        self.depth += jobs

    async def run(self, interval: float) -> None:
        """Sample every ``interval`` seconds until cancelled."""
        await sample_every(interval, self.refresh, "backpressure_sample")


class Outage:
    """The failures of one operation (a queue write, a sample), logged the way an on-call engineer
    reads them rather than once per failure: ``<what>_failed`` when they start (the error), then
    ``<what>_failing`` at most every ``summary_every`` seconds while they go on (failures since the
    last line, since when, the last error), and ``<what>_recovered`` at the first success after them
    (how long, how many). A failure of a thousand requests a second is three lines a minute."""

    def __init__(
        self,
        what: str,
        *,
        level: str = "error",
        summary_every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.summary_every = summary_every
        self._log = getattr(log, level)
        self._clock = clock
        #: When the failures started; None while the operation succeeds.
        self._since: float | None = None
        self._failures = 0
        self._unreported = 0
        self._reported_at = 0.0

    @property
    def failing(self) -> bool:
        """True from a failure to the next success."""
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        """Count a failure; log it if it is the first, or if a summary is due."""
        now = self._clock()
        error = f"{type(exc).__name__}: {exc}"
        if self._since is None:
            self._since = self._reported_at = now
            self._failures, self._unreported = 1, 0
            self._log(f"{self.what}_failed", error=error)
            return
        self._failures += 1
        self._unreported += 1
        if now - self._reported_at >= self.summary_every:
            self._log(
                f"{self.what}_failing",
                failures=self._unreported,
                since_seconds=round(now - self._since),
                last_error=error,
            )
            self._reported_at, self._unreported = now, 0

    def succeeded(self) -> None:
        """Note a success: the end of the failures, if there were any (logged)."""
        if self._since is not None:
            log.info(
                f"{self.what}_recovered",
                seconds=round(self._clock() - self._since, 1),
                failures=self._failures,
            )
            self._since = None


async def sample_every(
    interval: float, refresh: Callable[[], Awaitable[object]], what: str, *, at_once: bool = False
) -> None:
    """Call ``refresh`` every ``interval`` seconds until cancelled (``at_once``: the first time now);
    failures are logged as an :class:`Outage` of ``what`` (warnings) and the next call tries again."""
    outage = Outage(what, level="warning")
    if not at_once:
        await asyncio.sleep(interval)
    while True:
        try:
            await refresh()
        except Exception as exc:  # the queue may be briefly unavailable; /ready reports it
            outage.failed(exc)
        else:
            outage.succeeded()
        await asyncio.sleep(interval)


def disk_short(data_dir: Path, min_free_disk_bytes: int) -> str | None:
    """Why the data folder's disk cannot take more now (free space under the limit), or None."""
    return _disk_short(_free_bytes(data_dir), min_free_disk_bytes)


def _disk_short(free: int | None, limit: int) -> str | None:
    if free is not None and free < limit:
        return f"{free} bytes free on the data disk, under {limit} (min_free_disk_bytes)"
    return None


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the disk holding ``path`` (its nearest existing parent), None if unknown."""
    for candidate in (path, *path.absolute().parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None
