"""Trim Klaviyo's OpenAPI document to the operations the router uses.

Usage::

    python scripts/trim_openapi.py [OPENAPI_JSON] [--output PATH]

``OPENAPI_JSON`` defaults to ``../shared/klaviyo/openapi.json`` relative to the repository root and the
output to ``router/klaviyo/spec.json``. The output is deterministic (sorted keys) and holds, per operation:
operationId, method, path template, rate limits, batch limits, page sizes, success statuses and the
request-body JSON Schema (draft 2020-12) with every ``$ref`` inlined. References that are part of a cycle
stay references, into a ``$defs`` block of that operation's schema. OpenAPI 3.0's ``nullable`` becomes a
``"null"`` type (or a ``{"type": "null"}`` alternative); documentation keys are dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO_ROOT.parent / "shared" / "klaviyo" / "openapi.json"
DEFAULT_OUTPUT = REPO_ROOT / "router" / "klaviyo" / "spec.json"
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: The operations the router calls: operationId -> (method, path template) expected in the document.
OPERATIONS: dict[str, tuple[str, str]] = {
    "create_event": ("POST", "/api/events"),
    "bulk_create_events": ("POST", "/api/event-bulk-create-jobs"),
    "create_or_update_profile": ("POST", "/api/profile-import"),
    "bulk_import_profiles": ("POST", "/api/profile-bulk-import-jobs"),
    "get_bulk_import_profiles_job": ("GET", "/api/profile-bulk-import-jobs/{job_id}"),
    "get_errors_for_bulk_import_profiles_job": ("GET", "/api/profile-bulk-import-jobs/{id}/import-errors"),
    "bulk_subscribe_profiles": ("POST", "/api/profile-subscription-bulk-create-jobs"),
    "bulk_unsubscribe_profiles": ("POST", "/api/profile-subscription-bulk-delete-jobs"),
    "get_lists": ("GET", "/api/lists"),
    "create_list": ("POST", "/api/lists"),
    "get_list": ("GET", "/api/lists/{id}"),
    "add_profiles_to_list": ("POST", "/api/lists/{id}/relationships/profiles"),
    "remove_profiles_from_list": ("DELETE", "/api/lists/{id}/relationships/profiles"),
    "get_profile_ids_for_list": ("GET", "/api/lists/{id}/relationships/profiles"),
    # audience sync (router/sync): list members, profile lookups by identifier, an import job's profiles
    "get_profiles_for_list": ("GET", "/api/lists/{id}/profiles"),
    "get_profiles": ("GET", "/api/profiles"),
    "get_bulk_import_profiles_jobs": ("GET", "/api/profile-bulk-import-jobs"),
    "get_profiles_for_bulk_import_profiles_job": ("GET", "/api/profile-bulk-import-jobs/{id}/profiles"),
    "get_profile_ids_for_bulk_import_profiles_job": (
        "GET",
        "/api/profile-bulk-import-jobs/{id}/relationships/profiles",
    ),
}

#: Batch limits from the operations' descriptions: operationId -> (max items, pointer to the items).
#: ``*`` in a pointer stands for every element of an array (bulk events count events, nested per profile).
MAX_ITEMS: dict[str, tuple[int, str]] = {
    "bulk_create_events": (1000, "/data/attributes/events-bulk-create/data/*/attributes/events/data"),
    "bulk_import_profiles": (10000, "/data/attributes/profiles/data"),
    "bulk_subscribe_profiles": (1000, "/data/attributes/profiles/data"),
    "bulk_unsubscribe_profiles": (100, "/data/attributes/profiles/data"),
    "add_profiles_to_list": (1000, "/data"),
    "remove_profiles_from_list": (1000, "/data"),
}

#: Documented payload caps in bytes: 5 MB (decompressed) for every request body of the current APIs,
#: smaller where an operation documents less.
GLOBAL_MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_BODY_BYTES: dict[str, int] = {"create_or_update_profile": 100 * 1024}

#: JSON Schema keywords kept from OpenAPI schema objects (everything else is documentation or OpenAPI-only).
KEPT_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "format",
        "required",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "pattern",
        "uniqueItems",
        "minProperties",
        "maxProperties",
    }
)
SUBSCHEMA_KEYWORDS = frozenset({"items", "not", "additionalProperties"})
SUBSCHEMA_LIST_KEYWORDS = frozenset({"oneOf", "anyOf", "allOf"})

Json = Any
_RATE = re.compile(r"^(\d+)/([smd])$")


def ref_name(ref: str) -> str:
    """``#/components/schemas/Name`` -> ``Name``."""
    prefix = "#/components/schemas/"
    if not ref.startswith(prefix):
        raise ValueError(f"unsupported $ref {ref!r}")
    return ref[len(prefix) :]


def iter_refs(node: Json) -> Iterator[str]:
    """Every schema name referenced anywhere under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield ref_name(value)
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def cyclic_names(schemas: Mapping[str, Json], roots: list[str]) -> set[str]:
    """Names reachable from ``roots`` that can reach themselves again (they must stay ``$ref``)."""
    reachable: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in reachable:
            reachable.add(name)
            stack.extend(iter_refs(schemas[name]))
    cyclic: set[str] = set()
    for name in reachable:
        seen: set[str] = set()
        todo = list(iter_refs(schemas[name]))
        while todo:
            current = todo.pop()
            if current == name:
                cyclic.add(name)
                break
            if current not in seen:
                seen.add(current)
                todo.extend(iter_refs(schemas[current]))
    return cyclic


def make_nullable(schema: dict[str, Json]) -> dict[str, Json]:
    """Apply OpenAPI 3.0 ``nullable: true`` to a converted schema."""
    kind = schema.get("type")
    if isinstance(kind, str):
        schema["type"] = [kind, "null"]
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    if "oneOf" in schema and "$ref" not in schema:
        schema["oneOf"] = [*schema["oneOf"], {"type": "null"}]
        return schema
    if "$ref" in schema or "anyOf" in schema or "allOf" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    return schema  # no type constraint: null is already allowed


class Converter:
    """Turns OpenAPI 3.0 schema objects into self-contained JSON Schema 2020-12 documents."""

    def __init__(self, schemas: Mapping[str, Json], cyclic: set[str]) -> None:
        self.schemas = schemas
        self.cyclic = cyclic
        self.defs: dict[str, Json] = {}

    def document(self, root: Json) -> dict[str, Json]:
        """One request-body schema with its own ``$defs`` (only when a cycle needs them)."""
        self.defs = {}
        result = {"$schema": SCHEMA_DIALECT, **self.convert(root)}
        if self.defs:
            result["$defs"] = dict(sorted(self.defs.items()))
        return result

    def convert(self, node: Mapping[str, Json]) -> dict[str, Json]:
        """Convert one schema object (a ``$ref`` is inlined, siblings such as ``nullable`` applied)."""
        result = self.resolve(ref_name(node["$ref"])) if "$ref" in node else self.convert_keywords(node)
        if node.get("nullable") is True:
            result = make_nullable(result)
        return result

    def resolve(self, name: str) -> dict[str, Json]:
        """Inline a named schema, or point into ``$defs`` when it is recursive."""
        if name not in self.cyclic:
            return self.convert(self.schemas[name])
        if name not in self.defs:
            self.defs[name] = {}  # placeholder: stops the recursion
            self.defs[name] = self.convert(self.schemas[name])
        return {"$ref": f"#/$defs/{name}"}

    def convert_keywords(self, node: Mapping[str, Json]) -> dict[str, Json]:
        """Copy validation keywords; convert nested schemas."""
        result: dict[str, Json] = {key: node[key] for key in KEPT_KEYWORDS if key in node}
        if "properties" in node:
            result["properties"] = {key: self.convert(value) for key, value in node["properties"].items()}
        for key in SUBSCHEMA_KEYWORDS & node.keys():
            value = node[key]
            result[key] = self.convert(value) if isinstance(value, dict) else value
        for key in SUBSCHEMA_LIST_KEYWORDS & node.keys():
            result[key] = [self.convert(item) for item in node[key]]
        return result


def parse_rate(text: str, unit: str) -> int:
    """``"10/s"`` with unit ``s`` -> 10."""
    match = _RATE.match(text)
    if match is None or match.group(2) != unit:
        raise ValueError(f"unexpected rate limit {text!r} (wanted a '/{unit}' rate)")
    return int(match.group(1))


def find_operation(document: Json, operation_id: str) -> tuple[str, str, Json]:
    """(method, path, operation object) for an operationId."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and operation.get("operationId") == operation_id:
                return method.upper(), path, operation
    raise KeyError(f"operation {operation_id!r} is not in the OpenAPI document")


def page_size(operation: Json) -> dict[str, int]:
    """``page_size_default`` / ``page_size_max`` from the ``page[size]`` query parameter, if any."""
    for parameter in operation.get("parameters", []):
        if parameter.get("name") == "page[size]":
            schema = parameter.get("schema", {})
            return {"page_size_default": int(schema["default"]), "page_size_max": int(schema["maximum"])}
    return {}


def request_schema(operation: Json, converter: Converter) -> tuple[str | None, Json]:
    """(content type, converted schema) of the request body, or (None, None)."""
    body = operation.get("requestBody")
    if not body:
        return None, None
    ((content_type, media),) = body["content"].items()
    return content_type, converter.document(media["schema"])


def endpoint_entry(document: Json, operation_id: str, converter: Converter) -> dict[str, Json]:
    """The spec.json record for one operation."""
    method, path, operation = find_operation(document, operation_id)
    if (method, path) != OPERATIONS[operation_id]:
        raise ValueError(
            f"{operation_id}: expected {OPERATIONS[operation_id]}, document has {(method, path)}"
        )
    limits = operation["x-klaviyo-ratelimit"]
    content_type, schema = request_schema(operation, converter)
    max_items, items_pointer = MAX_ITEMS.get(operation_id, (None, None))
    entry: dict[str, Json] = {
        "operation_id": operation_id,
        "method": method,
        "path": path,
        "burst_per_second": parse_rate(limits["burst"], "s"),
        "steady_per_minute": parse_rate(limits["steady"], "m"),
        "daily": parse_rate(limits["daily"], "d") if "daily" in limits else None,
        "max_items": max_items,
        "items_pointer": items_pointer,
        "max_body_bytes": MAX_BODY_BYTES.get(operation_id, GLOBAL_MAX_BODY_BYTES) if schema else None,
        "scopes": list(operation.get("x-klaviyo-scopes", [])),
        "success_statuses": sorted(int(code) for code in operation["responses"] if code.isdigit()),
        "content_type": content_type,
        "request_schema": schema,
    }
    entry.update(page_size(operation))
    return entry


def trim(document: Json, source_sha256: str) -> dict[str, Json]:
    """The whole spec.json document."""
    schemas = document["components"]["schemas"]
    roots = [
        ref_name(media["schema"]["$ref"])
        for operation_id in OPERATIONS
        for media in find_operation(document, operation_id)[2]
        .get("requestBody", {})
        .get("content", {})
        .values()
    ]
    converter = Converter(schemas, cyclic_names(schemas, roots))
    return {
        "revision": document["info"]["version"],
        "source": {"file": "klaviyo/openapi.json", "sha256": source_sha256},
        "endpoints": [endpoint_entry(document, operation_id, converter) for operation_id in OPERATIONS],
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="Klaviyo openapi.json")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write spec.json")
    args = parser.parse_args(argv)
    raw = args.source.read_bytes()
    trimmed = trim(json.loads(raw), hashlib.sha256(raw).hexdigest())
    text = json.dumps(trimmed, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(trimmed['endpoints'])} operations, {len(text)} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
