"""The app's middleware: every answer counted, every error a JSON body, never a traceback page.

- Each request is counted in ``router_http_requests`` by route (``batch``, ``track``, ...,
  ``health``, ``ready``, ``metrics``, ``admin``; ``unmatched`` for unknown paths) and status, and
  timed in ``router_http_request_duration_seconds``.
- aiohttp's own refusals (404, 405, 413 of a too-large admin body, ...) are answered as
  ``{"code", "message"}`` like the router's.
- Anything else a handler lets escape is a bug: it is logged with its traceback
  (``request_failed``) and answered ``500 {"code": "internal_error", ...}``, counted like any answer.

Requests too malformed to reach the app (a header line past 8 KB, a NUL in a header, a bad URL)
are answered 400 by aiohttp's protocol handler, which logs through :data:`PROTOCOL_LOG`: there
they are one warning line (``bad_http_request: ...``), not an error with a traceback a client
could fill the log with.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from router.ingest import json_response
from router.metrics import Metrics

log = structlog.get_logger("router.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: The label of requests no route matched (keeps the label set bounded).
UNMATCHED = "unmatched"


class _BadHttpRequests(logging.Filter):
    """Turns aiohttp's "Error handling request" for a malformed request into one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # the first line, without the excerpt of the request aiohttp quotes (it may hold credentials)
            text = re.split(r":\s*b['\"]", str(error.message).splitlines()[0])[0]
            record.msg, record.args = "bad_http_request: %s", (text[:200],)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


#: The logger of aiohttp's protocol handler in the router's apps (``handler_args``).
PROTOCOL_LOG = logging.getLogger("router.http.protocol")
PROTOCOL_LOG.addFilter(_BadHttpRequests())


def route_label(request: web.Request) -> str:
    """The ``path`` label of a request: its route's name without the ``ingest_`` prefix, ``admin``
    for every admin route, :data:`UNMATCHED` when no route matched."""
    route = request.match_info.route
    name = route.name if route is not None else None
    if not name:
        return UNMATCHED
    if name.startswith("admin_"):
        return "admin"
    return name.removeprefix("ingest_")


def middleware(metrics: Metrics) -> Any:
    """The middleware counting into ``metrics`` (one per app: each app has its own registry)."""
    children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(label: str, status: int, elapsed: float) -> None:
        pair = children.get((label, status))
        if pair is None:
            pair = (metrics.requests.labels(label, str(status)), metrics.request_latency.labels(label))
            children[label, status] = pair
        pair[0].inc()
        pair[1].observe(elapsed)

    @web.middleware
    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as refused:  # aiohttp's own: no route, wrong method, body too large
            if refused.status < 400:
                raise
            response = json_response(
                {"code": _code(refused.reason), "message": refused.text or refused.reason},
                status=refused.status,
                headers={k: v for k, v in refused.headers.items() if k.lower() == "allow"},
            )
        except Exception as exc:
            log.error(
                "request_failed",
                path=request.path,
                method=request.method,
                error_type=type(exc).__name__,
                exc_info=True,
            )
            response = json_response(
                {
                    "code": "internal_error",
                    "message": "the router failed to answer this request; it was logged",
                },
                status=500,
            )
        observe(route_label(request), response.status, time.perf_counter() - started)
        return response

    return answer


def _code(reason: str) -> str:
    """``Method Not Allowed`` → ``method_not_allowed``."""
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_")
