"""The benchmark events: ``../shared/bench/events-mix.json`` (else the copy in ``tests/data``), with
every phone number one Klaviyo would take.

The shared mix was generated with random US numbers: 129 of its 285 distinct numbers have an area
code no US number has (``+16325451719``). The router refuses those (``phonenumbers.is_valid_number``,
as Klaviyo does), so 42 % of the mix's events would become dead letters and every figure would
measure less work than the mix stands for. :func:`load_mix` gives such a number the area code 201
(``+12015451719``): each event then carries the work of a deliverable one, as it did when the
figures of earlier dates were measured, when a number only had to be possible.
"""

from __future__ import annotations

import gzip
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import phonenumbers

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MIX = ROOT.parent / "shared" / "bench" / "events-mix.json"
#: Where the mix is looked for when ``DEFAULT_MIX`` is absent (a checkout without ../shared).
FALLBACK_MIX = ROOT / "tests" / "data" / "events-mix.json.gz"
#: The area code a number the router would refuse is given.
AREA_CODE = "201"


def load_mix(path: Path = DEFAULT_MIX) -> list[dict[str, Any]]:
    """The events of a mix file (a JSON array, gzip or not), phones made valid (see the module)."""
    if path == DEFAULT_MIX and not path.exists():
        path = FALLBACK_MIX
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SystemExit(f"no events mix at {path}: {exc.strerror}") from None
    events: list[dict[str, Any]] = orjson.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    return [_with_valid_phones(event) for event in events]


def _with_valid_phones(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        return {name: _with_valid_phones(value, name) for name, value in node.items()}
    if isinstance(node, list):
        return [_with_valid_phones(value, key) for value in node]
    if isinstance(node, str) and "phone" in key.lower():
        return valid_phone(node)
    return node


@cache
def valid_phone(number: str) -> str:
    """``number``, or for a +1 number the router would refuse, the same with area code 201."""
    try:
        if phonenumbers.is_valid_number(phonenumbers.parse(number)):
            return number
    except phonenumbers.NumberParseException:
        return number
    if number.startswith("+1") and len(number) == 12:
        return f"+1{AREA_CODE}{number[5:]}"
    return number
