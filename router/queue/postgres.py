"""The cluster queue: one PostgreSQL database shared by any number of router processes (asyncpg).

Every process ingests and delivers against the same tables; what keeps them correct together:

- **Claims** of a destination take turns through a transaction-level advisory lock, so each sees
  the leases the one before took: per-profile order and the hot-key escape hold across processes
  as in one. A claim is one statement (a function in the database), so the lock is held for the
  database's work only, never while a process's event loop is busy elsewhere. The chosen rows are
  locked ``FOR UPDATE SKIP LOCKED`` (a row another transaction holds is left, and so are the
  later jobs of its key).
- **Dedupe** is an upsert on ``(source, message_id)`` whose row lock makes concurrent inserts of
  the same pair, from any process, wait for each other: exactly one of them stores the event.
- **Group commit**: ``enqueue`` and ``add_dead`` calls wait in a list that a couple of writer tasks
  drain, each taking every call waiting into one transaction of two statements (every messageId
  recorded by one ``unnest`` upsert, every job inserted by one ``unnest`` insert), whatever the
  number of calls and jobs. A group that fails for a reason of its own is stored again call by
  call, so one bad call fails alone.
- **Counts**: statement-level triggers keep the active jobs per ordering key (``queue_keys``, the
  hot-key check) and in all (``queue_depth``, ``max_depth``); enqueues with a ``max_depth`` take
  turns at that check under an advisory lock, so no two processes pass it together.
- **Migrations** run at start-up under an advisory lock, each in the transaction that records the
  new version in ``schema_versions``: processes starting at once apply each exactly once.
- **Connection loss**: an operation that finds its connection lost before it committed runs again
  on a fresh one (the pool replaces dead connections; the first use of one whose server process
  was terminated is where that shows). Settling operations (ack, retry, dead letter, extend,
  release) are idempotent and keep trying for ``patience`` seconds. Whatever still cannot reach
  the database raises :class:`~router.queue.QueueUnavailable`: ingest answers 503 with
  ``Retry-After``, ``/ready`` names the server and the cause, delivery backs off. A commit whose
  answer was lost is never reported stored: the client sends again and dedupe sorts it out.

It also keeps the cluster's Klaviyo send budgets (:meth:`reserve_send`, for
:mod:`router.klaviyo.shared_ratelimit`). The queries are in ``sql/postgres.sql``.

``postgresql://user:password@host:port/database`` URLs take asyncpg's parameters (``sslmode``...)
and one of ours: ``pool_size``, the most connections this process opens (default 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import orjson
import structlog

from router.errors import ConfigError
from router.queue import (
    CLAIM_WINDOW,
    EnqueueResult,
    Job,
    JobState,
    NewJob,
    QueueFull,
    QueueOptions,
    QueueUnavailable,
    check_depth,
    group_by_message,
    sql,
)

QUERIES = sql.load("postgres")
#: This schema's row in ``schema_versions`` (other components keep their own).
COMPONENT = "queue"
#: Connections one process opens at most, unless the URL's ``pool_size`` says otherwise.
POOL_SIZE = 8

log = structlog.get_logger("router.queue.postgres")
T = TypeVar("T")
Work = Callable[[Any], Awaitable[T]]

#: Errors that mean the database is out of reach, not that the operation is wrong.
_LOST_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)
#: Text PostgreSQL cannot hold (NUL) is stored as this marker followed by the string's JSON form.
_ESCAPED = "\ufffe"


def lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to the database failed (try again later).

    Besides the errors that say so, asyncpg's "cannot switch to state ..." comes from a connection
    whose server process ended while it sat idle in the pool (the goodbye arrived unasked)."""
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc)
    return isinstance(exc, _LOST_ERRORS)


class PostgresQueue:
    """:class:`router.queue.Queue` in a PostgreSQL database, shared by many processes."""

    def __init__(
        self,
        url: str,
        options: QueueOptions | None = None,
        *,
        writers: int = 2,
        max_batch: int = 1000,
        connect_timeout: float = 5.0,
        command_timeout: float = 15.0,
        patience: float = 30.0,
        cleanup_batch: int = 5000,
    ) -> None:
        """``writers``: group commits in progress at once. ``max_batch``: most enqueue calls in one.
        ``connect_timeout`` / ``command_timeout``: seconds before a connection attempt or a statement
        counts as lost. ``patience``: seconds settling operations keep trying while the database is
        out of reach. ``cleanup_batch``: most rows :meth:`cleanup` deletes per statement."""
        self.options = options or QueueOptions()
        self._dsn, self._pool_size = _split_url(url)
        parts = urlsplit(self._dsn)
        #: Where the database is, for messages (never the password).
        self.where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._patience = patience
        self._cleanup_batch = cleanup_batch
        self._pool: asyncpg.Pool | None = None
        self._commits = _GroupCommit(self._store_group, writers=writers, max_batch=max_batch)

    @property
    def commits(self) -> int:
        """Group commits (enqueue and add_dead transactions) so far."""
        return self._commits.commits

    async def open(self) -> None:
        """Connect, apply migrations (one process at a time), start the group-commit writers."""
        if self._pool is not None:
            return
        # no floor of idle connections: the pool would keep reconnecting to a database that is
        # away, logging a traceback each time; connections are opened as operations need them
        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            reset=_reset,
        )
        try:
            async with pool.acquire() as conn:
                await _migrate(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, Exception) and lost(exc):
                raise self._unavailable(exc) from exc
            raise
        self._pool = pool
        self._commits.start()

    async def close(self) -> None:
        """Store the writes already submitted, then close every connection."""
        if self._pool is None:
            return
        await self._commits.stop()
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), self._command_timeout)
        except Exception:  # connections that cannot close politely are dropped
            pool.terminate()

    async def ping(self) -> None:
        """Raise :class:`QueueUnavailable` unless the database answers."""
        await self._read(lambda conn: conn.fetchval(QUERIES["ping"], timeout=self._connect_timeout))

    # ------------------------------------------------------------ enqueue (group commit)

    async def enqueue(
        self, jobs: Sequence[NewJob], *, now: float | None = None, max_depth: int | None = None
    ) -> EnqueueResult:
        """Store jobs as pending, skipping ``(source, message_id)`` pairs seen in the dedupe window.

        With ``max_depth``, store nothing and raise :class:`~router.queue.QueueFull` when the active
        jobs of the whole queue plus these would be more: the group's transaction takes the depth
        lock, so enqueues with a limit take turns across the cluster and never add up past it."""
        groups, dropped = group_by_message(jobs)
        result: EnqueueResult = await self._commits.submit(_Write(groups, dropped, now, None, max_depth))
        return result

    async def add_dead(self, jobs: Sequence[NewJob], reason: str, *, now: float | None = None) -> None:
        """Store jobs directly as dead letters; they do not count for dedupe."""
        if jobs:
            await self._commits.submit(_Write([list(jobs)], 0, now, reason))

    async def _store_group(self, writes: list[_Write]) -> list[EnqueueResult | QueueFull | None]:
        """Store a group of writes in one transaction (retried while the connection is lost before
        the commit)."""
        return await self._transaction(
            lambda conn: _store_writes(conn, writes, self.options.dedupe_window), retries=1
        )

    # ------------------------------------------------------------ claim and settle

    async def claim(
        self, destination: str, limit: int, *, lease_seconds: float, now: float | None = None
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs of a destination, oldest first, keeping per-key order.

        One statement, its own transaction, after the claims of the destination before it
        (``queue_claim`` in ``sql/postgres.sql``): release expired leases, read the keys that
        block (and which of them are hot), read the oldest ``CLAIM_WINDOW * limit`` eligible
        pending jobs, choose key by key (:func:`~router.queue.key_major`, as the memory queue
        does) and lease the chosen. A claim whose answer is lost is tried once more on a fresh
        connection: if the first had leased jobs after all, they come back when their lease runs
        out, as a dead worker's do."""
        moment = _now(now)
        arguments = (
            destination,
            moment,
            self.options.hot_key_threshold,
            CLAIM_WINDOW * limit,
            limit,
            moment + lease_seconds,
        )
        rows = await self._read(lambda conn: conn.fetch(QUERIES["claim"], *arguments))
        return sorted(map(_job, rows), key=attrgetter("id"))

    async def ack(self, job_ids: Sequence[int], *, now: float | None = None) -> None:
        """Mark in-flight jobs done."""
        await self._settle("ack_jobs", list(job_ids), _now(now))

    async def extend(self, job_ids: Sequence[int], *, lease_seconds: float, now: float | None = None) -> None:
        """Keep leased jobs leased for another ``lease_seconds``."""
        moment = _now(now)
        await self._settle("extend_leases", list(job_ids), moment, moment + lease_seconds)

    async def retry(
        self, job_id: int, *, at: float, error: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Return an in-flight job to pending, due at ``at``, counting one attempt."""
        await self._settle("retry_job", job_id, at, _error_text(error), _now(now), progress)

    async def dead_letter(
        self, job_id: int, *, reason: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Move a pending or in-flight job to the dead letters, counting one attempt."""
        await self._settle("dead_letter_job", job_id, _error_text(reason), _now(now), progress)

    async def release(self, job_ids: Sequence[int], *, progress: int = 0, now: float | None = None) -> None:
        """Give back leased jobs without counting an attempt."""
        await self._settle("release_jobs", list(job_ids), _now(now), progress)

    async def revive(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Dead → pending, due now, with attempts reset; returns how many were revived."""
        return await self._settle("revive_jobs", list(job_ids), _now(now))

    async def purge(self, job_ids: Sequence[int] | None = None) -> int:
        """Delete dead jobs (all of them when ``job_ids`` is None); returns how many."""
        if job_ids is None:
            return await self._settle("purge_all_jobs")
        return await self._settle("purge_jobs", list(job_ids))

    async def cleanup(self, *, now: float | None = None) -> int:
        """Delete done jobs past retention and dedupe entries past the window, a chunk per
        statement; returns how many."""
        moment = _now(now)
        total = await self._delete_in_chunks("delete_old_jobs", moment - self.options.retention)
        total += await self._delete_in_chunks("delete_old_dedupe", moment - self.options.dedupe_window)
        await self._delete_in_chunks("delete_idle_keys")  # counts of keys left without jobs: no jobs
        return total

    async def _delete_in_chunks(self, name: str, *arguments: Any) -> int:
        total = 0
        while True:
            deleted = await self._settle(name, *arguments, self._cleanup_batch)
            total += deleted
            if deleted < self._cleanup_batch:
                return total

    # ------------------------------------------------------------ reads

    async def get(self, job_id: int) -> Job | None:
        """One job by id."""
        row = await self._read(lambda conn: conn.fetchrow(QUERIES["get_job"], job_id))
        return None if row is None else _job(row)

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
        reason = None if reason_contains is None else _error_text(reason_contains)
        rows = await self._read(
            lambda conn: conn.fetch(QUERIES["list_jobs"], state.value, limit, after_id, reason, destination)
        )
        return [_job(row) for row in rows]

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
        rows = await self._read(
            lambda conn: conn.fetch(QUERIES["list_delivered"], after_id, since, until, destination, limit)
        )
        return [row[0] for row in rows]

    async def resend(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Done → pending, due now, attempts and last error cleared; returns how many."""
        return await self._settle("resend_jobs", list(job_ids), _now(now))

    async def oldest_due(self, destination: str, *, now: float | None = None) -> int | None:
        """The oldest job in flight or due, unless it waits behind a retry of its key (see :class:`Queue`)."""
        found: int | None = await self._read(
            lambda conn: conn.fetchval(QUERIES["oldest_due"], destination, _now(now))
        )
        return found

    async def counts(self, destination: str | None = None) -> dict[JobState, int]:
        """Number of jobs per state."""
        if destination is None:
            rows = await self._read(lambda conn: conn.fetch(QUERIES["count_jobs"]))
        else:
            rows = await self._read(lambda conn: conn.fetch(QUERIES["count_destination_jobs"], destination))
        result = dict.fromkeys(JobState, 0)
        result.update((JobState(row["state"]), row["jobs"]) for row in rows)
        return result

    async def depth(self) -> int:
        """Active jobs (pending or in flight), as the triggers keep them in ``queue_depth``."""
        active: int = await self._read(lambda conn: conn.fetchval(QUERIES["active_jobs"]))
        return active

    # ------------------------------------------------------------ the cluster's Klaviyo send budgets

    async def reserve_send(self, bucket: str, burst: int, steady: int, margin: float) -> float:
        """Reserve the next send of ``bucket`` that keeps ``burst`` per second and ``steady`` per
        minute across the cluster; returns the seconds to wait before sending."""
        row = await self._patiently(
            lambda conn: conn.fetchrow(QUERIES["ratelimit_reserve"], bucket, burst, steady, margin)
        )
        return max(0.0, float(row["send_at"]) - float(row["now_at"]))

    async def block_sends(self, bucket: str, seconds: float) -> None:
        """Let no process send to ``bucket`` for ``seconds`` (Retry-After, a used-up window)."""
        await self._patiently(lambda conn: conn.execute(QUERIES["ratelimit_block"], bucket, seconds))

    async def sends_blocked_for(self, bucket: str) -> float:
        """Seconds before ``bucket`` may send again, across the cluster (0: now)."""
        seconds = await self._patiently(lambda conn: conn.fetchval(QUERIES["ratelimit_blocked"], bucket))
        return float(seconds)

    # ------------------------------------------------------------ connections

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; when it turns out lost, every idle one is replaced (a server that
        ended one connection has likely ended all of them)."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the postgresql queue is not open")
        async with pool.acquire() as conn:
            try:
                yield conn
            except Exception as exc:
                if lost(exc):  # the others may be gone too: the pool opens new ones in their place
                    with contextlib.suppress(asyncpg.InterfaceError):  # already gone from the pool
                        conn.terminate()
                    await pool.expire_connections()
                raise

    async def _transaction(self, work: Work[T], *, retries: int) -> T:
        """Run ``work`` in one transaction. A connection lost before the commit was sent is tried
        again (``retries`` times, on a fresh connection); one lost during the commit, whose outcome
        is unknown, or once the retries are spent, raises :class:`QueueUnavailable`."""
        attempt = 0
        while True:
            committing = False
            try:
                async with self._connection() as conn:
                    transaction = conn.transaction()
                    await transaction.start()
                    try:
                        result = await work(conn)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await transaction.rollback()
                        raise
                    committing = True
                    await transaction.commit()
                    return result
            except Exception as exc:
                if not lost(exc):
                    raise
                if committing or attempt >= retries:
                    raise self._unavailable(exc) from exc
                attempt += 1

    async def _read(self, work: Work[T]) -> T:
        """Run a read: once more on a fresh connection if the first was lost, then give up."""
        return await self._run(work, patience=0.0)

    async def _patiently(self, work: Work[T]) -> T:
        """Run an idempotent statement, trying again while the database is out of reach."""
        return await self._run(work, patience=self._patience)

    async def _run(self, work: Work[T], *, patience: float) -> T:
        """Run ``work`` on a pooled connection. A lost connection is tried again at once on a fresh
        one (the first use of a connection whose server process ended is where that shows), then
        every 50 ms to 2 s (doubling) for up to ``patience`` seconds; then :class:`QueueUnavailable`."""
        deadline = time.monotonic() + patience
        delay = 0.0
        while True:
            try:
                async with self._connection() as conn:
                    return await work(conn)
            except Exception as exc:
                if not lost(exc):
                    raise
                if delay and time.monotonic() + delay > deadline:
                    raise self._unavailable(exc) from exc
                if delay:
                    log.warning(
                        "queue_connection_lost", server=self.where, retry_in=delay, error=_describe(exc)
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0) if delay else 0.05

    async def _settle(self, name: str, *arguments: Any) -> int:
        """Run one idempotent update or delete of ``QUERIES[name]`` patiently; the rows it changed."""
        status: str = await self._patiently(lambda conn: conn.execute(QUERIES[name], *arguments))
        return int(status.rsplit(" ", 1)[-1])

    def _unavailable(self, exc: BaseException) -> QueueUnavailable:
        return QueueUnavailable(f"PostgreSQL at {self.where} unreachable: {_describe(exc)}")


# ---------------------------------------------------------------- group commit


@dataclass(slots=True, eq=False)
class _Write:
    """One enqueue (``dead_reason`` None) or add_dead call waiting for a group commit."""

    #: Jobs by ``(source, message_id)`` (enqueue), or all of them in one group (add_dead).
    groups: list[list[NewJob]]
    #: Jobs the call dropped as repeats of its own.
    dropped: int
    now: float | None
    dead_reason: str | None
    #: Active jobs the queue may hold with this call's (None: no limit).
    max_depth: int | None = None

    @property
    def count(self) -> int:
        """Jobs the call adds, counted as if none were a duplicate."""
        return sum(map(len, self.groups))


class _GroupCommit:
    """Writer tasks that store every waiting write in one transaction each time round."""

    def __init__(
        self,
        store: Callable[[list[_Write]], Awaitable[list[EnqueueResult | QueueFull | None]]],
        *,
        writers: int,
        max_batch: int,
    ) -> None:
        self._store = store  # a write's result, or the exception it fails with (QueueFull)
        self._writers = writers
        self._max_batch = max_batch
        self._waiting: list[tuple[_Write, asyncio.Future[Any]]] = []
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.commits = 0

    def start(self) -> None:
        self._closing = False
        self._ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"queue-writer-{n}") for n in range(self._writers)
        ]

    async def stop(self) -> None:
        """Store what is waiting, then end the writers."""
        self._closing = True
        self._ready.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def submit(self, write: _Write) -> Any:
        if not self._tasks or self._closing:
            raise RuntimeError("the postgresql queue is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        self._ready.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch :]
            if not self._waiting:
                self._ready.clear()
            if batch:
                await self._commit(batch)
            elif self._closing:
                self._ready.set()  # wake the other writers to end too
                return

    async def _commit(self, batch: list[tuple[_Write, asyncio.Future[Any]]]) -> None:
        writes = [write for write, _ in batch]
        try:
            results: list[Any] = await self._store(writes)
            outcomes: list[tuple[Any, BaseException | None]] = [(result, None) for result in results]
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, QueueUnavailable):
                outcomes = [(None, exc)] * len(batch)
            else:  # something in one call failed the group: store them one by one
                outcomes = [await self._alone(write) for write in writes]
        self.commits += 1
        for (_, future), (result, error) in zip(batch, outcomes, strict=True):
            if future.done():  # the caller was cancelled; the write stands anyway
                continue
            if isinstance(result, Exception):
                result, error = None, result
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    async def _alone(self, write: _Write) -> tuple[Any, BaseException | None]:
        try:
            return (await self._store([write]))[0], None
        except Exception as exc:
            return None, exc


async def _store_writes(
    conn: Any, writes: list[_Write], dedupe_window: float
) -> list[EnqueueResult | QueueFull | None]:
    """Store a group's writes with two statements: record every messageId (the first write naming
    a pair owns it; the database says which pairs were not seen within the window), then insert
    every job, in write order, the dead letters with them. Writes that would take the queue past
    their ``max_depth`` are refused first, in order, each counting those admitted before it."""
    moment = time.time()
    refused = await _refused_for_depth(conn, writes)
    owners: dict[tuple[str, str], tuple[int, float]] = {}
    for index, write in enumerate(writes):
        if write.dead_reason is None and index not in refused:
            at = moment if write.now is None else write.now
            for group in write.groups:
                owners.setdefault((group[0].source, _to_text(group[0].message_id)), (index, at))
    accepted: set[tuple[str, str]] = set()
    if owners:
        pairs = sorted(owners)
        rows = await conn.fetch(
            QUERIES["see_messages"],
            [source for source, _ in pairs],
            [message_id for _, message_id in pairs],
            [owners[pair][1] for pair in pairs],
            dedupe_window,
        )
        accepted = {(row[0], row[1]) for row in rows}
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    results: list[EnqueueResult | QueueFull | None] = []
    for index, write in enumerate(writes):
        at = moment if write.now is None else write.now
        if index in refused:
            results.append(refused[index])
            continue
        if write.dead_reason is not None:
            _add_jobs(columns, write.groups[0], JobState.DEAD, at, _error_text(write.dead_reason))
            results.append(None)
            continue
        inserted, duplicates = 0, write.dropped
        for group in write.groups:
            pair = (group[0].source, _to_text(group[0].message_id))
            if pair in accepted and owners[pair][0] == index:
                _add_jobs(columns, group, JobState.PENDING, at, None)
                inserted += len(group)
            else:
                duplicates += len(group)
        results.append(EnqueueResult(inserted=inserted, duplicates=duplicates))
    if columns[0]:
        await conn.execute(QUERIES["insert_jobs"], *columns)
    return results


async def _refused_for_depth(conn: Any, writes: list[_Write]) -> dict[int, QueueFull]:
    """The writes (by index) that would take the queue past their ``max_depth``, taken in order,
    under the depth lock (held until the transaction ends)."""
    if all(write.max_depth is None for write in writes):
        return {}
    await conn.execute(QUERIES["depth_lock"])
    active: int = await conn.fetchval(QUERIES["active_jobs"])
    refused: dict[int, QueueFull] = {}
    for index, write in enumerate(writes):
        if write.dead_reason is not None:
            continue
        try:
            check_depth(active, write.count, write.max_depth)
        except QueueFull as full:
            refused[index] = full
            continue
        active += write.count
    return refused


def _add_jobs(
    columns: tuple[list[Any], ...], jobs: Sequence[NewJob], state: JobState, at: float, error: str | None
) -> None:
    sources, destinations, message_ids, keys, payloads, states, times, errors = columns
    for job in jobs:
        sources.append(job.source)
        destinations.append(job.destination)
        message_ids.append(_to_text(job.message_id))
        keys.append(None if job.ordering_key is None else _to_text(job.ordering_key))
        payloads.append(job.payload)
        states.append(state.value)
        times.append(at)
        errors.append(error)


# ---------------------------------------------------------------- helpers


async def _migrate(conn: Any) -> int:
    """Apply this schema's migrations not yet applied, under the migration lock; the version."""
    async with conn.transaction():
        await conn.execute(QUERIES["migration_lock"])
        await conn.execute(QUERIES["schema_table"])
        version: int = await conn.fetchval(QUERIES["schema_version"], COMPONENT)
        steps = sql.migrations(QUERIES)
        if version > steps[-1][0]:
            raise ConfigError(
                f"queue schema version {version} is newer than this router knows ({steps[-1][0]})"
            )
        for number, script in steps:
            if number > version:
                await conn.execute(script)
                await conn.execute(QUERIES["set_schema_version"], COMPONENT, number)
                version = number
    return version


async def _reset(conn: Any) -> None:
    """What a connection needs before going back to the pool: nothing unless a transaction was left
    open (asyncpg's default reset costs a round trip per use; this queue keeps no session state)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _split_url(url: str) -> tuple[str, int]:
    """The DSN asyncpg gets, and the pool size taken out of its query."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    size = POOL_SIZE
    kept = []
    for name, value in query:
        if name != "pool_size":
            kept.append((name, value))
            continue
        if not value.isdigit() or int(value) < 2:
            raise ConfigError(f"queue.url: pool_size must be a whole number of at least 2, not {value!r}")
        size = int(value)
    return urlunsplit(parts._replace(query=urlencode(kept))), size


def _job(row: Any) -> Job:
    """A job from a row in field order, its escaped strings restored."""
    job = Job.from_values(row)
    if job.message_id.startswith(_ESCAPED) or (job.ordering_key or "").startswith(_ESCAPED):
        job = job.evolve(message_id=_from_text(job.message_id), ordering_key=_from_text(job.ordering_key))
    return job


def _to_text(value: str) -> str:
    """``value`` as a PostgreSQL text can hold it: one with NUL (or starting like an escaped one) as
    the marker followed by its JSON form, which :func:`_from_text` reverses."""
    if "\x00" in value or value.startswith(_ESCAPED):
        return _ESCAPED + orjson.dumps(value).decode()
    return value


def _from_text(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_ESCAPED):
        return orjson.loads(value[1:])
    return value


def _error_text(text: str) -> str:
    """An error text without NUL (PostgreSQL text cannot hold it)."""
    return text.replace("\x00", "\ufffd")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


def _now(now: float | None) -> float:
    return time.time() if now is None else now
