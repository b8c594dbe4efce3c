"""``klaviyo-router replay``: captured files into the queue through intake, idempotently, resumable,
flow-controlled; ``--dry-run`` as ``transform --batch``; ``--archive`` after a mapping change."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from processes import child, child_env, eventually, run_router
from pytest_aiohttp import AiohttpServer
from test_end_to_end import ROOT, Expected, Observed, load_mix

from router import replay as replay_module
from router.capture_intake import Selection, content_message_id
from router.cli import main
from router.destination import Destination
from router.events import NO_DEFAULTS
from router.fake_klaviyo import FakeKlaviyo, build_fake_app, fake_of
from router.queue import EnqueueResult, Job, JobState, NewJob, open_queue
from router.queue.memory import MemoryQueue
from router.replay import REASON_PREFIX, parse_moment
from router.settings import Settings

WRITE_KEY = "wk_replay_secret_0123456789"
PRIVATE_KEY = "pk_replay_0123456789"
CONFIG = """
data_dir = "{data}"
[queue]
url = "sqlite:///{data}/queue.db"
max_depth = {max_depth}
[limits]
min_free_disk_bytes = 0
retry_after = 1
max_event_bytes = {max_event_bytes}
[delivery]
workers = 1
batch_size = {batch_size}
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
list_id = "XUepkK"
{destination_extra}
"""
T1 = "2026-11-20T08:00:00.000Z"
EVENTS: list[dict[str, Any]] = [
    {
        "type": "identify",
        "userId": "u1",
        "messageId": "m1",
        "timestamp": T1,
        "traits": {"email": "a@example.com"},
    },
    {"type": "track", "userId": "u1", "event": "Order Completed", "messageId": "m2", "timestamp": T1},
    {"type": "track", "anonymousId": "a2", "event": "Viewed", "messageId": "m3", "timestamp": T1},
    {"type": "page", "userId": "u3", "name": "Home", "messageId": "m4", "timestamp": T1},
]


@pytest.fixture(autouse=True)
def quiet_environment(no_router_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test's config only; the test process keeps its own GC tuning."""
    monkeypatch.setattr(replay_module, "tune_runtime", lambda: None)


def write_config(
    folder: Path,
    *,
    base_url: str = "http://127.0.0.1:9",
    max_depth: int = 1_000_000,
    max_event_bytes: int = 32768,
    batch_size: int = 1000,
    mappings_dir: Path | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "router.toml"
    extra = f'mappings_dir = "{mappings_dir}"' if mappings_dir is not None else ""
    path.write_text(
        CONFIG.format(
            data=folder / "data",
            max_depth=max_depth,
            max_event_bytes=max_event_bytes,
            batch_size=batch_size,
            write_key=WRITE_KEY,
            private_key=PRIVATE_KEY,
            base_url=base_url,
            destination_extra=extra,
        )
    )
    return path


def ndjson(*entries: Any) -> bytes:
    return b"".join(orjson.dumps(entry) + b"\n" for entry in entries)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["replay", *args])
    out, err = capsys.readouterr()
    assert WRITE_KEY not in out + err
    return status, out, err


def summary(out: str) -> dict[str, Any]:
    """The --json summary line."""
    result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
    return result


def jobs(config: Path, state: JobState | None = None) -> list[Job]:
    """Every job of the config's queue (in one state), by id."""
    return asyncio.run(queued(config, state))


async def queued(config: Path, state: JobState | None = None) -> list[Job]:
    queue = open_queue(f"sqlite:///{config.parent / 'data' / 'queue.db'}")
    await queue.open()
    try:
        states = [state] if state is not None else list(JobState)
        found = [job for s in states for job in await queue.list_jobs(s, limit=100_000)]
        return sorted(found, key=lambda job: job.id)
    finally:
        await queue.close()


def without_arrival(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "receivedAt"}


# ---------------------------------------------------------------- formats


FORMATS = {
    "ndjson": lambda events: ndjson(*events),
    "array": lambda events: orjson.dumps(events, option=orjson.OPT_INDENT_2),
    "batch per line": lambda events: ndjson({"batch": events[:2]}, {"batch": events[2:]}),
    "batch per file": lambda events: orjson.dumps({"batch": events}, option=orjson.OPT_INDENT_2),
    "wrappers": lambda events: ndjson(
        *({"message": e, "metadata": {"jobId": i}} for i, e in enumerate(events))
    ),
}


class TestFormats:
    @pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
    @pytest.mark.parametrize("layout", FORMATS)
    def test_every_format_enqueues_the_same_messages(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, compress: bool
    ) -> None:
        """Each layout, gzip or not, gives the queue the same normalised messages, in file order."""
        config = write_config(tmp_path)
        data = FORMATS[layout](EVENTS)
        path = tmp_path / "events"
        path.write_bytes(gzip.compress(data) if compress else data)
        status, out, _ = run(capsys, "--config", str(config), "--json", str(path))
        assert status == 0
        assert summary(out) | {"seconds": 0, "events_per_second": 0} == {
            "files": 1,
            "read": 4,
            "accepted": 4,
            "queued": 4,
            "duplicates": 0,
            "rejected": 0,
            "filtered": 0,
            "skipped_files": [],
            "failed_files": [],
            "seconds": 0,
            "events_per_second": 0,
        }
        queued = jobs(config)
        assert [(job.source, job.destination, job.state) for job in queued] == [
            ("web", "klaviyo", JobState.PENDING)
        ] * 4
        assert [job.message_id for job in queued] == ["m1", "m2", "m3", "m4"]
        messages = [without_arrival(job.message()) for job in queued]
        assert messages == [{**event} for event in EVENTS]
        assert [job.ordering_key for job in queued] == ["u:u1", "u:u1", "a:a2", "u:u3"]

    def test_folders_globs_and_several_files(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = write_config(tmp_path)
        logs = tmp_path / "logs"
        logs.mkdir()
        (logs / "1.ndjson").write_bytes(ndjson(*EVENTS[:2]))
        (logs / "2.ndjson.gz").write_bytes(gzip.compress(ndjson(*EVENTS[2:])))
        status, out, _ = run(capsys, "--config", str(config), "--json", str(logs))
        assert (status, summary(out)["files"], summary(out)["queued"]) == (0, 2, 4)
        status, out, _ = run(capsys, "--config", str(config), "--json", "--again", str(logs / "*.ndjson*"))
        assert (status, summary(out)["duplicates"], summary(out)["queued"]) == (0, 4, 0)

    def test_batch_defaults_apply_as_at_ingest(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A batch body's context fills its events; an event without timestamp keeps its own time
        (from its sentAt and originalTimestamp), not the replay's."""
        config = write_config(tmp_path)
        event = {"type": "track", "userId": "u9", "event": "Late", "messageId": "late",
                 "originalTimestamp": "2026-01-01T10:00:00.000Z"}  # fmt: skip
        body = {"batch": [event], "sentAt": "2026-01-01T10:00:05.000Z", "context": {"ip": "203.0.113.9"}}
        path = tmp_path / "body.ndjson"
        path.write_bytes(ndjson(body))
        assert run(capsys, "--config", str(config), str(path))[0] == 0
        (job,) = jobs(config)
        message = job.message()
        assert message["context"] == {"ip": "203.0.113.9"}
        assert message["timestamp"] == "2026-01-01T10:00:00.000Z"


# ---------------------------------------------------------------- idempotence


class TestIdempotence:
    def test_a_second_replay_adds_nothing(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A finished file is skipped; read again (--again, or as another file with the same events),
        every event is a duplicate of the queued one."""
        config = write_config(tmp_path)
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(*EVENTS))
        assert summary(run(capsys, "--config", str(config), "--json", str(path))[1])["queued"] == 4
        status, out, err = run(capsys, "--config", str(config), "--json", str(path))
        assert (status, summary(out)["read"], summary(out)["skipped_files"]) == (0, 0, [str(path)])
        assert "replayed before with these arguments, skipped (--again to replay it)" in err
        again = summary(run(capsys, "--config", str(config), "--json", "--again", str(path))[1])
        assert (again["read"], again["queued"], again["duplicates"]) == (4, 0, 4)
        other = tmp_path / "events.json.gz"
        other.write_bytes(gzip.compress(orjson.dumps(EVENTS)))
        assert summary(run(capsys, "--config", str(config), "--json", str(other))[1])["duplicates"] == 4
        assert len(jobs(config)) == 4

    def test_events_without_message_id_get_one_from_their_content(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The same content gives the same id in any layout; different content a different one."""
        config = write_config(tmp_path)
        bare = [{k: v for k, v in event.items() if k != "messageId"} for event in EVENTS]
        first = tmp_path / "a.ndjson"
        first.write_bytes(ndjson(*bare))
        second = tmp_path / "b.json"
        second.write_bytes(orjson.dumps(bare, option=orjson.OPT_INDENT_2))
        assert summary(run(capsys, "--config", str(config), "--json", str(first))[1])["queued"] == 4
        assert summary(run(capsys, "--config", str(config), "--json", str(second))[1])["duplicates"] == 4
        ids = [job.message_id for job in jobs(config)]
        assert ids == [content_message_id(event, NO_DEFAULTS) for event in bare]
        assert len(set(ids)) == 4


# ---------------------------------------------------------------- rejections


class TestRejections:
    def test_bad_lines_are_reported_by_number_and_kept(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Each refused line is named by file and line, with intake's reason; it is kept as a dead
        letter (the write key masked in text kept raw); the good lines are queued; exit 0."""
        config = write_config(tmp_path, max_event_bytes=600)
        lines = [
            orjson.dumps(EVENTS[0]),
            b'{"type": "track", "writeKey": "' + WRITE_KEY.encode() + b'", oops',
            orjson.dumps({"type": "track", "event": "No one", "messageId": "m-none"}),
            orjson.dumps({**EVENTS[1], "messageId": "m-big", "properties": {"blob": "x" * 700}}),
            b"[1, 2]",
            orjson.dumps(EVENTS[2]),
        ]
        path = tmp_path / "events.ndjson"
        path.write_bytes(b"\n".join(lines) + b"\n")
        status, out, err = run(capsys, "--config", str(config), "--json", str(path))
        assert status == 0
        assert (summary(out)["queued"], summary(out)["rejected"]) == (2, 4)
        reported = [line for line in err.splitlines() if line.startswith("rejected: ")]
        assert [line.split(": ", 2)[1] for line in reported] == [f"{path} line {n}" for n in (2, 3, 4, 5)]
        assert reported[0].split(": ", 2)[2].startswith("not valid JSON: ")
        assert reported[1].endswith('"userId" or "anonymousId" is required')
        assert "over the limit of 600 bytes (max_event_bytes)" in reported[2]
        assert reported[3].endswith("an event must be a JSON object, got an array")
        dead = jobs(config, JobState.DEAD)
        assert [job.last_error for job in dead] == [
            f"{REASON_PREFIX}{line.removeprefix('rejected: ')}" for line in reported
        ]
        assert WRITE_KEY not in b"".join(job.payload for job in dead).decode()
        assert orjson.loads(dead[0].payload)["raw_body"].startswith('{"type": "track", "writeKey": "***"')
        assert [job.message_id for job in jobs(config, JobState.PENDING)] == ["m1", "m3"]
        assert run(capsys, "--config", str(config), "--again", "--strict", str(path))[0] == 1

    def test_a_file_cut_short(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """What came before the break is queued; the file is named as failed; exit 1."""
        config = write_config(tmp_path)
        path = tmp_path / "cut.ndjson.gz"
        total = 20_000  # over a megabyte: the blocks before the break are read
        path.write_bytes(
            gzip.compress(ndjson(*({**EVENTS[1], "messageId": f"c{i}"} for i in range(total))))[:-30]
        )
        status, out, _ = run(capsys, "--config", str(config), str(path))
        assert status == 1
        assert f"FAILED: {path}: cannot be read to its end: " in out
        assert 0 < len(jobs(config)) < total


# ---------------------------------------------------------------- resuming


class TestResume:
    @pytest.mark.timeout(60)
    def test_a_killed_replay_goes_on_where_it_stopped(self, tmp_path: Path) -> None:
        """SIGKILL mid-file, then the same command: every event queued exactly once, and the second
        run reads only what the first had not committed."""
        config = write_config(tmp_path)
        total = 3000
        path = tmp_path / "events.ndjson.gz"
        path.write_bytes(gzip.compress(ndjson(*({**EVENTS[1], "messageId": f"k{i}"} for i in range(total)))))
        command = [sys.executable, "-m", "router", "replay", "--config", str(config), "--json", str(path)]
        process = subprocess.Popen(
            [*command, "--rate", "1500"],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            checkpoints = tmp_path / "data" / "replay"
            deadline = time.monotonic() + 30
            while not (list(checkpoints.glob("*.json")) and _entries(checkpoints) >= 300):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            assert process.wait(10) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate()
        resumed_from = _entries(checkpoints)
        assert 300 <= resumed_from < total
        finished = subprocess.run(
            command, cwd=ROOT, env=child_env(), capture_output=True, timeout=60, check=False
        )
        assert finished.returncode == 0, finished.stderr
        second = summary(finished.stdout.decode())
        assert second["read"] == total - resumed_from
        assert second["queued"] + second["duplicates"] == second["read"]
        queued = jobs(config)
        assert sorted(job.message_id for job in queued) == sorted(f"k{i}" for i in range(total))


def _entries(folder: Path) -> int:
    (checkpoint,) = folder.glob("*.json")
    return int(orjson.loads(checkpoint.read_bytes())["entries"])


# ---------------------------------------------------------------- flow control


class TestFlowControl:
    @pytest.mark.timeout(60)
    def test_waits_for_room_in_the_queue(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """With the queue at max_depth, replay waits (saying so) until delivery makes room."""
        config = write_config(tmp_path, max_depth=100)
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(*({**EVENTS[1], "messageId": f"w{i}"} for i in range(400))))
        stop = threading.Event()

        async def drain() -> None:
            queue = open_queue(f"sqlite:///{tmp_path / 'data' / 'queue.db'}")
            (tmp_path / "data").mkdir(exist_ok=True)
            await queue.open()
            try:
                while not stop.is_set():
                    await asyncio.sleep(0.3)
                    claimed = await queue.claim("klaviyo", 1000, lease_seconds=60)
                    await queue.ack([job.id for job in claimed])
            finally:
                await queue.close()

        drainer = threading.Thread(target=asyncio.run, args=(drain(),))
        drainer.start()
        try:
            status, out, err = run(capsys, "--config", str(config), "--json", "--rate", "2000", str(path))
        finally:
            stop.set()
            drainer.join()
        assert (status, summary(out)["queued"]) == (0, 400)
        assert "waiting: the queue holds" in err
        assert "(max_queue_depth)" in err

    async def test_a_group_is_committed_while_the_next_is_read(self, tmp_path: Path) -> None:
        """A full group goes to the queue at once, and the next group is read while it commits:
        the queue is called when the group fills, not when the next one does."""
        config = write_config(tmp_path)
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(*({**EVENTS[1], "messageId": f"o{i}"} for i in range(30))))
        settings = Settings.load(config)
        read_when_called: list[int] = []

        class Watched(MemoryQueue):
            async def enqueue(self, jobs: Sequence[NewJob], **options: Any) -> EnqueueResult:
                read_when_called.append(replayer.tally.read)
                return await super().enqueue(jobs, **options)

        queue = Watched()
        await queue.open()
        progress = replay_module.Progress(None, io.StringIO(), enabled=False)
        checkpoints = replay_module.Checkpoints(tmp_path / "checkpoints", "key")
        replayer = replay_module.Replayer(
            settings, queue, settings.sources[0], Selection(), checkpoints, progress
        )
        replayer.group_limit = 10
        try:
            tally = await replayer.run([str(path)])
        finally:
            await queue.close()
        assert (tally.queued, read_when_called) == (30, [10, 20, 30])

    async def test_waits_while_the_data_disk_is_nearly_full(self, tmp_path: Path) -> None:
        """Under min_free_disk_bytes, replay waits (it does not end), saying how much is free."""
        config = write_config(tmp_path)
        config.write_text(
            config.read_text().replace("min_free_disk_bytes = 0", f"min_free_disk_bytes = {2**62}")
        )
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(EVENTS[1]))
        async with child("replay", ["replay", "--config", str(config), str(path)], tmp_path) as process:
            await process.until(lambda: "bytes free on the data disk, under" in process.tail())
            assert f"under {2**62} (min_free_disk_bytes)" in process.tail()
            assert process.process.returncode is None

    def test_rate(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        config = write_config(tmp_path)
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(*({**EVENTS[1], "messageId": f"r{i}"} for i in range(300))))
        started = time.monotonic()
        assert run(capsys, "--config", str(config), "--rate", "600", str(path))[0] == 0
        assert time.monotonic() - started >= 0.45

    def test_selection(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--since/--until by the event's time, --type by call type; the rest counted as left out."""
        config = write_config(tmp_path)
        times = ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"]
        path = tmp_path / "events.ndjson"
        path.write_bytes(
            ndjson(
                *({**EVENTS[1], "messageId": f"t{i}", "timestamp": t} for i, t in enumerate(times)),
                {**EVENTS[0], "messageId": "i0", "timestamp": times[1]},
            )
        )
        args = ["--config", str(config), "--json", "--since", "2026-01-15", "--until", "2026-03-01T00:00:00Z"]
        result = summary(run(capsys, *args, "--type", "track", str(path))[1])
        assert (result["queued"], result["filtered"]) == (1, 3)
        assert [job.message_id for job in jobs(config)] == ["t1"]


# ---------------------------------------------------------------- arguments


class TestArguments:
    @pytest.mark.parametrize(
        ("args", "error"),
        [
            ([], "name the files to replay (or - for standard input), or use --archive"),
            (["--archive", "x.ndjson"], "--archive re-sends delivered jobs from the queue: it takes no files"),
            (["--archive"], "--archive needs --since (which deliveries to send again)"),
            (["--rate", "0", "x"], "--rate must be a number of events per second above 0"),
            (["--since", "yesterday", "F"], "'yesterday' is not a time: use an ISO 8601 date or date-time "
             "(2026-11-20, 2026-11-20T08:00:00Z) or a duration ago (90m, 36h, 7d, 2w)"),
            (["--type", "trak", "F"], "--type trak: not a call type (one of identify, track, page, screen, group, alias)"),
            (["--source", "app", "F"], "--source app: no [[sources]] named 'app' (known: web)"),
            (["missing.ndjson"], "missing.ndjson: cannot read: No such file or directory"),
            (["--since", "2026-02-01", "--until", "2026-01-01", "F"], "--since must be before --until"),
        ],
    )  # fmt: skip
    def test_unusable_arguments(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], error: str
    ) -> None:
        config = write_config(tmp_path)
        (tmp_path / "F").write_bytes(ndjson(EVENTS[0]))
        os.chdir(tmp_path)
        status, out, err = run(capsys, "--config", str(config), *args)
        assert (status, out, err) == (2, "", f"klaviyo-router: {error}\n")

    def test_moments(self) -> None:
        now = 1_800_000_000.0
        assert parse_moment("90m", now) == now - 5400
        assert parse_moment("2w", now) == now - 14 * 86400
        assert parse_moment("2026-11-20", now) == parse_moment("2026-11-20T00:00:00Z", now)
        assert parse_moment("2026-11-20T01:00:00+01:00", now) == parse_moment("2026-11-20T00:00:00Z", now)


# ---------------------------------------------------------------- dry run


class TestDryRun:
    def test_prints_what_transform_batch_prints_and_enqueues_nothing(
        self, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        """The mix three times over (1950 event requests) through intake and the workers' planning,
        in windows as the workers claim them: the same lines as transform --batch of the same file,
        every event job full but the last; no queue is even created."""
        config = write_config(tmp_path)
        mix = [{**e, "messageId": f"{e['messageId']}-{k}"} for k in range(3) for e in load_mix()]
        path = tmp_path / "mix.ndjson.gz"
        path.write_bytes(gzip.compress(ndjson(*mix)))
        assert main(["replay", "--config", str(config), "--dry-run", str(path)]) == 0
        replayed = capsysbinary.readouterr().out
        assert main(["transform", "--config", str(config), "--batch", str(path)]) == 0
        transformed = capsysbinary.readouterr().out
        assert replayed == transformed
        bodies = [orjson.loads(line) for line in replayed.splitlines()]
        event_jobs = [
            sum(len(entry["attributes"]["events"]["data"]) for entry in body["body"]["data"]["attributes"]["events-bulk-create"]["data"])
            for body in bodies
            if body["path"] == "/api/event-bulk-create-jobs"
        ]  # fmt: skip
        assert event_jobs == [1000, 950]
        assert not (tmp_path / "data" / "queue.db").exists()

    def test_refused_inputs_are_lines_with_their_place(
        self, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        config = write_config(tmp_path)
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(EVENTS[1], {"type": "track", "event": "x"}))
        assert main(["replay", "--config", str(config), "--dry-run", "--strict", str(path)]) == 1
        lines = [orjson.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
        assert lines[0] == {
            "error": 'line 2: "userId" or "anonymousId" is required',
            "status": 400,
            "index": 1,
        }
        assert lines[1]["path"] == "/api/events"


# ---------------------------------------------------------------- delivery and archive replay


@contextlib.asynccontextmanager
async def fake_klaviyo(
    aiohttp_server: AiohttpServer, lists: set[str]
) -> AsyncIterator[tuple[FakeKlaviyo, str]]:
    """A fake Klaviyo without rate limits, with ``lists``, and its URL."""
    app = build_fake_app(rate_limits=False, api_keys=[PRIVATE_KEY])
    fake = fake_of(app)
    for list_id in sorted(lists):
        fake.create_list(list_id, list_id=list_id)
    server = await aiohttp_server(app)
    yield fake, str(server.make_url("")).rstrip("/")


@contextlib.asynccontextmanager
async def worker(config: Path, name: str) -> AsyncIterator[None]:
    """``klaviyo-router work`` from its start (its log, ``<name>.log``, says so) until SIGTERM
    stops it cleanly."""
    started = r'"event": ?"(worker_started)"'
    async with child(name, ["work", "--config", str(config)], config.parent, announces=started) as process:
        yield
        assert await process.stop() == 0, process.tail()


async def all_done(config: Path, total: int) -> None:
    queue = open_queue(f"sqlite:///{config.parent / 'data' / 'queue.db'}")
    await queue.open()
    try:
        await eventually(
            queue.counts, lambda counts: counts[JobState.DONE] == total, within=40, what="jobs per state"
        )
    finally:
        await queue.close()


async def cli(*args: str) -> tuple[int, str]:
    """The command in a process of its own (it runs its own event loop): its status and output."""
    finished = await run_router(args)
    return finished.status, (finished.stdout + finished.stderr).decode()


class TestDelivery:
    @pytest.mark.timeout(90)
    async def test_the_replayed_mix_arrives_once(self, tmp_path: Path, aiohttp_server: AiohttpServer) -> None:
        """The bench mix replayed from gzip NDJSON, delivered by ``work``: the fake ends as the
        transform says, each event once; replayed again, nothing new is queued or sent."""
        events = load_mix()
        expected = Expected.of(events, Destination(private_key=PRIVATE_KEY, list_id="XUepkK"))
        async with fake_klaviyo(aiohttp_server, expected.lists | {"XUepkK"}) as (fake, url):
            config = write_config(tmp_path, base_url=url)
            path = tmp_path / "mix.ndjson.gz"
            path.write_bytes(gzip.compress(ndjson(*events)))
            status, output = await cli("replay", "--config", str(config), "--json", str(path))
            assert status == 0, output
            async with worker(config, "work-1"):
                await all_done(config, len(events))
            destination = Destination(private_key=PRIVATE_KEY, list_id="XUepkK")
            assert Expected.of([job.message() for job in await queued(config)], destination) == expected
            observed = Observed.of(fake.to_json())
            assert expected.problems(observed) == []
            assert len(fake.events) == len(expected.events) == 650
            assert fake.duplicate_events == 0
            requests = len(fake.requests)

            status, output = await cli("replay", "--config", str(config), "--json", "--again", str(path))
            assert status == 0, output
            again = orjson.loads(output.strip().splitlines()[-1])
            assert (again["queued"], again["duplicates"]) == (0, 1000)
            async with worker(config, "work-2"):
                await asyncio.sleep(1.0)
            assert (len(fake.requests), len(fake.events), fake.duplicate_events) == (requests, 650, 0)

    @pytest.mark.timeout(90)
    async def test_archive_replay_after_a_mapping_change_sends_the_new_shape(
        self, tmp_path: Path, aiohttp_server: AiohttpServer
    ) -> None:
        """Delivered under one metric name; the mapping renames it; --archive sends the same jobs
        again: Klaviyo gets them under the new name, with the same unique_id."""
        mappings = tmp_path / "mappings"
        mappings.mkdir()
        async with fake_klaviyo(aiohttp_server, {"XUepkK"}) as (fake, url):
            config = write_config(tmp_path, base_url=url, mappings_dir=mappings)
            orders = [{**EVENTS[1], "messageId": f"o{i}"} for i in range(5)]
            path = tmp_path / "orders.ndjson"
            path.write_bytes(ndjson(*orders, EVENTS[2]))
            assert (await cli("replay", "--config", str(config), str(path)))[0] == 0
            async with worker(config, "work-3"):
                await all_done(config, 6)
            assert sorted(e.metric for e in fake.events) == ["Order Completed"] * 5 + ["Viewed"]

            (mappings / "order-completed.json").write_bytes(
                orjson.dumps(
                    {
                        "kind": "event",
                        "match": {"type": ["track"], "event": ["order completed"]},
                        "metric": {"value": "Placed Order"},
                        "time": {"from": ["timestamp"], "type": "iso8601"},
                        "unique_id": {"from": "messageId"},
                        "properties": {"rest": {"from": "properties"}},
                    }
                )
            )
            status, output = await cli("replay", "--config", str(config), "--archive", "--since", "1h")
            assert status == 2
            assert "Confirm with --yes (no terminal to ask on)" in output
            status, output = await cli(
                "replay",
                "--config",
                str(config),
                "--archive",
                "--since",
                "1h",
                "--destination",
                "klaviyo",
                "--yes",
            )
            assert status == 0, output
            assert "sent 6 delivered jobs back to the queue" in output
            async with worker(config, "work-4"):
                await all_done(config, 6)
            renamed = sorted((e.metric, e.unique_id) for e in fake.events if e.metric == "Placed Order")
            assert renamed == [("Placed Order", f"o{i}") for i in range(5)]
            assert fake.duplicate_events == 1  # "Viewed" sent again: Klaviyo keeps the first
            assert len(fake.events) == 11
