"""The records the fake keeps: profiles, events, lists, subscriptions, import jobs and the request log."""

from __future__ import annotations

import base64
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: Profile identifiers in the order they are tried when matching a profile.
IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id", "_kx")
#: Attributes that are merged key by key instead of replaced.
MERGED_ATTRIBUTES = ("location", "properties")

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_LIST_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def now_iso() -> str:
    """The current wall-clock time as Klaviyo prints it (``2026-07-20T12:00:00+00:00``)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


_TO_CROCKFORD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD)


class IdFactory:
    """Klaviyo-looking ids, reproducible for a seed: 26-char ULID-like profile/job ids, 6-char list ids."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def ulid(self) -> str:
        """``01`` + 24 Crockford base-32 characters (120 random bits)."""
        raw = base64.b32encode(self._rng.getrandbits(120).to_bytes(15, "big")).decode()
        return "01" + raw.translate(_TO_CROCKFORD)

    def list_id(self) -> str:
        """Six letters and digits, like ``Y6nRLr``."""
        return "".join(self._rng.choice(_LIST_ID_ALPHABET) for _ in range(6))


def identifier_key(name: str, value: str) -> tuple[str, str]:
    """Index key of an identifier (emails match case-insensitively)."""
    return name, value.strip().lower() if name == "email" else value.strip()


def identifier_problems(attributes: dict[str, Any], pointer: str) -> list[tuple[str, str]]:
    """(pointer, detail) for malformed email / phone identifiers in profile ``attributes``."""
    problems: list[tuple[str, str]] = []
    email = attributes.get("email")
    if isinstance(email, str) and not _EMAIL.match(email):
        problems.append((f"{pointer}/email", f"Invalid email address: {email!r}."))
    phone = attributes.get("phone_number")
    if isinstance(phone, str) and not _E164.match(phone):
        problems.append(
            (
                f"{pointer}/phone_number",
                "Invalid phone number format (Example of a valid format: +12345678901).",
            )
        )
    return problems


@dataclass(slots=True)
class Profile:
    """A Klaviyo profile."""

    id: str
    attributes: dict[str, Any]
    created: str
    updated: str
    last_event_date: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON:API resource object."""
        return {
            "type": "profile",
            "id": self.id,
            "attributes": {
                **self.attributes,
                "created": self.created,
                "updated": self.updated,
                "last_event_date": self.last_event_date,
            },
            "links": {"self": f"/api/profiles/{self.id}/"},
        }


@dataclass(slots=True)
class Event:
    """One recorded event."""

    id: str
    profile_id: str
    metric: str
    properties: dict[str, Any]
    time: str
    unique_id: str
    #: True when the caller sent ``unique_id`` (else it is the time to the second).
    explicit_unique_id: bool
    value: float | None = None
    value_currency: str | None = None
    backfill: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the control API."""
        return {
            "id": self.id,
            "profile_id": self.profile_id,
            "metric": self.metric,
            "properties": self.properties,
            "time": self.time,
            "unique_id": self.unique_id,
            "explicit_unique_id": self.explicit_unique_id,
            "value": self.value,
            "value_currency": self.value_currency,
            "backfill": self.backfill,
        }


@dataclass(slots=True)
class KlaviyoList:
    """A Klaviyo list."""

    id: str
    name: str
    opt_in_process: str
    created: str
    updated: str

    def to_json(self, *, profile_count: int | None = None) -> dict[str, Any]:
        """The JSON:API resource object (``profile_count`` when asked for as an additional field)."""
        attributes: dict[str, Any] = {
            "name": self.name,
            "created": self.created,
            "updated": self.updated,
            "opt_in_process": self.opt_in_process,
        }
        if profile_count is not None:
            attributes["profile_count"] = profile_count
        return {
            "type": "list",
            "id": self.id,
            "attributes": attributes,
            "links": {"self": f"/api/lists/{self.id}/"},
        }


@dataclass(slots=True)
class Subscription:
    """Consent of one profile on one channel (``email.marketing``, ``sms.marketing``, ``sms.transactional``...)."""

    channel: str
    status: str
    updated: str
    list_id: str | None = None
    consented_at: str | None = None
    custom_source: str | None = None
    historical_import: bool = False
    #: A double opt-in list: Klaviyo would send a confirmation message first (the fake subscribes at once).
    double_opt_in: bool = False

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the control API."""
        return {
            "channel": self.channel,
            "status": self.status,
            "updated": self.updated,
            "list_id": self.list_id,
            "consented_at": self.consented_at,
            "custom_source": self.custom_source,
            "historical_import": self.historical_import,
            "double_opt_in": self.double_opt_in,
        }


#: The statuses an import job goes through, in order (Klaviyo also has ``cancelled``).
JOB_STATUSES = ("queued", "processing", "complete")


@dataclass(slots=True)
class ImportJob:
    """A bulk profile import job.

    The fake applies the profiles when it accepts the job, but reports it like Klaviyo: ``queued``
    in the answer to the import, then one step further on every read of the job until
    ``complete`` (:attr:`reads_to_complete` reads; counts are zero until then).
    """

    id: str
    created_at: str
    total_count: int
    list_ids: list[str] = field(default_factory=list)
    profile_ids: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: Reads of the job (``GET``) after which it says ``complete``; before, ``queued`` then ``processing``.
    reads_to_complete: int = 1
    reads: int = 0

    @property
    def status(self) -> str:
        if self.reads >= self.reads_to_complete:
            return "complete"
        return "queued" if self.reads == 0 else "processing"

    def read(self) -> None:
        """One ``GET`` of the job: it moves on."""
        self.reads += 1

    @property
    def failed_count(self) -> int:
        """Profiles that could not be imported."""
        return len(self.errors)

    def to_json(self) -> dict[str, Any]:
        """The JSON:API resource object."""
        done = self.status == "complete"
        return {
            "type": "profile-bulk-import-job",
            "id": self.id,
            "attributes": {
                "status": self.status,
                "created_at": self.created_at,
                "total_count": self.total_count,
                "completed_count": self.total_count - self.failed_count if done else 0,
                "failed_count": self.failed_count if done else 0,
                "started_at": self.created_at if self.status != "queued" else None,
                "completed_at": self.created_at if done else None,
                "expires_at": None,
            },
            "relationships": {
                "lists": {"data": [{"type": "list", "id": list_id} for list_id in self.list_ids]},
            },
            "links": {"self": f"/api/profile-bulk-import-jobs/{self.id}/"},
        }


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the fake received and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    #: Request headers; the ``Authorization`` value is replaced by ``[redacted]``.
    headers: dict[str, str]
    #: The parsed JSON body (``None`` when there was none or it was not JSON).
    json: Any
    #: The status answered; 0 when the connection was dropped (timeout fault, or the client gave up).
    status: int
    operation_id: str | None
    #: Which account (a redacted key label) sent it, when it had a key.
    client: str | None
    #: The fake's clock when the request arrived.
    at: float

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for the control API."""
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "json": self.json,
            "status": self.status,
            "operation_id": self.operation_id,
            "client": self.client,
            "at": self.at,
        }
