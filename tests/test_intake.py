"""Intake (router/intake.py): one event in, a job per destination or a rejection out, no HTTP."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from router.destination import Destination
from router.events import NO_DEFAULTS, BatchDefaults
from router.intake import REASON_PREFIX, Accepted, Intake, Rejected
from router.settings import Settings, Source

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
