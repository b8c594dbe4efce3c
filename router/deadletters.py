"""Dead letters: the events that could not be delivered, kept with their reason until an operator acts.

The same operations back ``klaviyo-router dead-letters ...`` and the admin HTTP API: list (filter by
reason text or destination), show one (with the event), retry (back to pending: delivery transforms
them again with the current mappings), purge. Selections are ids, ``--all``, or a reason substring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router.events import format_unix_time
from router.queue import Job, JobState, Queue

#: Keys never shown from a stored event (Segment clients may put the write key in the body).
HIDDEN_KEYS = frozenset({"writeKey", "write_key"})
PAGE = 500


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters an operation applies to; exactly one way must be given."""

    ids: tuple[int, ...] = ()
    everything: bool = False
    reason: str | None = None

    def problem(self) -> str | None:
        """Why the selection is unusable, or None."""
        ways = sum((bool(self.ids), self.everything, self.reason is not None))
        if ways == 0:
            return "name dead letters by id, or use --all, or --reason TEXT"
        if ways > 1:
            return "use only one of: ids, --all, --reason"
        return None


def summary(job: Job) -> dict[str, Any]:
    """One line's worth about a dead letter (no event body)."""
    message = _message(job)
    return {
        "id": job.id,
        "source": job.source,
        "destination": job.destination,
        "message_id": job.message_id,
        "type": message.get("type"),
        "event": message.get("event"),
        "attempts": job.attempts,
        "reason": job.last_error,
        "dead_since": format_unix_time(job.updated_at),
        "received": format_unix_time(job.created_at),
    }


def detail(job: Job) -> dict[str, Any]:
    """Everything about one dead letter, the stored event included."""
    return {**summary(job), "message": {k: v for k, v in _message(job).items() if k not in HIDDEN_KEYS}}


def _message(job: Job) -> dict[str, Any]:
    try:
        message = job.message()
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


async def list_dead(
    queue: Queue,
    *,
    limit: int = 100,
    after_id: int = 0,
    reason: str | None = None,
    destination: str | None = None,
) -> list[Job]:
    """Dead letters by id, filtered by a reason substring and/or destination."""
    return await queue.list_jobs(
        JobState.DEAD, limit=limit, after_id=after_id, reason_contains=reason, destination=destination
    )


async def select(queue: Queue, selection: Selection) -> list[int]:
    """The ids a selection names (ids are checked to be dead letters)."""
    if selection.ids:
        found = [await queue.get(job_id) for job_id in selection.ids]
        return [job.id for job in found if job is not None and job.state is JobState.DEAD]
    ids: list[int] = []
    after = 0
    while page := await list_dead(queue, limit=PAGE, after_id=after, reason=selection.reason):
        ids.extend(job.id for job in page)
        after = page[-1].id
    return ids


async def retry(queue: Queue, selection: Selection) -> int:
    """Send the selected dead letters back to the queue; returns how many."""
    ids = await select(queue, selection)
    return await _in_pages(queue.revive, ids)


async def purge(queue: Queue, selection: Selection) -> int:
    """Delete the selected dead letters for good; returns how many."""
    if selection.everything:
        return await queue.purge(None)
    ids = await select(queue, selection)
    return await _in_pages(queue.purge, ids)


async def _in_pages(operation: Any, ids: Sequence[int]) -> int:
    total = 0
    for start in range(0, len(ids), PAGE):
        total += int(await operation(list(ids[start : start + PAGE])))
    return total
