"""The admin HTTP API: dead letters over HTTP, behind a bearer token of its own.

=======  ==============================  ===============================================
GET      ``/admin/dead-letters``         list (``?reason=``, ``?destination=``, ``?limit=``, ``?after=``)
GET      ``/admin/dead-letters/{id}``    one dead letter with its event
POST     ``/admin/dead-letters/retry``   ``{"ids": [..]}`` | ``{"all": true}`` | ``{"reason": "..."}``
POST     ``/admin/dead-letters/purge``   the same selections
POST     ``/admin/mappings/reload``      read and check the mapping files again (as SIGHUP)
=======  ==============================  ===============================================

Every request needs ``Authorization: Bearer <admin_token>``. With no ``admin_token`` configured the
API is off and answers 404, so it is never open by accident.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from router import deadletters
from router.mapping import MappingSets
from router.queue import Queue

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_TOKEN: web.AppKey[str | None] = web.AppKey("admin_token", str | None)  # type: ignore[arg-type]
ADMIN_QUEUE: web.AppKey[Queue] = web.AppKey("admin_queue")
ADMIN_MAPPINGS: web.AppKey[MappingSets] = web.AppKey("admin_mappings")
#: The largest job id a queue stores (a signed 64-bit integer in SQLite and PostgreSQL).
MAX_ID = 2**63 - 1


def add_admin_routes(
    app: web.Application, queue: Queue, token: str | None, mappings: MappingSets | None = None
) -> None:
    """Register the admin API on ``app`` (``token`` None: every admin path answers 404)."""
    app[ADMIN_TOKEN] = token
    app[ADMIN_QUEUE] = queue
    if mappings is not None:
        app[ADMIN_MAPPINGS] = mappings
        app.router.add_post("/admin/mappings/reload", _guard(reload_mappings), name="admin_mappings_reload")
    app.router.add_get("/admin/dead-letters", _guard(list_dead_letters), name="admin_list")
    app.router.add_get("/admin/dead-letters/{id:[0-9]+}", _guard(show_dead_letter), name="admin_show")
    app.router.add_post("/admin/dead-letters/retry", _guard(retry_dead_letters), name="admin_retry")
    app.router.add_post("/admin/dead-letters/purge", _guard(purge_dead_letters), name="admin_purge")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(status: int, text: str) -> web.Response:
    return _json({"error": text}, status)


def _guard(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        token = request.app[ADMIN_TOKEN]
        if not token:
            return _error(404, "the admin API is off: set admin_token to turn it on")
        # surrogateescape: header bytes that are not UTF-8 compare as themselves (and fail)
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, f"Bearer {token}".encode()):
            return _error(401, "admin API: missing or wrong bearer token")
        return await handler(request)

    return guarded


async def list_dead_letters(request: web.Request) -> web.StreamResponse:
    query = request.query
    try:
        limit = int(query.get("limit", "100"))
        after = int(query.get("after", "0"))
    except ValueError:
        return _error(400, "limit and after must be whole numbers")
    if not 1 <= limit <= 1000:
        return _error(400, "limit must be between 1 and 1000")
    if not 0 <= after <= MAX_ID:
        return _error(400, f"after must be a dead-letter id (0 to {MAX_ID})")
    jobs = await deadletters.list_dead(
        request.app[ADMIN_QUEUE],
        limit=limit,
        after_id=after,
        reason=query.get("reason"),
        destination=query.get("destination"),
    )
    return _json(
        {
            "dead_letters": [deadletters.summary(job) for job in jobs],
            "next_after": jobs[-1].id if jobs else None,
        }
    )


async def show_dead_letter(request: web.Request) -> web.StreamResponse:
    job_id = int(request.match_info["id"])
    job = await request.app[ADMIN_QUEUE].get(job_id) if job_id <= MAX_ID else None
    if job is None or job.state.value != "dead":
        return _error(404, f"no dead letter {request.match_info['id']}")
    return _json(deadletters.detail(job))


async def _selection(request: web.Request) -> deadletters.Selection | web.Response:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        return _error(400, f"body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    ids = body.get("ids") or []
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in ids
    ):
        return _error(400, '"ids" must be a list of dead-letter ids')
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        return _error(400, '"reason" must be text')
    selection = deadletters.Selection(tuple(ids), body.get("all") is True, reason)
    problem = selection.problem()
    return _error(400, problem) if problem else selection


async def retry_dead_letters(request: web.Request) -> web.StreamResponse:
    selection = await _selection(request)
    if isinstance(selection, web.Response):
        return selection
    return _json({"retried": await deadletters.retry(request.app[ADMIN_QUEUE], selection)})


async def purge_dead_letters(request: web.Request) -> web.StreamResponse:
    selection = await _selection(request)
    if isinstance(selection, web.Response):
        return selection
    return _json({"purged": await deadletters.purge(request.app[ADMIN_QUEUE], selection)})


async def reload_mappings(request: web.Request) -> web.StreamResponse:
    """Read and check the mapping files again; 422 with the reason (the running set kept) if they fail."""
    mappings = request.app[ADMIN_MAPPINGS]
    error = mappings.reload()
    if error is not None:
        return _json(
            {"reloaded": False, "error": f"mappings not reloaded, the running set is kept: {error}"}, 422
        )
    return _json({"reloaded": True, "generation": mappings.generation})
