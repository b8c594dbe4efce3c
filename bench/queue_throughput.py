"""Queue backend figures: enqueue with and without group commit, drain, reads under load.

Usage (the file is not ``bench/queue.py``: that name would shadow the stdlib ``queue`` module
for mypy and for scripts run from ``bench/``)::

    python bench/queue_throughput.py [--dir DIR] [--events N]

The SQLite file goes in ``--dir`` (default: a temporary directory) so it can be put on the disk
that matters. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from router.queue import JobState, NewJob, Queue
from router.queue.memory import MemoryQueue
from router.queue.sqlite import SqliteQueue

PAYLOAD = b'{"type": "track", "event": "Order Completed", "properties": {"revenue": 42.5}}' * 4


def jobs(start: int, count: int, destination: str = "klaviyo") -> list[NewJob]:
    """``count`` distinct events, one per profile out of 500."""
    return [
        NewJob(
            source="web",
            destination=destination,
            message_id=f"m{i}",
            ordering_key=f"u{i % 500}",
            payload=PAYLOAD,
        )
        for i in range(start, start + count)
    ]


async def concurrent_enqueues(queue: Queue, calls: int, per_call: int, first: int = 0) -> float:
    """Seconds for ``calls`` concurrent enqueue calls of ``per_call`` events each."""
    started = time.perf_counter()
    await asyncio.gather(*(queue.enqueue(jobs(first + i * per_call, per_call)) for i in range(calls)))
    return time.perf_counter() - started


async def sequential_enqueues(queue: Queue, calls: int) -> float:
    """Seconds for ``calls`` enqueue calls of one event, each awaited before the next."""
    started = time.perf_counter()
    for i in range(calls):
        await queue.enqueue(jobs(10**8 + i, 1))
    return time.perf_counter() - started


async def drain(queue: Queue, limit: int) -> tuple[int, float]:
    """Claim and ack everything claimable (ordering keys allow 500 at a time); (jobs, seconds)."""
    done = 0
    started = time.perf_counter()
    while claimed := await queue.claim("klaviyo", limit, lease_seconds=60):
        await queue.ack([job.id for job in claimed])
        done += len(claimed)
    return done, time.perf_counter() - started


async def read_latency_under_load(queue: Queue, writes: int) -> list[float]:
    """Latencies (ms) of ``get`` calls made while ``writes`` single-event enqueues run."""
    latencies: list[float] = []
    load = asyncio.gather(*(queue.enqueue(jobs(2 * 10**8 + i, 1)) for i in range(writes)))
    while not load.done():
        started = time.perf_counter()
        await queue.get(1)
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0)
    await load
    return latencies


async def with_queue(make: Callable[[], Queue], run: Callable[[Queue], Awaitable[None]]) -> None:
    queue = make()
    await queue.open()
    try:
        await run(queue)
    finally:
        await queue.close()


def report(label: str, count: int, seconds: float, queue: Queue) -> None:
    commits = f", {queue.commits} commits" if isinstance(queue, SqliteQueue) else ""
    print(f"  {label:<44} {count / seconds:>10,.0f}/s  ({count} in {seconds:.2f} s{commits})")


async def bench_backend(name: str, make: Callable[[], Queue], events: int) -> None:
    print(name)

    async def enqueue_figures(queue: Queue) -> None:
        report(
            "enqueue, concurrent calls of 1 event", events, await concurrent_enqueues(queue, events, 1), queue
        )
        report(
            "enqueue, sequential calls of 1 event",
            events // 10,
            await sequential_enqueues(queue, events // 10),
            queue,
        )
        batches = events // 100
        seconds = await concurrent_enqueues(queue, batches, 100, first=3 * 10**8)
        report("enqueue, concurrent calls of 100 events", batches * 100, seconds, queue)
        started = time.perf_counter()
        first = await queue.claim("klaviyo", 100, lease_seconds=60)
        print(
            f"  one claim(100) from a backlog of {2 * events + events // 10}: {(time.perf_counter() - started) * 1000:.1f} ms"
        )
        await queue.release([job.id for job in first])
        done, seconds = await drain(queue, 100)
        report("claim(100) + ack until blocked", done, seconds, queue)
        latencies = await read_latency_under_load(queue, events)
        print(
            f"  get() while enqueueing: median {statistics.median(latencies):.2f} ms, max {max(latencies):.2f} ms"
        )
        started = time.perf_counter()
        total = sum((await queue.counts()).values())
        print(f"  counts() over {total} jobs: {(time.perf_counter() - started) * 1000:.1f} ms")

    await with_queue(make, enqueue_figures)


async def main(directory: Path, events: int) -> None:
    await bench_backend("memory", MemoryQueue, events)
    await bench_backend("sqlite, group commit", lambda: SqliteQueue(directory / "group.db"), events)
    await bench_backend(
        "sqlite, one commit per call (max_batch=1)",
        lambda: SqliteQueue(directory / "single.db", max_batch=1),
        events,
    )
    await with_queue(lambda: SqliteQueue(directory / "group.db"), check_dead_letters)


async def check_dead_letters(queue: Queue) -> None:
    started = time.perf_counter()
    await queue.list_jobs(JobState.DEAD, limit=100)
    print(f"list_jobs(dead) on a reopened file: {(time.perf_counter() - started) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, help="where the SQLite files go (default: a temporary directory)")
    parser.add_argument("--events", type=int, default=5000, help="events per figure (default: 5000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        asyncio.run(main(Path(tmp), args.events))
