"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpServer

from router.fake_klaviyo import FakeKlaviyoServer, ManualClock, build_fake_app, fake_of
from router.queue import Queue, QueueOptions, open_queue
from router.queue.memory import MemoryQueue

#: Every queue backend; ``postgresql`` runs only when a test server is configured.
QUEUE_BACKENDS = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


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
        url = os.environ.get("KLAVIYO_ROUTER_TEST_POSTGRES_DSN", "")
        if not url:
            pytest.skip("KLAVIYO_ROUTER_TEST_POSTGRES_DSN is not set")
    backend = open_queue(url, queue_options)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def memory_queue() -> AsyncIterator[MemoryQueue]:
    """An open in-memory queue."""
    backend = MemoryQueue()
    await backend.open()
    yield backend
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
