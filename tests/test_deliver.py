"""Delivery end to end: a real queue (every backend) → Deliverer → KlaviyoClient → the fake Klaviyo on loopback.

Each test drives the deliverer one batch at a time with ``deliver_once`` (or runs its workers), so every
step is observable: what the fake received, and the state, attempts and error of every job. Retries
use a fast policy (tens of milliseconds); the one real wait is the 1-second ``Retry-After`` of a 429.
The pure parts, :func:`plan`, :func:`apply_outcome` and :func:`hold_back`, are tested without HTTP
at the end.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from pytest_aiohttp import AiohttpServer
from test_dead_letters import write_order_mapping
from test_plan import leased

from router.deliver import Deliverer, DeliverySettings, queue_outage
from router.destination import Destination
from router.fake_klaviyo import FakeKlaviyo, FakeKlaviyoServer, build_fake_app, fake_of
from router.health import PausedDestinations
from router.identity import ordering_key
from router.klaviyo.batch import batch
from router.klaviyo.client import KlaviyoClient, Outcome
from router.klaviyo.ratelimit import RateLimits
from router.klaviyo.spec import endpoint_for
from router.logs import configure_logging, reset_logging
from router.mapping import MappingSets, load_mappings
from router.metrics import Metrics
from router.plan import (
    DEAD,
    HELD,
    OK,
    RELEASE,
    RETRY,
    STEP_BITS,
    Send,
    apply_outcome,
    blocked,
    next_wave,
    plan,
)
from router.planner import Planner
from router.queue import Job, JobState, NewJob, Queue, QueueUnavailable
from router.retry import RetryPolicy
from router.transform import transform

DEST = "klaviyo"
LIST_ID = "XUepkK"
KEY = "pk_test_0123456789abcdef"
#: Retries due within tens of milliseconds, so a test can wait for them.
FAST = RetryPolicy(base_delay=0.02, max_delay=0.05)
SETTINGS = DeliverySettings(
    workers=3, batch_size=100, idle_poll=0.01, pause_probe=0.05, timeout=5.0, retry=FAST
)
PENDING, IN_FLIGHT, DONE, DEAD_STATE = JobState.PENDING, JobState.IN_FLIGHT, JobState.DONE, JobState.DEAD


# -- messages --------------------------------------------------------------------------------------------------


def identify(user: str, email: str, message_id: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "messageId": message_id, "traits": {"email": email, **traits}}


def track(user: str, event: str, message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": event,
        "messageId": message_id,
        "timestamp": "2025-03-01T10:00:00Z",
        "properties": {"email": f"{user}@example.com", **properties},
    }


def group(user: str, email: str, list_id: str, message_id: str) -> dict[str, Any]:
    return {
        "type": "group",
        "userId": user,
        "groupId": list_id,
        "messageId": message_id,
        "traits": {"email": email, "subscribe": True},
    }


# -- the rig ---------------------------------------------------------------------------------------------------


@dataclass
class Rig:
    """A real queue and the fake Klaviyo over loopback, deliverers wired to both, and what they settled."""

    queue: Queue
    fake: FakeKlaviyo
    url: str
    session: aiohttp.ClientSession
    paused: PausedDestinations = field(default_factory=PausedDestinations)
    prometheus: Metrics = field(default_factory=Metrics)

    def destination(self, mappings_dir: Path | None = None) -> Destination:
        return Destination(name=DEST, private_key=KEY, base_url=self.url, mappings_dir=mappings_dir)

    def deliverer(
        self,
        settings: DeliverySettings = SETTINGS,
        *,
        mappings_dir: Path | None = None,
        planner: Planner | None = None,
        limits: RateLimits | None = None,
    ) -> Deliverer:
        destination = self.destination(mappings_dir)
        client = KlaviyoClient(self.session, destination, timeout=settings.timeout, limits=limits)
        return Deliverer(
            self.queue,
            destination,
            client,
            settings=settings,
            paused=self.paused,
            metrics=self.prometheus,
            planner=planner,
        )

    @property
    def settled(self) -> Counter[str]:
        """Jobs settled per result, as the ``router_jobs_settled`` metric counts them."""
        counts: Counter[str] = Counter()
        for result in ("delivered", "skipped", "retried", "dead"):
            value = self.prometheus.registry.get_sample_value(
                "router_jobs_settled_total", {"destination": DEST, "result": result}
            )
            if value:
                counts[result] = int(value)
        return counts

    def event_job_sizes(self) -> list[int]:
        """Events in each bulk event job the fake received, in order."""
        return [
            sum(
                len(item["attributes"]["events"]["data"])
                for item in r.json["data"]["attributes"]["events-bulk-create"]["data"]
            )
            for r in self.fake.requests
            if r.path == "/api/event-bulk-create-jobs"
        ]

    async def enqueue(self, *messages: dict[str, Any]) -> list[int]:
        """Enqueue messages the way ingest does; their job ids, in order."""
        jobs = [
            NewJob(
                source="web",
                destination=DEST,
                message_id=message["messageId"],
                ordering_key=ordering_key(message),
                payload=orjson.dumps(message),
            )
            for message in messages
        ]
        return await self.enqueue_jobs(jobs)

    async def enqueue_jobs(self, jobs: Sequence[NewJob]) -> list[int]:
        result = await self.queue.enqueue(jobs)
        assert result.inserted == len(jobs)
        ids = {job.message_id: job.id for job in await self.queue.list_jobs(PENDING, limit=10_000)}
        return [ids[job.message_id] for job in jobs]

    async def job(self, job_id: int) -> Job:
        found = await self.queue.get(job_id)
        assert found is not None
        return found

    async def states(self, ids: Sequence[int]) -> list[JobState]:
        return [(await self.job(job_id)).state for job_id in ids]

    async def until_due(self, ids: Sequence[int]) -> None:
        """Wait (a few milliseconds with :data:`FAST`) until every job's next attempt is due."""
        due = max([(await self.job(job_id)).next_attempt_at for job_id in ids])
        await asyncio.sleep(max(0.0, due - time.time()) + 0.005)

    def statuses(self) -> list[int]:
        return [record.status for record in self.fake.requests]

    def metrics(self) -> Counter[str]:
        return Counter(event.metric for event in self.fake.events)


async def eventually(
    probe: Callable[[], Awaitable[object] | object], expected: object = True, *, within: float = 5.0
) -> None:
    """Poll ``probe`` (sync or async) until it returns ``expected``."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value == expected:
            return
        assert time.monotonic() < deadline, f"still {value!r}, wanted {expected!r}"
        await asyncio.sleep(0.01)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def rig(queue: Queue, fake_klaviyo: FakeKlaviyoServer, session: aiohttp.ClientSession) -> Rig:
    """The shared fake (rate-limit windows on a manual clock) with list :data:`LIST_ID`."""
    assert fake_klaviyo.api_key == KEY
    fake_klaviyo.state.create_list("Newsletter", list_id=LIST_ID)
    return Rig(queue, fake_klaviyo.state, fake_klaviyo.url, session)


@pytest.fixture
async def realtime_rig(queue: Queue, aiohttp_server: AiohttpServer, session: aiohttp.ClientSession) -> Rig:
    """A fake on the real monotonic clock, the one the client's pacing uses: Retry-After is real time."""
    app = build_fake_app(api_keys=[KEY], clock=time.monotonic)
    server = await aiohttp_server(app)
    return Rig(queue, fake_of(app), str(server.make_url("")).rstrip("/"), session)


# -- classifications -------------------------------------------------------------------------------------------


async def test_happy_path_delivers_what_transform_and_batch_say(rig: Rig) -> None:
    messages = [
        identify(
            "u1", "a@example.com", "m1", firstName="Ada", properties={"listId": LIST_ID, "subscribe": True}
        ),
        identify("u2", "b@example.com", "m2", phone="+14155550123", plan="pro"),
        track("u3", "Product Added", "m3", value=9.5, name="Socks", product_id="p-1"),
        track("u4", "Order Completed", "m4", revenue=42.0, currency="EUR"),
        group("u5", "e@example.com", LIST_ID, "m5"),
        {"type": "screen", "userId": "u6", "name": "Home", "messageId": "m6"},
    ]
    ids = await rig.enqueue(*messages)
    assert await rig.deliverer().deliver_once() == len(messages)

    assert await rig.states(ids) == [DONE] * len(messages)
    assert rig.settled == {"delivered": len(messages)}
    # the fake received exactly the requests the pure pipeline makes of these messages ...
    expected = batch(
        chain.from_iterable(transform(m, rig.destination(), index=i) for i, m in enumerate(messages))
    )
    writes = [r for r in rig.fake.requests if r.method != "GET"]
    assert [(r.method, r.path, r.json) for r in writes] == [(q.method, q.path, q.body) for q in expected]
    assert [r.path for r in writes] == [
        "/api/profile-bulk-import-jobs",
        "/api/event-bulk-create-jobs",
        "/api/profile-subscription-bulk-create-jobs",
    ]
    # the accepted import job was followed to its end (nothing refused: no error pages read)
    reads = [r.path for r in rig.fake.requests if r.method == "GET"]
    assert len(reads) == 1 and reads[0].startswith("/api/profile-bulk-import-jobs/")
    assert all(200 <= status < 300 for status in rig.statuses())
    # ... and holds what they mean
    fake = rig.fake
    ada = fake.find_profile(external_id="u1")
    assert ada is not None and ada.attributes["email"] == "a@example.com"
    assert ada.attributes["first_name"] == "Ada"
    bob = fake.find_profile(email="b@example.com")
    assert bob is not None and bob.attributes["phone_number"] == "+14155550123"
    assert bob.attributes["properties"] == {"plan": "pro"}
    assert {(e.metric, e.unique_id, e.value) for e in fake.events} == {
        ("Added to Cart", "m3", 9.5),
        ("Order Completed", "m4", 42.0),
        ("Home", "m6", None),
    }
    [cart] = fake.events_for(metric="Added to Cart", external_id="u3")
    assert cart.properties["AddedItemProductName"] == "Socks"
    eve = fake.find_profile(email="e@example.com")
    assert eve is not None
    assert fake.consent(ada.id) == fake.consent(eve.id) == "SUBSCRIBED"
    assert fake.consent(bob.id) == "NEVER_SUBSCRIBED"
    assert fake.members(LIST_ID) == [ada.id, eve.id]
    assert fake.duplicate_events == 0


async def test_429_retry_after_is_never_sent_early(realtime_rig: Rig) -> None:
    rig = realtime_rig
    rig.fake.script("create_event", [{"status": 429, "retry_after": 1}])
    first, second = await rig.enqueue(track("ua", "Viewed", "m1"), track("ub", "Viewed", "m2"))
    deliverer = rig.deliverer(DeliverySettings(batch_size=1, fill_event_jobs=False, retry=FAST))

    before = time.time()
    assert await deliverer.deliver_once() == 1  # the first job: 429, Retry-After 1
    job = await rig.job(first)
    assert (job.state, job.attempts) == (PENDING, 1)
    assert job.last_error is not None and job.last_error.startswith("Klaviyo 429 on POST /api/events")
    assert job.next_attempt_at >= before + 1.0

    # the queue holds the throttled job back; the limiter holds back the other job to that endpoint
    assert await deliverer.deliver_once() == 1
    assert await rig.states([first, second]) == [PENDING, DONE]

    await rig.until_due([first])
    assert await deliverer.deliver_once() == 1
    assert await rig.states([first, second]) == [DONE, DONE]
    assert (await rig.job(first)).attempts == 1

    throttled, *later = rig.fake.requests
    assert [throttled.status] + [r.status for r in later] == [429, 202, 202]
    assert all(r.at >= throttled.at + 1.0 for r in later)
    assert (rig.fake.throttled, rig.fake.sent_early_total) == (1, 0)
    assert sorted(e.unique_id for e in rig.fake.events) == ["m1", "m2"]
    assert rig.settled == {"retried": 1, "delivered": 2}


async def test_5xx_is_retried_with_backoff_then_delivered(rig: Rig) -> None:
    rig.fake.script("POST /api/events", [503, 502])
    [job_id] = await rig.enqueue(track("u1", "Viewed", "m1"))
    deliverer = rig.deliverer()

    for attempt, status in enumerate([503, 502], start=1):
        before = time.time()
        assert await deliverer.deliver_once() == 1
        job = await rig.job(job_id)
        assert (job.state, job.attempts) == (PENDING, attempt)
        assert job.last_error is not None and job.last_error.startswith(
            f"Klaviyo {status} on POST /api/events"
        )
        ceiling = FAST.base_delay * 2 ** (attempt - 1)
        assert before + ceiling / 2 <= job.next_attempt_at <= time.time() + ceiling
        await rig.until_due([job_id])

    assert await deliverer.deliver_once() == 1
    job = await rig.job(job_id)
    assert (job.state, job.attempts) == (DONE, 2)
    assert rig.statuses() == [503, 502, 202]
    assert [e.unique_id for e in rig.fake.events] == ["m1"]
    assert rig.settled == {"retried": 2, "delivered": 1}


async def test_400_dead_letters_with_klaviyos_detail(rig: Rig) -> None:
    bad, good = await rig.enqueue(
        identify("u1", "a@example.com", "m1", properties={"listId": "NoSuch", "subscribe": True}),
        track("u2", "Viewed", "m2"),
    )
    assert await rig.deliverer().deliver_once() == 2

    job = await rig.job(bad)
    assert (job.state, job.attempts) == (DEAD_STATE, 1)
    assert job.last_error == (
        "Klaviyo 400 on POST /api/profile-subscription-bulk-create-jobs: "
        "invalid: List 'NoSuch' does not exist. (at /data/relationships/list/data/id)"
    )
    assert (await rig.job(good)).state == DONE
    assert [j.id for j in await rig.queue.list_jobs(DEAD_STATE)] == [bad]
    assert rig.settled == {"dead": 1, "delivered": 1}


async def test_partial_bulk_failure_dead_letters_only_the_named_items(rig: Rig) -> None:
    ids = await rig.enqueue(*(track(f"u{n}", "Viewed", f"m{n}") for n in range(4)))
    rig.fake.fail_bulk_items("bulk_create_events", indices=[1, 3], detail="Invalid email domain.")
    deliverer = rig.deliverer()

    assert await deliverer.deliver_once() == 4
    assert await rig.states(ids) == [PENDING, DEAD_STATE, PENDING, DEAD_STATE]
    for n in (1, 3):
        assert (await rig.job(ids[n])).last_error == (
            f"Klaviyo 400: invalid: Invalid email domain. (at /data/attributes/events-bulk-create/data/{n})"
        )
    for n in (0, 2):  # not their fault: back to the queue untried
        job = await rig.job(ids[n])
        assert (job.attempts, job.last_error) == (0, None) and job.next_attempt_at <= time.time()

    assert await deliverer.deliver_once() == 2
    assert await rig.states(ids) == [DONE, DEAD_STATE, DONE, DEAD_STATE]
    assert rig.statuses() == [400, 202]
    assert sorted(e.unique_id for e in rig.fake.events) == ["m0", "m2"]
    assert rig.fake.duplicate_events == 0
    assert rig.settled == {"dead": 2, "delivered": 2}


async def test_profiles_a_bulk_import_refuses_later_become_dead_letters(rig: Rig) -> None:
    """Klaviyo accepts the import job (202) and records bad profiles as import errors afterwards."""
    ids = await rig.enqueue(
        identify("u0", "a@example.com", "m0"),
        identify("u1", "not-an-email", "m1"),
        identify("u2", "c@example.com", "m2"),
    )
    assert await rig.deliverer().deliver_once() == 3
    assert await rig.states(ids) == [DONE, DEAD_STATE, DONE]
    assert (await rig.job(ids[1])).last_error == (
        "Klaviyo import error: invalid: Invalid email address: 'not-an-email'. "
        "(at /data/attributes/profiles/data/1/attributes/email)"
    )
    assert rig.settled == {"dead": 1, "delivered": 2}
    paths = [record.path for record in rig.fake.requests]
    assert paths[0] == "/api/profile-bulk-import-jobs"
    assert paths[1].startswith("/api/profile-bulk-import-jobs/") and paths[2].endswith("/import-errors")


async def test_partial_bulk_profile_import_failure_dead_letters_only_that_profile(rig: Rig) -> None:
    ids = await rig.enqueue(
        identify("u0", "a@example.com", "m0"),
        identify("u1", "bad@example.com", "m1"),
        identify("u2", "c@example.com", "m2"),
    )
    rig.fake.fail_bulk_items("bulk_import_profiles", values=["bad@example.com"], detail="Invalid email.")
    deliverer = rig.deliverer()

    assert await deliverer.deliver_once() == 3
    assert await rig.states(ids) == [PENDING, DEAD_STATE, PENDING]
    assert (await rig.job(ids[1])).last_error == (
        "Klaviyo 400: invalid: Invalid email. (at /data/attributes/profiles/data/1/attributes/email)"
    )
    assert await deliverer.deliver_once() == 2
    assert await rig.states(ids) == [DONE, DEAD_STATE, DONE]
    emails = sorted(p.attributes["email"] for p in rig.fake.profiles.values())
    assert emails == ["a@example.com", "c@example.com"]


async def test_transform_refusal_is_dead_and_alias_is_skipped(rig: Rig) -> None:
    phone, alias, good = await rig.enqueue(
        identify("u1", "a@example.com", "m1", phone="12345"),
        {"type": "alias", "userId": "u2", "previousId": "anon-2", "messageId": "m2"},
        track("u3", "Viewed", "m3"),
    )
    [garbled] = await rig.enqueue_jobs(
        [NewJob(source="web", destination=DEST, message_id="m4", ordering_key=None, payload=b"{not json")]
    )
    assert await rig.deliverer().deliver_once() == 4

    assert await rig.states([phone, alias, good, garbled]) == [DEAD_STATE, DONE, DONE, DEAD_STATE]
    assert (await rig.job(phone)).last_error == (
        "transform: traits.phone: Phone number is not in E.164 format ('12345'); "
        "set default_phone_region to accept national numbers"
    )
    reason = (await rig.job(garbled)).last_error
    assert reason is not None and reason.startswith("payload is not valid JSON: ")
    assert [r.path for r in rig.fake.requests] == ["/api/events"]  # only the good one went out
    assert rig.settled == {"dead": 2, "skipped": 1, "delivered": 1}


async def test_a_dropped_phone_is_logged_with_its_message_id_and_counted(rig: Rig) -> None:
    """invalid_phone 'drop': the event goes out without the phone, and the drop is not silent: a
    ``transform_warning`` line names the message and the number, and a metric counts it."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        [job_id] = await rig.enqueue(identify("u1", "a@example.com", "m-drop", phone="12"))
        deliverer = rig.deliverer()
        deliverer.destination = replace(deliverer.destination, invalid_phone="drop")
        assert await deliverer.deliver_once() == 1
    finally:
        reset_logging()
    assert await rig.states([job_id]) == [DONE]
    profile = rig.fake.find_profile(email="a@example.com")
    assert profile is not None and profile.attributes.get("phone_number") is None
    [line] = [orjson.loads(x) for x in stream.getvalue().splitlines() if '"transform_warning"' in x]
    assert (line["message_id"], line["warning"], line["level"]) == (
        "m-drop",
        "invalid_phone_dropped",
        "warning",
    )
    assert "('12')" in line["detail"]
    assert (
        rig.prometheus.registry.get_sample_value(
            "router_transform_warnings_total", {"destination": DEST, "warning": "invalid_phone_dropped"}
        )
        == 1
    )


async def test_a_partly_refused_identify_updates_the_profile_then_waits_as_a_dead_letter(rig: Rig) -> None:
    """subscribe false with an unknown consent channel: the profile update is delivered, the job is a
    dead letter naming the channel (replayable once fixed)."""
    message = identify(
        "u1",
        "a@example.com",
        "m1",
        firstName="Ada",
        properties={"subscribe": False, "consent": "emial", "listId": LIST_ID},
    )
    [job_id] = await rig.enqueue(message)
    assert await rig.deliverer().deliver_once() == 1
    assert await rig.states([job_id]) == [DEAD_STATE]
    reason = (await rig.job(job_id)).last_error
    assert reason is not None and reason.startswith("transform: consent: unknown consent channel 'emial'")
    profile = rig.fake.find_profile(email="a@example.com")
    assert profile is not None and profile.attributes["first_name"] == "Ada"
    assert [r.path for r in rig.fake.requests] == ["/api/profile-import"]
    assert rig.settled == {"dead": 1}


async def test_integrations_false_is_acknowledged_as_skipped(rig: Rig) -> None:
    """``{"Klaviyo": false}`` and ``{"All": false}``: acked, counted as skipped, nothing sent."""
    ids = await rig.enqueue(
        {**track("u1", "Viewed", "m1"), "integrations": {"Klaviyo": False}},
        {**track("u2", "Viewed", "m2"), "integrations": {"All": False}},
        {**track("u3", "Viewed", "m3"), "integrations": {"All": False, "Klaviyo": True}},
    )
    assert await rig.deliverer().deliver_once() == 3
    assert await rig.states(ids) == [DONE, DONE, DONE]
    assert rig.settled == {"skipped": 2, "delivered": 1}
    assert [r.path for r in rig.fake.requests] == ["/api/events"]


async def test_401_pauses_releases_and_resumes_once_the_key_works(rig: Rig) -> None:
    ids = await rig.enqueue(track("u1", "Viewed", "m1"), track("u2", "Viewed", "m2"))
    rig.fake.revoke_key(KEY)
    deliverer = rig.deliverer()

    for attempt in range(2):  # a second try while the key is still refused changes nothing
        with structlog.testing.capture_logs() as logs:
            assert await deliverer.deliver_once() == 2
        assert [entry["event"] for entry in logs].count("destination_paused") == 1 - attempt  # logged once
        assert rig.paused.is_paused(DEST)
        assert rig.paused.snapshot()[DEST].startswith("Klaviyo 401 on POST /api/event-bulk-create-jobs")
        for job_id in ids:
            job = await rig.job(job_id)
            assert (job.state, job.attempts, job.lease_expires_at) == (PENDING, 0, None)
    assert rig.settled == {}
    assert rig.fake.events == []

    rig.fake.clear_faults()  # the key works again
    with structlog.testing.capture_logs() as logs:
        assert await deliverer.deliver_once() == 2  # the probe
    assert not rig.paused.is_paused(DEST)
    assert [entry["event"] for entry in logs].count("destination_resumed") == 1
    assert await rig.states(ids) == [DONE, DONE]
    assert sorted(e.unique_id for e in rig.fake.events) == ["m1", "m2"]
    assert rig.statuses() == [401, 401, 202]


async def test_401_counts_nothing_as_settled(rig: Rig) -> None:
    ids = await rig.enqueue(
        {"type": "alias", "userId": "u1", "previousId": "a1", "messageId": "m1"}, track("u2", "Viewed", "m2")
    )
    rig.fake.revoke_key(KEY)
    assert await rig.deliverer().deliver_once() == 2
    assert await rig.states(ids) == [PENDING, PENDING]
    assert rig.settled == {}  # the released alias is not "skipped" yet, nor anything "delivered"
    rig.fake.clear_faults()
    assert await rig.deliverer().deliver_once() == 2
    assert rig.settled == {"skipped": 1, "delivered": 1}


async def test_paused_workers_probe_and_resume(rig: Rig) -> None:
    ids = await rig.enqueue(track("u1", "Viewed", "m1"))
    rig.fake.revoke_key(KEY)
    stop = asyncio.Event()
    task = asyncio.create_task(rig.deliverer().run(stop))
    try:
        await eventually(lambda: rig.paused.is_paused(DEST))
        await asyncio.sleep(0.2)  # four probe intervals of 0.05 s; idle_poll alone would allow ~60 tries
        probes = rig.statuses().count(401)
        assert 2 <= probes <= 1 + 3 * 5  # at most one probe per worker and interval (3 workers)
        assert (await rig.job(ids[0])).attempts == 0
        rig.fake.clear_faults()
        await eventually(lambda: rig.states(ids), [DONE])
        assert not rig.paused.is_paused(DEST)
    finally:
        stop.set()
        await asyncio.wait_for(task, 2.0)


async def test_dead_letter_retried_after_a_mapping_fix(rig: Rig, tmp_path: Path) -> None:
    write_order_mapping(tmp_path, ["properties.order_total"])
    [job_id] = await rig.enqueue(track("u1", "Order Completed", "m1", total=42.5))
    sets = MappingSets([tmp_path])
    deliverer = rig.deliverer(mappings_dir=tmp_path, planner=Planner(sets))
    assert await deliverer.deliver_once() == 1
    job = await rig.job(job_id)
    assert (job.state, job.last_error) == (DEAD_STATE, "transform: Placed Order needs an order total")

    write_order_mapping(tmp_path, ["properties.order_total", "properties.total"])
    assert sets.reload() is None  # what an operator's SIGHUP (or POST /admin/mappings/reload) does
    assert await rig.queue.revive([job_id]) == 1
    assert await deliverer.deliver_once() == 1

    assert (await rig.job(job_id)).state == DONE
    [event] = rig.fake.events
    assert (event.metric, event.value, event.unique_id) == ("Placed Order", 42.5, "m1")
    assert rig.settled == {"dead": 1, "delivered": 1}


async def test_retries_exhausted_become_a_dead_letter(rig: Rig) -> None:
    rig.fake.script("POST /api/events", [503, 503])
    [job_id] = await rig.enqueue(track("u1", "Viewed", "m1"))
    deliverer = rig.deliverer(
        DeliverySettings(retry=RetryPolicy(max_attempts=2, base_delay=0.02, max_delay=0.05))
    )

    assert await deliverer.deliver_once() == 1
    assert (await rig.job(job_id)).state == PENDING
    await rig.until_due([job_id])
    assert await deliverer.deliver_once() == 1

    job = await rig.job(job_id)
    assert (job.state, job.attempts) == (DEAD_STATE, 2)
    assert job.last_error is not None
    assert job.last_error.startswith(
        "gave up after 2 attempts; last error: Klaviyo 503 on POST /api/events: "
    )
    assert "Injected fault: HTTP 503." in job.last_error
    assert rig.settled == {"retried": 1, "dead": 1}


# -- running, shutdown, ordering -------------------------------------------------------------------------------


async def test_run_delivers_everything_and_stops_when_told(rig: Rig) -> None:
    messages = []
    for n in range(20):  # one identify and one track per user: two claims per user at least
        messages += [identify(f"u{n}", f"u{n}@example.com", f"i{n}"), track(f"u{n}", "Viewed", f"t{n}")]
    ids = await rig.enqueue(*messages)
    stop = asyncio.Event()
    task = asyncio.create_task(
        rig.deliverer(DeliverySettings(workers=3, batch_size=7, idle_poll=0.01)).run(stop)
    )

    await eventually(lambda: rig.queue.counts(DEST), {PENDING: 0, IN_FLIGHT: 0, DONE: 40, DEAD_STATE: 0})
    stop.set()
    await asyncio.wait_for(task, 1.0)
    assert task.done() and task.exception() is None
    assert rig.settled == {"delivered": 40}
    assert sorted(e.unique_id for e in rig.fake.events) == sorted(f"t{n}" for n in range(20))
    assert len(rig.fake.profiles) == 20
    assert await rig.states(ids) == [DONE] * 40


async def test_cancelled_run_releases_its_leases(rig: Rig) -> None:
    rig.fake.faults.hold_seconds = 5.0
    rig.fake.script("POST /api/events", ["timeout"])  # the request hangs until the worker is cancelled
    [job_id] = await rig.enqueue(track("u1", "Viewed", "m1"))
    stop = asyncio.Event()
    task = asyncio.create_task(rig.deliverer().run(stop))

    # the request is on its way once the fake has taken it (its scripted timeout is used up); the
    # job is in flight from its claim on, while its batch is still planned and paced, and a stop
    # then holds the batch back unsent and ends the run at once
    await eventually(lambda: rig.fake.faults.scripts["POST /api/events"], deque())
    assert await rig.states([job_id]) == [IN_FLIGHT]
    stop.set()  # a worker busy with a request finishes it first: the shutdown grace period ...
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()  # ... after which it is cancelled
    with pytest.raises(asyncio.CancelledError):
        await task

    job = await rig.job(job_id)
    assert (job.state, job.attempts, job.lease_expires_at) == (PENDING, 0, None)
    assert rig.fake.events == []


async def test_a_profiles_job_waits_while_an_earlier_one_is_in_flight(rig: Rig) -> None:
    first, second, other = await rig.enqueue(
        identify("u1", "u1@example.com", "m1"), track("u1", "Viewed", "m2"), track("u2", "Viewed", "m3")
    )
    [held] = await rig.queue.claim(DEST, 1, lease_seconds=60.0)  # another worker holds u1's identify
    assert held.id == first
    deliverer = rig.deliverer()
    assert await deliverer.deliver_once() == 1  # u2 only: u1's track waits for its identify
    assert await rig.states([first, second, other]) == [IN_FLIGHT, PENDING, DONE]
    await rig.queue.ack([first])
    assert await deliverer.deliver_once() == 1
    assert await rig.states([first, second, other]) == [DONE, DONE, DONE]


async def test_a_profiles_job_waits_while_an_earlier_one_waits_for_a_retry(rig: Rig) -> None:
    rig.fake.script("POST /api/profile-import", [503])
    [first] = await rig.enqueue(identify("u1", "u1@example.com", "m1", plan="pro"))
    # a retry 0.25-0.5 s away: time enough for the checks below however slow the machine
    deliverer = rig.deliverer(DeliverySettings(retry=RetryPolicy(base_delay=0.5)))
    assert await deliverer.deliver_once() == 1
    assert await rig.states([first]) == [PENDING]  # waiting for its retry

    second, other = await rig.enqueue(track("u1", "Viewed", "m2"), track("u2", "Viewed", "m3"))
    assert await deliverer.deliver_once() == 1  # u2 only
    assert await rig.states([first, second, other]) == [PENDING, PENDING, DONE]

    await rig.until_due([first])
    while await deliverer.deliver_once():
        pass
    assert await rig.states([first, second, other]) == [DONE, DONE, DONE]
    u1 = [r for r in rig.fake.requests if "u1@example.com" in orjson.dumps(r.json).decode()]
    assert [(r.path, r.status) for r in u1] == [
        ("/api/profile-import", 503),
        ("/api/profile-import", 201),
        ("/api/events", 202),  # the event went after the retried identify, never before
    ]


async def test_one_batch_keeps_a_profiles_order(rig: Rig) -> None:
    await rig.enqueue(identify("u1", "u1@example.com", "m1", plan="pro"), track("u1", "Viewed", "m2"))
    deliverer = rig.deliverer()
    while await deliverer.deliver_once():
        pass
    assert [r.path for r in rig.fake.requests] == ["/api/profile-import", "/api/events"]
    profile = rig.fake.find_profile(external_id="u1")
    assert profile is not None and profile.attributes["properties"] == {"plan": "pro"}


async def test_a_profiles_later_job_waits_unsent_behind_an_earlier_one_that_failed(rig: Rig) -> None:
    """The identify's upsert fails: the track of the same profile in that batch is not sent (and
    counts no attempt), then goes after the identify, once: nothing is sent twice, nothing early."""
    rig.fake.script("POST /api/profile-import", [503])
    first, second = await rig.enqueue(
        identify("u1", "u1@example.com", "m1", plan="pro"), track("u1", "Viewed", "m2")
    )
    deliverer = rig.deliverer()
    assert await deliverer.deliver_once() == 2
    assert [(j.state, j.attempts) for j in [await rig.job(first), await rig.job(second)]] == [
        (PENDING, 1),
        (PENDING, 0),
    ]
    await rig.until_due([first])
    while await deliverer.deliver_once():
        pass
    assert await rig.states([first, second]) == [DONE, DONE]
    assert [(r.path, r.status) for r in rig.fake.requests] == [
        ("/api/profile-import", 503),
        ("/api/profile-import", 201),  # created: no event made the profile before its identify
        ("/api/events", 202),
    ]
    assert [e.unique_id for e in rig.fake.events] == ["m2"] and rig.fake.duplicate_events == 0
    profile = rig.fake.find_profile(external_id="u1")
    assert profile is not None and profile.attributes["properties"] == {"plan": "pro"}


async def test_a_retry_sends_only_the_steps_klaviyo_did_not_accept(rig: Rig) -> None:
    """An identify is a profile upsert and a subscription: when only the subscription fails, the
    retry sends only the subscription, and the progress is stored with the job."""
    rig.fake.script("POST /api/profile-subscription-bulk-create-jobs", [503])
    [job_id] = await rig.enqueue(
        identify(
            "u1", "a@example.com", "m1", firstName="Ada", properties={"listId": LIST_ID, "subscribe": True}
        )
    )
    deliverer = rig.deliverer()
    assert await deliverer.deliver_once() == 1
    job = await rig.job(job_id)
    assert (job.state, job.attempts, job.progress) == (PENDING, 1, STEP_BITS["profile"])
    await rig.until_due([job_id])
    assert await deliverer.deliver_once() == 1
    assert (await rig.job(job_id)).state == DONE
    assert [(r.path, r.status) for r in rig.fake.requests] == [
        ("/api/profile-import", 201),
        ("/api/profile-subscription-bulk-create-jobs", 503),
        ("/api/profile-subscription-bulk-create-jobs", 202),
    ]
    ada = rig.fake.find_profile(email="a@example.com")
    assert ada is not None and rig.fake.consent(ada.id) == "SUBSCRIBED"
    assert rig.fake.members(LIST_ID) == [ada.id]


async def test_no_subscription_is_sent_for_a_profile_whose_upsert_failed(rig: Rig) -> None:
    rig.fake.script("POST /api/profile-import", [503])
    [job_id] = await rig.enqueue(
        identify("u1", "a@example.com", "m1", properties={"listId": LIST_ID, "subscribe": True})
    )
    deliverer = rig.deliverer()
    assert await deliverer.deliver_once() == 1
    assert [(r.path, r.status) for r in rig.fake.requests] == [("/api/profile-import", 503)]
    job = await rig.job(job_id)
    assert (job.state, job.attempts, job.progress) == (PENDING, 1, 0)
    await rig.until_due([job_id])
    assert await deliverer.deliver_once() == 1
    assert [r.status for r in rig.fake.requests] == [503, 201, 202]


async def test_a_profile_upsert_held_up_by_pacing_still_goes_before_its_events(rig: Rig) -> None:
    """Events wait for the answer to the upsert of their profile in the same batch, however long
    the upsert waits for its turn."""
    limits = RateLimits()
    await rig.enqueue(identify("u1", "u1@example.com", "m1", plan="pro"), track("u1", "Viewed", "m2"))
    limits.window(endpoint_for("POST", "/api/profile-import")).block_until(time.monotonic() + 0.3)
    assert await rig.deliverer(limits=limits).deliver_once() == 2
    assert [r.path for r in rig.fake.requests] == ["/api/profile-import", "/api/events"]
    assert rig.fake.find_profile(external_id="u1") is not None


# -- a job that cannot be sent never holds up the others --------------------------------------------------------


def nested(depth: int) -> bytes:
    """A track whose properties nest ``depth`` objects deep (enqueued as it is, past ingest's checks)."""
    return b'{"type":"track","userId":"p","event":"P","messageId":"bad","properties":{"d":%s}}' % (
        b'{"a":' * depth + b"1" + b"}" * depth
    )


POISONS = {
    # orjson encodes at most 255 levels: the bulk job holding it could never be sent
    "cannot be encoded": (False, nested(300), "cannot be encoded for Klaviyo: Recursion limit reached"),
    # flattening 1020 levels hits Python's recursion limit: an exception no transform expects
    "the transform crashes": (True, nested(1020), "planning failed: RecursionError: maximum recursion depth"),
}


@pytest.mark.parametrize(("flatten", "poison", "reason"), POISONS.values(), ids=POISONS.keys())
async def test_a_job_that_cannot_be_planned_is_a_dead_letter_and_the_others_go_on(
    rig: Rig, flatten: bool, poison: bytes, reason: str
) -> None:
    """One poison pill among 1000 good events: the 1000 go out in the batch that carried it, once
    each, and the pill is a dead letter after one attempt."""
    good = [track(f"u{n}", "Viewed", f"e{n}") for n in range(1000)]
    await rig.enqueue(*good[:500])
    [bad] = await rig.enqueue_jobs(
        [NewJob(source="web", destination=DEST, message_id="bad", ordering_key="p", payload=poison)]
    )
    await rig.enqueue(*good[500:])
    destination = replace(rig.destination(), flatten_properties=flatten)
    client = KlaviyoClient(rig.session, destination, timeout=5)
    deliverer = Deliverer(rig.queue, destination, client, settings=replace(SETTINGS, batch_size=1000))
    batches = [await deliverer.deliver_once() for _ in range(3)]
    assert batches == [1001, 0, 0]  # one batch, as without the pill
    job = await rig.job(bad)
    assert (job.state, job.attempts) == (DEAD_STATE, 1)
    assert job.last_error is not None and job.last_error.startswith(reason)
    assert rig.event_job_sizes() == [1000]
    assert sorted(e.unique_id for e in rig.fake.events) == sorted(f"e{n}" for n in range(1000))
    assert rig.fake.duplicate_events == 0


class DyingPlanner(Planner):
    """Plans as usual, except that any batch holding the marked payload fails as a whole, the way a
    planning process that dies on it (a crash in a C extension, say) fails the batch it was given."""

    calls = 0

    async def plan_payloads(self, payloads: Sequence[bytes], destination: Destination, **options: Any) -> Any:
        self.calls += 1
        if any(b"kills-the-planner" in payload for payload in payloads):
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")
        return await super().plan_payloads(payloads, destination, **options)


async def test_a_batch_whose_planning_fails_is_split_to_find_the_job_that_causes_it(rig: Rig) -> None:
    ids = await rig.enqueue(*(track(f"u{n}", "Viewed", f"e{n}") for n in range(1000)))
    [bad] = await rig.enqueue(track("p", "kills-the-planner", "bad"))
    planner = DyingPlanner(MappingSets([None]))
    deliverer = rig.deliverer(replace(SETTINGS, batch_size=1000), planner=planner)
    assert await deliverer.deliver_once() == 1001
    job = await rig.job(bad)
    assert (job.state, job.attempts) == (DEAD_STATE, 1)
    assert (
        job.last_error
        == "planning failed: BrokenProcessPool: A process in the process pool was terminated abruptly"
    )
    assert set(await rig.states(ids)) == {DONE}
    assert rig.event_job_sizes() == [1000] and rig.fake.duplicate_events == 0
    assert planner.calls <= 2 + 2 * 11  # the batch, halves down to the one job (log2 1001 < 11), the rest


class BrokenPlanner(Planner):
    """A planner that cannot plan anything (its processes cannot be started, say)."""

    async def plan_payloads(self, payloads: Sequence[bytes], destination: Destination, **options: Any) -> Any:
        raise OSError("[Errno 24] Too many open files")


async def test_a_planner_that_fails_whatever_it_is_given_blames_no_job(rig: Rig) -> None:
    """Nothing of the batch can be planned: no job is a dead letter for it; each counts an attempt."""
    ids = await rig.enqueue(*(track(f"u{n}", "Viewed", f"e{n}") for n in range(8)))
    deliverer = rig.deliverer(planner=BrokenPlanner(MappingSets([None])))
    assert await deliverer.deliver_once() == 8
    jobs = [await rig.job(job_id) for job_id in ids]
    assert {(job.state, job.attempts) for job in jobs} == {(PENDING, 1)}
    assert {job.last_error for job in jobs} == {"planning failed: OSError: [Errno 24] Too many open files"}
    assert rig.fake.requests == []


async def test_stopping_does_not_wait_for_a_long_retry_after(rig: Rig) -> None:
    """A worker waiting for a 60 s block of its endpoint stops at once; the job goes back untried."""
    limits = RateLimits()
    limits.window(endpoint_for("POST", "/api/events")).block_until(time.monotonic() + 60)
    [job_id] = await rig.enqueue(track("u1", "Viewed", "m1"))
    deliverer = rig.deliverer(replace(SETTINGS, workers=1), limits=limits)
    stop = asyncio.Event()
    task = asyncio.create_task(deliverer.run(stop))
    await eventually(lambda: rig.states([job_id]), [IN_FLIGHT])
    await asyncio.sleep(0.1)  # waiting for its turn
    stop.set()
    await asyncio.wait_for(task, 5.0)
    job = await rig.job(job_id)
    assert (job.state, job.attempts, job.lease_expires_at) == (PENDING, 0, None)
    assert rig.fake.requests == []


# -- plan and apply_outcome are pure ---------------------------------------------------------------------------


JOBS = [
    leased(1, track("u1", "Viewed", "e1")),
    leased(2, track("u2", "Viewed", "e2")),
    leased(3, identify("u3", "c@example.com", "p3")),
    leased(4, {"type": "alias", "userId": "u4", "previousId": "a4", "messageId": "x4"}),
    leased(5, identify("u5", "e@example.com", "p5", phone="nope")),
    leased(6, b"[oops"),
    leased(7, track("u7", "Viewed", "e7")),
]


def test_plan_is_pure() -> None:
    destination = Destination()
    mappings = load_mappings()
    payloads = [j.payload for j in JOBS]
    first = plan(JOBS, destination, mappings)
    assert plan(JOBS, destination, mappings) == first
    assert [j.payload for j in JOBS] == payloads

    assert [v.state for v in first.verdicts] == [OK, OK, OK, OK, DEAD, DEAD, OK]
    assert first.verdicts[3].reason.startswith("alias call skipped")
    assert first.skipped == 1
    assert first.verdicts[4].reason.startswith("transform: traits.phone: Phone number is not in E.164 format")
    assert first.verdicts[5].reason.startswith("payload is not valid JSON")
    [profile, events] = first.requests
    assert (profile.path, profile.sources) == ("/api/profile-import", (2,))
    assert (events.path, events.sources, events.item_sources) == (
        "/api/event-bulk-create-jobs",
        (0, 1, 6),
        ((0,), (1,), (6,)),
    )


def fresh() -> tuple[Any, Send]:
    """A plan of JOBS and its bulk events request (three items: jobs 1, 2 and 7)."""
    work = plan(JOBS, Destination(), load_mappings())
    return work, work.sends[1]


def test_apply_ok_marks_the_step_accepted_for_every_job_it_carried() -> None:
    work, events = fresh()
    before = [(v.state, v.reason) for v in work.verdicts]
    apply_outcome(work, events, Outcome("ok", 202))
    assert [(v.state, v.reason) for v in work.verdicts] == before
    assert [v.accepted for v in work.verdicts] == [STEP_BITS["event"], STEP_BITS["event"], 0, 0, 0, 0, 1 << 1]


def test_apply_retry_keeps_the_longest_retry_after() -> None:
    work, events = fresh()
    apply_outcome(work, events, Outcome("retry", 429, "slow down", retry_after=3.0))
    apply_outcome(work, events, Outcome("retry", 503, "later", retry_after=1.0))
    for index in (0, 1, 6):
        verdict = work.verdicts[index]
        assert (verdict.state, verdict.reason, verdict.retry_after, verdict.accepted) == (
            RETRY,
            "later",
            3.0,
            0,
        )
    assert work.verdicts[2].state == OK  # not in this request


def test_apply_permanent_without_items_kills_every_job_of_the_request() -> None:
    work, events = fresh()
    apply_outcome(work, events, Outcome("permanent", 400, "bad job"))
    assert [work.verdicts[i].state for i in (0, 1, 6)] == [DEAD] * 3
    assert {work.verdicts[i].reason for i in (0, 1, 6)} == {"bad job"}


def test_apply_permanent_with_items_kills_only_those_and_holds_the_others_back() -> None:
    work, events = fresh()
    apply_outcome(work, events, Outcome("permanent", 400, "bulk refused", failed_items={1: "item 1 is bad"}))
    named, *others = (work.verdicts[i] for i in (1, 0, 6))
    assert (named.state, named.reason) == (DEAD, "item 1 is bad")
    for verdict in others:
        assert verdict.state == HELD
        assert verdict.reason == "held back: another item of the same bulk job was refused (bulk refused)"


def test_apply_worst_outcome_wins() -> None:
    work, events = fresh()
    apply_outcome(work, events, Outcome("permanent", 400, "bulk refused", failed_items={1: "bad"}))
    apply_outcome(work, events, Outcome("retry", 503, "server error"))  # a real retry beats a hold
    assert (work.verdicts[0].state, work.verdicts[0].reason) == (RETRY, "server error")
    assert work.verdicts[1].state == DEAD  # dead stays dead
    apply_outcome(work, events, Outcome("auth", 401, "key refused"))
    assert [work.verdicts[i].state for i in (0, 1, 6)] == [RELEASE] * 3


def keyed(job_id: int, message: dict[str, Any], key: str | None) -> Job:
    return leased(job_id, message).evolve(ordering_key=key)


def test_blocked_holds_a_failed_jobs_later_jobs_of_its_profile_only() -> None:
    jobs = [
        keyed(1, identify("u1", "a@example.com", "p1"), "u:u1"),
        keyed(2, track("u2", "Viewed", "e2"), "u:u2"),
        keyed(3, track("u1", "Viewed", "e3"), "u:u1"),
        keyed(4, track("u0", "Viewed", "e4"), None),
        keyed(5, track("u3", "Viewed", "e5"), "u:u3"),
        keyed(6, track("u3", "Viewed", "e6"), "u:u3"),
        keyed(7, track("u0", "Viewed", "e7"), "u:u0"),
        keyed(8, track("u0", "Viewed", "e8"), "u:u0"),
    ]
    work = plan(jobs, Destination(), load_mappings())
    assert blocked(work.verdicts) == set()
    work.verdicts[0].worsen(RETRY, "Klaviyo 503")  # u1's identify will come back: its track waits
    work.verdicts[4].worsen(HELD, "held back")  # so does u3's first track: its second waits
    work.verdicts[6].worsen(DEAD, "refused")  # a dead letter holds nothing back
    assert blocked(work.verdicts) == {0, 2, 4, 5, 6}


def test_requests_of_one_stage_that_share_a_profile_go_one_after_the_other() -> None:
    """Two event bulk jobs (the second holds a repeated unique_id of u1): the second waits for the
    first because both carry u1; a profile upsert of the same batch goes before either."""
    jobs = [
        keyed(1, track("u1", "Viewed", "e1"), "u:u1"),
        keyed(2, track("u2", "Viewed", "e2"), "u:u2"),
        keyed(3, {**track("u1", "Viewed", "e3"), "messageId": "e1"}, "u:u1"),
        keyed(4, identify("u4", "d@example.com", "p4"), "u:u4"),
    ]
    work = plan(jobs, Destination(), load_mappings())
    assert [(send.stage, send.kind, send.request.sources) for send in work.sends] == [
        (0, "profile", (3,)),
        (1, "event", (0, 1)),
        (1, "event", (2,)),
    ]
    assert next_wave(work.sends, work.verdicts) == [work.sends[0]]
    assert next_wave(work.sends[1:], work.verdicts) == [work.sends[1]]
    assert next_wave(work.sends[2:], work.verdicts) == [work.sends[2]]
    unrelated = [keyed(n, track(f"v{n}", "Viewed", f"x{n}"), f"u:v{n}") for n in range(1, 3)]
    apart = plan(
        [*unrelated, keyed(3, {**track("v1", "Viewed", "y"), "messageId": "x1"}, "u:w")],
        Destination(),
        load_mappings(),
    )
    assert next_wave(apart.sends, apart.verdicts) == apart.sends  # no profile in common: together


async def test_a_backlog_goes_out_in_full_event_jobs(rig: Rig) -> None:
    """Claims are sized from the last batch, and the jobs behind a partial event job wait."""
    ids = await rig.enqueue(*(track(f"u{n}", "Viewed", f"e{n}") for n in range(2500)))
    deliverer = rig.deliverer(DeliverySettings(batch_size=1000, retry=FAST))
    claimed = []
    while done := await deliverer.deliver_once():
        claimed.append(done)
    sizes = rig.event_job_sizes()
    # 2000 claimed first (twice batch_size): two full event jobs; then the 500 left
    assert (claimed, sizes) == ([2000, 500], [1000, 1000, 500])
    assert set(await rig.states(ids)) == {DONE}
    assert rig.settled == {"delivered": 2500}


async def held_over(rig: Rig) -> tuple[Deliverer, list[int]]:
    """3500 tracks, two batches delivered: 2000 claimed first (two full event jobs), then 1120
    (events per job 1.0, 12 % over): one event job sent, its last 120 jobs held over."""
    ids = await rig.enqueue(*(track(f"u{n}", "Viewed", f"e{n}") for n in range(3500)))
    deliverer = rig.deliverer(DeliverySettings(batch_size=1000, retry=FAST))
    assert [await deliverer.deliver_once(), await deliverer.deliver_once()] == [2000, 1000]
    assert rig.event_job_sizes() == [1000, 1000, 1000]
    states = Counter(await rig.states(ids[3000:]))
    assert states == {IN_FLIGHT: 120, PENDING: 380}
    assert await rig.states(ids[3000:3120]) == [IN_FLIGHT] * 120
    return deliverer, ids


async def test_jobs_held_over_go_out_first_with_the_next_batch(rig: Rig) -> None:
    """The jobs behind a batch's last full event job stay leased, planned, and the next batch sends
    them ahead of its own, without claiming or transforming them again."""
    deliverer, ids = await held_over(rig)
    assert await deliverer.deliver_once() == 500  # the 120 held over and the 380 left
    assert rig.event_job_sizes() == [1000, 1000, 1000, 500]
    assert [event.unique_id for event in rig.fake.events[3000:]] == [f"e{n}" for n in range(3000, 3500)]
    assert all(job.attempts == 0 for job in [await rig.job(job_id) for job_id in ids])
    assert set(await rig.states(ids)) == {DONE}
    assert rig.settled == {"delivered": 3500}


async def test_jobs_held_over_go_back_when_delivery_stops(rig: Rig) -> None:
    deliverer, ids = await held_over(rig)
    await deliverer.release_held()
    assert await rig.states(ids[3000:]) == [PENDING] * 500
    assert (await rig.job(ids[3000])).lease_expires_at is None


async def test_the_first_batch_sizes_the_claims_of_every_worker(rig: Rig) -> None:
    """Workers starting together wait for the first plan's events per job before they claim, and
    the first claim (twice batch_size) fills an event job when every second job is an event."""
    messages = []
    for n in range(2000):  # one event per two jobs
        messages += [identify(f"u{n}", f"u{n}@example.com", f"i{n}"), track(f"u{n}", "Viewed", f"e{n}")]
    await rig.enqueue(*messages)
    stop = asyncio.Event()
    deliverer = rig.deliverer(DeliverySettings(workers=3, batch_size=1000, idle_poll=0.01, retry=FAST))
    task = asyncio.create_task(deliverer.run(stop))
    await eventually(lambda: rig.settled, {"delivered": len(messages)}, within=30.0)
    stop.set()
    await task
    sizes = rig.event_job_sizes()
    # 2000 jobs (1000 events) first; then claims of 2240 jobs: the 2000 left
    assert sorted(sizes) == [1000, 1000]


# a fill_wait far longer than the first batch takes (the wait ends when it settles): a loaded
# machine cannot turn the first case into the second
class RecordingPlanner(Planner):
    """Plans as usual, and records how many payloads each call planned."""

    def __init__(self, mappings: MappingSets) -> None:
        super().__init__(mappings)
        self.planned: list[int] = []

    async def plan_payloads(self, payloads: Sequence[bytes], destination: Destination, **options: Any) -> Any:
        self.planned.append(len(payloads))
        return await super().plan_payloads(payloads, destination, **options)


@pytest.mark.parametrize(("fill_wait", "sizes"), [(30.0, [100, 100]), (0.0, [100, 50, 50])])
async def test_a_batch_the_queue_left_short_waits_for_the_jobs_another_frees(
    rig: Rig, fill_wait: float, sizes: list[int]
) -> None:
    """The end of a backlog: profile a's first 100 jobs are out in one batch, its last 50 wait
    behind them, and the next claim finds only b's 50 jobs. Rather than send a partial event job,
    that batch gives its jobs back, unplanned (short by the events per job so far), waits for the
    first to settle, and claims a's and b's together."""
    a = await rig.enqueue(*(track("a", "Viewed", f"a{n}") for n in range(150)))
    b = await rig.enqueue(*(track("b", "Viewed", f"b{n}") for n in range(50)))
    # the first claim takes twice batch_size: a's first 100 jobs (a key's jobs go together)
    planner = RecordingPlanner(MappingSets([None]))
    deliverer = rig.deliverer(replace(SETTINGS, batch_size=50, fill_wait=fill_wait), planner=planner)
    started = time.monotonic()
    first, second = await asyncio.gather(deliverer.deliver_once(), deliverer.deliver_once())
    # the wait ended when the first batch settled, not at fill_wait (a settle during the short
    # claim's release was once missed, and the wait ran to its end)
    assert fill_wait == 0 or time.monotonic() - started < fill_wait / 2
    while await deliverer.deliver_once():
        pass
    assert rig.event_job_sizes() == sizes
    assert planner.planned == sizes  # b's 50 given back were not planned first
    assert first == 100 and second == sizes[1]
    uniques = [event.unique_id for event in rig.fake.events]
    assert [u for u in uniques if u.startswith("a")] == [f"a{n}" for n in range(150)]
    assert set(await rig.states(a + b)) == {DONE}
    assert all(job.attempts == 0 for job in [await rig.job(job_id) for job_id in a + b])
    assert rig.settled == {"delivered": 200}


async def test_idle_workers_ask_the_queue_once_per_idle_poll_between_them(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing due, a deliverer's four workers claim about once per idle_poll between them
    (each alone: four times as often); a job queued meanwhile is still delivered."""
    claims = 0
    claim = rig.queue.claim

    async def counted(*args: Any, **kwargs: Any) -> list[Job]:
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)

    monkeypatch.setattr(rig.queue, "claim", counted)
    stop = asyncio.Event()
    task = asyncio.create_task(rig.deliverer(replace(SETTINGS, workers=4, idle_poll=0.1)).run(stop))
    await asyncio.sleep(1.0)
    idle = claims
    await rig.enqueue(track("a", "Viewed", "a0"))
    await eventually(lambda: rig.settled, {"delivered": 1}, within=5.0)
    stop.set()
    await task
    assert 4 <= idle <= 20  # the four first claims, then ~10; each worker on its own: ~40


async def test_a_batch_held_up_by_pacing_stays_leased(rig: Rig) -> None:
    """A batch outliving its lease (here: two requests to an endpoint allowed one per second) is
    renewed while it is delivered, so no other worker takes its jobs meanwhile."""
    ids = await rig.enqueue(
        group("u1", "a@example.com", LIST_ID, "m1"), group("u2", "b@example.com", "L2", "m2")
    )
    rig.fake.create_list("second", list_id="L2")
    settings = replace(SETTINGS, lease_seconds=0.3)
    destination = rig.destination()
    client = KlaviyoClient(rig.session, destination, limits=RateLimits(scale=0.01), timeout=5)
    deliverer = Deliverer(rig.queue, destination, client, settings=settings, paused=rig.paused)
    delivery = asyncio.create_task(deliverer.deliver_once())
    await asyncio.sleep(0.7)  # the second subscribe job waits ~1 s for its slot; the lease is 0.3 s
    assert not delivery.done()
    assert await rig.queue.claim(DEST, 10, lease_seconds=1) == []
    assert await delivery == 2
    assert await rig.states(ids) == [DONE, DONE]


class _Unreachable:
    """The rig's queue, whose claims fail as if the database were away while ``down`` is set."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self.down = True
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    async def claim(self, destination: str, limit: int, *, lease_seconds: float) -> list[Job]:
        if self.down:
            self.refused += 1
            raise QueueUnavailable("PostgreSQL at db:5432/router unreachable: ConnectionRefusedError")
        return await self._queue.claim(destination, limit, lease_seconds=lease_seconds)


async def test_a_queue_outage_is_logged_once_by_all_the_workers_of_a_process(rig: Rig) -> None:
    """Three workers of two destinations back off many times while the queue is away: one line
    when it goes, one when it is back."""
    unreachable = _Unreachable(rig.queue)
    outage = queue_outage()
    stop = asyncio.Event()
    deliverers = [
        Deliverer(
            unreachable,  # type: ignore[arg-type]
            rig.destination(),
            KlaviyoClient(rig.session, rig.destination()),
            settings=replace(SETTINGS, idle_poll=0.001),
            outage=outage,
        )
        for _ in range(2)
    ]
    with structlog.testing.capture_logs() as logs:
        tasks = [asyncio.create_task(deliverer.run(stop)) for deliverer in deliverers]
        await eventually(lambda: unreachable.refused >= 30)  # every worker backed off several times
        unreachable.down = False
        [job_id] = await rig.enqueue(track("u1", "Viewed", "m1"))
        await eventually(lambda: rig.states([job_id]), [DONE])
        stop.set()
        await asyncio.gather(*tasks)
    events = [entry["event"] for entry in logs if entry["event"].startswith(("delivery_queue", "queue_"))]
    assert events == ["delivery_queue_failed", "delivery_queue_recovered"]
