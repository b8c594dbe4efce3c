"""What the fake Klaviyo account holds and how it changes: upserts, events, lists, consent, import jobs.

:class:`FakeKlaviyo` is the object tests assert on. It also owns the rate limiter, the faults and the
request log, and has methods to change all of them while the server runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from router.fake_klaviyo.faults import Faults
from router.fake_klaviyo.ratelimit import FixedWindowLimiter
from router.fake_klaviyo.records import (
    IDENTIFIERS,
    MERGED_ATTRIBUTES,
    Event,
    IdFactory,
    ImportJob,
    KlaviyoList,
    Profile,
    RequestRecord,
    Subscription,
    identifier_key,
    now_iso,
)

#: Klaviyo's limit on lists and segments per account.
DEFAULT_MAX_LISTS = 1000


class ProfileError(Exception):
    """A profile cannot be created or updated as asked."""


class DuplicateProfile(ProfileError):
    """The identifiers belong to different existing profiles (Klaviyo's ``409 duplicate_profile``)."""

    def __init__(self, duplicate_profile_id: str) -> None:
        super().__init__("A profile already exists with one of these identifiers.")
        self.duplicate_profile_id = duplicate_profile_id


class UnknownProfile(ProfileError):
    """A profile id that does not exist."""


def client_label(api_key: str) -> str:
    """How the fake names an account in counters and logs without printing its key (``pk_...abcd``)."""
    if len(api_key) > 10:
        return f"{api_key[:3]}...{api_key[-4:]}"
    return "key#" + hashlib.sha256(api_key.encode()).hexdigest()[:8]


def event_time(raw: str | None) -> datetime:
    """An event's time, truncated to the second, in UTC (now when absent)."""
    moment = datetime.now(UTC) if raw is None else datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=0)


class FakeKlaviyo:
    """The state of one fake Klaviyo account, plus the knobs (rate limits, faults, keys) tests turn."""

    def __init__(
        self,
        *,
        api_keys: Sequence[str] | None = None,
        rate_limits: bool = True,
        rate_limit_scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        faults: Faults | None = None,
        max_lists: int = DEFAULT_MAX_LISTS,
        seed: int = 0,
        store: bool = True,
        import_job_reads: int = 1,
    ) -> None:
        #: Keep what writes carry (False: validate, rate-limit and count only; see ``build_fake_app``).
        self.store = store
        #: Reads of a bulk import job before it says ``complete`` (``queued``, ``processing`` before).
        self.import_job_reads = import_job_reads
        #: Accepted private keys; ``None`` accepts any ``Klaviyo-API-Key <key>``.
        self.api_keys: frozenset[str] | None = None if api_keys is None else frozenset(api_keys)
        self.rate_limits = rate_limits
        self.rate_limit_scale = rate_limit_scale
        self.clock = clock
        self.max_lists = max_lists
        self.faults = faults or Faults()
        self.limiter = FixedWindowLimiter(clock)
        self._seed = seed
        #: Set when the server shuts down: releases requests held by a timeout fault.
        self.closing = asyncio.Event()
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every profile, event, list, job, logged request, counter and rate-limit window."""
        self.ids = IdFactory(self._seed)
        self.profiles: dict[str, Profile] = {}
        self.events: list[Event] = []
        self._event_keys: set[tuple[str, str, str]] = set()
        self.lists: dict[str, KlaviyoList] = {}
        #: list id -> {profile id: joined at}, in joining order.
        self.memberships: dict[str, dict[str, str]] = {}
        #: profile id -> {channel: subscription}.
        self.subscriptions: dict[str, dict[str, Subscription]] = {}
        self.jobs: dict[str, ImportJob] = {}
        self.requests: list[RequestRecord] = []
        #: Duplicate events silently ignored (same profile, metric and unique id).
        self.duplicate_events = 0
        #: Writes accepted although they repeat one accepted before, by kind: ``events`` (a repeated
        #: unique id, the duplicates above), ``profiles`` (an identical upsert), ``list_adds`` (an
        #: identical bulk import into lists), ``subscriptions`` / ``unsubscriptions`` (an identical
        #: consent change on one list), ``list_members`` (a profile added to a list again). Klaviyo
        #: forgives them, so the fake counts them for tests to assert on.
        self.repeats: Counter[str] = Counter()
        #: Fingerprint of every accepted write → times accepted.
        self._writes: Counter[bytes] = Counter()
        #: The repeated writes themselves, by fingerprint: ``{"kind", "item", "times"}``.
        self._repeated: dict[bytes, dict[str, Any]] = {}
        #: Profiles unsubscribed although they were not in the list named (Klaviyo unsubscribes them globally).
        self.global_unsubscribes: list[str] = []
        #: 429 responses sent (rate limiter and scripted).
        self.throttled = 0
        #: With ``store=False``: items of valid writes, per operation (events, profiles, ...).
        self.items_accepted: Counter[str] = Counter()
        #: Per client: requests that arrived before the ``Retry-After`` they were given had expired.
        self.sent_early: dict[str, int] = {}
        self._retry_deadlines: dict[tuple[str, str], float] = {}
        self._index: dict[tuple[str, str], str] = {}
        #: Identifier value → the reason a bulk import job records an import error for its profile.
        self.import_refusals: dict[str, str] = {}
        self.limiter.reset()

    # -- runtime knobs ---------------------------------------------------------------------------------

    def set_rate_limits(self, enabled: bool, *, scale: float | None = None) -> None:
        """Switch rate limiting on or off, optionally with a new limit multiplier."""
        self.rate_limits = enabled
        if scale is not None:
            self.rate_limit_scale = scale
        self.limiter.reset()

    def script(self, key: str, responses: Iterable[object]) -> None:
        """Queue scripted answers, e.g. ``script("POST /api/events", [503, 503, 200])``."""
        self.faults.script(key, responses)

    def set_random_5xx(self, rate: float, *, seed: int | None = None) -> None:
        """Answer a fraction of API requests with a random 5xx, reproducibly for ``seed``."""
        self.faults.set_random_5xx(rate, seed=seed)

    def revoke_key(self, api_key: str) -> None:
        """Answer requests with this key 401 from now on."""
        self.faults.revoked_keys.add(api_key)

    def fail_bulk_items(
        self, operation_id: str, *, indices: Iterable[int] = (), values: Iterable[str] = (), detail: str = ""
    ) -> None:
        """Make bulk jobs fail for named entries (see :class:`~router.fake_klaviyo.faults.BulkFailure`)."""
        self.faults.fail_bulk_items(
            operation_id, indices=indices, values=values, detail=detail or "Invalid input."
        )

    def refuse_in_imports(self, values: Iterable[str], detail: str = "Invalid profile.") -> None:
        """Bulk import jobs accept profiles holding one of ``values`` as an identifier, then report
        them as import errors (the job's ``failed_count``), as Klaviyo does for what it cannot import."""
        self.import_refusals.update(dict.fromkeys(values, detail))

    def clear_faults(self) -> None:
        """Remove every configured fault."""
        self.faults.clear()

    # -- clients and Retry-After -------------------------------------------------------------------------

    def key_accepted(self, api_key: str) -> bool:
        """Whether a private key is valid (and not revoked)."""
        if api_key in self.faults.revoked_keys:
            return False
        return self.api_keys is None or api_key in self.api_keys

    def note_retry_after(self, client: str, bucket: str, seconds: int) -> None:
        """Remember that ``client`` was told to wait ``seconds`` before calling ``bucket`` again."""
        self._retry_deadlines[(client, bucket)] = max(
            self._retry_deadlines.get((client, bucket), 0.0), self.clock() + seconds
        )

    def check_early(self, client: str, bucket: str) -> bool:
        """Count (and report) a request sent before the client's ``Retry-After`` expired."""
        deadline = self._retry_deadlines.get((client, bucket))
        if deadline is None or self.clock() >= deadline:
            return False
        self.sent_early[client] = self.sent_early.get(client, 0) + 1
        return True

    @property
    def sent_early_total(self) -> int:
        """Requests sent before their ``Retry-After`` expired, all clients together."""
        return sum(self.sent_early.values())

    # -- profiles --------------------------------------------------------------------------------------

    def find_profile(self, **identifiers: str) -> Profile | None:
        """The profile holding any of the identifiers, e.g. ``find_profile(email="a@example.com")``."""
        for name, value in identifiers.items():
            profile_id = self._index.get(identifier_key(name, value))
            if profile_id is not None:
                return self.profiles[profile_id]
        return None

    def profile_id_for(self, name: str, value: str) -> str | None:
        """The id of the profile holding identifier ``name`` = ``value``."""
        return self._index.get(identifier_key(name, value))

    def matching_profiles(self, attributes: Mapping[str, Any], profile_id: str | None = None) -> list[str]:
        """Existing profiles the identifiers point at, in matching order (an explicit id comes first)."""
        found: list[str] = []
        if profile_id is not None:
            if profile_id not in self.profiles:
                raise UnknownProfile(f"Profile {profile_id!r} does not exist.")
            found.append(profile_id)
        for name in IDENTIFIERS:
            value = attributes.get(name)
            owner = self._index.get(identifier_key(name, value)) if isinstance(value, str) and value else None
            if owner is not None and owner not in found:
                found.append(owner)
        return found

    def upsert_profile(
        self,
        attributes: Mapping[str, Any],
        *,
        profile_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
        clear_nulls: bool = True,
        strict: bool = False,
    ) -> tuple[Profile, bool]:
        """Create or update a profile like Klaviyo's upsert; returns (profile, created).

        Matching: the explicit id, else the first identifier (email, phone, external id, anonymous id, _kx)
        that an existing profile holds. With ``strict`` (Create or Update Profile), identifiers held by two
        different profiles raise :class:`DuplicateProfile`; otherwise an identifier another profile holds is
        left with that profile. ``null`` clears a field when ``clear_nulls``, else nulls are ignored.
        """
        matches = self.matching_profiles(attributes, profile_id)
        if strict and len(matches) > 1:
            raise DuplicateProfile(matches[1])
        if not matches and not any(
            isinstance(attributes.get(name), str) and attributes[name] for name in IDENTIFIERS
        ):
            raise ProfileError(
                "A profile identifier (email, phone_number, external_id or anonymous_id) is required."
            )
        created = not matches
        stamp = now_iso()
        profile = self.profiles[matches[0]] if matches else Profile(self.ids.ulid(), {}, stamp, stamp)
        self.profiles[profile.id] = profile
        self._apply_attributes(profile, attributes, clear_nulls=clear_nulls)
        if meta:
            apply_patch_properties(profile.attributes, meta.get("patch_properties") or {})
        profile.updated = stamp
        return profile, created

    def _apply_attributes(
        self, profile: Profile, attributes: Mapping[str, Any], *, clear_nulls: bool
    ) -> None:
        for name, value in attributes.items():
            if value is None:
                if clear_nulls:
                    self._set_attribute(profile, name, None)
            elif name in MERGED_ATTRIBUTES and isinstance(value, Mapping):
                merged = dict(profile.attributes.get(name) or {})
                merged.update({key: item for key, item in value.items() if item is not None or clear_nulls})
                profile.attributes[name] = merged
            else:
                self._set_attribute(profile, name, value)

    def _set_attribute(self, profile: Profile, name: str, value: Any) -> None:
        if name not in IDENTIFIERS:
            if value is None:
                profile.attributes.pop(name, None)
            else:
                profile.attributes[name] = value
            return
        if value is not None:
            owner = self._index.get(identifier_key(name, value))
            if owner is not None and owner != profile.id:
                return  # held by another profile: stays there
        old = profile.attributes.get(name)
        if isinstance(old, str):
            self._index.pop(identifier_key(name, old), None)
        if value is None:
            profile.attributes.pop(name, None)
        else:
            profile.attributes[name] = value
            self._index[identifier_key(name, value)] = profile.id

    # -- events ----------------------------------------------------------------------------------------

    def dedupe_key(self, profile_id: str, metric: str, attributes: Mapping[str, Any]) -> tuple[str, str, str]:
        """(profile, metric, unique id) — the unique id defaults to the event time to the second."""
        unique_id = attributes.get("unique_id")
        if not unique_id:
            unique_id = event_time(attributes.get("time")).isoformat()
        return profile_id, metric, str(unique_id)

    def has_event(self, key: tuple[str, str, str]) -> bool:
        """Whether an event with this dedupe key was recorded."""
        return key in self._event_keys

    def record_event(self, profile: Profile, metric: str, attributes: Mapping[str, Any]) -> Event | None:
        """Record an event for ``profile``; ``None`` (and counted) when it is a duplicate."""
        key = self.dedupe_key(profile.id, metric, attributes)
        if self.has_event(key):
            self.duplicate_events += 1
            self.note_write("events", {"profile_id": key[0], "metric": key[1], "unique_id": key[2]})
            return None
        moment = event_time(attributes.get("time")).isoformat()
        event = Event(
            id=self.ids.ulid(),
            profile_id=profile.id,
            metric=metric,
            properties=dict(attributes.get("properties") or {}),
            time=moment,
            unique_id=key[2],
            explicit_unique_id=bool(attributes.get("unique_id")),
            value=attributes.get("value"),
            value_currency=attributes.get("value_currency"),
            backfill=bool(attributes.get("backfill")),
        )
        self.events.append(event)
        self._event_keys.add(key)
        self.note_write("events", {"profile_id": key[0], "metric": key[1], "unique_id": key[2]})
        if profile.last_event_date is None or moment > profile.last_event_date:
            profile.last_event_date = moment
        return event

    def events_for(self, *, metric: str | None = None, **identifiers: str) -> list[Event]:
        """Recorded events, optionally of one metric and/or of the profile holding ``identifiers``."""
        profile = self.find_profile(**identifiers) if identifiers else None
        if identifiers and profile is None:
            return []
        return [
            event
            for event in self.events
            if (metric is None or event.metric == metric)
            and (profile is None or event.profile_id == profile.id)
        ]

    def note_write(self, kind: str, item: Any) -> None:
        """Count an accepted write of ``item``; one identical to an earlier write of its kind is a repeat."""
        digest = hashlib.blake2b(
            kind.encode() + b"\0" + orjson.dumps(item, option=orjson.OPT_SORT_KEYS), digest_size=16
        ).digest()
        self._writes[digest] += 1
        times = self._writes[digest]
        if times > 1:
            self.repeats[kind] += 1
            self._repeated[digest] = {"kind": kind, "item": item, "times": times}

    def repeated(self) -> list[dict[str, Any]]:
        """Every write accepted more than once: ``{"kind", "item", "times"}``."""
        return list(self._repeated.values())

    # -- lists ---------------------------------------------------------------------------------------

    def create_list(
        self, name: str, opt_in_process: str | None = None, *, list_id: str | None = None
    ) -> KlaviyoList:
        """A new list (double opt-in unless told otherwise); ``list_id`` picks its id (tests, sandbox)."""
        stamp = now_iso()
        new = KlaviyoList(
            list_id or self.ids.list_id(), name, opt_in_process or "double_opt_in", stamp, stamp
        )
        self.lists[new.id] = new
        self.memberships[new.id] = {}
        return new

    def add_members(self, list_id: str, profile_ids: Iterable[str]) -> None:
        """Add profiles to a list (already present ones keep their joining time)."""
        members = self.memberships.setdefault(list_id, {})
        stamp = now_iso()
        for profile_id in profile_ids:
            members.setdefault(profile_id, stamp)

    def remove_members(self, list_id: str, profile_ids: Iterable[str]) -> None:
        """Remove profiles from a list."""
        members = self.memberships.setdefault(list_id, {})
        for profile_id in profile_ids:
            members.pop(profile_id, None)

    def members(self, list_id: str) -> list[str]:
        """Profile ids in a list, in joining order."""
        return list(self.memberships.get(list_id, {}))

    # -- consent -------------------------------------------------------------------------------------

    def set_consent(self, profile_id: str, channel: str, status: str, **details: Any) -> Subscription:
        """Record ``status`` (``SUBSCRIBED`` / ``UNSUBSCRIBED``) for a profile on a channel."""
        record = Subscription(channel=channel, status=status, updated=now_iso(), **details)
        self.subscriptions.setdefault(profile_id, {})[channel] = record
        return record

    def consent(self, profile_id: str, channel: str = "email.marketing") -> str:
        """A profile's consent on a channel (``NEVER_SUBSCRIBED`` when none was recorded)."""
        record = self.subscriptions.get(profile_id, {}).get(channel)
        return record.status if record else "NEVER_SUBSCRIBED"

    # -- import jobs -----------------------------------------------------------------------------------

    def new_import_job(self, total_count: int, list_ids: Sequence[str]) -> ImportJob:
        """Register a bulk import job."""
        job = ImportJob(
            self.ids.ulid(), now_iso(), total_count, list(list_ids), reads_to_complete=self.import_job_reads
        )
        self.jobs[job.id] = job
        return job

    def profiles_by(self, name: str, values: Iterable[str]) -> list[str]:
        """Ids of the profiles holding identifier ``name`` (or ``id``) = one of ``values``, in that order."""
        found: list[str] = []
        for value in values:
            profile_id = value if name == "id" else self._index.get(identifier_key(name, value))
            if profile_id is not None and profile_id in self.profiles and profile_id not in found:
                found.append(profile_id)
        return found

    # -- snapshot --------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counts only, for ``GET /__fake__/state?summary=1`` (cheap with many events)."""
        return {
            "counters": {
                **self._counters(),
                "profiles": len(self.profiles),
                "events": len(self.events),
                "lists": len(self.lists),
                "members": sum(len(members) for members in self.memberships.values()),
                "jobs": len(self.jobs),
            },
            "rate_limits": {"enabled": self.rate_limits, "scale": self.rate_limit_scale},
        }

    def _counters(self) -> dict[str, Any]:
        return {
            "items_accepted": dict(self.items_accepted),
            "requests": len(self.requests),
            "throttled": self.throttled,
            "sent_early": dict(self.sent_early),
            "duplicate_events": self.duplicate_events,
            "repeats": dict(self.repeats),
            "global_unsubscribes": list(self.global_unsubscribes),
        }

    def to_json(self) -> dict[str, Any]:
        """Everything the account holds, for ``GET /__fake__/state``."""
        return {
            "profiles": [profile.to_json() for profile in self.profiles.values()],
            "events": [event.to_json() for event in self.events],
            "lists": [klaviyo_list.to_json() for klaviyo_list in self.lists.values()],
            "memberships": {list_id: list(members) for list_id, members in self.memberships.items()},
            "subscriptions": {
                profile_id: {channel: record.to_json() for channel, record in channels.items()}
                for profile_id, channels in self.subscriptions.items()
            },
            "jobs": [job.to_json() for job in self.jobs.values()],
            "repeated": self.repeated(),
            "counters": self._counters(),
            "rate_limits": {"enabled": self.rate_limits, "scale": self.rate_limit_scale},
        }


def apply_patch_properties(attributes: dict[str, Any], patch: Mapping[str, Any]) -> None:
    """Klaviyo's ``meta.patch_properties``: ``append`` / ``unappend`` values of list properties, ``unset`` keys."""
    properties: dict[str, Any] = dict(attributes.get("properties") or {})
    for key, value in (patch.get("append") or {}).items():
        current = properties.get(key)
        items = list(current) if isinstance(current, list) else ([] if current is None else [current])
        items.extend(value if isinstance(value, list) else [value])
        properties[key] = items
    for key, value in (patch.get("unappend") or {}).items():
        current = properties.get(key)
        if isinstance(current, list):
            drop = value if isinstance(value, list) else [value]
            properties[key] = [item for item in current if item not in drop]
    unset = patch.get("unset") or []
    for key in [unset] if isinstance(unset, str) else unset:
        properties.pop(key, None)
    attributes["properties"] = properties
