"""What ``/ready`` reports beyond the queue's reachability: stalled destinations (:class:`Stalls`),
through the real app (:func:`router.app.build_app`) over loopback; what backpressure samples."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
from postgres_server import CuttableProxy
from pytest_aiohttp import AiohttpClient

from router.app import build_app
from router.destination import Destination
from router.health import Backpressure, Outage, Stalls
from router.metrics import Metrics
from router.queue import JobState, NewJob
from router.queue.memory import MemoryQueue
from router.queue.postgres import PostgresQueue
from router.settings import Settings, Source

WRITE_KEY = "wk_health_0123456789"


def settings_in(data_dir: Path, **changes: Any) -> Settings:
    """One source and one destination, data in ``data_dir``, no disk limit, and ``changes``."""
    return Settings(
        data_dir=data_dir,
        min_free_disk_bytes=0,
        sources=(Source(name="web", write_key=WRITE_KEY, destinations=("klaviyo",)),),
        destinations=(Destination(name="klaviyo", private_key="pk_health"),),
        **changes,
    )


def job(message_id: str, key: str | None = None) -> NewJob:
    return NewJob(source="web", destination="klaviyo", message_id=message_id, ordering_key=key, payload=b"{}")


async def test_ready_reports_a_destination_whose_oldest_job_does_not_move(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A job leased by a worker that never settles it (a loop that keeps failing, a hung worker):
    after ``stall_after`` the destination is reported stalled, and no longer once it moved on."""
    settings = settings_in(tmp_path, delivery_stall_after=0.3)
    queue = MemoryQueue()
    client = await aiohttp_client(build_app(settings, queue, sample_interval=0.02))
    await queue.enqueue([job("m1"), job("m2")])
    [held] = await queue.claim("klaviyo", 1, lease_seconds=600)
    assert (await client.get("/ready")).status == 200
    deadline = time.monotonic() + 10
    while (response := await client.get("/ready")).status == 200:
        assert time.monotonic() < deadline, "never reported stalled"
        await asyncio.sleep(0.02)
    body = await response.json()
    assert response.status == 503
    [problem] = body["problems"]
    assert problem.startswith(f"destination klaviyo stalled: job {held.id} is its oldest due job for ")
    assert problem.endswith("s (stall_after 0.3 s)")
    assert list(body["stalled"]) == ["klaviyo"]

    await queue.ack([held.id])  # it moved: the next one is due now
    deadline = time.monotonic() + 10
    while (await client.get("/ready")).status != 200:
        assert time.monotonic() < deadline, "still stalled"
        await asyncio.sleep(0.02)


async def test_a_draining_backlog_is_not_stalled_and_stall_after_0_turns_it_off() -> None:
    now = [0.0]
    queue = MemoryQueue()
    await queue.open()
    await queue.enqueue([job(f"m{n}") for n in range(3)])
    stalls = Stalls(queue, ["klaviyo"], stall_after=10, clock=lambda: now[0])
    for step in range(3):  # the oldest due job changes at every sample: no stall however long
        await stalls.refresh()
        [claimed] = await queue.claim("klaviyo", 1, lease_seconds=60)
        await queue.ack([claimed.id])
        now[0] += 8
        await stalls.refresh()
        assert stalls.stalled() == {}, step
    with structlog.testing.capture_logs() as logs:
        await queue.enqueue([job("m9")])
        await stalls.refresh()
        now[0] += 10
        await stalls.refresh()
        await stalls.refresh()
    assert list(stalls.stalled()) == ["klaviyo"]
    assert [entry["event"] for entry in logs] == ["destination_stalled"]  # once
    off = Stalls(queue, ["klaviyo"], stall_after=0, clock=lambda: now[0])
    await off.refresh()
    now[0] += 1e9
    assert off.stalled() == {}


class _NoCounting(MemoryQueue):
    """A queue that refuses a count of every job it keeps (what a sampler must not ask)."""

    async def counts(self, destination: str | None = None) -> dict[JobState, int]:
        raise AssertionError("a backpressure sample counted every job kept")


async def test_backpressure_samples_the_depth_the_queue_keeps_not_a_count(tmp_path: Path) -> None:
    """A sample reads the queue's counter of active jobs (Queue.depth): a count of every job would
    grow with the done jobs kept for retention. Done jobs are not part of the depth."""
    queue = _NoCounting()
    await queue.open()
    await queue.enqueue([job("m1"), job("m2"), job("m3")])
    [delivered] = await queue.claim("klaviyo", 1, lease_seconds=600)
    await queue.ack([delivered.id])
    metrics = Metrics()
    pressure = Backpressure(
        queue, data_dir=tmp_path, max_queue_depth=2, min_free_disk_bytes=0, metrics=metrics
    )
    await pressure.refresh()
    assert pressure.depth == 2
    assert pressure.overloaded() == "the queue holds 2 jobs, at its limit of 2 (max_queue_depth)"
    assert metrics.registry.get_sample_value("router_queue_depth") == 2


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_one_line_when_it_starts_a_summary_a_minute_and_one_when_it_ends() -> None:
    """131 failures over 130 s: the first is logged with its error, then a summary every 60 s of
    those since, then one line at the first success; a later failure starts a new outage."""
    clock = _Clock()
    outage = Outage("queue_write", clock=clock)
    with structlog.testing.capture_logs() as logs:
        for second in range(131):
            clock.now = 1000.0 + second
            outage.failed(ConnectionRefusedError(f"attempt {second}"))
        assert outage.failing
        clock.now += 0.5
        outage.succeeded()
        outage.succeeded()
        outage.failed(TimeoutError("again"))
    assert logs == [
        {"event": "queue_write_failed", "log_level": "error", "error": "ConnectionRefusedError: attempt 0"},
        {
            "event": "queue_write_failing",
            "log_level": "error",
            "failures": 60,
            "since_seconds": 60,
            "last_error": "ConnectionRefusedError: attempt 60",
        },
        {
            "event": "queue_write_failing",
            "log_level": "error",
            "failures": 60,
            "since_seconds": 120,
            "last_error": "ConnectionRefusedError: attempt 120",
        },
        {"event": "queue_write_recovered", "log_level": "info", "seconds": 130.5, "failures": 131},
        {"event": "queue_write_failed", "log_level": "error", "error": "TimeoutError: again"},
    ]


@pytest.mark.postgres
async def test_ingest_logs_a_database_outage_once_not_per_request(
    aiohttp_client: AiohttpClient, tmp_path: Path, postgres_url: str
) -> None:
    """PostgreSQL out of reach (a cut proxy): every request gets 503, and the log has one
    queue_write_failed line for all of them, then one queue_write_recovered once a write succeeds."""
    target = urlsplit(postgres_url)
    proxy = CuttableProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    queue = PostgresQueue(proxy.url(postgres_url), connect_timeout=2.0)
    settings = settings_in(tmp_path, delivery_workers=0)
    headers = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}

    async def send(message_id: str) -> int:
        event = {"type": "track", "userId": "u1", "event": "Seen", "messageId": message_id}
        return (await client.post("/v1/track", json=event, headers=headers)).status

    try:
        with structlog.testing.capture_logs() as logs:
            client = await aiohttp_client(build_app(settings, queue))
            assert await send(f"{uuid.uuid4()}") == 200
            proxy.sever()
            assert [await send(f"{uuid.uuid4()}") for _ in range(20)] == [503] * 20
            proxy.restore()
            deadline = time.monotonic() + 10
            while await send(f"{uuid.uuid4()}") != 200:
                assert time.monotonic() < deadline, "the queue never took a write again"
        lines = [line for line in logs if line["event"].startswith("queue_write")]
        assert [line["event"] for line in lines] == ["queue_write_failed", "queue_write_recovered"]
        assert lines[0]["log_level"] == "error" and "unreachable" in lines[0]["error"]
        assert lines[1]["failures"] >= 20
    finally:
        await proxy.stop()
