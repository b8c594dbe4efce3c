"""The PostgreSQL server the tests use: a database per test session, and ways to take it away.

The server is shared with other users of the machine: the tests never stop or restart it. They
create a uniquely named database (dropped at the end, with its connections), empty its tables
between tests, cut the routers' connections by terminating that database's server processes, or
put a :class:`CuttableProxy` between the routers and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

#: The server's maintenance database, where test databases are created and dropped.
SERVER_ENV = "KLAVIYO_ROUTER_TEST_POSTGRES_DSN"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES = "queue_jobs, queue_dedupe, queue_keys, ratelimit_buckets, ratelimit_slots"


def server_url() -> str:
    return os.environ.get(SERVER_ENV) or DEFAULT_SERVER


def database_url(name: str) -> str:
    """The server's URL with ``name`` as the database."""
    return urlunsplit(urlsplit(server_url())._replace(path=f"/{name}"))


async def create_database(name: str) -> str:
    """Create database ``name`` on the test server; its URL."""
    try:
        conn = await asyncpg.connect(server_url(), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"the PostgreSQL test server at {urlsplit(server_url()).netloc} cannot be reached "
            f"({type(exc).__name__}: {exc}); start it, point {SERVER_ENV} at one, "
            'or deselect these tests with -m "not postgres"',
            pytrace=False,
        )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(name)


async def drop_database(name: str) -> None:
    """Drop database ``name``, closing whatever connections it still has."""
    conn = await asyncpg.connect(server_url(), timeout=5)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def unique_name(purpose: str) -> str:
    return f"router_{purpose}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def session_database() -> Iterator[str]:
    """A database for this test session (created now, dropped on the way out); its URL.

    Runs on a thread of its own, as it may be set up from inside a test's event loop."""
    name = unique_name("test")
    with ThreadPoolExecutor(max_workers=1) as thread:
        url = thread.submit(lambda: asyncio.run(create_database(name))).result()
    try:
        yield url
    finally:
        with ThreadPoolExecutor(max_workers=1) as thread:
            thread.submit(lambda: asyncio.run(drop_database(name))).result()


async def empty_tables(url: str) -> None:
    """Empty the queue's tables and restart job ids at 1 (the schema stays)."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")
        await conn.execute("UPDATE queue_depth SET active = 0")
    finally:
        await conn.close()


async def terminate_connections(url: str) -> int:
    """End every server process connected to ``url``'s database (but this one); how many."""
    database = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(server_url(), timeout=5)
    try:
        ended: int = await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()) AS ended",
            database,
        )
    finally:
        await conn.close()
    return ended


class CuttableProxy:
    """A TCP proxy on loopback between clients and the PostgreSQL server, which a test can cut
    (every connection closed, new ones refused by closing them at once) and restore."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, database_url: str) -> str:
        """``database_url`` reached through the proxy."""
        parts = urlsplit(database_url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def sever(self) -> None:
        """Close every connection and refuse new ones until :meth:`restore`."""
        self.cut = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.cut = False

    def severed(self) -> bool:
        return self.cut

    async def stop(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if self.severed():  # cut while this connection was being made
            writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self._links.update((writer, upstream_writer))
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer), return_exceptions=True
        )
        for end in (writer, upstream_writer):
            self._links.discard(end)
            end.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
