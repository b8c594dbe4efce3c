"""The trimmed Klaviyo spec: endpoints, limits and request-body validation."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import fastjsonschema
import pytest
from jsonschema import Draft202012Validator

from router.klaviyo import spec
from router.klaviyo.spec import ENDPOINTS, endpoint_by_operation, endpoint_for, validate_body

REPO_ROOT = Path(__file__).resolve().parent.parent
OPENAPI = REPO_ROOT.parent / "shared" / "klaviyo" / "openapi.json"

# Example bodies from reference/klaviyo-api.md.
CREATE_EVENT: dict[str, Any] = {
    "data": {
        "type": "event",
        "attributes": {
            "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
            "profile": {
                "data": {
                    "type": "profile",
                    "attributes": {"email": "sarah.mason@example.com", "external_id": "cust-42"},
                }
            },
            "properties": {"OrderId": "1001", "Items": ["SKU1", "SKU2"]},
            "time": "2026-07-20T12:00:00Z",
            "value": 49.95,
            "value_currency": "USD",
            "unique_id": "order-1001",
        },
    }
}
BULK_EVENTS: dict[str, Any] = {
    "data": {
        "type": "event-bulk-create-job",
        "attributes": {
            "events-bulk-create": {
                "data": [
                    {
                        "type": "event-bulk-create",
                        "attributes": {
                            "profile": {
                                "data": {"type": "profile", "attributes": {"email": "a@example.com"}}
                            },
                            "events": {
                                "data": [
                                    {
                                        "type": "event",
                                        "attributes": {
                                            "metric": {
                                                "data": {
                                                    "type": "metric",
                                                    "attributes": {"name": "Viewed Product"},
                                                }
                                            },
                                            "properties": {"sku": "SKU1"},
                                            "time": "2026-07-20T12:00:00Z",
                                            "unique_id": "v-1",
                                        },
                                    }
                                ]
                            },
                        },
                    }
                ]
            }
        },
    }
}
PROFILE_IMPORT: dict[str, Any] = {
    "data": {
        "type": "profile",
        "attributes": {
            "email": "sarah.mason@example.com",
            "phone_number": "+15005550006",
            "external_id": "cust-42",
            "first_name": "Sarah",
            "last_name": "Mason",
            "location": {
                "city": "Boston",
                "country": "United States",
                "zip": "02110",
                "timezone": "America/New_York",
            },
            "properties": {"tier": "gold"},
        },
        "meta": {"patch_properties": {"append": {"skus": "92538"}}},
    }
}
BULK_IMPORT: dict[str, Any] = {
    "data": {
        "type": "profile-bulk-import-job",
        "attributes": {
            "profiles": {
                "data": [
                    {
                        "type": "profile",
                        "attributes": {"email": "a@example.com", "properties": {"tier": "gold"}},
                    },
                    {
                        "type": "profile",
                        "attributes": {"phone_number": "+15005550006", "external_id": "cust-43"},
                    },
                ]
            }
        },
        "relationships": {"lists": {"data": [{"type": "list", "id": "Y6nRLr"}]}},
    }
}
SUBSCRIBE: dict[str, Any] = {
    "data": {
        "type": "profile-subscription-bulk-create-job",
        "attributes": {
            "custom_source": "checkout",
            "historical_import": True,
            "profiles": {
                "data": [
                    {
                        "type": "profile",
                        "attributes": {
                            "email": "a@example.com",
                            "phone_number": "+15005550006",
                            "subscriptions": {
                                "email": {
                                    "marketing": {
                                        "consent": "SUBSCRIBED",
                                        "consented_at": "2025-01-02T10:00:00Z",
                                    }
                                },
                                "sms": {
                                    "marketing": {
                                        "consent": "SUBSCRIBED",
                                        "consented_at": "2025-01-02T10:00:00Z",
                                    }
                                },
                            },
                        },
                    }
                ]
            },
        },
        "relationships": {"list": {"data": {"type": "list", "id": "Y6nRLr"}}},
    }
}
UNSUBSCRIBE: dict[str, Any] = {
    "data": {
        "type": "profile-subscription-bulk-delete-job",
        "attributes": {
            "profiles": {
                "data": [
                    {
                        "type": "profile",
                        "attributes": {
                            "email": "a@example.com",
                            "subscriptions": {"email": {"marketing": {"consent": "UNSUBSCRIBED"}}},
                        },
                    }
                ]
            }
        },
        "relationships": {"list": {"data": {"type": "list", "id": "Y6nRLr"}}},
    }
}
CREATE_LIST: dict[str, Any] = {
    "data": {"type": "list", "attributes": {"name": "Newsletter", "opt_in_process": "double_opt_in"}}
}
LIST_MEMBERS: dict[str, Any] = {
    "data": [
        {"type": "profile", "id": "01GDDKASAP8TKDDA2GRZDSVP4H"},
        {"type": "profile", "id": "01GDDKASAP8TKDDA2GRZDSVP4J"},
    ]
}

VALID_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("create_event", CREATE_EVENT),
    ("bulk_create_events", BULK_EVENTS),
    ("create_or_update_profile", PROFILE_IMPORT),
    ("bulk_import_profiles", BULK_IMPORT),
    ("bulk_subscribe_profiles", SUBSCRIBE),
    ("bulk_unsubscribe_profiles", UNSUBSCRIBE),
    ("create_list", CREATE_LIST),
    ("add_profiles_to_list", LIST_MEMBERS),
    ("remove_profiles_from_list", LIST_MEMBERS),
]


@pytest.mark.parametrize(("operation_id", "body"), VALID_BODIES, ids=[case[0] for case in VALID_BODIES])
def test_documented_examples_validate(operation_id: str, body: dict[str, Any]) -> None:
    assert validate_body(endpoint_by_operation(operation_id), body) == []


def _broken(
    body: dict[str, Any], path: list[str | int], value: object = None, *, delete: bool = False
) -> object:
    broken = copy.deepcopy(body)
    node: Any = broken
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return broken


BROKEN: list[tuple[str, object, str, str]] = [
    (
        "create_event",
        _broken(CREATE_EVENT, ["data", "attributes", "metric", "data", "attributes", "name"], delete=True),
        "/data/attributes/metric/data/attributes",
        "'name' is a required property",
    ),
    (
        "create_event",
        _broken(CREATE_EVENT, ["data", "attributes", "value"], "lots"),
        "/data/attributes/value",
        "'lots' is not of type 'number', 'null'",
    ),
    (
        "create_event",
        _broken(CREATE_EVENT, ["data", "attributes", "time"], "yesterday"),
        "/data/attributes/time",
        "'yesterday' is not a 'date-time'",
    ),
    (
        "create_event",
        _broken(CREATE_EVENT, ["data", "type"], "events"),
        "/data/type",
        "'events' is not one of ['event']",
    ),
    (
        "bulk_create_events",
        _broken(
            BULK_EVENTS,
            [
                "data",
                "attributes",
                "events-bulk-create",
                "data",
                0,
                "attributes",
                "events",
                "data",
                0,
                "attributes",
            ],
            {"properties": {}},
        ),
        "/data/attributes/events-bulk-create/data/0/attributes/events/data/0/attributes",
        "'metric' is a required property",
    ),
    (
        "create_or_update_profile",
        _broken(PROFILE_IMPORT, ["data", "attributes", "email"], 42),
        "/data/attributes/email",
        "42 is not of type 'string', 'null'",
    ),
    (
        "bulk_subscribe_profiles",
        _broken(
            SUBSCRIBE,
            [
                "data",
                "attributes",
                "profiles",
                "data",
                0,
                "attributes",
                "subscriptions",
                "email",
                "marketing",
                "consent",
            ],
            "YES",
        ),
        "/data/attributes/profiles/data/0/attributes/subscriptions/email/marketing/consent",
        "'YES' is not one of ['SUBSCRIBED']",
    ),
    (
        "create_list",
        _broken(CREATE_LIST, ["data", "attributes", "opt_in_process"], "triple_opt_in"),
        "/data/attributes/opt_in_process",
        "'triple_opt_in' is not one of ['double_opt_in', 'single_opt_in', None]",
    ),
    (
        "add_profiles_to_list",
        {"data": [{"type": "profile"}]},
        "/data/0",
        "'id' is a required property",
    ),
    ("create_event", {}, "/", "'data' is a required property"),
]


@pytest.mark.parametrize(("operation_id", "body", "pointer", "message"), BROKEN)
def test_broken_bodies_name_the_pointer(operation_id: str, body: object, pointer: str, message: str) -> None:
    errors = validate_body(endpoint_by_operation(operation_id), body)
    assert f"{pointer}: {message}" in errors


def test_body_errors_are_structured() -> None:
    body = _broken(CREATE_EVENT, ["data", "attributes", "profile", "data", "attributes", "phone_number"], 1)
    (error,) = spec.body_errors(endpoint_by_operation("create_event"), body)
    assert error.pointer == "/data/attributes/profile/data/attributes/phone_number"
    assert "is not of type" in error.message


def test_nullable_fields_accept_null() -> None:
    body = _broken(PROFILE_IMPORT, ["data", "attributes", "first_name"], None)
    assert validate_body(endpoint_by_operation("create_or_update_profile"), body) == []


def test_get_operations_take_no_body() -> None:
    endpoint = endpoint_by_operation("get_lists")
    assert validate_body(endpoint, None) == []
    assert validate_body(endpoint, {"data": {}}) == ["/: get_lists takes no request body"]


@pytest.mark.parametrize(
    ("method", "path", "operation_id"),
    [
        ("POST", "/api/events", "create_event"),
        ("post", "/api/events/", "create_event"),
        ("POST", "/api/event-bulk-create-jobs", "bulk_create_events"),
        ("POST", "/api/profile-import", "create_or_update_profile"),
        ("POST", "/api/profile-bulk-import-jobs", "bulk_import_profiles"),
        ("GET", "/api/profile-bulk-import-jobs/01JOB", "get_bulk_import_profiles_job"),
        (
            "GET",
            "/api/profile-bulk-import-jobs/01JOB/import-errors",
            "get_errors_for_bulk_import_profiles_job",
        ),
        ("POST", "/api/profile-subscription-bulk-create-jobs", "bulk_subscribe_profiles"),
        ("POST", "/api/profile-subscription-bulk-delete-jobs", "bulk_unsubscribe_profiles"),
        ("GET", "/api/lists", "get_lists"),
        ("GET", "/api/lists?page[cursor]=abc", "get_lists"),
        ("POST", "/api/lists", "create_list"),
        ("GET", "/api/lists/Xy12", "get_list"),
        ("POST", "/api/lists/Xy12/relationships/profiles", "add_profiles_to_list"),
        ("DELETE", "/api/lists/Xy12/relationships/profiles", "remove_profiles_from_list"),
        ("GET", "/api/lists/Xy12/relationships/profiles", "get_profile_ids_for_list"),
    ],
)
def test_endpoint_for_matches_templates(method: str, path: str, operation_id: str) -> None:
    assert endpoint_for(method, path).operation_id == operation_id


def test_match_path_returns_parameters() -> None:
    endpoint, params = spec.match_path("GET", "/api/lists/Xy12/relationships/profiles")
    assert endpoint.path_template == "/api/lists/{id}/relationships/profiles"
    assert params == {"id": "Xy12"}


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "/api/nope", "no Klaviyo endpoint matches GET /api/nope"),
        ("PUT", "/api/lists", "method PUT is not supported on /api/lists"),
        ("POST", "/api/lists/a/b", "no Klaviyo endpoint matches POST /api/lists/a/b"),
    ],
)
def test_endpoint_for_unknown(method: str, path: str, message: str) -> None:
    with pytest.raises(KeyError, match=message):
        endpoint_for(method, path)


@pytest.mark.parametrize(
    ("operation_id", "burst", "steady", "daily", "max_items"),
    [
        ("create_event", 350, 3500, None, None),
        ("bulk_create_events", 10, 150, None, 1000),
        ("create_or_update_profile", 75, 750, None, None),
        ("bulk_import_profiles", 10, 150, None, 10000),
        ("get_bulk_import_profiles_job", 10, 150, None, None),
        ("get_errors_for_bulk_import_profiles_job", 10, 150, None, None),
        ("bulk_subscribe_profiles", 75, 750, None, 1000),
        ("bulk_unsubscribe_profiles", 75, 750, None, 100),
        ("get_lists", 75, 750, None, None),
        ("create_list", 10, 150, 150, None),
        ("get_list", 75, 750, None, None),
        ("add_profiles_to_list", 10, 150, None, 1000),
        ("remove_profiles_from_list", 10, 150, None, 1000),
        ("get_profile_ids_for_list", 75, 750, None, None),
    ],
)
def test_limits_match_documentation(
    operation_id: str, burst: int, steady: int, daily: int | None, max_items: int | None
) -> None:
    endpoint = endpoint_by_operation(operation_id)
    assert (endpoint.burst_per_second, endpoint.steady_per_minute) == (burst, steady)
    assert endpoint.daily == daily
    assert endpoint.max_items == max_items


def test_spec_metadata() -> None:
    assert spec.SPEC_REVISION == "2026-07-15"
    assert len(ENDPOINTS) == 19
    assert endpoint_by_operation("get_lists").page_size_max == 10
    assert endpoint_by_operation("get_profile_ids_for_list").page_size_max == 100
    assert endpoint_by_operation("create_or_update_profile").success_statuses == (200, 201)
    assert endpoint_by_operation("create_event").content_type == "application/vnd.api+json"
    assert endpoint_by_operation("create_or_update_profile").max_body_bytes == 100 * 1024
    with pytest.raises(KeyError, match="unknown Klaviyo operation"):
        endpoint_by_operation("create_profile")


def test_item_pointers_count_nested_events() -> None:
    body = copy.deepcopy(BULK_EVENTS)
    entries = body["data"]["attributes"]["events-bulk-create"]["data"]
    entries.append(copy.deepcopy(entries[0]))
    entries[1]["attributes"]["events"]["data"] *= 2
    endpoint = endpoint_by_operation("bulk_create_events")
    assert spec.item_pointers(endpoint, body) == [
        "/data/attributes/events-bulk-create/data/0/attributes/events/data/0",
        "/data/attributes/events-bulk-create/data/1/attributes/events/data/0",
        "/data/attributes/events-bulk-create/data/1/attributes/events/data/1",
    ]
    assert spec.count_items(endpoint, body) == 3
    assert spec.count_items(endpoint_by_operation("add_profiles_to_list"), LIST_MEMBERS) == 2
    assert spec.count_items(endpoint_by_operation("create_event"), CREATE_EVENT) == 0


@pytest.mark.skipif(
    not OPENAPI.exists(), reason="Klaviyo's OpenAPI document is not checked out beside the repo"
)
def test_spec_json_is_up_to_date(tmp_path: Path) -> None:
    output = tmp_path / "spec.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "trim_openapi.py"),
            str(OPENAPI),
            "--output",
            str(output),
        ],
        check=True,
        capture_output=True,
    )
    packaged = REPO_ROOT / "router" / "klaviyo" / "spec.json"
    assert output.read_text(encoding="utf-8") == packaged.read_text(encoding="utf-8"), (
        "router/klaviyo/spec.json is stale: run scripts/trim_openapi.py"
    )


def _load_trim_script() -> ModuleType:
    module_spec = importlib.util.spec_from_file_location(
        "trim_openapi", REPO_ROOT / "scripts" / "trim_openapi.py"
    )
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_trim_keeps_recursive_refs_in_defs_and_converts_nullable() -> None:
    trim = _load_trim_script()
    schemas = {
        "Node": {
            "type": "object",
            "description": "dropped",
            "properties": {
                "child": {"$ref": "#/components/schemas/Node", "nullable": True},
                "leaf": {"$ref": "#/components/schemas/Leaf"},
            },
        },
        "Leaf": {"type": "string", "enum": ["a"], "nullable": True, "example": "a"},
    }
    converter = trim.Converter(schemas, trim.cyclic_names(schemas, ["Node"]))
    document = converter.document({"$ref": "#/components/schemas/Node"})
    assert document["$ref"] == "#/$defs/Node"
    node = document["$defs"]["Node"]
    assert node["properties"]["child"] == {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}
    assert node["properties"]["leaf"] == {"type": ["string", "null"], "enum": ["a", None]}
    assert "description" not in node
    validator = Draft202012Validator(document)
    assert validator.is_valid({"child": {"child": None, "leaf": None}})
    assert not validator.is_valid({"child": {"child": {"leaf": "b"}}})


def test_one_of_plain_types_is_folded_and_other_one_of_kept() -> None:
    folded = spec.fold_one_of(
        {
            "properties": {
                "lat": {"oneOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]},
                "unset": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                "overlapping": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
                "shared": {"oneOf": [{"type": "string", "enum": ["a"]}, {"type": "null"}]},
            }
        }
    )["properties"]
    assert folded["lat"] == {"type": ["string", "number", "null"]}
    assert folded["unset"] == {"type": ["string", "array"], "items": {"type": "string"}}
    assert "oneOf" in folded["overlapping"] and "oneOf" in folded["shared"]


LATITUDE = "latitude"
UNSET = "unset"


@pytest.mark.parametrize(
    ("path", "value", "valid"),
    [
        (LATITUDE, "42.36", True),
        (LATITUDE, 42.36, True),
        (LATITUDE, None, True),
        (LATITUDE, True, False),
        (LATITUDE, {"deg": 42}, False),
        (LATITUDE, [42.36], False),
        (UNSET, "tier", True),
        (UNSET, ["tier", "score"], True),
        (UNSET, [1], False),
        (UNSET, 1, False),
    ],
)
def test_the_compiled_check_of_a_folded_schema_judges_as_jsonschema_does(
    path: str, value: object, valid: bool
) -> None:
    """The fake's quick check (folded ``oneOf``) passes and refuses exactly what the full validator does."""
    endpoint = endpoint_by_operation("bulk_import_profiles")
    profile: dict[str, Any] = {"type": "profile", "attributes": {"email": "a@example.com"}}
    if path == LATITUDE:
        profile["attributes"]["location"] = {"latitude": value}
    else:
        profile["meta"] = {"patch_properties": {"unset": value}}
    body = _broken(BULK_IMPORT, ["data", "attributes", "profiles", "data", 0], profile)
    full = Draft202012Validator(dict(endpoint.request_schema or {}))
    assert full.is_valid(body) is valid
    if valid:
        spec._fast_check(endpoint)(body)
        assert validate_body(endpoint, body) == []
    else:
        with pytest.raises(fastjsonschema.JsonSchemaException):
            spec._fast_check(endpoint)(body)
        assert validate_body(endpoint, body) != []
