"""classify (pure) as a table, then KlaviyoClient over loopback against the fake Klaviyo."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from router.destination import Destination
from router.fake_klaviyo import FakeKlaviyoServer, ManualClock
from router.klaviyo.client import MAX_DETAIL, KlaviyoClient, Outcome, classify, error_text, scrub
from router.klaviyo.ratelimit import RateLimits, Sleep
from router.klaviyo.requests import REVISION, KlaviyoRequest
from router.klaviyo.spec import Endpoint, endpoint_for
from router.transform import transform

EVENTS = KlaviyoRequest(method="POST", path="/api/events", body={}, kind="event")
BULK_EVENTS = KlaviyoRequest(method="POST", path="/api/event-bulk-create-jobs", body={})
BULK_PROFILES = KlaviyoRequest(method="POST", path="/api/profile-bulk-import-jobs", body={})
ITEM = "/data/attributes/events-bulk-create/data"


def endpoint(request: KlaviyoRequest) -> Endpoint:
    return endpoint_for(request.method, request.path)


def klaviyo_errors(*errors: tuple[str, str | None], code: str = "invalid") -> bytes:
    """A JSON:API error document in Klaviyo's shape: one object per (detail, pointer)."""
    return orjson.dumps(
        {
            "errors": [
                {
                    "id": "e1",
                    "status": 400,
                    "code": code,
                    "title": "Invalid input.",
                    "detail": detail,
                    "source": {"pointer": pointer} if pointer is not None else {},
                }
                for detail, pointer in errors
            ]
        }
    )


NOT_FOUND_LIST = klaviyo_errors(("List 'nope' does not exist.", "/data/relationships/list/data/id"))

CLASSIFY: dict[str, tuple[int, Mapping[str, str], bytes, str, float | None]] = {
    "200 ok": (200, {}, b"{}", "ok", None),
    "202 ok": (202, {}, b"", "ok", None),
    "204 ok": (204, {}, b"", "ok", None),
    "429 with Retry-After": (429, {"Retry-After": "7"}, b"", "retry", 7.0),
    "429 without Retry-After waits 1 s": (429, {}, b"", "retry", 1.0),
    "408": (408, {}, b"", "retry", None),
    "425": (425, {}, b"", "retry", None),
    "500": (500, {}, b"", "retry", None),
    "502": (502, {}, b"<html>bad gateway</html>", "retry", None),
    "503": (503, {}, b"", "retry", None),
    "504": (504, {}, b"", "retry", None),
    "503 with Retry-After": (503, {"Retry-After": "5"}, b"", "retry", 5.0),
    "400": (400, {}, NOT_FOUND_LIST, "permanent", None),
    "404": (404, {}, NOT_FOUND_LIST, "permanent", None),
    "409": (409, {}, NOT_FOUND_LIST, "permanent", None),
    "413": (413, {}, NOT_FOUND_LIST, "permanent", None),
    "422": (422, {}, NOT_FOUND_LIST, "permanent", None),
    "401": (401, {}, klaviyo_errors(("Incorrect authentication credentials.", None)), "auth", None),
    "403": (403, {}, klaviyo_errors(("Missing scope events:write.", None)), "auth", None),
}


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind", "wait"), CLASSIFY.values(), ids=CLASSIFY.keys()
)
def test_classify(
    status: int, headers: Mapping[str, str], body: bytes, kind: str, wait: float | None
) -> None:
    outcome = classify(status, headers, body, EVENTS, endpoint(EVENTS))
    assert (outcome.kind, outcome.status, outcome.retry_after) == (kind, status, wait)
    assert outcome.failed_items == {}
    if kind == "ok":
        assert outcome.detail == ""
    else:
        assert outcome.detail.startswith(f"Klaviyo {status} on POST /api/events: ")
    if body is NOT_FOUND_LIST:
        assert outcome.detail.endswith(
            "invalid: List 'nope' does not exist. (at /data/relationships/list/data/id)"
        )


BULK: dict[str, tuple[KlaviyoRequest, bytes, dict[int, str]]] = {
    "one event entry named": (
        BULK_EVENTS,
        klaviyo_errors(("Invalid email.", f"{ITEM}/3/attributes/profile/data/attributes/email")),
        {3: f"Klaviyo 400: invalid: Invalid email. (at {ITEM}/3/attributes/profile/data/attributes/email)"},
    ),
    "entries named by their own pointer": (
        BULK_EVENTS,
        klaviyo_errors(
            ("Bad.", f"{ITEM}/1"), ("Worse.", f"{ITEM}/12/attributes/events/data/0/attributes/time")
        ),
        {
            1: f"Klaviyo 400: invalid: Bad. (at {ITEM}/1)",
            12: f"Klaviyo 400: invalid: Worse. (at {ITEM}/12/attributes/events/data/0/attributes/time)",
        },
    ),
    "the array itself is not an item": (BULK_EVENTS, klaviyo_errors(("Too many.", ITEM)), {}),
    "a pointer elsewhere is not an item": (
        BULK_EVENTS,
        klaviyo_errors(("No such list.", "/data/relationships/list/data/id")),
        {},
    ),
    "an index-like prefix is not an item": (BULK_EVENTS, klaviyo_errors(("Odd.", f"{ITEM}x/3")), {}),
    "not JSON": (BULK_EVENTS, b"upstream exploded", {}),
    "single endpoint has no items": (
        EVENTS,
        klaviyo_errors(("Invalid email.", "/data/attributes/profile/data/attributes/email")),
        {},
    ),
    "bulk profile import names profiles": (
        BULK_PROFILES,
        klaviyo_errors(("Invalid email.", "/data/attributes/profiles/data/2/attributes/email")),
        {2: "Klaviyo 400: invalid: Invalid email. (at /data/attributes/profiles/data/2/attributes/email)"},
    ),
}


@pytest.mark.parametrize(("request_", "body", "failed"), BULK.values(), ids=BULK.keys())
def test_classify_names_failed_bulk_items(
    request_: KlaviyoRequest, body: bytes, failed: dict[int, str]
) -> None:
    outcome = classify(400, {}, body, request_, endpoint(request_))
    assert outcome.kind == "permanent"
    assert dict(outcome.failed_items) == failed


ERROR_TEXT = {
    "detail, code and pointer": (
        NOT_FOUND_LIST,
        "invalid: List 'nope' does not exist. (at /data/relationships/list/data/id)",
    ),
    "title when no detail": (orjson.dumps({"errors": [{"title": "Not found."}]}), "Not found."),
    "three shown, the rest counted": (
        klaviyo_errors(*((f"E{n}.", None) for n in range(5)), code=""),
        "E0.; E1.; E2. (+2 more)",
    ),
    "plain text": (b"  Service Unavailable \n", "Service Unavailable"),
    "empty": (b"", "no error detail"),
    "JSON without errors": (b'{"data": null}', '{"data": null}'),
    "JSON that is not an object": (b"[1, 2]", "[1, 2]"),
}


@pytest.mark.parametrize(("body", "text"), ERROR_TEXT.values(), ids=ERROR_TEXT.keys())
def test_error_text(body: bytes, text: str) -> None:
    assert error_text(body) == text


def test_error_text_is_bounded() -> None:
    assert len(error_text(b"x" * 10_000)) == MAX_DETAIL
    assert len(error_text(klaviyo_errors(("y" * 10_000, None)))) == MAX_DETAIL


def test_safe_masks_keys_in_exception_text() -> None:
    text = scrub(RuntimeError("header Authorization: Klaviyo-API-Key pk_live_secret rejected"))
    assert "pk_live_secret" not in text and "Klaviyo-API-Key ***" in text


# -- over loopback -----------------------------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def moving(clock: ManualClock) -> Sleep:
    """A sleep that moves the fake's manual clock, so the client's pacing and the fake share one time."""

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    return sleep


def client_for(
    fake: FakeKlaviyoServer,
    session: aiohttp.ClientSession,
    *,
    key: str | None = None,
    base_url: str | None = None,
    timeout: float = 5.0,
    observe: Any = None,
) -> KlaviyoClient:
    destination = Destination(private_key=key or fake.api_key, base_url=base_url or fake.url)
    limits = RateLimits(clock=fake.clock, sleep=moving(fake.clock))
    return KlaviyoClient(session, destination, limits=limits, timeout=timeout, observe=observe)


def track(user: str, message_id: str = "m-1") -> KlaviyoRequest:
    message = {"type": "track", "event": "Viewed Product", "userId": user, "messageId": message_id}
    [request] = transform(message, Destination())
    return request


def subscribe(email: str, list_id: str) -> KlaviyoRequest:
    message = {
        "type": "group",
        "groupId": list_id,
        "userId": email,
        "traits": {"email": email, "subscribe": True},
    }
    [request] = transform(message, Destination())
    return request


def refused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_sends_klaviyo_headers_and_the_body(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    request = track("u-1")
    outcome = await client_for(fake_klaviyo, session).send(request)
    assert outcome == Outcome("ok", 202)
    [record] = fake_klaviyo.state.requests
    headers = {name.lower(): value for name, value in record.headers.items()}
    assert headers["revision"] == REVISION
    assert headers["content-type"] == "application/vnd.api+json"
    assert headers["accept"] == "application/vnd.api+json"
    assert headers["authorization"] == "[redacted]"  # the fake logs it redacted; it accepted it
    assert record.client == "pk_...cdef"  # ... and it was this account's key
    assert record.json == request.body
    assert [event.metric for event in fake_klaviyo.state.events] == ["Viewed Product"]


async def test_wrong_key_is_an_auth_outcome(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    outcome = await client_for(fake_klaviyo, session, key="pk_wrong_key_123456").send(track("u-1"))
    assert (outcome.kind, outcome.status) == ("auth", 401)
    assert "Incorrect authentication credentials." in outcome.detail
    assert "pk_wrong_key_123456" not in outcome.detail


async def test_permanent_error_carries_klaviyos_detail(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    outcome = await client_for(fake_klaviyo, session).send(subscribe("a@example.com", "nope"))
    assert (outcome.kind, outcome.status) == ("permanent", 400)
    assert outcome.detail == (
        "Klaviyo 400 on POST /api/profile-subscription-bulk-create-jobs: "
        "invalid: List 'nope' does not exist. (at /data/relationships/list/data/id)"
    )


async def test_timeout_is_a_retry(fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession) -> None:
    fake_klaviyo.state.faults.hold_seconds = 2.0
    fake_klaviyo.state.script("POST /api/events", ["timeout"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome = await client_for(fake_klaviyo, session, timeout=0.2).send(track("u-1"))
    assert loop.time() - started < 1.5
    assert (outcome.kind, outcome.status) == ("retry", 0)
    assert outcome.detail.startswith("no answer from Klaviyo within")
    assert fake_klaviyo.state.events == []


async def test_connection_refused_is_a_retry(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    client = client_for(fake_klaviyo, session, base_url=f"http://127.0.0.1:{refused_port()}")
    outcome = await client.send(track("u-1"))
    assert (outcome.kind, outcome.status) == ("retry", 0)
    assert outcome.detail.startswith("cannot reach Klaviyo: ClientConnectorError")


async def test_429_holds_the_endpoint_until_retry_after(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    fake = fake_klaviyo.state
    fake.script("create_event", [{"status": 429, "retry_after": 2}])
    client = client_for(fake_klaviyo, session)
    first = await client.send(track("u-1", "m-1"))
    assert (first.kind, first.status, first.retry_after) == ("retry", 429, 2.0)
    throttled_at = fake_klaviyo.clock()
    assert (await client.send(track("u-2", "m-2"))).kind == "ok"
    assert fake_klaviyo.clock() >= throttled_at + 2.0  # the client waited on the shared clock
    assert [record.status for record in fake.requests] == [429, 202]
    assert fake.requests[1].at >= throttled_at + 2.0
    assert (fake.throttled, fake.sent_early_total) == (1, 0)


async def test_a_retry_after_on_a_503_holds_the_endpoint_too(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    fake = fake_klaviyo.state
    fake.script("create_event", [{"status": 503, "retry_after": 4}])
    client = client_for(fake_klaviyo, session)
    first = await client.send(track("u-1", "m-1"))
    assert (first.kind, first.status, first.retry_after) == ("retry", 503, 4.0)
    assert (await client.send(track("u-2", "m-2"))).kind == "ok"
    assert fake.requests[1].at >= fake.requests[0].at + 4.0
    assert fake.sent_early_total == 0


async def test_a_retry_after_holds_back_requests_the_pacer_already_admitted(
    fake_klaviyo: FakeKlaviyoServer,
) -> None:
    """Three requests at once, one connection: the pacer admits all three (the burst allows it),
    the first gets a 429; the two waiting for the connection do not go before its Retry-After."""
    fake = fake_klaviyo.state
    fake.script("create_event", [{"status": 429, "retry_after": 2}])
    destination = Destination(private_key=fake_klaviyo.api_key, base_url=fake_klaviyo.url)
    limits = RateLimits(clock=fake_klaviyo.clock, sleep=moving(fake_klaviyo.clock))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        client = KlaviyoClient(session, destination, limits=limits, connections=1)
        outcomes = await asyncio.gather(*(client.send(track(f"u-{n}", f"m-{n}")) for n in range(3)))
    assert sorted(outcome.status for outcome in outcomes) == [202, 202, 429]
    throttled, *later = fake.requests
    assert throttled.status == 429 and [record.status for record in later] == [202, 202]
    assert all(record.at >= throttled.at + 2.0 for record in later)
    assert fake.sent_early_total == 0


async def test_a_request_waiting_for_its_turn_gives_up_when_told(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    client = client_for(fake_klaviyo, session)
    client.limits.window(endpoint(EVENTS)).block_until(fake_klaviyo.clock() + 60)
    give_up = asyncio.Event()
    give_up.set()
    outcome = await client.send(track("u-1"), give_up=give_up)
    assert (outcome.kind, outcome.status, outcome.detail) == ("unsent", 0, "not sent: delivery is stopping")
    assert fake_klaviyo.state.requests == []


async def test_observe_sees_every_answer(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str, str, float]] = []
    statuses: list[int] = []

    def observe(operation_id: str, result: str, status: int, seconds: float) -> None:
        seen.append((operation_id, result, seconds))
        statuses.append(status)

    fake_klaviyo.state.script("POST /api/events", [503])
    client = client_for(fake_klaviyo, session, observe=observe)
    await client.send(track("u-1"))
    await client.send(track("u-1"))
    assert [(operation, kind) for operation, kind, _ in seen] == [
        ("create_event", "retry"),
        ("create_event", "ok"),
    ]
    assert all(seconds >= 0 for _, _, seconds in seen)
    assert statuses == [503, 202]


async def test_private_key_never_in_an_outcome(
    fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession
) -> None:
    fake = fake_klaviyo.state
    fake.faults.hold_seconds = 2.0
    fake.script("POST /api/events", [503, {"status": 429, "retry_after": 1}, "timeout"])
    client = client_for(fake_klaviyo, session, timeout=0.2)
    outcomes = [await client.send(track("u-1", f"m-{n}")) for n in range(4)]
    outcomes.append(await client.send(subscribe("a@example.com", "nope")))
    fake.revoke_key(fake_klaviyo.api_key)
    outcomes.append(await client.send(track("u-1")))
    refused = client_for(fake_klaviyo, session, base_url=f"http://127.0.0.1:{refused_port()}")
    outcomes.append(await refused.send(track("u-1")))
    kinds = [(outcome.kind, outcome.status) for outcome in outcomes]
    assert kinds == [
        ("retry", 503),
        ("retry", 429),
        ("retry", 0),
        ("ok", 202),
        ("permanent", 400),
        ("auth", 401),
        ("retry", 0),
    ]
    for outcome in outcomes:
        assert fake_klaviyo.api_key not in outcome.detail
        assert fake_klaviyo.api_key not in repr(outcome)
