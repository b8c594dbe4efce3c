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

#: What :func:`decode_encode_rate` gave on the VM the targets were first measured on.
REFERENCE = "173 000 - 185 000 events/s on 2026-11-22"


def mix_payloads(events: Sequence[dict[str, Any]], count: int) -> list[bytes]:
    """The events repeated to ``count`` payloads, each with a fresh messageId, as the queue stores them."""
    return [
        orjson.dumps({**events[i % len(events)], "messageId": str(uuid.UUID(int=i))}) for i in range(count)
    ]


def decode_encode_rate(payloads: Sequence[bytes]) -> float:
    """Events/s of decoding and re-encoding each payload once."""
    started = time.perf_counter()
    for payload in payloads:
        orjson.dumps(orjson.loads(payload))
    return len(payloads) / (time.perf_counter() - started)


def speed_line(mix: Path | Sequence[dict[str, Any]], count: int = 20_000) -> str:
    """One line for a bench's output: this machine's :func:`decode_encode_rate` and the reference."""
    events = orjson.loads(mix.read_bytes()) if isinstance(mix, Path) else mix
    rate = decode_encode_rate(mix_payloads(events, count))
    return (
        f"machine speed: decode + encode of {count:,} payloads {rate:,.0f} events/s (reference: {REFERENCE})"
    )
