"""The durable job queue: one :class:`Queue` protocol, several backends.

A job is one accepted event for one destination. States::

    pending ──claim──▶ in_flight ──ack──▶ done      (kept for the retention window)
       ▲                  │
       └──retry(at)───────┤
                          └──dead_letter──▶ dead  (kept until revived or purged)

Backends: ``sqlite:///path`` (default), ``postgresql://...``, ``memory://``; :func:`open_queue`
picks one from a URL.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import msgspec
import orjson

from router.errors import ConfigError


class JobState(enum.StrEnum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    DEAD = "dead"


class NewJob(msgspec.Struct, frozen=True, kw_only=True):
    """An event to enqueue for one destination (a struct: ingest and replay make one per accepted
    event and destination, ten times faster than a frozen dataclass)."""

    #: Name of the source (write key owner) the event came from.
    source: str
    #: Name of the destination it goes to.
    destination: str
    #: The event's messageId (generated at ingest when absent); dedupe key with ``source``.
    message_id: str
    #: Resolved identity (userId, else anonymousId, else email/phone) for per-profile ordering.
    ordering_key: str | None
    #: The normalised message, orjson bytes.
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A stored job, as claimed or listed."""

    #: Queue-assigned id, increasing in enqueue order.
    id: int
    source: str
    destination: str
    message_id: str
    ordering_key: str | None
    payload: bytes = field(repr=False)
    state: JobState
    #: Delivery attempts made so far.
    attempts: int
    #: Unix time before which the job is not claimed.
    next_attempt_at: float
    #: Unix time the lease of an in-flight job expires.
    lease_expires_at: float | None
    #: Why the last attempt failed, or why the job is dead.
    last_error: str | None
    created_at: float
    updated_at: float
    #: What delivery already achieved for the job, as bits it defines (:mod:`router.plan`: the kinds
    #: of request Klaviyo accepted). Stored by ``retry``, ``dead_letter`` and ``release``, kept by
    #: ``revive``; a later attempt sends only the rest.
    progress: int = 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        """Build a job from a database row keyed by column name."""
        return cls(
            id=row["id"],
            source=row["source"],
            destination=row["destination"],
            message_id=row["message_id"],
            ordering_key=row["ordering_key"],
            payload=bytes(row["payload"]),
            state=JobState(row["state"]),
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            lease_expires_at=row["lease_expires_at"],
            last_error=row["last_error"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            progress=row["progress"],
        )

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> Job:
        """Build a job from its field values in declaration order, ``state`` as its text.

        Claims build a job per claimed row: this is about three times cheaper than the generated
        ``__init__`` of a frozen dataclass called with keywords, which took a third of the event
        loop's time in a delivery run (bench/deliver.py).
        """
        job = object.__new__(cls)
        for put, value in zip(_JOB_SETTERS, values, strict=True):
            put(job, value)
        _JOB_SETTERS[_STATE_INDEX](job, _STATES[values[_STATE_INDEX]])
        return job

    def evolve(self, **changes: Any) -> Job:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def message(self) -> dict[str, Any]:
        """The event as a dict."""
        result: dict[str, Any] = orjson.loads(self.payload)
        return result

    def log_context(self) -> dict[str, Any]:
        """Fields to bind on log lines about this job (never the payload)."""
        return {
            "job_id": self.id,
            "message_id": self.message_id,
            "source": self.source,
            "destination": self.destination,
            "attempt": self.attempts,
        }


#: The fields of a job, in declaration order (the columns :meth:`Job.from_values` takes).
JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Job))
#: Each field's slot setter, in declaration order (they bypass the frozen ``__setattr__``).
_JOB_SETTERS: tuple[Any, ...] = tuple(getattr(Job, name).__set__ for name in JOB_FIELDS)
_STATE_INDEX = JOB_FIELDS.index("state")
_STATES = {state.value: state for state in JobState}


class QueueUnavailable(Exception):
    """The queue's store cannot be reached now (its database refused or lost the connection).

    Transient: ingest answers 503 with ``Retry-After``, ``/ready`` names it, workers back off and
    try again. Raised by backends that talk to a server (PostgreSQL); the message names the server
    (never its password) and the cause.
    """


class QueueFull(Exception):
    """An enqueue refused whole: its jobs would take the queue past ``max_depth`` active jobs."""

    def __init__(self, active: int, adding: int, max_depth: int) -> None:
        super().__init__(
            f"the queue holds {active} jobs; {adding} more would pass its limit of {max_depth} (max_queue_depth)"
        )
        self.active = active
        self.adding = adding
        self.max_depth = max_depth


def check_depth(active: int, adding: int, max_depth: int | None) -> None:
    """Raise :class:`QueueFull` when ``adding`` jobs to ``active`` ones would pass ``max_depth``."""
    if max_depth is not None and adding and active + adding > max_depth:
        raise QueueFull(active, adding, max_depth)


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    #: Jobs newly stored.
    inserted: int
    #: Jobs skipped because ``(source, message_id)`` was seen inside the dedupe window.
    duplicates: int


class Queue(Protocol):
    """What every backend implements. All writes are durable when the call returns."""

    async def open(self) -> None:
        """Connect and apply schema migrations."""

    async def close(self) -> None:
        """Finish pending writes and release resources."""

    async def ping(self) -> None:
        """Raise if the store is unreachable (used by ``/ready``)."""

    async def enqueue(
        self, jobs: Sequence[NewJob], *, now: float | None = None, max_depth: int | None = None
    ) -> EnqueueResult:
        """Store jobs as pending, skipping ``(source, message_id)`` pairs seen in the dedupe window.

        With ``max_depth``, the call stores nothing (not even its messageIds for dedupe) and raises
        :class:`QueueFull` when the active jobs (pending or in flight, of every destination) plus
        the jobs it adds would be more than ``max_depth``. The jobs it adds are counted as if none
        were a duplicate (repeats within the call aside). The check and the insert are one atomic
        step: concurrent calls, from this process or others, never add up past ``max_depth``.
        """

    async def add_dead(self, jobs: Sequence[NewJob], reason: str, *, now: float | None = None) -> None:
        """Store jobs directly as dead letters (events rejected before queueing)."""

    async def claim(
        self, destination: str, limit: int, *, lease_seconds: float, now: float | None = None
    ) -> list[Job]:
        """Lease up to ``limit`` due pending jobs of a destination, oldest keys first, key by key.

        A job is eligible unless an earlier job with the same ordering key is in flight or waiting
        for a retry (pending, not yet due) and that key has no more than the hot-key threshold of
        jobs waiting. Jobs whose lease expired count as pending. Of the oldest
        ``CLAIM_WINDOW * limit`` eligible jobs, the claim takes each key's jobs together, keys in
        the order of their oldest job (a job without a key is a key of its own), until ``limit``:
        a key's consecutive jobs travel in one batch, and the next claim finds other keys free
        instead of every key held up by one batch. Returned by id.
        """

    async def ack(self, job_ids: Sequence[int], *, now: float | None = None) -> None:
        """Mark in-flight jobs done."""

    async def retry(
        self, job_id: int, *, at: float, error: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Return an in-flight job to pending, due at ``at``, counting one attempt.

        ``progress`` is OR-ed into the job's stored progress (bits, never cleared by the queue)."""

    async def dead_letter(
        self, job_id: int, *, reason: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Move a pending or in-flight job to the dead letters with its reason, counting one attempt
        (``progress`` as for :meth:`retry`)."""

    async def extend(self, job_ids: Sequence[int], *, lease_seconds: float, now: float | None = None) -> None:
        """Keep in-flight jobs leased for another ``lease_seconds`` (a batch still being delivered)."""

    async def release(self, job_ids: Sequence[int], *, progress: int = 0, now: float | None = None) -> None:
        """Give back in-flight jobs without counting an attempt (shutdown, a paused destination, a
        job held back behind an earlier one of its key); ``progress`` is OR-ed into each of them."""

    async def get(self, job_id: int) -> Job | None:
        """One job by id."""

    async def list_jobs(
        self,
        state: JobState,
        *,
        limit: int = 100,
        after_id: int = 0,
        reason_contains: str | None = None,
        destination: str | None = None,
    ) -> list[Job]:
        """Jobs in a state, by id, for dead-letter listing and inspection."""

    async def revive(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Dead → pending with attempts reset (progress kept); returns how many were revived."""

    async def oldest_due(self, destination: str, *, now: float | None = None) -> int | None:
        """The id of the destination's oldest job that delivery should be working on: in flight, or
        pending and due, unless an earlier job of its ordering key waits for a retry (then it waits
        too). None when there is none. ``/ready`` reports a destination stalled when this stays the
        same job for too long."""

    async def purge(self, job_ids: Sequence[int] | None = None) -> int:
        """Delete dead jobs (all of them when ``job_ids`` is None); returns how many."""

    async def delivered(
        self,
        *,
        since: float,
        until: float,
        destination: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[int]:
        """Ids of done jobs acked at ``since`` ≤ time < ``until`` (their ``updated_at``), of one
        destination or all, above ``after_id``, by id, ``limit`` at most: what an archive replay
        re-sends (page with ``after_id`` = the last id of the previous page)."""

    async def resend(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Done → pending, due now, attempts, last error and progress cleared (every step is sent
        again; the rest of the row, id and ``created_at`` included, kept: the jobs keep their place
        in per-profile order); ids that are not done jobs are ignored. Returns how many were sent back."""

    async def counts(self, destination: str | None = None) -> dict[JobState, int]:
        """Number of jobs per state (a count of every job kept, done ones included: a scan that
        grows with the retention window; :meth:`depth` is what a sampler asks)."""

    async def depth(self) -> int:
        """Active jobs (pending or in flight) of every destination, the number ``max_depth`` is
        checked against: cheap whatever the queue holds (a counter the backend keeps, not a count)."""

    async def cleanup(self, *, now: float | None = None) -> int:
        """Delete done jobs past retention and dedupe entries past the window; returns rows deleted."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueOptions:
    """Behaviour shared by every backend."""

    #: Seconds during which a ``(source, message_id)`` pair counts as a duplicate.
    dedupe_window: float = 24 * 3600.0
    #: Seconds ``done`` jobs are kept (for replay) before :meth:`Queue.cleanup` deletes them.
    retention: float = 7 * 24 * 3600.0
    #: An ordering key with more jobs than this pending or in flight loses ordering.
    hot_key_threshold: int = 200


#: A claim of ``limit`` jobs picks whole keys from the oldest ``CLAIM_WINDOW * limit`` eligible jobs.
#: A SQLite claim's cost grows with the window (it reads and ranks every job in it): 4 cost a
#: quarter more than 2 per claim, for deeper keys than a batch needs.
CLAIM_WINDOW = 2


def key_major(candidates: Sequence[tuple[int, str | None]], limit: int) -> list[int]:
    """The ids a claim takes from eligible ``(id, ordering_key)`` pairs in id order (pure).

    Keys in the order of their first candidate, each key's candidates together, ``limit`` at most;
    a candidate without a key is a key of its own. Sorted by id.
    """
    by_key: dict[object, list[int]] = {}
    for job_id, key in candidates:
        by_key.setdefault(job_id if key is None else key, []).append(job_id)
    chosen = [job_id for ids in by_key.values() for job_id in ids][:limit]
    return sorted(chosen)


def open_queue(url: str, options: QueueOptions | None = None, **overrides: Any) -> Queue:
    """The backend named by ``url``, not yet opened (call :meth:`Queue.open`).

    ``memory://``; ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (the path is
    what follows ``sqlite:///``, as in SQLAlchemy); ``postgresql://...`` (needs the ``postgres``
    extra). ``overrides`` are :class:`QueueOptions` fields applied over ``options``.
    """
    opts = dataclasses.replace(options or QueueOptions(), **overrides)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from router.queue.memory import MemoryQueue

        return MemoryQueue(opts)
    if scheme == "sqlite":
        from router.queue.sqlite import SqliteQueue

        return SqliteQueue(sqlite_path(url), opts)
    if scheme in ("postgres", "postgresql"):
        return _postgres_queue(url, opts)
    raise ConfigError(f"unsupported queue URL scheme {scheme!r} (use sqlite, postgresql or memory)")


def sqlite_path(url: str) -> str:
    """The file path in a ``sqlite:///path`` URL."""
    prefix = "sqlite:///"
    path = url[len(prefix) :] if url.startswith(prefix) else ""
    if not path or path == ":memory:" or "?" in path:
        raise ConfigError(f"queue URL {url!r} must be sqlite:///relative/path or sqlite:////absolute/path")
    return path


def _postgres_queue(url: str, options: QueueOptions) -> Queue:
    try:
        module = importlib.import_module("router.queue.postgres")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"queue.url: the PostgreSQL backend needs {exc.name} (pip install 'klaviyo-router[postgres]')"
        ) from exc
    return cast(Queue, module.PostgresQueue(url, options))


def group_by_message(jobs: Sequence[NewJob]) -> tuple[list[list[NewJob]], int]:
    """Split one enqueue call into groups sharing ``(source, message_id)``, in first-seen order.

    A job repeating the source, message id and destination of an earlier job in the same call is
    dropped; the second value is how many were dropped.
    """
    groups: dict[tuple[str, str], dict[str, NewJob]] = {}
    dropped = 0
    for job in jobs:
        group = groups.setdefault((job.source, job.message_id), {})
        if job.destination in group:
            dropped += 1
        else:
            group[job.destination] = job
    return [list(group.values()) for group in groups.values()], dropped
