"""Several ``klaviyo-router serve`` processes (HTTP and delivery each) on one PostgreSQL database,
against the fake Klaviyo (rate limits on) in a process of its own.

Senders post ``track`` batches over plain HTTP, each to the next router in turn, as a client behind
a load balancer would: a sender's users get their events one batch at a time, the next only after
the last was acknowledged with 200; anything else (503, a refused connection) is sent again, to
the next router. So each user's events have an order, which Klaviyo must see them in.

- ``test_three_routers_share_the_work_and_survive_a_sigkill``: one of three routers is SIGKILLed
  mid-run and restarted. Every acknowledged event reaches the fake; the only events sent twice are
  jobs that were in flight when the process died (their lease ran out and another router sent them
  again: the fake drops them by ``unique_id`` and counts them); each user's events arrive in order;
  under 1 % of the requests are answered 429, the routers sharing one account's rate limits.
- ``test_routers_ride_out_lost_database_connections``: two routers reach the database through a
  proxy that the test cuts for a while, and their server processes are terminated again and again.
  While the database is away ingest answers 503 with ``Retry-After`` (never 200) and ``/ready``
  says why; afterwards the routers carry on by themselves and every acknowledged event arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from postgres_server import CuttableProxy, create_database, drop_database, terminate_connections, unique_name
from processes import Child, FakeControl, child, eventually

from router.queue import JobState
from router.queue.postgres import PostgresQueue

pytestmark = pytest.mark.postgres

WRITE_KEY = "wk_cluster_0123456789"
PRIVATE_KEY = "pk_cluster_0123456789"
#: Senders, users per sender (one event each per batch) and batches per sender.
SENDERS, USERS, ROUNDS = 6, 10, 20
EVENTS = SENDERS * USERS * ROUNDS
#: Seconds a leased job stays leased: how long the killed router's jobs wait for another.
LEASE = 3.0
#: Share of Klaviyo's limits the fake enforces and the routers pace to: 2 event bulk jobs a second,
#: so that delivery lasts a few seconds and batches are in flight whenever the SIGKILL comes.
RATE_LIMIT_SCALE = 0.2
#: Seconds a sender waits between batches (ingest spreads over a couple of seconds).
SEND_PAUSE = 0.03

CONFIG = """
data_dir = "{data_dir}"
[server]
host = "127.0.0.1"
port = 0
[queue]
url = "{queue_url}"
[limits]
min_free_disk_bytes = 0
retry_after = 1
[delivery]
workers = 2
batch_size = 100
rate_limit_scale = {scale}
lease = {lease}
timeout = 2
planners = 0
[log]
level = "info"
[[sources]]
name = "web"
write_key = "{write_key}"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "{private_key}"
base_url = "{base_url}"
"""


def message_id(sender: int, user: int, seq: int) -> str:
    return f"s{sender}-u{user}-{seq:04d}"


def batch_body(sender: int, seq: int) -> bytes:
    events = [
        {
            "type": "track",
            "userId": f"s{sender}-u{user}",
            "event": "Cluster Test",
            "messageId": message_id(sender, user, seq),
            "properties": {"seq": seq},
        }
        for user in range(USERS)
    ]
    return orjson.dumps({"batch": events})


@dataclass
class Traffic:
    """What the senders were told: statuses, and the events acknowledged with 200."""

    urls: list[str]
    accepted: set[str] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)
    #: 503 answers that came without a Retry-After header.
    bare_503s: int = 0
    #: When each request acknowledged with 200 was sent and answered (monotonic clock).
    acknowledged: list[tuple[float, float]] = field(default_factory=list)
    _next: itertools.count[int] = field(default_factory=itertools.count)

    def url(self) -> str:
        return self.urls[next(self._next) % len(self.urls)]

    async def send_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._sender(session, sender) for sender in range(SENDERS)))

    async def _sender(self, session: aiohttp.ClientSession, sender: int) -> None:
        headers = {
            "Authorization": aiohttp.encode_basic_auth(WRITE_KEY, ""),
            "Content-Type": "application/json",
        }
        for seq in range(ROUNDS):
            body = batch_body(sender, seq)
            while True:
                started = time.monotonic()
                try:
                    async with session.post(f"{self.url()}/v1/batch", data=body, headers=headers) as response:
                        await response.read()
                        self.statuses[response.status] += 1
                        if response.status == 503 and "Retry-After" not in response.headers:
                            self.bare_503s += 1
                        if response.status == 200:
                            self.acknowledged.append((started, time.monotonic()))
                            self.accepted.update(message_id(sender, user, seq) for user in range(USERS))
                            break
                except (aiohttp.ClientError, OSError):
                    self.statuses[0] += 1
                await asyncio.sleep(0.05)
            await asyncio.sleep(SEND_PAUSE)


@dataclass
class Cluster:
    """The fake Klaviyo, the database, and the routers' children, for one test."""

    folder: Path
    stack: contextlib.AsyncExitStack
    session: aiohttp.ClientSession
    fake: FakeControl
    database_url: str

    def config(self, name: str, queue_url: str) -> Path:
        path = self.folder / f"{name}.toml"
        path.write_text(
            CONFIG.format(
                data_dir=self.folder / name,
                queue_url=queue_url,
                lease=LEASE,
                scale=RATE_LIMIT_SCALE,
                write_key=WRITE_KEY,
                private_key=PRIVATE_KEY,
                base_url=self.fake.url,
            )
        )
        return path

    async def router(self, name: str, queue_url: str | None = None) -> Child:
        config = self.config(name, queue_url or self.database_url)
        return await self.stack.enter_async_context(
            child(name, ["serve", "--config", str(config)], self.folder, announces=r"listening on (\S+)")
        )

    async def start(
        self, count: int, queue_url: str
    ) -> tuple[list[Child], Traffic, PostgresQueue, asyncio.Task[None]]:
        """``count`` routers on ``queue_url``, the senders' traffic to them under way, and the test's
        own view of the queue (straight to the database)."""
        routers = list(await asyncio.gather(*(self.router(f"router-{n}", queue_url) for n in range(count))))
        traffic = Traffic([router.url for router in routers])
        queue = PostgresQueue(self.database_url)
        await queue.open()
        self.stack.push_async_callback(queue.close)
        sending = asyncio.create_task(traffic.send_all(self.session))
        self.stack.push_async_callback(_settle, sending)
        return routers, traffic, queue, sending

    async def delivered(self, within: float) -> dict[str, Any]:
        """The fake's state once it holds an event for every message."""
        await eventually(
            lambda: self.fake.get("/__fake__/state?summary=1"),
            lambda state: state["counters"]["events"] >= EVENTS,
            within=within,
            what="events the fake holds",
        )
        state: dict[str, Any] = await self.fake.get("/__fake__/state")
        return state

    async def sent_event_ids(self) -> list[str]:
        """The unique_id of every event in an accepted request to the fake, in the order sent."""
        found = []
        for record in await self.fake.get("/__fake__/requests"):
            if (
                record["operation_id"] in ("bulk_create_events", "create_event")
                and 200 <= record["status"] < 300
            ):
                found += re.findall(r'"unique_id":"([^"]+)"', orjson.dumps(record["json"]).decode())
        return found


@contextlib.asynccontextmanager
async def cluster(folder: Path) -> AsyncIterator[Cluster]:
    name = unique_name("cluster")
    database_url = await create_database(name)
    try:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            fake = await stack.enter_async_context(
                child(
                    "fake",
                    ["fake-klaviyo", "--port", "0"],
                    folder,
                    announces=r"url=(http://127\.0\.0\.1:\d+)",
                )
            )
            control = FakeControl(session, fake.url)
            await control.post("/__fake__/config", {"rate_limit_scale": RATE_LIMIT_SCALE})
            yield Cluster(folder, stack, session, control, database_url)
    finally:
        await drop_database(name)


async def when(traffic: Traffic, share: float) -> None:
    """Wait until ``share`` of the events were acknowledged."""
    async with asyncio.timeout(60):
        while len(traffic.accepted) < share * EVENTS:  # noqa: ASYNC110 (a plain count, polled)
            await asyncio.sleep(0.01)


def check_order(sent: list[str]) -> list[str]:
    """Users whose events reached Klaviyo out of order (first sendings compared)."""
    first_seen: dict[str, list[int]] = {}
    seen: set[str] = set()
    for unique_id in sent:
        if unique_id in seen:
            continue
        seen.add(unique_id)
        user, seq = unique_id.rsplit("-", 1)
        first_seen.setdefault(user, []).append(int(seq))
    return [user for user, seqs in first_seen.items() if seqs != sorted(seqs)]


@pytest.mark.timeout(150)
async def test_three_routers_share_the_work_and_survive_a_sigkill(tmp_path: Path) -> None:
    async with asyncio.timeout(140), cluster(tmp_path) as run:
        routers, traffic, queue, sending = await run.start(3, run.database_url)

        await when(traffic, 0.4)
        assert await routers[1].stop(signal.SIGKILL) == -signal.SIGKILL
        in_flight = {job.message_id for job in await queue.list_jobs(JobState.IN_FLIGHT, limit=10_000)}
        restarted = await run.router("router-1b")
        traffic.urls[1] = restarted.url
        await sending

        state = await run.delivered(within=60)
        sent = await run.sent_event_ids()
        counts = await eventually(
            queue.counts, lambda c: c[JobState.DONE] == EVENTS, within=30, what="jobs per state"
        )
        exits = [await router.stop() for router in (routers[0], routers[2], restarted)]

    assert traffic.accepted == {event["unique_id"] for event in state["events"]}
    assert len(traffic.accepted) == EVENTS and counts[JobState.DEAD] == 0
    repeated = Counter(unique_id for unique_id, n in Counter(sent).items() if n > 1 for _ in range(n - 1))
    assert set(repeated) <= in_flight, "sent twice without having been in flight at the SIGKILL"
    counters = state["counters"]
    assert counters["duplicate_events"] == sum(repeated.values())  # the fake forgave exactly those
    assert check_order(sent) == []
    assert counters["throttled"] < 0.01 * counters["requests"], counters
    assert exits == [0, 0, 0]
    print(
        f"\ncluster: {counters['requests']} requests to the fake, {counters['throttled']} throttled; "
        f"{len(in_flight)} jobs in flight at the SIGKILL, {sum(repeated.values())} events sent again; "
        f"ingest answers {dict(traffic.statuses)}"
    )


@pytest.mark.timeout(150)
async def test_routers_ride_out_lost_database_connections(tmp_path: Path) -> None:
    async with asyncio.timeout(140), cluster(tmp_path) as run:
        target = urlsplit(run.database_url)
        proxy = CuttableProxy(target.hostname or "127.0.0.1", target.port or 5432)
        await proxy.start()
        run.stack.push_async_callback(proxy.stop)
        routers, traffic, queue, sending = await run.start(2, proxy.url(run.database_url))

        await when(traffic, 0.3)
        proxy.sever()
        cut = time.monotonic()
        refused = await eventually(
            lambda: _status_count(traffic, 503), lambda n: n >= 3, within=10, what="503 answers"
        )
        ready = await _ready(run.session, routers[0].url)
        await asyncio.sleep(1.0)
        restored = time.monotonic()
        proxy.restore()

        await when(traffic, 0.6)
        for _ in range(3):
            await terminate_connections(run.database_url)
            await asyncio.sleep(0.3)
        await sending

        state = await run.delivered(within=60)
        await eventually(queue.counts, lambda c: c[JobState.DONE] == EVENTS, within=30, what="jobs per state")
        after = await _ready(run.session, routers[1].url)
        exits = [await router.stop() for router in routers]

    assert refused >= 3 and traffic.bare_503s == 0
    # nothing sent while the database was away was acknowledged while it was away
    assert not [
        (sent, answered) for sent, answered in traffic.acknowledged if cut < sent and answered < restored
    ]
    assert ready[0] == 503 and any(
        "queue unreachable: QueueUnavailable: PostgreSQL at" in p for p in ready[1]
    )
    assert after == (200, [])
    assert traffic.accepted == {event["unique_id"] for event in state["events"]}
    assert set(traffic.statuses) <= {200, 503}, traffic.statuses
    assert exits == [0, 0]
    print(f"\nlost connections: ingest answers {dict(traffic.statuses)}; /ready said {ready}")


async def _status_count(traffic: Traffic, status: int) -> int:
    return traffic.statuses[status]


async def _ready(session: aiohttp.ClientSession, url: str) -> tuple[int, list[str]]:
    async with session.get(f"{url}/ready") as response:
        body = orjson.loads(await response.read())
        return response.status, list(body["problems"])


async def _settle(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task
