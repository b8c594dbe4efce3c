"""``klaviyo-router transform --batch`` as a whole process, on files of 100 000 and 1 000 000 events.

Usage: python bench/transform_cli.py [--events 100000,1000000] [--mix PATH] [--dir DIR]

For each size the mix is repeated with fresh messageIds and written once as gzip NDJSON under
``--dir`` (kept for the next run); the command reads it and writes its requests to /dev/null.
Printed: the machine-speed line (the baseline measured in this run: decoding and re-encoding the
mix's payloads), then per size events/s (wall clock of the process, start-up included), CPU time
and peak RSS (the command and its planning process together, sampled: :func:`procstat.run_child`).
The output streams: memory does not grow with the input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from events_mix import DEFAULT_MIX
from procstat import run_child
from speed import mix_file, speed_line

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", default="100000,1000000", help="sizes, comma-separated")
    parser.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix, a JSON array")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "klaviyo-router-bench")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    sizes = [int(size) for size in args.events.split(",")]
    files = {size: mix_file(args.dir, args.mix, size) for size in sizes}
    destination = args.dir / "destination.json"
    destination.write_text('{"private_key": "bench", "list_id": "XUepkK"}')
    print(speed_line(args.mix))
    for size, path in files.items():
        command = [sys.executable, "-m", "router", "transform", "--batch", "--destination", str(destination)]
        wall, cpu, rss, _ = run_child([*command, str(path)], ROOT, stdout_to="/dev/null")
        print(
            f"transform --batch, {size:>9,} events (gzip NDJSON)  {size / wall:>10,.0f} events/s"
            f"  ({wall:.1f} s, CPU {cpu:.1f} s, peak RSS {rss / 1024:.0f} MiB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
