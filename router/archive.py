"""``klaviyo-router replay --archive``: delivered jobs sent through delivery again, after a mapping fix.

``done`` jobs stay in the queue for ``[queue] retention``. An archive replay lists those acked in a
time window (:meth:`router.queue.Queue.delivered`, a page at a time) and sends them back to
``pending`` (:meth:`router.queue.Queue.resend`): they keep their ids, so each profile's jobs are
delivered again in their order, transformed with the mappings of now. Their events keep their
``unique_id`` (the messageId): however often it runs, an archive replay never multiplies events in
Klaviyo, which keeps the first event it records for a profile, metric and unique_id (what that
means after each kind of fix: README, "Replay captured events").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Final

import orjson

from router.capture_intake import Selection
from router.events import format_unix_time
from router.health import Backpressure
from router.queue import Queue
from router.replay import Progress, ReplayError, open_settings_queue
from router.settings import Settings

#: Done jobs looked at per page.
ARCHIVE_PAGE: Final = 1000


async def archive(
    queue: Queue,
    *,
    since: float,
    until: float,
    destination: str | None,
    confirm: Callable[[int], bool],
    progress: Progress,
    pressure: Backpressure,
    retry_after: float,
) -> int:
    """Send the jobs delivered in ``[since, until)`` back to the queue; returns how many.

    ``confirm(count)`` is asked once the count is known (False: nothing is changed). The jobs keep
    their ids, so they are delivered again in their order, through the current mappings, with the
    same ``unique_id`` (the messageId) on every event.
    """
    count = 0
    async for page in _delivered_pages(queue, since, until, destination):
        count += len(page)
    if not count or not confirm(count):
        return 0
    sent = 0
    async for page in _delivered_pages(queue, since, until, destination):
        while pressure.overloaded() is not None:
            await pressure.refresh()
            why = pressure.overloaded()
            if why is None:
                break
            progress.write(f"waiting: {why}")
            await asyncio.sleep(retry_after)
        resent = await queue.resend(page)
        pressure.note_enqueued(resent)
        sent += resent
    return sent


async def _delivered_pages(
    queue: Queue, since: float, until: float, destination: str | None
) -> AsyncIterator[list[int]]:
    after = 0
    while page := await queue.delivered(
        since=since, until=until, destination=destination, after_id=after, limit=ARCHIVE_PAGE
    ):
        yield page
        after = page[-1]


async def resend_delivered(
    settings: Settings, args: argparse.Namespace, selection: Selection, json_out: bool
) -> int:
    """``replay --archive``: count, confirm, send back; prints what it did; the exit status."""
    if args.destination is not None:
        settings.destination(args.destination, where="--destination")
    assert selection.since is not None
    until = selection.until if selection.until is not None else time.time()
    queue = await open_settings_queue(settings)
    progress = Progress(None, sys.stderr)
    try:
        pressure = Backpressure(
            queue,
            data_dir=settings.data_dir,
            max_queue_depth=settings.max_queue_depth,
            min_free_disk_bytes=settings.min_free_disk_bytes,
        )
        await pressure.refresh()
        window = f"delivered {format_unix_time(selection.since)} to {format_unix_time(until)}"
        which = f"destination {args.destination}" if args.destination else "every destination"

        def confirm(count: int) -> bool:
            question = (
                f"Send {count:,} jobs ({window}, {which}) to delivery again, through the current "
                "mappings? Events keep their unique_id (see README: Replay captured events)."
            )
            if args.yes:
                return True
            if not sys.stdin.isatty():
                raise ReplayError(f"{question} Confirm with --yes (no terminal to ask on)")
            answer = input(f"{question} [y/N] ")
            return answer.strip().lower() in ("y", "yes")

        sent = await archive(
            queue,
            since=selection.since,
            until=until,
            destination=args.destination,
            confirm=confirm,
            progress=progress,
            pressure=pressure,
            retry_after=settings.retry_after,
        )
    finally:
        progress.close()
        await queue.close()
    if json_out:
        print(
            orjson.dumps(
                {"resent": sent, "since": format_unix_time(selection.since), "until": format_unix_time(until)}
            ).decode()
        )
    else:
        print(f"sent {sent:,} delivered jobs back to the queue ({window}, {which})")
    return 0
