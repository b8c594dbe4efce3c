"""Ingest load generator: the router as a subprocess on SQLite (durable commits), loopback only.

Prints events/s and requests/s for ``/v1/batch`` (100 events per request) and single
``/v1/track`` calls, at concurrency 1 and 16, then the server's peak RSS (VmHWM). Every run is
bounded in requests and in seconds; every request carries fresh messageIds so nothing is a
duplicate. Run::

    .venv/bin/python bench/ingest.py [--seconds 8] [--max-events 200000] [--gzip]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from events_mix import load_mix
from procstat import cpu_seconds, peak_rss
from speed import speed_line

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "bench-write-key-0123"
PLACEHOLDER = b"@@REQ@@"

CONFIG = """
data_dir = "{data_dir}"
[queue]
url = "{queue_url}"
[server]
host = "127.0.0.1"
port = 0
[log]
level = "warning"
[delivery]
workers = 0  # measure ingest alone
[[sources]]
name = "bench"
write_key = "{write_key}"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "bench-private-key"
base_url = "http://127.0.0.1:9"
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    events_per_request: int
    concurrency: int


class Bodies:
    """Request bodies with unique messageIds: templates serialised once, a placeholder replaced per request."""

    def __init__(
        self, mix: list[dict[str, Any]], events_per_request: int, *, batch: bool, use_gzip: bool
    ) -> None:
        self.use_gzip = use_gzip
        self._templates: list[bytes] = []
        events = itertools.cycle(mix)
        for _ in range(max(1, len(mix) // events_per_request)):
            chunk = []
            for index in range(events_per_request):
                event = dict(next(events))
                event["messageId"] = f"{PLACEHOLDER.decode()}-{index:03d}"
                if not batch:
                    event["type"] = "track"
                    event.setdefault("event", "Bench Event")
                chunk.append(event)
            self._templates.append(orjson.dumps({"batch": chunk} if batch else chunk[0]))

    def body(self, number: int, run: str) -> bytes:
        template = self._templates[number % len(self._templates)]
        data = template.replace(PLACEHOLDER, f"{run}-{number:08d}".encode())
        return gzip.compress(data, 1) if self.use_gzip else data


async def run_scenario(
    urls: Sequence[str],
    scenario: Scenario,
    bodies: Bodies,
    *,
    seconds: float,
    max_events: int,
    server_pids: Sequence[int],
) -> str:
    """Drive the routers at ``urls`` (each request to the next in turn); one line of figures."""
    max_requests = max(1, max_events // scenario.events_per_request)
    counter = itertools.count()
    run = f"{scenario.name}-{time.monotonic_ns()}"
    statuses: dict[int, int] = {}
    headers = {"Content-Type": "application/json", "Authorization": aiohttp.encode_basic_auth(WRITE_KEY, "")}
    if bodies.use_gzip:
        headers["Content-Encoding"] = "gzip"
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=scenario.concurrency)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            number = next(counter)
            if number >= max_requests:
                return
            url = urls[number % len(urls)]
            async with session.post(
                url + scenario.path, data=bodies.body(number, run), headers=headers
            ) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        server_cpu, client_cpu = sum(map(cpu_seconds, server_pids)), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(scenario.concurrency)))
        elapsed = time.perf_counter() - started
        server_cpu = sum(map(cpu_seconds, server_pids)) - server_cpu
        client_cpu = time.process_time() - client_cpu
    ok = statuses.get(200, 0)
    events = ok * scenario.events_per_request
    others = {k: v for k, v in statuses.items() if k != 200}
    return (
        f"{scenario.name:<22} c={scenario.concurrency:<3} {events / elapsed:>10,.0f} events/s "
        f"{ok / elapsed:>9,.0f} requests/s  ({ok} requests in {elapsed:.2f} s; CPU: server "
        f"{server_cpu / elapsed:.0%}, load generator {client_cpu / elapsed:.0%}"
        + (f", non-200: {others}" if others else "")
        + ")"
    )


def start_server(workdir: Path, queue_url: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m router.app`` and return it with its base URL (read from the banner)."""
    config = workdir / "bench.toml"
    queue_url = queue_url or f"sqlite:///{workdir / 'data' / 'queue.db'}"
    config.write_text(CONFIG.format(data_dir=workdir / "data", queue_url=queue_url, write_key=WRITE_KEY))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLAVIYO_ROUTER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "router.app", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    for line in _lines(process.stdout, deadline):
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    process.wait()
    raise SystemExit("the router did not start")


def _lines(stream: Any, deadline: float) -> Iterator[str]:
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            return
        yield line


async def main_async(args: argparse.Namespace) -> None:
    mix = load_mix()
    workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    process, url = start_server(workdir, args.queue)
    try:
        queue = args.queue or f"sqlite:///{workdir / 'data' / 'queue.db'} (WAL, synchronous=FULL)"
        print(f"router pid {process.pid} at {url}, queue {queue}")
        print(
            f"{len(mix)} events in the mix; gzip {'on' if args.gzip else 'off'}; {args.seconds:g} s per run"
        )
        print(speed_line(mix))
        for scenario in (
            Scenario("batch x100 /v1/batch", "/v1/batch", 100, 1),
            Scenario("batch x100 /v1/batch", "/v1/batch", 100, 16),
            Scenario("single /v1/track", "/v1/track", 1, 1),
            Scenario("single /v1/track", "/v1/track", 1, 16),
        ):
            if args.only and args.only not in f"{scenario.name} c={scenario.concurrency}":
                continue
            bodies = Bodies(
                mix, scenario.events_per_request, batch=scenario.path == "/v1/batch", use_gzip=args.gzip
            )
            line = await run_scenario(
                [url],
                scenario,
                bodies,
                seconds=args.seconds,
                max_events=args.max_events,
                server_pids=[process.pid],
            )
            print(line, flush=True)
        print(f"server peak RSS (VmHWM): {peak_rss(process.pid)}")
    finally:
        stop_server(process)
        shutil.rmtree(workdir, ignore_errors=True)


def stop_server(process: subprocess.Popen[str]) -> None:
    """SIGTERM the router and wait for it (SIGKILL after 30 s)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="time bound of each run (default 8)")
    parser.add_argument(
        "--max-events", type=int, default=200_000, help="event bound of each run (default 200000)"
    )
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    parser.add_argument("--queue", default="", help="queue URL (default: SQLite in a temporary folder)")
    parser.add_argument("--gzip", action="store_true", help="gzip request bodies (as rudder-sdk-python does)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
