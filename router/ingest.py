"""HTTP ingest: ``POST /v1/{identify,track,page,screen,group,alias,batch,import}``.

Per request: auth (HTTP Basic with the write key as user name, or ``writeKey`` in the body) →
backpressure → body (gzip, size capped while reading) → JSON → per event, :mod:`router.intake`
(normalise, validate, size check) → one queue job per destination of the source, and the rejected
events as dead letters, committed together → answer. The answer comes only after the queue's
durable commit.

Answers (JSON; errors carry ``code`` and ``message``, which the RudderStack and Segment SDKs log):

- ``200 {"accepted": N, "duplicates": D, "rejected": [{"index", "messageId", "error"}]}`` when at
  least one event was accepted (rudder-sdk-python retries anything but exactly 200); past
  ``max_listed_rejections`` rejected events, the rest are counted in ``rejected_not_listed``;
- ``400`` with the same fields when every event was rejected, or for an unusable body (one nesting
  deeper than :data:`router.intake.PARSE_DEPTH` levels is not even parsed);
- ``401`` no or unknown write key; ``408`` the body took longer than ``body_timeout`` to arrive
  (the connection is closed); ``413`` request or single event over its size limit, or more events
  than ``max_batch_events``; ``415`` an encoding other than gzip;
- ``503`` + ``Retry-After`` when the queue is full (checked before the body is read, and again
  atomically with the commit), the disk is nearly full, the queue fails, or the server is
  shutting down. Never a 5xx for a client's mistake.

A body refused whole after it was read is kept as a dead letter when its source is known, except
when it is refused for its size or number of events (the client is told and must split it).
"""

from __future__ import annotations

import asyncio
import base64
import time
import zlib
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web, web_protocol

from router.errors import BadEvent
from router.events import NO_DEFAULTS, BatchDefaults, read_batch
from router.health import Backpressure, Outage
from router.intake import PARSE_DEPTH, Accepted, Intake, Rejected
from router.metrics import Metrics
from router.queue import EnqueueResult, NewJob, Queue, QueueFull
from router.settings import Settings, Source

log = structlog.get_logger("router.ingest")

#: Single-call paths: the path names the call type.
CALL_TYPES = ("identify", "track", "page", "screen", "group", "alias")
#: Batch paths: ``{"batch": [...], "sentAt"?, "context"?, "integrations"?}``.
BATCH_PATHS = ("batch", "import")


class RequestRefused(Exception):
    """The whole request is refused: answered with ``status`` and ``{"code", "message"}``."""

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None, hang_up: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        #: Close the connection right after answering (the rest of the body is not waited for).
        self.hang_up = hang_up

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return json_response(
            {"code": self.code, "message": self.message}, status=self.status, headers=headers
        )


def json_response(
    body: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response serialised with orjson."""
    response = web.Response(body=orjson.dumps(body), status=status, headers=headers)
    response.content_type = "application/json"
    return response


@dataclass(slots=True)
class _Prepared:
    accepted: list[Accepted] = field(default_factory=list)
    #: Each rejected event with its index in the request.
    rejected: list[tuple[int, Rejected]] = field(default_factory=list)


@dataclass(slots=True)
class _Outcome:
    status: int
    body: dict[str, Any]
    source: Source
    accepted: int
    rejected: int
    duplicates: int


class Ingest:
    """The ingest handlers of one app, with the state they share."""

    def __init__(self, settings: Settings, queue: Queue, *, metrics: Metrics, pressure: Backpressure) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics
        self.pressure = pressure
        self.intake = Intake(settings)
        self._sources = {source.write_key: source for source in settings.sources}
        #: Set when shutdown starts: new requests get 503 while in-flight commits finish.
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: One ``request_handled`` line per request only at debug level (cheap otherwise).
        self._log_requests = settings.log_level == "debug"
        #: Failed queue writes (the database away): a line when they start, one a minute while they
        #: last, one when they end, not one per request (each refused request is at debug level).
        self.outage = Outage("queue_write")

    def routes(self) -> list[web.RouteDef]:
        """The ingest routes: one per call type and batch path."""
        return [
            web.post(f"/v1/{name}", self.handle, name=f"ingest_{name}") for name in CALL_TYPES + BATCH_PATHS
        ]

    async def wait_idle(self) -> None:
        """Return once no commit is in flight (shutdown, before the queue is closed)."""
        await self._idle.wait()

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one ingest request (any of :data:`CALL_TYPES` and :data:`BATCH_PATHS`)."""
        started = time.perf_counter()
        name = request.path.rsplit("/", 1)[-1]
        source: Source | None = None
        try:
            outcome = await self._ingest(request, name)
        except RequestRefused as refused:
            response = refused.response()
            # A client's mistake is worth a line; 503s come in floods and are counted in the metrics.
            (log.debug if refused.status == 503 else log.info)(
                "request_refused", path=request.path, status=refused.status, code=refused.code
            )
            if refused.hang_up:
                await _answer_and_hang_up(request, response)
        else:
            source = outcome.source
            response = json_response(outcome.body, status=outcome.status)
            self._count(outcome, name)
        elapsed = time.perf_counter() - started
        if self._log_requests:
            log.debug(
                "request_handled",
                path=request.path,
                status=response.status,
                source=source.name if source else None,
                duration_ms=round(elapsed * 1000, 3),
            )
        return response

    # --- the steps of one request -------------------------------------------------------------

    async def _ingest(self, request: web.Request, name: str) -> _Outcome:
        if self.draining:
            raise RequestRefused(503, "shutting_down", "the router is shutting down", retry_after=1)
        source = self._source_from_header(request.headers.get("Authorization"))
        overloaded = self.pressure.overloaded()
        if overloaded:
            raise RequestRefused(
                503,
                "overloaded",
                f"not accepting events: {overloaded}",
                retry_after=self.settings.retry_after,
            )
        body = await self._read_body(request)
        screening = self.intake.screen(body)
        if screening.depth > PARSE_DEPTH:
            reason = (
                f"the body nests deeper than {PARSE_DEPTH} levels; events may nest "
                f"{self.intake.max_depth} (max_nesting_depth)"
            )
            if source is not None:
                await self._dead_body(source, body, reason)
            raise RequestRefused(400, "too_deep", reason)
        batch = name in BATCH_PATHS
        if batch:
            shape = screening.shape  # its objects and arrays bound the events, before parsing
            if shape.containers() > self.settings.max_batch_events:
                self._check_count(shape.nodes_at(3))
        plain = read_batch(body) if source is not None and batch else None
        if plain is not None and source is not None:  # the common case, read partly (events.read_batch)
            events, defaults = plain
            self._check_count(len(events))
            prepared = self._prepare(events, path_type=None, defaults=defaults, screened=screening.clean)
        else:
            source, prepared = await self._parse_fully(source, body, name, screening.clean)
        result = await self._commit(source, prepared)
        return _outcome(
            source, prepared, result, single=not batch, listed=self.settings.max_listed_rejections
        )

    def _check_count(self, events: int) -> None:
        """413 when a request holds more events than ``max_batch_events``."""
        limit = self.settings.max_batch_events
        if events > limit:
            raise RequestRefused(
                413,
                "too_many_events",
                f"the request holds more than {limit} events, the limit per request (max_batch_events): "
                "send smaller batches",
            )

    async def _parse_fully(
        self, source: Source | None, body: bytes, name: str, screened: bool
    ) -> tuple[Source, _Prepared]:
        """Parse the whole body: single calls, and batches :func:`read_batch` leaves (it explains)."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if source is not None:
                await self._dead_body(source, body, f"the body is not valid JSON: {exc}")
            raise RequestRefused(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if source is None:
            source = self._source_from_body(parsed)
        if name in BATCH_PATHS:
            events, defaults = await self._batch_events(source, parsed, body)
            self._check_count(len(events))
            return source, self._prepare(events, path_type=None, defaults=defaults, screened=screened)
        await self._check_single(source, parsed, body)
        return source, self._prepare([parsed], path_type=name, defaults=NO_DEFAULTS, screened=screened)

    def _source_from_header(self, header: str | None) -> Source | None:
        if not header:
            return None
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except ValueError:  # not base64 (non-ASCII included), or not UTF-8
            raise RequestRefused(
                401, "invalid_authorization", "the Authorization header is not valid HTTP Basic credentials"
            ) from None
        write_key = decoded.partition(":")[0]
        if not write_key:
            return None
        source = self._sources.get(write_key)
        if source is None:
            raise RequestRefused(401, "invalid_write_key", "unknown write key (HTTP Basic user name)")
        return source

    def _source_from_body(self, parsed: Any) -> Source:
        write_key = parsed.get("writeKey") if isinstance(parsed, dict) else None
        if not write_key:
            raise RequestRefused(
                401,
                "missing_write_key",
                "no write key: send it as the HTTP Basic user name (empty password) or as writeKey in the body",
            )
        source = self._sources.get(write_key) if isinstance(write_key, str) else None
        if source is None:
            raise RequestRefused(401, "invalid_write_key", "unknown write key (writeKey in the body)")
        return source

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, gunzipped when ``Content-Encoding: gzip``; 413 as soon as it passes the limit."""
        limit = self.settings.max_request_bytes
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip"):
            raise RequestRefused(
                415,
                "unsupported_encoding",
                f"Content-Encoding {encoding!r} is not supported (use gzip or none)",
            )
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestRefused(
                408,
                "body_timeout",
                f"the body did not arrive within {self.settings.body_timeout:g} s (body_timeout)",
                hang_up=True,
            ) from None
        except (OSError, aiohttp.ClientPayloadError, web_protocol.RequestPayloadError) as exc:
            raise RequestRefused(400, "invalid_body", f"the body could not be read: {exc}") from exc
        body = b"".join(chunks)
        return gunzip(body, limit) if encoding in ("gzip", "x-gzip") else body

    async def _batch_events(
        self, source: Source, parsed: Any, body: bytes
    ) -> tuple[list[Any], BatchDefaults]:
        if not isinstance(parsed, dict):
            await self._dead_body(source, body, "a batch body must be a JSON object with a batch array")
            raise RequestRefused(400, "invalid_batch", 'the body must be a JSON object: {"batch": [...]}')
        events = parsed.get("batch")
        if not isinstance(events, list):
            await self._dead_body(source, body, '"batch" is missing or not an array')
            raise RequestRefused(400, "invalid_batch", '"batch" must be an array of events')
        if not events:
            raise RequestRefused(400, "empty_batch", '"batch" is empty')
        try:
            defaults = BatchDefaults.from_body(parsed)
        except BadEvent as exc:
            await self._dead_body(source, body, exc.message)
            raise RequestRefused(400, "invalid_batch", exc.message) from None
        return events, defaults

    async def _check_single(self, source: Source, parsed: Any, body: bytes) -> None:
        limit = self.settings.max_event_bytes
        if len(body) > limit:
            reason = f"the event is {len(body)} bytes, over the limit of {limit} bytes (max_event_bytes)"
            await self._dead_body(source, body, reason)
            raise RequestRefused(413, "event_too_large", reason)
        if not isinstance(parsed, dict):
            await self._dead_body(source, body, "the body is not a JSON object")
            raise RequestRefused(400, "invalid_event", "the body must be a JSON object (one event)")

    def _prepare(
        self, events: Sequence[Any], *, path_type: str | None, defaults: BatchDefaults, screened: bool
    ) -> _Prepared:
        """Prepare every event (:meth:`router.intake.Intake.prepare`); collect the rejected ones."""
        prepared = _Prepared()
        received_at = datetime.now(UTC)
        prepare = self.intake.prepare
        for index, raw in enumerate(events):
            result = prepare(
                raw, received_at=received_at, path_type=path_type, defaults=defaults, screened=screened
            )
            if isinstance(result, Accepted):
                prepared.accepted.append(result)
            else:
                prepared.rejected.append((index, result))
        return prepared

    async def _commit(self, source: Source, prepared: _Prepared) -> EnqueueResult:
        """Enqueue the accepted events, then dead-letter the rejected ones, durably.

        The enqueue is refused whole when it would take the queue past ``max_queue_depth``; the
        dead letters are written only after it succeeded, so that a client retrying a 503 does
        not leave them twice.
        """
        result = EnqueueResult(inserted=0, duplicates=0)
        jobs = [job for event in prepared.accepted for job in event.jobs(source)]
        if jobs:
            enqueue = self.queue.enqueue(jobs, max_depth=self.settings.max_queue_depth)
            [result] = await self._durably([enqueue])
            self.pressure.note_enqueued(result.inserted)
        dead: dict[str, list[NewJob]] = {}
        for _, rejected in prepared.rejected:
            dead.setdefault(rejected.dead_reason, []).extend(rejected.jobs(source))
        if dead:
            await self._durably([self.queue.add_dead(group, reason) for reason, group in dead.items()])
        if self._log_requests:
            for index, rejected in prepared.rejected:
                log.debug(
                    "event_rejected",
                    source=source.name,
                    index=index,
                    message_id=rejected.message_id,
                    error=rejected.reason,
                )
        return result

    async def _dead_body(self, source: Source, body: bytes, reason: str) -> None:
        """Keep an unusable request body as a dead letter (raw text, write keys masked)."""
        refused = self.intake.refuse_text(body, reason)
        await self._durably([self.queue.add_dead(refused.jobs(source), refused.dead_reason)])
        log.info("body_rejected", source=source.name, error=reason, bytes=len(body))

    async def _durably(self, writes: list[Coroutine[Any, Any, Any]]) -> list[Any]:
        """Run queue writes concurrently (they share one group commit); 503 if the queue fails."""
        self._in_flight += 1
        self._idle.clear()
        try:
            results = [await writes[0]] if len(writes) == 1 else list(await asyncio.gather(*writes))
        except QueueFull as full:
            self.outage.succeeded()  # the queue answered
            raise RequestRefused(
                503, "overloaded", f"not accepting events: {full}", retry_after=self.settings.retry_after
            ) from None
        except Exception as exc:
            self.outage.failed(exc)
            raise RequestRefused(
                503,
                "queue_unavailable",
                "the queue could not store the events; retry later",
                retry_after=self.settings.retry_after,
            ) from exc
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        self.outage.succeeded()
        return results

    def _count(self, outcome: _Outcome, name: str) -> None:
        """Metrics per request; one info line per batch, and per rejected single call."""
        source = outcome.source.name
        self.metrics.events_accepted.labels(source).inc(outcome.accepted)
        if outcome.rejected:
            self.metrics.events_rejected.labels(source).inc(outcome.rejected)
        if outcome.duplicates:
            self.metrics.events_duplicate.labels(source).inc(outcome.duplicates)
        first_error = outcome.body["rejected"][0]["error"] if outcome.rejected else None
        if name in BATCH_PATHS:
            log.info(
                "batch_accepted" if outcome.accepted else "batch_rejected",
                source=source,
                path=name,
                accepted=outcome.accepted,
                rejected=outcome.rejected,
                duplicates=outcome.duplicates,
                first_error=first_error,
            )
        elif first_error is not None:
            log.info("event_rejected", source=source, path=name, error=first_error)


async def _answer_and_hang_up(request: web.Request, response: web.Response) -> None:
    """Send ``response`` now and close the connection: the client is not waited for any longer."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass
    transport = request.transport
    if transport is not None:
        transport.close()


def _too_large(limit: int) -> RequestRefused:
    return RequestRefused(
        413, "request_too_large", f"the request body is over the limit of {limit} bytes (max_request_bytes)"
    )


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip ``data`` (one or more members) without ever holding more than ``limit`` + 1 bytes.

    Raises :class:`RequestRefused`: 413 past ``limit``, 400 for data that is not gzip or is cut short.
    """
    out: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise RequestRefused(
                400, "invalid_gzip", f"the body is not valid gzip data (Content-Encoding: gzip): {exc}"
            ) from None
        size += len(piece)
        if size > limit or inflater.unconsumed_tail:
            raise _too_large(limit)
        if not inflater.eof:
            raise RequestRefused(400, "invalid_gzip", "the gzip body is cut short (Content-Encoding: gzip)")
        out.append(piece)
        data = inflater.unused_data
    return b"".join(out)


def _outcome(
    source: Source, prepared: _Prepared, result: EnqueueResult, *, single: bool, listed: int
) -> _Outcome:
    """The answer: counts, and the first ``listed`` rejected events (the rest counted)."""
    destinations = max(1, len(source.destinations))
    accepted = len(prepared.accepted)
    duplicates = min(accepted, result.duplicates // destinations)
    rejected = [
        {
            "index": index,
            "messageId": r.message_id,
            "error": r.reason if single else f"batch[{index}]: {r.reason}",
        }
        for index, r in prepared.rejected[:listed]
    ]
    body: dict[str, Any] = {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}
    total = len(prepared.rejected)
    if total > listed:
        body["rejected_not_listed"] = total - listed
    if accepted:
        return _Outcome(200, body, source, accepted, total, duplicates)
    first = rejected[0]["error"]
    if single:
        body = {"code": "invalid_event", "message": first, **body}
    else:
        body = {"code": "all_rejected", "message": f"every event was rejected; the first: {first}", **body}
    return _Outcome(400, body, source, 0, total, 0)
