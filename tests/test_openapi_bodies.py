"""Every request body the transform and the batcher produce is valid for its Klaviyo endpoint.

Bodies are checked against the request schemas of the OpenAPI subset (``router.klaviyo.spec``), each
sent alone (single endpoints) and merged (bulk jobs), over: the RudderStack conformance inputs with
each case's destination config, the bench event mix, the golden cases and the cases below. Bulk
bodies also stay within the endpoint's item count and size caps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.destination import Destination
from router.errors import RouterError
from router.klaviyo.batch import batch
from router.klaviyo.requests import KlaviyoRequest
from router.klaviyo.spec import count_items, endpoint_for, validate_body
from router.transform import transform

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parents[1] / "shared"
CONFORMANCE = SHARED / "conformance" / "rudderstack-klaviyo-cases.json"
BENCH_MIX = SHARED / "bench" / "events-mix.json"
GOLDEN = sorted((TESTS / "cases" / "transform").glob("*.json"))
VALID_MAPPINGS = TESTS / "cases" / "mappings" / "valid"

Source = tuple[Destination, list[dict[str, Any]]]


def produce(destination: Destination, messages: Sequence[Any]) -> list[KlaviyoRequest]:
    """The single-endpoint requests of every message the transform accepts."""
    out: list[KlaviyoRequest] = []
    for index, message in enumerate(messages):
        try:
            out.extend(transform(message, destination, index=index))
        except RouterError:
            continue
    return out


def problems(requests: Sequence[KlaviyoRequest]) -> list[str]:
    """Schema errors, too many items or too many bytes, one line per request at fault."""
    found: list[str] = []
    for number, request in enumerate(requests):
        endpoint = endpoint_for(request.method, request.path)
        errors = validate_body(endpoint, request.body)
        if endpoint.max_items is not None and count_items(endpoint, request.body) > endpoint.max_items:
            errors.append(f"{count_items(endpoint, request.body)} items > {endpoint.max_items}")
        size = len(orjson.dumps(request.body))
        if endpoint.max_body_bytes is not None and size > endpoint.max_body_bytes:
            errors.append(f"{size} bytes > {endpoint.max_body_bytes}")
        found.extend(f"#{number} {request.method} {request.path}: {error}" for error in errors)
    return found


def shared_params(path: Path, build: Any) -> list[Any]:
    """Parameters from a ../shared file, or one skipped parameter saying it is absent."""
    if not path.exists():
        return [
            pytest.param(
                None, marks=pytest.mark.skip(reason=f"{path} is not present (../shared is not checked out)")
            )
        ]
    params: list[Any] = build(orjson.loads(path.read_bytes()))
    return params


def conformance_params(cases: list[dict[str, Any]]) -> list[Any]:
    return [
        pytest.param(
            (
                Destination.from_mapping(case["destination_config"]),
                [entry["message"] for entry in case["input"]],
            ),
            id=case["name"],
        )
        for case in cases
    ]


def bench_params(mix: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param((Destination(private_key="bench", list_id="XUepkK"), mix), id="events-mix")]


def golden_source(path: Path) -> Source:
    case = orjson.loads(path.read_bytes())
    config = dict(case["destination"])
    if "mappings_dir" in case:
        config["mappings_dir"] = str((path.parent / case["mappings_dir"]).resolve())
    return Destination.from_mapping(config), [case["message"]]


def identify(user: str, properties: dict[str, Any] | None = None, **traits: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": user,
        "anonymousId": f"anon-{user}",
        "traits": {"email": f"{user}@example.com", **traits, "properties": properties or {}},
    }


def track(user: str, event: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": event,
        "messageId": f"{user}-{event}",
        "timestamp": "2026-07-20T12:00:00.000Z",
        "properties": properties,
        "context": {"traits": {"email": f"{user}@example.com", "phone": "+1 617 555 1333"}},
        **extra,
    }


PROFILE_ID = {"context": {"externalId": [{"type": "klaviyo-profileId", "id": "01KPROFILEID"}]}}
PATCH = {"integrations": {"Klaviyo": {"fieldsToUnset": ["legacy"], "fieldsToAppend": ["tags"]}}}
ITEMS = [{"product_id": "p1", "sku": "s1", "name": "Mug", "price": 9.5, "quantity": 2, "total": 19.0}]

# Messages that reach every request shape: profile meta and ids, list add/subscribe/unsubscribe,
# e-commerce, page, screen, rETL, pre-transformed input.
OWN_MESSAGES: list[dict[str, Any]] = [
    identify("u1", {"subscribe": True, "listId": "L1", "smsConsent": True}, phone="+16175551333", tags=["a"]),
    {**identify("u2", {"subscribe": False}), **PATCH},
    {**identify("u3", {"subscribe": True}, plan="pro", nested={"a": {"b": [1, {"c": 2}]}}), **PROFILE_ID},
    identify("u4", {"subscribe": True, "consent": []}),
    identify("u5", {"subscribe": True, "consent": "web"}),
    track("u1", "Product Viewed", {"name": "Mug", "price": 9.5, "extra": {"x": 1}}),
    track("u1", "Product Added", {"value": 9.5, "currency": "USD", "items": ITEMS}, **PATCH),
    track("u2", "Checkout Started", {"order_id": "o-1", "revenue": "19.00", "products": ITEMS}),
    track("u3", "Order Completed", {"order_id": "o-1", "total": 19, "products": ITEMS}, **PROFILE_ID),
    {
        "type": "screen",
        "userId": "u1",
        "name": "Home",
        "properties": {"tab": "deals"},
        "timestamp": 1784548800,
    },
    {"type": "page", "anonymousId": "a9", "name": "Cart", "properties": {"url": "https://x.example/cart"}},
    {
        "type": "group",
        "userId": "u1",
        "groupId": "G1",
        "traits": {"subscribe": True, "email": "u1@example.com"},
    },
    {
        "type": "group",
        "userId": "u2",
        "groupId": "G1",
        "traits": {"subscribe": False, "email": "u2@example.com"},
    },
    {
        "type": "identify",
        "context": {
            "mappedToDestination": True,
            "externalId": [
                {"id": "ret@example.com", "identifierType": "email", "type": "KLAVIYO-profile_v2"}
            ],
            "traits": {"firstName": "Ret"},
        },
    },
]
OWN_DESTINATIONS: dict[str, Destination] = {
    "defaults": Destination(private_key="pk", list_id="L0"),
    "everything on": Destination(
        private_key="pk",
        list_id="L0",
        consent=("email", "sms"),
        sms_consent=True,
        flatten_properties=True,
        send_page_as_track=True,
        additional_page_info=True,
    ),
    "email as primary": Destination(private_key="pk", list_id="L0", enforce_email_as_primary=True),
    "no consent": Destination(private_key="pk", list_id="L0", consent=()),
    "user mappings": Destination(private_key="pk", list_id="L0", mappings_dir=VALID_MAPPINGS),
}

SOURCES: list[Any] = [
    *shared_params(CONFORMANCE, conformance_params),
    *shared_params(BENCH_MIX, bench_params),
    pytest.param(
        (Destination(private_key="pk"), [m for path in GOLDEN for m in golden_source(path)[1]]),
        id="golden messages",
    ),
    *(
        pytest.param((destination, OWN_MESSAGES), id=f"own: {name}")
        for name, destination in OWN_DESTINATIONS.items()
    ),
]


class TestBodiesValidate:
    """Every body is valid for its endpoint, sent alone or merged into bulk jobs."""

    @pytest.mark.parametrize("source", SOURCES)
    def test_single_requests(self, source: Source) -> None:
        """Each request as the transform makes it."""
        destination, messages = source
        assert problems(produce(destination, messages)) == []

    @pytest.mark.parametrize("source", SOURCES)
    def test_batched_requests(self, source: Source) -> None:
        """The bulk jobs delivery would send for the whole set."""
        destination, messages = source
        assert problems(batch(produce(destination, messages))) == []

    @pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
    def test_golden_expectations(self, path: Path) -> None:
        """The expected requests written in the golden cases are themselves valid, alone and merged."""
        destination, messages = golden_source(path)
        produced = produce(destination, messages)
        expected = orjson.loads(path.read_bytes()).get("expected_requests", [])
        assert [r.to_json() for r in produced] == expected
        assert problems(produced) == []
        assert problems(batch(produced + produce(destination, messages))) == []

    def test_own_messages_reach_every_endpoint(self) -> None:
        """The own cases, across their destinations, exercise every endpoint the router sends to."""
        paths = set()
        for destination in OWN_DESTINATIONS.values():
            requests = produce(destination, OWN_MESSAGES)
            paths |= {r.path for r in requests} | {r.path for r in batch(requests)}
        assert paths == {
            "/api/profile-import",
            "/api/events",
            "/api/event-bulk-create-jobs",
            "/api/profile-bulk-import-jobs",
            "/api/profile-subscription-bulk-create-jobs",
            "/api/profile-subscription-bulk-delete-jobs",
        }

    def test_checker_catches_a_bad_body(self) -> None:
        """The check itself fails a body Klaviyo would refuse (a metric without a name)."""
        (request,) = produce(OWN_DESTINATIONS["defaults"], [track("u1", "E", {})])
        request.body["data"]["attributes"]["metric"]["data"]["attributes"] = {}
        assert problems([request]) == [
            "#0 POST /api/events: /data/attributes/metric/data/attributes: 'name' is a required property"
        ]
