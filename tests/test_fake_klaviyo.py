"""The fake Klaviyo, over real HTTP on loopback: endpoints, checks, rate limits, faults, control API."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from yarl import URL

from router.cli import FAKE_CONTROL_API
from router.fake_klaviyo import FakeKlaviyo, FakeKlaviyoServer, ManualClock, build_fake_app, fake_of

KEY = "pk_test_abcdefghijkl"
HEADERS = {
    "Authorization": f"Klaviyo-API-Key {KEY}",
    "revision": "2026-07-15",
    "Content-Type": "application/vnd.api+json",
    "Accept": "application/vnd.api+json",
}
BULK_EVENTS = "/api/event-bulk-create-jobs"


@dataclass
class Harness:
    """A client talking to a fake over loopback, plus the fake's state and clock."""

    client: TestClient[web.Request, web.Application]
    fake: FakeKlaviyo
    clock: ManualClock

    async def call(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """Send one request (``path`` may be an absolute ``links.next``); return (status, JSON or None, response)."""
        url = URL(path)
        async with self.client.request(
            method, url.relative() if url.absolute else url, json=body, headers=headers or HEADERS
        ) as response:
            text = await response.text()
            document = await response.json(content_type=None) if text else None
            return response.status, document, response


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
def make(aiohttp_client: AiohttpClient) -> MakeHarness:
    """Build a fake with the given ``build_fake_app`` options and a client for it."""

    async def factory(**options: Any) -> Harness:
        clock = ManualClock()
        options.setdefault("api_keys", [KEY])
        app = build_fake_app(clock=clock, **options)
        client = await aiohttp_client(app)
        return Harness(client, fake_of(app), clock)

    return factory


@pytest.fixture
async def harness(make: MakeHarness) -> Harness:
    """A fake with rate limits on (manual clock)."""
    return await make()


# -- bodies ------------------------------------------------------------------------------------------------


def profile(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": attributes}}


def event_attributes(metric: str, unique_id: str | None = None, **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
        "properties": extra.pop("properties", {}),
        **extra,
    }
    if unique_id is not None:
        attributes["unique_id"] = unique_id
    return attributes


def event_body(email: str, metric: str = "Viewed Product", unique_id: str | None = None, **extra: Any) -> Any:
    attributes = event_attributes(metric, unique_id, **extra)
    attributes["profile"] = profile(email=email)
    return {"data": {"type": "event", "attributes": attributes}}


def bulk_entry(email: str, *events: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "event-bulk-create",
        "attributes": {
            "profile": profile(email=email),
            "events": {"data": [{"type": "event", "attributes": event} for event in events]},
        },
    }


def bulk_events_body(*entries: dict[str, Any]) -> Any:
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {"events-bulk-create": {"data": list(entries)}},
        }
    }


def bulk_import_body(*profiles: dict[str, Any], list_ids: tuple[str, ...] = ()) -> Any:
    data: dict[str, Any] = {
        "type": "profile-bulk-import-job",
        "attributes": {"profiles": {"data": [{"type": "profile", "attributes": item} for item in profiles]}},
    }
    if list_ids:
        data["relationships"] = {"lists": {"data": [{"type": "list", "id": list_id} for list_id in list_ids]}}
    return {"data": data}


def consent_body(
    kind: str, *profiles: dict[str, Any], list_id: str | None = None, historical: bool | None = None
) -> Any:
    attributes: dict[str, Any] = {
        "profiles": {"data": [{"type": "profile", "attributes": p} for p in profiles]}
    }
    if historical is not None:
        attributes["historical_import"] = historical
    data: dict[str, Any] = {"type": f"profile-subscription-bulk-{kind}-job", "attributes": attributes}
    if list_id is not None:
        data["relationships"] = {"list": {"data": {"type": "list", "id": list_id}}}
    return {"data": data}


def email_consent(consent: str, consented_at: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"consent": consent}
    if consented_at is not None:
        record["consented_at"] = consented_at
    return {"email": {"marketing": record}}


def list_body(name: str, opt_in_process: str | None = None) -> Any:
    attributes: dict[str, Any] = {"name": name}
    if opt_in_process:
        attributes["opt_in_process"] = opt_in_process
    return {"data": {"type": "list", "attributes": attributes}}


def members_body(*profile_ids: str) -> Any:
    return {"data": [{"type": "profile", "id": profile_id} for profile_id in profile_ids]}


def pointers(document: Any) -> list[str]:
    return [error["source"].get("pointer") for error in document["errors"]]


# -- endpoints ---------------------------------------------------------------------------------------------


async def test_create_event_upserts_profile_and_records_event(harness: Harness) -> None:
    status, document, response = await harness.call(
        "POST",
        "/api/events",
        event_body("A@Example.com", unique_id="m-1", value=9.5, properties={"sku": "S1"}),
    )
    assert (status, document) == (202, None)
    assert response.headers["RateLimit-Limit"] == "3500"
    (stored,) = harness.fake.profiles.values()
    assert re.fullmatch(r"01[0-9A-HJKMNP-TV-Z]{24}", stored.id)
    (event,) = harness.fake.events
    assert (event.profile_id, event.metric, event.unique_id, event.value) == (
        stored.id,
        "Viewed Product",
        "m-1",
        9.5,
    )
    assert event.properties == {"sku": "S1"}
    assert harness.fake.find_profile(email="a@example.com") is stored
    (record,) = harness.fake.requests
    assert (record.method, record.path, record.status, record.operation_id) == (
        "POST",
        "/api/events",
        202,
        "create_event",
    )
    assert record.headers["Authorization"] == "[redacted]"
    assert record.json["data"]["type"] == "event"


async def test_events_are_deduplicated_by_profile_metric_and_unique_id(harness: Harness) -> None:
    for body in (
        event_body("a@example.com", unique_id="order-1"),
        event_body("a@example.com", unique_id="order-1"),
        event_body("a@example.com", metric="Placed Order", unique_id="order-1"),
        event_body("b@example.com", unique_id="order-1"),
    ):
        assert (await harness.call("POST", "/api/events", body))[0] == 202
    assert len(harness.fake.events) == 3
    assert harness.fake.duplicate_events == 1
    assert len(harness.fake.events_for(email="a@example.com")) == 2


async def test_bulk_create_events(harness: Harness) -> None:
    body = bulk_events_body(
        bulk_entry(
            "a@example.com",
            event_attributes("Viewed Product", "v-1"),
            event_attributes("Viewed Product", "v-2"),
        ),
        bulk_entry("b@example.com", event_attributes("Placed Order", "o-1", time="2026-07-20T12:00:00Z")),
    )
    status, document, _ = await harness.call("POST", BULK_EVENTS, body)
    assert (status, document) == (202, None)
    assert len(harness.fake.profiles) == 2
    assert [event.unique_id for event in harness.fake.events] == ["v-1", "v-2", "o-1"]
    assert harness.fake.events[2].time == "2026-07-20T12:00:00+00:00"


async def test_duplicate_unique_id_inside_a_bulk_job_fails_the_whole_job(harness: Harness) -> None:
    body = bulk_events_body(
        bulk_entry("a@example.com", event_attributes("Viewed Product", "v-1")),
        bulk_entry("A@example.com", event_attributes("Viewed Product", "v-1")),
    )
    status, document, _ = await harness.call("POST", BULK_EVENTS, body)
    assert status == 400
    assert pointers(document) == [
        "/data/attributes/events-bulk-create/data/1/attributes/events/data/0/attributes/unique_id"
    ]
    assert document["errors"][0]["code"] == "invalid"
    assert harness.fake.events == []
    assert harness.fake.profiles == {}


async def test_profile_import_creates_then_updates(harness: Harness) -> None:
    status, created, _ = await harness.call(
        "POST",
        "/api/profile-import",
        profile(
            email="s@example.com", external_id="cust-42", first_name="Sarah", properties={"tier": "gold"}
        ),
    )
    assert status == 201
    assert created["data"]["type"] == "profile"
    assert created["data"]["attributes"]["first_name"] == "Sarah"
    body = profile(
        external_id="cust-42", phone_number="+15005550006", first_name=None, properties={"vip": True}
    )
    body["data"]["meta"] = {"patch_properties": {"append": {"skus": "92538"}}}
    status, updated, _ = await harness.call("POST", "/api/profile-import", body)
    assert status == 200
    assert updated["data"]["id"] == created["data"]["id"]
    attributes = updated["data"]["attributes"]
    assert "first_name" not in attributes
    assert attributes["phone_number"] == "+15005550006"
    assert attributes["properties"] == {"tier": "gold", "vip": True, "skus": ["92538"]}


async def test_profile_import_conflicting_identifiers_is_409(harness: Harness) -> None:
    await harness.call("POST", "/api/profile-import", profile(email="a@example.com"))
    _, second, _ = await harness.call("POST", "/api/profile-import", profile(phone_number="+15005550006"))
    status, document, _ = await harness.call(
        "POST", "/api/profile-import", profile(email="a@example.com", phone_number="+15005550006")
    )
    assert status == 409
    assert document["errors"][0]["code"] == "duplicate_profile"
    assert document["errors"][0]["meta"]["duplicate_profile_id"] == second["data"]["id"]


@pytest.mark.parametrize(
    ("attributes", "pointer"),
    [
        ({"first_name": "Nobody"}, "/data/attributes"),
        ({"phone_number": "+1 500 555 0006"}, "/data/attributes/phone_number"),
        ({"email": "not-an-email"}, "/data/attributes/email"),
    ],
)
async def test_profile_import_needs_a_valid_identifier(
    harness: Harness, attributes: dict[str, Any], pointer: str
) -> None:
    status, document, _ = await harness.call("POST", "/api/profile-import", profile(**attributes))
    assert status == 400
    assert pointers(document) == [pointer]


async def test_bulk_import_job(harness: Harness) -> None:
    _, created_list, _ = await harness.call("POST", "/api/lists", list_body("Audience"))
    list_id = created_list["data"]["id"]
    body = bulk_import_body(
        {"email": "a@example.com", "properties": {"tier": "gold"}, "first_name": None},
        {"phone_number": "+15005550006", "external_id": "cust-43"},
        {"phone_number": "12345"},
        list_ids=(list_id,),
    )
    status, document, _ = await harness.call("POST", "/api/profile-bulk-import-jobs", body)
    assert status == 202
    job = document["data"]
    assert job["type"] == "profile-bulk-import-job"
    assert {
        key: job["attributes"][key] for key in ("status", "total_count", "completed_count", "failed_count")
    } == {"status": "queued", "total_count": 3, "completed_count": 0, "failed_count": 0}
    assert len(harness.fake.profiles) == 2
    assert len(harness.fake.members(list_id)) == 2
    status, fetched, _ = await harness.call("GET", f"/api/profile-bulk-import-jobs/{job['id']}")
    assert (status, fetched["data"]["id"]) == (200, job["id"])
    assert {
        key: fetched["data"]["attributes"][key]
        for key in ("status", "total_count", "completed_count", "failed_count")
    } == {"status": "complete", "total_count": 3, "completed_count": 2, "failed_count": 1}
    status, errors, _ = await harness.call("GET", f"/api/profile-bulk-import-jobs/{job['id']}/import-errors")
    assert status == 200
    assert (
        errors["data"][0]["attributes"]["source"]["pointer"]
        == "/data/attributes/profiles/data/2/attributes/phone_number"
    )
    assert (await harness.call("GET", "/api/profile-bulk-import-jobs/01NOPE"))[0] == 404


async def test_reads_the_audience_sync_uses(harness: Harness) -> None:
    """An import job's profiles, a list's profiles (100 a page), profiles by any(email, ...), jobs by status."""
    _, created_list, _ = await harness.call("POST", "/api/lists", list_body("Audience"))
    list_id = created_list["data"]["id"]
    emails = [f"p{n}@example.com" for n in range(150)]
    body = bulk_import_body(*({"email": email} for email in emails), list_ids=(list_id,))
    status, job, _ = await harness.call("POST", "/api/profile-bulk-import-jobs", body)
    job_id = job["data"]["id"]
    # before the job is complete it has no profiles to show
    status, early, _ = await harness.call("GET", f"/api/profile-bulk-import-jobs/{job_id}/profiles")
    assert (status, early["data"]) == (200, [])
    await harness.call("GET", f"/api/profile-bulk-import-jobs/{job_id}")  # complete now
    path: str | None = f"/api/profile-bulk-import-jobs/{job_id}/relationships/profiles?page[size]=100"
    ids: list[str] = []
    while path:
        status, page, _ = await harness.call("GET", path)
        assert status == 200
        ids += [item["id"] for item in page["data"]]
        path = page["links"]["next"]
    assert len(ids) == 150
    status, page, _ = await harness.call("GET", f"/api/lists/{list_id}/profiles?page[size]=100")
    assert (status, len(page["data"]), page["data"][0]["attributes"]["email"]) == (200, 100, "p0@example.com")
    assert page["links"]["next"]
    assert (await harness.call("GET", f"/api/lists/{list_id}/profiles?page[size]=101"))[0] == 400
    wanted = 'any(email,["p3@example.com","P7@example.com","nobody@example.com"])'
    status, found, _ = await harness.call("GET", f"/api/profiles?filter={wanted}")
    assert status == 200
    assert sorted(item["attributes"]["email"] for item in found["data"]) == [
        "p3@example.com",
        "p7@example.com",
    ]
    too_many = "any(email,[" + ",".join(f'"{e}"' for e in emails[:101]) + "])"
    assert (await harness.call("GET", f"/api/profiles?filter={too_many}"))[0] == 400
    status, jobs, _ = await harness.call(
        "GET", '/api/profile-bulk-import-jobs?filter=equals(status,"complete")'
    )
    assert [item["id"] for item in jobs["data"]] == [job_id]


async def test_bulk_import_with_unknown_list_is_refused(harness: Harness) -> None:
    status, document, _ = await harness.call(
        "POST",
        "/api/profile-bulk-import-jobs",
        bulk_import_body({"email": "a@example.com"}, list_ids=("NoSuch",)),
    )
    assert status == 400
    assert pointers(document) == ["/data/relationships/lists/data/0/id"]
    assert harness.fake.profiles == {}


async def test_subscribe_and_unsubscribe(harness: Harness) -> None:
    _, created, _ = await harness.call("POST", "/api/lists", list_body("Newsletter", "single_opt_in"))
    list_id = created["data"]["id"]
    body = consent_body(
        "create",
        {"email": "a@example.com", "subscriptions": email_consent("SUBSCRIBED", "2025-01-02T10:00:00Z")},
        list_id=list_id,
        historical=True,
    )
    status, document, _ = await harness.call("POST", "/api/profile-subscription-bulk-create-jobs", body)
    assert (status, document) == (202, None)
    subscriber = harness.fake.find_profile(email="a@example.com")
    assert subscriber is not None
    assert harness.fake.consent(subscriber.id) == "SUBSCRIBED"
    assert harness.fake.members(list_id) == [subscriber.id]

    other = consent_body(
        "delete",
        {"email": "a@example.com", "subscriptions": email_consent("UNSUBSCRIBED")},
        {"email": "b@example.com", "subscriptions": email_consent("UNSUBSCRIBED")},
        list_id=list_id,
    )
    status, _, _ = await harness.call("POST", "/api/profile-subscription-bulk-delete-jobs", other)
    assert status == 202
    stranger = harness.fake.find_profile(email="b@example.com")
    assert stranger is not None
    assert harness.fake.consent(subscriber.id) == "UNSUBSCRIBED"
    assert harness.fake.global_unsubscribes == [stranger.id]


async def test_accepted_repeats_are_counted_by_kind(harness: Harness) -> None:
    """Klaviyo takes a repeated write without complaint (an event's unique id, an identical upsert,
    subscription, list add): the fake counts each and lists what was repeated, so tests can tell."""
    fake = harness.fake
    fake.create_list("Newsletter", "single_opt_in", list_id="L1")
    subscribe = consent_body(
        "create", {"email": "a@example.com", "subscriptions": email_consent("SUBSCRIBED")}, list_id="L1"
    )
    unsubscribe = consent_body(
        "delete", {"email": "a@example.com", "subscriptions": email_consent("UNSUBSCRIBED")}, list_id="L1"
    )
    writes = [
        ("/api/profile-import", profile(email="a@example.com", first_name="Ada")),
        ("/api/profile-bulk-import-jobs", bulk_import_body({"email": "b@example.com"})),
        ("/api/profile-bulk-import-jobs", bulk_import_body({"email": "c@example.com"}, list_ids=("L1",))),
        ("/api/events", event_body("a@example.com", unique_id="e1")),
        ("/api/profile-subscription-bulk-create-jobs", subscribe),
        ("/api/profile-subscription-bulk-delete-jobs", unsubscribe),
    ]
    for path, body in writes:
        assert (await harness.call("POST", path, body))[0] < 300
    assert fake.repeats == {}
    different = profile(email="a@example.com", first_name="Grace")
    assert (await harness.call("POST", "/api/profile-import", different))[0] == 200  # not a repeat
    for path, body in writes[1:]:
        assert (await harness.call("POST", path, body))[0] < 300
    assert (await harness.call("POST", "/api/profile-import", writes[0][1]))[0] == 200
    await harness.call("POST", "/api/profile-import", writes[0][1])
    assert fake.repeats == {
        "profiles": 3,
        "list_adds": 1,
        "events": 1,
        "subscriptions": 1,
        "unsubscriptions": 1,
    }
    assert fake.duplicate_events == 1
    times = {entry["kind"]: entry["times"] for entry in fake.repeated()}
    assert times["profiles"] == 3  # Ada's upsert: the repeated list has one entry per write, latest count
    _, state, _ = await harness.call("GET", "/__fake__/state")
    assert state["counters"]["repeats"] == dict(fake.repeats)
    assert {entry["kind"] for entry in state["repeated"]} == set(fake.repeats)


@pytest.mark.parametrize(
    ("attributes", "historical", "pointer"),
    [
        (
            {"email": "a@example.com", "subscriptions": email_consent("SUBSCRIBED")},
            True,
            "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consented_at",
        ),
        (
            {"email": "a@example.com", "subscriptions": email_consent("SUBSCRIBED", "2025-01-02T10:00:00Z")},
            None,
            "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consented_at",
        ),
        (
            {"email": "a@example.com", "subscriptions": {"sms": {"marketing": {"consent": "SUBSCRIBED"}}}},
            None,
            "/data/attributes/profiles/data/0/attributes/phone_number",
        ),
    ],
)
async def test_subscribe_consent_rules(
    harness: Harness, attributes: dict[str, Any], historical: bool | None, pointer: str
) -> None:
    body = consent_body("create", attributes, historical=historical)
    status, document, _ = await harness.call("POST", "/api/profile-subscription-bulk-create-jobs", body)
    assert status == 400
    assert pointers(document) == [pointer]
    assert harness.fake.subscriptions == {}


async def test_lists_pagination_and_filter(make: MakeHarness) -> None:
    harness = await make(rate_limits=False)
    for number in range(12):
        status, _, _ = await harness.call("POST", "/api/lists", list_body(f"List {number:02d}"))
        assert status == 201
    status, first, _ = await harness.call("GET", "/api/lists")
    assert status == 200
    assert len(first["data"]) == 10
    assert first["data"][0]["attributes"]["opt_in_process"] == "double_opt_in"
    status, second, _ = await harness.call("GET", first["links"]["next"])
    assert [item["attributes"]["name"] for item in second["data"]] == ["List 10", "List 11"]
    assert second["links"]["next"] is None
    _, named, _ = await harness.call("GET", '/api/lists?filter=equals(name,"List 07")')
    assert [item["attributes"]["name"] for item in named["data"]] == ["List 07"]
    status, document, _ = await harness.call("GET", "/api/lists?page[size]=11")
    assert (status, document["errors"][0]["source"]) == (400, {"parameter": "page[size]"})


async def test_list_membership(harness: Harness) -> None:
    _, created, _ = await harness.call("POST", "/api/lists", list_body("Members"))
    list_id = created["data"]["id"]
    ids = []
    for number in range(5):
        _, document, _ = await harness.call(
            "POST", "/api/profile-import", profile(email=f"p{number}@example.com")
        )
        ids.append(document["data"]["id"])
    relationships = f"/api/lists/{list_id}/relationships/profiles"
    status, document, _ = await harness.call("POST", relationships, members_body(*ids))
    assert (status, document) == (204, None)
    _, page, _ = await harness.call("GET", f"{relationships}?page[size]=2")
    collected = [item["id"] for item in page["data"]]
    while page["links"]["next"]:
        _, page, _ = await harness.call("GET", page["links"]["next"])
        collected += [item["id"] for item in page["data"]]
    assert collected == ids
    _, filtered, _ = await harness.call("GET", f'{relationships}?filter=any(email,["p3@example.com"])')
    assert [item["id"] for item in filtered["data"]] == [ids[3]]
    assert (await harness.call("DELETE", relationships, members_body(ids[0], ids[1])))[0] == 204
    assert harness.fake.members(list_id) == ids[2:]
    _, fetched, _ = await harness.call("GET", f"/api/lists/{list_id}?additional-fields[list]=profile_count")
    assert fetched["data"]["attributes"]["profile_count"] == 3
    status, document, _ = await harness.call("POST", relationships, members_body("01UNKNOWN"))
    assert (status, pointers(document)) == (400, ["/data/0/id"])
    assert (await harness.call("GET", "/api/lists/NoSuch"))[0] == 404


async def test_list_limit(make: MakeHarness) -> None:
    harness = await make(max_lists=1)
    assert (await harness.call("POST", "/api/lists", list_body("One")))[0] == 201
    status, document, _ = await harness.call("POST", "/api/lists", list_body("Two"))
    assert status == 400
    assert "limit of 1 lists" in document["errors"][0]["detail"]


# -- request checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"revision": "2026-07-15"}, 401, "not_authenticated"),
        ({"Authorization": "Bearer xyz", "revision": "2026-07-15"}, 401, "not_authenticated"),
        (
            {"Authorization": "Klaviyo-API-Key pk_wrong_key_000", "revision": "2026-07-15"},
            401,
            "authentication_failed",
        ),
        ({"Authorization": f"Klaviyo-API-Key {KEY}"}, 400, "invalid"),
        ({"Authorization": f"Klaviyo-API-Key {KEY}", "revision": "July"}, 400, "invalid"),
    ],
)
async def test_auth_and_revision(harness: Harness, headers: dict[str, str], status: int, code: str) -> None:
    got, document, _ = await harness.call("GET", "/api/lists", headers=headers)
    assert (got, document["errors"][0]["code"], document["errors"][0]["status"]) == (status, code, status)
    assert harness.fake.requests[-1].status == status


async def test_revoked_key(harness: Harness) -> None:
    assert (await harness.call("GET", "/api/lists"))[0] == 200
    harness.fake.revoke_key(KEY)
    assert (await harness.call("GET", "/api/lists"))[0] == 401


async def test_schema_errors_name_the_pointer(harness: Harness) -> None:
    body = event_body("a@example.com")
    del body["data"]["attributes"]["metric"]["data"]["attributes"]["name"]
    body["data"]["attributes"]["value"] = "lots"
    status, document, response = await harness.call("POST", "/api/events", body)
    assert status == 400
    assert "RateLimit-Remaining" in response.headers
    assert pointers(document) == ["/data/attributes/metric/data/attributes", "/data/attributes/value"]
    assert {error["code"] for error in document["errors"]} == {"invalid"}
    assert {"id", "status", "code", "title", "detail", "source"} <= document["errors"][0].keys()
    assert harness.fake.events == []


async def test_content_type_json_and_routes(harness: Harness) -> None:
    async with harness.client.post(
        "/api/events", data=b"{}", headers={**HEADERS, "Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415
    async with harness.client.post("/api/events", data=b"{nope", headers=HEADERS) as r:
        assert r.status == 400
    assert (await harness.call("GET", "/api/nothing-here"))[0] == 404
    assert (await harness.call("PUT", "/api/lists", list_body("x")))[0] == 405


async def test_bulk_item_limits(make: MakeHarness) -> None:
    harness = await make(rate_limits=False)
    profiles = [
        {"email": f"u{number}@example.com", "subscriptions": email_consent("UNSUBSCRIBED")}
        for number in range(101)
    ]
    status, document, _ = await harness.call(
        "POST", "/api/profile-subscription-bulk-delete-jobs", consent_body("delete", *profiles)
    )
    assert status == 400
    assert pointers(document) == ["/data/attributes/profiles/data"]
    assert "101 items exceed the limit of 100" in document["errors"][0]["detail"]
    events = [event_attributes("Viewed Product", f"v-{number}") for number in range(501)]
    body = bulk_events_body(bulk_entry("a@example.com", *events), bulk_entry("b@example.com", *events))
    status, document, _ = await harness.call("POST", BULK_EVENTS, body)
    assert status == 400
    assert "1002 items exceed the limit of 1000" in document["errors"][0]["detail"]
    body = bulk_events_body(
        bulk_entry("a@example.com", *events[:500]), bulk_entry("b@example.com", *events[:500])
    )
    assert (await harness.call("POST", BULK_EVENTS, body))[0] == 202
    assert len(harness.fake.events) == 1000


# -- rate limits -------------------------------------------------------------------------------------------


async def test_burst_limit_429_retry_after_and_headers(harness: Harness) -> None:
    remaining = []
    for number in range(10):  # create_list: 10/s burst, 150/m steady
        status, _, response = await harness.call("POST", "/api/lists", list_body(f"L{number}"))
        assert status == 201
        assert response.headers["RateLimit-Limit"] == "150"
        assert response.headers["RateLimit-Reset"] == "60"
        remaining.append(int(response.headers["RateLimit-Remaining"]))
    assert remaining == list(range(149, 139, -1))
    harness.clock.advance(0.25)
    status, document, response = await harness.call("POST", "/api/lists", list_body("too many"))
    assert status == 429
    assert response.headers["Retry-After"] == "1"
    assert "RateLimit-Remaining" not in response.headers
    assert document["errors"][0]["code"] == "throttled"
    assert harness.fake.throttled == 1
    assert harness.fake.sent_early_total == 0
    harness.clock.advance(0.5)  # still inside the Retry-After
    assert (await harness.call("POST", "/api/lists", list_body("early")))[0] == 429
    assert harness.fake.sent_early_total == 1
    harness.clock.advance(1.0)
    status, _, response = await harness.call("POST", "/api/lists", list_body("later"))
    assert status == 201
    assert response.headers["RateLimit-Remaining"] == "139"
    assert harness.fake.sent_early_total == 1
    assert len(harness.fake.lists) == 11


async def test_steady_limit_with_scale(make: MakeHarness) -> None:
    harness = await make(rate_limit_scale=0.1)  # bulk events: 1/s burst, 15/m steady
    body = bulk_events_body(bulk_entry("a@example.com", event_attributes("Viewed Product")))
    for _ in range(15):
        status, _, response = await harness.call("POST", BULK_EVENTS, body)
        assert status == 202
        harness.clock.advance(2)
    assert response.headers["RateLimit-Limit"] == "15"
    assert response.headers["RateLimit-Remaining"] == "0"
    status, _, response = await harness.call("POST", BULK_EVENTS, body)  # 30 s into the minute
    assert status == 429
    assert response.headers["Retry-After"] == "30"
    harness.clock.advance(30)
    assert (await harness.call("POST", BULK_EVENTS, body))[0] == 202
    assert harness.fake.sent_early_total == 0


async def test_limits_are_per_endpoint_and_per_key(make: MakeHarness) -> None:
    harness = await make(rate_limit_scale=0.1, api_keys=[KEY, "pk_other_key_0000"])
    assert (await harness.call("POST", "/api/lists", list_body("a")))[0] == 201
    assert (await harness.call("POST", "/api/lists", list_body("b")))[0] == 429
    assert (await harness.call("GET", "/api/lists"))[0] == 200
    other = {**HEADERS, "Authorization": "Klaviyo-API-Key pk_other_key_0000"}
    assert (await harness.call("POST", "/api/lists", list_body("c"), headers=other))[0] == 201


async def test_rate_limits_can_be_switched_off(make: MakeHarness) -> None:
    harness = await make(rate_limits=False)
    for number in range(20):
        status, _, response = await harness.call("POST", "/api/lists", list_body(f"L{number}"))
        assert status == 201
        assert "RateLimit-Limit" not in response.headers
    harness.fake.set_rate_limits(True, scale=0.1)
    assert (await harness.call("POST", "/api/lists", list_body("x")))[0] == 201
    assert (await harness.call("POST", "/api/lists", list_body("y")))[0] == 429


# -- faults ------------------------------------------------------------------------------------------------


async def test_scripted_status_sequence(harness: Harness) -> None:
    harness.fake.script("POST /api/events", [503, 503, 200])
    statuses = [(await harness.call("POST", "/api/events", event_body("a@example.com")))[0] for _ in range(4)]
    assert statuses == [503, 503, 202, 202]
    assert [record.status for record in harness.fake.requests] == [503, 503, 202, 202]


async def test_scripted_429_with_retry_after_tracks_early_requests(harness: Harness) -> None:
    harness.fake.script("create_event", [{"status": 429, "retry_after": 2}, "pass", "pass"])
    status, document, response = await harness.call("POST", "/api/events", event_body("a@example.com"))
    assert (status, response.headers["Retry-After"]) == (429, "2")
    assert document["errors"][0]["code"] == "throttled"
    harness.clock.advance(1)
    assert (await harness.call("POST", "/api/events", event_body("a@example.com", unique_id="1")))[0] == 202
    assert harness.fake.sent_early == {"pk_...ijkl": 1}
    harness.clock.advance(1)
    assert (await harness.call("POST", "/api/events", event_body("a@example.com", unique_id="2")))[0] == 202
    assert harness.fake.sent_early_total == 1


async def test_scripted_429_always_carries_retry_after(harness: Harness) -> None:
    harness.fake.script("GET /api/lists", [429])
    status, _, response = await harness.call("GET", "/api/lists")
    assert (status, response.headers["Retry-After"]) == (429, "1")
    assert harness.fake.throttled == 1


async def test_scripts_match_path_templates(harness: Harness) -> None:
    harness.fake.script("/api/lists/{id}/relationships/profiles", [500])
    assert (await harness.call("GET", "/api/lists/AbC123/relationships/profiles"))[0] == 500
    assert (await harness.call("GET", "/api/lists/AbC123/relationships/profiles"))[0] == 404


async def test_random_5xx_is_reproducible(make: MakeHarness) -> None:
    runs = []
    for _ in range(2):
        harness = await make(rate_limits=False, faults={"random_5xx_rate": 0.5, "seed": 7})
        runs.append([(await harness.call("GET", "/api/lists"))[0] for _ in range(20)])
    assert runs[0] == runs[1]
    assert {status for status in runs[0] if status != 200} <= {500, 502, 503, 504}
    assert 0 < runs[0].count(200) < 20


async def test_timeout_holds_then_drops(harness: Harness) -> None:
    harness.fake.faults.hold_seconds = 0.5
    harness.fake.script("POST /api/events", ["timeout"])
    with pytest.raises(asyncio.TimeoutError):
        async with harness.client.post(
            "/api/events",
            json=event_body("a@example.com"),
            headers=HEADERS,
            timeout=aiohttp.ClientTimeout(total=0.1),
        ):
            pass
    harness.fake.script("POST /api/events", ["timeout"])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with harness.client.post("/api/events", json=event_body("a@example.com"), headers=HEADERS):
            pass
    assert [record.status for record in harness.fake.requests] == [0, 0]
    assert harness.fake.events == []


async def test_partial_bulk_failure_by_index_is_one_shot(harness: Harness) -> None:
    harness.fake.fail_bulk_items("bulk_create_events", indices=[1], detail="Bad profile.")
    body = bulk_events_body(
        bulk_entry("a@example.com", event_attributes("Viewed Product", "v-1")),
        bulk_entry("b@example.com", event_attributes("Viewed Product", "v-2")),
    )
    status, document, _ = await harness.call("POST", BULK_EVENTS, body)
    assert status == 400
    assert pointers(document) == ["/data/attributes/events-bulk-create/data/1"]
    assert document["errors"][0]["detail"] == "Bad profile."
    assert harness.fake.events == [] and harness.fake.profiles == {}
    harness.clock.advance(1)
    assert (await harness.call("POST", BULK_EVENTS, body))[0] == 202
    assert len(harness.fake.events) == 2


async def test_partial_bulk_failure_by_value_persists(harness: Harness) -> None:
    harness.fake.fail_bulk_items("bulk_import_profiles", values=["bad@example.com"])
    body = bulk_import_body(
        {"email": "a@example.com"}, {"email": "b@example.com"}, {"email": "bad@example.com"}
    )
    for _ in range(2):
        status, document, _ = await harness.call("POST", "/api/profile-bulk-import-jobs", body)
        assert status == 400
        assert pointers(document) == ["/data/attributes/profiles/data/2/attributes/email"]
    assert harness.fake.profiles == {} and harness.fake.jobs == {}
    body = bulk_import_body({"email": "a@example.com"}, {"email": "b@example.com"})
    assert (await harness.call("POST", "/api/profile-bulk-import-jobs", body))[0] == 202


# -- control API -------------------------------------------------------------------------------------------


async def test_control_api(harness: Harness) -> None:
    client = harness.client
    async with client.post(
        "/__fake__/faults", json={"scripts": {"POST /api/events": [502]}, "revoked_keys": []}
    ) as r:
        assert r.status == 200
        assert (await r.json())["scripts"] == {"POST /api/events": [{"status": 502, "retry_after": None}]}
    assert (await harness.call("POST", "/api/events", event_body("a@example.com")))[0] == 502
    assert (await harness.call("POST", "/api/events", event_body("a@example.com")))[0] == 202
    async with client.get("/__fake__/state") as r:
        state = await r.json()
    assert [item["attributes"]["email"] for item in state["profiles"]] == ["a@example.com"]
    assert len(state["events"]) == 1
    assert state["counters"]["requests"] == 2
    async with client.get("/__fake__/requests?since=1") as r:
        assert [item["status"] for item in await r.json()] == [202]
    body = {"bulk_failures": [{"operation_id": "bulk_import_profiles", "values": ["x@example.com"]}]}
    async with client.post("/__fake__/faults", json=body) as r:
        assert (await r.json())["bulk_failures"][0]["values"] == ["x@example.com"]
    async with client.delete("/__fake__/faults") as r:
        assert r.status == 200
    assert harness.fake.faults.bulk_failures == []
    async with client.post("/__fake__/config", json={"rate_limits": False}) as r:
        assert (await r.json())["rate_limits"] is False
    async with client.post("/__fake__/reset") as r:
        assert r.status == 200
    assert harness.fake.profiles == {} and harness.fake.events == [] and harness.fake.requests == []
    async with client.post("/__fake__/faults", data=b"[1]") as r:
        assert r.status == 400


def test_run_serves_until_sigterm() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from router.fake_klaviyo import run; raise SystemExit(run(port=0, api_keys=['k']))",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"url=(http://127\.0\.0\.1:\d+)", line)
        assert match, line
        state = asyncio.run(_get_json(match.group(1) + "/__fake__/state"))
        assert state["profiles"] == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


async def test_shared_fixture(fake_klaviyo: FakeKlaviyoServer) -> None:
    async with (
        aiohttp.ClientSession(fake_klaviyo.url) as session,
        session.post(
            "/api/events", json=event_body("a@example.com"), headers=fake_klaviyo.headers()
        ) as response,
    ):
        assert response.status == 202
    assert len(fake_klaviyo.state.events) == 1
    fake_klaviyo.clock.advance(1)
    assert fake_klaviyo.clock() == 6001.0


def test_control_api_is_documented_in_help() -> None:
    """Every ``/__fake__/`` route is in ``fake-klaviyo --help`` (the README points there)."""
    routes = {
        (route.method, route.resource.canonical)
        for route in build_fake_app().router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/__fake__/")
        and route.method != "HEAD"
    }
    assert len(routes) >= 8
    for method, path in routes:
        assert f"  {method:<6} {path} " in FAKE_CONTROL_API, (method, path)
