"""Batch-transform throughput: the event mix, repeated, through the delivery worker's CPU path.

Usage: python bench/transform.py [--events N] [--chunk N] [--mix PATH]

The mix is repeated to N events (default 100 000), each copy with a fresh messageId, and stored
as the queue stores payloads (orjson bytes). Printed, one process on one core:

- a baseline in the same run: decode + encode every payload, the floor any Python worker pays;
- transform + batch: every message transformed and merged into bulk jobs, per chunk of 1000 as a
  worker claims them — the batch transform's own speed (each message is decoded, untimed, just
  before); ``--repeat`` passes, best and median printed (the machine may be shared);
- what a delivery worker's CPU does per claimed chunk (``plan_payloads``): decode the payloads,
  transform, batch and serialise the bodies;
- peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
from events_mix import DEFAULT_MIX, load_mix
from speed import REFERENCE, mix_payloads

from router.destination import Destination
from router.errors import RouterError
from router.klaviyo.batch import Part, assemble, prepare
from router.mapping import load_mappings
from router.plan import plan_payloads
from router.runtime import tune_runtime
from router.transform import transform


def payloads(mix: Path, count: int) -> list[bytes]:
    """The mix repeated to ``count`` events with fresh messageIds, as queue payloads."""
    return mix_payloads(load_mix(mix), count)


def chunks(items: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def worker_path(data: Sequence[bytes], destination: Destination, chunk: int) -> tuple[int, int, int]:
    """What a delivery worker's planning does per claimed chunk (``plan_payloads``): decode, transform,
    batch, serialise; returns (requests, rejected, body bytes)."""
    mappings = load_mappings(destination.mappings_dir)
    requests = rejected = size = 0
    for part in chunks(data, chunk):
        planned = plan_payloads(part, destination, mappings)
        rejected += len(planned.refused)
        requests += len(planned.requests)
        size += sum(len(request.payload()) for request in planned.requests)
    return requests, rejected, size


def transform_batch(data: Sequence[bytes], destination: Destination, chunk: int) -> tuple[int, int, int]:
    """Transform and batch each chunk; only that is timed (each message is decoded just before)."""
    mappings = load_mappings(destination.mappings_dir)
    clock = time.perf_counter
    elapsed = 0.0
    requests = rejected = 0
    for raw in chunks(data, chunk):
        parts: list[Part] = []
        for index, payload in enumerate(raw):
            message = orjson.loads(payload)
            started = clock()
            try:
                parts.extend(map(prepare, transform(message, destination, mappings, index=index)))
            except RouterError:
                rejected += 1
            elapsed += clock() - started
        started = clock()
        requests += len(assemble(parts))
        elapsed += clock() - started
    return requests, rejected, int(elapsed * 1e9)


def baseline(data: Sequence[bytes], destination: Destination, chunk: int) -> tuple[int, int, int]:
    """Decode and re-encode every payload: no transform."""
    return 0, 0, sum(len(orjson.dumps(orjson.loads(p))) for p in data)


def timed(
    label: str, fn: Callable[[Sequence[bytes], Destination, int], tuple[int, int, int]], *args: object
) -> tuple[float, tuple[int, int, int]]:
    data, destination, chunk = args
    assert isinstance(data, list) and isinstance(destination, Destination) and isinstance(chunk, int)
    start = time.perf_counter()
    result = fn(data, destination, chunk)
    rate = len(data) / (time.perf_counter() - start)
    print(f"{label:<44} {rate:>10,.0f} events/s")
    return rate, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events (default 100000)")
    parser.add_argument("--chunk", type=int, default=1000, help="events per claimed chunk (default 1000)")
    parser.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix, a JSON array")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes over all events (default 3)")
    args = parser.parse_args()
    data = payloads(args.mix, args.events)
    tune_runtime()  # as serve and work do
    destination = Destination(private_key="bench", list_id="XUepkK")
    load_mappings(None)
    print(f"{args.events:,} events ({args.mix.name} repeated), chunks of {args.chunk}, one core")
    base, _ = timed("baseline: decode + encode only", baseline, data, destination, args.chunk)
    print(f"  (the machine's speed; reference: {REFERENCE})")
    rates = sorted(
        len(data) / (transform_batch(data, destination, args.chunk)[2] / 1e9) for _ in range(args.repeat)
    )
    print(
        f"{'transform + batch (messages decoded)':<44} {rates[-1]:>10,.0f} events/s best of {args.repeat}"
        f", median {statistics.median(rates):,.0f}"
    )
    rate, (requests, rejected, size) = timed(
        "decode + transform + batch + serialise", worker_path, data, destination, args.chunk
    )
    print(f"  {requests} requests ({size / 1e6:.0f} MB of bodies), {rejected} rejected")
    print(f"  transform path runs at {rate / base:.0%} of the baseline's speed")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB (the {args.events:,} payloads are held in memory)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
