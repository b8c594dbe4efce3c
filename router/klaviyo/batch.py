"""Merge single-endpoint requests into Klaviyo's bulk jobs (pure).

What delivery sends for many events at once:

- profile upserts → ``/api/profile-bulk-import-jobs`` (≤ 10 000 profiles, ≤ 5 MB), or
  ``/api/profile-import`` when only one is waiting;
- events → ``/api/event-bulk-create-jobs`` (≤ 1000 events, ≤ 5 MB, events grouped under their
  profile, no ``unique_id`` twice for one profile and metric), or ``/api/events`` for one;
- subscriptions → one subscribe job per list (≤ 1000 profiles), unsubscribe jobs (≤ 100);
- list membership without consent → bulk import jobs with the list relationship.

The requests come in *stages* (:func:`staged`), in the order they may be sent: profile upserts,
then events, then list jobs in rounds, so neither an event nor a list job reaches Klaviyo before
the upsert of its profile in the same batch. Items keep their input order inside every job; a
profile's operations on one list inside one batch collapse to the last of them (same end state,
fewer jobs).

Batching runs in two steps. :func:`prepare` encodes what each request adds to a bulk job (its
item, and the profile an event is grouped under) as JSON, right after the transform made it: its
objects are still in the CPU's caches then, and nothing holds on to them afterwards. :func:`assemble`
then builds the bulk bodies by joining those bytes. Planning a batch of 1000 events with every
request's objects kept until the end ran at about half the speed: they no longer fit in the
caches by the time they were encoded (bench/transform.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import orjson

from router.klaviyo.requests import KlaviyoRequest

MAX_EVENTS: Final = 1000
MAX_PROFILES: Final = 10_000
MAX_SUBSCRIBE: Final = 1000
MAX_UNSUBSCRIBE: Final = 100
#: Klaviyo's 5 MB payload cap, with headroom for the envelope.
MAX_BYTES: Final = 4_900_000
#: Bulk jobs a list request's profiles go into, by kind, and their caps.
_LIMITS: Final = {"subscribe": MAX_SUBSCRIBE, "unsubscribe": MAX_UNSUBSCRIBE, "list_add": MAX_PROFILES}
#: Kinds of requests that act on list membership or consent.
_LIST_KINDS: Final = frozenset({*_LIMITS, "list_remove"})
#: Stands for a list job's profiles while its envelope is encoded (random: no input can hold it).
_HOLE: Final = f"profiles-{secrets.token_hex(16)}"
#: Stages of :func:`staged`: profile upserts, then events (and requests sent as they are), then
#: list jobs from ``LIST_STAGE`` on, one stage per round.
PROFILE_STAGE: Final = 0
EVENT_STAGE: Final = 1
LIST_STAGE: Final = 2


@dataclass(frozen=True, slots=True)
class Part:
    """What one single-endpoint request adds to bulk jobs, its JSON already encoded (see :func:`prepare`)."""

    #: The request's kind (``profile``, ``event``, a list kind, or ``bulk`` for one sent as it is).
    kind: str
    path: str
    sources: tuple[int, ...]
    ordering_key: str | None
    #: The bulk items: the profile resource (profile), the event's attributes without its profile
    #: (event), the profiles of a list job (list kinds).
    items: tuple[bytes, ...] = ()
    #: event: its profile as bulk events carry it (events of equal profiles share one entry).
    profile: bytes = b""
    #: event: (metric name, unique_id) when it has a unique_id. List kinds: (list id, profile identity).
    key: tuple[str, str] | None = None
    #: List kinds: the job's JSON before and after its profiles.
    envelope: tuple[bytes, bytes] = (b"", b"")
    #: A request sent as it is (already a bulk job, or not shaped as its kind says).
    request: KlaviyoRequest | None = field(default=None, compare=False)

    def __reduce__(self) -> tuple[type[Part], tuple[Any, ...]]:
        """Pickled as its fields (planning processes send parts back): a sixth of the time of
        the default for a slotted dataclass."""
        return Part, (
            self.kind,
            self.path,
            self.sources,
            self.ordering_key,
            self.items,
            self.profile,
            self.key,
            self.envelope,
            self.request,
        )


def batch(requests: Iterable[KlaviyoRequest]) -> list[KlaviyoRequest]:
    """Bulk requests for ``requests`` (single-endpoint ones, in input order)."""
    return assemble([prepare(request) for request in requests])


def prepare(request: KlaviyoRequest) -> Part:
    """Encode what ``request`` adds to a bulk job (leaves ``request`` unchanged).

    A request whose body is not shaped as its kind says (one RudderStack transformed, say) is
    sent as it is, on its own: Klaviyo's answer then says what is wrong with it. Either way its
    JSON is encoded here, so a body that cannot be encoded (nested too deep, an integer past 64
    bits) raises ``orjson.JSONEncodeError`` now, for its own message, not later for a whole bulk job.
    """
    try:
        if request.kind == "profile":
            return _part(request, items=(orjson.dumps(request.body["data"]),))
        if request.kind == "event":
            return _event_part(request)
        if request.kind in _LIMITS:
            return _list_part(request)
    except orjson.JSONEncodeError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError):
        pass
    return _part(request, request=_encoded(request))


def _encoded(request: KlaviyoRequest) -> KlaviyoRequest:
    """``request`` with its body encoded (a request sent as it is)."""
    if request.encoded is not None:
        return request
    return KlaviyoRequest.from_json(
        orjson.dumps(request.body),
        method=request.method,
        path=request.path,
        kind=request.kind,
        sources=request.sources,
        item_sources=request.item_sources,
        ordering_key=request.ordering_key,
    )


class Staged(NamedTuple):
    """One request of :func:`staged`: when it may go, and the kind of the parts it carries."""

    stage: int
    kind: str
    request: KlaviyoRequest


def assemble(parts: Sequence[Part]) -> list[KlaviyoRequest]:
    """The requests that carry ``parts``, in the order of their stages (see :func:`staged`)."""
    return [entry.request for entry in staged(parts)]


def staged(parts: Sequence[Part]) -> list[Staged]:
    """The requests that carry ``parts``, stage by stage.

    :data:`PROFILE_STAGE`: profile upserts; :data:`EVENT_STAGE`: events; from :data:`LIST_STAGE`
    on, list jobs, a profile's n-th operation on lists in the n-th of those stages (see
    :func:`_list_jobs`). A request sent as it is goes with the upserts, with the events, or after
    every list round, as its kind says. Stage k's requests may go once stage k - 1's are answered.
    """
    profiles: list[Part] = []
    events: list[Part] = []
    lists: list[Part] = []
    as_is: list[tuple[str, KlaviyoRequest]] = []
    for part in parts:
        if part.request is not None:
            as_is.append((part.kind, part.request))
        else:
            {"profile": profiles, "event": events}.get(part.kind, lists).append(part)
    rounds = _list_jobs(lists)
    after_lists = LIST_STAGE + len(rounds)
    result = [Staged(PROFILE_STAGE, "profile", request) for request in _profile_jobs(profiles)]
    result += [Staged(EVENT_STAGE, "event", request) for request in _event_jobs(events)]
    result += [
        Staged(LIST_STAGE + n, kind, request) for n, jobs in enumerate(rounds) for kind, request in jobs
    ]
    for kind, request in as_is:
        stage = PROFILE_STAGE if kind == "profile" else after_lists if kind in _LIST_KINDS else EVENT_STAGE
        result.append(Staged(stage, kind, request))
    result.sort(key=lambda entry: entry.stage)  # stable: within a stage, the order above
    return result


def _part(of: KlaviyoRequest, **found: Any) -> Part:
    return Part(of.kind, of.path, of.sources, of.ordering_key, **found)


# ---------------------------------------------------------------- assembling


@dataclass(slots=True)
class _Item:
    """One bulk item: its JSON and the inputs behind it."""

    data: bytes
    sources: list[int]


def _chunks(items: Sequence[_Item], max_items: int) -> Iterator[Sequence[_Item]]:
    for start in range(0, len(items), max_items):
        yield items[start : start + max_items]


def _within_cap(path: str, envelope: tuple[bytes, bytes], items: Sequence[_Item]) -> Iterator[KlaviyoRequest]:
    """One bulk request of ``items`` in ``envelope``, or, over Klaviyo's payload cap, one per half.

    A single item over the cap is sent as it is and Klaviyo's refusal dead-letters it.
    """
    head, tail = envelope
    size = len(head) + len(tail) + sum(len(item.data) + 1 for item in items)
    if len(items) > 1 and size > MAX_BYTES:
        half = len(items) // 2
        yield from _within_cap(path, envelope, items[:half])
        yield from _within_cap(path, envelope, items[half:])
        return
    yield KlaviyoRequest.from_json(
        _joined(envelope, [item.data for item in items]),
        path=path,
        sources=tuple(sorted({s for item in items for s in item.sources})),
        item_sources=tuple(tuple(item.sources) for item in items),
    )


def _joined(envelope: tuple[bytes, bytes], items: Iterable[bytes]) -> bytes:
    """A bulk body: ``items`` as a JSON array between the envelope's two halves."""
    head, tail = envelope
    return head + b"[" + b",".join(items) + b"]" + tail


def _single(part: Part, encoded: bytes) -> KlaviyoRequest:
    """The request ``part`` came from, again (it is alone of its kind in the batch)."""
    return KlaviyoRequest.from_json(
        encoded, path=part.path, kind=part.kind, sources=part.sources, ordering_key=part.ordering_key
    )


# ---------------------------------------------------------------- profiles

_PROFILES_JOB: Final = (
    b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":',
    b"}}}}",
)


def _profile_jobs(parts: Sequence[Part]) -> Iterator[KlaviyoRequest]:
    if len(parts) == 1:
        yield _single(parts[0], b'{"data":' + parts[0].items[0] + b"}")
        return
    items = [_Item(part.items[0], list(part.sources)) for part in parts]
    for chunk in _chunks(items, MAX_PROFILES):
        yield from _within_cap("/api/profile-bulk-import-jobs", _PROFILES_JOB, chunk)


# ---------------------------------------------------------------- events

_EVENTS_JOB: Final = (
    b'{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":',
    b"}}}}",
)


def _event_part(request: KlaviyoRequest) -> Part:
    attributes = request.body["data"]["attributes"]
    event = {name: value for name, value in attributes.items() if name != "profile"}
    unique_id = attributes.get("unique_id")
    name = attributes["metric"]["data"]["attributes"]["name"]
    return _part(
        request,
        items=(orjson.dumps(event),),
        profile=orjson.dumps(_bulk_profile(attributes["profile"]["data"])),
        key=None if unique_id is None else (str(name), str(unique_id)),
    )


def _event_jobs(parts: Sequence[Part]) -> Iterator[KlaviyoRequest]:
    if len(parts) == 1:
        yield _single_event(parts[0])
        return
    for chunk in _event_chunks(parts):
        yield from _within_cap("/api/event-bulk-create-jobs", _EVENTS_JOB, _event_entries(chunk))


def _single_event(part: Part) -> KlaviyoRequest:
    """``/api/events`` takes the profile's ``meta`` inside its attributes, not beside."""
    profile = orjson.loads(part.profile)
    meta = profile.pop("meta", None)
    if meta is not None:
        profile["attributes"] = {**profile["attributes"], "meta": meta}
    attributes = {**orjson.loads(part.items[0]), "profile": {"data": profile}}
    return _single(part, orjson.dumps({"data": {"type": "event", "attributes": attributes}}))


def _event_chunks(parts: Sequence[Part]) -> list[list[Part]]:
    """Chunks of ≤ MAX_EVENTS events, never repeating a (metric, unique_id) within one.

    Klaviyo fails a whole job that repeats one (and would record only the first anyway), so a
    repeat goes to a later chunk than the one holding its predecessor; order is kept per key.
    Stricter than Klaviyo (which keys on the profile too) and much cheaper to compute.
    """
    chunks: list[list[Part]] = []
    last_chunk: dict[tuple[str, str], int] = {}
    first_open = 0
    for part in parts:
        key = part.key
        i = first_open if key is None else max(first_open, last_chunk.get(key, -1) + 1)
        while i < len(chunks) and len(chunks[i]) >= MAX_EVENTS:
            i += 1
        if i == len(chunks):
            chunks.append([])
        chunks[i].append(part)
        if key is not None:
            last_chunk[key] = i
        while first_open < len(chunks) and len(chunks[first_open]) >= MAX_EVENTS:
            first_open += 1
    return chunks


def _event_entries(parts: Sequence[Part]) -> list[_Item]:
    """One ``event-bulk-create`` entry per profile, holding that profile's events in order."""
    grouped: dict[bytes, list[Part]] = {}
    for part in parts:
        grouped.setdefault(part.profile, []).append(part)
    return [
        _Item(
            b'{"type":"event-bulk-create","attributes":{"profile":{"data":'
            + profile
            + b'},"events":{"data":['
            + b",".join(b'{"type":"event","attributes":' + part.items[0] + b"}" for part in group)
            + b"]}}}",
            [part.sources[0] for part in group],
        )
        for profile, group in grouped.items()
    ]


def _bulk_profile(profile: dict[str, Any]) -> dict[str, Any]:
    """In bulk events, a profile's ``meta`` sits beside ``attributes``, not inside."""
    attributes = profile.get("attributes", {})
    if "meta" not in attributes:
        return profile
    inner = {k: v for k, v in attributes.items() if k != "meta"}
    return {**profile, "attributes": inner, "meta": attributes["meta"]}


# ---------------------------------------------------------------- lists and subscriptions


def _list_part(request: KlaviyoRequest) -> Part:
    data = request.body["data"]
    profiles = data["attributes"]["profiles"]["data"]
    hollow = {**data, "attributes": {**data["attributes"], "profiles": {"data": _HOLE}}}
    head, tail = orjson.dumps({"data": hollow}).split(f'"{_HOLE}"'.encode())
    return _part(
        request,
        items=tuple(orjson.dumps(profile) for profile in profiles),
        key=(_list_id(data), profile_identity(profiles[0])),
        envelope=(head, tail),
    )


def _list_jobs(parts: Sequence[Part]) -> list[list[tuple[str, KlaviyoRequest]]]:
    """One job per (kind, list), after collapsing each profile's operations on a list to its last;
    as rounds of ``(kind, request)``.

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
    for index, part in enumerate(parts):
        assert part.key is not None
        if part.key in last:
            earlier = last[part.key]
            superseded.setdefault(index, []).extend([*superseded.pop(earlier, []), *parts[earlier].sources])
        last[part.key] = index
    rounds: list[dict[tuple[str, str], list[tuple[Part, tuple[int, ...]]]]] = []
    operations: dict[str, int] = {}
    for (list_id, profile), index in sorted(last.items(), key=lambda entry: entry[1]):
        part = parts[index]
        sources = (*superseded.get(index, ()), *part.sources)
        n = operations[profile] = operations.get(profile, -1) + 1
        if n == len(rounds):
            rounds.append({})
        rounds[n].setdefault((part.kind, list_id), []).append((part, sources))
    return [
        [(kind, request) for (kind, _list), members in groups.items() for request in _list_job(kind, members)]
        for groups in rounds
    ]


def _list_job(kind: str, members: Sequence[tuple[Part, tuple[int, ...]]]) -> Iterator[KlaviyoRequest]:
    first, sources = members[0]
    if len(members) == 1:
        yield KlaviyoRequest.from_json(
            _joined(first.envelope, first.items),
            path=first.path,
            kind=first.kind,
            sources=sources,
            ordering_key=first.ordering_key,
        )
        return
    items = [_Item(item, list(sources)) for part, sources in members for item in part.items]
    for chunk in _chunks(items, _LIMITS[kind]):
        yield from _within_cap(first.path, first.envelope, chunk)


def profile_identity(profile: dict[str, Any]) -> str:
    """Who a profile in a list job is: its email and phone (not its ``subscriptions``, which differ
    between a subscribe and an unsubscribe of the same profile), else all its attributes."""
    attributes = profile.get("attributes") or {}
    identifiers = {k: attributes[k] for k in ("email", "phone_number") if attributes.get(k)}
    return orjson.dumps(identifiers or attributes, option=orjson.OPT_SORT_KEYS).decode()


def _list_id(data: dict[str, Any]) -> str:
    relationships = data["relationships"]
    if "list" in relationships:
        return str(relationships["list"]["data"]["id"])
    return str(relationships["lists"]["data"][0]["id"])
