"""The ``[[syncs]]`` that ``serve`` runs on their schedule (``schedule = "every 6h"``).

Each scheduled sync has a loop: the next run is due one interval after the start of the last run
in the history (at once when there is none), so restarting ``serve`` neither skips a run nor
repeats one. Runs go through the same pacer per endpoint as delivery (one per destination:
Klaviyo counts requests per account). A run that fails is logged and kept in the history; the
loop carries on. On shutdown a run in progress is cancelled; the next run resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import structlog
from aiohttp import web

from router.klaviyo.ratelimit import RateLimits
from router.settings import Settings
from router.sync.config import SyncConfig
from router.sync.state import open_state

log = structlog.get_logger("router.sync")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def sync_contexts(settings: Settings, limits: Mapping[str, RateLimits]) -> Sequence[CleanupContext]:
    """The cleanup context running the scheduled syncs inside ``serve`` (none when none is scheduled)."""
    scheduled = [sync for sync in settings.syncs if sync.every is not None]
    if not scheduled:
        return ()

    async def syncs(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(scheduled_loop(settings, sync, limits, stop), name=f"sync-{sync.name}")
            for sync in scheduled
        ]
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return (syncs,)


async def next_due(settings: Settings, sync: SyncConfig) -> float:
    """Unix time the next run of ``sync`` is due: one interval after the last run started."""
    assert sync.every is not None
    state = open_state(settings.resolved_queue_url)
    await state.open()
    try:
        runs = await state.runs(sync.name, 1)
    finally:
        await state.close()
    return runs[0].started_at + sync.every if runs else time.time()


async def scheduled_loop(
    settings: Settings, sync: SyncConfig, limits: Mapping[str, RateLimits], stop: asyncio.Event
) -> None:
    """Run ``sync`` whenever it is due, until ``stop`` is set."""
    from router.sync.command import sync_once  # the command module imports the settings, as this one
    from router.sync.run import RunOptions

    destination = sync.destination or settings.destinations[0].name
    while not stop.is_set():
        try:
            wait = await next_due(settings, sync) - time.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, wait))
                return
            log.info("sync_scheduled_run_started", sync=sync.name)
            summary = await sync_once(
                settings,
                sync,
                RunOptions(progress=False, estimate=False),
                limits=limits.get(destination),
                sandbox=False,
            )
            log.info(
                "sync_scheduled_run_finished", sync=sync.name, status=summary.status, message=summary.message
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken run must not end the schedule: it is logged, and tried again
            log.error("sync_scheduled_run_failed", sync=sync.name, error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(sync.every or 60.0, 60.0))
