"""Intake: what every way in does to one event before it is queued (HTTP ingest, replay).

:meth:`Intake.prepare` takes one parsed event (a JSON value as the client sent it, or the partly
decoded dict of :func:`router.events.read_batch`) with the batch-level defaults and the time it
was received, and answers either :class:`Accepted` (the normalised message, serialised, ready to
become one queue job per destination of its source) or :class:`Rejected` (what was wrong, and the
event as it came, to keep as a dead letter). Steps: normalise → validate → size limit.

The HTTP handlers of :mod:`router.ingest` call it for every event of a request; ``replay`` calls
it for every event of a captured log, so that a replayed event meets exactly the limits, errors
and scrubbing a live one does. Whatever ingest learns to refuse belongs here, not in a handler.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import orjson

from router.errors import BadEvent
from router.events import NO_DEFAULTS, BatchDefaults, decoded, encode, normalize, validate
from router.identity import ordering_key
from router.queue import NewJob
from router.settings import Settings, Source

#: Dead-letter reasons of events rejected at intake start with this.
REASON_PREFIX = "rejected at ingest: "


@dataclass(frozen=True, slots=True)
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


class Intake:
    """Prepares events for the queue under one set of limits (:class:`router.settings.Settings`)."""

    def __init__(self, settings: Settings) -> None:
        self.max_event_bytes = settings.max_event_bytes

    def prepare(
        self,
        raw: Any,
        *,
        received_at: datetime,
        path_type: str | None = None,
        defaults: BatchDefaults = NO_DEFAULTS,
    ) -> Accepted | Rejected:
        """Normalise, validate and serialise one event, or say why it is refused.

        ``path_type`` is the call type of a single-call path (it overrides the event's ``type``),
        ``defaults`` the batch-level fields the event lacks, ``received_at`` when it arrived.
        """
        message: dict[str, Any] | None = None
        try:
            message = normalize(raw, path_type=path_type, batch_defaults=defaults, received_at=received_at)
            validate(message)
            payload = encode(message)
            if len(payload) > self.max_event_bytes:
                raise BadEvent(
                    f"the event is {len(payload)} bytes, over the limit of {self.max_event_bytes} bytes "
                    "(max_event_bytes)"
                )
        except (BadEvent, TypeError, ValueError, msgspec.EncodeError) as exc:
            return _rejected(raw, message, exc)
        return Accepted(message["messageId"], ordering_key(message), payload)


def _rejected(raw: Any, message: dict[str, Any] | None, exc: Exception) -> Rejected:
    reason = exc.message if isinstance(exc, BadEvent) else f"the event cannot be stored as JSON: {exc}"
    holder = message if message is not None else raw
    message_id = holder.get("messageId") if isinstance(holder, dict) else None
    message_id = str(message_id) if message_id not in (None, "") else None
    return Rejected(message_id, reason, dead_payload(message if message is not None else raw))


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
