"""The real SDKs, unmodified, against the router on a loopback TCP port.

rudder-sdk-python (gzip on by default, Basic auth) and segment-analytics-python (writeKey in the
body and Basic auth, no gzip) each send the 1000-event benchmark mix (``tests/data/events-mix.json.gz``,
a trimmed copy of ``../shared/bench/events-mix.json``: the fields the SDK calls take, the context
without the browser details). Every event must be queued exactly once under the SDK's source; a
second run with the same messageIds adds nothing. The SDKs are synchronous with consumer threads:
they run in a worker thread while the server runs on the test's event loop, and are shut down
(flushed and joined) before the test ends.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import rudderstack.analytics.client as rudder_client
import rudderstack.analytics.request as rudder_request
import segment.analytics.client as segment_client
import segment.analytics.request as segment_request
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from sdk_replay import replay

from router.app import build_app
from router.destination import Destination
from router.queue import JobState, Queue, open_queue
from router.settings import Settings, Source

MIX = Path(__file__).parent / "data" / "events-mix.json.gz"
RUDDER_KEY = "wk_rudder_sdk_0123456789"
SEGMENT_KEY = "wk_segment_sdk_9876543210"


def load_mix() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = orjson.loads(gzip.decompress(MIX.read_bytes()))
    return events


def rudder(url: str, errors: list[str]) -> Any:
    return rudder_client.Client(
        RUDDER_KEY,
        host=url,
        upload_interval=0.05,
        max_retries=1,
        on_error=lambda exc, batch: errors.append(f"rudder: {exc}"),
    )


def segment(url: str, errors: list[str]) -> Any:
    return segment_client.Client(
        SEGMENT_KEY,
        host=url,
        upload_interval=0.05,
        max_retries=1,
        on_error=lambda exc, batch: errors.append(f"segment: {exc}"),
    )


@pytest.fixture(autouse=True)
def close_sdk_sessions() -> Iterator[None]:
    """The SDKs keep a module-level requests session; close its connections after each test."""
    yield
    rudder_request._session.close()
    segment_request._session.close()


@pytest.fixture
async def server(aiohttp_server: AiohttpServer, tmp_path: Path) -> tuple[TestServer, Queue]:
    """The router on 127.0.0.1 with one source per SDK, on SQLite."""
    settings = Settings(
        data_dir=tmp_path,
        min_free_disk_bytes=0,
        sources=(
            Source(name="rudder", write_key=RUDDER_KEY, destinations=("klaviyo",)),
            Source(name="segment", write_key=SEGMENT_KEY, destinations=("klaviyo",)),
        ),
        destinations=(Destination(name="klaviyo", private_key="pk_sdk_test_key"),),
    )
    queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    return await aiohttp_server(build_app(settings, queue)), queue


async def queued(queue: Queue, source: str) -> list[str]:
    jobs = await queue.list_jobs(JobState.PENDING, limit=10_000)
    return [job.message_id for job in jobs if job.source == source]


class TestSdkClients:
    """Both SDKs at once: each one's 1000 events are queued exactly once, under its own source."""

    async def test_mix_delivered_once(self, server: tuple[TestServer, Queue]) -> None:
        """2 x 1000 events in, 2 x 1000 jobs with the mix's messageIds; the same again adds nothing."""
        test_server, queue = server
        url = str(test_server.make_url("")).rstrip("/")
        events = load_mix()
        expected = sorted(event["messageId"] for event in events)
        for _ in range(2):
            errors: list[str] = []
            clients = [rudder(url, errors), segment(url, errors)]
            await asyncio.gather(*(asyncio.to_thread(replay, client, events) for client in clients))
            assert errors == []
            assert not any(consumer.is_alive() for client in clients for consumer in client.consumers)
            assert sorted(await queued(queue, "rudder")) == expected
            assert sorted(await queued(queue, "segment")) == expected
            assert len(await queue.list_jobs(JobState.PENDING, limit=10_000)) == 2 * len(events)
        for job in await queue.list_jobs(JobState.PENDING, limit=10_000):
            message = job.message()
            assert message["context"]["library"]["name"] == "analytics-python"
            assert "writeKey" not in message and message["receivedAt"].endswith("Z")
