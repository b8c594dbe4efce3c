"""JSON:API documents the fake answers with: errors in Klaviyo's shape and JSON responses."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

JSONAPI_CONTENT_TYPE = "application/vnd.api+json"

#: Default (code, title) per status, as Klaviyo words them.
_DEFAULTS: dict[int, tuple[str, str]] = {
    400: ("invalid", "Invalid input."),
    401: ("not_authenticated", "Authentication credentials were not provided."),
    403: ("permission_denied", "You do not have permission to perform this action."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    408: ("timeout", "Request timed out."),
    409: ("conflict", "Conflict."),
    413: ("payload_too_large", "Request payload too large."),
    415: ("unsupported_media_type", "Unsupported media type."),
    429: ("throttled", "Request was throttled."),
}


def error_object(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    title: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSON:API error object: ``{"id", "status", "code", "title", "detail", "source", "meta"}``."""
    default_code, default_title = _DEFAULTS.get(status, ("error", "A server error occurred."))
    source: dict[str, str] = {}
    if parameter is not None:
        source["parameter"] = parameter
    else:
        source["pointer"] = pointer if pointer is not None else "/data/"
    return {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code or default_code,
        "title": title or default_title,
        "detail": detail,
        "source": source,
        "meta": dict(meta or {}),
    }


def json_response(
    document: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A ``application/vnd.api+json`` response serialised with orjson."""
    return web.Response(
        body=orjson.dumps(document), status=status, content_type=JSONAPI_CONTENT_TYPE, headers=headers
    )


def error_response(
    status: int, errors: list[dict[str, Any]], *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """``{"errors": [...]}`` with ``status``."""
    return json_response({"errors": errors}, status=status, headers=headers)


def error(status: int, detail: str, **kwargs: Any) -> web.Response:
    """A response carrying exactly one error object (see :func:`error_object` for the keywords)."""
    return error_response(status, [error_object(status, detail, **kwargs)])


class ApiError(Exception):
    """Raised by handlers and checks to answer with JSON:API errors."""

    def __init__(
        self, status: int, errors: list[dict[str, Any]], *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(errors[0]["detail"] if errors else str(status))
        self.status = status
        self.errors = errors
        self.headers = dict(headers or {})

    @classmethod
    def one(cls, status: int, detail: str, **kwargs: Any) -> ApiError:
        """An error with a single error object."""
        return cls(status, [error_object(status, detail, **kwargs)])

    def response(self) -> web.Response:
        """The HTTP response for this error."""
        return error_response(self.status, self.errors, headers=self.headers)
