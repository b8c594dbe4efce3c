"""router/screen.py: nesting depth and out-of-range numbers read from JSON bytes, against a parser."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.screen import Screened, may_hold_huge_number, nesting_depth

#: Strings full of what the screen must not be fooled by: brackets, quotes, backslashes, escapes.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list('[]{}"\\/ ae0u,:é\n')), max_size=8)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=40,
)


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.sampled_from(["orjson", "compact", "indented", "ascii"]))
def test_depth_matches_a_parser(value: Any, style: str) -> None:
    """Whatever the strings hold and however the JSON is written, the depth is the parsed value's."""
    text = {
        "orjson": lambda: orjson.dumps(value),
        "compact": lambda: json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(),
        "indented": lambda: json.dumps(value, indent=2).encode(),
        "ascii": lambda: json.dumps(value).encode(),
    }[style]()
    assert nesting_depth(text) == depth_of(value)
    assert may_hold_huge_number(text) is False or b"e" in text.lower()


@pytest.mark.parametrize("depth", [0, 1, 2, 15, 16, 17, 64, 65, 254])
def test_deep_chains(depth: int) -> None:
    """Past the quick rounds the rest is counted bracket by bracket."""
    assert nesting_depth(b'{"a":' * depth + b"[]" + b"}" * depth) == depth + 1


def test_limit_stops_counting_early() -> None:
    """4 MB of opening brackets: known to be over the limit without counting them all."""
    assert nesting_depth(b"[" * 4_000_000, limit=255) == 256


def test_nodes_at_a_level() -> None:
    """Objects and arrays inside a batch's array are counted, scalars are not."""
    body = orjson.dumps({"batch": [{}, {"a": {"b": 1}}, [1], 1, "x"], "context": {"c": {}}})
    brackets = Screened(body)
    assert brackets.containers() == 8
    assert brackets.nodes_at(3) == 4  # three events, and context.c
    assert Screened(b"]" + b"[{}]" * 3).nodes_at(2) == 6  # not JSON: every container


@pytest.mark.parametrize(
    ("text", "huge"),
    [
        (b"1e999", True),
        (b'{"v": 1e999}', True),
        (b'{"v":-1E+400,"w":2}', True),
        (b"[1.5e308]", True),  # finite: a parser decides
        (b"[1e0000000999]", True),
        (b"[" + b"9" * 310 + b"]", True),
        (b"[" + b"9" * 250 + b"e99]", True),
        (b'{"id": "8e668f3a", "n": 1e99, "t": 1e-999}', False),
        (b'{"phone": "+123456789012345"}', False),
        (b'{"hex": "deadbeefe1234"}', False),
    ],
)
def test_huge_numbers(text: bytes, huge: bool) -> None:
    """Out-of-range numbers are always caught; ids, phone numbers and small exponents are not."""
    assert may_hold_huge_number(text) is huge
