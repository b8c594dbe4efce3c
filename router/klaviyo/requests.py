"""The request record every stage after transform passes around."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

#: Klaviyo API revision the router targets (the saved OpenAPI document's).
REVISION = "2026-07-15"

#: What a request does, so the batcher knows which bulk endpoint can carry it.
KINDS = ("profile", "event", "subscribe", "unsubscribe", "list_add", "list_remove", "bulk")


@dataclass(frozen=True, slots=True, kw_only=True)
class KlaviyoRequest:
    """One call to Klaviyo's API: ``method`` + ``path`` (no host) + JSON ``body``."""

    #: HTTP method, upper case.
    method: str
    #: Path under the base URL, e.g. ``/api/events``.
    path: str
    #: The JSON:API document to send.
    body: dict[str, Any]
    #: One of :data:`KINDS`; ``bulk`` for an already merged bulk job.
    kind: str = "bulk"
    #: Index of the input message(s) this request came from, in input order.
    sources: tuple[int, ...] = field(default=())
    #: For bulk requests: the input indexes behind each item of the bulk ``data`` array, so a
    #: failure Klaviyo names by ``source.pointer`` is traced to the messages it concerns.
    item_sources: tuple[tuple[int, ...], ...] = field(default=())
    #: Resolved identity used for per-profile ordering (external id, anonymous id, email or phone).
    ordering_key: str | None = None
    #: ``body`` as JSON bytes when the batcher already encoded it (to size it); sent as they are.
    encoded: bytes | None = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple[Callable[..., KlaviyoRequest], tuple[Any, ...]]:
        """Pickled with its encoded JSON instead of the body when it has it (a planning process
        sends bulk jobs back): decoding that is far cheaper than unpickling the body's tree."""
        body = None if self.encoded is not None else self.body
        fields = (self.method, self.path, body, self.kind, self.sources, self.item_sources, self.ordering_key)
        return _unpickle, (*fields, self.encoded)

    if not TYPE_CHECKING:  # hidden from mypy, which would take any misspelt attribute for Any

        def __getattr__(self, name: str) -> Any:
            """``body``, decoded from ``encoded`` the first time it is read (see :func:`_unpickle`)."""
            if name == "body":
                body = orjson.loads(object.__getattribute__(self, "encoded"))
                object.__setattr__(self, "body", body)
                return body
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_json(
        cls,
        encoded: bytes,
        *,
        method: str = "POST",
        path: str,
        kind: str = "bulk",
        sources: tuple[int, ...] = (),
        item_sources: tuple[tuple[int, ...], ...] = (),
        ordering_key: str | None = None,
    ) -> KlaviyoRequest:
        """A request whose body is given as JSON bytes, left unread until ``body`` is first used:
        the client sends the bytes, and only a few requests' bodies are ever looked into."""
        request = object.__new__(cls)
        for name, value in (
            ("method", method),
            ("path", path),
            ("kind", kind),
            ("sources", sources),
            ("item_sources", item_sources),
            ("ordering_key", ordering_key),
            ("encoded", encoded),
        ):
            object.__setattr__(request, name, value)
        return request

    def payload(self) -> bytes:
        """The body as JSON bytes."""
        return self.encoded if self.encoded is not None else orjson.dumps(self.body)

    def to_json(self) -> dict[str, Any]:
        """The ``{"method", "path", "body"}`` line the CLI prints."""
        return {"method": self.method, "path": self.path, "body": self.body}


def _unpickle(
    method: str,
    path: str,
    body: dict[str, Any] | None,
    kind: str,
    sources: tuple[int, ...],
    item_sources: tuple[tuple[int, ...], ...],
    ordering_key: str | None,
    encoded: bytes | None,
) -> KlaviyoRequest:
    """A request sent back by a planning process (see :meth:`KlaviyoRequest.from_json`)."""
    if body is not None or encoded is None:
        return KlaviyoRequest(
            method=method,
            path=path,
            body=body or {},
            kind=kind,
            sources=sources,
            item_sources=item_sources,
            ordering_key=ordering_key,
            encoded=encoded,
        )
    return KlaviyoRequest.from_json(
        encoded,
        method=method,
        path=path,
        kind=kind,
        sources=sources,
        item_sources=item_sources,
        ordering_key=ordering_key,
    )
