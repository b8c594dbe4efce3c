"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from postgres_server import create_database, drop_database, empty_tables, session_database, unique_name
from pytest_aiohttp import AiohttpServer

from router.fake_klaviyo import FakeKlaviyoServer, ManualClock, build_fake_app, fake_of
from router.logs import reset_logging
from router.queue import Queue, QueueOptions, open_queue

#: Every queue backend (``postgresql``: a database of this test session, see :func:`postgres_url`).
QUEUE_BACKENDS = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(autouse=True)
def default_logging() -> Iterator[None]:
    """Each test ends with structlog's defaults again: a command a test runs in-process
    (``main([...])``) configures logging onto that test's captured stdout, which is closed after
    it, and a later test logging there would fail."""
    yield
    reset_logging()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of a PostgreSQL database created for this test session and dropped after it.

    On the server ``KLAVIYO_ROUTER_TEST_POSTGRES_DSN`` names (default: the local one as ``postgres``);
    a server that cannot be reached fails the tests that need it (deselect them with
    ``-m "not postgres"``).
    """
    with session_database() as url:
        yield url


@pytest.fixture
async def fresh_postgres_url() -> AsyncIterator[str]:
    """The URL of a database of its own on the test server, without any table, dropped afterwards."""
    name = unique_name("fresh")
    yield await create_database(name)
    await drop_database(name)


@pytest.fixture
def no_router_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test's config (and what the test sets) only, not from the
    ``KLAVIYO_ROUTER_*`` variables of the shell running the tests."""
    for name in list(os.environ):
        if name.startswith("KLAVIYO_ROUTER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def queue_options() -> QueueOptions:
    """Options for the ``queue`` fixture; override with ``@pytest.mark.parametrize("queue_options", ...)``."""
    return QueueOptions()


@pytest.fixture(params=QUEUE_BACKENDS)
async def queue(
    request: pytest.FixtureRequest, tmp_path: Path, queue_options: QueueOptions
) -> AsyncIterator[Queue]:
    """An empty, open queue of each backend in turn."""
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'queue.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    backend = open_queue(url, queue_options)
    await backend.open()
    if request.param == "postgresql":
        await empty_tables(url)
    try:
        yield backend
    finally:
        await backend.close()


#: The private key the ``fake_klaviyo`` fixture accepts.
FAKE_KLAVIYO_KEY = "pk_test_0123456789abcdef"


@pytest.fixture
async def fake_klaviyo(aiohttp_server: AiohttpServer) -> FakeKlaviyoServer:
    """A running fake Klaviyo with rate limits on a manual clock (advance it with ``clock.advance``)."""
    clock = ManualClock()
    app = build_fake_app(api_keys=[FAKE_KLAVIYO_KEY], clock=clock)
    server = await aiohttp_server(app)
    return FakeKlaviyoServer(str(server.make_url("")).rstrip("/"), fake_of(app), clock, FAKE_KLAVIYO_KEY)
