"""The message model: normalisation (ids, receivedAt, batch defaults, clock skew) and schema validation."""

from __future__ import annotations

import gzip
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import orjson
import pytest

from router.errors import BadEvent
from router.events import (
    SCHEMA,
    BatchDefaults,
    encode,
    format_timestamp,
    normalize,
    read_batch,
    validate,
)

RECEIVED = datetime(2026, 11, 20, 8, 0, 10, 500_000, tzinfo=UTC)
MIX = Path(__file__).parent / "data" / "events-mix.json.gz"


def mix() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = orjson.loads(gzip.decompress(MIX.read_bytes()))
    return events


def message(raw: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return normalize(raw, received_at=RECEIVED, **kwargs)


def partly(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` as :func:`read_batch` reads it out of a batch body."""
    plain = read_batch(orjson.dumps({"batch": [raw]}))
    assert plain is not None
    return plain[0][0]


class TestNormalize:
    """normalize() fills what ingest owes every message and changes nothing else."""

    def test_type_from_path_wins(self) -> None:
        """A single call's path names the type, whatever the body says."""
        assert message({"type": "identify", "userId": "u"}, path_type="track")["type"] == "track"

    def test_message_id_generated_when_absent(self) -> None:
        """Absent or empty messageId becomes a fresh UUID4; a given one is kept."""
        generated = message({"userId": "u"})["messageId"]
        assert uuid.UUID(generated).version == 4
        assert message({"userId": "u", "messageId": ""})["messageId"] != ""
        assert message({"userId": "u", "messageId": "m-1"})["messageId"] == "m-1"

    def test_numeric_ids_become_strings(self) -> None:
        """userId, anonymousId, groupId, previousId and messageId numbers are turned into strings."""
        out = message({"userId": 42, "anonymousId": 1.5, "groupId": 7, "previousId": 8, "messageId": 9})
        assert [out[k] for k in ("userId", "anonymousId", "groupId", "previousId", "messageId")] == [
            "42",
            "1.5",
            "7",
            "8",
            "9",
        ]

    def test_received_at_stamped(self) -> None:
        """receivedAt is the server's time, RFC 3339 with milliseconds, overriding the client's."""
        assert message({"userId": "u", "receivedAt": "2000-01-01T00:00:00Z"})["receivedAt"] == (
            "2026-11-20T08:00:10.500Z"
        )

    def test_write_key_removed_and_input_untouched(self) -> None:
        """writeKey never travels further; the raw dict is not modified."""
        raw = {"userId": "u", "writeKey": "secret"}
        out = message(raw)
        assert "writeKey" not in out
        assert raw == {"userId": "u", "writeKey": "secret"}

    @pytest.mark.parametrize("raw", [[1], "text", 3, None, True])
    def test_non_object_rejected(self, raw: Any) -> None:
        """Anything but a JSON object is a BadEvent saying what it was."""
        with pytest.raises(BadEvent, match="an event must be a JSON object"):
            normalize(raw, received_at=RECEIVED, where="batch[2]")


class TestTimestamp:
    """timestamp = receivedAt - (sentAt - originalTimestamp) when absent."""

    def test_clock_skew_corrected(self) -> None:
        """A client clock 1 h fast: the event happened 2 s before it was received."""
        out = message(
            {
                "userId": "u",
                "originalTimestamp": "2026-11-20T09:00:00Z",
                "sentAt": "2026-11-20T09:00:02.000+00:00",
            }
        )
        assert out["timestamp"] == "2026-11-20T08:00:08.500Z"

    def test_batch_sent_at_used(self) -> None:
        """The batch-level sentAt counts when the event has none."""
        out = message(
            {"userId": "u", "originalTimestamp": "2026-11-20T09:00:00Z"},
            batch_defaults=BatchDefaults(sent_at="2026-11-20T09:00:01Z"),
        )
        assert (out["timestamp"], out["sentAt"]) == ("2026-11-20T08:00:09.500Z", "2026-11-20T09:00:01Z")

    def test_given_timestamp_kept(self) -> None:
        """An explicit timestamp is authoritative (historical import) and kept verbatim."""
        raw = {"userId": "u", "timestamp": "2020-01-01T00:00:00+02:00", "sentAt": "2026-11-20T09:00:00Z"}
        assert message(raw)["timestamp"] == "2020-01-01T00:00:00+02:00"

    def test_fallbacks(self) -> None:
        """Without sentAt the originalTimestamp is used; without either, receivedAt."""
        assert message({"userId": "u", "originalTimestamp": "2026-01-01T00:00:00Z"})["timestamp"] == (
            "2026-01-01T00:00:00Z"
        )
        assert message({"userId": "u"})["timestamp"] == format_timestamp(RECEIVED)


class TestBatchDefaults:
    """Batch-level sentAt, context and integrations fill what each event lacks."""

    def test_merge(self) -> None:
        """Absent keys are taken from the batch; present objects are merged, the event winning."""
        defaults = BatchDefaults.from_body(
            {
                "sentAt": "2026-11-20T08:00:00Z",
                "context": {"ip": "1.2.3.4", "library": {"name": "batch"}},
                "integrations": {"All": False},
            }
        )
        plain = message({"userId": "u"}, batch_defaults=defaults)
        assert plain["context"] == {"ip": "1.2.3.4", "library": {"name": "batch"}}
        assert plain["integrations"] == {"All": False}
        own = message(
            {"userId": "u", "sentAt": "2026-11-20T07:00:00Z", "context": {"library": {"name": "own"}}},
            batch_defaults=defaults,
        )
        assert own["context"] == {"ip": "1.2.3.4", "library": {"name": "own"}}
        assert own["sentAt"] == "2026-11-20T07:00:00Z"

    @pytest.mark.parametrize(
        ("body", "error"),
        [
            ({"context": []}, '"context" must be an object, got an array'),
            ({"integrations": "all"}, '"integrations" must be an object, got a string'),
            ({"sentAt": "yesterday"}, '"sentAt" must be an ISO 8601 date-time string, got "yesterday"'),
        ],
    )
    def test_mistyped(self, body: dict[str, Any], error: str) -> None:
        """Mistyped batch-level fields are a BadEvent naming the field."""
        with pytest.raises(BadEvent) as caught:
            BatchDefaults.from_body(body)
        assert caught.value.message == error


class TestValidate:
    """validate() accepts the spec's messages and names the field of every problem."""

    def test_mix_is_valid(self) -> None:
        """All 1000 events of the benchmark mix pass."""
        for event in mix():
            validate(message(event))

    @pytest.mark.parametrize(
        ("raw", "error"),
        [
            ({"type": "track", "event": "E"}, '"userId" or "anonymousId" is required'),
            (
                {"type": "track", "userId": "", "anonymousId": None, "event": "E"},
                '"userId" or "anonymousId" is required',
            ),
            (
                {"type": "pageview", "userId": "u"},
                '"type" must be one of identify, track, page, screen, group, alias, got "pageview"',
            ),
            ({"userId": "u"}, '"type" is required'),
            (
                {"type": 5, "userId": "u"},
                '"type" must be one of identify, track, page, screen, group, alias, got a number',
            ),
            ({"type": "track", "userId": "u"}, '"event" is required for track'),
            ({"type": "track", "userId": "u", "event": ""}, '"event" must not be empty'),
            ({"type": "group", "userId": "u"}, '"groupId" is required for group'),
            ({"type": "alias", "userId": "u"}, '"previousId" is required for alias'),
            (
                {"type": "identify", "userId": "u", "traits": ["a"]},
                '"traits" must be an object, got an array',
            ),
            (
                {"type": "track", "userId": "u", "event": "E", "properties": "x"},
                '"properties" must be an object, got a string',
            ),
            ({"type": "identify", "userId": "u", "context": 1}, '"context" must be an object, got a number'),
            ({"type": "identify", "userId": {"id": 1}}, '"userId" or "anonymousId" is required'),
            (
                {"type": "identify", "anonymousId": "a", "userId": True},
                '"userId" must be a string or a number, got a boolean',
            ),
            (
                {"type": "identify", "userId": "u", "timestamp": "last tuesday"},
                '"timestamp" must be an ISO 8601 date-time string, got "last tuesday"',
            ),
            ({"type": "page", "userId": "u", "name": 3}, '"name" must be a string, got a number'),
            ({"type": "identify", "userId": "x" * 300}, '"userId" is longer than 255 characters'),
        ],
    )
    @pytest.mark.parametrize("read", [dict, partly], ids=["parsed", "read-partly"])
    def test_errors(self, raw: dict[str, Any], error: str, read: Any) -> None:
        """Each problem is reported with the field name, prefixed by where the event was, whether
        the event was parsed in full or read partly out of a batch body."""
        with pytest.raises(BadEvent) as caught:
            validate(message(read(raw)), where="batch[3]")
        assert caught.value.message == f"batch[3]: {error}"

    @pytest.mark.parametrize(
        "raw",
        [
            {"type": "identify", "anonymousId": "a"},
            {"type": "identify", "userId": 12345},
            {"type": "page", "userId": "u", "name": None, "category": None},
            {"type": "screen", "userId": "u", "properties": {}},
            {"type": "group", "userId": "u", "groupId": 77, "traits": {"subscribe": True}},
            {"type": "alias", "userId": "new", "previousId": "old"},
            {"type": "track", "anonymousId": "a", "event": "E", "timestamp": "2026-11-20"},
            {"type": "track", "anonymousId": "a", "event": "E", "unknownField": [1, 2]},
        ],
    )
    def test_valid(self, raw: dict[str, Any]) -> None:
        """Every call type with its minimum fields passes; unknown fields are allowed."""
        validate(message(raw))


class TestSchemaDocument:
    """The shipped JSON Schema is a valid draft-07 document that agrees with the compiled validators."""

    def test_check_schema(self) -> None:
        """The document itself is valid draft-07."""
        jsonschema.Draft7Validator.check_schema(SCHEMA)

    @pytest.mark.parametrize(
        "raw",
        [
            {"type": "track", "userId": "u", "event": "E"},
            {"type": "track", "userId": "u"},
            {"type": "group", "anonymousId": "a", "groupId": "g"},
            {"type": "group", "anonymousId": "a"},
            {"type": "alias", "userId": "u", "previousId": "p"},
            {"type": "identify"},
            {"type": "identify", "userId": "u", "traits": 1},
            {"type": "nope", "userId": "u"},
        ],
    )
    def test_root_agrees(self, raw: dict[str, Any]) -> None:
        """The root schema (dispatching on type) and the per-type validators give the same verdict."""
        normalized = message(raw)
        root_valid = jsonschema.Draft7Validator(SCHEMA).is_valid(normalized)
        try:
            validate(normalized)
            fast_valid = True
        except BadEvent:
            fast_valid = False
        assert root_valid == fast_valid


class TestPlainlyValid:
    """The quick pre-check never lets through what the compiled schema would reject."""

    VALUES: tuple[Any, ...] = (
        None,
        "",
        "x",
        "x" * 256,
        0,
        1.5,
        True,
        {},
        {"a": 1},
        [],
        ["a"],
        "2026-11-20T08:00:00.246Z",
        "2026-11-20",
        "last tuesday",
    )
    FIELDS = (
        *("type", "messageId", "userId", "anonymousId", "groupId", "previousId", "event", "name"),
        *("category", "traits", "properties", "context", "integrations", "timestamp"),
        *("originalTimestamp", "sentAt", "receivedAt"),
    )

    @staticmethod
    def schema_valid(message: dict[str, Any], call_type: str) -> bool:
        import fastjsonschema

        from router.events import _VALIDATORS

        try:
            _VALIDATORS[call_type](message)
        except fastjsonschema.JsonSchemaValueException:
            return False
        return True

    def test_takes_the_mix(self) -> None:
        """The benchmark mix passes the quick check (so the compiled validator is not needed)."""
        from router.events import _plainly_valid

        assert all(_plainly_valid(m, m["type"]) for m in map(message, mix()))

    @pytest.mark.parametrize("call_type", ["identify", "track", "page", "screen", "group", "alias"])
    def test_agrees_with_the_schema_on_mutations(self, call_type: str) -> None:
        """Every field set to every kind of value, or removed, one and two at a time."""
        from router.events import _ABSENT, _plainly_valid

        base = message(
            {"type": call_type, "userId": "u", "event": "E", "groupId": "g", "previousId": "p", "name": "n"}
        )
        mutations: list[dict[str, Any]] = []
        for field in self.FIELDS:
            for value in (*self.VALUES, _ABSENT):
                mutated = dict(base)
                if value is _ABSENT:
                    mutated.pop(field, None)
                else:
                    mutated[field] = value
                mutations.append(mutated)
        for first in ("userId", "anonymousId"):
            for value in self.VALUES:
                for other in self.VALUES:
                    mutations.append(
                        {**base, first: value, "anonymousId" if first == "userId" else "userId": other}
                    )
        accepted = 0
        for mutated in mutations:
            if _plainly_valid(mutated, call_type):
                accepted += 1
                assert self.schema_valid(mutated, call_type), mutated
            # read partly out of a batch body (objects left raw), the quick check decides alike
            assert _plainly_valid(partly(mutated), call_type) == _plainly_valid(mutated, call_type), mutated
        assert accepted > len(self.FIELDS)


class TestReadBatch:
    """read_batch() decodes what ingest reads and leaves the rest as the raw JSON it came as."""

    def test_reads_the_fields_ingest_reads(self) -> None:
        raw = {"type": "track", "userId": 7, "event": "E", "properties": {"a": [1, {"b": None}]}, "x": "y"}
        plain = read_batch(orjson.dumps({"batch": [raw], "sentAt": "2026-11-20T08:00:00Z"}))
        assert plain is not None
        [event], defaults = plain
        assert (event["type"], event["userId"], event["event"]) == ("track", 7, "E")
        assert type(event["properties"]) is msgspec.Raw and type(event["x"]) is msgspec.Raw
        assert defaults == BatchDefaults(sent_at="2026-11-20T08:00:00Z")

    def test_stores_what_a_full_parse_stores(self) -> None:
        """Every event of the mix: normalised and encoded from the partly read event, the payload
        says exactly what it says when the event is parsed in full."""
        events = mix()
        plain = read_batch(orjson.dumps({"batch": events, "sentAt": "2026-11-20T08:00:01Z"}))
        assert plain is not None
        defaults = BatchDefaults(sent_at="2026-11-20T08:00:01Z")
        for read, full in zip(plain[0], events, strict=True):
            partly_read = message(read, batch_defaults=defaults)
            validate(partly_read)
            expected = message(full, batch_defaults=defaults)
            assert orjson.loads(encode(partly_read)) == expected

    @pytest.mark.parametrize(
        "body",
        [
            b"not json",
            b"[]",
            b'{"batch": []}',
            b'{"batch": {}}',
            b'{"batch": [1]}',
            b'{"batch": [{}], "context": {"ip": "1.2.3.4"}}',
            b'{"batch": [{}], "integrations": {"All": false}}',
            b'{"batch": [{}], "sentAt": "yesterday"}',
            b'{"batch": [{}], "sentAt": 5}',
            b'{"batch": [{"type": "track", "properties": {"a": "\xff"}}]}',
        ],
    )
    def test_leaves_other_bodies_to_a_full_parse(self, body: bytes) -> None:
        """Not a plain batch, defaults to merge, a bad sentAt, text that is not UTF-8: None."""
        assert read_batch(body) is None
