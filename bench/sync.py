"""Audience sync throughput: a generated query result (CSV) → a fake Klaviyo with its rate limits on.

Usage: python bench/sync.py [--rows N] [--changed PERCENT] [--folder DIR]

Writes a CSV of N rows (default 1 000 000) with every profile column of seed 000 and two custom
ones, then syncs it (full profile, mirror mode, into a new list) into a fake Klaviyo running in a
subprocess (its own core) that enforces Klaviyo's documented burst/steady limits per endpoint and
validates every body without keeping it (``--no-store``). The sync runs in this process, with its
state in a SQLite file as ``klaviyo-router sync`` keeps it. Then PERCENT of the rows (default 1)
change and the sync runs again (it must send exactly those). Printed for each run: elapsed time,
rows/s, profiles sent, requests, CPU seconds (the sync, its conversion processes, the fake) and this
process's peak RSS so far; for the first run also the time Klaviyo's limits
imply for the import jobs alone (the bound) and for the one-by-one Update Profile path.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from deliver import fake_klaviyo, free_port
from events_mix import DEFAULT_MIX
from procstat import cpu_seconds
from speed import speed_line

from router.destination import Destination
from router.klaviyo.client import KlaviyoClient
from router.klaviyo.ratelimit import RateLimits
from router.runtime import tune_runtime
from router.sync.config import parse_sync
from router.sync.plan import estimate
from router.sync.run import RunOptions, run_sync
from router.sync.send import Klaviyo
from router.sync.state import SqliteSyncState

COLUMNS = [
    "email",
    "external_id",
    "first_name",
    "last_name",
    "phone_number",
    "address1",
    "city",
    "region",
    "zip",
    "country",
    "timezone",
    "latitude",
    "longitude",
    "last_event_date",
    "tier",
    "lifetime_value",
]
CITIES = [
    ("Boston", "MA", "02110", "America/New_York", 42.3601, -71.0589, "617"),
    ("Seattle", "WA", "98101", "America/Los_Angeles", 47.6062, -122.3321, "206"),
    ("Chicago", "IL", "60601", "America/Chicago", 41.8781, -87.6298, "312"),
    ("Denver", "CO", "80202", "America/Denver", 39.7392, -104.9903, "303"),
]


def row(number: int, tier: str) -> list[str]:
    city, region, zip_code, zone, lat, lon, area = CITIES[number % len(CITIES)]
    return [
        f"customer{number}@example.com",
        f"amp-{number}",
        f"First{number}",
        f"Last{number}",
        f"+1{area}{2_000_000 + number % 7_000_000}",
        f"{number % 9000 + 1} Main St",
        city,
        region,
        zip_code,
        "United States",
        zone,
        f"{lat + (number % 1000) / 100000:.6f}",
        f"{lon - (number % 1000) / 100000:.6f}",
        f"2026-{number % 12 + 1:02d}-{number % 28 + 1:02d} 12:{number % 60:02d}:00",
        tier,
        f"{(number * 37) % 5000 / 7:.2f}",
    ]


def write_rows(path: Path, rows: int, changed: set[int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for number in range(rows):
            writer.writerow(row(number, "platinum" if number in changed else "gold"))


def cpu() -> tuple[float, float]:
    """CPU seconds of this process, and of its children that have ended (the conversion processes)."""
    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, ended.ru_utime + ended.ru_stime


async def sync(path: Path, state: SqliteSyncState, destination: Destination, fake: int) -> tuple[str, int]:
    """One run: its line of figures, and the profiles it sent."""
    config = parse_sync(
        {"name": "bench", "source": str(path), "list": "Bench audience", "full_profile": True},
        "bench",
        ("k",),
    )
    before, fake_before = cpu(), cpu_seconds(fake)
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        client = KlaviyoClient(session, destination, limits=RateLimits())
        summary = await run_sync(config, destination, state, Klaviyo(client), RunOptions(progress=False))
    seconds = time.perf_counter() - started
    await asyncio.sleep(0.5)  # the conversion processes end and are counted
    after = cpu()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = (
        f"{seconds:.1f} s, {summary.rows / seconds:,.0f} rows/s, {summary.sent:,} sent, "
        f"{summary.unchanged:,} unchanged, {summary.invalid} invalid, {summary.failed} failed, "
        f"{summary.requests} requests ({summary.status}); CPU: sync {after[0] - before[0]:.1f} s "
        f"+ conversion processes {after[1] - before[1]:.1f} s, fake Klaviyo {cpu_seconds(fake) - fake_before:.1f} s; "
        f"peak RSS so far {peak:.0f} MB"
    )
    return figures, summary.sent


async def run(args: argparse.Namespace) -> int:
    tune_runtime()
    if DEFAULT_MIX.exists():
        print(speed_line(DEFAULT_MIX))
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="bench-sync-"))
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "audience.csv"
    started = time.perf_counter()
    write_rows(source, args.rows, set())
    print(
        f"wrote {args.rows:,} rows ({source.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s"
    )
    bound = estimate(args.rows)
    print(
        f"Klaviyo's limits: {bound.import_jobs} import jobs take at least {bound.seconds:.0f} s; "
        f"one by one through Update Profile: {bound.one_by_one_seconds / 3600:.1f} h"
    )
    port = free_port()
    state = SqliteSyncState(str(folder / "queue.db"))
    await state.open()
    destination = Destination(
        name="k", private_key="pk_bench_0123456789", base_url=f"http://127.0.0.1:{port}"
    )
    try:
        async with fake_klaviyo(port) as fake:
            figures, _ = await sync(source, state, destination, fake.pid)
            print(f"first run: {figures}")
            changed = set(random.Random(7).sample(range(args.rows), int(args.rows * args.changed / 100)))
            write_rows(source, args.rows, changed)
            figures, sent = await sync(source, state, destination, fake.pid)
            print(f"re-run, {len(changed):,} rows changed: {figures}")
            if sent != len(changed):
                print(f"UNEXPECTED: the re-run sent {sent} profiles for {len(changed)} changed rows")
                return 1
    finally:
        await state.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changed", type=float, default=1.0, help="percent of rows changed for the re-run")
    parser.add_argument("--folder", help="where to write the CSV and the state (default: a new temp folder)")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
