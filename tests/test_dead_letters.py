"""Dead letters over ``klaviyo-router dead-letters`` and the admin HTTP API, on a SQLite queue in ``tmp_path``.

The command runs its own event loop, so its tests are synchronous and prepare the queue with
``asyncio.run``; the admin API is driven through aiohttp's test client over :func:`build_app`. The
last test retries a dead letter through the command after a mapping fix and delivers it to the
in-process fake Klaviyo, transformed with the fixed mapping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from router.app import build_app
from router.cli import main
from router.deliver import Deliverer, DeliverySettings
from router.fake_klaviyo import FakeKlaviyoServer
from router.identity import ordering_key
from router.klaviyo.client import KlaviyoClient
from router.mapping import MappingSets
from router.planner import Planner
from router.queue import Job, JobState, NewJob, Queue, open_queue
from router.settings import Settings

pytestmark = pytest.mark.usefixtures("no_router_env")

T = TypeVar("T")
WRITE_KEY = "wk_dead_letters_0123456789"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
PLACED_ORDER_REASON = "transform: Placed Order needs an order total"
KLAVIYO_REASON = (
    "Klaviyo 400 on POST /api/profile-import: invalid: Invalid email address. (at /data/attributes/email)"
)
CONFIG = """
data_dir = "{data_dir}"
{admin}
[queue]
url = "sqlite:///{queue}"
[[sources]]
name = "web"
write_key = "{write_key}"
destinations = ["klaviyo", "other"]
[[destinations]]
name = "klaviyo"
private_key = "{private_key}"
base_url = "{base_url}"
{mappings}
[[destinations]]
name = "other"
private_key = "pk_other_0123456789"
base_url = "http://127.0.0.1:9"
"""


def write_config(
    folder: Path,
    *,
    admin_token: str | None = None,
    base_url: str = "http://127.0.0.1:9",
    private_key: str = "pk_dead_letters_0123456789",
    mappings_dir: Path | None = None,
) -> Path:
    path = folder / "router.toml"
    path.write_text(
        CONFIG.format(
            data_dir=folder,
            queue=folder / "queue.db",
            admin=f'admin_token = "{admin_token}"' if admin_token else "",
            write_key=WRITE_KEY,
            private_key=private_key,
            base_url=base_url,
            mappings=f'mappings_dir = "{mappings_dir}"' if mappings_dir else "",
        )
    )
    return path


def order(message_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "messageId": message_id,
        "timestamp": "2026-03-01T10:00:00Z",
        "properties": {"email": "ada@example.com", **properties},
    }


def new_job(message: dict[str, Any], destination: str = "klaviyo") -> NewJob:
    return NewJob(
        source="web",
        destination=destination,
        message_id=message["messageId"],
        ordering_key=ordering_key(message),
        payload=orjson.dumps(message),
    )


@dataclass(frozen=True)
class Seeded:
    """Job ids by role: three dead letters, a pending and a done job."""

    transform: int
    klaviyo: int
    other: int
    pending: int
    done: int

    @property
    def dead(self) -> list[int]:
        return [self.transform, self.klaviyo, self.other]


async def seed(queue: Queue) -> Seeded:
    """Dead letters of two destinations and two reasons (one with ``writeKey`` in its body), plus live jobs."""
    refused = {**order("m-refused", total=42.5), "writeKey": WRITE_KEY}
    await queue.enqueue([new_job(refused), new_job(order("m-done", total=1)), new_job(order("m-pending"))])
    [claimed] = await queue.claim("klaviyo", 1, lease_seconds=60)
    await queue.dead_letter(claimed.id, reason=PLACED_ORDER_REASON)
    [done] = await queue.claim("klaviyo", 1, lease_seconds=60)
    await queue.ack([done.id])
    identify = {"type": "identify", "userId": "u2", "messageId": "m-identify", "traits": {"email": "nope"}}
    await queue.add_dead([new_job(identify)], KLAVIYO_REASON)
    await queue.add_dead([new_job(identify, "other")], KLAVIYO_REASON)
    ids = {
        (job.message_id, job.destination): job.id
        for state in JobState
        for job in await queue.list_jobs(state)
    }
    assert (claimed.id, done.id) == (ids[("m-refused", "klaviyo")], ids[("m-done", "klaviyo")])
    return Seeded(
        transform=claimed.id,
        klaviyo=ids[("m-identify", "klaviyo")],
        other=ids[("m-identify", "other")],
        pending=ids[("m-pending", "klaviyo")],
        done=done.id,
    )


async def with_queue(url: str, action: Callable[[Queue], Awaitable[T]]) -> T:
    queue = open_queue(url)
    await queue.open()
    try:
        return await action(queue)
    finally:
        await queue.close()


async def states(queue: Queue) -> dict[int, JobState]:
    return {job.id: job.state for state in JobState for job in await queue.list_jobs(state)}


# -- the command ------------------------------------------------------------------------------------------------


class Command:
    """``klaviyo-router dead-letters --config FILE ...`` against a seeded queue."""

    def __init__(self, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = write_config(folder)
        self.url = Settings.load(self.config).resolved_queue_url
        self.capsys = capsys
        self.ids = asyncio.run(with_queue(self.url, seed))

    def __call__(self, *args: str | int) -> tuple[int, str, str]:
        """Exit status, stdout and stderr of one run."""
        self.capsys.readouterr()
        status = main(["dead-letters", "--config", str(self.config), *map(str, args)])
        out, err = self.capsys.readouterr()
        return status, out, err

    def states(self) -> dict[int, JobState]:
        return asyncio.run(with_queue(self.url, states))

    def job(self, job_id: int) -> Job | None:
        return asyncio.run(with_queue(self.url, lambda queue: queue.get(job_id)))


@pytest.fixture
def command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Command:
    return Command(tmp_path, capsys)


class TestCommandListAndShow:
    """``list`` prints one line (or NDJSON row) per dead letter; ``show`` one with its event."""

    def test_list(self, command: Command) -> None:
        """A table of every dead letter with its reason, and a count."""
        status, out, err = command("list")
        assert (status, err) == (0, "")
        header, *lines, count = out.splitlines()
        assert header.split() == ["ID", "DEAD", "SINCE", "DESTINATION", "TYPE", "EVENT", "REASON"]
        assert count == "3 dead letters"
        assert [int(line.split()[0]) for line in lines] == command.ids.dead
        assert PLACED_ORDER_REASON in lines[0] and "  track     Order Completed  " in lines[0]
        assert lines[1].endswith(KLAVIYO_REASON) and "  identify  -  " in lines[1] and " other " in lines[2]
        types = [line[header.index("TYPE") :].split()[0] for line in lines]  # columns under their header
        assert types == ["track", "identify", "identify"]

    def test_list_filters_and_json(self, command: Command) -> None:
        """``--reason``, ``--destination`` and ``--limit`` narrow the list; ``--json`` prints rows."""
        status, out, _ = command("list", "--json", "--reason", "Klaviyo 400")
        rows = [orjson.loads(line) for line in out.splitlines()]
        assert status == 0 and [row["id"] for row in rows] == [command.ids.klaviyo, command.ids.other]
        assert rows[0] | {"dead_since": "", "received": ""} == {
            "id": command.ids.klaviyo,
            "source": "web",
            "destination": "klaviyo",
            "message_id": "m-identify",
            "type": "identify",
            "event": None,
            "attempts": 0,
            "reason": KLAVIYO_REASON,
            "dead_since": "",
            "received": "",
        }
        assert rows[0]["dead_since"].endswith("Z")
        _, out, _ = command("list", "--destination", "other")
        assert out.splitlines()[-1] == "1 dead letter" and out.splitlines()[1].startswith(
            f"{command.ids.other:>8}  "
        )
        _, out, _ = command("list", "--limit", "1")
        assert out.splitlines()[-1] == "1 dead letter (limit reached)"
        _, out, _ = command("list", "--reason", "nothing like it")
        assert out == "0 dead letters\n"

    def test_show(self, command: Command) -> None:
        """The summary plus the stored event, without the ``writeKey`` the client put in it."""
        status, out, err = command("show", command.ids.transform)
        assert (status, err) == (0, "")
        shown = orjson.loads(out)
        assert shown["reason"] == PLACED_ORDER_REASON and shown["attempts"] == 1
        assert shown["message"] == order("m-refused", total=42.5)
        assert WRITE_KEY not in out

    @pytest.mark.parametrize("which", ["pending", "done", "missing"])
    def test_show_what_is_not_a_dead_letter(self, command: Command, which: str) -> None:
        """A job that is not dead (or no job at all) is a usage error."""
        job_id = getattr(command.ids, which) if which != "missing" else 999
        assert command("show", job_id) == (2, "", f"klaviyo-router: no dead letter {job_id}\n")


class TestCommandRetryAndPurge:
    """``retry`` sends dead letters back to pending; ``purge`` deletes them; only dead letters are touched."""

    def test_retry_by_id(self, command: Command) -> None:
        """The named dead letter is pending again, due now, with its attempts reset; the others stay dead."""
        before = time.time()
        assert command("retry", command.ids.transform) == (0, "retried 1 dead letter\n", "")
        job = command.job(command.ids.transform)
        assert job is not None and (job.state, job.attempts) == (JobState.PENDING, 0)
        assert before - 1 <= job.next_attempt_at <= time.time()
        assert [job_id for job_id, state in command.states().items() if state is JobState.DEAD] == [
            command.ids.klaviyo,
            command.ids.other,
        ]

    def test_retry_by_reason_and_all(self, command: Command) -> None:
        """``--reason`` picks by reason text; ``--all`` takes the rest."""
        assert command("retry", "--reason", "Klaviyo 400")[1] == "retried 2 dead letters\n"
        assert command.states()[command.ids.transform] is JobState.DEAD
        assert command("retry", "--all")[1] == "retried 1 dead letter\n"
        assert JobState.DEAD not in command.states().values()

    def test_retry_leaves_live_jobs_alone(self, command: Command) -> None:
        """Ids of pending or done jobs (or unknown ids) are not dead letters: nothing is revived."""
        before = command.states()
        assert command("retry", command.ids.pending, command.ids.done, 999) == (
            0,
            "retried 0 dead letters\n",
            "",
        )
        assert command.states() == before

    def test_purge(self, command: Command) -> None:
        """Purged dead letters are gone; live jobs named by id are kept."""
        assert command("purge", command.ids.other, command.ids.done)[1] == "purged 1 dead letter\n"
        assert command.job(command.ids.other) is None
        assert command("purge", "--reason", "transform:")[1] == "purged 1 dead letter\n"
        assert command("purge", "--all")[1] == "purged 1 dead letter\n"
        assert command.states() == {command.ids.done: JobState.DONE, command.ids.pending: JobState.PENDING}

    @pytest.mark.parametrize(
        ("args", "problem"),
        [
            (["retry"], "name dead letters by id, or use --all, or --reason TEXT"),
            (["purge"], "name dead letters by id, or use --all, or --reason TEXT"),
            (["retry", "1", "--all"], "use only one of: ids, --all, --reason"),
            (["purge", "--all", "--reason", "x"], "use only one of: ids, --all, --reason"),
        ],
    )
    def test_bad_selection(self, command: Command, args: list[str], problem: str) -> None:
        """No selection, or two at once: exit status 2 with the reason, and nothing changes."""
        before = command.states()
        assert command(*args) == (2, "", f"klaviyo-router: {problem}\n")
        assert command.states() == before

    def test_unreadable_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A config that cannot be read is a usage error naming the file."""
        missing = tmp_path / "missing.toml"
        assert main(["dead-letters", "--config", str(missing), "list"]) == 2
        assert capsys.readouterr().err == (
            f"klaviyo-router: {missing}: cannot read the config file: No such file or directory\n"
        )

    def test_no_queue_where_the_config_says(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A config naming a queue file that does not exist is refused, and no empty queue is made."""
        config = tmp_path / "router.toml"
        queue = tmp_path / "nowhere" / "queue.db"
        config.write_text(
            f'[queue]\nurl = "sqlite:///{queue}"\n[[sources]]\nname = "web"\nwrite_key = "wk_dead_letters_01234"\n'
            'destinations = ["klaviyo"]\n[[destinations]]\nname = "klaviyo"\nprivate_key = "pk"\n'
        )
        assert main(["dead-letters", "--config", str(config), "list"]) == 2
        assert capsys.readouterr().err == (
            f"klaviyo-router: no queue at {queue} (is --config the one serve uses?)\n"
        )
        assert not queue.exists()


# -- the admin API ----------------------------------------------------------------------------------------------


@dataclass
class Admin:
    client: TestClient[web.Request, web.Application]
    queue: Queue
    ids: Seeded

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ADMIN_TOKEN,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        response = await self.client.request(method, "/admin/dead-letters" + path, data=data, headers=headers)
        return response.status, orjson.loads(await response.read())

    async def state(self, job_id: int) -> JobState | None:
        job = await self.queue.get(job_id)
        return None if job is None else job.state


async def admin_api(folder: Path, aiohttp_client: AiohttpClient, token: str | None) -> Admin:
    settings = Settings.load(write_config(folder, admin_token=token))
    queue = open_queue(settings.resolved_queue_url)
    client = await aiohttp_client(build_app(settings, queue))  # the app opens and closes the queue
    return Admin(client, queue, await seed(queue))


@pytest.fixture
async def admin(tmp_path: Path, aiohttp_client: AiohttpClient) -> Admin:
    return await admin_api(tmp_path, aiohttp_client, ADMIN_TOKEN)


ROUTES = [
    ("GET", "", None),
    ("GET", "/1", None),
    ("POST", "/retry", {"all": True}),
    ("POST", "/purge", {"all": True}),
]


class TestAdminAccess:
    """The admin API is off without ``admin_token`` and needs that exact bearer token when on."""

    @pytest.mark.parametrize(("method", "path", "body"), ROUTES)
    async def test_off_without_a_token(
        self, tmp_path: Path, aiohttp_client: AiohttpClient, method: str, path: str, body: Any
    ) -> None:
        """Every admin path answers 404, whatever the request carries."""
        api = await admin_api(tmp_path, aiohttp_client, None)
        status, answer = await api.call(method, path, body, token="anything")
        assert (status, answer) == (404, {"error": "the admin API is off: set admin_token to turn it on"})
        assert [await api.state(job_id) for job_id in api.ids.dead] == [JobState.DEAD] * 3

    @pytest.mark.parametrize("token", [None, "", "wrong-token", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1]])
    @pytest.mark.parametrize(("method", "path", "body"), ROUTES)
    async def test_wrong_token(
        self, admin: Admin, token: str | None, method: str, path: str, body: Any
    ) -> None:
        """401 without the right bearer token, and nothing changes."""
        status, answer = await admin.call(method, path, body, token=token)
        assert (status, answer) == (401, {"error": "admin API: missing or wrong bearer token"})
        assert [await admin.state(job_id) for job_id in admin.ids.dead] == [JobState.DEAD] * 3


class TestAdminDeadLetters:
    """List, show, retry and purge over HTTP, with the command's selections."""

    async def test_list_and_filters(self, admin: Admin) -> None:
        """Summaries by id; ``reason``, ``destination``, ``limit`` and ``after`` narrow and page."""
        status, body = await admin.call("GET", "")
        assert status == 200 and [row["id"] for row in body["dead_letters"]] == admin.ids.dead
        assert body["next_after"] == admin.ids.other
        assert body["dead_letters"][0]["reason"] == PLACED_ORDER_REASON
        _, body = await admin.call("GET", "?reason=Klaviyo%20400&destination=other")
        assert [row["id"] for row in body["dead_letters"]] == [admin.ids.other]
        _, body = await admin.call("GET", "?limit=1")
        assert [row["id"] for row in body["dead_letters"]] == [body["next_after"]] == [admin.ids.transform]
        _, body = await admin.call("GET", f"?limit=1&after={body['next_after']}")
        assert [row["id"] for row in body["dead_letters"]] == [admin.ids.klaviyo]
        _, body = await admin.call("GET", f"?after={admin.ids.other}")
        assert body == {"dead_letters": [], "next_after": None}
        assert await admin.call("GET", "?limit=ten") == (
            400,
            {"error": "limit and after must be whole numbers"},
        )
        for limit in ("-1", "0", "1001"):  # SQLite would read a negative LIMIT as "no limit"
            assert await admin.call("GET", f"?limit={limit}") == (
                400,
                {"error": "limit must be between 1 and 1000"},
            )

    async def test_show(self, admin: Admin) -> None:
        """One dead letter with its event, ``writeKey`` removed; 404 for jobs that are not dead."""
        status, body = await admin.call("GET", f"/{admin.ids.transform}")
        assert status == 200 and body["reason"] == PLACED_ORDER_REASON
        assert body["message"] == order("m-refused", total=42.5)
        for job_id in (admin.ids.pending, admin.ids.done, 999):
            assert await admin.call("GET", f"/{job_id}") == (404, {"error": f"no dead letter {job_id}"})

    async def test_retry(self, admin: Admin) -> None:
        """By ids (live jobs ignored), by reason, then all: each dead letter goes back to pending once."""
        ids = admin.ids
        assert await admin.call("POST", "/retry", {"ids": [ids.transform, ids.pending, ids.done]}) == (
            200,
            {"retried": 1},
        )
        job = await admin.queue.get(ids.transform)
        assert job is not None and (job.state, job.attempts) == (JobState.PENDING, 0)
        assert (await admin.state(ids.done), await admin.state(ids.pending)) == (
            JobState.DONE,
            JobState.PENDING,
        )
        assert await admin.call("POST", "/retry", {"reason": "Klaviyo 400"}) == (200, {"retried": 2})
        assert await admin.call("POST", "/retry", {"all": True}) == (200, {"retried": 0})
        assert [await admin.state(job_id) for job_id in ids.dead] == [JobState.PENDING] * 3

    async def test_purge(self, admin: Admin) -> None:
        """Purged dead letters are gone; live jobs are kept."""
        ids = admin.ids
        assert await admin.call("POST", "/purge", {"ids": [ids.klaviyo, ids.done]}) == (200, {"purged": 1})
        assert await admin.call("POST", "/purge", {"reason": "transform:"}) == (200, {"purged": 1})
        assert await admin.call("POST", "/purge", {"all": True}) == (200, {"purged": 1})
        assert [await admin.state(job_id) for job_id in ids.dead] == [None] * 3
        assert (await admin.state(ids.done), await admin.state(ids.pending)) == (
            JobState.DONE,
            JobState.PENDING,
        )

    @pytest.mark.parametrize("action", ["retry", "purge"])
    @pytest.mark.parametrize(
        ("raw", "problem"),
        [
            (b"", "name dead letters by id, or use --all, or --reason TEXT"),
            (b"{}", "name dead letters by id, or use --all, or --reason TEXT"),
            (b'{"ids": [], "all": false}', "name dead letters by id, or use --all, or --reason TEXT"),
            (b'{"ids": [1], "all": true}', "use only one of: ids, --all, --reason"),
            (b'{"all": true, "reason": "x"}', "use only one of: ids, --all, --reason"),
            (b'{"ids": "1"}', '"ids" must be a list of dead-letter ids'),
            (b'{"ids": [true]}', '"ids" must be a list of dead-letter ids'),
            (b'{"reason": 4}', '"reason" must be text'),
            (b"[1]", "body must be a JSON object"),
        ],
    )
    async def test_bad_selection(self, admin: Admin, action: str, raw: bytes, problem: str) -> None:
        """400 with the reason; nothing changes."""
        assert await admin.call("POST", f"/{action}", raw=raw) == (400, {"error": problem})
        assert [await admin.state(job_id) for job_id in admin.ids.dead] == [JobState.DEAD] * 3

    async def test_malformed_json(self, admin: Admin) -> None:
        """A body that is not JSON is a 400 saying so."""
        status, body = await admin.call("POST", "/retry", raw=b"{ids")
        assert status == 400 and body["error"].startswith("body is not valid JSON: ")


# -- a retried dead letter goes through the current mappings --------------------------------------------------


def write_order_mapping(folder: Path, sources: list[str]) -> None:
    """A user mapping for ``Order Completed`` → ``Placed Order`` whose value must come from ``sources``."""
    mapping = folder / "order-completed.json"
    document = {
        "kind": "event",
        "match": {"type": ["track"], "event": ["order completed"]},
        "metric": {"value": "Placed Order"},
        "value": {"from": sources, "type": "float", "required": "Placed Order needs an order total"},
        "unique_id": {"from": "messageId", "type": "string"},
    }
    mapping.write_bytes(orjson.dumps(document))


@pytest.fixture
def mappings(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "mappings"
    folder.mkdir()
    write_order_mapping(folder, ["properties.order_total"])
    yield folder


class TestRetryAfterMappingFix:
    """A dead letter retried with the command after a mapping fix (and a reload) is delivered with the fixed mapping."""

    async def test_fixed_mapping_applies(
        self,
        tmp_path: Path,
        mappings: Path,
        fake_klaviyo: FakeKlaviyoServer,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Dead for want of ``order_total``; after the fix reads ``total`` too, retried and delivered."""
        config = write_config(
            tmp_path, base_url=fake_klaviyo.url, private_key=fake_klaviyo.api_key, mappings_dir=mappings
        )
        settings = Settings.load(config)
        destination = settings.destination("klaviyo")
        queue = open_queue(settings.resolved_queue_url)
        await queue.open()
        try:
            async with aiohttp.ClientSession() as session:
                client = KlaviyoClient(session, destination, timeout=5)
                sets = MappingSets([mappings])
                deliverer = Deliverer(
                    queue,
                    destination,
                    client,
                    settings=DeliverySettings(batch_size=10),
                    planner=Planner(sets),
                )
                await queue.enqueue([new_job(order("m1", total=42.5))])
                assert await deliverer.deliver_once() == 1
                [dead] = await queue.list_jobs(JobState.DEAD)
                assert dead.last_error == PLACED_ORDER_REASON
                assert fake_klaviyo.state.requests == []

                write_order_mapping(mappings, ["properties.order_total", "properties.total"])
                assert sets.reload() is None  # the operator reloads the mappings (SIGHUP)
                capsys.readouterr()
                retry = ["dead-letters", "--config", str(config), "retry", str(dead.id)]
                assert await asyncio.to_thread(main, retry) == 0
                assert capsys.readouterr().out == "retried 1 dead letter\n"
                assert await deliverer.deliver_once() == 1
        finally:
            await queue.close()

        job = await queue_job(settings, dead.id)
        assert (job.state, job.attempts) == (JobState.DONE, 0)
        [event] = fake_klaviyo.state.events
        assert (event.metric, event.value, event.unique_id) == ("Placed Order", 42.5, "m1")
        profile = fake_klaviyo.state.find_profile(email="ada@example.com")
        assert profile is not None and event.profile_id == profile.id


async def queue_job(settings: Settings, job_id: int) -> Job:
    job = await with_queue(settings.resolved_queue_url, lambda queue: queue.get(job_id))
    assert job is not None
    return job
