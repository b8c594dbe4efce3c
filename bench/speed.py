"""How fast this machine runs the router's kind of work right now, printed beside every bench's figures.

The 2-core development VM's speed moves between sessions: the same code's batch transform gave
25 000 events/s on 2026-11-22 and 10 500 on 2026-12-02. Figures of different days compare only
next to this one: decoding and re-encoding the mix's events with orjson, the floor any Python
worker pays per event (``bench/transform.py`` calls it its baseline).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from events_mix import load_mix

#: What :func:`decode_encode_rate` gave on the VM the targets were first measured on.
REFERENCE = "173 000 - 185 000 events/s on 2026-11-22"


def mix_payloads(events: Sequence[dict[str, Any]], count: int) -> list[bytes]:
    """The events repeated to ``count`` payloads, each with a fresh messageId, as the queue stores them."""
    return [
        orjson.dumps({**events[i % len(events)], "messageId": str(uuid.UUID(int=i))}) for i in range(count)
    ]


def write_mix_file(path: Path, events: Sequence[dict[str, Any]], count: int) -> None:
    """``count`` of the mix's events as NDJSON (fresh messageIds, as :func:`mix_payloads`), gzip
    when ``path`` ends in ``.gz``; written 10 000 at a time, so a file of millions fits in memory."""
    import gzip

    with gzip.open(path, "wb", compresslevel=1) if path.suffix == ".gz" else path.open("wb") as out:
        for start in range(0, count, 10_000):
            chunk = [
                orjson.dumps({**events[i % len(events)], "messageId": str(uuid.UUID(int=i))})
                for i in range(start, min(start + 10_000, count))
            ]
            out.write(b"\n".join(chunk) + b"\n")


def mix_file(folder: Path, mix: Path, count: int) -> Path:
    """``folder/mix-<count>.ndjson.gz`` (:func:`write_mix_file`), written on first use and kept
    (``-valid-phones``: written from :func:`events_mix.load_mix`, unlike files of earlier dates)."""
    path = folder / f"mix-{count}-valid-phones.ndjson.gz"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(".partial.gz")
        write_mix_file(partial, load_mix(mix), count)
        partial.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s")
    return path


def decode_encode_rate(payloads: Sequence[bytes]) -> float:
    """Events/s of decoding and re-encoding each payload once."""
    started = time.perf_counter()
    for payload in payloads:
        orjson.dumps(orjson.loads(payload))
    return len(payloads) / (time.perf_counter() - started)


def speed_line(mix: Path | Sequence[dict[str, Any]], count: int = 20_000) -> str:
    """One line for a bench's output: this machine's :func:`decode_encode_rate` and the reference."""
    events = load_mix(mix) if isinstance(mix, Path) else mix
    rate = decode_encode_rate(mix_payloads(events, count))
    return (
        f"machine speed: decode + encode of {count:,} payloads {rate:,.0f} events/s (reference: {REFERENCE})"
    )
