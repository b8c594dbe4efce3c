"""Intake (router/intake.py): one event in, a job per destination or a rejection out, no HTTP."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from router.destination import Destination
from router.events import NO_DEFAULTS, BatchDefaults, read_batch
from router.intake import REASON_PREFIX, Accepted, Intake, Rejected
from router.settings import MIN_SECRET_LENGTH, Settings, Source

WRITE_KEY = "wk_intake_0123456789"
SOURCE = Source(name="web", write_key=WRITE_KEY, destinations=("klaviyo", "eu"))
SETTINGS = Settings(
    sources=(SOURCE,),
    destinations=(
        Destination(name="klaviyo", private_key="pk_a"),
        Destination(name="eu", private_key="pk_b"),
    ),
    max_event_bytes=2000,
)
RECEIVED = datetime(2026, 11, 20, 8, 0, 10, tzinfo=UTC)


def prepare(
    raw: object, *, path_type: str | None = None, defaults: BatchDefaults = NO_DEFAULTS
) -> Accepted | Rejected:
    return Intake(SETTINGS).prepare(raw, received_at=RECEIVED, path_type=path_type, defaults=defaults)


def test_accepted_event_becomes_one_job_per_destination() -> None:
    """A valid event is normalised (receivedAt, skew-corrected timestamp) and fans out per destination."""
    result = prepare(
        {
            "type": "track",
            "event": "E",
            "userId": 7,
            "messageId": "m-1",
            "originalTimestamp": "2026-11-20T08:00:00Z",
        },
        defaults=BatchDefaults(sent_at="2026-11-20T08:00:05Z"),
    )
    assert isinstance(result, Accepted)
    assert (result.message_id, result.ordering_key) == ("m-1", "u:7")
    message = orjson.loads(result.payload)
    assert message["receivedAt"] == "2026-11-20T08:00:10.000Z"
    assert message["timestamp"] == "2026-11-20T08:00:05.000Z"
    jobs = result.jobs(SOURCE)
    assert [(j.source, j.destination, j.message_id) for j in jobs] == [
        ("web", "klaviyo", "m-1"),
        ("web", "eu", "m-1"),
    ]


def test_path_type_overrides() -> None:
    """A single-call path names the type."""
    result = prepare({"type": "track", "anonymousId": "a"}, path_type="identify")
    assert isinstance(result, Accepted) and orjson.loads(result.payload)["type"] == "identify"


def test_rejected_event_keeps_reason_and_event() -> None:
    """A refused event says why and keeps what came, for a dead letter per destination."""
    result = prepare({"type": "track", "event": "E", "messageId": "m-2", "writeKey": WRITE_KEY})
    assert isinstance(result, Rejected)
    assert result.reason == '"userId" or "anonymousId" is required'
    assert result.dead_reason == REASON_PREFIX + result.reason
    assert WRITE_KEY.encode() not in result.payload
    assert [(j.destination, j.message_id) for j in result.jobs(SOURCE)] == [("klaviyo", "m-2"), ("eu", "m-2")]


def test_not_an_object() -> None:
    """A non-object is wrapped for its dead letter; a messageId is made up for the job."""
    result = prepare([1, 2])
    assert isinstance(result, Rejected) and result.message_id is None
    assert orjson.loads(result.payload) == {"raw_event": [1, 2]}
    assert all(job.message_id for job in result.jobs(SOURCE))


def test_event_size_limit() -> None:
    """The serialised message is held to max_event_bytes."""
    result = prepare({"type": "track", "event": "E", "userId": "u", "properties": {"x": "y" * 3000}})
    assert isinstance(result, Rejected) and result.reason.endswith("(max_event_bytes)")


# --- what delivery could not carry, and write keys: the same on every path ---------------------

OTHER_KEY = "wk_other_source_abcdef"
GUARDED = replace(
    SETTINGS,
    sources=(SOURCE, Source(name="app", write_key=OTHER_KEY, destinations=("klaviyo",))),
    max_nesting_depth=8,
)


def guarded(raw: object, *, screened: bool = False, **options: Any) -> Accepted | Rejected:
    return Intake(GUARDED).prepare(raw, received_at=RECEIVED, screened=screened, **options)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_timestamps_out_of_range_are_rejected() -> None:
    """sentAt 9999 and originalTimestamp 0001 cannot be corrected for skew: a clear rejection."""
    event = {"type": "track", "event": "E", "userId": "u", "originalTimestamp": "0001-01-01T00:00:00Z"}
    result = guarded(event, defaults=BatchDefaults(sent_at="9999-12-31T23:59:59Z"))
    assert isinstance(result, Rejected) and result.reason.startswith('"timestamp" cannot be derived')
    result = guarded({**event, "originalTimestamp": "0001-01-01T00:00:00+14:00"})
    assert isinstance(result, Rejected) and "must be an ISO 8601 date-time string" in result.reason


def test_nesting_limit_names_the_field() -> None:
    """An event nesting past max_nesting_depth is refused, naming the field; at the limit it passes."""
    event = {"type": "track", "event": "E", "userId": "u"}
    assert isinstance(guarded({**event, "properties": {"d": nested(6)}}), Accepted)  # 8 levels
    result = guarded({**event, "properties": {"d": nested(7)}})
    assert isinstance(result, Rejected)
    assert result.reason == '"properties" nests deeper than 8 levels (max_nesting_depth)'
    assert orjson.loads(result.payload)["raw_text"].startswith("{")  # kept, as text


def test_nesting_too_deep_for_any_encoder() -> None:
    """Python objects nested past what can be serialised at all (replay's parsed lines)."""
    result = guarded({"type": "track", "event": "E", "userId": "u", "properties": nested(5000)})
    assert isinstance(result, Rejected) and "(max_nesting_depth)" in result.reason


def test_numbers_out_of_range_are_rejected() -> None:
    """1e999 inside a raw part (as read_batch leaves it) or in a decoded field: refused, named."""
    events, _ = read_batch(
        b'{"batch": [{"type": "track", "event": "E", "userId": "u", "properties": {"v": 1e999}},'
        b' {"type": "track", "event": "E", "userId": 1e999}, {"type": "track", "event": "E", "userId": "u",'
        b' "properties": {"v": 1e300}}]}'
    ) or ([], None)
    first, second, third = (guarded(event) for event in events)
    assert isinstance(first, Rejected) and first.reason.startswith('"properties" holds a number out of range')
    assert isinstance(second, Rejected) and second.reason.startswith('"userId" holds a number out of range')
    assert '"properties":{"v": 1e999}' in orjson.loads(first.payload)["raw_text"]
    assert isinstance(third, Accepted)


def test_write_keys_are_scrubbed_wherever_they_are() -> None:
    """Any source's key, whole or inside a string, plain or JSON-escaped, in values, keys, the
    messageId, the userId (ordering key) and reasons, is stored as ***."""
    escaped = "\\u0077\\u006B" + WRITE_KEY[2:]  # "wk..." with its first two characters escaped
    events, _ = read_batch(
        orjson.dumps(
            {
                "batch": [
                    {
                        "type": "track",
                        "event": "E",
                        "userId": WRITE_KEY,
                        "messageId": f"m-{OTHER_KEY}",
                        "context": {"writeKey": WRITE_KEY, OTHER_KEY: 1},
                        "properties": {"note": f"key={WRITE_KEY}!", "escaped": "x"},
                    },
                    {"type": WRITE_KEY, "userId": "u", "messageId": WRITE_KEY},
                ]
            }
        ).replace(b'"escaped":"x"', b'"escaped":"' + escaped.encode() + b'"')
    ) or ([], None)
    accepted, rejected = (guarded(event) for event in events)
    assert isinstance(accepted, Accepted) and isinstance(rejected, Rejected)
    assert (accepted.message_id, accepted.ordering_key) == ("m-***", "u:***")
    stored = orjson.loads(accepted.payload)
    assert stored["context"] == {"writeKey": "***", "***": 1}
    assert stored["properties"] == {"note": "key=***!", "escaped": "***"}
    assert (
        rejected.message_id == "***"
        and rejected.reason == '"type" must be one of identify, track, page, screen, group, alias, got "***"'
    )
    for text in (accepted.payload, rejected.payload, rejected.reason.encode(), rejected.dead_reason.encode()):
        assert WRITE_KEY.encode() not in text and OTHER_KEY.encode() not in text and b"\\u0077" not in text


def test_screened_text_skips_the_checks() -> None:
    """A text the screen passes needs no per-event check; one it fails gets them."""
    intake = Intake(GUARDED)
    clean = orjson.dumps({"batch": [{"type": "track", "event": "E", "userId": "u"}]})
    assert intake.screen(clean).clean
    for dirty in (
        clean.replace(b'"u"', b'"' + WRITE_KEY.encode() + b'"'),
        clean.replace(b'"u"', b'"\\u0077"'),  # an escaped character of a key
        clean.replace(b'"u"}', b'"u","v":1e400}'),
        clean.replace(b'"u"}', b'"u","d":' + orjson.dumps(nested(7)) + b"}"),
    ):
        assert not intake.screen(dirty).clean, dirty
    assert intake.screen(b"[" * 300 + b"]" * 300).depth > 255


def test_every_write_key_is_scrubbed_and_a_short_one_is_refused() -> None:
    """The shortest key the settings accept is masked wherever it is, inside a longer word too; a
    shorter one is refused: it could not be masked without masking ordinary text (a key ``k`` in
    every ``track``)."""
    key = "shortest-key-16c"
    assert len(key) == MIN_SECRET_LENGTH
    shortest = replace(SETTINGS, sources=(Source(name="s", write_key=key, destinations=("klaviyo",)),))
    event = {"type": "track", "event": "E", "userId": "u", "properties": {"p": f"before{key}after"}}
    result = Intake(shortest).prepare(event, received_at=RECEIVED)
    assert isinstance(result, Accepted)
    assert orjson.loads(result.payload)["properties"] == {"p": "before***after"}
    short = replace(SETTINGS, sources=(Source(name="s", write_key=key[:-1], destinations=("klaviyo",)),))
    with pytest.raises(
        ValueError, match=f"a write key of 15 characters .* need at least {MIN_SECRET_LENGTH}"
    ):
        Intake(short)


def test_keys_escaped_inside_an_event_kept_as_text() -> None:
    """An event refused as text (a number out of range) still has its escaped key scrubbed."""
    escaped = b"\\u0077\\u006B" + WRITE_KEY[2:].encode()
    events, _ = read_batch(
        b'{"batch": [{"type": "track", "event": "E", "userId": "u", "properties": {"v": 1e999, "k": "'
        + escaped
        + b'"}}]}'
    ) or ([], None)
    result = guarded(events[0])
    assert isinstance(result, Rejected) and "out of range" in result.reason
    assert '"k": "***"' in orjson.loads(result.payload)["raw_text"]
    assert WRITE_KEY[2:].encode() not in result.payload
