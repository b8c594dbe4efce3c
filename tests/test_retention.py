"""Retention while the router runs (:mod:`router.retention`): ``serve`` and ``work`` delete the done
jobs past ``[queue] retention`` and the dedupe entries past ``dedupe_window``, again every
``cleanup_interval``, in chunks that ingest commits between."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from processes import Child, child, eventually
from pytest_aiohttp import AiohttpClient

from router.app import build_app
from router.destination import Destination
from router.queue import JobState, NewJob, QueueOptions
from router.queue.sqlite import SqliteQueue
from router.settings import Settings, Source

WRITE_KEY = "wk_retention_0123456789"
CONFIG = """
data_dir = "{folder}"
[server]
host = "127.0.0.1"
port = 0
[queue]
url = "sqlite:///{folder}/queue.db"
retention = 100
dedupe_window = 100
cleanup_interval = 0.2
[limits]
min_free_disk_bytes = 0
[delivery]
workers = {workers}
[[sources]]
name = "web"
write_key = "{write_key}"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "pk_retention_0123456789"
base_url = "http://127.0.0.1:9"  # nothing is pending: delivery never sends
"""
HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}


async def delivered(queue: SqliteQueue, message_id: str, at: float) -> None:
    """``message_id`` enqueued, claimed and acked at ``at`` (its dedupe entry seen then too), for a
    destination no worker of the router delivers (so that this claim finds the job)."""
    job = NewJob(
        source="web", destination="elsewhere", message_id=message_id, ordering_key=None, payload=b"{}"
    )
    await queue.enqueue([job], now=at)
    [claimed] = await queue.claim("elsewhere", 10, lease_seconds=60, now=at)
    await queue.ack([claimed.id], now=at)


def kept(path: Path) -> tuple[list[str], list[str]]:
    """The message ids of the done jobs and of the dedupe entries in the queue file."""
    with sqlite3.connect(path) as conn:
        jobs = [
            r[0] for r in conn.execute("SELECT message_id FROM queue_jobs WHERE state = 'done' ORDER BY id")
        ]
        seen = [r[0] for r in conn.execute("SELECT message_id FROM queue_dedupe ORDER BY message_id")]
    conn.close()
    return jobs, seen


def cleaned_rows(router: Child) -> list[int]:
    """The rows of each ``queue_cleaned`` line the router logged."""
    lines = [orjson.loads(line) for line in router.log.read_bytes().splitlines() if line.startswith(b"{")]
    return [line["rows"] for line in lines if line["event"] == "queue_cleaned"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("command", ["serve", "work"])
async def test_serve_and_work_delete_what_retention_lets_go_while_they_run(
    tmp_path: Path, command: str
) -> None:
    """Done jobs and dedupe entries older than their windows go at start and again every interval;
    younger ones stay, and a message seen inside the window still counts as a duplicate."""
    path = tmp_path / "queue.db"
    config = tmp_path / "router.toml"
    config.write_text(
        CONFIG.format(folder=tmp_path, workers=0 if command == "serve" else 1, write_key=WRITE_KEY)
    )
    queue = SqliteQueue(path)
    await queue.open()
    try:
        now = time.time()
        await delivered(queue, "old", now - 1000)
        await delivered(queue, "recent", now)
        announces = r"listening on (\S+)" if command == "serve" else ""
        async with child(
            command, [command, "--config", str(config)], tmp_path, announces=announces
        ) as router:
            await eventually(
                lambda: asyncio.to_thread(kept, path),
                lambda found: found == (["recent"], ["recent"]),
                within=30,
                what="done jobs and dedupe entries",
            )
            # later, while it runs: another delivered past retention goes at the next interval
            await delivered(queue, "later", time.time() - 1000)
            await eventually(
                lambda: asyncio.to_thread(kept, path),
                lambda found: found == (["recent"], ["recent"]),
                within=30,
                what="done jobs and dedupe entries after a later delivery",
            )
            rows = await eventually(  # the run ends after the rows are gone: logged, then counted
                lambda: asyncio.to_thread(cleaned_rows, router),
                lambda rows: sum(rows) == 4,
                within=30,
                what="rows of the queue_cleaned lines",
            )
            if command == "serve":
                async with aiohttp.ClientSession(headers=HEADERS) as session:
                    event = {"type": "track", "userId": "u1", "event": "Seen", "messageId": "recent"}
                    async with session.post(f"{router.url}/v1/track", json=event) as response:
                        assert (response.status, (await response.json())["duplicates"]) == (200, 1)
                    async with session.get(f"{router.url}/metrics") as response:
                        metrics = await response.text()
                assert "router_queue_cleaned_rows_total 4.0" in metrics
            assert await router.stop() == 0
    finally:
        await queue.close()
    assert rows[0] == 2  # the old job and its dedupe entry, at start; then later's two


async def test_a_cleanup_does_not_hold_up_ingest(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    """The cleanup that starts with the app deletes 20 000 done jobs, 50 per transaction: an ingest
    request made meanwhile commits between two chunks, long before the cleanup ends."""
    path = tmp_path / "queue.db"
    queue = SqliteQueue(path, QueueOptions(retention=100), cleanup_batch=50)
    await queue.open()  # makes the schema
    await queue.close()
    old = time.time() - 1000
    with sqlite3.connect(path) as conn:
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
            "INSERT INTO queue_jobs (source, destination, message_id, state, next_attempt_at, created_at, updated_at) "
            "SELECT 'web', 'klaviyo', 'old-' || i, 'done', ?1, ?1, ?1 FROM n",
            (old,),
        )
        conn.execute("INSERT INTO queue_payloads (job_id, payload) SELECT id, '{}' FROM queue_jobs")
    conn.close()
    settings = Settings(
        data_dir=tmp_path,
        min_free_disk_bytes=0,
        sources=(Source(name="web", write_key=WRITE_KEY, destinations=("klaviyo",)),),
        destinations=(Destination(name="klaviyo", private_key="pk_retention_0123456789"),),
        cleanup_interval=3600,
    )
    with structlog.testing.capture_logs() as logs:

        async def cleaned() -> list[MutableMapping[str, Any]]:
            return [line for line in logs if line["event"] == "queue_cleaned"]

        client = await aiohttp_client(build_app(settings, queue))
        await eventually(queue.counts, lambda c: c[JobState.DONE] < 20000, within=30, what="jobs per state")
        event = {"type": "track", "userId": "u1", "event": "Seen", "messageId": "new"}
        response = await client.post("/v1/track", json=event, headers=HEADERS)
        assert response.status == 200
        left = (await queue.counts())[JobState.DONE]
        assert left > 0, "the cleanup had ended before ingest could commit"
        await eventually(queue.counts, lambda c: c[JobState.DONE] == 0, within=60, what="jobs per state")
        [line] = await eventually(cleaned, bool, within=10, what="queue_cleaned lines")
    assert line["rows"] == 20000 and isinstance(line["seconds"], float)
    assert (await queue.counts())[JobState.PENDING] == 1
