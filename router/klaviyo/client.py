"""Send :class:`KlaviyoRequest` records to Klaviyo and classify the answers.

:func:`classify` is pure: status, headers and body in, an :class:`Outcome` out, saying what the
worker must do — done, retry (with Klaviyo's ``Retry-After``), dead-letter (with Klaviyo's error
detail, and for bulk jobs only the items Klaviyo's ``source.pointer`` names), or pause the
destination (401/403). :class:`KlaviyoClient` is the I/O around it: pacing per endpoint, auth and
revision headers, timeouts.

The client holds its own connection slots and takes one only after the pacer admitted the request:
a request never waits for a connection once admitted, so a ``Retry-After`` that arrives in the
meantime is seen (:meth:`~router.klaviyo.ratelimit.Pacer.blocked`) before it goes, and it
waits for its turn again instead of going early.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp
import orjson

from router.destination import Destination
from router.klaviyo.ratelimit import Pacer, RateLimits, retry_after
from router.klaviyo.requests import REVISION, KlaviyoRequest
from router.klaviyo.spec import Endpoint, endpoint_for

OutcomeKind = Literal["ok", "retry", "permanent", "auth", "unsent"]
RETRY_STATUSES: Final = frozenset({408, 425, 429})
#: Longest error text kept from Klaviyo's answer.
MAX_DETAIL: Final = 500
#: Concurrent requests per client unless told otherwise.
CONNECTIONS: Final = 8
#: What :meth:`KlaviyoClient.send` answers when told to give up before the request could go.
NOT_SENT: Final = "not sent: delivery is stopping"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one request, and what the worker must do about it."""

    kind: OutcomeKind
    #: HTTP status, 0 when no answer came (timeout, connection error).
    status: int
    #: Human-readable reason, from Klaviyo's errors when it sent some; never contains a key.
    detail: str = ""
    #: Seconds Klaviyo asked us to wait (429), if any.
    retry_after: float | None = None
    #: For a refused bulk job: index of each item Klaviyo named → its error detail.
    failed_items: Mapping[int, str] = field(default_factory=dict)
    #: The answer's body (JSON), for callers that read it (job ids, job status, import errors).
    body: bytes = field(default=b"", repr=False)


def classify(
    status: int, headers: Mapping[str, str], body: bytes, request: KlaviyoRequest, endpoint: Endpoint
) -> Outcome:
    """Decide what a Klaviyo answer means (pure)."""
    if 200 <= status < 300:
        return Outcome("ok", status, body=body)
    detail = f"Klaviyo {status} on {request.method} {request.path}: {error_text(body)}"
    if status == 429:
        return Outcome("retry", status, detail, retry_after(headers, default=1.0))
    if status in RETRY_STATUSES or status >= 500:
        header = headers.get("Retry-After")
        return Outcome("retry", status, detail, retry_after(headers, default=0.0) if header else None)
    if status in (401, 403):
        return Outcome("auth", status, detail)
    return Outcome("permanent", status, detail, failed_items=_failed_items(body, endpoint, status))


def error_text(body: bytes) -> str:
    """Klaviyo's JSON:API errors as one line: ``code: detail (at pointer)``; else the raw text."""
    try:
        errors = orjson.loads(body).get("errors") if body else None
    except (orjson.JSONDecodeError, AttributeError):
        errors = None
    if not isinstance(errors, list) or not errors:
        text = body.decode("utf-8", "replace").strip() or "no error detail"
        return text[:MAX_DETAIL]
    parts = [_one_error(e) for e in errors[:3] if isinstance(e, dict)]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return ("; ".join(parts) + more)[:MAX_DETAIL]


def _one_error(error: Mapping[str, Any]) -> str:
    text = str(error.get("detail") or error.get("title") or "error")
    code = error.get("code")
    pointer = (error.get("source") or {}).get("pointer")
    return f"{code + ': ' if code else ''}{text}{f' (at {pointer})' if pointer else ''}"


def _failed_items(body: bytes, endpoint: Endpoint, status: int) -> dict[int, str]:
    """Bulk item index → detail, for errors whose ``source.pointer`` points into the item array."""
    if endpoint.items_pointer is None or not body:
        return {}
    # the item index is the first ``*`` (bulk events: the profile entries), else the array's own index
    if "*" in endpoint.items_pointer:
        prefix = endpoint.items_pointer.split("*", 1)[0]
    else:
        prefix = endpoint.items_pointer.rstrip("/") + "/"
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:/|$)")
    try:
        errors = orjson.loads(body).get("errors") or []
    except (orjson.JSONDecodeError, AttributeError):
        return {}
    failed: dict[int, str] = {}
    for error in errors if isinstance(errors, list) else []:
        pointer = ((error.get("source") or {}).get("pointer") or "") if isinstance(error, dict) else ""
        if match := pattern.match(pointer):
            index = int(match.group(1))
            failed[index] = f"Klaviyo {status}: {_one_error(error)}"[:MAX_DETAIL]
    return failed


class KlaviyoClient:
    """Sends requests of one destination, paced per endpoint, and classifies the answers."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        destination: Destination,
        *,
        limits: RateLimits | None = None,
        timeout: float = 30.0,
        revision: str = REVISION,
        observe: Callable[[str, str, int, float], None] | None = None,
        connections: int = CONNECTIONS,
    ) -> None:
        """``connections``: requests in flight at once; keep the session's connector able to open
        that many without queueing (a request queued there after its admission cannot see a
        ``Retry-After`` that arrives meanwhile)."""
        self._session = session
        self._base_url = destination.base_url.rstrip("/")
        self._headers = {
            "Authorization": f"Klaviyo-API-Key {destination.private_key}",
            "revision": revision,
            "Content-Type": "application/vnd.api+json",
            "Accept": "application/vnd.api+json",
        }
        self.limits = limits or RateLimits()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        #: Called as ``observe(operation_id, result, status, seconds)`` after every request (metrics).
        self._observe = observe
        self._connections = asyncio.Semaphore(connections)

    async def send(self, request: KlaviyoRequest, *, give_up: asyncio.Event | None = None) -> Outcome:
        """Wait for the endpoint's rate limit and a connection, send, and classify the answer.

        ``give_up``: once set, a request still waiting for its turn is not sent (an ``unsent``
        outcome); one on its way is answered as usual.
        """
        endpoint = endpoint_for(request.method, request.path)
        window = self.limits.window(endpoint)
        while True:
            if not await _admitted(window, give_up):
                return Outcome("unsent", 0, NOT_SENT)
            async with self._connections:
                if window.blocked():  # a Retry-After came while this one waited for a connection
                    continue
                started = time.perf_counter()
                outcome = await self._exchange(request, endpoint, window)
                break
        if self._observe is not None:
            self._observe(endpoint.operation_id, outcome.kind, outcome.status, time.perf_counter() - started)
        return outcome

    async def get(self, path: str, *, give_up: asyncio.Event | None = None) -> Outcome:
        """A paced ``GET`` of ``path`` (with its query); the JSON answer is in ``Outcome.body``."""
        return await self.send(KlaviyoRequest(method="GET", path=path, body={}), give_up=give_up)

    async def _exchange(self, request: KlaviyoRequest, endpoint: Endpoint, window: Pacer) -> Outcome:
        try:
            async with self._session.request(
                request.method,
                self._base_url + request.path,
                data=request.payload() if request.method != "GET" else None,
                headers=self._headers,
                timeout=self._timeout,
            ) as response:
                body = await response.read()
                window.observe(response.headers, response.status)
                return classify(response.status, response.headers, body, request, endpoint)
        except TimeoutError:
            return Outcome("retry", 0, f"no answer from Klaviyo within {self._timeout.total:g} s")
        except aiohttp.ClientError as exc:
            return Outcome("retry", 0, f"cannot reach Klaviyo: {type(exc).__name__}: {scrub(exc)}")
        except asyncio.CancelledError:
            raise


async def _admitted(window: Pacer, give_up: asyncio.Event | None) -> bool:
    """Wait for a slot of ``window``; False when ``give_up`` is set first."""
    if give_up is None:
        await window.acquire()
        return True
    if give_up.is_set():
        return False
    acquiring = asyncio.ensure_future(window.acquire())
    stopping = asyncio.ensure_future(give_up.wait())
    try:
        await asyncio.wait((acquiring, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        acquiring.cancel()  # nothing when it is done
        with contextlib.suppress(asyncio.CancelledError):
            await acquiring
    return not acquiring.cancelled()


def scrub(exc: BaseException) -> str:
    """An exception's text without anything that looks like a key."""
    return re.sub(r"Klaviyo-API-Key \S+", "Klaviyo-API-Key ***", str(exc))[:200]
