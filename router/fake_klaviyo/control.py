"""The control API under ``/__fake__/``: inspect and steer a fake running in another process.

=======  ==========================  ==========================================================================
method   path                        what
=======  ==========================  ==========================================================================
POST     ``/__fake__/lists``         create lists with chosen ids (``{"lists": [{"id", "name"}]}``)
GET      ``/__fake__/state``         profiles, events, lists, memberships, subscriptions, jobs, counters
                                     (``repeats`` by kind) and the repeated writes themselves
                                     (``?summary=1``: counts only)
GET      ``/__fake__/requests``      the request log (``?since=N`` skips the first N entries)
POST     ``/__fake__/reset``         forget all data, counters, rate-limit windows and faults
GET      ``/__fake__/faults``        the configured faults
POST     ``/__fake__/faults``        add faults (JSON of :meth:`~router.fake_klaviyo.faults.Faults.configure`)
DELETE   ``/__fake__/faults``        remove every fault
POST     ``/__fake__/config``        ``{"rate_limits"?: bool, "rate_limit_scale"?: float, "api_keys"?: [...]}``
=======  ==========================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from router.fake_klaviyo.state import FakeKlaviyo


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, content_type="application/json")


async def _payload(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        payload = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"malformed JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return payload


def add_control_routes(app: web.Application, key: web.AppKey[FakeKlaviyo]) -> None:
    """Register the ``/__fake__/...`` routes on ``app`` for the state stored under ``key``."""

    async def state(request: web.Request) -> web.Response:
        fake = request.app[key]
        return _json(fake.summary() if request.query.get("summary") else fake.to_json())

    async def requests(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        return _json([record.to_json() for record in request.app[key].requests[since:]])

    async def reset(request: web.Request) -> web.Response:
        fake = request.app[key]
        fake.reset()
        fake.clear_faults()
        return _json({"reset": True})

    async def get_faults(request: web.Request) -> web.Response:
        return _json(request.app[key].faults.to_json())

    async def set_faults(request: web.Request) -> web.Response:
        fake = request.app[key]
        try:
            fake.faults.configure(await _payload(request))
        except (KeyError, TypeError, ValueError) as exc:
            raise web.HTTPBadRequest(text=f"invalid faults: {exc!r}") from None
        return _json(fake.faults.to_json())

    async def clear_faults(request: web.Request) -> web.Response:
        request.app[key].clear_faults()
        return _json({"cleared": True})

    async def config(request: web.Request) -> web.Response:
        fake = request.app[key]
        payload = await _payload(request)
        if "rate_limits" in payload or "rate_limit_scale" in payload:
            scale = payload.get("rate_limit_scale")
            fake.set_rate_limits(
                bool(payload.get("rate_limits", fake.rate_limits)),
                scale=None if scale is None else float(scale),
            )
        if "api_keys" in payload:
            keys = payload["api_keys"]
            fake.api_keys = None if keys is None else frozenset(str(item) for item in keys)
        return _json({"rate_limits": fake.rate_limits, "rate_limit_scale": fake.rate_limit_scale})

    app.router.add_get("/__fake__/state", state)
    app.router.add_post("/__fake__/lists", _create_lists(key))
    app.router.add_get("/__fake__/requests", requests)
    app.router.add_post("/__fake__/reset", reset)
    app.router.add_get("/__fake__/faults", get_faults)
    app.router.add_post("/__fake__/faults", set_faults)
    app.router.add_delete("/__fake__/faults", clear_faults)
    app.router.add_post("/__fake__/config", config)


def _create_lists(key: web.AppKey[FakeKlaviyo]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def create_lists(request: web.Request) -> web.Response:
        """Create lists with chosen ids: ``{"lists": [{"id", "name", "opt_in_process"?}, ...]}``."""
        fake = request.app[key]
        payload = await _payload(request)
        created = []
        for item in payload.get("lists") or []:
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] not in fake.lists:
                fake.create_list(
                    str(item.get("name") or item["id"]), item.get("opt_in_process"), list_id=item["id"]
                )
                created.append(item["id"])
        return _json({"created": created})

    return create_lists
