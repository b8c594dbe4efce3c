"""The SQLite queue's connections and the threads that own them.

- :class:`Writer`: the one write connection. It takes whatever operations are waiting, runs
  them in one ``BEGIN IMMEDIATE`` transaction (through the queue's batch runner, which isolates
  each in a savepoint) and commits once, without syncing.
- :class:`Syncer`: fsyncs the WAL after each commit and only then resolves the callers' futures,
  so a returned write is durable while the writer already runs the next group.
- :class:`Checkpointer`: copies the WAL into the database file after syncs, beside the writer,
  which does so itself only when the checkpointer cannot catch up with it.
- :class:`Reader`: a read-only connection on a thread of its own, so reads never wait behind
  either.

:mod:`router.queue.sqlite` holds what the operations do; this module, how they reach the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import structlog

from router.queue import sql

log = structlog.get_logger("router.queue")

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], T]
#: What one operation of a group commit came to: its result, or the error it raised.
Outcome = tuple[Any, BaseException | None]
#: Runs the operations of one group inside the open transaction, one outcome each.
BatchRunner = Callable[[sqlite3.Connection, "list[Submitted]"], "list[Outcome]"]

QUERIES = sql.load("sqlite")
#: Frames the WAL may hold (32 MiB of 4 KiB pages) before the writer catches up with the
#: checkpointer itself, so as to start the WAL over (:class:`Checkpointer`).
RESTART_FRAMES: Final = 8192
#: Seconds between checkpoints at least: under a stream of small commits (ingest at concurrency
#: one), a checkpoint, and its sync of the database file, after every group would double the syncs.
CHECKPOINT_PAUSE: Final = 0.1


def execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run statements one by one (``executescript`` would commit the open transaction)."""
    for statement in _statements(script):
        conn.execute(statement)


def _statements(script: str) -> Iterator[str]:
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:60]!r}")


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


def connect(path: str, busy_timeout: float, configure: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = _dict_row
        execute_script(conn, QUERIES[configure])
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(slots=True)
class Submitted:
    """A write operation waiting for the writer thread, and where to send its outcome."""

    #: A function of the connection, or anything the writer's batch runner knows how to store
    #: (the queue's enqueue calls, stored with the calls next to them).
    operation: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


class Syncer:
    """The sync thread: makes committed groups durable (an fsync of the WAL), then reports them.

    The writer commits without syncing (``synchronous = NORMAL``) and hands each group over; one
    fsync covers every group committed before it starts, and while it runs the writer is already
    stepping the next group's statements. A write is reported done only after the fsync that
    follows its commit, so it survives a power cut, as with ``synchronous = FULL``.
    """

    def __init__(self, wal_path: str, checkpointer: Checkpointer) -> None:
        self._wal_path = wal_path
        self._checkpointer = checkpointer
        self._inbox: queue.SimpleQueue[tuple[list[Submitted], list[Outcome]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="queue-sync", daemon=True)
        self._thread.start()

    def submit(self, batch: list[Submitted], outcomes: list[Outcome]) -> None:
        self._inbox.put((batch, outcomes))

    def stop(self) -> None:
        """Sync and report everything submitted so far, then end the thread."""
        self._inbox.put(None)
        self._thread.join()

    def _main(self) -> None:
        stopping = False
        while not stopping:
            groups, stopping = _take_waiting(self._inbox)
            if not groups:
                continue
            batch = [item for group, _ in groups for item in group]
            try:
                fsync_file(self._wal_path)
            except OSError as exc:  # durability unknown: the writes are reported failed
                _settle_all(batch, exc)
                continue
            _settle_batch(batch, [outcome for _, outcomes in groups for outcome in outcomes])
            self._checkpointer.wake()


class Checkpointer:
    """The checkpoint thread: after the syncer reports a group, copies what the WAL holds into the
    database file (a passive checkpoint, beside the writer, which does not checkpoint after its
    commits), at most once per :data:`CHECKPOINT_PAUSE`.

    The writer starts the WAL over when it begins a transaction and finds every frame copied. A
    writer that never pauses may never find that: once the WAL holds :data:`RESTART_FRAMES`, the
    checkpointer says it is :attr:`behind`, and the writer copies the rest itself between two
    transactions (where no write can slip in), so that its next one starts the WAL over.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        #: The WAL has grown past RESTART_FRAMES: the writer catches up (:func:`checkpoint`).
        self.behind = False
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, args=(conn,), name="queue-checkpoint", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _main(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    self.behind = checkpoint(conn) >= RESTART_FRAMES
                except Exception as exc:  # the next wake-up tries again; the data is safe in the WAL
                    log.warning("queue_checkpoint_failed", error_type=type(exc).__name__, error=str(exc))
                time.sleep(CHECKPOINT_PAUSE)
        finally:
            conn.close()


def checkpoint(conn: sqlite3.Connection) -> int:
    """A passive checkpoint on ``conn``; the frames the WAL held."""
    _, frames, _ = conn.execute(QUERIES["checkpoint"]).fetchone().values()
    return int(frames)


_Item = TypeVar("_Item")


def _take_waiting(
    inbox: queue.SimpleQueue[_Item | None], limit: int | None = None
) -> tuple[list[_Item], bool]:
    """Wait for one item, then take whatever else is already waiting (``limit`` at most); also
    whether the stop marker (None) came."""
    items: list[_Item] = []
    item = inbox.get()
    while item is not None:
        items.append(item)
        if limit is not None and len(items) >= limit:
            return items, False
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return items, False
    return items, True


def fsync_file(path: str) -> None:
    """Flush a file's written data to the disk (any descriptor of a file syncs all of it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # no WAL: nothing written since the last checkpoint removed it
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """The writer thread: runs submitted operations, committing each group of them at once."""

    def __init__(self, path: str, busy_timeout: float, max_batch: int, run_batch: BatchRunner) -> None:
        self._path = path
        self._run_batch = run_batch
        self._busy_timeout = busy_timeout
        self._max_batch = max_batch
        self._inbox: queue.SimpleQueue[Submitted | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._syncer: Syncer | None = None
        self._checkpointer: Checkpointer | None = None
        self._closing = False
        self.commits = 0
        self.writes = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        conn = await asyncio.to_thread(connect, self._path, self._busy_timeout, "configure_writer")
        try:
            checkpoints = await asyncio.to_thread(
                connect, self._path, self._busy_timeout, "configure_checkpointer"
            )
        except BaseException:
            conn.close()
            raise
        self._checkpointer = Checkpointer(checkpoints)
        self._syncer = Syncer(self._path + "-wal", self._checkpointer)
        self._thread = threading.Thread(target=self._main, args=(conn,), name="queue-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Let the thread commit everything submitted so far, then close the connection."""
        if self._thread is None:
            return
        self._closing = True
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)
        if self._syncer is not None:
            await asyncio.to_thread(self._syncer.stop)
            self._syncer = None
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None
        self._thread = None
        self._closing = False

    async def run(self, operation: Operation[T]) -> T:
        """Run ``operation`` in the next group commit; returns once it is durable."""
        result: T = await self._submit(operation)
        return result

    async def store(self, item: object) -> Any:
        """Hand ``item`` (an enqueue call of the queue) to the batch runner in the next group
        commit; returns what the runner made of it once it is durable."""
        return await self._submit(item)

    async def _submit(self, operation: Any) -> Any:
        if self._thread is None or self._closing:
            raise RuntimeError("the sqlite queue is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._inbox.put(Submitted(operation, future, loop))
        return await future

    def _main(self, conn: sqlite3.Connection) -> None:
        try:
            stopping = False
            while not stopping:
                batch, stopping = _take_waiting(self._inbox, self._max_batch)
                if batch:
                    self._commit(conn, batch)
        finally:
            conn.close()
            self._fail_leftovers()

    def _commit(self, conn: sqlite3.Connection, batch: list[Submitted]) -> None:
        try:
            conn.execute(QUERIES["begin"])
            outcomes = self._run_batch(conn, batch)
            conn.execute(QUERIES["commit"])
        except Exception as exc:  # the transaction failed as a whole: so did every operation in it
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(QUERIES["rollback"])
            _settle_all(batch, exc)
            return
        self.commits += 1
        self.writes += len(batch)
        assert self._syncer is not None and self._checkpointer is not None
        self._syncer.submit(batch, outcomes)  # reported once the WAL is synced
        if self._checkpointer.behind:
            self._checkpointer.behind = False
            with contextlib.suppress(sqlite3.Error):  # the checkpointer will say so again
                checkpoint(conn)

    def _fail_leftovers(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                _settle(item, None, RuntimeError("the sqlite queue is closed"))


def _settle_all(batch: list[Submitted], error: BaseException) -> None:
    _settle_batch(batch, [(None, error)] * len(batch))


def _settle_batch(batch: list[Submitted], outcomes: list[Outcome]) -> None:
    """Resolve the futures of a group commit: one wake-up per event loop, not one per operation."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Submitted, Any, BaseException | None]]] = {}
    for item, (result, error) in zip(batch, outcomes, strict=True):
        by_loop.setdefault(item.loop, []).append((item, result, error))

    for loop, settled in by_loop.items():

        def resolve(settled: list[tuple[Submitted, Any, BaseException | None]] = settled) -> None:
            for item, result, error in settled:
                _resolve(item, result, error)

        with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
            loop.call_soon_threadsafe(resolve)


def _resolve(item: Submitted, result: Any, error: BaseException | None) -> None:
    if item.future.done():  # the caller was cancelled; the write stands anyway
        return
    if error is None:
        item.future.set_result(result)
    else:
        item.future.set_exception(error)


def _settle(item: Submitted, result: Any, error: BaseException | None) -> None:
    _settle_batch([item], [(result, error)])


class Reader:
    """A read-only connection used from one thread of its own."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-reader")
        self._conn = await self._call(connect, self._path, self._busy_timeout, "configure_reader")

    async def stop(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def run(self, operation: Operation[T]) -> T:
        if self._conn is None:
            raise RuntimeError("the sqlite queue is not open")
        return await self._call(operation, self._conn)

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
