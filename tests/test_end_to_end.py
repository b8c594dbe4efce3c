"""End to end, every part a real process on loopback: rudder-sdk-python → ``klaviyo-router serve``
(ingest only, SQLite queue) → ``klaviyo-router work`` (delivery) → ``klaviyo-router fake-klaviyo``
(Klaviyo's documented rate limits on).

The 1000-event mix goes in as two halves. During the first the fake answers a burst of 5xx, a 429
with ``Retry-After: 1``, a request it holds past the worker's timeout, and random 5xx (seeded).
During the second it holds a subscription request and, while that request hangs, the worker is
SIGKILLed with jobs leased; a new worker takes them over once the (short) lease expires and sends
again what the killed one had already delivered of that batch (the fake drops the repeated events
by ``unique_id``, as Klaviyo does).

Nothing Klaviyo accepted may be sent again because something else failed: the fake counts every
write it accepted although it repeats an earlier one (:attr:`FakeKlaviyo.repeats`), and each is
held against what the input itself repeats (the mix subscribes some profiles to a list twice).
After the faulty first half there must be no repeat beyond those; after the SIGKILL, no more than
the steps of the jobs the killed worker held (the one batch whose answers it could not settle).

The fake's final profiles, events, consent and list memberships are then compared with what the
transform says of the same messages, taken in input order (:class:`Expected`), and the queue must
hold every job done. The comparison is of effects, not requests, because how jobs fall into batches
(and so which bulk requests go out) depends on timing. Where batching legitimately changes an effect
the check accepts exactly the outcomes a correct delivery can produce: a profile field set by both
identify and track may hold any value the transform gave it (profile upserts precede events within
a batch), and a list may or may not keep a profile that subscribed and later unsubscribed (Klaviyo
keeps members on unsubscribe; a batch holding both sends only the unsubscribe).

"Nothing sent before ``Retry-After``" is checked exactly: each ``work`` process runs one worker, and
the scripted 429 answers the profile bulk import, which a batch sends once. With two requests to one
endpoint in flight together (two workers, or two list jobs of one phase), one already on the wire when
the other's 429 arrives would count as early in the fake, which sees arrivals, not what the client
knew. Every process's log and the fake's request log (``requests.json``, without bodies) stay in
``tmp_path``.

``TestTransformBatchReference`` applies ``klaviyo-router transform --batch`` of the whole mix to an
in-process fake and holds it to the same expectations, so the comparison itself is checked without
processes or faults, with all 1000 messages in one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
import rudderstack.analytics.client as rudder_client
import rudderstack.analytics.request as rudder_request
from processes import FakeControl, child, eventually
from pytest_aiohttp import AiohttpClient
from sdk_replay import replay

from router.cli import main
from router.destination import Destination
from router.errors import Skipped, TransformError
from router.fake_klaviyo import FakeKlaviyo, build_fake_app, fake_of
from router.fake_klaviyo.state import event_time
from router.klaviyo.batch import LIST_STAGE, prepare, staged
from router.klaviyo.requests import REVISION
from router.mapping import load_mappings
from router.queue import Job, JobState, Queue, open_queue
from router.settings import Settings
from router.transform import transform

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
MIX = Path(__file__).parent / "data" / "events-mix.json.gz"
WRITE_KEY = "wk_end_to_end_0123456789"
PRIVATE_KEY = "pk_end_to_end_0123456789"
DESTINATION = "klaviyo"
#: Jobs per claim: small enough that the mix spreads over many batches and requests.
BATCH_SIZE = 50
#: Seconds a claimed job stays leased: what the restarted worker waits for the killed one's jobs.
LEASE = 4.0
#: Seconds the worker waits for Klaviyo; a held request costs this much (the fake holds it a little
#: longer, so the request is logged, with status 0, before the run ends).
TIMEOUT = 2.0
#: Faults from the start: a 5xx burst on bulk events (one with Retry-After), a storm of 429s on bulk
#: profile import, a held subscribe request, and 5 % random 5xx on everything, reproducible for the seed.
FAULTS: dict[str, Any] = {
    "seed": 20261122,
    "random_5xx_rate": 0.05,
    "hold_seconds": TIMEOUT + 0.5,
    "scripts": {
        "bulk_create_events": [500, {"status": 503, "retry_after": 1}, 502],
        "bulk_import_profiles": [{"status": 429, "retry_after": 1}] * 3,
        "bulk_subscribe_profiles": ["timeout"],
    },
}
#: Armed for the second half: the request held while the worker is killed. A path key, so it is
#: matched before any leftover script keyed by operation id.
KILL_TRIGGER = "POST /api/profile-subscription-bulk-create-jobs"
#: Profile attributes that the fake adds itself.
FAKE_ATTRIBUTES = frozenset({"created", "updated", "last_event_date"})
MERGED = ("location", "properties")
IDENTIFIERS = ("email", "phone_number", "external_id", "anonymous_id")

CONFIG = """
data_dir = "{data_dir}"
[server]
host = "127.0.0.1"
port = 0
[queue]
url = "sqlite:///{queue}"
[limits]
min_free_disk_bytes = 0
[delivery]
workers = {workers}
batch_size = {batch_size}
lease = {lease}
timeout = {timeout}
[log]
level = "info"
[[sources]]
name = "rudder"
write_key = "{write_key}"
destinations = ["{destination}"]
[[destinations]]
name = "{destination}"
private_key = "{private_key}"
base_url = "{base_url}"
"""


def load_mix() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = orjson.loads(gzip.decompress(MIX.read_bytes()))
    return events


def json_text(value: Any) -> str:
    """A canonical text for a JSON value (comparable, hashable)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


# -- what the transform says: the expected effects, in input order -------------------------------------------


#: (email, metric, unique_id) → (time to the second, value, value_currency, properties).
EventKey = tuple[str, str, str]
EventFacts = tuple[str, Any, Any, str]


@dataclass
class Expected:
    """The effects the transform's requests have on a Klaviyo account, message by message in input order."""

    events: dict[EventKey, EventFacts] = field(default_factory=dict)
    #: email → attribute path (``first_name``, ``location.city``) → (request kind, JSON text), in input order.
    attributes: dict[str, dict[str, list[tuple[str, str]]]] = field(default_factory=dict)
    #: (email, channel) → (status, list id) of the last consent operation.
    consent: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)
    #: list id → email → whether its last operation on the list subscribes.
    last_on_list: dict[str, dict[str, bool]] = field(default_factory=dict)
    #: list id → emails that subscribed to it at some point.
    ever_subscribed: dict[str, set[str]] = field(default_factory=dict)
    #: messageId → why the transform refused it; skipped messageIds.
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    #: (kind, JSON text) → how many times the input itself makes this write, keyed as the fake
    #: fingerprints its accepted writes (:meth:`FakeKlaviyo.note_write`).
    writes: Counter[tuple[str, str]] = field(default_factory=Counter)

    @classmethod
    def of(cls, messages: Iterable[Mapping[str, Any]], destination: Destination) -> Expected:
        expected = cls()
        mappings = load_mappings(destination.mappings_dir)
        for index, message in enumerate(messages):
            try:
                requests = transform(message, destination, mappings, index=index)
            except TransformError as exc:
                expected.rejected[message["messageId"]] = f"transform: {exc.message}"
                continue
            except Skipped:
                expected.skipped.add(message["messageId"])
                continue
            for request in requests:
                expected.add(request.kind, request.body["data"])
        return expected

    @property
    def lists(self) -> set[str]:
        return set(self.last_on_list)

    def add(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "profile":
            self._profile(kind, data["attributes"])
            self.writes["profiles", json_text(data)] += 1
        elif kind == "event":
            self._event(data["attributes"])
        elif kind in ("subscribe", "unsubscribe"):
            self._consent(kind, data)
            list_id = data["relationships"]["list"]["data"]["id"]
            for profile in data["attributes"]["profiles"]["data"]:
                if kind == "subscribe":
                    self.writes[
                        "subscriptions", json_text({"list": list_id, "job": {}, "profile": profile})
                    ] += 1
                else:
                    self.writes["unsubscriptions", json_text({"list": list_id, "profile": profile})] += 1
        else:
            raise AssertionError(f"the mix produced a {kind!r} request, which this test does not model")

    def excess_repeats(self, state: Mapping[str, Any]) -> dict[str, int]:
        """Writes the fake accepted more often than the input makes them, by kind (an event: once)."""
        excess: Counter[str] = Counter()
        for entry in state["repeated"]:
            allowed = max(1, self.writes[entry["kind"], json_text(entry["item"])])
            excess[entry["kind"]] += max(0, entry["times"] - allowed)
        return {kind: count for kind, count in excess.items() if count}

    def _profile(self, kind: str, attributes: Mapping[str, Any]) -> str:
        assert "meta" not in attributes, "patch_properties are not modelled"
        email = str(attributes["email"]).lower()
        paths = self.attributes.setdefault(email, {})
        for path, value in flatten(attributes):
            paths.setdefault(path, []).append((kind, value))
        return email

    def _event(self, attributes: Mapping[str, Any]) -> None:
        email = self._profile("event", attributes["profile"]["data"]["attributes"])
        metric = attributes["metric"]["data"]["attributes"]["name"]
        unique_id = attributes.get("unique_id")
        assert unique_id, f"an event without unique_id cannot be checked for duplicates: {attributes}"
        facts = (
            event_time(attributes.get("time")).isoformat(),
            attributes.get("value"),
            attributes.get("value_currency"),
            json_text(attributes.get("properties") or {}),
        )
        key = (email, metric, str(unique_id))
        # Klaviyo keeps the first of two events with one key; the transform never makes two.
        assert key not in self.events, f"the mix has two events {key}"
        self.events[key] = facts

    def _consent(self, kind: str, data: Mapping[str, Any]) -> None:
        list_id = data["relationships"]["list"]["data"]["id"]
        subscribes = kind == "subscribe"
        for profile in data["attributes"]["profiles"]["data"]:
            attributes = profile["attributes"]
            # a consent job touches only the identifiers of the profile (and creates it when unknown)
            email = self._profile(kind, {k: attributes[k] for k in IDENTIFIERS if k in attributes})
            for channel_group, kinds in attributes["subscriptions"].items():
                for channel_kind in kinds:
                    status = "SUBSCRIBED" if subscribes else "UNSUBSCRIBED"
                    self.consent[(email, f"{channel_group}.{channel_kind}")] = (status, list_id)
            self.last_on_list.setdefault(list_id, {})[email] = subscribes
            if subscribes:
                self.ever_subscribed.setdefault(list_id, set()).add(email)

    def problems(self, observed: Observed) -> list[str]:
        """How ``observed`` differs from what a correct delivery of these requests leaves (empty: none)."""
        found: list[str] = []
        found += _differences("event", self.events, observed.events)
        found += [f"event {key} stored {count} times" for key, count in observed.duplicates.items()]
        found += self._profile_problems(observed)
        found += _differences("consent", self.consent, observed.consent)
        for list_id in sorted(self.lists | set(observed.members)):
            last = self.last_on_list.get(list_id, {})
            members = observed.members.get(list_id, set())
            must = {email for email, subscribes in last.items() if subscribes}
            may = self.ever_subscribed.get(list_id, set())
            found += [
                f"list {list_id}: {email} missing (last subscribed)" for email in sorted(must - members)
            ]
            found += [f"list {list_id}: {email} never subscribed" for email in sorted(members - may)]
        return found

    def _profile_problems(self, observed: Observed) -> list[str]:
        found = [f"profile {email} missing" for email in sorted(self.attributes.keys() - observed.profiles)]
        found += [
            f"profile {email} unexpected" for email in sorted(observed.profiles.keys() - self.attributes)
        ]
        for email in sorted(self.attributes.keys() & observed.profiles.keys()):
            wanted, held = self.attributes[email], observed.profiles[email]
            found += [f"profile {email}: {path} missing" for path in sorted(wanted.keys() - held)]
            found += [f"profile {email}: {path} unexpected" for path in sorted(held.keys() - wanted)]
            for path in sorted(wanted.keys() & held.keys()):
                setters = wanted[path]
                values = [value for _, value in setters]
                if all(kind == "profile" for kind, _ in setters):
                    # identify only: per-profile ordering makes the last one win
                    if held[path] != values[-1]:
                        found.append(
                            f"profile {email}: {path} = {held[path]}, last identify said {values[-1]}"
                        )
                elif held[path] not in values:
                    # identify and track both set it: profile upserts go before events in a batch,
                    # so any value the transform produced for it can be the last one applied
                    found.append(f"profile {email}: {path} = {held[path]}, none of {sorted(set(values))}")
        return found


def flatten(attributes: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(path, JSON text) of profile attributes; ``location`` and ``properties`` are merged key by key."""
    for name, value in attributes.items():
        if name in MERGED and isinstance(value, dict):
            yield from ((f"{name}.{key}", json_text(item)) for key, item in value.items())
        else:
            yield name, json_text(value)


def _differences(what: str, wanted: Mapping[Any, Any], held: Mapping[Any, Any]) -> list[str]:
    found = [f"{what} {key} missing" for key in sorted(wanted.keys() - held.keys())]
    found += [f"{what} {key} unexpected" for key in sorted(held.keys() - wanted.keys())]
    found += [
        f"{what} {key}: {held[key]} instead of {wanted[key]}"
        for key in sorted(wanted.keys() & held.keys())
        if wanted[key] != held[key]
    ]
    return found


# -- what the fake holds ------------------------------------------------------------------------------------------


@dataclass
class Observed:
    """The fake's state (``GET /__fake__/state``) keyed like :class:`Expected`."""

    events: dict[EventKey, EventFacts]
    duplicates: dict[EventKey, int]
    profiles: dict[str, dict[str, str]]
    consent: dict[tuple[str, str], tuple[str, str | None]]
    members: dict[str, set[str]]
    counters: dict[str, Any]

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> Observed:
        email_of: dict[str, str] = {}
        profiles: dict[str, dict[str, str]] = {}
        for profile in state["profiles"]:
            attributes = {k: v for k, v in profile["attributes"].items() if k not in FAKE_ATTRIBUTES}
            email = attributes["email"].lower()
            assert email not in profiles, f"two profiles for {email}"
            email_of[profile["id"]] = email
            profiles[email] = dict(flatten(attributes))
        events: dict[EventKey, EventFacts] = {}
        stored: Counter[EventKey] = Counter()
        for event in state["events"]:
            key = (email_of[event["profile_id"]], event["metric"], event["unique_id"])
            stored[key] += 1
            events[key] = (
                event["time"],
                event["value"],
                event["value_currency"],
                json_text(event["properties"]),
            )
        consent = {
            (email_of[profile_id], channel): (record["status"], record["list_id"])
            for profile_id, channels in state["subscriptions"].items()
            for channel, record in channels.items()
        }
        members = {
            list_id: {email_of[profile_id] for profile_id in profile_ids}
            for list_id, profile_ids in state["memberships"].items()
        }
        duplicates = {key: count for key, count in stored.items() if count > 1}
        return cls(events, duplicates, profiles, consent, members, state["counters"])


async def applied(
    aiohttp_client: AiohttpClient, lines: Sequence[Mapping[str, Any]], lists: Iterable[str]
) -> FakeKlaviyo:
    """A fake Klaviyo (rate limits off, holding ``lists``) after every request line of ``transform``'s
    output (``{"method", "path", "body"}``) was sent to it in order; each must be accepted."""
    app = build_fake_app(rate_limits=False)
    fake = fake_of(app)
    for list_id in sorted(lists):
        fake.create_list(list_id, list_id=list_id)
    client = await aiohttp_client(app)
    headers = {
        "Authorization": f"Klaviyo-API-Key {PRIVATE_KEY}",
        "revision": REVISION,
        "Content-Type": "application/vnd.api+json",
    }
    for line in lines:
        response = await client.request(line["method"], line["path"], json=line["body"], headers=headers)
        assert response.status < 300, await response.text()
    return fake


# -- the SDK ------------------------------------------------------------------------------------------------------


def send_with_sdk(url: str, events: Sequence[Mapping[str, Any]]) -> list[str]:
    """Replay events through rudder-sdk-python's public calls, flush, and join its threads; its errors."""
    errors: list[str] = []
    client = rudder_client.Client(
        WRITE_KEY,
        host=url,
        upload_interval=0.05,
        max_retries=2,
        on_error=lambda exc, batch: errors.append(f"rudder: {exc}"),
    )
    replay(client, events)
    assert not any(consumer.is_alive() for consumer in client.consumers)
    return errors


async def in_thread(function: Callable[..., T], *args: Any, within: float) -> T:
    """Run a blocking call on a thread of its own, joined before returning."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="e2e-sdk") as pool:
        future = asyncio.get_running_loop().run_in_executor(pool, function, *args)
        return await asyncio.wait_for(future, within)


@pytest.fixture
def close_sdk_session() -> Iterator[None]:
    """The SDK keeps a module-level requests session; close its connections after the test."""
    yield
    rudder_request._session.close()


# -- the run ------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the end-to-end run left behind."""

    state: dict[str, Any]
    #: The fake's state once the first half (every fault but the SIGKILL) was settled.
    first_state: dict[str, Any]
    statuses: Counter[int]
    jobs: dict[JobState, int]
    dead: dict[str, str]
    #: Jobs leased by the killed worker, and their state at the end.
    orphaned: dict[int, JobState]
    payloads: list[dict[str, Any]]
    worker_exit: int
    serve_exit: int


def write_config(path: Path, folder: Path, base_url: str, *, workers: int) -> Path:
    path.write_text(
        CONFIG.format(
            data_dir=folder / "data",
            queue=folder / "queue.db",
            workers=workers,
            batch_size=BATCH_SIZE,
            lease=LEASE,
            timeout=TIMEOUT,
            write_key=WRITE_KEY,
            destination=DESTINATION,
            private_key=PRIVATE_KEY,
            base_url=base_url,
        )
    )
    return path


async def all_settled(queue: Queue, total: int) -> dict[JobState, int]:
    return await eventually(
        queue.counts,
        lambda c: (
            c[JobState.DONE] + c[JobState.DEAD] == total and not c[JobState.PENDING] + c[JobState.IN_FLIGHT]
        ),
        within=30,
        what="jobs per state",
    )


async def run_end_to_end(folder: Path, events: list[dict[str, Any]], lists: Iterable[str]) -> Run:
    """The run described in the module docstring; every process is gone when it returns."""
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        fake_process = await stack.enter_async_context(
            child("fake", ["fake-klaviyo", "--port", "0"], folder, announces=r"url=(http://127\.0\.0\.1:\d+)")
        )
        fake = FakeControl(session, fake_process.url)
        await fake.post("/__fake__/lists", {"lists": [{"id": list_id, "name": list_id} for list_id in lists]})
        await fake.post("/__fake__/faults", FAULTS)

        serve_config = write_config(folder / "serve.toml", folder, fake.url, workers=0)
        work_config = write_config(folder / "work.toml", folder, fake.url, workers=1)
        router = await stack.enter_async_context(
            child("serve", ["serve", "--config", str(serve_config)], folder, announces=r"listening on (\S+)")
        )
        queue = open_queue(f"sqlite:///{folder / 'queue.db'}")
        await queue.open()
        stack.push_async_callback(queue.close)
        worker = await stack.enter_async_context(
            child("work-1", ["work", "--config", str(work_config)], folder)
        )

        # first half: 5xx burst, 429, a timeout and random 5xx, one worker throughout
        assert await in_thread(send_with_sdk, router.url, first, within=30) == []
        await all_settled(queue, len(first))
        first_state = await fake.get("/__fake__/state")

        # second half: SIGKILL the worker while its subscribe request hangs, then start another
        await fake.post("/__fake__/faults", {"scripts": {KILL_TRIGGER: ["timeout"]}})
        sending = asyncio.create_task(in_thread(send_with_sdk, router.url, second, within=30))
        stack.push_async_callback(_settle_task, sending)
        await eventually(lambda: fake.armed(KILL_TRIGGER), lambda armed: not armed, within=20, what="trigger")
        assert await worker.stop(signal.SIGKILL) == -signal.SIGKILL
        leased = await queue.list_jobs(JobState.IN_FLIGHT, limit=10_000)
        assert leased, "the killed worker held no leases"
        counts = await queue.counts()
        assert 0 < counts[JobState.DONE] < len(events), counts
        restarted = await stack.enter_async_context(
            child("work-2", ["work", "--config", str(work_config)], folder)
        )
        assert await sending == []
        jobs = await all_settled(queue, len(events))

        state = await fake.get("/__fake__/state")
        log = [{k: v for k, v in r.items() if k != "json"} for r in await fake.get("/__fake__/requests")]
        (folder / "requests.json").write_bytes(orjson.dumps(log, option=orjson.OPT_INDENT_2))
        statuses = Counter(record["status"] for record in log)
        dead = {
            job.message_id: job.last_error or "" for job in await queue.list_jobs(JobState.DEAD, limit=10_000)
        }
        orphaned = {job.id: (await _job(queue, job.id)).state for job in leased}
        done = await queue.list_jobs(JobState.DONE, limit=10_000)
        payloads = [job.message() for job in sorted(done, key=lambda job: job.id)]
        worker_exit = await restarted.stop()
        serve_exit = await router.stop()
    return Run(state, first_state, statuses, jobs, dead, orphaned, payloads, worker_exit, serve_exit)


async def _job(queue: Queue, job_id: int) -> Job:
    job = await queue.get(job_id)
    assert job is not None
    return job


async def _settle_task(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        await task


def destination_of(config: Path) -> Destination:
    return Settings.load(config, env={}).destination(DESTINATION)


class TestEndToEnd:
    """SDK → serve → work → fake Klaviyo: every event arrives once, as the transform says, despite faults."""

    @pytest.mark.timeout(90)
    @pytest.mark.usefixtures("close_sdk_session")
    async def test_mix_survives_faults_and_a_killed_worker(self, tmp_path: Path) -> None:
        """The fake ends as the transform says, with every job done and nothing sent before Retry-After."""
        events = load_mix()
        config = write_config(tmp_path / "expected.toml", tmp_path, "http://127.0.0.1:9", workers=1)
        raw = Expected.of(events, destination_of(config))

        async with asyncio.timeout(80):  # cancelled in time for the processes to be killed on the way out
            run = await run_end_to_end(tmp_path, events, raw.lists)

        # the queue: every job done (the mix has nothing the transform refuses), none left behind
        assert run.dead == raw.rejected
        assert run.jobs[JobState.DONE] == len(events) - len(raw.rejected)
        assert set(run.orphaned.values()) == {JobState.DONE}  # re-claimed once the lease expired
        assert (run.worker_exit, run.serve_exit) == (0, 0)
        # what the router queued is the mix: the same effects from the queued messages as from the raw ones
        assert sorted(p["messageId"] for p in run.payloads) == sorted(e["messageId"] for e in events)
        assert Expected.of(run.payloads, destination_of(config)) == raw

        # the fake: the transform's effects, each event once; the faults happened
        observed = Observed.of(run.state)
        assert raw.problems(observed) == []
        assert len(run.state["events"]) == len(raw.events) == 650
        counters = observed.counters
        assert counters["sent_early"] == {}
        failed = {status: count for status, count in run.statuses.items() if status >= 300 or status == 0}
        # nothing Klaviyo accepted was sent again because something else failed: after the faulty
        # first half no repeat beyond what the input repeats; after the SIGKILL at most the steps
        # of the jobs the killed worker held
        first_half = Expected.of(events[: len(events) // 2], destination_of(config))
        excess_first = first_half.excess_repeats(run.first_state)
        excess = raw.excess_repeats(run.state)
        print(
            f"\nend to end: {sum(run.statuses.values())} requests, answered {dict(sorted(run.statuses.items()))}; "
            f"{counters['throttled']} throttled; {len(counters['global_unsubscribes'])} global unsubscribes\n"
            f"repeats accepted by the fake after the faults: {run.first_state['counters']['repeats']}, "
            f"beyond the input's own: {excess_first}\n"
            f"after the SIGKILL ({len(run.orphaned)} jobs orphaned): {counters['repeats']}, "
            f"beyond the input's own: {excess}"
        )
        assert excess_first == {}
        assert sum(excess.values()) <= 2 * len(run.orphaned), excess
        assert failed.get(429, 0) >= 3 and failed.get(0, 0) >= 2, failed
        assert sum(count for status, count in failed.items() if status >= 500) >= 3, failed


class TestTransformBatchReference:
    """``transform --batch`` of the whole mix, applied to a fake, leaves what the input order says."""

    async def test_batched_requests_have_the_expected_effects(
        self, tmp_path: Path, aiohttp_client: AiohttpClient, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        """One batch for 1000 messages: the same profiles, events, consent and memberships as one by one."""
        events = load_mix()
        mix = tmp_path / "mix.json"
        mix.write_bytes(orjson.dumps(events))
        settings = tmp_path / "destination.json"
        settings.write_bytes(orjson.dumps({"private_key": PRIVATE_KEY}))
        expected = Expected.of(events, Destination(private_key=PRIVATE_KEY))

        assert main(["transform", "--batch", "--destination", str(settings), str(mix)]) == 0
        lines = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
        assert [line for line in lines if "path" not in line] == []  # no rejection, no skip

        fake = await applied(aiohttp_client, lines, expected.lists)
        observed = Observed.of(fake.to_json())
        assert expected.problems(observed) == []
        assert fake.duplicate_events == 0
        assert len(fake.events) == len(expected.events) == 650

    def test_a_profiles_consent_keeps_input_order_across_lists(self) -> None:
        """Unsubscribed from one list, then subscribed to another, in one batch: the subscription goes last."""

        def group(user: str, list_id: str, subscribe: bool) -> dict[str, Any]:
            return {
                "type": "group",
                "userId": user,
                "groupId": list_id,
                "messageId": f"{user}-{list_id}",
                "traits": {"subscribe": subscribe},
                "context": {"traits": {"email": f"{user}@example.com"}},
            }

        # zed's subscription opens the job for list A before ada's unsubscription from list B
        messages = [group("zed", "A", True), group("ada", "B", False), group("ada", "A", True)]
        destination = Destination(private_key=PRIVATE_KEY)
        stages = staged(
            [
                prepare(request)
                for index, m in enumerate(messages)
                for request in transform(m, destination, index=index)
            ]
        )
        requests = [entry.request for entry in stages]
        sent = [
            (
                request.path.rsplit("-", 2)[-2],
                request.body["data"]["relationships"]["list"]["data"]["id"],
                email,
            )
            for request in requests
            for email in (
                p["attributes"]["email"] for p in request.body["data"]["attributes"]["profiles"]["data"]
            )
        ]
        assert sent.index(("delete", "B", "ada@example.com")) < sent.index(("create", "A", "ada@example.com"))
        assert sorted(sent) == [
            ("create", "A", "ada@example.com"),
            ("create", "A", "zed@example.com"),
            ("delete", "B", "ada@example.com"),
        ]
        # delivery sends a stage's requests concurrently: ada's two jobs must be in successive stages
        assert [(entry.stage, entry.request.path.rsplit("-", 2)[-2]) for entry in stages] == [
            (LIST_STAGE, "create"),
            (LIST_STAGE, "delete"),
            (LIST_STAGE + 1, "create"),
        ]
