"""The pure transform: RudderStack/Segment message → Klaviyo requests (``router.transform``).

Golden cases live in ``cases/transform/*.json`` (``{description, destination, [mappings_dir], message,
expected_requests | expected_error | expected_skipped}``); the rest are focused tests of one
behaviour each: the seed 003 calls and e-commerce tables, identity, phones, consent, flattening,
patch properties, rETL, pre-transformed input, every error text, and purity.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.cli import main
from router.destination import Destination
from router.errors import ConfigError, MappingError, PartlyRefused, Skipped, TransformError
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import KLAVIYO_DIR, load_mappings
from router.transform import MAX_METRIC_NAME, TransformWarning, flatten, transform

CASES = Path(__file__).resolve().parent / "cases"
GOLDEN = sorted((CASES / "transform").glob("*.json"))
VALID_MAPPINGS = CASES / "mappings" / "valid"
SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance" / "rudderstack-klaviyo-cases.json"

KEY = "pk_test_transform_secret"
#: What an identify's refused list subscription adds to the reason (its profile update is sent).
PARTLY = " (the profile update was sent; its list subscription was not)"


def destination(**settings: Any) -> Destination:
    return Destination(private_key=KEY, **settings)


def requests(message: Any, **settings: Any) -> list[KlaviyoRequest]:
    return transform(message, destination(**settings))


def one(message: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """The body of the only request ``message`` makes."""
    produced = requests(message, **settings)
    assert len(produced) == 1, [r.path for r in produced]
    return produced[0].body


def event_attributes(message: dict[str, Any], **settings: Any) -> dict[str, Any]:
    body = one({"type": "track", "userId": "u1", **message}, **settings)
    attributes: dict[str, Any] = body["data"]["attributes"]
    return attributes


def profile_attributes(message: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """Attributes of the profile-import an identify makes."""
    produced = requests({"type": "identify", **message}, **settings)
    assert produced[0].path == "/api/profile-import"
    attributes: dict[str, Any] = produced[0].body["data"]["attributes"]
    return attributes


def error_of(message: Any, **settings: Any) -> str:
    with pytest.raises(TransformError) as caught:
        requests(message, **settings)
    return caught.value.message


def list_requests(message: dict[str, Any], **settings: Any) -> list[KlaviyoRequest]:
    """The list/subscription requests of a message (its profile-import left out)."""
    return [r for r in requests(message, **settings) if r.path != "/api/profile-import"]


def subscribed_profile(request: KlaviyoRequest) -> dict[str, Any]:
    profiles: list[dict[str, Any]] = request.body["data"]["attributes"]["profiles"]["data"]
    assert len(profiles) == 1
    return profiles[0]


def identify(properties: dict[str, Any], **traits: Any) -> dict[str, Any]:
    """An identify of user u1 with list-related ``traits.properties``."""
    return {"type": "identify", "userId": "u1", "traits": {**traits, "properties": properties}}


def load_case(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = orjson.loads(path.read_bytes())
    return case


def case_destination(case: dict[str, Any], path: Path) -> Destination:
    config = dict(case["destination"])
    if "mappings_dir" in case:
        config["mappings_dir"] = str((path.parent / case["mappings_dir"]).resolve())
    return Destination.from_mapping(config)


class TestGoldenCases:
    """Each golden case produces exactly its expected requests, error or skip, and leaves its input alone."""

    @pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
    def test_golden_case(self, path: Path) -> None:
        """Output equals the case's expectation."""
        case = load_case(path)
        message = case["message"]
        before = copy.deepcopy(message)
        dest = case_destination(case, path)
        if "expected_error" in case:
            with pytest.raises(TransformError) as caught:
                transform(message, dest)
            assert caught.value.message == case["expected_error"]
        elif "expected_skipped" in case:
            with pytest.raises(Skipped) as skipped:
                transform(message, dest)
            assert skipped.value.message == case["expected_skipped"]
        else:
            assert [r.to_json() for r in transform(message, dest)] == case["expected_requests"]
        assert message == before

    def test_every_case_has_one_expectation(self) -> None:
        """A golden case expects requests, an error or a skip: exactly one of them."""
        assert len(GOLDEN) >= 10
        for path in GOLDEN:
            case = load_case(path)
            found = [k for k in ("expected_requests", "expected_error", "expected_skipped") if k in case]
            assert len(found) == 1, path.name
            assert case["description"].strip(), path.name


class TestSeedCalls:
    """The sample calls of seed 003, one behaviour at a time."""

    IDENTIFY: dict[str, Any] = load_case(CASES / "transform" / "seed-identify-subscribe.json")["message"]
    GROUP: dict[str, Any] = load_case(CASES / "transform" / "seed-group-us-region.json")["message"]

    def test_identify_upserts_then_subscribes(self) -> None:
        """identify → profile-import, then a subscribe job on the event's listId (not the destination's)."""
        produced = requests(self.IDENTIFY, list_id="DEFAULTLIST")
        assert [r.path for r in produced] == [
            "/api/profile-import",
            "/api/profile-subscription-bulk-create-jobs",
        ]
        job = produced[1].body["data"]
        assert job["relationships"]["list"]["data"] == {"type": "list", "id": "XUepkK"}

    def test_identify_profile_fields(self) -> None:
        """Standard traits become profile fields; the rest are custom properties; the top-level userId wins."""
        attributes = profile_attributes(self.IDENTIFY)
        assert attributes["external_id"] == "userid"
        assert attributes["first_name"] == "Name"
        assert attributes["last_name"] == "Surname"
        assert attributes["phone_number"] == "+12345678900"
        assert attributes["location"] == {
            "city": "Tokyo",
            "region": "ABC",
            "country": "JP",
            "zip": "100-0001",
        }
        assert attributes["properties"] == {"Flagged": False, "Residence": "Shibuya"}

    def test_identify_consent_and_sms_consent(self) -> None:
        """consent 'email' plus smsConsent true → email and sms marketing subscriptions."""
        job = list_requests(self.IDENTIFY)[0]
        assert subscribed_profile(job)["attributes"] == {
            "email": "name@website.com",
            "phone_number": "+12345678900",
            "subscriptions": {
                "email": {"marketing": {"consent": "SUBSCRIBED"}},
                "sms": {"marketing": {"consent": "SUBSCRIBED"}},
            },
        }

    def test_track_checked_out(self) -> None:
        """revenue → the event value; other properties, arrays included, are kept as they are."""
        attributes = event_attributes(
            {
                "event": "Checked Out",
                "properties": {
                    "Clicked_Rush_delivery_Button": True,
                    "total_value": 2000,
                    "Ordered": ["T-Shirt", "jacket"],
                    "revenue": 2000,
                },
            }
        )
        assert attributes["metric"]["data"]["attributes"]["name"] == "Checked Out"
        assert attributes["value"] == 2000
        assert attributes["properties"] == {
            "Clicked_Rush_delivery_Button": True,
            "total_value": 2000,
            "Ordered": ["T-Shirt", "jacket"],
        }

    def test_server_side_item_purchased(self) -> None:
        """revenue 97.5 → value; the email of context.traits identifies the profile beside userId."""
        attributes = event_attributes(
            {
                "userId": "user2",
                "event": "Item Purchased",
                "properties": {
                    "revenue": 97.5,
                    "products": [{"productId": "pro1", "price": 32.5, "quantity": 3}],
                },
                "context": {"traits": {"email": "user2@gmail.com"}},
            }
        )
        assert attributes["value"] == 97.5
        assert "revenue" not in attributes["properties"]
        assert attributes["properties"]["products"] == [{"productId": "pro1", "price": 32.5, "quantity": 3}]
        assert attributes["profile"]["data"]["attributes"] == {
            "external_id": "user2",
            "email": "user2@gmail.com",
        }

    def test_group_national_phone_rejected_without_region(self) -> None:
        """1-617-555-1333 is a national US number: not E.164 without default_phone_region."""
        message = error_of(self.GROUP)
        assert message.startswith(
            "context.traits.phone: Phone number is not in E.164 format ('1-617-555-1333')"
        )
        assert "default_phone_region" in message

    def test_group_with_us_region(self) -> None:
        """With default_phone_region US: groupId is the list, phone +16175551333, email and sms subscribed."""
        produced = requests(self.GROUP, default_phone_region="US")
        assert [r.path for r in produced] == ["/api/profile-subscription-bulk-create-jobs"]
        data = produced[0].body["data"]
        assert data["relationships"]["list"]["data"]["id"] == "listId"
        attributes = subscribed_profile(produced[0])["attributes"]
        assert attributes["phone_number"] == "+16175551333"
        assert set(attributes["subscriptions"]) == {"email", "sms"}


# Seed 003 "E-Commerce event name mapping" tables: (RudderStack property, Klaviyo property).
VIEWED_PRODUCT = [
    ("name", "ProductName"),
    ("product_id", "ProductID"),
    ("sku", "SKU"),
    ("image_url", "ImageURL"),
    ("url", "URL"),
    ("brand", "Brand"),
    ("price", "Price"),
    ("compare_at_price", "CompareAtPrice"),
    ("categories", "Categories"),
]
ADDED_TO_CART = [
    ("name", "AddedItemProductName"),
    ("product_id", "AddedItemProductID"),
    ("sku", "AddedItemSKU"),
    ("image_url", "AddedItemImageURL"),
    ("url", "AddedItemURL"),
    ("price", "AddedItemPrice"),
    ("quantity", "AddedItemQuantity"),
    ("categories", "AddedItemCategories"),
    ("item_names", "ItemNames"),
    ("checkout_url", "CheckoutURL"),
]
STARTED_CHECKOUT = [
    ("order_id", "$event_id"),
    ("categories", "Categories"),
    ("item_names", "ItemNames"),
    ("checkout_url", "CheckoutURL"),
]
ITEMS = [
    ("product_id", "ProductID"),
    ("sku", "SKU"),
    ("name", "ProductName"),
    ("quantity", "Quantity"),
    ("price", "Price"),
    ("total", "RowTotal"),
    ("url", "URL"),
    ("image_url", "ImageURL"),
    ("categories", "ProductCategories"),
]
SAMPLE_VALUES: dict[str, Any] = {
    "name": "Trail Shoe",
    "product_id": "pId1",
    "sku": "sku1",
    "image_url": "https://shop.example.com/shoe.png",
    "url": "https://shop.example.com/shoe",
    "brand": "Acme",
    "price": 59.9,
    "compare_at_price": 79.9,
    "categories": ["shoes", "trail"],
    "quantity": 2,
    "item_names": ["Trail Shoe", "Sock"],
    "checkout_url": "https://shop.example.com/checkout",
    "order_id": "1234",
    "total": 119.8,
}
PROPERTY_ROWS = [
    pytest.param(event, metric, source, target, id=f"{metric}: {source} -> {target}")
    for event, metric, table in (
        ("Product Viewed", "Viewed Product", VIEWED_PRODUCT),
        ("Product Added", "Added to Cart", ADDED_TO_CART),
        ("Checkout Started", "Started Checkout", STARTED_CHECKOUT),
    )
    for source, target in table
]
ITEM_ROWS = [
    pytest.param(event, source, target, id=f"{event} Items: {source} -> {target}")
    for event in ("Product Added", "Checkout Started")
    for source, target in ITEMS
]


class TestEcommerceTables:
    """Every row of the seed's e-commerce tables: renamed event, renamed property, extra properties kept."""

    @pytest.mark.parametrize(("event", "metric", "source", "target"), PROPERTY_ROWS)
    def test_property_row(self, event: str, metric: str, source: str, target: str) -> None:
        """The source property arrives under the Klaviyo name; an unmapped one stays as it was."""
        value = SAMPLE_VALUES[source]
        attributes = event_attributes({"event": event, "properties": {source: value, "gift_wrap": True}})
        assert attributes["metric"]["data"]["attributes"]["name"] == metric
        properties = attributes["properties"]
        expected = str(value) if target == "$event_id" else value
        assert properties[target] == expected
        assert source not in properties
        assert properties["gift_wrap"] is True

    @pytest.mark.parametrize("event", ["Product Added", "Checkout Started"])
    def test_value_becomes_event_value(self, event: str) -> None:
        """value → $value, sent as the event's value attribute with its currency."""
        attributes = event_attributes({"event": event, "properties": {"value": "12.34", "currency": "EUR"}})
        assert attributes["value"] == 12.34
        assert attributes["value_currency"] == "EUR"
        assert "value" not in attributes["properties"]
        assert "currency" not in attributes["properties"]

    @pytest.mark.parametrize(("event", "source", "target"), ITEM_ROWS)
    def test_items_row(self, event: str, source: str, target: str) -> None:
        """Each item parameter arrives under its Klaviyo name inside Items."""
        value = SAMPLE_VALUES[source]
        properties = event_attributes({"event": event, "properties": {"items": [{source: value}]}})[
            "properties"
        ]
        assert properties["Items"] == [{target: value}]
        assert "items" not in properties

    @pytest.mark.parametrize("event", ["Product Added", "Checkout Started"])
    def test_products_and_row_total_fallbacks(self, event: str) -> None:
        """Without items, products are used; row_total stands in for total (the seed's sample call)."""
        properties = event_attributes(
            {"event": event, "properties": {"products": [{"product_id": "p1", "row_total": 1.0}, {}]}}
        )["properties"]
        assert properties["Items"] == [{"ProductID": "p1", "RowTotal": 1.0}]
        assert "products" not in properties

    def test_extra_item_keys_are_not_copied(self) -> None:
        """Items carry only the mapped parameters."""
        properties = event_attributes(
            {"event": "Product Added", "properties": {"items": [{"sku": "s", "variant": "blue"}]}}
        )["properties"]
        assert properties["Items"] == [{"SKU": "s"}]

    @pytest.mark.parametrize(
        ("event", "metric"),
        [
            ("product clicked", "Viewed Product"),
            ("Product Clicked", "Viewed Product"),
            ("PRODUCT VIEWED", "Viewed Product"),
            (" Product  Added ", "Added to Cart"),
            ("checkout started ", "Started Checkout"),
            ("Checkout\tStarted", "Started Checkout"),
            ("Order Completed", "Order Completed"),
            ("Product Removed", "Product Removed"),
        ],
    )
    def test_event_name_matching(self, event: str, metric: str) -> None:
        """Names match ignoring case and spaces; others keep their own name."""
        attributes = event_attributes({"event": event, "properties": {}})
        assert attributes["metric"]["data"]["attributes"]["name"] == metric

    def test_started_checkout_full_sample(self) -> None:
        """The seed's sample 'checkout started ' call: $event_id, value, Items (see the golden case too)."""
        case = load_case(CASES / "transform" / "seed-checkout-started.json")
        attributes = one(case["message"])["data"]["attributes"]
        assert attributes["value"] == 12.34
        assert attributes["properties"]["$event_id"] == "1234"
        assert [item["RowTotal"] for item in attributes["properties"]["Items"]] == [1.0, 2.0]


PAGE: dict[str, Any] = {
    "type": "page",
    "anonymousId": "anon-1",
    "name": "Cart Viewed",
    "category": "Cart",
    "properties": {"path": "/cart", "referrer": "test.com", "url": "http://test.in"},
}


class TestPageAliasScreen:
    """page is an event only when send_page_as_track is on; alias is always skipped; screen is an event."""

    def test_page_off_is_skipped(self) -> None:
        """send_page_as_track off → Skipped naming the setting."""
        with pytest.raises(Skipped, match="page call skipped: the destination's send_page_as_track is off"):
            requests(PAGE)

    def test_page_as_track(self) -> None:
        """A 'Viewed Page' event with name and category only."""
        attributes = one(PAGE, send_page_as_track=True)["data"]["attributes"]
        assert attributes["metric"]["data"]["attributes"]["name"] == "Viewed Page"
        assert attributes["properties"] == {"name": "Cart Viewed", "category": "Cart"}

    def test_additional_page_info(self) -> None:
        """With additional_page_info the page properties (and context.page) are added."""
        message = {**PAGE, "context": {"page": {"title": "Cart page", "path": "/old"}}}
        attributes = one(message, send_page_as_track=True, additional_page_info=True)["data"]["attributes"]
        assert attributes["properties"] == {
            "title": "Cart page",
            "path": "/cart",
            "referrer": "test.com",
            "url": "http://test.in",
            "name": "Cart Viewed",
            "category": "Cart",
        }

    def test_additional_page_info_alone_does_nothing(self) -> None:
        """additional_page_info without send_page_as_track still skips."""
        with pytest.raises(Skipped):
            requests(PAGE, additional_page_info=True)

    def test_alias_is_skipped(self) -> None:
        """alias has no Klaviyo equivalent."""
        with pytest.raises(Skipped, match="alias call skipped"):
            requests({"type": "alias", "userId": "new", "previousId": "old"})

    def test_screen_is_an_event(self) -> None:
        """A screen call is an event named after the screen."""
        attributes = one({"type": "screen", "userId": "u1", "name": "Home", "properties": {"tab": "deals"}})
        assert attributes["data"]["attributes"]["metric"]["data"]["attributes"]["name"] == "Home"
        assert attributes["data"]["attributes"]["properties"] == {"tab": "deals"}

    def test_type_is_case_insensitive(self) -> None:
        """'TRACK' is a track call."""
        assert one({"type": "TRACK", "event": "E", "userId": "u1"})["data"]["type"] == "event"


class TestIdentity:
    """external_id = userId, anonymous_id = anonymousId, email/phone from traits, context.traits, properties."""

    def test_user_and_anonymous_ids(self) -> None:
        """Both are sent, each as itself."""
        attributes = profile_attributes({"userId": "u1", "anonymousId": "a1"})
        assert attributes == {"external_id": "u1", "anonymous_id": "a1"}

    def test_anonymous_id_is_never_the_external_id(self) -> None:
        """Without userId, anonymousId does not become external_id."""
        attributes = profile_attributes({"anonymousId": "a1"})
        assert attributes == {"anonymous_id": "a1"}

    @pytest.mark.parametrize(
        ("message", "email"),
        [
            ({"traits": {"email": "t@x.com"}, "context": {"traits": {"email": "c@x.com"}}}, "t@x.com"),
            ({"context": {"traits": {"email": "c@x.com"}}, "properties": {"email": "p@x.com"}}, "c@x.com"),
            ({"properties": {"email": "p@x.com"}}, "p@x.com"),
            ({"traits": {"email": ""}, "context": {"traits": {"email": "c@x.com"}}}, "c@x.com"),
        ],
        ids=["traits", "context.traits", "properties", "empty skipped"],
    )
    def test_email_fallbacks(self, message: dict[str, Any], email: str) -> None:
        """The first present email wins: traits, then context.traits, then properties."""
        assert profile_attributes({"userId": "u1", **message})["email"] == email

    def test_numeric_user_id_is_text(self) -> None:
        """A numeric userId is sent as text."""
        assert profile_attributes({"userId": 123})["external_id"] == "123"

    def test_klaviyo_profile_id(self) -> None:
        """A context.externalId of type klaviyo-profileId becomes data.id of the profile."""
        message = {
            "userId": "u1",
            "context": {"externalId": [{"type": "klaviyo-profileId", "id": "01KPROFILE"}]},
        }
        produced = requests({"type": "identify", **message})
        assert produced[0].body["data"]["id"] == "01KPROFILE"
        event = one({"type": "track", "event": "E", **message})
        assert event["data"]["attributes"]["profile"]["data"]["id"] == "01KPROFILE"

    def test_request_records(self) -> None:
        """Each request records its input index and the profile's ordering key."""
        produced = transform({"type": "identify", "userId": "u1"}, destination(), index=7)
        assert produced[0].sources == (7,)
        assert produced[0].ordering_key == "u:u1"
        assert produced[0].kind == "profile"


class TestEnforceEmailAsPrimary:
    """enforce_email_as_primary: no external_id, userId kept as custom property _id, email or phone required."""

    def test_identify(self) -> None:
        """external_id is dropped and stored as _id."""
        attributes = profile_attributes(
            {"userId": "u1", "traits": {"email": "a@x.com", "plan": "pro"}}, enforce_email_as_primary=True
        )
        assert "external_id" not in attributes
        assert attributes["properties"] == {"plan": "pro", "_id": "u1"}

    def test_event_profile(self) -> None:
        """The event's profile is treated the same way."""
        attributes = event_attributes(
            {"event": "E", "context": {"traits": {"phone": "+16175551333"}}}, enforce_email_as_primary=True
        )
        assert attributes["profile"]["data"]["attributes"] == {
            "phone_number": "+16175551333",
            "properties": {"_id": "u1"},
        }

    @pytest.mark.parametrize(
        "message", [{"userId": "u1"}, {"anonymousId": "a1"}, {"userId": "u1", "traits": {}}]
    )
    def test_error_without_email_or_phone(self, message: dict[str, Any]) -> None:
        """Without email and phone the message is rejected, naming the setting."""
        text = error_of({"type": "identify", **message}, enforce_email_as_primary=True)
        assert text == (
            "None of email and phone are present in the payload (enforce_email_as_primary needs one of them)"
        )


class TestNoIdentifier:
    """A message with nothing to identify its profile is rejected."""

    @pytest.mark.parametrize(
        "message",
        [
            {"type": "identify", "traits": {"firstName": "Ann"}},
            {"type": "track", "event": "E", "properties": {"a": 1}},
            {"type": "identify", "userId": "", "anonymousId": ""},
        ],
        ids=["identify", "track", "empty ids"],
    )
    def test_no_usable_identifier(self, message: dict[str, Any]) -> None:
        """The error lists what was looked for."""
        assert (
            error_of(message)
            == "no usable identifier: the message has no userId, anonymousId, email or phone"
        )


class TestFlattening:
    """flatten_properties: nested objects → a.b, arrays of scalars kept, arrays of objects → key[0].sub."""

    NESTED: dict[str, Any] = {
        "friend": {"names": {"first": "Alice", "last": "Smith"}, "age": 25},
        "tags": ["a", "b"],
        "orders": [{"id": 1, "sku": {"code": "X"}}, {"id": 2}],
        "mixed": [1, {"a": 2}, [3]],
        "plain": "x",
    }
    FLAT: dict[str, Any] = {
        "friend.names.first": "Alice",
        "friend.names.last": "Smith",
        "friend.age": 25,
        "tags": ["a", "b"],
        "orders[0].id": 1,
        "orders[0].sku.code": "X",
        "orders[1].id": 2,
        "mixed[0]": 1,
        "mixed[1].a": 2,
        "mixed[2].0": 3,
        "plain": "x",
    }

    def test_profile_properties(self) -> None:
        """Custom traits are flattened."""
        attributes = profile_attributes({"userId": "u1", "traits": self.NESTED}, flatten_properties=True)
        assert attributes["properties"] == self.FLAT

    def test_event_properties(self) -> None:
        """Event properties are flattened, including the mapped Items."""
        attributes = event_attributes({"event": "E", "properties": self.NESTED}, flatten_properties=True)
        assert attributes["properties"] == self.FLAT
        items = event_attributes(
            {"event": "Product Added", "properties": {"items": [{"sku": "s1"}, {"sku": "s2"}]}},
            flatten_properties=True,
        )["properties"]
        assert items == {"Items[0].SKU": "s1", "Items[1].SKU": "s2"}

    def test_off_by_default(self) -> None:
        """Without the setting nested values are sent as they are."""
        assert event_attributes({"event": "E", "properties": self.NESTED})["properties"] == self.NESTED
        assert profile_attributes({"userId": "u1", "traits": self.NESTED})["properties"] == self.NESTED

    def test_flatten_function(self) -> None:
        """An empty object stays a value; a prefix is applied to every key."""
        assert flatten({"e": {}, "a": {"b": None}}, "p.") == {"p.e": {}, "p.a.b": None}


class TestKlaviyoFieldNames:
    """Klaviyo's own attribute names in traits (seed 000's table) are profile fields, checked, never also
    custom properties; the audience sync reads its columns from the same table."""

    def test_klaviyo_names_are_converted_and_not_passed_through(self) -> None:
        traits = {
            "email": "ada@example.com",
            "phone_number": "+1 (617) 555-1333",
            "address1": "1 Main St",
            "address2": "Apt 9",
            "latitude": "42.361145",
            "longitude": -71.057083,
            "ip": "2001:DB8::1",
            "timezone": "america/new_york",
            "last_event_date": "2024-03-01 10:00:00",
            "external_id": "crm-7",
            "plan": "gold",
        }
        attributes = profile_attributes({"anonymousId": "a1", "traits": traits})
        assert attributes["phone_number"] == "+16175551333"
        assert attributes["external_id"] == "crm-7"
        assert attributes["location"] == {
            "address1": "1 Main St",
            "address2": "Apt 9",
            "latitude": 42.3611,
            "longitude": -71.0571,
            "ip": "2001:db8::1",
            "timezone": "America/New_York",
        }
        assert attributes["properties"] == {"plan": "gold", "last_event_date": "2024-03-01T10:00:00Z"}

    def test_user_id_stays_the_external_id(self) -> None:
        attributes = profile_attributes({"userId": "u1", "traits": {"external_id": "crm-7"}})
        assert attributes["external_id"] == "u1"

    @pytest.mark.parametrize(
        ("trait", "value", "detail"),
        [
            ("timezone", "Mars/Olympus", "traits.timezone: 'Mars/Olympus' is not an IANA time zone name"),
            ("ip", "300.1.1.1", "traits.ip: '300.1.1.1' is not an IP address"),
            (
                "last_event_date",
                "yesterday-ish",
                "traits.last_event_date: 'yesterday-ish' is not a date or time",
            ),
            ("latitude", "north", "traits.latitude: expected a number, got 'north'"),
            ("phone_number", "12", "traits.phone_number: Phone number is not in E.164 format ('12')"),
        ],
    )
    def test_bad_values_are_refused_by_name(self, trait: str, value: str, detail: str) -> None:
        assert detail in error_of({"type": "identify", "userId": "u1", "traits": {trait: value}})

    @pytest.mark.parametrize(
        ("raw", "iso"),
        [
            ("2024-03-01", "2024-03-01T00:00:00Z"),
            ("2024-03-01T10:00:00+02:00", "2024-03-01T10:00:00+02:00"),
            ("03/01/2024 10:30", "2024-03-01T10:30:00Z"),
            ("1 Mar 2024", "2024-03-01T00:00:00Z"),
            ("Fri, 01 Mar 2024 10:00:00 GMT", "2024-03-01T10:00:00Z"),
            (1709287200, "2024-03-01T10:00:00Z"),
        ],
    )
    def test_last_event_date_takes_any_common_date(self, raw: Any, iso: str) -> None:
        attributes = profile_attributes({"userId": "u1", "traits": {"last_event_date": raw}})
        assert attributes["properties"]["last_event_date"] == iso


class TestPhoneNumbers:
    """Phones are strict E.164 (phonenumbers); national numbers need default_phone_region."""

    @pytest.mark.parametrize(
        ("phone", "region", "expected"),
        [
            ("+12 345 578 900", None, "+12345578900"),
            ("+1 (617) 555-1333", None, "+16175551333"),
            ("+16175551333", "GB", "+16175551333"),
            ("(617) 555-1333", "US", "+16175551333"),
            ("1-617-555-1333", "US", "+16175551333"),
            ("020 7946 0958", "GB", "+442079460958"),
            (16175551333, "US", "+16175551333"),
            ("+9112340375", None, "+9112340375"),  # RudderStack's test number: India, short but plausible
        ],
    )
    def test_normalised(self, phone: Any, region: str | None, expected: str) -> None:
        """The number is sent in E.164."""
        attributes = profile_attributes(
            {"userId": "u1", "traits": {"phone": phone}}, default_phone_region=region
        )
        assert attributes["phone_number"] == expected

    @pytest.mark.parametrize(
        ("phone", "region", "detail"),
        [
            ("9112340375", None, "('9112340375'); set default_phone_region to accept national numbers"),
            (16175551333, None, "('16175551333'); set default_phone_region to accept national numbers"),
            ("garbage", None, "('garbage')"),
            ("garbage", "US", "('garbage')"),
            ("++1617", None, "('++1617')"),
            ("12", "US", "('12'): not a valid number in the US numbering plan"),
            # possible (a plausible length) but not valid: Klaviyo would refuse them at delivery
            ("12345", "GB", "('12345'): not a valid number in the GB numbering plan"),
            ("(415) 555-2671", "GB", "('(415) 555-2671'): not a valid number in the GB numbering plan"),
            (
                "9112340375",
                "US",
                "('9112340375'): not a valid number in the US numbering plan",
            ),  # 911 is no area code
            ("+10000000000", None, "('+10000000000'): not a valid number in the US numbering plan"),
            ("+4412345", None, "('+4412345'): not a valid number in the GB numbering plan"),
            (
                "+1 617",
                None,
                "('+1 617'): not a valid number in the US numbering plan",
            ),  # too short to be a number of that country
            (
                "+1 617 555 1333 ext 2",
                None,
                "('+1 617 555 1333 ext 2'): not a valid number in the US numbering plan",
            ),  # too long
            (5.5, None, "(float)"),
            (True, None, "(true/false)"),
            (["+16175551333"], None, "(a list)"),
        ],
    )
    def test_rejected(self, phone: Any, region: str | None, detail: str) -> None:
        """The error names the path, says 'not in E.164 format' and shows the value."""
        text = error_of(
            {"type": "identify", "userId": "u1", "traits": {"phone": phone}}, default_phone_region=region
        )
        assert text == f"traits.phone: Phone number is not in E.164 format {detail}"

    def test_event_profile_phone_checked(self) -> None:
        """A track call's context.traits.phone is checked too, naming that path."""
        text = error_of(
            {"type": "track", "event": "E", "userId": "u1", "context": {"traits": {"phone": "garbage"}}}
        )
        assert text.startswith("context.traits.phone: Phone number is not in E.164 format")

    def test_invalid_phone_drop_keeps_the_event(self) -> None:
        """invalid_phone 'drop': the event is sent, without the phone."""
        attributes = event_attributes(
            {"event": "E", "context": {"traits": {"phone": "garbage", "email": "a@x.com"}}},
            invalid_phone="drop",
        )
        assert attributes["profile"]["data"]["attributes"] == {"external_id": "u1", "email": "a@x.com"}

    def test_invalid_phone_drop_still_needs_an_identifier(self) -> None:
        """A dropped phone that was the only identifier leaves nothing to identify the profile."""
        text = error_of({"type": "identify", "traits": {"phone": "garbage"}}, invalid_phone="drop")
        assert text.startswith("no usable identifier")

    @pytest.mark.parametrize(
        "config",
        [
            {"private_key": KEY},
            {"privateApiKey": KEY},
            {"privateApiKey": KEY, "apiVersion": "v1"},
            {"privateApiKey": KEY, "apiVersion": "v2"},
        ],
        ids=["project keys", "rudderstack without apiVersion", "rudderstack v1", "rudderstack v2"],
    )
    def test_every_config_style_rejects_by_default(self, config: dict[str, Any]) -> None:
        """Whatever the key style, an invalid phone rejects the event unless drop is asked for."""
        dest = Destination.from_mapping(config)
        assert dest.invalid_phone == "reject"
        message = {"type": "identify", "userId": "u1", "traits": {"phone": "12", "email": "a@x.com"}}
        with pytest.raises(TransformError, match=r"traits\.phone: Phone number is not in E\.164 format"):
            transform(message, dest)

    def test_drop_is_recorded(self) -> None:
        """invalid_phone 'drop': each phone left out is a warning naming the path and the value."""
        warnings: list[TransformWarning] = []
        message = {"type": "identify", "userId": "u1", "traits": {"phone": "12", "email": "a@x.com"}}
        (profile,) = transform(message, destination(invalid_phone="drop"), warnings=warnings)
        assert "phone_number" not in profile.body["data"]["attributes"]
        assert warnings == [
            TransformWarning(
                "invalid_phone_dropped",
                "traits.phone: Phone number is not in E.164 format ('12'); set default_phone_region to "
                "accept national numbers; sent without it (invalid_phone = drop)",
            )
        ]

    def test_valid_phone_under_drop_warns_nothing(self) -> None:
        """A phone that is sent, or no phone at all, is no warning."""
        for traits in ({"phone": "+16175551333"}, {"email": "a@x.com"}):
            warnings: list[TransformWarning] = []
            transform(
                {"type": "identify", "userId": "u1", "traits": traits},
                destination(invalid_phone="drop"),
                warnings=warnings,
            )
            assert warnings == []


class TestConsent:
    """Subscriptions: list, subscribe/unsubscribe, consent channels per identifiers present."""

    BOTH: dict[str, Any] = {"email": "a@x.com", "phone": "+16175551333"}

    def channels(self, request: KlaviyoRequest) -> dict[str, str]:
        subscriptions = subscribed_profile(request)["attributes"]["subscriptions"]
        return {channel: value["marketing"]["consent"] for channel, value in subscriptions.items()}

    def test_destination_default_consent(self) -> None:
        """Without event consent, the destination's channels are used (default: email)."""
        (job,) = list_requests(identify({"subscribe": True}, **self.BOTH), list_id="L1")
        assert self.channels(job) == {"email": "SUBSCRIBED"}
        (job,) = list_requests(identify({"subscribe": True}, **self.BOTH), list_id="L1", consent=("sms",))
        assert self.channels(job) == {"sms": "SUBSCRIBED"}

    @pytest.mark.parametrize(
        ("consent", "expected"),
        [
            ("sms", {"sms"}),
            (["email", "sms"], {"email", "sms"}),
            (" EMAIL ", {"email"}),
            (["email", "web", "directmail"], {"email"}),
        ],
    )
    def test_event_consent_overrides(self, consent: Any, expected: set[str]) -> None:
        """The event's consent (string or list, any case) replaces the destination's; seed 003's
        channels the current API has not (web, directmail, mobile) are left out."""
        (job,) = list_requests(identify({"subscribe": True, "consent": consent}, **self.BOTH), list_id="L1")
        assert set(self.channels(job)) == expected

    def test_top_level_traits_consent(self) -> None:
        """traits.consent counts as the event's consent."""
        message = identify({"subscribe": True}, consent="sms", **self.BOTH)
        (job,) = list_requests(message, list_id="L1")
        assert set(self.channels(job)) == {"sms"}

    def test_sms_consent_adds_sms(self) -> None:
        """smsConsent true in the event, or the destination's sms_consent, adds sms."""
        (job,) = list_requests(identify({"subscribe": True, "smsConsent": True}, **self.BOTH), list_id="L1")
        assert set(self.channels(job)) == {"email", "sms"}
        (job,) = list_requests(identify({"subscribe": True}, **self.BOTH), list_id="L1", sms_consent=True)
        assert set(self.channels(job)) == {"email", "sms"}

    def test_event_sms_consent_false_overrides_destination(self) -> None:
        """smsConsent false in the event wins over the destination's sms_consent."""
        message = identify({"subscribe": True, "smsConsent": False}, **self.BOTH)
        (job,) = list_requests(message, list_id="L1", sms_consent=True)
        assert set(self.channels(job)) == {"email"}

    def test_channels_only_for_present_identifiers(self) -> None:
        """email and sms consent with only an email: only the email channel, no phone sent."""
        message = identify({"subscribe": True, "consent": ["email", "sms"]}, email="a@x.com")
        (job,) = list_requests(message, list_id="L1")
        assert subscribed_profile(job)["attributes"] == {
            "email": "a@x.com",
            "subscriptions": {"email": {"marketing": {"consent": "SUBSCRIBED"}}},
        }

    def test_no_channel_resolvable(self) -> None:
        """Consent channels matching no identifier: the subscription is refused, naming the channels
        and identifiers; an identify's profile update is still sent."""
        text = error_of(identify({"subscribe": True, "consent": "sms"}, email="a@x.com"), list_id="L1")
        assert text == (
            "No subscriptions could be resolved: consent channels ['sms'] match none of the identifiers "
            f"present (email){PARTLY}"
        )
        text = error_of(identify({"subscribe": True}), list_id="L1")
        assert text.endswith(
            f"consent channels ['email'] match none of the identifiers present (no email or phone){PARTLY}"
        )

    def test_empty_consent_is_list_membership(self) -> None:
        """Subscribe with no consent channel: the profile is added to the list by a bulk import job."""
        (job,) = list_requests(
            identify({"subscribe": True}, email="a@x.com", plan="pro"), list_id="L1", consent=()
        )
        assert job.path == "/api/profile-bulk-import-jobs"
        assert job.kind == "list_add"
        data = job.body["data"]
        assert data["type"] == "profile-bulk-import-job"
        assert data["relationships"] == {"lists": {"data": [{"type": "list", "id": "L1"}]}}
        assert data["attributes"]["profiles"]["data"] == [
            {
                "type": "profile",
                "attributes": {"external_id": "u1", "email": "a@x.com", "properties": {"plan": "pro"}},
            }
        ]

    def test_unsubscribe(self) -> None:
        """subscribe false → delete job with UNSUBSCRIBED, never the Klaviyo profile id."""
        message = identify({"subscribe": False}, **self.BOTH)
        message["context"] = {"externalId": [{"type": "klaviyo-profileId", "id": "01KP"}]}
        (job,) = list_requests(message, list_id="L1", consent=("email", "sms"))
        assert job.path == "/api/profile-subscription-bulk-delete-jobs"
        assert job.kind == "unsubscribe"
        assert job.body["data"]["type"] == "profile-subscription-bulk-delete-job"
        profile = subscribed_profile(job)
        assert "id" not in profile
        assert self.channels(job) == {"email": "UNSUBSCRIBED", "sms": "UNSUBSCRIBED"}

    def test_subscribe_carries_profile_id(self) -> None:
        """A klaviyo-profileId is sent on the subscribe profile."""
        message = identify({"subscribe": True}, email="a@x.com")
        message["context"] = {"externalId": [{"type": "klaviyo-profileId", "id": "01KP"}]}
        (job,) = list_requests(message, list_id="L1")
        assert subscribed_profile(job)["id"] == "01KP"

    @pytest.mark.parametrize(
        ("properties", "list_id"),
        [({"listId": "L2"}, "L1"), ({"subscribe": True}, None), ({}, None)],
        ids=["no subscribe flag", "no list", "nothing"],
    )
    def test_nothing_list_related(self, properties: dict[str, Any], list_id: str | None) -> None:
        """No subscribe flag, or no list anywhere: only the profile upsert."""
        assert list_requests(identify(properties, email="a@x.com"), list_id=list_id) == []

    def test_event_list_overrides_destination(self) -> None:
        """traits.properties.listId beats the destination's list_id."""
        (job,) = list_requests(identify({"subscribe": True, "listId": "L2"}, email="a@x.com"), list_id="L1")
        assert job.body["data"]["relationships"]["list"]["data"]["id"] == "L2"

    def test_group_unsubscribe(self) -> None:
        """group with traits.subscribe false unsubscribes from the groupId list; no profile upsert."""
        message = {
            "type": "group",
            "userId": "u1",
            "groupId": "G1",
            "traits": {"subscribe": False, "email": "a@x.com"},
        }
        produced = requests(message)
        assert [r.path for r in produced] == ["/api/profile-subscription-bulk-delete-jobs"]
        assert produced[0].body["data"]["relationships"]["list"]["data"]["id"] == "G1"


class TestPatchProperties:
    """integrations.Klaviyo fieldsToUnset/Append/Unappend → meta.patch_properties, placed per endpoint."""

    TRAITS: dict[str, Any] = {
        "email": "a@x.com",
        "tags": ["vip"],
        "old_tags": ["new"],
        "plan": "pro",
        "gone": 1,
    }
    OPTIONS: dict[str, Any] = {
        "fieldsToUnset": ["legacy"],
        "fieldsToAppend": ["tags"],
        "fieldsToUnappend": ["old_tags"],
    }
    PATCH: dict[str, Any] = {
        "unset": ["legacy"],
        "append": {"tags": ["vip"]},
        "unappend": {"old_tags": ["new"]},
    }

    def test_identify_meta_beside_attributes(self) -> None:
        """profile-import: data.meta; the named traits are not also sent as properties."""
        message = {
            "type": "identify",
            "userId": "u1",
            "traits": self.TRAITS,
            "integrations": {"Klaviyo": self.OPTIONS},
        }
        data = requests(message)[0].body["data"]
        assert data["meta"] == {"patch_properties": self.PATCH}
        assert data["attributes"]["properties"] == {"plan": "pro", "gone": 1}

    def test_event_meta_inside_profile_attributes(self) -> None:
        """/api/events: meta sits inside profile.data.attributes."""
        message = {
            "event": "E",
            "context": {"traits": self.TRAITS},
            "integrations": {"klaviyo": {"fieldsToUnset": ["legacy"]}},
        }
        profile = event_attributes(message)["profile"]["data"]
        assert profile["attributes"]["meta"] == {"patch_properties": {"unset": ["legacy"]}}
        assert "meta" not in profile

    def test_no_instructions_no_meta(self) -> None:
        """Without integrations.Klaviyo options there is no meta."""
        message = {"type": "identify", "userId": "u1", "integrations": {"All": True, "Klaviyo": True}}
        assert "meta" not in requests(message)[0].body["data"]


class TestReverseEtl:
    """context.mappedToDestination: the first externalId is the user's id and a trait; subscribe defaults on."""

    def message(self, properties: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "identify",
            "userId": "warehouse-row-7",
            "context": {
                "mappedToDestination": "true",
                "externalId": [
                    {"id": "ret@example.com", "identifierType": "email", "type": "KLAVIYO-profile_v2"}
                ],
                "traits": {"firstname": "Ret", "properties": properties},
            },
        }

    def test_external_id_becomes_user_and_trait(self) -> None:
        """userId and the named trait (email) come from externalId[0]; a listed profile subscribes by default."""
        produced = requests(self.message({}), list_id="L1")
        attributes = produced[0].body["data"]["attributes"]
        assert attributes["external_id"] == "ret@example.com"
        assert attributes["email"] == "ret@example.com"
        assert attributes["first_name"] == "Ret"
        assert [r.path for r in produced] == [
            "/api/profile-import",
            "/api/profile-subscription-bulk-create-jobs",
        ]

    def test_explicit_unsubscribe_is_kept(self) -> None:
        """subscribe false stays false."""
        produced = requests(self.message({"subscribe": False}), list_id="L1")
        assert produced[1].path == "/api/profile-subscription-bulk-delete-jobs"

    def test_input_unchanged(self) -> None:
        """The rETL rewrite works on a copy."""
        message = self.message({})
        before = copy.deepcopy(message)
        requests(message, list_id="L1")
        assert message == before


class TestPassthrough:
    """A message RudderStack already transformed ({output, statusCode}) is sent as it is."""

    BODY: dict[str, Any] = {
        "data": {
            "type": "profile-subscription-bulk-create-job",
            "attributes": {"profiles": {"data": [{"type": "profile", "attributes": {"email": "a@x.com"}}]}},
            "relationships": {"list": {"data": {"type": "list", "id": "L1"}}},
        }
    }

    def test_sent_as_it_is(self) -> None:
        """Path, method and body are kept; the kind follows the endpoint."""
        message = {
            "output": {
                "method": "post",
                "endpointPath": "/api/profile-subscription-bulk-create-jobs",
                "body": {"JSON": self.BODY},
            },
            "statusCode": 200,
        }
        (request,) = transform(message, destination(), index=3)
        assert (request.method, request.path, request.body) == (
            "POST",
            "/api/profile-subscription-bulk-create-jobs",
            self.BODY,
        )
        assert request.kind == "subscribe"
        assert request.sources == (3,)

    @pytest.mark.parametrize(
        ("path", "body"),
        [("/api/lists", {"JSON": {}}), ("/api/events", {"JSON": []}), (None, {})],
        ids=["other endpoint", "no JSON object", "no path"],
    )
    def test_unknown_endpoint_rejected(self, path: str | None, body: dict[str, Any]) -> None:
        """A pre-transformed request for another endpoint, or without a JSON body, is rejected naming the path."""
        text = error_of({"output": {"endpointPath": path, "body": body}, "statusCode": 200})
        assert text.startswith(
            f"pre-transformed request for {path!r} is not one the router sends (/api/profile-import, "
        )
        assert text.endswith("or has no JSON body")


def no_track_fallback(tmp_path: Path) -> Path:
    """A user folder whose track.json maps only one named event (so other track calls have no mapping)."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    document = {
        "kind": "event",
        "match": {"type": ["track"], "event": ["Only This"]},
        "metric": {"value": "Only"},
    }
    (folder / "track.json").write_bytes(orjson.dumps(document))
    return folder


TRACK: dict[str, Any] = {"type": "track", "userId": "u1"}
REFUND: dict[str, Any] = {"type": "track", "userId": "u1", "event": "Order Refunded"}
REFUND_OK: dict[str, Any] = {"refund": 1, "order_id": "o1"}
USER = {"mappings_dir": VALID_MAPPINGS}

# (id, message, destination settings, the exact error text). Every TransformError the transform and the
# mapping converters raise; the CLI's own (unreadable lines) are in test_cli_transform.py.
ERRORS: list[tuple[str, Any, dict[str, Any], str]] = [
    ("message not an object", ["track"], {}, "message must be a JSON object, got list"),
    ("type missing", {"userId": "u1"}, {}, "Event type is required"),
    ("type empty", {"type": "", "userId": "u1"}, {}, "Event type is required"),
    ("type unknown", {"type": "purchase", "userId": "u1"}, {}, "Event type purchase is not supported"),
    ("type not text", {"type": 5, "userId": "u1"}, {}, "Event type 5 is not supported"),
    (
        "track without name",
        {**TRACK, "properties": {}},
        {},
        "track call has no event name (looked in event, properties.event, properties.name)",
    ),
    (
        "screen without name",
        {"type": "screen", "userId": "u1"},
        {},
        "screen call has no name (looked in event, name, properties.name)",
    ),
    ("blank event name", {**TRACK, "event": "   "}, {}, "track call has no event name"),
    (
        "event name too long",
        {**TRACK, "event": "x" * (MAX_METRIC_NAME + 1)},
        {},
        "event name is 128 characters; Klaviyo allows at most 127",
    ),
    (
        "group without groupId",
        {"type": "group", "userId": "u1", "traits": {"subscribe": True, "email": "a@x.com"}},
        {},
        "groupId is a required field for group events",
    ),
    (
        "group without subscribe",
        {"type": "group", "userId": "u1", "groupId": "G1"},
        {},
        "group call needs traits.subscribe (true to subscribe, false to unsubscribe)",
    ),
    (
        "subscribe not boolean",
        {"type": "group", "userId": "u1", "groupId": "G1", "traits": {"subscribe": "maybe"}},
        {},
        "traits.subscribe: expected true or false, got 'maybe'",
    ),
    (
        "email not text",
        {**TRACK, "event": "E", "traits": {"email": {"a": 1}}},
        {},
        "traits.email: expected text, got an object",
    ),
    ("event name not text", {**TRACK, "event": ["E"]}, {}, "event: expected text, got a list"),
    (
        "value true/false",
        {**TRACK, "event": "E", "properties": {"revenue": True}},
        {},
        "properties.revenue: expected a number, got true/false",
    ),
    (
        "value not a number",
        {**TRACK, "event": "E", "properties": {"revenue": "abc"}},
        {},
        "properties.revenue: expected a number, got 'abc'",
    ),
    (
        "value an object",
        {**TRACK, "event": "E", "properties": {"total": {"amount": 1}}},
        {},
        'properties.total: expected a number, got {"amount":1}',
    ),
    (
        "value not finite",
        {**TRACK, "event": "E", "properties": {"value": "NaN"}},
        {},
        "properties.value: expected a finite number, got 'NaN'",
    ),
    (
        "time an object",
        {**TRACK, "event": "E", "timestamp": {"a": 1}},
        {},
        "timestamp: expected an ISO 8601 time, got an object",
    ),
    (
        "time not ISO 8601",
        {**TRACK, "event": "E", "originalTimestamp": "yesterday"},
        {},
        "originalTimestamp: 'yesterday' is not an ISO 8601 time",
    ),
    (
        "items not a list",
        {**TRACK, "event": "Product Added", "properties": {"items": "abc"}},
        {},
        "properties.items: expected a list, got str",
    ),
    (
        "item not an object",
        {**TRACK, "event": "Checkout Started", "properties": {"products": [{"sku": "a"}, 7]}},
        {},
        "properties.products[1]: expected an object, got int",
    ),
    (
        "phone national",
        {**TRACK, "event": "E", "properties": {"phone": "9112340375"}},
        {},
        "properties.phone: Phone number is not in E.164 format ('9112340375'); set default_phone_region to accept national numbers",
    ),
    (
        "phone garbage",
        {"type": "identify", "traits": {"phone": "call me"}},
        {"default_phone_region": "US"},
        "traits.phone: Phone number is not in E.164 format ('call me')",
    ),
    (
        "phone kind",
        {"type": "identify", "traits": {"phone": {"n": 1}}},
        {},
        "traits.phone: Phone number is not in E.164 format (an object)",
    ),
    (
        "no identifier",
        {**TRACK, "userId": None, "event": "E"},
        {},
        "no usable identifier: the message has no userId, anonymousId, email or phone",
    ),
    (
        "enforce email",
        {"type": "identify", "userId": "u1"},
        {"enforce_email_as_primary": True},
        "None of email and phone are present in the payload (enforce_email_as_primary needs one of them)",
    ),
    (
        "no consent channel",
        identify({"subscribe": True, "consent": "sms"}, email="a@x.com"),
        {"list_id": "L1"},
        "No subscriptions could be resolved: consent channels ['sms'] match none of the identifiers present (email)"
        + PARTLY,
    ),
    (
        "pre-transformed elsewhere",
        {"statusCode": 200, "output": {"endpointPath": "/api/lists", "body": {"JSON": {}}}},
        {},
        "pre-transformed request for '/api/lists' is not one the router sends (/api/profile-import, /api/events, /api/profile-subscription-bulk-create-jobs, /api/profile-subscription-bulk-delete-jobs, /api/event-bulk-create-jobs, /api/profile-bulk-import-jobs) or has no JSON body",
    ),
    # user mapping directives (cases/mappings/valid/order-refunded.json)
    (
        "required custom text",
        {**REFUND, "properties": {"order_id": "o1"}},
        USER,
        "Order Refunded needs properties.refund",
    ),
    (
        "required true",
        {**REFUND, "properties": {"refund": 1}},
        USER,
        "missing required value 'OrderId' (looked in properties.order_id)",
    ),
    (
        "integer",
        {**REFUND, "properties": {**REFUND_OK, "item_count": 2.5}},
        USER,
        "properties.item_count: expected a whole number, got 2.5",
    ),
    (
        "boolean",
        {**REFUND, "properties": {**REFUND_OK, "restocked": "perhaps"}},
        USER,
        "properties.restocked: expected true or false, got 'perhaps'",
    ),
    (
        "object",
        {**REFUND, "properties": {**REFUND_OK, "store": "Main St"}},
        USER,
        "properties.store: expected an object, got str",
    ),
    (
        "array",
        {**REFUND, "properties": {**REFUND_OK, "reasons": "damaged"}},
        USER,
        "properties.reasons: expected a list, got str",
    ),
    (
        "round4",
        {**REFUND, "properties": {**REFUND_OK, "refund": "Infinity"}},
        USER,
        "properties.refund: expected a finite number, got 'Infinity'",
    ),
    (
        "each element field",
        {**REFUND, "properties": {**REFUND_OK, "lines": [{"sku": "a"}, {"sku": "b", "price": "x"}]}},
        USER,
        "properties.lines[1].price: expected a number, got 'x'",
    ),
    (
        "each element required",
        {**REFUND, "properties": {**REFUND_OK, "lines": [{"price": 1}]}},
        USER,
        "properties.lines[0].every refunded line needs a sku",
    ),
]


class TestErrorTexts:
    """Every error the transform raises names what is wrong and where."""

    @pytest.mark.parametrize(("message", "settings", "text"), [pytest.param(*e[1:], id=e[0]) for e in ERRORS])
    def test_error_text(self, message: Any, settings: dict[str, Any], text: str) -> None:
        """The exact text; rejected inputs carry status 400."""
        with pytest.raises(TransformError) as caught:
            requests(message, **settings)
        assert caught.value.message == text
        assert caught.value.status == 400

    def test_no_mapping_for_type(self, tmp_path: Path) -> None:
        """A user track.json without a fallback leaves other track calls unmapped, and says so."""
        text = error_of({**TRACK, "event": "Something Else"}, mappings_dir=no_track_fallback(tmp_path))
        assert text == "no mapping for track calls"


class TestPurity:
    """The transform never changes its input."""

    @pytest.mark.parametrize(
        "message",
        [pytest.param(e[1], id=e[0]) for e in ERRORS if isinstance(e[1], dict) and e[2] is not USER]
        + [
            pytest.param(TestPatchProperties.TRAITS, id="traits only"),
            pytest.param(
                {
                    "type": "track",
                    "event": "Product Added",
                    "userId": "u1",
                    "properties": {"items": [{"sku": "s"}], "x": {"y": 1}},
                },
                id="ecommerce",
            ),
        ],
    )
    def test_input_unchanged(self, message: dict[str, Any]) -> None:
        """Deep copy before, compare after, whether the transform succeeds or not."""
        before = copy.deepcopy(message)
        with contextlib.suppress(TransformError, Skipped):
            requests(message, flatten_properties=True, list_id="L1")
        assert message == before

    def test_conformance_inputs_unchanged(self) -> None:
        """Every conformance input message, with its case's destination, is left as it was."""
        if not CONFORMANCE.exists():
            pytest.skip(f"{CONFORMANCE} is not present (../shared is not checked out)")
        for case in orjson.loads(CONFORMANCE.read_bytes()):
            dest = Destination.from_mapping(case["destination_config"])
            for entry in case["input"]:
                message = entry["message"]
                before = copy.deepcopy(message)
                with contextlib.suppress(TransformError, Skipped):
                    transform(message, dest)
                assert message == before, case["name"]

    @pytest.mark.parametrize(
        "store", [{"name": "Main St"}, "Main St", None], ids=["object", "text", "absent"]
    )
    def test_nested_target_under_a_copied_object(self, tmp_path: Path, store: Any) -> None:
        """A field written inside another field's object value never writes into the message's object."""
        folder = tmp_path / "mappings"
        folder.mkdir()
        document = {
            "kind": "event",
            "match": {"type": ["track"], "event": ["Store Visited"]},
            "metric": {"value": "Visited Store"},
            "properties": {
                "fields": {
                    "Store": "properties.store",
                    "Store.latitude": {"from": "properties.lat", "type": "round4"},
                }
            },
        }
        (folder / "store.json").write_bytes(orjson.dumps(document))
        message = {
            "type": "track",
            "event": "Store Visited",
            "userId": "u1",
            "properties": {"store": store, "lat": 1.234567},
        }
        before = copy.deepcopy(message)
        properties = one(message, mappings_dir=folder)["data"]["attributes"]["properties"]
        expected = {**store, "latitude": 1.2346} if isinstance(store, dict) else {"latitude": 1.2346}
        assert properties == {"Store": expected}
        assert message == before


def user_folder(tmp_path: Path) -> Path:
    """A user mappings folder: a new Order Completed → Placed Order file and an Added to Cart override."""
    folder = tmp_path / "my-mappings"
    folder.mkdir()
    for name in ("order-completed.json", "added-to-cart.json"):
        shutil.copy(VALID_MAPPINGS / name, folder / name)
    return folder


ORDER: dict[str, Any] = {
    "type": "track",
    "event": "Order Completed",
    "userId": "u1",
    "messageId": "m-1",
    "properties": {
        "order_id": "A-1001",
        "revenue": 30.5,
        "tax": 2.1,
        "affiliation": "web",
        "products": [{"product_id": "p1", "quantity": "2", "price": "10.25", "url": "https://x.example/p1"}],
    },
}
ADDED: dict[str, Any] = {
    "type": "track",
    "event": "Product Added",
    "userId": "u1",
    "properties": {
        "price": 5,
        "items": [{"sku": "s1", "price": 5, "url": "https://x.example/s1", "row_total": 10}],
    },
}


class TestUserMappingFolder:
    """A user mappings folder changes the output with no code change, through Destination and the CLI."""

    def test_builtin_output(self) -> None:
        """Without the folder: Order Completed keeps its name, items use the seed's Price/URL."""
        order = one(ORDER)["data"]["attributes"]
        assert order["metric"]["data"]["attributes"]["name"] == "Order Completed"
        assert order["properties"]["products"] == ORDER["properties"]["products"]
        added = one(ADDED)["data"]["attributes"]["properties"]
        assert added["Items"] == [{"SKU": "s1", "Price": 5, "URL": "https://x.example/s1", "RowTotal": 10}]

    def test_destination_mappings_dir(self, tmp_path: Path) -> None:
        """With the folder: Placed Order with its property table; Added to Cart items use ItemPrice/ProductURL."""
        folder = user_folder(tmp_path)
        order = one(ORDER, mappings_dir=folder)["data"]["attributes"]
        assert order["metric"]["data"]["attributes"]["name"] == "Placed Order"
        assert order["unique_id"] == "A-1001"
        assert order["value"] == 30.5
        assert order["properties"] == {
            "affiliation": "web",
            "$event_id": "A-1001",
            "OrderId": "A-1001",
            "DiscountValue": 0,
            "Items": [
                {"ProductID": "p1", "Quantity": 2, "ItemPrice": 10.25, "ProductURL": "https://x.example/p1"}
            ],
        }
        added = one(ADDED, mappings_dir=folder)["data"]["attributes"]["properties"]
        assert added["Items"] == [
            {"SKU": "s1", "ItemPrice": 5, "ProductURL": "https://x.example/s1", "RowTotal": 10}
        ]
        assert added["AddedItemPrice"] == 5

    def test_cli_mappings_dir(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``klaviyo-router transform --mappings-dir`` prints the same requests."""
        folder = user_folder(tmp_path)
        config = tmp_path / "destination.json"
        config.write_bytes(orjson.dumps({"privateApiKey": KEY, "apiVersion": "v2"}))
        events = tmp_path / "events.ndjson"
        events.write_bytes(orjson.dumps(ORDER) + b"\n" + orjson.dumps(ADDED) + b"\n")
        assert (
            main(["transform", "--destination", str(config), "--mappings-dir", str(folder), str(events)]) == 0
        )
        out, err = capsys.readouterr()
        lines = [orjson.loads(line) for line in out.splitlines()]
        assert err == ""
        assert [
            line["body"]["data"]["attributes"]["metric"]["data"]["attributes"]["name"] for line in lines
        ] == [
            "Placed Order",
            "Added to Cart",
        ]
        assert lines[0]["body"] == one(ORDER, mappings_dir=folder)
        assert lines[1]["body"]["data"]["attributes"]["properties"]["Items"][0]["ItemPrice"] == 5
        assert KEY not in out


class TestProfileSourcesByCall:
    """Which sources a profile attribute is read from depends on the call (``call_sources`` of
    ``profile.json``): a page's or a product's properties are not the person's."""

    SEED_PAGE: dict[str, Any] = load_case(CASES / "transform" / "seed-page-as-track.json")["message"]

    def test_page_title_is_not_the_persons(self) -> None:
        """Seed 003's page (title 'test_item') says nothing of the person: no title, no location."""
        page = {**self.SEED_PAGE, "properties": {**self.SEED_PAGE["properties"], "city": "Paris"}}
        body = one(page, send_page_as_track=True, additional_page_info=True)
        assert body["data"]["attributes"]["profile"]["data"]["attributes"] == {"anonymous_id": "anon-seed-3"}
        assert body["data"]["attributes"]["properties"]["title"] == "test_item"

    def test_page_properties_identify_nobody(self) -> None:
        """Not even an email in a page's properties is taken for the person's."""
        page = {"type": "page", "name": "Home", "userId": "u1", "properties": {"email": "page@x.com"}}
        attributes = one(page, send_page_as_track=True)["data"]["attributes"]["profile"]["data"]["attributes"]
        assert attributes == {"external_id": "u1"}

    @pytest.mark.parametrize("call", ["track", "screen"])
    def test_product_properties_are_not_the_persons(self, call: str) -> None:
        """A product's title, image and a store's city stay event properties; the person's traits still apply."""
        message = {
            "type": call,
            "event": "Product Viewed",
            "name": "Product Viewed",
            "userId": "u1",
            "properties": {
                "title": "Blue Shoe",
                "image": "https://shop/shoe.png",
                "city": "Lyon",
                "organization": "Acme",
            },
            "context": {"traits": {"title": "Owner"}},
        }
        attributes = one(message)["data"]["attributes"]
        assert attributes["profile"]["data"]["attributes"] == {"external_id": "u1", "title": "Owner"}

    def test_track_properties_still_identify(self) -> None:
        """A track's properties.email and .phone still name the person (RudderStack does the same)."""
        attributes = event_attributes(
            {"event": "Order Completed", "properties": {"email": "b@x.com", "phone": "+16175551333"}}
        )
        assert attributes["profile"]["data"]["attributes"] == {
            "external_id": "u1",
            "email": "b@x.com",
            "phone_number": "+16175551333",
        }

    def test_identify_reads_every_source(self) -> None:
        """Calls without a rule (identify) read every source of the field, properties included."""
        attributes = profile_attributes({"userId": "u1", "properties": {"title": "Dr"}})
        assert attributes["title"] == "Dr"

    def test_rule_naming_an_unknown_field(self, tmp_path: Path) -> None:
        """A rule's 'only' must name fields of the file: the error gives the file and pointer."""
        document = orjson.loads((KLAVIYO_DIR / "profile.json").read_bytes())
        document["call_sources"][0]["only"] = ["email", "emial"]
        (tmp_path / "profile.json").write_bytes(orjson.dumps(document))
        with pytest.raises(
            MappingError, match=r"profile\.json: at /call_sources/0/only: 'emial' is not a field of /fields"
        ):
            load_mappings(tmp_path)

    @pytest.mark.parametrize(
        ("rules", "error"),
        [
            (
                [{"calls": ["purchase"], "under": "properties", "only": []}],
                r"profile\.json: at /call_sources/0/calls/0: 'purchase' is not one of",
            ),
            (
                [
                    {"calls": ["page"], "under": "properties", "only": []},
                    {"calls": ["track", "page"], "under": "context", "only": []},
                ],
                r"profile\.json: at /call_sources/1/calls: 'page' has a rule already",
            ),
        ],
    )
    def test_bad_rules(self, tmp_path: Path, rules: list[dict[str, Any]], error: str) -> None:
        """Unknown call types and a call with two rules are refused, naming file and pointer."""
        document = orjson.loads((KLAVIYO_DIR / "profile.json").read_bytes())
        (tmp_path / "profile.json").write_bytes(orjson.dumps({**document, "call_sources": rules}))
        with pytest.raises(MappingError, match=error):
            load_mappings(tmp_path)


class TestConsentChannels:
    """Consent channels are checked at config load and in events (seed 003 lists email, web, sms,
    directmail, mobile; Klaviyo's current API subscribes email and sms)."""

    @pytest.mark.parametrize(
        ("consent", "text"),
        [
            (
                ["emial"],
                "unknown consent channel 'emial' (Klaviyo's current API subscribes 'email' and 'sms')",
            ),
            (
                "web",
                "consent channel 'web' was a value of Klaviyo's retired v1/v2 API; the current API subscribes only 'email' and 'sms'",
            ),
            (["email", "mobile"], "consent channel 'mobile' was a value"),
        ],
    )
    def test_config_refuses_channels(self, consent: Any, text: str) -> None:
        """A destination's consent naming anything but email/sms stops loading, saying why."""
        for key in ("consent",):
            with pytest.raises(ConfigError) as caught:
                Destination.from_mapping({"privateApiKey": KEY, key: consent}, where="destinations[0]")
            assert caught.value.message.startswith(f"destinations[0].{key}: {text}")

    def test_unknown_event_channel_keeps_the_profile_update(self) -> None:
        """subscribe false with a misspelt channel: the profile update is sent, the unsubscription is
        refused naming the channel (the message then waits as a dead letter)."""
        message = identify({"subscribe": False, "consent": ["emial"]}, email="a@x.com", firstName="Ada")
        with pytest.raises(PartlyRefused) as caught:
            requests(message, list_id="L1")
        assert caught.value.message == (
            "consent: unknown consent channel 'emial' (Klaviyo's current API subscribes 'email' and 'sms')"
            + PARTLY
        )
        (profile,) = caught.value.requests
        assert profile.path == "/api/profile-import"
        assert profile.body["data"]["attributes"]["first_name"] == "Ada"

    def test_unknown_channel_subscribing_is_not_a_plain_list_add(self) -> None:
        """subscribe true with only an unknown channel is refused, not turned into membership without consent."""
        with pytest.raises(PartlyRefused, match="unknown consent channel 'emial'"):
            requests(identify({"subscribe": True, "consent": "emial"}, email="a@x.com"), list_id="L1")

    def test_group_with_unknown_channel_is_refused(self) -> None:
        """A group call has no profile update to keep: the whole message is refused."""
        message = {
            "type": "group",
            "groupId": "L1",
            "userId": "u1",
            "traits": {"subscribe": True, "consent": "smss", "email": "a@x.com"},
        }
        text = error_of(message)
        assert (
            text
            == "consent: unknown consent channel 'smss' (Klaviyo's current API subscribes 'email' and 'sms')"
        )

    def test_legacy_event_channel_is_a_warning(self) -> None:
        """'web' in an event is left out with a warning; email still subscribes."""
        warnings: list[TransformWarning] = []
        message = identify({"subscribe": True, "consent": ["email", "web"]}, email="a@x.com")
        produced = transform(message, destination(list_id="L1"), warnings=warnings)
        assert set(subscribed_profile(produced[1])["attributes"]["subscriptions"]) == {"email"}
        assert [w.code for w in warnings] == ["consent_channel_ignored"]
        assert "'web' was a value of Klaviyo's retired v1/v2 API" in warnings[0].message

    def test_channel_not_text(self) -> None:
        """A consent entry that is not text is named by its type."""
        text = error_of(
            {
                "type": "group",
                "groupId": "L1",
                "userId": "u1",
                "traits": {"subscribe": True, "consent": [1], "email": "a@x.com"},
            }
        )
        assert text == "consent: expected channel names (email, sms), got int"


class TestIntegrations:
    """``integrations`` keeps a message from a destination as RudderStack and Segment do: recorded as skipped."""

    @pytest.mark.parametrize(
        ("integrations", "reason"),
        [
            ({"Klaviyo": False}, "integrations: 'Klaviyo' is false"),
            ({"KLAVIYO": False, "All": True}, "integrations: 'KLAVIYO' is false"),
            ({"klaviyo-eu": False, "Klaviyo": True}, "integrations: 'klaviyo-eu' is false"),
            (
                {"All": False},
                'integrations: "All" is false and neither "Klaviyo" nor \'klaviyo-eu\' is turned on',
            ),
            (
                {"All": False, "Klaviyo": None},
                'integrations: "All" is false and neither "Klaviyo" nor \'klaviyo-eu\' is turned on',
            ),
        ],
    )
    def test_skipped(self, integrations: dict[str, Any], reason: str) -> None:
        """The skip names the key that turned this destination off."""
        message = {**TRACK, "event": "E", "integrations": integrations}
        with pytest.raises(Skipped) as skipped:
            transform(message, destination(name="klaviyo-eu"))
        assert skipped.value.message == reason

    @pytest.mark.parametrize(
        "integrations",
        [
            {"All": True},
            {"All": False, "Klaviyo": True},
            {"All": False, "klaviyo": {"fieldsToUnset": ["a"]}},
            {"All": False, "Klaviyo": False, "klaviyo-eu": True},
            {"Klaviyo": False, "klaviyo-us": True, "klaviyo-eu": True},
            {"Mixpanel": False},
            {},
            None,
            "All",
        ],
    )
    def test_sent(self, integrations: Any) -> None:
        """Turned on by name, by 'Klaviyo', by options, or not addressed at all."""
        assert requests({**TRACK, "event": "E", "integrations": integrations}, name="klaviyo-eu")

    def test_every_type_is_skipped(self) -> None:
        """identify and group calls are kept from the destination too (no profile, no list job)."""
        for message in (
            identify({"subscribe": True}, email="a@x.com"),
            {"type": "group", "groupId": "L", "userId": "u"},
        ):
            with pytest.raises(Skipped):
                transform({**message, "integrations": {"All": False}}, destination(list_id="L1"))


class TestListWithoutSubscribeFlag:
    """An identify with a list id but no subscribe flag (the README's List Id rule)."""

    def test_built_in_does_nothing_with_the_list(self) -> None:
        """Built-in: the profile is upserted; no list job (RudderStack's behaviour, conformance case
        klaviyo-identify-150624-test-3), whether the list comes from the event or the destination."""
        for message, settings in (
            (identify({"listId": "XUepkK"}, email="a@x.com"), {}),
            (identify({}, email="a@x.com"), {"list_id": "L1"}),
        ):
            assert [r.path for r in requests(message, **settings)] == ["/api/profile-import"]

    def test_add_adds_to_the_list(self, tmp_path: Path) -> None:
        """A user file with when_subscribe_absent 'add' adds the profile to the event's list, else the
        destination's, without consent: a bulk import with the list, as seed 003's List Id describes."""
        document = orjson.loads((KLAVIYO_DIR / "identify-subscription.json").read_bytes())
        (tmp_path / "identify-subscription.json").write_bytes(
            orjson.dumps({**document, "when_subscribe_absent": "add"})
        )
        for message, expected in (
            (identify({"listId": "XUepkK"}, email="a@x.com"), "XUepkK"),
            (identify({}, email="a@x.com"), "L1"),
        ):
            produced = requests(message, list_id="L1", mappings_dir=tmp_path)
            assert [r.path for r in produced] == ["/api/profile-import", "/api/profile-bulk-import-jobs"]
            data = produced[1].body["data"]
            assert data["relationships"]["lists"]["data"] == [{"type": "list", "id": expected}]
            assert "subscriptions" not in data["attributes"]["profiles"]["data"][0]["attributes"]
        assert [
            r.path
            for r in requests(
                identify({"subscribe": True}, email="a@x.com"), list_id="L1", mappings_dir=tmp_path
            )
        ] == [
            "/api/profile-import",
            "/api/profile-subscription-bulk-create-jobs",
        ]
