"""Delivery throughput against Klaviyo's rate limits: queue → workers → fake Klaviyo.

Usage: python bench/deliver.py [--events N] [--workers N] [--queue sqlite|memory]

The event mix is repeated to N events (default 100 000) with fresh messageIds and queued. A fake
Klaviyo runs in a subprocess (its own core) enforcing Klaviyo's documented burst/steady limits per
endpoint and validating every body, without keeping state (``--no-store``: like Klaviyo's bulk
endpoints it answers before processing; the end-to-end test checks the state). The router's
delivery workers run in this process until every job is settled. Printed:

- achieved events/s, from the first claim to the last settle;
- the bound: the fastest ANY client could deliver the same requests' content under those limits,
  packing every bulk job as full as Klaviyo allows (1000 events, 10 000 profiles, 1000 subscribe /
  100 unsubscribe profiles per job), and the achieved share of it;
- the share of requests Klaviyo answered 429, dead letters, and this process's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from events_mix import DEFAULT_MIX, load_mix
from procstat import children, cpu_seconds, thread_cpu_seconds
from speed import speed_line

from router.deliver import Deliverer, DeliverySettings
from router.destination import Destination
from router.identity import ordering_key
from router.klaviyo.client import KlaviyoClient
from router.klaviyo.spec import Endpoint, endpoint_for
from router.mapping import MappingSets, load_mappings
from router.metrics import Metrics
from router.planner import Planner
from router.queue import JobState, NewJob, Queue, open_queue
from router.runtime import tune_runtime
from router.transform import transform

#: Most items one bulk request may carry, per endpoint path (Klaviyo's documented caps).
IDEAL_PACKING = {
    "/api/event-bulk-create-jobs": 1000,
    "/api/profile-bulk-import-jobs": 10_000,
    "/api/profile-subscription-bulk-create-jobs": 1000,
    "/api/profile-subscription-bulk-delete-jobs": 100,
}
BULK_OF = {
    "/api/events": "/api/event-bulk-create-jobs",
    "/api/profile-import": "/api/profile-bulk-import-jobs",
}


def messages(mix: Path, count: int) -> Iterator[dict[str, Any]]:
    base = load_mix(mix)
    for i in range(count):
        message = dict(base[i % len(base)])
        message["messageId"] = str(uuid.UUID(int=i))
        yield message


# ---------------------------------------------------------------- the bound


def seconds_needed(requests: int, endpoint: Endpoint) -> float:
    """Least time to send ``requests`` to an endpoint keeping both fixed windows.

    Each minute takes at most ``steady`` requests, each second at most ``burst``; the last
    request goes out at the start of its second, so ``n ≤ burst`` requests take 0 s.
    """
    if requests <= 0:
        return 0.0
    full_minutes, rest = divmod(requests - 1, endpoint.steady_per_minute)
    return full_minutes * 60.0 + rest // endpoint.burst_per_second


def bound(sample: list[dict[str, Any]], destination: Destination, total: int) -> tuple[float, dict[str, int]]:
    """Events/s the rate limits allow for ``total`` events of this mix, with ideal packing."""
    mappings = load_mappings(destination.mappings_dir)
    items: Counter[tuple[str, str]] = Counter()
    for message in sample:
        for request in transform(message, destination, mappings):
            path = BULK_OF.get(request.path, request.path)
            relationships = request.body["data"].get("relationships") or {}
            list_id = ((relationships.get("list") or {}).get("data") or {}).get("id", "")
            items[(path, list_id)] += 1
    scale = total / len(sample)
    per_path: Counter[str] = Counter()
    for (path, _list_id), count in items.items():
        per_path[path] += math.ceil(count * scale / IDEAL_PACKING[path])
    slowest = max(seconds_needed(n, endpoint_for("POST", path)) for path, n in per_path.items())
    # n requests in the same second still take that second to be answered: count at least 1 s
    return total / max(slowest, 1.0), dict(per_path)


# ---------------------------------------------------------------- the run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def fake_klaviyo(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A fake Klaviyo in a subprocess on ``port``, stopped on the way out (on an error too)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "router",
        "fake-klaviyo",
        "--port",
        str(port),
        "--no-store",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_listening(f"http://127.0.0.1:{port}")
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def wait_listening(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            try:
                async with session.get(f"{base_url}/__fake__/state?summary=1") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise SystemExit("fake Klaviyo did not start")


async def fill(queue: Queue, stream: Iterator[dict[str, Any]], destination: str) -> tuple[int, set[str]]:
    lists: set[str] = set()
    chunk: list[NewJob] = []
    total = 0
    for message in stream:
        if message.get("type") == "group":
            lists.add(str(message["groupId"]))
        listed = (((message.get("traits") or {}).get("properties")) or {}).get("listId")
        if listed:
            lists.add(str(listed))
        chunk.append(
            NewJob(
                source="bench",
                destination=destination,
                message_id=message["messageId"],
                ordering_key=ordering_key(message),
                payload=orjson.dumps(message),
            )
        )
        if len(chunk) == 5000:
            total += (await queue.enqueue(chunk)).inserted
            chunk = []
    if chunk:
        total += (await queue.enqueue(chunk)).inserted
    return total, lists


async def run(args: argparse.Namespace) -> int:
    port = free_port()
    tune_runtime()  # as serve and work do
    async with fake_klaviyo(port) as fake:
        base_url = f"http://127.0.0.1:{port}"
        destination = Destination(
            name="bench", private_key="pk_bench_0000", base_url=base_url, list_id="XUepkK"
        )
        print(speed_line(args.mix))
        sample = list(messages(args.mix, 1000))
        events_per_s_bound, per_path = bound(sample, destination, args.events)
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/queue.db" if args.queue == "sqlite" else "memory://"
            queue = open_queue(url)
            await queue.open()
            try:
                queued, lists = await fill(queue, messages(args.mix, args.events), destination.name)
                async with aiohttp.ClientSession() as session:
                    await session.post(
                        f"{base_url}/__fake__/lists",
                        json={"lists": [{"id": i, "name": i} for i in sorted(lists)]},
                    )
                    settings = DeliverySettings(
                        workers=args.workers,
                        batch_size=args.batch_size,
                        planners=args.planners,
                        idle_poll=0.05,
                    )
                    planner = Planner(MappingSets([destination.mappings_dir]), settings.planners)
                    await planner.start()
                    timings: list[tuple[str, float, int, float]] = []
                    client = KlaviyoClient(
                        session,
                        destination,
                        timeout=60,
                        observe=lambda op, result, status, t: timings.append(
                            (op, t, status, time.perf_counter())
                        ),
                    )
                    metrics = SettleCounting()
                    deliverer = Deliverer(
                        queue, destination, client, settings=settings, metrics=metrics, planner=planner
                    )
                    stop = asyncio.Event()
                    print(
                        f"{queued:,} events queued ({args.queue}); {args.workers} workers; fake Klaviyo on {base_url}"
                    )
                    # planning processes may start during the run (the pool starts them as needed)
                    cpu_planners = sum(cpu_seconds(pid) for pid in children(os.getpid()) if pid != fake.pid)
                    started, cpu_router, cpu_fake = (
                        time.perf_counter(),
                        time.process_time(),
                        cpu_seconds(fake.pid),
                    )
                    threads_before = thread_cpu_seconds()
                    task = asyncio.create_task(deliverer.run(stop))
                    counts = await wait_settled(queue, destination.name, metrics, queued)
                    elapsed = time.perf_counter() - started
                    cpu = (
                        time.process_time() - cpu_router,
                        sum(cpu_seconds(pid) for pid in children(os.getpid()) if pid != fake.pid)
                        - cpu_planners,
                        cpu_seconds(fake.pid) - cpu_fake,
                    )
                    threads = {
                        name: seconds - threads_before.get(name, 0.0)
                        for name, seconds in thread_cpu_seconds().items()
                    }
                    stop.set()
                    await task
                    planner.close()
                    async with session.get(f"{base_url}/__fake__/state?summary=1") as response:
                        state = await response.json()
            finally:
                await queue.close()
    if os.environ.get("BENCH_DEBUG"):
        by_op: dict[str, list[float]] = {}
        for op, t, _, _ in timings:
            by_op.setdefault(op, []).append(t)
        for op, ts in by_op.items():
            print(f"  {op}: {len(ts)} requests, {sum(ts):.1f} s in flight, max {max(ts):.2f} s")
        per_second = Counter(int(at - started) for op, _, _, at in timings if op == "bulk_create_events")
        print(
            "  bulk_create_events answered per second of the run:",
            [per_second[s] for s in range(int(elapsed) + 1)],
        )
        busy = ", ".join(
            f"{name} {s:.1f} s" for name, s in sorted(threads.items(), key=lambda t: -t[1]) if s >= 0.05
        )
        print(f"  router threads' CPU: {busy}")
        answered = sorted(at - started for op, _, _, at in timings if op == "bulk_create_events")
        print("  the first 12 answered at (s):", " ".join(f"{t:.2f}" for t in answered[:12]))
    report(args.events, elapsed, events_per_s_bound, per_path, counts, state)
    print(
        f"CPU        router {cpu[0]:.1f} s + planning processes {cpu[1]:.1f} s, fake Klaviyo {cpu[2]:.1f} s"
        f" (in {elapsed:.1f} s on {os.cpu_count()} cores)"
    )
    return 0


class SettleCounting(Metrics):
    """The workers' metrics, also counting jobs settled for good in a plain int the bench can poll
    (collecting the Prometheus registry every few milliseconds took ~0.5 s of the router's CPU)."""

    settled = 0

    def observe_settled(self, destination: str, result: str, count: int, lags: list[float]) -> None:
        super().observe_settled(destination, result, count, lags)
        if result in ("delivered", "skipped", "dead"):
            self.settled += count


async def wait_settled(
    queue: Queue, destination: str, metrics: SettleCounting, jobs: int
) -> dict[JobState, int]:
    """Wait until the workers have settled ``jobs`` jobs for good, then the queue's counts.

    The workers' own settle count is watched, not the queue: counting a 100 000-job table every
    few milliseconds would take CPU from the run it measures.
    """
    while True:
        if metrics.settled >= jobs:
            counts = await queue.counts(destination)
            if not counts.get(JobState.PENDING) and not counts.get(JobState.IN_FLIGHT):
                return counts
        await asyncio.sleep(0.01)


def report(
    events: int,
    elapsed: float,
    bound_rate: float,
    per_path: dict[str, int],
    counts: dict[JobState, int],
    state: dict[str, Any],
) -> None:
    counters = state.get("counters") or {}
    requests = int(counters.get("requests") or 0)
    throttled = int(counters.get("throttled") or 0)
    rate = events / elapsed
    print(f"achieved   {rate:>10,.0f} events/s  ({elapsed:.1f} s)")
    print(
        f"bound      {bound_rate:>10,.0f} events/s  (ideal packing: "
        + ", ".join(f"{n} x {p.removeprefix('/api/')}" for p, n in sorted(per_path.items()))
        + ")"
    )
    print(f"share      {rate / bound_rate:>10.0%} of the bound")
    print(f"429s       {throttled:>10} of {requests} requests ({throttled / max(requests, 1):.2%})")
    print(f"settled    done {counts.get(JobState.DONE, 0):,}, dead {counts.get(JobState.DEAD, 0):,}")
    accepted = counters.get("items_accepted") or {}
    print("fake took  " + ", ".join(f"{n:,} {op}" for op, n in sorted(accepted.items())))
    print(
        f"peak RSS   {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:>10.0f} MiB (router process)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events to deliver (default 100000)")
    parser.add_argument("--workers", type=int, default=4, help="delivery workers (default 4)")
    parser.add_argument(
        "--batch-size", type=int, default=DeliverySettings().batch_size, help="jobs claimed per batch"
    )
    parser.add_argument(
        "--planners",
        type=int,
        default=DeliverySettings().planners,
        help="planning processes (default: [delivery] planners' default; 0: plan in this process)",
    )
    parser.add_argument("--queue", choices=("sqlite", "memory"), default="sqlite", help="queue backend")
    parser.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix, a JSON array")
    args = parser.parse_args()
    os.environ.setdefault("KLAVIYO_ROUTER_LOG_LEVEL", "warning")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
