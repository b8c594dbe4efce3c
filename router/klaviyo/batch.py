"""Merge single-endpoint requests into Klaviyo's bulk jobs (pure).

What delivery sends for many events at once:

- profile upserts → ``/api/profile-bulk-import-jobs`` (≤ 10 000 profiles, ≤ 5 MB), or
  ``/api/profile-import`` when only one is waiting;
- events → ``/api/event-bulk-create-jobs`` (≤ 1000 events, ≤ 5 MB, events grouped under their
  profile, no ``unique_id`` twice for one profile and metric), or ``/api/events`` for one;
- subscriptions → one subscribe job per list (≤ 1000 profiles), unsubscribe jobs (≤ 100);
- list membership without consent → bulk import jobs with the list relationship.

Profile upserts come first, then events, then list jobs, so a list job never runs before the
upsert of its profile. Items keep their input order inside every job; a profile's operations on
one list inside one batch collapse to the last of them (same end state, fewer jobs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import orjson

from router.klaviyo.requests import KlaviyoRequest

MAX_EVENTS: Final = 1000
MAX_PROFILES: Final = 10_000
MAX_SUBSCRIBE: Final = 1000
MAX_UNSUBSCRIBE: Final = 100
#: Klaviyo's 5 MB payload cap, with headroom for the envelope.
MAX_BYTES: Final = 4_900_000


@dataclass(slots=True)
class _Item:
    """One bulk item: its JSON and the inputs behind it."""

    data: dict[str, Any]
    sources: list[int]


@dataclass(slots=True)
class _Group:
    items: list[_Item] = field(default_factory=list)


def batch(requests: Iterable[KlaviyoRequest]) -> list[KlaviyoRequest]:
    """Bulk requests for ``requests`` (single-endpoint ones, in input order)."""
    profiles: list[KlaviyoRequest] = []
    events: list[KlaviyoRequest] = []
    lists: list[KlaviyoRequest] = []
    for request in requests:
        {"profile": profiles, "event": events}.get(request.kind, lists).append(request)
    return [*_profile_jobs(profiles), *_event_jobs(events), *_list_jobs(lists)]


# ---------------------------------------------------------------- chunking


def _chunks(items: Sequence[_Item], max_items: int) -> Iterator[Sequence[_Item]]:
    for start in range(0, len(items), max_items):
        yield items[start : start + max_items]


def _within_cap(
    build: Callable[[Sequence[_Item]], KlaviyoRequest], items: Sequence[_Item]
) -> Iterator[KlaviyoRequest]:
    """``build(items)``, or, when its body is over Klaviyo's payload cap, the same for each half.

    Sizing the finished body (once per job, not per item) keeps the common case cheap, and the
    request keeps the encoded body for the client to send; a single item over the cap is sent as
    it is and Klaviyo's refusal dead-letters it.
    """
    request = build(items)
    encoded = orjson.dumps(request.body)
    if len(items) > 1 and len(encoded) > MAX_BYTES:
        half = len(items) // 2
        yield from _within_cap(build, items[:half])
        yield from _within_cap(build, items[half:])
    else:
        yield replace(request, encoded=encoded)


def _bulk(
    path: str, body: dict[str, Any], chunk: Sequence[_Item], ordering_key: str | None
) -> KlaviyoRequest:
    item_sources = tuple(tuple(item.sources) for item in chunk)
    sources = tuple(sorted({s for item in chunk for s in item.sources}))
    return KlaviyoRequest(
        method="POST",
        path=path,
        body=body,
        kind="bulk",
        sources=sources,
        item_sources=item_sources,
        ordering_key=ordering_key,
    )


# ---------------------------------------------------------------- profiles


def _profile_jobs(requests: Sequence[KlaviyoRequest]) -> Iterator[KlaviyoRequest]:
    if len(requests) == 1:
        yield requests[0]
        return
    items = [_Item(r.body["data"], list(r.sources)) for r in requests]
    for chunk in _chunks(items, MAX_PROFILES):
        yield from _within_cap(_profile_job, chunk)


def _profile_job(chunk: Sequence[_Item]) -> KlaviyoRequest:
    body = {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": [item.data for item in chunk]}},
        }
    }
    return _bulk("/api/profile-bulk-import-jobs", body, chunk, None)


# ---------------------------------------------------------------- events


def _event_jobs(requests: Sequence[KlaviyoRequest]) -> Iterator[KlaviyoRequest]:
    if len(requests) == 1:
        yield requests[0]
        return
    for chunk in _event_chunks(requests):
        yield from _within_cap(_event_job, _event_entries(chunk))


def _event_chunks(requests: Sequence[KlaviyoRequest]) -> list[list[KlaviyoRequest]]:
    """Chunks of ≤ MAX_EVENTS events, never repeating a (metric, unique_id) within one.

    Klaviyo fails a whole job that repeats one (and would record only the first anyway), so a
    repeat goes to a later chunk than the one holding its predecessor; order is kept per key.
    """
    chunks: list[list[KlaviyoRequest]] = []
    last_chunk: dict[tuple[str, str], int] = {}
    first_open = 0
    for request in requests:
        attributes = request.body["data"]["attributes"]
        # Stricter than Klaviyo (which keys on the profile too) and much cheaper to compute.
        key = (attributes["metric"]["data"]["attributes"]["name"], str(attributes.get("unique_id")))
        i = max(first_open, last_chunk.get(key, -1) + 1)
        while i < len(chunks) and len(chunks[i]) >= MAX_EVENTS:
            i += 1
        if i == len(chunks):
            chunks.append([])
        chunks[i].append(request)
        if attributes.get("unique_id") is not None:
            last_chunk[key] = i
        while first_open < len(chunks) and len(chunks[first_open]) >= MAX_EVENTS:
            first_open += 1
    return chunks


def _event_entries(requests: Sequence[KlaviyoRequest]) -> list[_Item]:
    """One ``event-bulk-create`` entry per profile, holding that profile's events in order."""
    entries: dict[bytes, _Item] = {}
    for request in requests:
        attributes = request.body["data"]["attributes"]
        profile = attributes["profile"]["data"]
        # the transform builds profiles in a fixed key order: equal profiles serialise alike
        key = orjson.dumps(profile)
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = _Item(
                {
                    "type": "event-bulk-create",
                    "attributes": {"profile": {"data": _bulk_profile(profile)}, "events": {"data": []}},
                },
                [],
            )
        event = dict(attributes)
        del event["profile"]
        entry.data["attributes"]["events"]["data"].append({"type": "event", "attributes": event})
        entry.sources.append(request.sources[0])
    return list(entries.values())


def _event_job(chunk: Sequence[_Item]) -> KlaviyoRequest:
    body = {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": [item.data for item in chunk]}},
        }
    }
    return _bulk("/api/event-bulk-create-jobs", body, chunk, None)


def _bulk_profile(profile: dict[str, Any]) -> dict[str, Any]:
    """In bulk events, a profile's ``meta`` sits beside ``attributes``, not inside."""
    attributes = profile.get("attributes", {})
    if "meta" not in attributes:
        return profile
    inner = {k: v for k, v in attributes.items() if k != "meta"}
    return {**profile, "attributes": inner, "meta": attributes["meta"]}


# ---------------------------------------------------------------- lists and subscriptions

_LIMITS: Final = {"subscribe": MAX_SUBSCRIBE, "unsubscribe": MAX_UNSUBSCRIBE, "list_add": MAX_PROFILES}


def _list_jobs(requests: Sequence[KlaviyoRequest]) -> Iterator[KlaviyoRequest]:
    """One job per (kind, list), after collapsing each profile's operations on a list to its last.

    Subscribing then unsubscribing one profile (or the reverse) inside one batch has the same end
    state as its last operation alone; sending only that one also spares the profile a double
    opt-in message for a subscription it already withdrew. The superseded inputs ride along in the
    last request's ``sources``, so they are settled by its outcome.

    Consent is per profile, not per list, so a profile's operations on different lists keep their
    input order: its n-th remaining operation goes out in round n, after every job of the earlier
    rounds (unsubscribing from one list, then subscribing to another, ends subscribed).
    """
    last: dict[tuple[str, str], int] = {}
    superseded: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        who = (_list_id(request), _who(request))
        if who in last:
            superseded.setdefault(index, []).extend(
                [*superseded.pop(last[who], []), *requests[last[who]].sources]
            )
        last[who] = index
    rounds: list[dict[tuple[str, str], list[KlaviyoRequest]]] = []
    operations: dict[str, int] = {}
    for (_list, profile), index in sorted(last.items(), key=lambda entry: entry[1]):
        request = requests[index]
        if index in superseded:
            request = replace(request, sources=(*superseded[index], *request.sources))
        n = operations[profile] = operations.get(profile, -1) + 1
        if n == len(rounds):
            rounds.append({})
        rounds[n].setdefault((request.kind, _list_id(request)), []).append(request)
    for groups in rounds:
        for (kind, _list), members in groups.items():
            yield from _list_job(kind, members)


def _list_job(kind: str, requests: Sequence[KlaviyoRequest]) -> Iterator[KlaviyoRequest]:
    if len(requests) == 1:
        yield requests[0]
        return
    template = requests[0].body["data"]
    path = requests[0].path

    def job(chunk: Sequence[_Item]) -> KlaviyoRequest:
        data = {
            **template,
            "attributes": {**template["attributes"], "profiles": {"data": [i.data for i in chunk]}},
        }
        return _bulk(path, {"data": data}, chunk, None)

    items = [_Item(p, list(r.sources)) for r in requests for p in _profiles_of(r)]
    for chunk in _chunks(items, _LIMITS[kind]):
        yield from _within_cap(job, chunk)


def _who(request: KlaviyoRequest) -> str:
    """The profile a list request is about (its first; single requests carry one)."""
    return profile_identity(_profiles_of(request)[0])


def profile_identity(profile: dict[str, Any]) -> str:
    """Who a profile in a list job is: its email and phone (not its ``subscriptions``, which differ
    between a subscribe and an unsubscribe of the same profile), else all its attributes."""
    attributes = profile.get("attributes") or {}
    identifiers = {k: attributes[k] for k in ("email", "phone_number") if attributes.get(k)}
    return orjson.dumps(identifiers or attributes, option=orjson.OPT_SORT_KEYS).decode()


def profiles_in(request: KlaviyoRequest) -> list[str]:
    """The identities of every profile a list job carries."""
    return [profile_identity(p) for p in _profiles_of(request)]


def _profiles_of(request: KlaviyoRequest) -> list[dict[str, Any]]:
    profiles: list[dict[str, Any]] = request.body["data"]["attributes"]["profiles"]["data"]
    return profiles


def _list_id(request: KlaviyoRequest) -> str:
    relationships = request.body["data"]["relationships"]
    if "list" in relationships:
        return str(relationships["list"]["data"]["id"])
    return str(relationships["lists"]["data"][0]["id"])
