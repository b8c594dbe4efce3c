"""One handler per Klaviyo operation. Each gets a :class:`Call` whose body already passed the schema check.

Handlers check what the schema cannot (identifiers, consent rules, unknown ids, duplicate ``unique_id`` in a
bulk job, injected invalid items), raise :class:`~router.fake_klaviyo.jsonapi.ApiError` for 4xx answers and
change the :class:`~router.fake_klaviyo.state.FakeKlaviyo` state only when the whole request is accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from router.fake_klaviyo.jsonapi import ApiError, error_object, json_response
from router.fake_klaviyo.queries import paginate, parse_filter
from router.fake_klaviyo.records import IDENTIFIERS, Profile, identifier_key, identifier_problems
from router.fake_klaviyo.state import DuplicateProfile, FakeKlaviyo, event_time
from router.klaviyo.spec import Endpoint

Problems = list[tuple[str, str]]
MAX_METRIC_NAME = 127
BULK_EVENTS_BASE = "/data/attributes/events-bulk-create/data"
PROFILES_BASE = "/data/attributes/profiles/data"


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated, rate-limited, schema-valid request."""

    fake: FakeKlaviyo
    request: web.Request
    endpoint: Endpoint
    params: dict[str, str]
    body: Any


def _raise_problems(problems: Problems) -> None:
    if problems:
        errors = [error_object(400, detail, pointer=pointer) for pointer, detail in sorted(set(problems))]
        raise ApiError(400, errors)


def _no_content(status: int = 202) -> web.Response:
    return web.Response(status=status)


def _injected(call: Call, base: str, entries: list[Any]) -> Problems:
    return call.fake.faults.invalid_items(call.endpoint.operation_id, base, entries)


def _has_identifier(attributes: Mapping[str, Any], profile_id: object) -> bool:
    return bool(profile_id) or any(
        isinstance(attributes.get(name), str) and attributes[name] for name in IDENTIFIERS
    )


def _profile_problems(fake: FakeKlaviyo, data: Mapping[str, Any], pointer: str) -> Problems:
    """Identifier problems of a ``{"type": "profile", "id"?, "attributes"}`` object at ``pointer``."""
    attributes = data.get("attributes") or {}
    problems = identifier_problems(attributes, f"{pointer}/attributes")
    if not _has_identifier(attributes, data.get("id")):
        problems.append(
            (
                f"{pointer}/attributes",
                "A profile identifier (email, phone_number, external_id or id) is required.",
            )
        )
    elif data.get("id") and data["id"] not in fake.profiles:
        problems.append((f"{pointer}/id", f"Profile {data['id']!r} does not exist."))
    return problems


def _parse_time(raw: str) -> datetime | None:
    try:
        return event_time(raw)
    except ValueError:
        return None


def _time_problems(attributes: Mapping[str, Any], pointer: str) -> Problems:
    raw = attributes.get("time")
    if raw is None:
        return []
    moment = _parse_time(raw)
    if moment is None:
        return [(f"{pointer}/time", f"Invalid date-time {raw!r}.")]
    if moment.year < 1990 or moment > datetime.now(UTC) + timedelta(days=365):
        return [(f"{pointer}/time", "Event time must be after 1990 and at most 1 year in the future.")]
    return []


def _event_problems(attributes: Mapping[str, Any], pointer: str) -> Problems:
    problems = _time_problems(attributes, pointer)
    name = attributes["metric"]["data"]["attributes"]["name"]
    if not name or len(name) > MAX_METRIC_NAME:
        problems.append(
            (f"{pointer}/metric/data/attributes/name", "Metric name must be 1 to 127 characters.")
        )
    return problems


def _upsert(
    fake: FakeKlaviyo,
    data: Mapping[str, Any],
    *,
    meta: Any = None,
    clear_nulls: bool = False,
    strict: bool = False,
) -> tuple[Profile, bool]:
    attributes = {key: value for key, value in (data.get("attributes") or {}).items() if key != "meta"}
    return fake.upsert_profile(
        attributes, profile_id=data.get("id"), meta=meta, clear_nulls=clear_nulls, strict=strict
    )


# -- events ----------------------------------------------------------------------------------------------


def create_event(call: Call) -> web.Response:
    """``POST /api/events``: upsert the profile, record the event (a duplicate is silently ignored)."""
    attributes = call.body["data"]["attributes"]
    profile_data = attributes["profile"]["data"]
    problems = _profile_problems(call.fake, profile_data, "/data/attributes/profile/data")
    _raise_problems(problems + _event_problems(attributes, "/data/attributes"))
    profile, _ = _upsert(call.fake, profile_data, meta=(profile_data.get("attributes") or {}).get("meta"))
    call.fake.record_event(profile, attributes["metric"]["data"]["attributes"]["name"], attributes)
    return _no_content()


def _profile_key(fake: FakeKlaviyo, data: Mapping[str, Any]) -> str:
    """Who a bulk entry's events belong to, without creating the profile."""
    attributes = data.get("attributes") or {}
    matches = fake.matching_profiles(attributes, data.get("id"))
    if matches:
        return matches[0]
    for name in IDENTIFIERS:
        value = attributes.get(name)
        if isinstance(value, str) and value:
            return "new:" + ":".join(identifier_key(name, value))
    return "new:?"


def _bulk_event_problems(fake: FakeKlaviyo, entries: list[Any]) -> Problems:
    problems: Problems = []
    seen: set[tuple[str, str, str]] = set()
    for index, entry in enumerate(entries):
        pointer = f"{BULK_EVENTS_BASE}/{index}/attributes"
        profile_data = entry["attributes"]["profile"]["data"]
        profile_problems = _profile_problems(fake, profile_data, f"{pointer}/profile/data")
        problems += profile_problems
        owner = "?" if profile_problems else _profile_key(fake, profile_data)
        for number, event in enumerate(entry["attributes"]["events"]["data"]):
            event_pointer = f"{pointer}/events/data/{number}/attributes"
            problems += _event_problems(event["attributes"], event_pointer)
            unique_id = event["attributes"].get("unique_id")
            key = (owner, event["attributes"]["metric"]["data"]["attributes"]["name"], str(unique_id))
            if unique_id and key in seen:
                problems.append(
                    (
                        f"{event_pointer}/unique_id",
                        f"Duplicate unique_id {unique_id!r} for the same profile and metric; no events were processed.",
                    )
                )
            seen.add(key)
    return problems


def bulk_create_events(call: Call) -> web.Response:
    """``POST /api/event-bulk-create-jobs``: all or nothing, like Klaviyo's validation of the job."""
    entries = call.body["data"]["attributes"]["events-bulk-create"]["data"]
    _raise_problems(_bulk_event_problems(call.fake, entries) + _injected(call, BULK_EVENTS_BASE, entries))
    for entry in entries:
        profile_data = entry["attributes"]["profile"]["data"]
        profile, _ = _upsert(call.fake, profile_data, meta=profile_data.get("meta"))
        for event in entry["attributes"]["events"]["data"]:
            attributes = dict(event["attributes"])
            attributes.setdefault("backfill", entry["attributes"].get("backfill"))
            call.fake.record_event(profile, attributes["metric"]["data"]["attributes"]["name"], attributes)
    return _no_content()


# -- profiles --------------------------------------------------------------------------------------------


def create_or_update_profile(call: Call) -> web.Response:
    """``POST /api/profile-import``: 201 created / 200 updated; 409 when identifiers name two profiles."""
    data = call.body["data"]
    _raise_problems(_profile_problems(call.fake, data, "/data"))
    try:
        profile, created = _upsert(call.fake, data, meta=data.get("meta"), clear_nulls=True, strict=True)
    except DuplicateProfile as exc:
        raise ApiError.one(
            409,
            str(exc),
            code="duplicate_profile",
            pointer="/data/attributes",
            meta={"duplicate_profile_id": exc.duplicate_profile_id},
        ) from None
    call.fake.note_write("profiles", data)
    return json_response({"data": profile.to_json()}, status=201 if created else 200)


def _check_lists(call: Call, references: list[tuple[str, str]]) -> list[str]:
    """The list ids of ``(pointer, id)`` references; 400 naming the pointer of any list that does not exist."""
    problems = [
        (pointer, f"List {list_id!r} does not exist.")
        for pointer, list_id in references
        if list_id not in call.fake.lists
    ]
    _raise_problems(problems)
    return [list_id for _, list_id in references]


def _import_error(job_id: str, index: int, problems: Problems, original: Any) -> dict[str, Any]:
    pointer, detail = problems[0]
    return {
        "type": "import-error",
        "id": f"{job_id}-{index}",
        "attributes": {
            "code": "invalid",
            "title": "Invalid input.",
            "detail": detail,
            "source": {"pointer": pointer},
            "original_payload": original,
        },
    }


def _refused_in_import(fake: FakeKlaviyo, item: Mapping[str, Any], pointer: str) -> Problems:
    """Import errors configured with :meth:`FakeKlaviyo.refuse_in_imports`."""
    if not fake.import_refusals:
        return []
    attributes = item.get("attributes") or {}
    return [
        (f"{pointer}/attributes/{name}", fake.import_refusals[attributes[name]])
        for name in IDENTIFIERS
        if isinstance(attributes.get(name), str) and attributes[name] in fake.import_refusals
    ]


def bulk_import_profiles(call: Call) -> web.Response:
    """``POST /api/profile-bulk-import-jobs``: applied at once; bad profiles become the job's import errors."""
    data = call.body["data"]
    items = data["attributes"]["profiles"]["data"]
    references = ((data.get("relationships") or {}).get("lists") or {}).get("data") or []
    list_ids = _check_lists(
        call,
        [(f"/data/relationships/lists/data/{index}/id", item["id"]) for index, item in enumerate(references)],
    )
    _raise_problems(_injected(call, PROFILES_BASE, items))
    job = call.fake.new_import_job(len(items), list_ids)
    for index, item in enumerate(items):
        problems = _profile_problems(call.fake, item, f"{PROFILES_BASE}/{index}") + _refused_in_import(
            call.fake, item, f"{PROFILES_BASE}/{index}"
        )
        if problems:
            job.errors.append(_import_error(job.id, index, problems, item))
            continue
        profile, _ = _upsert(call.fake, item, meta=item.get("meta"))
        job.profile_ids.append(profile.id)
        if list_ids:
            call.fake.note_write("list_adds", {"lists": list_ids, "profile": item})
        else:
            call.fake.note_write("profiles", item)
    for list_id in list_ids:
        call.fake.add_members(list_id, job.profile_ids)
    return json_response({"data": job.to_json()}, status=202)


def _job(call: Call, key: str) -> Any:
    job = call.fake.jobs.get(call.params[key])
    if job is None:
        raise ApiError.one(404, f"Bulk import job {call.params[key]!r} does not exist.")
    return job


def get_bulk_import_profiles_job(call: Call) -> web.Response:
    """``GET /api/profile-bulk-import-jobs/{job_id}``: each read moves a job on, to ``complete``."""
    job = _job(call, "job_id")
    job.read()
    return json_response({"data": job.to_json()})


def get_bulk_import_profiles_jobs(call: Call) -> web.Response:
    """``GET /api/profile-bulk-import-jobs``: ``filter`` on status, up to 100 a page."""
    selected = parse_filter(call.request, ("status",))
    jobs = [job for job in call.fake.jobs.values() if selected is None or selected.matches(job.status)]
    page, links = paginate(call.request, jobs, default=20, maximum=100)
    return json_response({"data": [job.to_json() for job in page], "links": links})


def get_errors_for_bulk_import_profiles_job(call: Call) -> web.Response:
    """``GET /api/profile-bulk-import-jobs/{id}/import-errors``, paginated."""
    errors = _job(call, "id").errors
    page, links = paginate(call.request, errors, default=20, maximum=100)
    return json_response({"data": page, "links": links})


def _job_profile_ids(call: Call) -> list[str]:
    """The profiles a finished job created or updated (none while it is queued or processing)."""
    job = _job(call, "id")
    return list(job.profile_ids) if job.status == "complete" else []


def get_profiles_for_bulk_import_profiles_job(call: Call) -> web.Response:
    """``GET /api/profile-bulk-import-jobs/{id}/profiles``, up to 100 a page."""
    page, links = paginate(call.request, _job_profile_ids(call), default=20, maximum=100)
    profiles = [call.fake.profiles[profile_id].to_json() for profile_id in page]
    return json_response({"data": profiles, "links": links})


def get_profile_ids_for_bulk_import_profiles_job(call: Call) -> web.Response:
    """``GET /api/profile-bulk-import-jobs/{id}/relationships/profiles``, up to 100 a page."""
    page, links = paginate(call.request, _job_profile_ids(call), default=20, maximum=100)
    return json_response(
        {"data": [{"type": "profile", "id": profile_id} for profile_id in page], "links": links}
    )


def get_profiles(call: Call) -> web.Response:
    """``GET /api/profiles``: ``filter`` ``equals``/``any`` on id, email, phone_number or external_id;
    up to 100 a page. Klaviyo takes at most 100 values in an ``any`` filter."""
    selected = parse_filter(call.request, ("id", "email", "phone_number", "external_id"))
    if selected is None:
        ids = list(call.fake.profiles)
    elif len(selected.values) > 100:
        raise ApiError.one(400, "An 'any' filter takes at most 100 values.", parameter="filter")
    else:
        ids = call.fake.profiles_by(selected.field, selected.values)
    page, links = paginate(call.request, ids, default=20, maximum=100)
    return json_response(
        {"data": [call.fake.profiles[profile_id].to_json() for profile_id in page], "links": links}
    )


# -- consent ---------------------------------------------------------------------------------------------


def _channels(attributes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``subscriptions`` flattened to ``{"email.marketing": {"consent": ..., "consented_at": ...}}``."""
    flat: dict[str, dict[str, Any]] = {}
    for group, kinds in (attributes.get("subscriptions") or {}).items():
        for kind, record in (kinds or {}).items():
            if isinstance(record, Mapping) and "consent" in record:
                flat[f"{group}.{kind}"] = dict(record)
    return flat


def _consent_problems(attributes: Mapping[str, Any], pointer: str, *, historical: bool | None) -> Problems:
    """Channel without its identifier; ``consented_at`` rules when ``historical`` is not ``None``."""
    problems: Problems = []
    for channel, record in _channels(attributes).items():
        group, kind = channel.split(".", 1)
        channel_pointer = f"{pointer}/subscriptions/{group}/{kind}"
        needed = "email" if group == "email" else "phone_number" if group in ("sms", "whatsapp") else None
        if needed and not attributes.get(needed):
            problems.append((f"{pointer}/{needed}", f"{needed} is required to change {channel} consent."))
        consented_at = record.get("consented_at")
        if historical is True and not consented_at:
            problems.append(
                (f"{channel_pointer}/consented_at", "consented_at is required for a historical import.")
            )
        elif historical is False and consented_at:
            problems.append(
                (
                    f"{channel_pointer}/consented_at",
                    "consented_at can only be set when historical_import is true.",
                )
            )
        elif consented_at and (_parse_time(consented_at) or datetime.max.replace(tzinfo=UTC)) > datetime.now(
            UTC
        ):
            problems.append(
                (f"{channel_pointer}/consented_at", "consented_at must be a date-time in the past.")
            )
    return problems


def _consent_list(call: Call) -> str | None:
    """The list a consent job names in ``relationships.list``, if any (400 when it does not exist)."""
    reference = ((call.body["data"].get("relationships") or {}).get("list") or {}).get("data")
    if not reference:
        return None
    return _check_lists(call, [("/data/relationships/list/data/id", reference["id"])])[0]


def _consent_job_problems(call: Call, items: list[Any], *, historical: bool | None) -> Problems:
    problems: Problems = []
    for index, item in enumerate(items):
        pointer = f"{PROFILES_BASE}/{index}"
        attributes = item.get("attributes") or {}
        problems += _profile_problems(call.fake, item, pointer)
        if not (item.get("id") or attributes.get("email") or attributes.get("phone_number")):
            problems.append((f"{pointer}/attributes", "An email or phone_number is required."))
        problems += _consent_problems(attributes, f"{pointer}/attributes", historical=historical)
    return problems + _injected(call, PROFILES_BASE, items)


def _identity(item: Mapping[str, Any]) -> dict[str, Any]:
    attributes = item.get("attributes") or {}
    return {
        "id": item.get("id"),
        "attributes": {name: attributes[name] for name in IDENTIFIERS if name in attributes},
    }


def bulk_subscribe_profiles(call: Call) -> web.Response:
    """``POST /api/profile-subscription-bulk-create-jobs``: consent recorded, profiles added to the list."""
    attributes = call.body["data"]["attributes"]
    items = attributes["profiles"]["data"]
    historical = bool(attributes.get("historical_import"))
    list_id = _consent_list(call)
    _raise_problems(_consent_job_problems(call, items, historical=historical))
    double_opt_in = list_id is not None and call.fake.lists[list_id].opt_in_process == "double_opt_in"
    for item in items:
        profile, _ = _upsert(call.fake, _identity(item))
        for channel, record in _channels(item.get("attributes") or {}).items():
            call.fake.set_consent(
                profile.id,
                channel,
                "SUBSCRIBED",
                list_id=list_id,
                consented_at=record.get("consented_at"),
                custom_source=attributes.get("custom_source"),
                historical_import=historical,
                double_opt_in=double_opt_in and not historical,
            )
        if list_id is not None:
            call.fake.add_members(list_id, [profile.id])
        job = {k: v for k, v in attributes.items() if k != "profiles"}
        call.fake.note_write("subscriptions", {"list": list_id, "job": job, "profile": item})
    return _no_content()


def bulk_unsubscribe_profiles(call: Call) -> web.Response:
    """``POST /api/profile-subscription-bulk-delete-jobs``: profiles outside the list are unsubscribed globally."""
    items = call.body["data"]["attributes"]["profiles"]["data"]
    list_id = _consent_list(call)
    _raise_problems(_consent_job_problems(call, items, historical=None))
    for item in items:
        profile, _ = _upsert(call.fake, _identity(item))
        if list_id is not None and profile.id not in call.fake.memberships.get(list_id, {}):
            call.fake.global_unsubscribes.append(profile.id)
        for channel in _channels(item.get("attributes") or {}):
            call.fake.set_consent(profile.id, channel, "UNSUBSCRIBED", list_id=list_id)
        call.fake.note_write("unsubscriptions", {"list": list_id, "profile": item})
    return _no_content()


# -- lists -----------------------------------------------------------------------------------------------


def get_lists(call: Call) -> web.Response:
    """``GET /api/lists``: ``filter`` on name/id, 10 per page."""
    selected = parse_filter(call.request, ("name", "id"))
    lists = [
        item
        for item in call.fake.lists.values()
        if selected is None or selected.matches(item.name if selected.field == "name" else item.id)
    ]
    page, links = paginate(call.request, lists, default=10, maximum=10)
    return json_response({"data": [item.to_json() for item in page], "links": links})


def create_list(call: Call) -> web.Response:
    """``POST /api/lists``: 201; refused at the account's list limit."""
    attributes = call.body["data"]["attributes"]
    if len(call.fake.lists) >= call.fake.max_lists:
        raise ApiError.one(
            400,
            f"This account has reached the limit of {call.fake.max_lists} lists and segments.",
            pointer="/data/attributes/name",
        )
    created = call.fake.create_list(attributes["name"], attributes.get("opt_in_process"))
    return json_response({"data": created.to_json()}, status=201)


def _list_or_404(call: Call) -> str:
    list_id = call.params["id"]
    if list_id not in call.fake.lists:
        raise ApiError.one(404, f"List {list_id!r} does not exist.")
    return list_id


def get_list(call: Call) -> web.Response:
    """``GET /api/lists/{id}`` (``additional-fields[list]=profile_count`` adds the member count)."""
    list_id = _list_or_404(call)
    wanted = call.request.query.get("additional-fields[list]", "")
    count = len(call.fake.members(list_id)) if "profile_count" in wanted.split(",") else None
    return json_response({"data": call.fake.lists[list_id].to_json(profile_count=count)})


def _member_ids(call: Call) -> list[str]:
    ids = [item["id"] for item in call.body["data"]]
    problems = [
        (f"/data/{index}/id", f"Profile {profile_id!r} does not exist.")
        for index, profile_id in enumerate(ids)
        if profile_id not in call.fake.profiles
    ]
    _raise_problems(problems)
    return ids


def add_profiles_to_list(call: Call) -> web.Response:
    """``POST /api/lists/{id}/relationships/profiles``: 204."""
    list_id = _list_or_404(call)
    members = _member_ids(call)
    call.fake.add_members(list_id, members)
    for member in members:
        call.fake.note_write("list_members", {"list": list_id, "profile": member})
    return _no_content(204)


def remove_profiles_from_list(call: Call) -> web.Response:
    """``DELETE /api/lists/{id}/relationships/profiles``: 204 (consent unchanged)."""
    list_id = _list_or_404(call)
    call.fake.remove_members(list_id, [item["id"] for item in call.body["data"]])
    return _no_content(204)


def get_profile_ids_for_list(call: Call) -> web.Response:
    """``GET /api/lists/{id}/relationships/profiles``: member ids, ``filter`` on email/phone, up to 100 a page."""
    list_id = _list_or_404(call)
    selected = parse_filter(call.request, ("email", "phone_number"))
    members = call.fake.members(list_id)
    if selected is not None:
        wanted = {call.fake.profile_id_for(selected.field, value) for value in selected.values}
        members = [member for member in members if member in wanted]
    page, links = paginate(call.request, members, default=20, maximum=100)
    return json_response({"data": [{"type": "profile", "id": member} for member in page], "links": links})


def get_profiles_for_list(call: Call) -> web.Response:
    """``GET /api/lists/{id}/profiles``: the members' profiles, ``filter`` on email/phone, up to 100 a page."""
    list_id = _list_or_404(call)
    selected = parse_filter(call.request, ("email", "phone_number"))
    members = call.fake.members(list_id)
    if selected is not None:
        wanted = set(call.fake.profiles_by(selected.field, selected.values))
        members = [member for member in members if member in wanted]
    page, links = paginate(call.request, members, default=20, maximum=100)
    return json_response({"data": [call.fake.profiles[member].to_json() for member in page], "links": links})


HANDLERS: dict[str, Callable[[Call], web.Response]] = {
    "create_event": create_event,
    "bulk_create_events": bulk_create_events,
    "create_or_update_profile": create_or_update_profile,
    "bulk_import_profiles": bulk_import_profiles,
    "get_bulk_import_profiles_job": get_bulk_import_profiles_job,
    "get_errors_for_bulk_import_profiles_job": get_errors_for_bulk_import_profiles_job,
    "bulk_subscribe_profiles": bulk_subscribe_profiles,
    "bulk_unsubscribe_profiles": bulk_unsubscribe_profiles,
    "get_lists": get_lists,
    "create_list": create_list,
    "get_list": get_list,
    "add_profiles_to_list": add_profiles_to_list,
    "remove_profiles_from_list": remove_profiles_from_list,
    "get_profile_ids_for_list": get_profile_ids_for_list,
    "get_profiles_for_list": get_profiles_for_list,
    "get_profiles": get_profiles,
    "get_bulk_import_profiles_jobs": get_bulk_import_profiles_jobs,
    "get_profiles_for_bulk_import_profiles_job": get_profiles_for_bulk_import_profiles_job,
    "get_profile_ids_for_bulk_import_profiles_job": get_profile_ids_for_bulk_import_profiles_job,
}
