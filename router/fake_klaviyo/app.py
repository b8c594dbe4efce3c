"""The aiohttp application: every ``/api/...`` request goes through one pipeline of checks, then its handler.

Pipeline, in order (the first stage that answers wins):

1. route: unknown path 404, known path with another method 405;
2. faults: scripted answer for the path (status, ``Retry-After``, or a timeout), random 5xx;
3. ``Authorization: Klaviyo-API-Key <key>`` (401), ``revision`` header (400);
4. rate limits per account and endpoint (429 + ``Retry-After``); later answers carry ``RateLimit-*``;
5. body: content type (415), size (413), JSON (400), schema (400 naming pointers), batch size (400);
6. the operation's handler (:mod:`router.fake_klaviyo.handlers`).

Every request is logged in :attr:`FakeKlaviyo.requests` with the status it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from router.fake_klaviyo.control import add_control_routes
from router.fake_klaviyo.faults import Faults, Scripted
from router.fake_klaviyo.handlers import HANDLERS, Call
from router.fake_klaviyo.jsonapi import ApiError, error_object, error_response, json_response
from router.fake_klaviyo.ratelimit import Decision, Limit, limits_for
from router.fake_klaviyo.records import RequestRecord
from router.fake_klaviyo.state import DEFAULT_MAX_LISTS, FakeKlaviyo, client_label
from router.klaviyo.spec import Endpoint, body_errors, count_items, match_path

#: Where the :class:`FakeKlaviyo` of an application lives.
FAKE_KLAVIYO: web.AppKey[FakeKlaviyo] = web.AppKey("fake_klaviyo", FakeKlaviyo)

JSON_CONTENT_TYPES = frozenset({"application/vnd.api+json", "application/json"})
_AUTH = re.compile(r"^Klaviyo-API-Key\s+(\S+)$")
_REVISION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[A-Za-z0-9]+)?$")
#: Stricter buckets Klaviyo applies when a query parameter asks for expensive data:
#: (operationId, parameter, value) -> (burst per second, steady per minute).
QUERY_BUCKETS: dict[tuple[str, str, str], tuple[int, int]] = {
    ("get_list", "additional-fields[list]", "profile_count"): (1, 15),
}
#: Request bodies above this are refused by aiohttp itself; Klaviyo's own caps (5 MB) are checked below it.
CLIENT_MAX_SIZE = 16 * 1024 * 1024


def fake_of(app: web.Application) -> FakeKlaviyo:
    """The :class:`FakeKlaviyo` behind an application built by :func:`build_fake_app`."""
    return app[FAKE_KLAVIYO]


class _Dropped(Exception):
    """The request was held past the client's timeout and its connection closed."""


# -- stages ------------------------------------------------------------------------------------------------


def _route(request: web.Request) -> tuple[Endpoint, dict[str, str]]:
    try:
        return match_path(request.method, request.path)
    except KeyError as exc:
        status = 405 if "not supported" in str(exc.args[0]) else 404
        raise ApiError.one(status, str(exc.args[0]), pointer="") from None


def _api_key(request: web.Request) -> str | None:
    match = _AUTH.match(request.headers.get("Authorization", "").strip())
    return match.group(1) if match else None


async def _hold_and_drop(fake: FakeKlaviyo, request: web.Request) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(fake.closing.wait(), fake.faults.hold_seconds)
    if request.transport is not None:
        request.transport.close()
    raise _Dropped


def _scripted_response(
    fake: FakeKlaviyo, scripted: Scripted, client: str | None, bucket: str
) -> web.Response:
    headers: dict[str, str] = {}
    retry_after = scripted.retry_after
    if retry_after is None and scripted.status == 429:
        retry_after = 1  # Klaviyo's 429s always say when to come back
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
        if client is not None:
            fake.note_retry_after(client, bucket, retry_after)
    detail = scripted.detail or f"Injected fault: HTTP {scripted.status}."
    return error_response(scripted.status, [error_object(scripted.status, detail)], headers=headers)


async def _faults(
    fake: FakeKlaviyo, request: web.Request, endpoint: Endpoint, client: str | None
) -> web.Response | None:
    keys = [
        f"{request.method} {request.path}",
        request.path,
        f"{endpoint.method} {endpoint.path_template}",
        endpoint.path_template,
        endpoint.operation_id,
    ]
    scripted = fake.faults.next_scripted(keys)
    if scripted is not None and scripted.timeout:
        await _hold_and_drop(fake, request)
    if scripted is not None and not scripted.passes:
        return _scripted_response(fake, scripted, client, endpoint.operation_id)
    status = fake.faults.random_status()
    if status is not None:
        return error_response(status, [error_object(status, f"Injected random fault: HTTP {status}.")])
    return None


def _authenticate(fake: FakeKlaviyo, request: web.Request) -> str:
    key = _api_key(request)
    if key is None:
        raise ApiError.one(
            401, "Missing or invalid authorization scheme. Use 'Klaviyo-API-Key <private key>'."
        )
    if not fake.key_accepted(key):
        raise ApiError.one(
            401,
            "Incorrect authentication credentials.",
            code="authentication_failed",
            title="Incorrect credentials.",
        )
    revision = request.headers.get("revision")
    if not revision:
        raise ApiError.one(400, "Missing required header 'revision'.", parameter="revision")
    if not _REVISION.match(revision):
        raise ApiError.one(
            400, f"Invalid revision {revision!r}; expected YYYY-MM-DD[.suffix].", parameter="revision"
        )
    return key


def _bucket(request: web.Request, endpoint: Endpoint, scale: float) -> tuple[str, list[Limit]]:
    for (operation_id, parameter, value), (burst, steady) in QUERY_BUCKETS.items():
        if operation_id == endpoint.operation_id and value in request.query.get(parameter, "").split(","):
            return f"{operation_id}:{parameter}={value}", limits_for(burst, steady, None, scale)
    limits = limits_for(endpoint.burst_per_second, endpoint.steady_per_minute, endpoint.daily, scale)
    return endpoint.operation_id, limits


def _throttle(fake: FakeKlaviyo, request: web.Request, endpoint: Endpoint, key: str) -> Decision | None:
    """Count the request in its account's bucket (the limiter keys on the whole private key)."""
    if not fake.rate_limits:
        return None
    bucket, limits = _bucket(request, endpoint, fake.rate_limit_scale)
    decision = fake.limiter.hit(f"{key}|{bucket}", limits)
    if not decision.allowed:
        fake.note_retry_after(client_label(key), endpoint.operation_id, decision.retry_after)
        detail = f"Request was throttled. Expected available in {decision.retry_after} second(s)."
        raise ApiError(429, [error_object(429, detail)], headers=decision.headers())
    return decision


def _parse_body(request: web.Request, endpoint: Endpoint, raw: bytes) -> Any:
    if endpoint.request_schema is None:
        return None
    if request.content_type not in JSON_CONTENT_TYPES:
        raise ApiError.one(
            415, f"Unsupported Content-Type {request.content_type!r}; use application/vnd.api+json."
        )
    if endpoint.max_body_bytes is not None and len(raw) > endpoint.max_body_bytes:
        raise ApiError.one(
            413, f"Payload of {len(raw)} bytes exceeds the {endpoint.max_body_bytes}-byte limit."
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError.one(400, f"Malformed JSON: {exc}.", pointer="") from None


def _check_body(endpoint: Endpoint, body: Any) -> None:
    problems = body_errors(endpoint, body)
    if problems:
        raise ApiError(
            400, [error_object(400, problem.message, pointer=problem.pointer) for problem in problems]
        )
    items = count_items(endpoint, body)
    if endpoint.max_items is not None and items > endpoint.max_items:
        pointer = (endpoint.items_pointer or "").split("/*")[0]
        detail = (
            f"{items} items exceed the limit of {endpoint.max_items} per request for {endpoint.operation_id}."
        )
        raise ApiError.one(400, detail, pointer=pointer)


# -- the entry point ---------------------------------------------------------------------------------------


async def _answer(fake: FakeKlaviyo, request: web.Request, raw: bytes, client: str | None) -> web.Response:
    endpoint, params = _route(request)
    if client is not None:
        fake.check_early(client, endpoint.operation_id)
    injected = await _faults(fake, request, endpoint, client)
    if injected is not None:
        return injected
    key = _authenticate(fake, request)
    decision = _throttle(fake, request, endpoint, key)
    headers = decision.headers() if decision else {}
    try:
        body = _parse_body(request, endpoint, raw)
        _check_body(endpoint, body)
        if fake.store or request.method == "GET" or endpoint.operation_id == "create_list":
            response = HANDLERS[endpoint.operation_id](Call(fake, request, endpoint, params, body))
        else:
            response = _accept_unstored(fake, endpoint, body)
    except ApiError as exc:
        response = exc.response()
    response.headers.update(headers)
    return response


def _accept_unstored(fake: FakeKlaviyo, endpoint: Endpoint, body: Any) -> web.Response:
    """``store=False``: a valid write is answered like Klaviyo would, counted, and not kept."""
    fake.items_accepted[endpoint.operation_id] += max(1, count_items(endpoint, body))
    if endpoint.operation_id == "bulk_import_profiles":  # a job to follow, with nothing in it
        job = fake.new_import_job(count_items(endpoint, body), ())
        return json_response({"data": job.to_json()}, status=202)
    status = endpoint.success_statuses[0] if endpoint.success_statuses else 202
    if status in (202, 204):
        return web.Response(status=status)
    return json_response({"data": {"type": "profile", "id": fake.ids.ulid()}}, status=status)


def _logged_headers(request: web.Request) -> dict[str, str]:
    return {
        str(name): "[redacted]" if name.lower() == "authorization" else value
        for name, value in request.headers.items()
    }


async def api_entry(request: web.Request) -> web.StreamResponse:
    """Every ``/api/...`` request."""
    fake = request.app[FAKE_KLAVIYO]
    arrived = fake.clock()
    raw = await request.read()
    key = _api_key(request)
    client = client_label(key) if key else None
    try:
        response = await _answer(fake, request, raw, client)
    except ApiError as exc:
        response = exc.response()
    except _Dropped:  # the connection is closed: this response is never written
        _log(fake, request, raw, 0, arrived, client)
        return web.Response(status=408)
    except asyncio.CancelledError:  # the client went away while the request was held
        _log(fake, request, raw, 0, arrived, client)
        raise
    if response.status == 429:
        fake.throttled += 1
    _log(fake, request, raw, response.status, arrived, client)
    return response


def _log(
    fake: FakeKlaviyo, request: web.Request, raw: bytes, status: int, at: float, client: str | None
) -> None:
    try:
        parsed: Any = orjson.loads(raw) if raw and fake.store else None
    except orjson.JSONDecodeError:
        parsed = None
    try:
        operation_id: str | None = match_path(request.method, request.path)[0].operation_id
    except KeyError:
        operation_id = None
    record = RequestRecord(
        method=request.method,
        path=request.path,
        query=dict(request.query),
        headers=_logged_headers(request),
        json=parsed,
        status=status,
        operation_id=operation_id,
        client=client,
        at=at,
    )
    fake.requests.append(record)


def build_fake_app(
    *,
    rate_limits: bool = True,
    api_keys: Sequence[str] | None = None,
    rate_limit_scale: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    faults: Faults | Mapping[str, Any] | None = None,
    max_lists: int = DEFAULT_MAX_LISTS,
    seed: int = 0,
    state: FakeKlaviyo | None = None,
    store: bool = True,
    import_job_reads: int = 1,
) -> web.Application:
    """An aiohttp application emulating the Klaviyo API subset in :mod:`router.klaviyo.spec`.

    ``api_keys``: accepted private keys (``None`` accepts any key). ``rate_limits`` / ``rate_limit_scale``:
    enforce the documented limits, multiplied by the scale. ``clock``: seconds, for rate-limit windows and
    ``Retry-After`` bookkeeping. ``faults``: a :class:`Faults` or its JSON form (see
    :meth:`Faults.configure`). ``state``: reuse an existing :class:`FakeKlaviyo` (the other options are then
    ignored). A list id that does not exist is refused wherever it is used, as Klaviyo does (create
    lists with ``POST /api/lists``, :meth:`FakeKlaviyo.create_list` or ``POST /__fake__/lists``).
    ``import_job_reads``: reads of a bulk import job before it is ``complete``. ``store=False``: writes are validated, rate-limited and counted
    (``items_accepted``) but not kept, and the request log keeps no bodies — a load-test target that,
    like Klaviyo's bulk endpoints, answers before processing. The state is reachable as ``app[FAKE_KLAVIYO]`` or :func:`fake_of`.
    """
    if state is None:
        configured = faults if isinstance(faults, Faults) else Faults()
        if isinstance(faults, Mapping):
            configured.configure(faults)
        state = FakeKlaviyo(
            api_keys=api_keys,
            rate_limits=rate_limits,
            rate_limit_scale=rate_limit_scale,
            clock=clock,
            faults=configured,
            max_lists=max_lists,
            seed=seed,
            import_job_reads=import_job_reads,
            store=store,
        )
    app = web.Application(client_max_size=CLIENT_MAX_SIZE)
    app[FAKE_KLAVIYO] = state
    app.router.add_route("*", "/api/{tail:.*}", api_entry)
    add_control_routes(app, FAKE_KLAVIYO)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app


async def _on_startup(app: web.Application) -> None:
    app[FAKE_KLAVIYO].closing = asyncio.Event()  # bound to this server's event loop


async def _on_shutdown(app: web.Application) -> None:
    app[FAKE_KLAVIYO].closing.set()  # releases requests held by a timeout fault
