"""The cluster's rate limits: SharedWindow pacers of several processes (each a PostgreSQL queue with its
own pool) keep one endpoint's limits together, in real time, and a 429 seen by one stops them all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from postgres_server import empty_tables

from router.klaviyo.ratelimit import RateLimits
from router.klaviyo.shared_ratelimit import MARGIN, SharedWindow, shared_pacers
from router.klaviyo.spec import endpoint_by_operation
from router.queue.memory import MemoryQueue
from router.queue.postgres import PostgresQueue

pytestmark = pytest.mark.postgres


@pytest.fixture
async def budgets(postgres_url: str) -> AsyncIterator[list[PostgresQueue]]:
    """Three processes' queues on one database, its send budgets empty."""
    queues = [PostgresQueue(postgres_url) for _ in range(3)]
    for queue in queues:
        await queue.open()
    await empty_tables(postgres_url)
    yield queues
    for queue in queues:
        await queue.close()


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


async def test_windows_of_several_processes_keep_the_limit_together(budgets: list[PostgresQueue]) -> None:
    windows = [SharedWindow(queue, "klaviyo/create_event", 4, 100) for queue in budgets]
    sent: list[float] = []

    async def send(window: SharedWindow, count: int) -> None:
        for _ in range(count):
            await window.acquire()
            sent.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(send(window, 4) for window in windows))
    # 12 sends at 4 a second: 0, 1 + m, 2 + 2m seconds; never 5 in one second
    assert most_in_one_second(sent) == 4
    assert 2.0 < time.monotonic() - started < 3.0


async def test_a_429_in_one_process_holds_every_process_back(budgets: list[PostgresQueue]) -> None:
    first, second = (SharedWindow(queue, "klaviyo/create_event", 10, 100) for queue in budgets[:2])
    await first.acquire()
    first.observe({"Retry-After": "1"}, 429)
    started = time.monotonic()
    assert await first.acquire() >= 0.9  # its own process stops at once
    assert await second.acquire() == pytest.approx(0.0, abs=0.1)  # the block had passed meanwhile
    second.observe({"RateLimit-Remaining": "0", "RateLimit-Reset": "1"}, 200)
    await asyncio.sleep(0.1)  # the block reaches the database
    assert await first.acquire() >= 0.8
    assert time.monotonic() - started >= 1.8


async def test_a_send_whose_time_came_while_blocked_waits_for_the_block(budgets: list[PostgresQueue]) -> None:
    """A process whose reserved time falls inside a block another process learnt of since gives that
    time up and reserves again, after the block."""
    first, second = (SharedWindow(queue, "klaviyo/create_event", 1, 100) for queue in budgets[:2])
    await first.acquire()  # the next slot is a second (and the margin) away
    waiting = asyncio.ensure_future(second.acquire())
    await asyncio.sleep(0.3)
    first.observe({"Retry-After": "2"}, 429)
    assert await waiting >= 2.0 + MARGIN


async def test_rate_limits_pace_through_the_database_only_when_the_queue_keeps_budgets(
    budgets: list[PostgresQueue],
) -> None:
    events = endpoint_by_operation("bulk_create_events")
    shared = RateLimits(scale=0.5, pacer=shared_pacers(budgets[0], "klaviyo")).window(events)
    assert isinstance(shared, SharedWindow)
    assert (shared.bucket, shared.burst, shared.steady) == ("klaviyo/bulk_create_events", 5, 75)
    assert shared_pacers(MemoryQueue(), "klaviyo") is None
