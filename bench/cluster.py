"""Several router processes on one PostgreSQL queue: ingest with 1, 2 and 3, and delivery by 3.

Usage: python bench/cluster.py [--seconds 8] [--events 100000] [--postgres URL] [--skip-ingest]
                               [--processes 3] [--workers 4]

Ingest: ``/v1/batch`` with 100 events per request at concurrency 16 (requests spread over the
routers in turn), first against one router on SQLite (the embedded default, durable commits),
then against 1, 2 and 3 routers on PostgreSQL (``[delivery] workers = 0``), each configuration on a
fresh database. The load generator shares the machine's cores with the routers and the server.

Delivery: ``--events`` of the mix queued in PostgreSQL, then three (``--processes``)
``klaviyo-router work`` processes deliver them to one fake Klaviyo that enforces the documented limits of one account; the
routers share those limits through the database. Printed: events/s from the fake's first request to
the last job settled, the bound (the fastest any client could deliver the same content under those
limits, as ``bench/deliver.py`` computes it), the share of it, the share of requests answered 429,
and the CPU seconds the routers, the fake and PostgreSQL used meanwhile (``BENCH_DEBUG=1``: also
the fake's requests per endpoint and per second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from deliver import bound, fake_klaviyo, fill, free_port, messages
from events_mix import DEFAULT_MIX, load_mix
from ingest import Bodies, Scenario, run_scenario, start_server, stop_server
from procstat import children, cpu_seconds, named
from speed import speed_line

from router.destination import Destination
from router.queue import JobState, open_queue

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = Scenario("batch x100 /v1/batch", "/v1/batch", 100, 16)
WORK_CONFIG = """
data_dir = "{data_dir}"
[queue]
url = "{queue_url}"
[log]
level = "warning"
[[sources]]
name = "bench"
write_key = "bench-write-key-0123"
destinations = ["bench"]
[[destinations]]
name = "bench"
private_key = "pk_bench_0000"
base_url = "{base_url}"
list_id = "XUepkK"
[delivery]
workers = {workers}
"""


@contextlib.asynccontextmanager
async def database(server: str) -> AsyncIterator[str]:
    """A fresh database on ``server`` for one run, dropped afterwards; its URL."""
    name = f"router_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(server)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield urlunsplit(urlsplit(server)._replace(path=f"/{name}"))
    finally:
        conn = await asyncpg.connect(server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@contextlib.contextmanager
def routers(workdir: Path, queue_url: str, count: int) -> Iterator[tuple[list[str], list[int]]]:
    """``count`` ingest-only routers on ``queue_url``; their URLs and process ids."""
    started: list[subprocess.Popen[str]] = []
    urls: list[str] = []
    try:
        for n in range(count):
            folder = workdir / f"router-{n}"
            folder.mkdir()
            process, url = start_server(folder, queue_url)
            started.append(process)
            urls.append(url)
        yield urls, [process.pid for process in started]
    finally:
        for process in started:
            stop_server(process)


async def ingest(args: argparse.Namespace, workdir: Path) -> None:
    mix = load_mix()
    print(f"ingest: {SCENARIO.name}, c={SCENARIO.concurrency}, {args.seconds:g} s per run")
    runs: list[tuple[str, str, int]] = [("sqlite (one process)", "", 1)]
    runs += [(f"postgresql, {n} process{'es' if n > 1 else ''}", "postgresql", n) for n in (1, 2, 3)]
    for number, (name, backend, count) in enumerate(runs):
        bodies = Bodies(mix, SCENARIO.events_per_request, batch=True, use_gzip=False)
        async with contextlib.AsyncExitStack() as stack:
            queue_url = await stack.enter_async_context(database(args.postgres)) if backend else ""
            folder = workdir / f"ingest-{number}"
            folder.mkdir()
            urls, pids = stack.enter_context(routers(folder, queue_url, count))
            line = await run_scenario(
                urls, SCENARIO, bodies, seconds=args.seconds, max_events=args.max_events, server_pids=pids
            )
        print(f"  {name:<26} {line.split(maxsplit=4)[-1]}", flush=True)


async def deliver(args: argparse.Namespace, workdir: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    destination = Destination(name="bench", private_key="pk_bench_0000", base_url=base_url, list_id="XUepkK")
    rate, per_path = bound(list(messages(args.mix, 1000)), destination, args.events)
    async with database(args.postgres) as queue_url, fake_klaviyo(port) as fake:
        queue = open_queue(queue_url)
        await queue.open()
        try:
            filled = time.perf_counter()
            queued, lists = await fill(queue, messages(args.mix, args.events), destination.name)
            print(
                f"delivery: {queued:,} events queued in {time.perf_counter() - filled:.1f} s; "
                f"{args.processes} work processes, {args.workers} workers each"
            )
            async with aiohttp.ClientSession() as session:
                await session.post(
                    f"{base_url}/__fake__/lists",
                    json={"lists": [{"id": i, "name": i} for i in sorted(lists)]},
                )
                before = {pid: cpu_seconds(pid) for pid in [fake.pid, *named("postgres")]}
                with workers(workdir, queue_url, base_url, args.processes, args.workers) as pids:
                    started = await first_request(session, base_url)
                    # the active jobs as the queue's triggers keep them: a count of the jobs by
                    # state reads the whole table (~20 ms of PostgreSQL's CPU every poll)
                    while True:
                        if not await queue.depth():
                            break
                        await asyncio.sleep(0.1)
                    elapsed = time.perf_counter() - started
                    cpu = await cpu_used(queue_url, before, pids, fake.pid)
                async with session.get(f"{base_url}/__fake__/state?summary=1") as response:
                    state: dict[str, Any] = await response.json()
                if os.environ.get("BENCH_DEBUG"):
                    async with session.get(f"{base_url}/__fake__/requests") as response:
                        timeline(await response.json())
            counts = await queue.counts(destination.name)
        finally:
            await queue.close()
    counters = state["counters"]
    requests, throttled = int(counters["requests"]), int(counters["throttled"])
    achieved = args.events / elapsed
    print(
        f"  achieved   {achieved:>10,.0f} events/s  ({elapsed:.1f} s from the first request to the last settle)"
    )
    print(
        f"  bound      {rate:>10,.0f} events/s  (ideal packing: "
        + ", ".join(f"{n} x {p.removeprefix('/api/')}" for p, n in sorted(per_path.items()))
        + ")"
    )
    print(f"  share      {achieved / rate:>10.0%} of the bound")
    print(f"  429s       {throttled:>10} of {requests} requests ({throttled / max(requests, 1):.2%})")
    print(f"  settled    done {counts[JobState.DONE]:,}, dead {counts[JobState.DEAD]:,}")
    print(
        "  CPU        "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cpu.items())
        + f" (in {elapsed:.1f} s on {os.cpu_count()} cores: {sum(cpu.values()) / elapsed:.2f} cores busy)"
    )


async def cpu_used(queue_url: str, before: dict[int, float], pids: list[int], fake: int) -> dict[str, float]:
    """CPU seconds since ``before`` (every PostgreSQL process's and the fake's, read before the
    routers started) of the routers, their planning processes, the fake, PostgreSQL's backends serving this run's database
    (the bench's own connections included) and PostgreSQL's other processes (shared with whatever
    else uses the server: its background writers, other databases' backends)."""
    conn = await asyncpg.connect(queue_url)
    try:
        ours = {row[0] for row in await conn.fetch(QUERY_BACKENDS)}
    finally:
        await conn.close()

    def used(pid: int) -> float:
        return cpu_seconds(pid) - before.get(pid, 0.0)

    server = named("postgres")
    planners = [child for pid in pids for child in children(pid)]
    return {
        "routers": sum(map(used, pids)),
        "their planning processes": sum(map(used, planners)),
        "fake Klaviyo": used(fake),
        "PostgreSQL (this database)": sum(used(pid) for pid in server if pid in ours),
        "PostgreSQL (other)": sum(used(pid) for pid in server if pid not in ours),
    }


def timeline(requests: list[dict[str, Any]]) -> None:
    """Requests per endpoint, and for each of the busiest the requests answered per second of the run
    (``BENCH_DEBUG=1``): a second below the endpoint's burst is a second the pacing or the workers
    left unused."""
    if not requests:
        return
    start = min(request["at"] for request in requests)
    by_operation: dict[str, list[float]] = {}
    for request in requests:
        by_operation.setdefault(str(request["operation_id"]), []).append(request["at"] - start)
    for operation, moments in sorted(by_operation.items(), key=lambda item: -len(item[1])):
        seconds = [0] * (int(max(moments)) + 1)
        for moment in moments:
            seconds[int(moment)] += 1
        print(f"  {operation}: {len(moments)} requests, per second: {seconds}")


#: The server processes serving the current database (but not this connection's).
QUERY_BACKENDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


@contextlib.contextmanager
def workers(
    workdir: Path, queue_url: str, base_url: str, count: int, workers_each: int
) -> Iterator[list[int]]:
    """``count`` ``klaviyo-router work`` processes on ``queue_url``, stopped on the way out; their
    process ids."""
    started = []
    try:
        for n in range(count):
            folder = workdir / f"work-{n}"
            folder.mkdir()
            config = folder / "work.toml"
            config.write_text(
                WORK_CONFIG.format(
                    data_dir=folder, queue_url=queue_url, base_url=base_url, workers=workers_each
                )
            )
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "router", "work", "--config", str(config)],
                    cwd=ROOT,
                    stdout=subprocess.DEVNULL,
                    stderr=(folder / "work.log").open("wb"),
                )
            )
        yield [process.pid for process in started]
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def first_request(session: aiohttp.ClientSession, base_url: str) -> float:
    """The moment the fake counts its first request (the workers have started)."""
    while True:
        async with session.get(f"{base_url}/__fake__/state?summary=1") as response:
            if (await response.json())["counters"]["requests"]:
                return time.perf_counter()
        await asyncio.sleep(0.01)


async def main_async(args: argparse.Namespace) -> None:
    print(speed_line(args.mix))
    with tempfile.TemporaryDirectory(prefix="router-cluster-") as tmp:
        if not args.skip_ingest:
            await ingest(args, Path(tmp))
        if not args.skip_delivery:
            await deliver(args, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="time bound of each ingest run (default 8)"
    )
    parser.add_argument("--max-events", type=int, default=200_000, help="event bound of each ingest run")
    parser.add_argument("--events", type=int, default=100_000, help="events to deliver (default 100000)")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server's maintenance database; each run creates and drops its own",
    )
    parser.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix for delivery, a JSON array")
    parser.add_argument("--workers", type=int, default=4, help="delivery workers per process (default 4)")
    parser.add_argument("--processes", type=int, default=3, help="work processes delivering (default 3)")
    parser.add_argument("--skip-ingest", action="store_true", help="only the delivery run")
    parser.add_argument("--skip-delivery", action="store_true", help="only the ingest runs")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
