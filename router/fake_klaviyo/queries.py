"""Query parameters of Klaviyo's GET endpoints: ``filter``, ``page[size]`` and ``page[cursor]``."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web

from router.fake_klaviyo.jsonapi import ApiError

T = TypeVar("T")

_FILTER = re.compile(r"^\s*(equals|any)\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,\s*(.+?)\s*\)\s*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Filter:
    """``equals(field,"x")`` or ``any(field,["x","y"])``: ``field`` must be one of ``values``."""

    field: str
    values: tuple[str, ...]

    def matches(self, value: object) -> bool:
        """Whether a record's value passes."""
        return value in self.values


def parse_filter(request: web.Request, allowed: Sequence[str]) -> Filter | None:
    """The request's ``filter`` (only ``equals``/``any`` on ``allowed`` fields), ``None`` when absent."""
    text = request.query.get("filter")
    if text is None:
        return None
    match = _FILTER.match(text)
    if match is None or match.group(2) not in allowed:
        raise ApiError.one(
            400,
            f"Unsupported filter {text!r}; the fake supports equals/any on {list(allowed)}.",
            parameter="filter",
        )
    operator, field, raw = match.groups()
    try:  # Klaviyo quotes strings with double quotes (JSON), or single ones
        value: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = orjson.loads(raw.replace("'", '"'))
        except orjson.JSONDecodeError:
            raise ApiError.one(400, f"Invalid filter value {raw!r}.", parameter="filter") from None
    values = value if operator == "any" and isinstance(value, list) else [value]
    return Filter(field, tuple(str(item) for item in values))


def page_size(request: web.Request, default: int, maximum: int) -> int:
    """``page[size]`` within 1..maximum (400 otherwise)."""
    raw = request.query.get("page[size]")
    if raw is None:
        return default
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= maximum:
        raise ApiError.one(
            400, f"page[size] must be an integer between 1 and {maximum}.", parameter="page[size]"
        )
    return size


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        if prefix != "offset":
            raise ValueError(text)
        return max(0, int(number))
    except ValueError:
        raise ApiError.one(400, f"Invalid page cursor {cursor!r}.", parameter="page[cursor]") from None


def paginate(
    request: web.Request, items: Sequence[T], *, default: int, maximum: int
) -> tuple[list[T], dict[str, Any]]:
    """One page of ``items`` and JSON:API ``links`` (``self``, ``next``, ``prev``) for the request."""
    size = page_size(request, default, maximum)
    cursor = request.query.get("page[cursor]")
    offset = _decode_cursor(cursor) if cursor else 0
    page = list(items[offset : offset + size])
    links: dict[str, Any] = {"self": str(request.url), "next": None, "prev": None}
    if offset + size < len(items):
        links["next"] = str(request.url.update_query({"page[cursor]": _encode_cursor(offset + size)}))
    if offset > 0:
        links["prev"] = str(request.url.update_query({"page[cursor]": _encode_cursor(max(0, offset - size))}))
    return page, links
