"""Retention: what the queue keeps only for a while is deleted while the router runs.

``done`` jobs are kept ``[queue] retention`` seconds (for archive replay) and ``(source,
messageId)`` pairs ``dedupe_window`` seconds; :meth:`~router.queue.Queue.cleanup` deletes what is
older. :func:`keep_retention` calls it as soon as ``serve`` or ``work`` has opened the queue and
then every ``[queue] cleanup_interval`` seconds, in every process that opens the queue: the
backends delete in bounded chunks, each its own transaction (on SQLite, ingest and delivery commit
between two of them; on PostgreSQL each chunk locks the rows it chooses with ``SKIP LOCKED``, so the
cleanups of every node share the rows and never wait for each other, nor for a row another
transaction is changing).

Each cleanup is logged (``queue_cleaned``: rows deleted, seconds) and counted in the metrics
(``router_queue_cleaned_rows``, ``router_queue_cleanup_duration_seconds``); a failed one is logged
as ``queue_cleanup_failed`` (then ``queue_cleanup_failing`` while they go on, and
``queue_cleanup_recovered``: :class:`router.health.Outage`) and the next interval tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

from router.health import sample_every
from router.metrics import Metrics
from router.queue import Queue

log = structlog.get_logger("router.retention")


async def clean(queue: Queue, metrics: Metrics | None = None) -> int:
    """Delete what retention and the dedupe window let go now, log it and count it; rows deleted."""
    started = time.perf_counter()
    deleted = await queue.cleanup()
    seconds = time.perf_counter() - started
    log.info("queue_cleaned", rows=deleted, seconds=round(seconds, 3))
    if metrics is not None:
        metrics.queue_cleaned.inc(deleted)
        metrics.queue_cleanup_duration.observe(seconds)
    return deleted


async def keep_retention(queue: Queue, interval: float, metrics: Metrics | None = None) -> None:
    """:func:`clean` now, then every ``interval`` seconds, until cancelled."""
    await sample_every(interval, lambda: clean(queue, metrics), "queue_cleanup", at_once=True)


@contextlib.asynccontextmanager
async def retention_kept(
    queue: Queue, interval: float, metrics: Metrics | None = None
) -> AsyncIterator[None]:
    """:func:`keep_retention` in a task while the block runs (none with ``interval`` 0)."""
    if not interval:
        yield
        return
    task = asyncio.create_task(keep_retention(queue, interval, metrics), name="retention")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
