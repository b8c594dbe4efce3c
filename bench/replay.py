"""Replay throughput: ``klaviyo-router replay`` of a gzip NDJSON file into the SQLite queue, as a
whole process (reading, gunzip, intake's validation, enqueue with durable commits).

Usage: python bench/replay.py [--events N] [--mix PATH] [--dir DIR]

The mix is repeated to N events (default 1 000 000), each with a fresh messageId, and written once
as gzip NDJSON under ``--dir`` (kept there for the next run). Each run replays it into a new queue.
Printed: the machine-speed line, a baseline measured in the same run (reading the file's lines:
gunzip and split, in this process), events/s of the replay (wall clock of the process), its CPU
time and peak RSS (it and its child processes, sampled: :func:`procstat.run_child`), and what its
summary counted.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
from events_mix import DEFAULT_MIX
from procstat import run_child
from speed import mix_file, speed_line

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
data_dir = "{data}"
[queue]
url = "sqlite:///{data}/queue.db"
max_depth = {max_depth}
[limits]
min_free_disk_bytes = 0
[log]
level = "warning"
[[sources]]
name = "bench"
write_key = "bench-write-key-0123"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "bench-private-key"
base_url = "http://127.0.0.1:9"
"""


def read_lines_rate(path: Path) -> float:
    """Events/s of gunzipping the file and splitting it into lines: the floor of any replay."""
    started = time.perf_counter()
    lines = 0
    with gzip.open(path, "rb") as text:
        rest = b""
        while block := text.read(1 << 20):
            pieces = (rest + block).split(b"\n")
            rest = pieces.pop()
            lines += len(pieces)
    return lines / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events (default 1000000)")
    parser.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix, a JSON array")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "klaviyo-router-bench")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = mix_file(args.dir, args.mix, args.events)
    data = args.dir / "replay-data"
    shutil.rmtree(data, ignore_errors=True)
    config = args.dir / "replay.toml"
    config.write_text(CONFIG.format(data=data, max_depth=2 * args.events))
    print(speed_line(args.mix))
    print(
        f"{args.events:,} events ({args.mix.name} repeated), {path.stat().st_size / 1e6:.0f} MB of gzip NDJSON"
    )
    print(f"{'baseline: gunzip + split into lines':<44} {read_lines_rate(path):>10,.0f} events/s")
    command = [sys.executable, "-m", "router", "replay", "--config", str(config), "--json", str(path)]
    wall, cpu, rss, output = run_child(command, ROOT)
    summary = orjson.loads(output.strip().splitlines()[-1])
    print(f"{'replay into the SQLite queue (whole process)':<44} {args.events / wall:>10,.0f} events/s")
    print(f"  {wall:.1f} s, CPU {cpu:.1f} s ({cpu / wall:.0%} of one core), peak RSS {rss / 1024:.0f} MiB")
    print(
        f"  queued {summary['queued']:,}, duplicates {summary['duplicates']:,}, rejected {summary['rejected']:,};"
        f" queue file {sum(f.stat().st_size for f in data.glob('queue.db*')) / 1e6:.0f} MB"
    )
    shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
