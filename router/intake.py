"""Intake: what every way in does to one event before it is queued (HTTP ingest, replay).

:meth:`Intake.prepare` takes one parsed event (a JSON value as the client sent it, or the partly
decoded dict of :func:`router.events.read_batch`) with the batch-level defaults and the time it
was received, and answers either :class:`Accepted` (the normalised message, serialised, ready to
become one queue job per destination of its source) or :class:`Rejected` (what was wrong, and the
event as it came, to keep as a dead letter). Steps: normalise → serialise → what delivery could
not carry (nesting deeper than ``max_nesting_depth``, numbers out of range: :mod:`router.screen`)
→ write keys scrubbed (:class:`WriteKeys`) → validate → size limit. Nothing a client sends makes
it raise: an unforeseen error rejects the one event, and is logged.

The per-event checks of what delivery could not carry, and the scrubbing, cost a pass over the
event's bytes; :meth:`Intake.screen` makes them once for a whole text (a request body), and
``prepare(..., screened=True)`` skips them for its events when the text passed. A text that holds
no usable event at all (a body that is not JSON, a line of a log that cannot be read) is refused
whole by :meth:`Intake.refuse_text`, kept as it came with its write keys masked.

The HTTP handlers of :mod:`router.ingest` call it for every event of a request; ``replay`` calls
it for every event of a captured log, so that a replayed event meets exactly the limits, errors
and scrubbing a live one does (screening each line first with :meth:`Intake.screen` if it parses
lines itself: a line nesting hundreds of levels must not reach a parser). Whatever ingest learns
to refuse belongs here, not in a handler.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import orjson
import structlog

from router.errors import BadEvent
from router.events import NO_DEFAULTS, BatchDefaults, decoded, describe, encode, normalize, validate
from router.identity import ordering_key
from router.queue import NewJob
from router.screen import Screened, nesting_depth
from router.settings import MIN_SECRET_LENGTH, Settings, Source

log = structlog.get_logger("router.intake")

#: Dead-letter reasons of events rejected at intake start with this.
REASON_PREFIX = "rejected at ingest: "
#: What a write key is replaced with wherever it is found.
MASK = "***"
#: Texts nesting deeper than this are not parsed at all (the parsers recurse; msgspec's limit is
#: Python's recursion limit): a request body of such depth is refused whole (:meth:`Intake.screen`).
PARSE_DEPTH = 255


@dataclass(slots=True)
class Accepted:
    """An event ready to queue."""

    message_id: str
    #: The identity that orders a profile's jobs (:func:`router.identity.ordering_key`).
    ordering_key: str | None
    #: The normalised message, JSON.
    payload: bytes

    def jobs(self, source: Source) -> list[NewJob]:
        """One queue job per destination of ``source``."""
        return [
            NewJob(
                source=source.name,
                destination=destination,
                message_id=self.message_id,
                ordering_key=self.ordering_key,
                payload=self.payload,
            )
            for destination in source.destinations
        ]


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event intake refused: why, and the event to keep as a dead letter."""

    #: The event's messageId as the client sent it, if any.
    message_id: str | None
    #: What is wrong, naming the field (``"userId" or "anonymousId" is required``).
    reason: str
    #: The event as it came (normalised as far as it got), JSON, for the dead letter.
    payload: bytes

    @property
    def dead_reason(self) -> str:
        """The reason stored with the dead letter."""
        return REASON_PREFIX + self.reason

    def jobs(self, source: Source) -> list[NewJob]:
        """One dead-letter job per destination of ``source`` (a messageId generated if absent)."""
        return dead_jobs(source, self.message_id, self.payload)


@dataclass(frozen=True, slots=True)
class Screening:
    """What :meth:`Intake.screen` learnt of a text (a request body, or one line of a log)."""

    #: How deeply it nests (above :data:`PARSE_DEPTH`: some number above it).
    depth: int
    #: Whether its events need no per-event check nor scrubbing (``prepare(..., screened=True)``).
    clean: bool
    #: Its arrays and objects.
    shape: Screened


class Intake:
    """Prepares events for the queue under one set of limits (:class:`router.settings.Settings`)."""

    def __init__(self, settings: Settings) -> None:
        self.max_event_bytes = settings.max_event_bytes
        self.max_depth = settings.max_nesting_depth
        self.write_keys = WriteKeys(source.write_key for source in settings.sources)

    def screen(self, text: bytes) -> Screening:
        """Check a whole JSON text at once: it is clean when it nests no deeper than an event may,
        holds no number out of range and no write key (:mod:`router.screen`)."""
        shape = Screened(text)
        depth = shape.depth(PARSE_DEPTH)
        clean = depth <= self.max_depth and not shape.may_hold_huge_number and self.write_keys.absent(text)
        return Screening(depth, clean, shape)

    def prepare(
        self,
        raw: Any,
        *,
        received_at: datetime,
        path_type: str | None = None,
        defaults: BatchDefaults = NO_DEFAULTS,
        screened: bool = False,
    ) -> Accepted | Rejected:
        """Normalise, check and serialise one event, or say why it is refused.

        ``path_type`` is the call type of a single-call path (it overrides the event's ``type``),
        ``defaults`` the batch-level fields the event lacks, ``received_at`` when it arrived.
        ``screened``: the event comes from a text :meth:`screen` found clean.
        """
        message: dict[str, Any] | None = None
        try:
            message = normalize(raw, path_type=path_type, batch_defaults=defaults, received_at=received_at)
            payload = encode(message)
            if not screened:
                self._check_carriable(message, payload)
                if not self.write_keys.absent(payload):
                    payload = self.write_keys.scrub(payload)
                    message = msgspec.json.decode(payload)
            validate(message)
            if len(payload) > self.max_event_bytes:
                raise BadEvent(
                    f"the event is {len(payload)} bytes, over the limit of {self.max_event_bytes} bytes "
                    "(max_event_bytes)"
                )
        except _Uncarriable as exc:
            return self._rejected(raw, None, exc, stored=exc.text)
        except (BadEvent, TypeError, ValueError, msgspec.EncodeError) as exc:
            return self._rejected(raw, message, exc, screened=screened)
        except RecursionError:
            reason = f"the event nests deeper than {self.max_depth} levels (max_nesting_depth)"
            return self._rejected(raw, None, BadEvent(reason), stored="(nested too deeply to keep)")
        except Exception as exc:  # a client's event must never fail the request: this one is refused
            log.error("event_prepare_failed", error_type=type(exc).__name__, exc_info=True)
            failed = BadEvent(f"the event could not be read ({type(exc).__name__})")
            return self._rejected(raw, message, failed, screened=screened)
        return Accepted(message["messageId"], ordering_key(message), payload)

    def refuse_text(self, text: bytes | None, reason: str) -> Rejected:
        """A text that holds no usable event (a request body ingest cannot use, an entry of a
        captured file replay cannot read): refused whole, kept as it came, write keys masked."""
        kept = None if text is None else self.write_keys.scrub(text).decode("utf-8", errors="replace")
        return Rejected(None, reason, orjson.dumps({"raw_body": kept}))

    def _check_carriable(self, message: Mapping[str, Any], payload: bytes) -> None:
        """Raise :class:`_Uncarriable` for an event delivery could not read or write back."""
        shape = Screened(payload)
        if shape.depth(self.max_depth) > self.max_depth:
            field = _culprit(message, lambda part: nesting_depth(part, self.max_depth) >= self.max_depth)
            raise _Uncarriable(
                f"{self._name(field)} nests deeper than {self.max_depth} levels (max_nesting_depth)", payload
            )
        if shape.may_hold_huge_number:
            try:
                orjson.loads(payload)
            except orjson.JSONDecodeError:
                field = _culprit(message, _unreadable)
                raise _Uncarriable(
                    f"{self._name(field)} holds a number out of range (numbers must be finite doubles)",
                    payload,
                ) from None

    def _name(self, field: str | None) -> str:
        """A field named in a reason, scrubbed and cut short; "the event" when unknown."""
        return "the event" if field is None else describe(self.write_keys.scrub_text(field))

    def _rejected(
        self,
        raw: Any,
        message: Mapping[str, Any] | None,
        exc: Exception,
        *,
        screened: bool = False,
        stored: bytes | str | None = None,
    ) -> Rejected:
        """The rejection of an event: the reason, its messageId and what to keep, all scrubbed.

        ``stored``: the event's text, kept as ``raw_text`` (what no JSON reader could take back).
        """
        reason = exc.message if isinstance(exc, BadEvent) else f"the event cannot be stored as JSON: {exc}"
        holder = message if message is not None else raw
        message_id = holder.get("messageId") if isinstance(holder, dict) else None
        message_id = (
            str(message_id) if isinstance(message_id, str | int | float) and message_id != "" else None
        )
        if stored is not None:  # scrubbed as JSON text first: a key may be spelled with escapes there
            text = (
                stored
                if isinstance(stored, str)
                else self.write_keys.scrub(stored).decode("utf-8", "replace")
            )
            payload = orjson.dumps({"raw_text": text})
        else:
            payload = dead_payload(message if message is not None else raw)
        if screened:
            return Rejected(message_id, reason, payload)
        return Rejected(
            message_id and self.write_keys.scrub_text(message_id),
            self.write_keys.scrub_text(reason),
            self.write_keys.scrub(payload),
        )


class _Uncarriable(BadEvent):
    """The event cannot be stored as it is for delivery; ``text`` is its serialised form."""

    def __init__(self, message: str, text: bytes) -> None:
        super().__init__(message)
        self.text = text


def _culprit(message: Mapping[str, Any], fails: Any) -> str | None:
    """The first top-level field of ``message`` whose serialised value ``fails(bytes)``, if any."""
    for key, value in message.items():
        try:
            if fails(encode(value)):
                return str(key)
        except (TypeError, ValueError, msgspec.EncodeError, RecursionError):
            return str(key)
    return None


def _unreadable(text: bytes) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return True
    return False


class WriteKeys:
    """Finds and masks the configured write keys in stored text, written plainly or JSON-escaped.

    A JSON text may spell any character of a key as an escape (``\\u0077`` for ``w``), so a key is
    looked for with each of its characters either way; a text with neither a key nor such an escape
    anywhere is known clean after a substring search per key and one for a backslash.

    Every key is masked: the settings refuse one shorter than
    :data:`~router.settings.MIN_SECRET_LENGTH`, which would match ordinary text (a key ``k`` would
    turn every ``track`` into ``trac***``), and so does this class.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(sorted(set(keys), key=len, reverse=True))
        if self._keys and len(self._keys[-1]) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"a write key of {len(self._keys[-1])} characters cannot be masked without masking "
                f"ordinary text: write keys need at least {MIN_SECRET_LENGTH}"
            )
        self._needles = tuple(k.encode() for k in self._keys)
        chars = sorted({c for k in self._keys for c in k})
        self._escapes = re.compile(b"|".join(_escape_forms(c) for c in chars)) if chars else None
        self._spelled = (
            re.compile(b"|".join(b"".join(_char_forms(c) for c in k) for k in self._keys))
            if self._keys
            else None
        )
        self._mask = MASK.encode()

    def absent(self, text: bytes) -> bool:
        """True when ``text`` surely holds no write key (plain or escaped)."""
        if any(needle in text for needle in self._needles):
            return False
        return self._escapes is None or b"\\" not in text or self._escapes.search(text) is None

    def scrub(self, text: bytes) -> bytes:
        """``text`` (JSON, or any bytes) with every write key replaced by ``***``."""
        if self._spelled is None or self.absent(text):
            return text
        return self._spelled.sub(self._mask, text)

    def scrub_text(self, text: str) -> str:
        """Decoded ``text`` with every write key replaced by ``***``."""
        for key in self._keys:
            if key in text:
                text = text.replace(key, MASK)
        return text


_SHORT_ESCAPES = {
    '"': b'\\"',
    "\\": b"\\\\",
    "/": b"\\/",
    "\b": b"\\b",
    "\f": b"\\f",
    "\n": b"\\n",
    "\r": b"\\r",
    "\t": b"\\t",
}


def _escape_forms(char: str) -> bytes:
    """A regular expression matching the JSON escapes of ``char`` (``\\u`` forms in any case)."""
    forms = [
        b"\\\\u" + b"".join(b"[%s%s]" % (d.encode(), d.upper().encode()) for d in f"{unit:04x}")
        for unit in _utf16(char)
    ]
    pattern = b"".join(forms)
    if char in _SHORT_ESCAPES:
        pattern = b"(?:" + pattern + b"|" + re.escape(_SHORT_ESCAPES[char]) + b")"
    return pattern


def _char_forms(char: str) -> bytes:
    """A regular expression matching ``char`` in a JSON text: as itself, or escaped."""
    return b"(?:" + re.escape(char.encode()) + b"|" + _escape_forms(char) + b")"


def _utf16(char: str) -> list[int]:
    """The UTF-16 code units of ``char`` (two for a character beyond the BMP)."""
    data = char.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def dead_payload(value: Any) -> bytes:
    """JSON bytes for a dead letter: the event when it is an object, else wrapped in ``raw_event``."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "writeKey"}
    else:
        value = {"raw_event": value}
    try:
        return encode(value)
    except (TypeError, ValueError, msgspec.EncodeError):
        return orjson.dumps({"raw_text": repr(decoded(value) if isinstance(value, dict) else value)[:65536]})


def dead_jobs(source: Source, message_id: str | None, payload: bytes) -> list[NewJob]:
    """Dead-letter jobs of one refused event (or body), one per destination of ``source``."""
    message_id = message_id or str(uuid.uuid4())
    return [
        NewJob(source=source.name, destination=d, message_id=message_id, ordering_key=None, payload=payload)
        for d in source.destinations
    ]
