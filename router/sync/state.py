"""What a sync remembers between runs, in the queue's database: SQLite (default) or PostgreSQL.

Per sync and key (``email:...``): the checksum of what was last sent and acknowledged, its status
(``sent`` or ``failed`` with the error), the Klaviyo profile id once learnt, whether this sync made
it a member of its list, the last run that saw it and how many runs it has been absent. Besides:
the import jobs Klaviyo accepted until their end is known (a killed run's jobs are followed by the
next run), the list each sync sends to, and the run history (``sync-runs``).

Tables are the sync's own (``sync_*``) beside the queue's, migrated by their own version number
(``sync_schema``). Queries are in ``sql/sqlite.sql`` and ``sql/postgres.sql``; a batch of keys
travels as one JSON array parameter, so each step costs one statement per batch of rows.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import orjson

from router.errors import ConfigError
from router.queue import sql as sql_files
from router.queue import sqlite_path

#: Positional order of each query's parameters (the PostgreSQL file's ``$1``, ``$2``, ...).
PARAMS: Final[Mapping[str, tuple[str, ...]]] = {
    "seen_table": (),
    "seen_clear": (),
    "changed": ("sync", "rows", "membership"),
    "seen_before": ("keys",),
    "mark_seen": ("keys",),
    "record_sent": ("sync", "run", "job", "now", "entries"),
    "record_failed": ("sync", "run", "now", "entries"),
    "refuse_job_items": ("job", "now", "refused"),
    "confirm_job": ("job", "member"),
    "add_job": ("job", "sync", "run", "items", "list_id", "now"),
    "finish_job": ("job", "now"),
    "open_jobs": ("sync",),
    "count_members": ("sync",),
    "count_leaving": ("sync", "grace"),
    "leaving": ("sync", "grace", "after", "limit"),
    "note_absent": ("sync",),
    "set_profile_ids": ("sync", "ids"),
    "record_removed": ("sync", "now", "keys"),
    "start_run": ("sync", "now", "details"),
    "running": ("sync",),
    "interrupt_runs": ("sync",),
    "heartbeat": ("run", "now"),
    "finish_run": ("run", "status", "now", "summary"),
    "runs": ("sync", "limit"),
    "get_list": ("sync",),
    "set_list": ("sync", "list_name", "list_id"),
    "reset_members": ("sync",),
}
#: A run whose heartbeat is older than this is taken for dead (its process was killed).
STALE_SECONDS: Final = 120.0


@dataclass(frozen=True, slots=True)
class Changed:
    """A row to send: whether the state knows its key (an update, else a create), and whether it is
    a member of the sync's list already."""

    known: bool
    member: bool


@dataclass(frozen=True, slots=True)
class OpenJob:
    job_id: str
    items: int
    list_id: str | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run, for ``sync-runs``."""

    id: int
    sync: str
    started_at: float
    finished_at: float | None
    status: str
    details: dict[str, Any]
    summary: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sync": self.sync,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "status": self.status,
            **self.details,
            "summary": self.summary,
        }


class AlreadyRunning(Exception):
    """Another run of the same sync is going on (its heartbeat is fresh)."""


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


class SyncState:
    """The sync's tables: every operation is one named query of the dialect's SQL file."""

    dialect = ""

    def __init__(self) -> None:
        self.queries = _queries(self.dialect)

    async def open(self) -> None:
        """Connect and migrate."""

    async def close(self) -> None:
        """Release the connection."""

    async def _rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def _run(self, name: str, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    # -- keys ------------------------------------------------------------------------------------------

    async def see(
        self, sync: str, rows: Sequence[tuple[str, str]], *, membership: bool
    ) -> tuple[dict[str, Changed], set[str]]:
        """Which of a batch of rows (key, checksum) must be sent, and which keys this run saw before
        (duplicates).

        A row must be sent when its key is new, its checksum differs from what was sent, it failed
        before, or (``membership``: the sync has a list) it is not a member yet; the unchanged rows
        are left out by the database, in one statement. The keys are remembered as seen for the rest
        of the run (in a temporary table of the state's connection: nothing is written for the keys
        that did not change), which keeps them out of the run's removals.
        """
        if not rows:
            return {}, set()
        keys = _json([key for key, _ in rows])
        before = {row[0] for row in await self._rows("seen_before", {"keys": keys})}
        found = await self._rows("changed", {"sync": sync, "rows": _json(rows), "membership": membership})
        await self._run("mark_seen", {"keys": keys})
        return {row[0]: Changed(bool(row[1]), bool(row[2])) for row in found}, before

    async def record_sent(
        self, sync: str, run: int, job: str, entries: Sequence[tuple[str, str, int]]
    ) -> None:
        """``entries``: (key, checksum, item index in the job) of a job Klaviyo accepted."""
        await self._run(
            "record_sent",
            {"sync": sync, "run": run, "job": job, "now": time.time(), "entries": _json(entries)},
        )

    async def record_failed(self, sync: str, run: int, entries: Sequence[tuple[str, str]]) -> None:
        """``entries``: (key, error) of rows that could not be sent."""
        if entries:
            await self._run(
                "record_failed", {"sync": sync, "run": run, "now": time.time(), "entries": _json(entries)}
            )

    async def finish_job(self, job: str, refused: Mapping[int, str], *, member: bool) -> dict[int, str]:
        """A job's end: refused items fail (their keys by index), the others are members with a list."""
        keys: dict[int, str] = {}
        if refused:
            rows = await self._rows(
                "refuse_job_items",
                {"job": job, "now": time.time(), "refused": _json([[i, e] for i, e in refused.items()])},
            )
            keys = {int(row[1]): row[0] for row in rows}
        await self._run("confirm_job", {"job": job, "member": member})
        await self._run("finish_job", {"job": job, "now": time.time()})
        return keys

    async def add_job(self, sync: str, run: int, job: str, items: int, list_id: str | None) -> None:
        await self._run(
            "add_job",
            {"job": job, "sync": sync, "run": run, "items": items, "list_id": list_id, "now": time.time()},
        )

    async def open_jobs(self, sync: str) -> list[OpenJob]:
        return [OpenJob(row[0], int(row[1]), row[2]) for row in await self._rows("open_jobs", {"sync": sync})]

    # -- membership -----------------------------------------------------------------------------------

    async def count_members(self, sync: str) -> int:
        return int((await self._rows("count_members", {"sync": sync}))[0][0])

    async def count_leaving(self, sync: str, grace: int) -> int:
        """Members the run did not see (so far) that were absent ``grace`` runs before."""
        rows = await self._rows("count_leaving", {"sync": sync, "grace": grace})
        return int(rows[0][0])

    async def leaving(
        self, sync: str, grace: int, *, after: str = "", limit: int = 1000
    ) -> list[tuple[str, str | None]]:
        """A page of those members: (key, profile id if known), by key after ``after``."""
        params = {"sync": sync, "grace": grace, "after": after, "limit": limit}
        return [(row[0], row[1]) for row in await self._rows("leaving", params)]

    async def note_absent(self, sync: str) -> None:
        """The run's end: members it did not see count one more absence, those it saw none."""
        await self._run("note_absent", {"sync": sync})

    async def set_profile_ids(self, sync: str, ids: Mapping[str, str]) -> None:
        if ids:
            await self._run("set_profile_ids", {"sync": sync, "ids": _json(list(ids.items()))})

    async def record_removed(self, sync: str, keys: Iterable[str]) -> None:
        await self._run("record_removed", {"sync": sync, "now": time.time(), "keys": _json(list(keys))})

    # -- runs and lists -------------------------------------------------------------------------------

    async def start_run(self, sync: str, details: Mapping[str, Any], *, stale: float = STALE_SECONDS) -> int:
        """A new run; :class:`AlreadyRunning` while another run of the sync goes on.

        A run marked running is over when its heartbeat is older than ``stale`` or, on this
        machine, when its process is gone (a killed run is resumed at once, not after ``stale``).
        """
        running = await self._rows("running", {"sync": sync})
        if running and time.time() - float(running[0][1]) < stale and _alive(orjson.loads(running[0][2])):
            raise AlreadyRunning(f"sync {sync!r} is already running (run {running[0][0]})")
        await self._run("interrupt_runs", {"sync": sync})
        await self._run("seen_table", {})
        await self._run("seen_clear", {})
        owner = {"host": socket.gethostname(), "pid": os.getpid()}
        rows = await self._rows(
            "start_run", {"sync": sync, "now": time.time(), "details": _json({**details, **owner})}
        )
        return int(rows[0][0])

    async def heartbeat(self, run: int) -> None:
        await self._run("heartbeat", {"run": run, "now": time.time()})

    async def finish_run(self, run: int, status: str, summary: Mapping[str, Any]) -> None:
        await self._run(
            "finish_run", {"run": run, "status": status, "now": time.time(), "summary": _json(summary)}
        )

    async def runs(self, sync: str | None = None, limit: int = 20) -> list[RunRecord]:
        rows = await self._rows("runs", {"sync": sync, "limit": limit})
        return [
            RunRecord(
                int(row[0]),
                row[1],
                float(row[2]),
                None if row[3] is None else float(row[3]),
                row[4],
                orjson.loads(row[5]),
                None if row[6] is None else orjson.loads(row[6]),
            )
            for row in rows
        ]

    async def get_list(self, sync: str) -> tuple[str, str] | None:
        rows = await self._rows("get_list", {"sync": sync})
        return (rows[0][0], rows[0][1]) if rows else None

    async def set_list(self, sync: str, list_name: str, list_id: str) -> None:
        """Remember the sync's list; a list of another id than before starts without members."""
        known = await self.get_list(sync)
        if known is not None and known[1] != list_id:
            await self._run("reset_members", {"sync": sync})
        await self._run("set_list", {"sync": sync, "list_name": list_name, "list_id": list_id})


def _alive(details: Mapping[str, Any]) -> bool:
    """Whether the process of a run may still be going (another machine's: assume so)."""
    if details.get("host") != socket.gethostname() or not isinstance(details.get("pid"), int):
        return True
    try:
        os.kill(details["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _queries(dialect: str) -> dict[str, str]:
    text = resources.files("router.sync.sql").joinpath(f"{dialect}.sql").read_text(encoding="utf-8")
    return sql_files.parse(text)


class SqliteSyncState(SyncState):
    """The sync's tables in the queue's SQLite file, on one thread of their own.

    Writes take SQLite's write lock for one short statement at a time, beside the queue's writer
    (the busy timeout waits for it); the file is in WAL mode, so readers never wait.
    """

    dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout: float = 30.0) -> None:
        super().__init__()
        self.path = path
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        if self.path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS sync_schema (version INTEGER NOT NULL)")
            if db.execute("SELECT count(*) FROM sync_schema").fetchone()[0] == 0:
                db.execute("INSERT INTO sync_schema (version) VALUES (0)")
            version = db.execute("SELECT version FROM sync_schema").fetchone()[0]
            for number, script in sql_files.migrations(self.queries):
                if number > version:
                    for statement in _statements(script):
                        db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    def _call(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        assert self._db is not None, "open() the state first"
        with self._lock:
            return self._db.execute(self.queries[name], dict(params)).fetchall()

    async def _rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._call, name, params)

    async def _run(self, name: str, params: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self._call, name, params)


def _statements(script: str) -> list[str]:
    """A migration's statements (they hold no ``;`` inside literals)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]


class PostgresSyncState(SyncState):
    """The sync's tables in the queue's PostgreSQL database (asyncpg)."""

    dialect = "postgres"
    #: ``pg_advisory_xact_lock`` key serialising migrations of the sync's tables.
    MIGRATION_LOCK = 0x73796E63

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import asyncpg
        except ModuleNotFoundError:
            raise ConfigError(
                "queue.url: PostgreSQL needs asyncpg (pip install 'klaviyo-router[postgres]')"
            ) from None
        self._asyncpg = asyncpg
        self._url = url
        self._pool: Any = None

    async def open(self) -> None:
        # one connection: the run's seen keys are in a temporary table, which is the connection's own
        self._pool = await self._asyncpg.create_pool(self._url, min_size=1, max_size=1)
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", self.MIGRATION_LOCK)
            await connection.execute("CREATE TABLE IF NOT EXISTS sync_schema (version INTEGER NOT NULL)")
            if await connection.fetchval("SELECT count(*) FROM sync_schema") == 0:
                await connection.execute("INSERT INTO sync_schema (version) VALUES (0)")
            version = await connection.fetchval("SELECT version FROM sync_schema")
            for number, script in sql_files.migrations(self.queries):
                if number > version:
                    await connection.execute(script)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _args(self, name: str, params: Mapping[str, Any]) -> list[Any]:
        return [params[key] for key in PARAMS[name]]

    async def _rows(self, name: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        records = await self._pool.fetch(self.queries[name], *self._args(name, params))
        return [tuple(record) for record in records]

    async def _run(self, name: str, params: Mapping[str, Any]) -> None:
        await self._pool.execute(self.queries[name], *self._args(name, params))


def open_state(queue_url: str) -> SyncState:
    """The state store beside the queue named by ``queue_url`` (``memory://``: a private SQLite)."""
    scheme = queue_url.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return PostgresSyncState(queue_url)
    if scheme == "memory":
        return SqliteSyncState(":memory:")
    return SqliteSyncState(sqlite_path(queue_url))
