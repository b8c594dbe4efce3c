"""Ingest over HTTP (aiohttp test client on loopback), against the memory and SQLite queues.

Every error path answers 4xx with a JSON body naming the problem (never 5xx); rejected events and
unusable bodies end up in the dead letters; accepted events are queued once per destination.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from router.app import INGEST, PAUSED, PRESSURE, build_app
from router.destination import Destination
from router.logs import configure_logging, reset_logging
from router.queue import Job, JobState, Queue, open_queue
from router.settings import Settings, Source

WRITE_KEY = "wk_live_0123456789abcdef"
FANOUT_KEY = "wk_fanout_fedcba9876543210"
PRIVATE_KEY = "pk_live_abcdefabcdef0123"
EU_PRIVATE_KEY = "pk_eu_9999888877776666"
SECRETS = (WRITE_KEY, FANOUT_KEY, PRIVATE_KEY, EU_PRIVATE_KEY)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def make_settings(data_dir: Path, **changes: Any) -> Settings:
    settings = Settings(
        data_dir=data_dir,
        min_free_disk_bytes=0,
        sources=(
            Source(name="web", write_key=WRITE_KEY, destinations=("klaviyo",)),
            Source(name="fanout", write_key=FANOUT_KEY, destinations=("klaviyo", "eu")),
        ),
        destinations=(
            Destination(name="klaviyo", private_key=PRIVATE_KEY),
            Destination(name="eu", private_key=EU_PRIVATE_KEY),
        ),
    )
    return replace(settings, **changes)


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def track(index: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": f"user-{index}",
        "event": "Order Completed",
        "messageId": f"m-{index}",
    } | fields


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Queue:
    """A queue of each backend, not yet open (the app opens and closes it)."""
    return open_queue("memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'queue.db'}")


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, backend: Queue, tmp_path: Path) -> MakeClient:
    """A test client for an app built from the test settings with ``changes`` applied."""

    async def make(**changes: Any) -> Client:
        return await aiohttp_client(build_app(make_settings(tmp_path, **changes), backend))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def jobs(queue: Queue, state: JobState = JobState.PENDING) -> list[Job]:
    return await queue.list_jobs(state, limit=10_000)


async def post(
    client: Client, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await client.post(
        path, data=data, headers=headers if headers is not None else basic(WRITE_KEY)
    )
    return response.status, await response.json()


class TestAuth:
    """HTTP Basic with the write key as user name, or writeKey in the body; else 401 JSON."""

    async def test_no_key(self, client: Client) -> None:
        """No credentials at all → 401 missing_write_key."""
        status, body = await post(client, "/v1/batch", {"batch": [track(1)]}, headers={})
        assert status == 401
        assert body["code"] == "missing_write_key" and "write key" in body["message"]

    async def test_unknown_basic_key(self, client: Client, backend: Queue) -> None:
        """An unknown Basic user name → 401 invalid_write_key, nothing stored."""
        status, body = await post(client, "/v1/track", track(1), headers=basic("wk_unknown"))
        assert (status, body["code"]) == (401, "invalid_write_key")
        assert await jobs(backend) == [] and await jobs(backend, JobState.DEAD) == []

    async def test_unknown_body_key(self, client: Client) -> None:
        """An unknown writeKey in the body → 401."""
        status, body = await post(client, "/v1/batch", {"batch": [track(1)], "writeKey": "nope"}, headers={})
        assert (status, body["code"]) == (401, "invalid_write_key")

    async def test_malformed_basic(self, client: Client) -> None:
        """Basic credentials that are not base64 → 401."""
        status, body = await post(client, "/v1/track", track(1), headers={"Authorization": "Basic %%%"})
        assert (status, body["code"]) == (401, "invalid_authorization")

    async def test_body_write_key(self, client: Client, backend: Queue) -> None:
        """Segment style: writeKey in the body (with a non-Basic Authorization) is enough."""
        status, body = await post(
            client, "/v1/track", track(1, writeKey=WRITE_KEY), headers={"Authorization": "Bearer oauth-token"}
        )
        assert (status, body["accepted"]) == (200, 1)
        (job,) = await jobs(backend)
        assert job.source == "web"
        assert "writeKey" not in job.message()

    async def test_basic_wins_over_body(self, client: Client, backend: Queue) -> None:
        """When both are present the Basic key names the source."""
        status, _ = await post(
            client, "/v1/batch", {"batch": [track(1)], "writeKey": WRITE_KEY}, basic(FANOUT_KEY)
        )
        assert status == 200
        assert {job.source for job in await jobs(backend)} == {"fanout"}


class TestSizeLimits:
    """Request and event size caps answer 413 naming the limit; inside a batch, per event."""

    async def test_request_too_large(self, make_client: MakeClient) -> None:
        """A body over max_request_bytes → 413 request_too_large naming the setting."""
        client = await make_client(max_request_bytes=1000)
        status, body = await post(client, "/v1/batch", {"batch": [track(i) for i in range(40)]})
        assert status == 413
        assert body["code"] == "request_too_large" and "1000 bytes (max_request_bytes)" in body["message"]

    async def test_gzip_bomb_capped(self, make_client: MakeClient) -> None:
        """The decompressed size counts: a small gzip body inflating past the limit → 413."""
        client = await make_client(max_request_bytes=100_000)
        padding = " " * 1_000_000
        data = gzip.compress(orjson.dumps({"batch": [track(1)]})[:-1] + padding.encode() + b"}")
        assert len(data) < 100_000
        headers = basic(WRITE_KEY) | {"Content-Encoding": "gzip"}
        status, body = await post(client, "/v1/batch", data, headers)
        assert (status, body["code"]) == (413, "request_too_large")

    async def test_single_event_too_large(self, make_client: MakeClient, backend: Queue) -> None:
        """A single call over max_event_bytes → 413 event_too_large, kept as a dead letter."""
        client = await make_client(max_event_bytes=500)
        status, body = await post(client, "/v1/track", track(1, properties={"blob": "x" * 600}))
        assert status == 413
        assert body["code"] == "event_too_large" and "500 bytes (max_event_bytes)" in body["message"]
        (dead,) = await jobs(backend, JobState.DEAD)
        assert dead.last_error is not None and "max_event_bytes" in dead.last_error

    async def test_event_too_large_in_batch(self, make_client: MakeClient, backend: Queue) -> None:
        """In a batch, only the oversize event is rejected; the others are accepted."""
        client = await make_client(max_event_bytes=500)
        batch = [track(0), track(1, properties={"blob": "x" * 600}), track(2)]
        status, body = await post(client, "/v1/batch", {"batch": batch})
        assert (status, body["accepted"]) == (200, 2)
        (rejected,) = body["rejected"]
        assert rejected["index"] == 1 and rejected["messageId"] == "m-1"
        assert (
            rejected["error"].startswith("batch[1]: the event is ")
            and "(max_event_bytes)" in rejected["error"]
        )
        assert [job.message_id for job in await jobs(backend)] == ["m-0", "m-2"]


class TestBodies:
    """Malformed bodies are 400 JSON errors; with a known source, the raw body is a dead letter."""

    async def test_malformed_json(self, client: Client, backend: Queue) -> None:
        """Invalid JSON → 400 invalid_json; the raw text is kept (write key masked)."""
        raw = b'{"writeKey": "' + WRITE_KEY.encode() + b'", "batch": [{"type": "track",'
        status, body = await post(client, "/v1/batch", raw)
        assert (status, body["code"]) == (400, "invalid_json")
        (dead,) = await jobs(backend, JobState.DEAD)
        assert dead.source == "web" and dead.last_error is not None and "not valid JSON" in dead.last_error
        assert dead.message()["raw_body"].startswith('{"writeKey": "***", "batch"')
        assert WRITE_KEY.encode() not in dead.payload

    async def test_bad_gzip(self, client: Client) -> None:
        """Content-Encoding: gzip with a body that is not gzip → 400 invalid_gzip."""
        status, body = await post(
            client, "/v1/batch", b"not gzip", basic(WRITE_KEY) | {"Content-Encoding": "gzip"}
        )
        assert (status, body["code"]) == (400, "invalid_gzip")

    async def test_truncated_gzip(self, client: Client) -> None:
        """A gzip stream cut short → 400 invalid_gzip."""
        data = gzip.compress(orjson.dumps({"batch": [track(1)] * 20}))[:-12]
        status, body = await post(client, "/v1/batch", data, basic(WRITE_KEY) | {"Content-Encoding": "gzip"})
        assert (status, body["code"]) == (400, "invalid_gzip")

    async def test_gzip_accepted(self, client: Client, backend: Queue) -> None:
        """A gzip body (as rudder-sdk-python sends) is decompressed and ingested."""
        data = gzip.compress(orjson.dumps({"batch": [track(1), track(2)]}))
        status, body = await post(client, "/v1/batch", data, basic(WRITE_KEY) | {"Content-Encoding": "gzip"})
        assert (status, body["accepted"]) == (200, 2)
        assert len(await jobs(backend)) == 2

    async def test_unsupported_encoding(self, client: Client) -> None:
        """Encodings other than gzip → 415 naming the encoding."""
        status, body = await post(client, "/v1/batch", b"x", basic(WRITE_KEY) | {"Content-Encoding": "br"})
        assert (status, body["code"]) == (415, "unsupported_encoding")

    @pytest.mark.parametrize(
        ("path", "payload", "code"),
        [
            ("/v1/batch", [track(1)], "invalid_batch"),
            ("/v1/batch", {"batch": {"0": track(1)}}, "invalid_batch"),
            ("/v1/batch", {"events": [track(1)]}, "invalid_batch"),
            ("/v1/batch", {"batch": [track(1)], "context": "web"}, "invalid_batch"),
            ("/v1/track", [track(1)], "invalid_event"),
        ],
    )
    async def test_unusable_shape(
        self, client: Client, backend: Queue, path: str, payload: Any, code: str
    ) -> None:
        """Bodies of the wrong shape → 400 with a code, and the body in the dead letters."""
        status, body = await post(client, path, payload)
        assert (status, body["code"]) == (400, code)
        assert len(await jobs(backend, JobState.DEAD)) == 1

    async def test_empty_batch(self, client: Client) -> None:
        """An empty batch → 400 empty_batch."""
        status, body = await post(client, "/v1/batch", {"batch": []})
        assert (status, body["code"]) == (400, "empty_batch")


class TestEvents:
    """Per-event validation: 200 with the rejected indexes when any event is accepted, 400 when none."""

    async def test_partly_bad_batch(self, client: Client, backend: Queue) -> None:
        """Bad events are listed by index and kept as dead letters; the good ones are queued."""
        batch = [
            track(0),
            "not an object",
            {"type": "identify", "messageId": "m-2", "traits": {"email": "a@example.com"}},
            {"type": "pageview", "userId": "u", "messageId": "m-3"},
            track(4),
            [1, 2],
        ]
        status, body = await post(client, "/v1/batch", {"batch": batch})
        assert status == 200
        assert (body["accepted"], body["duplicates"]) == (2, 0)
        assert [(r["index"], r["messageId"]) for r in body["rejected"]] == [
            (1, None),
            (2, "m-2"),
            (3, "m-3"),
            (5, None),
        ]
        errors = [r["error"] for r in body["rejected"]]
        assert errors[0] == "batch[1]: an event must be a JSON object, got a string"
        assert errors[1] == 'batch[2]: "userId" or "anonymousId" is required'
        assert errors[2].startswith('batch[3]: "type" must be one of identify, track')
        assert errors[3] == "batch[5]: an event must be a JSON object, got an array"
        assert [job.message_id for job in await jobs(backend)] == ["m-0", "m-4"]
        dead = await jobs(backend, JobState.DEAD)
        assert len(dead) == 4 and {job.source for job in dead} == {"web"}
        reasons = sorted(job.last_error or "" for job in dead)
        assert all(reason.startswith("rejected at ingest: ") for reason in reasons)
        assert any('"userId" or "anonymousId" is required' in reason for reason in reasons)
        assert {"raw_event": "not an object"} in [job.message() for job in dead]

    async def test_partly_bad_batch_of_objects(self, client: Client, backend: Queue) -> None:
        """A batch of objects is read partly (events.read_batch): a bad event is still explained
        and kept whole, its raw parts as they came, and the good ones are stored whole."""
        bad = {"type": "identify", "userId": "u", "messageId": "m-1", "traits": ["x"], "context": {"a": [1]}}
        good = track(0, properties={"revenue": 9.5, "items": [{"sku": "é"}]})
        status, body = await post(client, "/v1/batch", {"batch": [good, bad]})
        assert status == 200 and body["accepted"] == 1
        assert [r["error"] for r in body["rejected"]] == [
            'batch[1]: "traits" must be an object, got an array'
        ]
        [stored] = await jobs(backend)
        assert {k: v for k, v in stored.message().items() if k in good} == good
        [dead] = await jobs(backend, JobState.DEAD)
        assert {k: v for k, v in dead.message().items() if k in bad} == bad

    async def test_all_rejected(self, client: Client, backend: Queue) -> None:
        """Every event rejected → 400 with the same body shape plus code and message."""
        status, body = await post(client, "/v1/batch", {"batch": [{"type": "track", "event": "E"}]})
        assert status == 400
        assert body["code"] == "all_rejected" and body["accepted"] == 0
        assert body["rejected"][0]["error"] == 'batch[0]: "userId" or "anonymousId" is required'
        assert await jobs(backend) == []

    async def test_single_missing_ids(self, client: Client, backend: Queue) -> None:
        """A single call without userId/anonymousId → 400 naming the fields, kept as a dead letter."""
        status, body = await post(client, "/v1/identify", {"traits": {"email": "a@example.com"}})
        assert status == 400
        assert body["code"] == "invalid_event"
        assert body["message"] == '"userId" or "anonymousId" is required'
        assert body["rejected"][0]["index"] == 0
        assert len(await jobs(backend, JobState.DEAD)) == 1

    async def test_single_call_type_from_path(self, client: Client, backend: Queue) -> None:
        """The path sets the type; the message is normalised before it is queued."""
        status, body = await post(
            client, "/v1/screen", {"type": "track", "anonymousId": "anon-1", "name": "Home"}
        )
        assert (status, body) == (200, {"accepted": 1, "duplicates": 0, "rejected": []})
        (job,) = await jobs(backend)
        message = job.message()
        assert message["type"] == "screen" and message["messageId"] == job.message_id
        assert message["receivedAt"].endswith("Z") and message["timestamp"] == message["receivedAt"]
        assert job.ordering_key == "a:anon-1"

    async def test_batch_defaults_merged(self, client: Client, backend: Queue) -> None:
        """Batch-level sentAt and context reach events that lack them (clock skew corrected)."""
        body = {
            "batch": [track(1, originalTimestamp="2026-11-20T08:00:00.000Z")],
            "sentAt": "2026-11-20T08:00:05.000Z",
            "context": {"library": {"name": "analytics-python"}},
        }
        status, _ = await post(client, "/v1/batch", body)
        assert status == 200
        (job,) = await jobs(backend)
        message = job.message()
        assert message["sentAt"] == "2026-11-20T08:00:05.000Z"
        assert message["context"] == {"library": {"name": "analytics-python"}}
        assert message["timestamp"] != message["receivedAt"]

    async def test_one_job_per_destination(self, client: Client, backend: Queue) -> None:
        """A source routed to two destinations gets one job for each."""
        status, body = await post(client, "/v1/batch", {"batch": [track(1), track(2)]}, basic(FANOUT_KEY))
        assert (status, body["accepted"]) == (200, 2)
        pairs = sorted((job.message_id, job.destination) for job in await jobs(backend))
        assert pairs == [("m-1", "eu"), ("m-1", "klaviyo"), ("m-2", "eu"), ("m-2", "klaviyo")]

    async def test_duplicates_accepted_not_queued(self, client: Client, backend: Queue) -> None:
        """The same (source, messageId) again is accepted, counted as duplicate, and not queued twice."""
        batch = {"batch": [track(1), track(2)]}
        assert (await post(client, "/v1/batch", batch))[1]["duplicates"] == 0
        status, body = await post(client, "/v1/batch", batch)
        assert (status, body["accepted"], body["duplicates"]) == (200, 2, 2)
        status, body = await post(client, "/v1/batch", {"batch": [track(3), track(3)]})
        assert (body["accepted"], body["duplicates"]) == (2, 1)
        assert sorted(job.message_id for job in await jobs(backend)) == ["m-1", "m-2", "m-3"]

    async def test_same_message_id_other_source(self, client: Client, backend: Queue) -> None:
        """Deduplication is per source: another source's same messageId is queued."""
        await post(client, "/v1/track", track(1))
        await post(client, "/v1/track", track(1), basic(FANOUT_KEY))
        assert sorted((job.source, job.destination) for job in await jobs(backend)) == [
            ("fanout", "eu"),
            ("fanout", "klaviyo"),
            ("web", "klaviyo"),
        ]

    async def test_import_is_a_batch(self, client: Client, backend: Queue) -> None:
        """/v1/import takes the batch body."""
        status, body = await post(client, "/v1/import", {"batch": [track(1)]})
        assert (status, body["accepted"]) == (200, 1)


class TestBackpressure:
    """A full queue or a nearly full disk answers 503 with Retry-After, before reading the body."""

    async def test_queue_depth(self, make_client: MakeClient) -> None:
        """Past max_queue_depth jobs waiting, new requests get 503 overloaded."""
        client = await make_client(max_queue_depth=2, retry_after=9)
        assert (await post(client, "/v1/batch", {"batch": [track(1), track(2)]}))[0] == 200
        response = await client.post("/v1/track", data=orjson.dumps(track(3)), headers=basic(WRITE_KEY))
        assert response.status == 503 and response.headers["Retry-After"] == "9"
        body = await response.json()
        assert body["code"] == "overloaded" and "max_queue_depth" in body["message"]
        await client.app[PRESSURE].refresh()
        assert client.app[PRESSURE].depth == 2

    async def test_disk_space(self, make_client: MakeClient) -> None:
        """Less free disk than min_free_disk_bytes → 503."""
        client = await make_client(min_free_disk_bytes=1 << 62)
        status, body = await post(client, "/v1/track", track(1))
        assert status == 503 and "min_free_disk_bytes" in body["message"]

    async def test_shutting_down(self, client: Client) -> None:
        """While draining, new requests get 503 shutting_down."""
        client.app[INGEST].draining = True
        status, body = await post(client, "/v1/track", track(1))
        assert (status, body["code"]) == (503, "shutting_down")


class TestProbes:
    """/health, /ready and /metrics."""

    async def test_health(self, client: Client) -> None:
        """/health answers 200 while the process runs."""
        response = await client.get("/health")
        assert response.status == 200 and (await response.json())["status"] == "ok"

    async def test_ready_and_paused(self, client: Client) -> None:
        """/ready is 200 until delivery pauses a destination, then 503 naming it."""
        assert (await client.get("/ready")).status == 200
        client.app[PAUSED].pause("klaviyo", "Klaviyo answered 401")
        response = await client.get("/ready")
        body = await response.json()
        assert response.status == 503
        assert body["problems"] == ["destination klaviyo paused: Klaviyo answered 401"]
        client.app[PAUSED].resume("klaviyo")
        assert (await client.get("/ready")).status == 200

    async def test_metrics(self, client: Client) -> None:
        """Counters per source, a latency histogram and the queue depth, in Prometheus text."""
        await post(client, "/v1/batch", {"batch": [track(1), {"type": "track"}]})
        await post(client, "/v1/batch", {"batch": [track(1)]})
        response = await client.get("/metrics")
        text = await response.text()
        assert response.status == 200 and response.content_type == "text/plain"
        assert 'router_events_accepted_total{source="web"} 2.0' in text
        assert 'router_events_rejected_total{source="web"} 1.0' in text
        assert 'router_events_duplicate_total{source="web"} 1.0' in text
        assert 'router_http_request_duration_seconds_count{path="batch"} 2.0' in text
        assert "router_queue_depth " in text
        assert WRITE_KEY not in text


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
class TestQueueFailure:
    """A queue that cannot store answers 503 (the client retries), never a silent 200."""

    async def test_closed_queue(self, client: Client, backend: Queue) -> None:
        """Writes failing → 503 queue_unavailable with Retry-After."""
        await backend.close()
        response = await client.post("/v1/track", data=orjson.dumps(track(1)), headers=basic(WRITE_KEY))
        assert response.status == 503 and "Retry-After" in response.headers
        assert (await response.json())["code"] == "queue_unavailable"
        assert (await client.get("/ready")).status == 503


class TestShutdown:
    """Closing the app lets in-flight requests finish their commit; each 200 is in the queue."""

    async def test_in_flight_commits_finish(self, aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
        """Requests racing the shutdown either fail or are durably queued."""
        url = f"sqlite:///{tmp_path / 'queue.db'}"
        client = await aiohttp_client(build_app(make_settings(tmp_path), open_queue(url)))

        async def send(index: int) -> str | None:
            try:
                response = await client.post(
                    "/v1/track", data=orjson.dumps(track(index)), headers=basic(WRITE_KEY)
                )
            except Exception:
                return None
            return f"m-{index}" if response.status == 200 else None

        sends = [asyncio.create_task(send(i)) for i in range(30)]
        await asyncio.sleep(0)
        await client.close()
        acked = {m for m in await asyncio.gather(*sends) if m}
        reopened = open_queue(url)
        await reopened.open()
        try:
            stored = {job.message_id for job in await jobs(reopened)}
        finally:
            await reopened.close()
        assert acked <= stored


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """structlog and stdlib logging rendered as JSON lines into a buffer, at debug level."""
    stream = io.StringIO()
    configure_logging("debug", "json", secrets=SECRETS, stream=stream)
    yield stream
    reset_logging()


class TestNoSecretsLeak:
    """No response body, log line or dead letter contains a configured key."""

    async def test_secrets_never_echoed(
        self, make_client: MakeClient, backend: Queue, log_stream: io.StringIO
    ) -> None:
        """A tour of every path, then a search for each secret everywhere."""
        client = await make_client(log_level="debug", max_event_bytes=400)
        seen: list[bytes] = []

        async def send(path: str, data: bytes, headers: dict[str, str]) -> None:
            response = await client.post(path, data=data, headers=headers)
            seen.append(await response.read())

        key_body = orjson.dumps(
            {"writeKey": WRITE_KEY, "batch": [track(1), {"type": "track", "writeKey": WRITE_KEY}]}
        )
        await send("/v1/batch", key_body, {})
        await send("/v1/batch", key_body, basic(FANOUT_KEY))
        await send("/v1/track", orjson.dumps(track(2, writeKey=WRITE_KEY)), {})
        await send("/v1/track", orjson.dumps(track(3, writeKey=WRITE_KEY, properties={"x": "y" * 500})), {})
        await send("/v1/batch", b'{"writeKey": "' + WRITE_KEY.encode() + b'", "batch": [', basic(WRITE_KEY))
        await send("/v1/batch", key_body, basic("wk_wrong_" + WRITE_KEY))
        await send(
            "/v1/batch", b"{}", {"Authorization": "Basic " + base64.b64encode(PRIVATE_KEY.encode()).decode()}
        )
        await send("/v1/batch", b"\x1f\x8b garbage", basic(WRITE_KEY) | {"Content-Encoding": "gzip"})
        seen.append(await (await client.get("/metrics")).read())
        seen.append(await (await client.get("/ready")).read())
        stored = await jobs(backend) + await jobs(backend, JobState.DEAD)
        assert len(stored) >= 6
        texts = [
            *seen,
            *(job.payload for job in stored),
            *((job.last_error or "").encode() for job in stored),
        ]
        logged = log_stream.getvalue()
        assert '"event":"request_handled"' in logged and '"event":"event_rejected"' in logged
        for secret in SECRETS:
            assert secret not in logged
            for text in texts:
                assert secret.encode() not in text


async def test_cleanup_closes_queue(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    """The app opens the queue on start-up and closes it on clean-up."""
    queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
    client = await aiohttp_client(build_app(make_settings(tmp_path), queue))
    await queue.ping()
    await client.close()
    with pytest.raises(RuntimeError):
        await queue.ping()


# --- issue 12: nothing a client sends makes ingest answer 5xx, hold work or keep a key ----------


async def raw_request(client: Client, head: bytes, body: bytes = b"", *, wait: float = 5.0) -> bytes:
    """Send bytes as they are (headers aiohttp's client would refuse to send) and read the answer."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


class TestClientInputNever5xx:
    """The 500s of issue 12 (each reproduced on main): now 4xx with a JSON error and, where the
    source is known, a dead letter."""

    async def test_timestamps_out_of_range(self, client: Client, backend: Queue) -> None:
        """sentAt 9999 with originalTimestamp 0001: rejected per event on every path."""
        bad = track(1, originalTimestamp="0001-01-01T00:00:00Z")
        status, body = await post(
            client, "/v1/batch", {"batch": [bad, track(2)], "sentAt": "9999-12-31T23:59:59Z"}
        )
        assert status == 200 and body["rejected"][0]["error"].startswith(
            'batch[0]: "timestamp" cannot be derived'
        )
        status, body = await post(client, "/v1/track", bad | {"sentAt": "9999-12-31T23:59:59Z"})
        assert (status, body["code"]) == (400, "invalid_event")
        assert len(await jobs(backend, JobState.DEAD)) == 2

    @pytest.mark.parametrize("path", ["/v1/batch", "/v1/import", "/v1/track"])
    async def test_nesting_past_what_parsers_take(self, client: Client, backend: Queue, path: str) -> None:
        """1000 levels: the body is refused whole before any parser recurses, and kept."""
        event = track(1, properties={"d": "@"})
        raw = orjson.dumps({"batch": [event]} if "track" not in path else event)
        status, body = await post(client, path, raw.replace(b'"@"', b"[" * 1000 + b"]" * 1000))
        assert (status, body["code"]) == (400, "too_deep") and "(max_nesting_depth)" in body["message"]
        (dead,) = await jobs(backend, JobState.DEAD)
        assert dead.message()["raw_body"].startswith("{")

    async def test_nesting_limit_per_event(self, make_client: MakeClient, backend: Queue) -> None:
        """Past max_nesting_depth (but parseable) only the deep event is refused, naming the field."""
        client = await make_client(max_nesting_depth=10)
        status, body = await post(
            client, "/v1/batch", {"batch": [track(1, properties={"d": nested(9)}), track(2)]}
        )
        assert status == 200 and body["accepted"] == 1
        assert (
            body["rejected"][0]["error"]
            == 'batch[0]: "properties" nests deeper than 10 levels (max_nesting_depth)'
        )
        status, body = await post(client, "/v1/track", track(3, context={"d": nested(9)}))
        assert (status, body["message"]) == (400, '"context" nests deeper than 10 levels (max_nesting_depth)')

    async def test_numbers_out_of_range(self, client: Client, backend: Queue) -> None:
        """1e999 as userId or inside properties: a rejection of that event, not a 500 nor a 200."""
        raw = (
            b'{"batch": [{"type": "track", "event": "E", "userId": 1e999, "messageId": "m-1"},'
            b' {"type": "track", "event": "E", "userId": "u", "messageId": "m-2", "properties": {"v": 1e999}},'
            b' {"type": "track", "event": "E", "userId": "u", "messageId": "m-3"}]}'
        )
        status, body = await post(client, "/v1/batch", raw)
        assert (status, body["accepted"]) == (200, 1)
        assert [r["error"].split(" holds")[0] for r in body["rejected"]] == [
            'batch[0]: "userId"',
            'batch[1]: "properties"',
        ]
        assert [job.message_id for job in await jobs(backend)] == ["m-3"]
        for dead in await jobs(backend, JobState.DEAD):
            assert "1e999" in dead.message()["raw_text"]  # kept, and readable by the dead-letter tools

    @pytest.mark.parametrize("credentials", ["Basic w\xe9\xe9", "Basic \xff\xfe", "Basic " + "é" * 8])
    async def test_non_ascii_basic_auth(self, client: Client, credentials: str) -> None:
        """Credentials that are not base64 ASCII → 401 invalid_authorization."""
        answer = await raw_request(
            client,
            b"POST /v1/track HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\nAuthorization: "
            + credentials.encode("latin-1" if credentials.isascii() or "\xff" in credentials else "utf-8"),
            b"{}",
        )
        assert status_of(answer) == 401 and b'"invalid_authorization"' in answer

    async def test_unexpected_errors_are_counted_json_500s(self, make_client: MakeClient) -> None:
        """The last-resort middleware: a handler's bug is a logged 500 with a JSON body, counted."""
        client = await make_client()
        client.app[INGEST].intake.screen = None  # type: ignore[assignment]  # break the handler
        status, body = await post(client, "/v1/batch", {"batch": [track(1)]})
        assert (status, body["code"]) == (500, "internal_error")
        response = await client.get("/no/such/path")
        assert response.status == 404 and (await response.json())["code"] == "not_found"
        text = await (await client.get("/metrics")).text()
        assert 'router_http_requests_total{path="batch",status="500"} 1.0' in text
        assert 'router_http_requests_total{path="unmatched",status="404"} 1.0' in text


class TestBoundedWork:
    """A request's work is bounded: events, listed rejections, time to send the body."""

    async def test_too_many_events(self, make_client: MakeClient, backend: Queue) -> None:
        """More events than max_batch_events → 413 naming the limit; nothing stored."""
        client = await make_client(max_batch_events=10)
        status, body = await post(client, "/v1/batch", {"batch": [track(i) for i in range(11)]})
        assert (status, body["code"]) == (413, "too_many_events") and "10 events" in body["message"]
        assert "(max_batch_events)" in body["message"]
        assert await jobs(backend) == [] and await jobs(backend, JobState.DEAD) == []
        assert (await post(client, "/v1/batch", {"batch": [track(i) for i in range(10)]}))[0] == 200

    async def test_rejections_listed_up_to_a_limit(self, make_client: MakeClient, backend: Queue) -> None:
        """Past max_listed_rejections the rest are counted; every one is still a dead letter."""
        client = await make_client(max_listed_rejections=3)
        status, body = await post(
            client, "/v1/batch", {"batch": [track(0), *({"type": "track"} for _ in range(10))]}
        )
        assert status == 200 and [r["index"] for r in body["rejected"]] == [1, 2, 3]
        assert body["rejected_not_listed"] == 7
        assert len(await jobs(backend, JobState.DEAD)) == 10

    async def test_hostile_body_is_cheap(self, client: Client, backend: Queue) -> None:
        """4 MB of 1 390 000 empty events: refused fast with little memory; /health answers meanwhile."""
        body = b'{"batch":[' + b"{}," * 1_389_999 + b"{}]}"
        tracemalloc.start()
        try:
            started = time.perf_counter()
            hostile = asyncio.create_task(
                client.post("/v1/batch", data=io.BytesIO(body), headers=basic(WRITE_KEY))
            )
            await asyncio.sleep(0)
            health = await client.get("/health")
            response = await hostile
            status, answer = response.status, await response.json()
            elapsed = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (status, answer["code"]) == (413, "too_many_events") and health.status == 200
        assert elapsed < 2.0, elapsed  # about 0.1 s on a quiet machine (tracemalloc slows it)
        assert peak < 64 * 1024 * 1024, peak  # the body, a copy or two: not 1.29 GB
        assert await jobs(backend, JobState.DEAD) == []

    async def test_slow_clients_are_cut_off(self, make_client: MakeClient) -> None:
        """300 connections sending half a body: each gets 408 and is closed after body_timeout."""
        client = await make_client(body_timeout=0.5)
        head = b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n" + b"\r\n".join(
            f"{k}: {v}".encode() for k, v in basic(WRITE_KEY).items()
        )
        started = time.perf_counter()
        answers = await asyncio.gather(*(raw_request(client, head, b"{" * 500, wait=10) for _ in range(300)))
        elapsed = time.perf_counter() - started
        assert {status_of(a) for a in answers} == {408}
        assert all(b'"body_timeout"' in a for a in answers)  # read() returned: the server hung up
        assert elapsed < 8, elapsed
        assert (await client.get("/health")).status == 200


class TestMaxDepthHolds:
    """max_queue_depth is checked with the commit, not only from a sample before the body."""

    async def test_one_large_batch(self, make_client: MakeClient, backend: Queue) -> None:
        """499 queued, then a batch of 10 000 with max_queue_depth 500: refused whole, 503."""
        client = await make_client(max_queue_depth=500)
        assert (await post(client, "/v1/batch", {"batch": [track(i) for i in range(499)]}))[0] == 200
        response = await client.post(
            "/v1/batch",
            data=orjson.dumps({"batch": [track(i) for i in range(1000, 11_000)]}),
            headers=basic(WRITE_KEY),
        )
        body = await response.json()
        assert (response.status, body["code"]) == (503, "overloaded") and "Retry-After" in response.headers
        assert "(max_queue_depth)" in body["message"]
        assert len(await jobs(backend)) == 499

    async def test_concurrent_batches(self, make_client: MakeClient, backend: Queue) -> None:
        """40 batches of 100 at once on an empty queue with max_queue_depth 500: 5 accepted."""
        client = await make_client(max_queue_depth=500)
        results = await asyncio.gather(
            *(
                post(client, "/v1/batch", {"batch": [track(b * 1000 + i) for i in range(100)]})
                for b in range(40)
            )
        )
        assert sorted(status for status, _ in results) == [200] * 5 + [503] * 35
        assert len(await jobs(backend)) == 500


class TestWriteKeysNeverStored:
    """A write key inside an event is stored as *** wherever it is (issue 12, item 8)."""

    async def test_keys_in_events(self, client: Client, backend: Queue) -> None:
        """context.writeKey, a string holding a key, another source's key, a type equal to a key."""
        batch = [
            track(1, context={"writeKey": WRITE_KEY}, properties={"note": f"sent with {FANOUT_KEY}"}),
            {"type": WRITE_KEY, "userId": "u", "messageId": "m-2"},
        ]
        status, body = await post(client, "/v1/batch", {"batch": batch})
        assert status == 200 and body["rejected"][0]["error"].endswith('got "***"')
        (job,) = await jobs(backend)
        assert job.message()["context"] == {"writeKey": "***"}
        assert job.message()["properties"] == {"note": "sent with ***"}
        (dead,) = await jobs(backend, JobState.DEAD)
        for text in (job.payload, dead.payload, (dead.last_error or "").encode(), orjson.dumps(body)):
            assert WRITE_KEY.encode() not in text and FANOUT_KEY.encode() not in text
