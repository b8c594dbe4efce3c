"""The embedded default queue: one SQLite file in WAL mode, durable commits, group commit.

Every write goes to one writer thread that owns the write connection. It takes whatever
operations are waiting, runs them in one ``BEGIN IMMEDIATE`` transaction (each inside a
savepoint, so one failing operation does not undo the others) and commits once. The commit does
not sync: a sync thread fsyncs the WAL and only then resolves each caller's future, so a
returned write is durable, while the writer already runs the next group (the disk's sync and
the next group's statements overlap). Under load, many concurrent ``enqueue`` calls therefore
cost one commit and share one fsync. Reads (``get``, ``list_jobs``, ``counts``, ``ping``) run on
another thread with its own read-only connection, so they never wait behind either. Those
connections and threads are :mod:`router.queue.sqlite_threads`.

``enqueue`` is the hot path, and the writer thread shares the GIL with the HTTP event loop:
every statement it steps releases the GIL and must win it back, which costs up to the switch
interval while the loop is busy. So an ``enqueue`` call is serialised on the caller's side (one
JSON array of jobs, their payloads in one blob), and the writer stores a whole run of them with
three statements however many jobs they hold: record every messageId (which also tells whether
any was a duplicate: usually none), insert every payload, insert every job. When that run meets a
duplicate, a messageId that SQLite's JSON functions cannot carry (NUL) or an error, it is undone
and falls back to one call at a time, each in its own savepoint, row by row.

``BEGIN IMMEDIATE`` plus the busy timeout make writes, claims included, safe against other
processes using the same file. The queries are in ``sql/sqlite.sql``.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from router.errors import ConfigError
from router.queue import (
    CLAIM_WINDOW,
    EnqueueResult,
    Job,
    JobState,
    NewJob,
    QueueFull,
    QueueOptions,
    check_depth,
    group_by_message,
    sql,
)
from router.queue.sqlite_threads import Operation, Outcome, Reader, Submitted, Writer, execute_script

QUERIES = sql.load("sqlite")


class SqliteQueue:
    """:class:`router.queue.Queue` in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        options: QueueOptions | None = None,
        *,
        busy_timeout: float = 30.0,
        max_batch: int = 1000,
        cleanup_batch: int = 1000,
    ) -> None:
        """``busy_timeout``: seconds to wait for another process's write lock.
        ``max_batch``: most operations committed together (1 turns group commit off).
        ``cleanup_batch``: most rows :meth:`cleanup` deletes per transaction (the writer's other
        operations wait for one chunk at most: 1 000 done jobs took 2 to 20 ms, 5 000 up to 70 ms)."""
        self.path = os.fspath(path)
        self._cleanup_batch = cleanup_batch
        self.options = options or QueueOptions()
        self._writer = Writer(self.path, busy_timeout, max_batch, _run_batch)
        self._reader = Reader(self.path, busy_timeout)

    @property
    def commits(self) -> int:
        """Write transactions committed so far."""
        return self._writer.commits

    @property
    def writes(self) -> int:
        """Write operations (method calls) committed so far."""
        return self._writer.writes

    async def open(self) -> None:
        """Open the file (created if missing), apply migrations, start the threads."""
        if self._writer.alive:
            return
        await self._writer.start()
        try:
            await self._writer.run(_migrate)
            await self._reader.start()
        except BaseException:
            await self._writer.stop()
            raise

    async def close(self) -> None:
        """Commit what was submitted, then close both connections."""
        await self._reader.stop()
        await self._writer.stop()

    async def ping(self) -> None:
        """Raise unless both connections answer."""
        if not self._writer.alive:
            raise RuntimeError("the sqlite queue writer is not running")
        await self._reader.run(lambda conn: conn.execute(QUERIES["ping"]).fetchall())

    async def enqueue(
        self, jobs: Sequence[NewJob], *, now: float | None = None, max_depth: int | None = None
    ) -> EnqueueResult:
        """Store jobs as pending, skipping ``(source, message_id)`` pairs seen in the dedupe window;
        :class:`router.queue.QueueFull` past ``max_depth`` active jobs, checked in the transaction
        that stores them against the count the triggers of ``queue_depth`` keep."""
        groups, duplicates = group_by_message(jobs)
        call = _EnqueueCall.build(groups, duplicates, now, self.options.dedupe_window, max_depth)
        result: EnqueueResult = await self._writer.store(call)
        return result

    async def add_dead(self, jobs: Sequence[NewJob], reason: str, *, now: float | None = None) -> None:
        """Store jobs directly as dead letters; they do not count for dedupe."""
        now = _now(now)
        await self._writer.run(lambda conn: _insert_jobs(conn, jobs, JobState.DEAD, reason, now))

    async def claim(
        self, destination: str, limit: int, *, lease_seconds: float, now: float | None = None
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs of a destination, oldest first, keeping per-key order."""
        now = time.time() if now is None else now
        params = {
            "destination": destination,
            "limit": limit,
            "window": CLAIM_WINDOW * limit,
            "now": now,
            "lease_expires_at": now + lease_seconds,
            "hot_key_threshold": self.options.hot_key_threshold,
        }
        rows = await self._writer.run(functools.partial(_claim, params=params))
        return [Job.from_values(row) for row in rows]

    async def ack(self, job_ids: Sequence[int], *, now: float | None = None) -> None:
        """Mark in-flight jobs done."""
        await self._update("ack_jobs", {"ids": _ids(job_ids), "now": _now(now)})

    async def extend(self, job_ids: Sequence[int], *, lease_seconds: float, now: float | None = None) -> None:
        """Keep leased jobs leased for another ``lease_seconds``."""
        moment = _now(now)
        await self._update(
            "extend_leases", {"ids": _ids(job_ids), "now": moment, "lease_expires_at": moment + lease_seconds}
        )

    async def retry(
        self, job_id: int, *, at: float, error: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Return an in-flight job to pending, due at ``at``, counting one attempt."""
        params = {"id": job_id, "at": at, "error": error, "progress": progress, "now": _now(now)}
        await self._update("retry_job", params)

    async def dead_letter(
        self, job_id: int, *, reason: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Move a pending or in-flight job to the dead letters, counting one attempt."""
        params = {"id": job_id, "reason": reason, "progress": progress, "now": _now(now)}
        await self._update("dead_letter_job", params)

    async def release(self, job_ids: Sequence[int], *, progress: int = 0, now: float | None = None) -> None:
        """Give back leased jobs without counting an attempt."""
        await self._update("release_jobs", {"ids": _ids(job_ids), "progress": progress, "now": _now(now)})

    async def get(self, job_id: int) -> Job | None:
        """One job by id."""
        rows = await self._reader.run(
            lambda conn: conn.execute(QUERIES["get_job"], {"id": job_id}).fetchall()
        )
        return Job.from_row(rows[0]) if rows else None

    async def list_jobs(
        self,
        state: JobState,
        *,
        limit: int = 100,
        after_id: int = 0,
        reason_contains: str | None = None,
        destination: str | None = None,
    ) -> list[Job]:
        """Jobs in a state with ids above ``after_id``, by id."""
        params = {
            "state": state.value,
            "limit": limit,
            "after_id": after_id,
            "reason_contains": reason_contains,
            "destination": destination,
        }
        rows = await self._reader.run(lambda conn: conn.execute(QUERIES["list_jobs"], params).fetchall())
        return [Job.from_row(row) for row in rows]

    async def revive(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Dead → pending, due now, with attempts reset; returns how many were revived."""
        return await self._update("revive_jobs", {"ids": _ids(job_ids), "now": _now(now)})

    async def oldest_due(self, destination: str, *, now: float | None = None) -> int | None:
        """The oldest job in flight or due, unless it waits behind a retry of its key (see :class:`Queue`)."""
        params = {"destination": destination, "now": _now(now)}
        rows = await self._reader.run(lambda conn: conn.execute(QUERIES["oldest_due"], params).fetchall())
        found: int | None = rows[0]["id"]
        return found

    async def purge(self, job_ids: Sequence[int] | None = None) -> int:
        """Delete dead jobs (all of them when ``job_ids`` is None); returns how many."""
        if job_ids is None:
            return await self._update("purge_all_jobs", {})
        return await self._update("purge_jobs", {"ids": _ids(job_ids)})

    async def delivered(
        self,
        *,
        since: float,
        until: float,
        destination: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[int]:
        """Ids of done jobs acked in ``[since, until)``, above ``after_id``, by id."""
        params = {
            "since": since,
            "until": until,
            "destination": destination,
            "after_id": after_id,
            "limit": limit,
        }
        rows = await self._reader.run(lambda conn: conn.execute(QUERIES["list_delivered"], params).fetchall())
        return [row["id"] for row in rows]

    async def resend(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Done → pending, due now, attempts and last error cleared; returns how many."""
        return await self._update("resend_jobs", {"ids": _ids(job_ids), "now": _now(now)})

    async def counts(self, destination: str | None = None) -> dict[JobState, int]:
        """Number of jobs per state."""
        if destination is None:
            query, params = QUERIES["count_jobs"], {}
        else:
            query, params = QUERIES["count_destination_jobs"], {"destination": destination}
        rows = await self._reader.run(lambda conn: conn.execute(query, params).fetchall())
        result = dict.fromkeys(JobState, 0)
        result.update((JobState(row["state"]), row["jobs"]) for row in rows)
        return result

    async def depth(self) -> int:
        """Active jobs (pending or in flight), as the triggers of ``queue_depth`` keep them."""
        return await self._reader.run(_active_jobs)

    async def cleanup(self, *, now: float | None = None) -> int:
        """Delete done jobs past retention and dedupe entries past the window; returns how many.

        Deletes in chunks, each its own transaction, so writers are never held up for long. The
        counts of ordering keys with no active job left go too (not counted: they are no jobs).
        """
        now = _now(now)
        total = await self._delete_in_chunks("delete_old_jobs", now - self.options.retention)
        total += await self._delete_in_chunks("delete_old_dedupe", now - self.options.dedupe_window)
        await self._delete_in_chunks("delete_idle_keys", now)
        return total

    async def _delete_in_chunks(self, name: str, cutoff: float) -> int:
        params = {"cutoff": cutoff, "batch": self._cleanup_batch}
        total = 0
        while True:
            deleted = await self._update(name, params)
            total += deleted
            if deleted < self._cleanup_batch:
                return total

    async def _update(self, name: str, params: dict[str, Any]) -> int:
        return await self._writer.run(lambda conn: conn.execute(QUERIES[name], params).rowcount)


@dataclass(slots=True)
class _EnqueueCall:
    """One :meth:`SqliteQueue.enqueue` call, serialised on the caller's side for the writer."""

    groups: list[list[NewJob]]
    #: Jobs dropped as repeats inside the call.
    dropped: int
    #: Unix time of the call; None: the writer's clock when it stores the call.
    now: float | None
    dedupe_window: float
    #: JSON ``[[source, message_id], ...]``, one per group.
    messages: bytes
    #: JSON ``[[source, destination, message_id, ordering_key, payload_bytes], ...]``, one per job.
    jobs: bytes
    #: The payloads one after the other.
    payloads: bytes
    count: int
    #: False when a string holds NUL, which SQLite's JSON functions cut short: store row by row.
    json_safe: bool
    #: Active jobs the queue may hold with this call's (None: no limit).
    max_depth: int | None = None

    @classmethod
    def build(
        cls,
        groups: list[list[NewJob]],
        dropped: int,
        now: float | None,
        dedupe_window: float,
        max_depth: int | None = None,
    ) -> _EnqueueCall:
        flat = [job for group in groups for job in group]
        messages = orjson.dumps([(group[0].source, group[0].message_id) for group in groups])
        jobs = orjson.dumps(
            [(j.source, j.destination, j.message_id, j.ordering_key, len(j.payload)) for j in flat]
        )
        return cls(
            groups=groups,
            dropped=dropped,
            now=now,
            dedupe_window=dedupe_window,
            messages=messages,
            jobs=jobs,
            payloads=b"".join([job.payload for job in flat]),
            count=len(flat),
            json_safe=b"\\u0000" not in jobs,
            max_depth=max_depth,
        )

    def mergeable(self, other: _EnqueueCall) -> bool:
        """Whether both calls can be stored by the same three statements."""
        return (
            self.json_safe
            and other.json_safe
            and self.now == other.now
            and self.dedupe_window == other.dedupe_window
        )


def _store_calls(conn: sqlite3.Connection, calls: list[_EnqueueCall]) -> list[Outcome]:
    """Store a run of enqueue calls (all :meth:`_EnqueueCall.mergeable`) in one group commit.

    Calls that would take the queue past their ``max_depth`` are refused first, in order, each
    counting the calls admitted before it."""
    now = time.time() if calls[0].now is None else calls[0].now
    cutoff = now - calls[0].dedupe_window
    refused = _refused_for_depth(conn, calls)
    stored = [call for index, call in enumerate(calls) if call.count and index not in refused]
    # One message alone (a single call at low load) is cheaper row by row: fewer, simpler steps.
    if calls[0].json_safe and (len(stored) > 1 or (stored and len(stored[0].groups) > 1)):
        conn.execute(QUERIES["savepoint"])
        try:
            messages, jobs = _join_json([c.messages for c in stored]), _join_json([c.jobs for c in stored])
            seen = conn.execute(QUERIES["see_messages"], {"messages": messages, "now": now, "cutoff": cutoff})
            # every pair recorded: none was seen in the window, none repeats another of the run
            if seen.rowcount == sum(len(c.groups) for c in stored):
                payloads = stored[0].payloads if len(stored) == 1 else b"".join([c.payloads for c in stored])
                conn.execute(QUERIES["insert_pending_payloads"], {"jobs": jobs, "payloads": payloads})
                conn.execute(QUERIES["insert_pending_jobs"], {"jobs": jobs, "now": now})
                conn.execute(QUERIES["release_savepoint"])
                return [
                    (None, refused[index])
                    if index in refused
                    else (EnqueueResult(inserted=c.count, duplicates=c.dropped), None)
                    for index, c in enumerate(calls)
                ]
        except Exception:  # retried call by call below, where the error lands on its own call
            pass
        conn.execute(QUERIES["rollback_to_savepoint"])
        conn.execute(QUERIES["release_savepoint"])
    return [
        (None, refused[index])
        if index in refused
        else _run_isolated(conn, functools.partial(_store_rows, call=call, now=now, cutoff=cutoff))
        for index, call in enumerate(calls)
    ]


def _refused_for_depth(conn: sqlite3.Connection, calls: list[_EnqueueCall]) -> dict[int, QueueFull]:
    """The calls (by index) that would take the queue past their ``max_depth``, taken in order."""
    if all(call.max_depth is None for call in calls):
        return {}
    active = _active_jobs(conn)
    refused: dict[int, QueueFull] = {}
    for index, call in enumerate(calls):
        try:
            check_depth(active, call.count, call.max_depth)
        except QueueFull as full:
            refused[index] = full
            continue
        active += call.count
    return refused


def _active_jobs(conn: sqlite3.Connection) -> int:
    active: int = conn.execute(QUERIES["active_jobs"]).fetchone()["active"]
    return active


def _join_json(arrays: list[bytes]) -> bytes:
    """One JSON array holding the items of several non-empty ones."""
    return arrays[0] if len(arrays) == 1 else b"[" + b",".join([a[1:-1] for a in arrays]) + b"]"


def _store_rows(conn: sqlite3.Connection, *, call: _EnqueueCall, now: float, cutoff: float) -> EnqueueResult:
    """Store one enqueue call statement by statement (duplicates, NUL in a string, errors)."""
    if call.max_depth is not None:
        check_depth(_active_jobs(conn), call.count, call.max_depth)
    stored: list[NewJob] = []
    duplicates = call.dropped
    for group in call.groups:
        first = group[0]
        seen = {"source": first.source, "message_id": first.message_id, "now": now, "cutoff": cutoff}
        if conn.execute(QUERIES["see_message"], seen).fetchall():
            stored.extend(group)
        else:
            duplicates += len(group)
    _insert_jobs(conn, stored, JobState.PENDING, None, now)
    return EnqueueResult(inserted=len(stored), duplicates=duplicates)


def _insert_jobs(
    conn: sqlite3.Connection, jobs: Sequence[NewJob], state: JobState, error: str | None, now: float
) -> None:
    """Store jobs one by one, each row with its payload."""
    for job in jobs:
        conn.execute(
            QUERIES["insert_job"],
            (job.source, job.destination, job.message_id, job.ordering_key, state.value, now, error),
        )
        conn.execute(QUERIES["insert_payload"], (job.payload,))


def _claim(conn: sqlite3.Connection, *, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Release expired leases, lease jobs (``claim_jobs``), then read them with their payloads, by id:
    as plain rows in the order of :data:`JOB_FIELDS` (a dict per row cost a third of the reading)."""
    conn.execute(QUERIES["release_expired_leases"], params)
    ids = [row["id"] for row in conn.execute(QUERIES["claim_jobs"], params)]
    if not ids:
        return []
    cursor = conn.cursor()
    cursor.row_factory = None
    rows: list[tuple[Any, ...]] = cursor.execute(QUERIES["select_jobs"], {"ids": _ids(ids)}).fetchall()
    return rows


def _ids(job_ids: Sequence[int]) -> str:
    return orjson.dumps(list(job_ids)).decode()


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _migrate(conn: sqlite3.Connection) -> int:
    version: int = conn.execute(QUERIES["schema_version"]).fetchone()["user_version"]
    steps = sql.migrations(QUERIES)
    if version > steps[-1][0]:
        raise ConfigError(f"queue schema version {version} is newer than this router knows ({steps[-1][0]})")
    for number, script in steps:
        if number > version:
            execute_script(conn, script)
            version = conn.execute(QUERIES["schema_version"]).fetchone()["user_version"]
            if version != number:
                raise RuntimeError(f"sqlite migration {number} left the schema at version {version}")
    return version


def _run_batch(conn: sqlite3.Connection, batch: list[Submitted]) -> list[Outcome]:
    """Run the operations of one group commit in order; consecutive enqueue calls together."""
    outcomes: list[Outcome] = []
    start = 0
    while start < len(batch):
        operation = batch[start].operation
        if not isinstance(operation, _EnqueueCall):
            outcomes.append(_run_isolated(conn, operation))
            start += 1
            continue
        end = start + 1
        while end < len(batch):
            following = batch[end].operation
            if not isinstance(following, _EnqueueCall) or not operation.mergeable(following):
                break
            end += 1
        calls = [item.operation for item in batch[start:end]]
        outcomes.extend(_store_calls(conn, calls))
        start = end
    return outcomes


def _run_isolated(conn: sqlite3.Connection, operation: Operation[Any]) -> Outcome:
    conn.execute(QUERIES["savepoint"])
    try:
        result = operation(conn)
    except Exception as exc:
        conn.execute(QUERIES["rollback_to_savepoint"])
        conn.execute(QUERIES["release_savepoint"])
        return None, exc
    conn.execute(QUERIES["release_savepoint"])
    return result, None
