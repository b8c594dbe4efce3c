"""The RudderStack/Segment message model: normalisation and JSON Schema validation.

Ingest turns each raw event into a message in two steps:

1. :func:`normalize` (never looks at more than it needs): the type comes from the path of a
   single call, batch-level ``sentAt``/``context``/``integrations`` fill what the event lacks,
   numeric ids become strings, ``messageId`` is generated when absent, ``receivedAt`` is stamped
   and ``timestamp`` is derived (clock-skew corrected) when the event has none.
2. :func:`validate` checks the result against ``router/schemas/message.json``: one definition per
   call type, each compiled once (fastjsonschema) at import. Errors name the field. A hand-written
   check (:func:`_plainly_valid`) lets the common, valid message through first without the
   compiled validator (which raises and catches an exception for every anonymous event); it only
   ever says "valid" for what the schema accepts, and anything else goes to the schema.

Ingest never needs the inside of ``context``, ``traits`` or ``properties``: it only stores them. So a
plain batch body is read by :func:`read_batch` with each event's top-level fields as raw JSON
(``msgspec.Raw``, spans of the body), decoding only the fields in :data:`READ_FIELDS`; the other
values go back into the stored payload as the bytes they came as (:func:`encode`). Parsing every
nested object into Python objects, serialising it again and freeing it took about half of the
event loop's time per batch. Both steps above take such partly decoded messages as they are.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import fastjsonschema
import msgspec

from router.errors import BadEvent

#: The JSON Schema of a message (draft-07), as shipped in the package.
SCHEMA: dict[str, Any] = json.loads(
    resources.files("router").joinpath("schemas/message.json").read_text(encoding="utf-8")
)
#: Call types, in the schema's order.
TYPES: tuple[str, ...] = tuple(SCHEMA["properties"]["type"]["enum"])
_ID_FIELDS = ("userId", "anonymousId", "groupId", "previousId")
_BATCH_OBJECTS = ("context", "integrations")


def is_timestamp(value: str) -> bool:
    """True for an ISO 8601 date or date-time string (the schema's ``iso-timestamp`` format) that
    names a moment in UTC's years 1 to 9999 (``0001-01-01T00:00:00+14:00`` does not)."""
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.year in (1, 9999) and parsed.tzinfo is not None:
            parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        return False
    return True


def parse_timestamp(value: Any) -> datetime | None:
    """An aware datetime from an ISO 8601 string (no zone means UTC), or None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@functools.lru_cache(maxsize=16)
def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-11-20T08:00:00.246Z``.

    Cached: every event of a request is stamped with the same ``receivedAt``. (Aware datetimes
    that are equal name the same instant, so they share one UTC text.)"""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def format_unix_time(seconds: float) -> str:
    """Unix time to the second, as the commands show it: ``2026-11-20T08:00:00Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _inline(node: Any) -> Any:
    """``node`` with every ``#/definitions/...`` reference replaced by its target (faster code)."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]])
        return {key: _inline(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [_inline(item) for item in node]
    return node


def _compile(call_type: str) -> Callable[[Any], Any]:
    document = {"$schema": SCHEMA["$schema"], **_inline(SCHEMA["definitions"][call_type])}
    validator: Callable[[Any], Any] = fastjsonschema.compile(
        document, formats={"iso-timestamp": is_timestamp}, use_default=False
    )
    return validator


_VALIDATORS: dict[str, Callable[[Any], Any]] = {t: _compile(t) for t in TYPES}

_ABSENT = object()
#: Fields the ``common`` definition types, as checked by :func:`_plainly_valid`.
_OBJECT_FIELDS = ("traits", "properties", "context", "integrations")
_NULLABLE_STRING_FIELDS = ("name", "category")
_TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")
#: Per call type, the field that must hold a present id (``presentId``), if any.
_REQUIRED_ID: dict[object, str] = {"group": "groupId", "alias": "previousId"}
#: The top-level fields normalisation and the quick check read: decoded by :func:`read_batch`,
#: which leaves every other field as raw JSON.
READ_FIELDS = frozenset(
    {"type", "messageId", "event", *_ID_FIELDS, *_NULLABLE_STRING_FIELDS, *_TIMESTAMP_FIELDS}
)


def _present_id(value: Any) -> bool:
    """``presentId``: a non-empty string or a number."""
    kind = type(value)
    return (kind is str and value != "") or kind is int or kind is float


def _plainly_valid(message: Mapping[str, Any], call_type: object) -> bool:
    """True only for a message the schema's definition of ``call_type`` accepts (the common case).

    False means "not sure": the compiled schema decides and explains. Types are compared exactly
    (a subclass is left to the schema). Kept in step with ``schemas/message.json`` by
    ``tests/test_events.py``, which compares both on mutated events.
    """
    if type(message) is not dict or message.get("type") != call_type:
        return False
    get = message.get
    message_id = get("messageId")
    if type(message_id) is not str or not 0 < len(message_id) <= 255:
        return False
    if not all(map(_plain_id, map(get, _ID_FIELDS))):
        return False
    if not (_present_id(get("userId")) or _present_id(get("anonymousId"))):
        return False
    event = get("event", _ABSENT)
    if call_type == "track":
        if type(event) is not str or event == "":
            return False
    elif event is not _ABSENT and type(event) is not str:
        return False
    required_id = _REQUIRED_ID.get(call_type)
    if required_id is not None and not _present_id(get(required_id)):
        return False
    return _plain_fields(get)


def _plain_id(value: Any) -> bool:
    """``id``: absent, null, a string of at most 255 characters, or a number."""
    kind = type(value)
    return value is None or (kind is str and len(value) <= 255) or kind is int or kind is float


def _plain_fields(get: Callable[..., Any]) -> bool:
    """The optional typed fields of ``common``: right type when present."""
    for key in _NULLABLE_STRING_FIELDS:
        value = get(key)
        if value is not None and type(value) is not str:
            return False
    for key in _OBJECT_FIELDS:
        value = get(key, _ABSENT)
        if value is not _ABSENT and type(value) is not dict and not _raw_object(value):
            return False
    for key in _TIMESTAMP_FIELDS:
        value = get(key, _ABSENT)
        if value is not _ABSENT and not (type(value) is str and is_timestamp(value)):
            return False
    return True


@dataclass(frozen=True, slots=True)
class BatchDefaults:
    """Top-level fields of a batch body that apply to every event lacking them."""

    sent_at: str | None = None
    context: Mapping[str, Any] | None = None
    integrations: Mapping[str, Any] | None = None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> BatchDefaults:
        """Read ``sentAt``, ``context`` and ``integrations`` of a batch body; BadEvent if mistyped."""
        sent_at = body.get("sentAt")
        if sent_at is not None and not (isinstance(sent_at, str) and is_timestamp(sent_at)):
            raise BadEvent(f'"sentAt" must be an ISO 8601 date-time string, got {describe(sent_at)}')
        objects: dict[str, Mapping[str, Any] | None] = {}
        for key in _BATCH_OBJECTS:
            value = body.get(key)
            if value is not None and not isinstance(value, dict):
                raise BadEvent(f'"{key}" must be an object, got {_kind(value)}')
            objects[key] = value or None
        return cls(sent_at=sent_at, context=objects["context"], integrations=objects["integrations"])


NO_DEFAULTS = BatchDefaults()


def normalize(
    raw: Any,
    *,
    path_type: str | None = None,
    batch_defaults: BatchDefaults = NO_DEFAULTS,
    received_at: datetime,
    where: str = "",
) -> dict[str, Any]:
    """The message for a raw event (a new dict; ``raw`` is not changed).

    ``path_type`` is the call type of a single-call path (it overrides the event's ``type``),
    ``received_at`` the server's arrival time. ``writeKey`` is removed. Raises :class:`BadEvent`
    when ``raw`` is not an object.
    """
    if not isinstance(raw, dict):
        raise BadEvent(f"{_prefix(where)}an event must be a JSON object, got {_kind(raw)}")
    message = dict(raw)
    message.pop("writeKey", None)
    if path_type is not None:
        message["type"] = path_type
    if batch_defaults is not NO_DEFAULTS:
        _merge_defaults(message, batch_defaults)
    for key in _ID_FIELDS:
        value = message.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            message[key] = str(value)
    message_id = message.get("messageId")
    if message_id is None or message_id == "":
        message["messageId"] = str(uuid.uuid4())
    elif isinstance(message_id, int | float) and not isinstance(message_id, bool):
        message["messageId"] = str(message_id)
    received = format_timestamp(received_at)
    message["receivedAt"] = received
    if message.get("timestamp") in (None, ""):
        message["timestamp"] = _timestamp(message, received_at, received)
    return message


def _merge_defaults(message: dict[str, Any], defaults: BatchDefaults) -> None:
    if defaults.sent_at is not None and message.get("sentAt") in (None, ""):
        message["sentAt"] = defaults.sent_at
    for key, value in (("context", defaults.context), ("integrations", defaults.integrations)):
        if value is None:
            continue
        own = message.get(key)
        if own is None:
            message[key] = dict(value)
        elif isinstance(own, dict):
            message[key] = {**value, **own}


def _timestamp(message: Mapping[str, Any], received_at: datetime, received: str) -> str:
    """``receivedAt - (sentAt - originalTimestamp)``, else ``originalTimestamp``, else ``receivedAt``."""
    original = message.get("originalTimestamp")
    original_at = parse_timestamp(original)
    sent_at = parse_timestamp(message.get("sentAt"))
    if original_at is not None and sent_at is not None:
        try:
            return format_timestamp(received_at - (sent_at - original_at))
        except OverflowError:
            raise BadEvent(
                '"timestamp" cannot be derived: receivedAt - (sentAt - originalTimestamp) falls outside '
                "the years 1 to 9999"
            ) from None
    if original_at is not None:
        return str(original)
    return received


def validate(message: Mapping[str, Any], *, where: str = "") -> None:
    """Check a normalised message against the schema; :class:`BadEvent` names the field and the problem."""
    call_type = message.get("type")
    validator = _VALIDATORS.get(call_type) if isinstance(call_type, str) else None
    if validator is None:
        if call_type is None:
            raise BadEvent(f'{_prefix(where)}"type" is required')
        choices = ", ".join(TYPES)
        raise BadEvent(f'{_prefix(where)}"type" must be one of {choices}, got {describe(call_type)}')
    if _plainly_valid(message, call_type):
        return
    try:
        validator(decoded(message))
    except fastjsonschema.JsonSchemaValueException as exc:
        raise BadEvent(_prefix(where) + _explain(exc, str(call_type))) from None


def _explain(exc: fastjsonschema.JsonSchemaValueException, call_type: str) -> str:
    name = (exc.name or "data").removeprefix("data").removeprefix(".")
    rule = exc.rule
    if rule == "anyOf" and not name:
        return '"userId" or "anonymousId" is required'
    if rule == "required":
        missing = [
            k for k in (exc.rule_definition or []) if not isinstance(exc.value, dict) or k not in exc.value
        ]
        field = missing[0] if missing else "?"
        return f'"{field}" is required for {call_type}'
    if rule == "type":
        return f'"{name}" must be {_expected(exc.rule_definition)}, got {_kind(exc.value)}'
    if rule == "minLength":
        return f'"{name}" must not be empty'
    if rule == "maxLength":
        return f'"{name}" is longer than {exc.rule_definition} characters'
    if rule == "format":
        return f'"{name}" must be an ISO 8601 date-time string, got {describe(exc.value)}'
    return f'"{name or "event"}" is invalid: {exc.message}'


_TYPE_NAMES = {"object": "an object", "string": "a string", "number": "a number", "null": "null"}


def _expected(definition: Any) -> str:
    kinds = [definition] if isinstance(definition, str) else list(definition or [])
    names = [_TYPE_NAMES.get(k, k) for k in kinds if k != "null"]
    return " or ".join(names) or "null"


def _kind(value: Any) -> str:
    """The JSON type of a value, for error texts: ``a string``, ``an array``, ..."""
    if isinstance(value, str):
        return "a string"
    return describe(value)


def describe(value: Any) -> str:
    """A short description of a JSON value for error texts (a string's first 40 characters at most)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, int | float):
        return "a number"
    text = str(value)
    return json.dumps(text if len(text) <= 40 else text[:37] + "...")


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


# ---------------------------------------------------------------- batches read partly


class _Batch(msgspec.Struct):
    """A batch body as :func:`read_batch` takes it; anything else fails to decode."""

    batch: list[dict[str, msgspec.Raw]]
    sentAt: str | None = None
    context: msgspec.Raw | None = None
    integrations: msgspec.Raw | None = None


_BATCH_DECODER = msgspec.json.Decoder(_Batch)
_VALUE_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


def read_batch(body: bytes) -> tuple[list[dict[str, Any]], BatchDefaults] | None:
    """The events of a plain batch body, only their :data:`READ_FIELDS` decoded, and its defaults.

    None for anything else (not a JSON object with a non-empty array of objects under ``batch``,
    batch-level ``context`` or ``integrations`` to merge, a ``sentAt`` that is no timestamp, text
    that is not UTF-8, nesting too deep to parse): the caller parses such a body in full and
    explains what is wrong. A field of :data:`READ_FIELDS` holding a number out of range is left
    raw, for intake to refuse that event (:mod:`router.intake`).
    """
    try:
        body.decode("utf-8")  # the raw spans are not checked for it
        parsed = _BATCH_DECODER.decode(body)
    except (UnicodeDecodeError, msgspec.MsgspecError, RecursionError):
        return None
    sent_at = parsed.sentAt
    if (
        not parsed.batch
        or parsed.context is not None
        or parsed.integrations is not None
        or (sent_at is not None and not is_timestamp(sent_at))
    ):
        return None
    return [_read_fields(event) for event in parsed.batch], BatchDefaults(sent_at=sent_at)


_EVENT_DECODER = msgspec.json.Decoder(dict[str, msgspec.Raw])


def read_event(text: bytes) -> dict[str, Any] | None:
    """One event's JSON text read as :func:`read_batch` reads each event of a batch body: only
    :data:`READ_FIELDS` decoded (``replay`` reads captured NDJSON lines so). None for anything else
    (not a JSON object, text that is not UTF-8): the caller parses it in full and explains."""
    try:
        text.decode("utf-8")  # the raw spans are not checked for it
        event = _EVENT_DECODER.decode(text)
    except (UnicodeDecodeError, msgspec.MsgspecError):
        return None
    return _read_fields(event)


def _read_fields(event: dict[str, msgspec.Raw]) -> dict[str, Any]:
    """``event`` with its :data:`READ_FIELDS` decoded."""
    try:
        return {
            key: _VALUE_DECODER.decode(value) if key in READ_FIELDS else value for key, value in event.items()
        }
    except msgspec.MsgspecError:  # a number out of range (the only thing msgspec had not checked)
        return {key: _read_field(value) if key in READ_FIELDS else value for key, value in event.items()}


def _read_field(value: msgspec.Raw) -> Any:
    """A field's value decoded; raw when it cannot be (the event is refused for it at intake)."""
    try:
        return _VALUE_DECODER.decode(value)
    except msgspec.MsgspecError:
        return value


def _raw_object(value: Any) -> bool:
    """A raw JSON object (as :func:`read_batch` leaves ``context``, ``traits``, ...)."""
    return type(value) is msgspec.Raw and memoryview(value)[0] == 0x7B  # "{"


def decoded(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """``message`` with its raw JSON values decoded (itself when it has none)."""
    if not any(type(value) is msgspec.Raw for value in message.values()):
        return message
    return {k: _VALUE_DECODER.decode(v) if type(v) is msgspec.Raw else v for k, v in message.items()}


def encode(message: Mapping[str, Any]) -> bytes:
    """A message as JSON bytes; raw JSON values are copied as they are."""
    return _ENCODER.encode(message)
