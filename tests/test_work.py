"""``klaviyo-router work``: refuses to start with nothing to deliver; delivers, then stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson
import pytest
from processes import child
from test_plan import metric_file

from router.cli import main
from router.fake_klaviyo import FakeKlaviyoServer
from router.identity import ordering_key
from router.queue import JobState, NewJob, Queue, open_queue

pytestmark = pytest.mark.usefixtures("no_router_env")

CONFIG = """
data_dir = "{folder}"
[queue]
url = "sqlite:///{folder}/queue.db"
[delivery]
workers = {workers}
[log]
level = "info"
[[sources]]
name = "web"
write_key = "wk_work_test_0123456789"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "{private_key}"
base_url = "{base_url}"
{mappings}
"""
NOTHING_TO_DO = "klaviyo-router: nothing to do: no destinations, or [delivery] workers = 0\n"


def write_config(
    folder: Path,
    *,
    workers: int = 2,
    base_url: str = "http://127.0.0.1:9",
    private_key: str = "pk_work_0123",
    mappings_dir: Path | None = None,
) -> Path:
    path = folder / "router.toml"
    mappings = f'mappings_dir = "{mappings_dir}"' if mappings_dir else ""
    path.write_text(
        CONFIG.format(
            folder=folder, workers=workers, base_url=base_url, private_key=private_key, mappings=mappings
        )
    )
    return path


async def done(queue: Queue, jobs: int) -> bool:
    return (await queue.counts())[JobState.DONE] == jobs


class TestNothingToDo:
    """Without delivery workers there is nothing for ``work`` to do: exit status 2 and why."""

    def test_workers_zero_in_the_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """``[delivery] workers = 0`` (an ingest-only setting) is refused before anything starts."""
        assert main(["work", "--config", str(write_config(tmp_path, workers=0))]) == 2
        assert capsys.readouterr() == ("", NOTHING_TO_DO)
        assert not (tmp_path / "queue.db").exists()

    def test_workers_zero_from_the_environment(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The environment variable wins over the file, here too."""
        monkeypatch.setenv("KLAVIYO_ROUTER_DELIVERY_WORKERS", "0")
        assert main(["work", "--config", str(write_config(tmp_path, workers=3))]) == 2
        assert capsys.readouterr() == ("", NOTHING_TO_DO)

    def test_unusable_config(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A config error is exit status 2 naming the key."""
        config = write_config(tmp_path)
        config.write_text(config.read_text().replace("workers = 2", "workers = -1"))
        assert main(["work", "--config", str(config)]) == 2
        assert capsys.readouterr().err == (
            "klaviyo-router: delivery.workers: expected an integer ≥ 0, got -1\n"
        )


class TestMappingsChecked:
    """Broken or missing mappings stop ``work`` before anything starts: exit 2, one line naming the
    file, the JSON pointer and the reason."""

    @pytest.mark.parametrize(
        ("content", "error"),
        [
            (
                b'{"kind": "event", "match": {"type": ["track"], "event": ["x"]}, "metric": 7}',
                "at /metric: 7 is not",
            ),
            (b'{"kind": ', "not valid JSON"),
            (None, "mappings_dir is not a folder"),
        ],
        ids=["schema", "json", "missing"],
    )
    def test_broken_mappings(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, error: str
    ) -> None:
        folder = tmp_path / "mappings"
        if content is not None:
            folder.mkdir()
            (folder / "mine.json").write_bytes(content)
        config = write_config(tmp_path, mappings_dir=folder)
        assert main(["work", "--config", str(config)]) == 2
        out, err = capsys.readouterr()
        where = f"{folder / 'mine.json'}: " if content is not None else f"{folder}: "
        assert out == "" and err.startswith(f"klaviyo-router: mappings: {where}") and error in err
        assert err.count("\n") == 1
        assert not (tmp_path / "queue.db").exists()  # nothing started


class TestSignals:
    """A running ``work`` process delivers what is queued and exits 0 on SIGTERM."""

    @pytest.mark.timeout(60)
    async def test_sigterm_stops_it(self, tmp_path: Path, fake_klaviyo: FakeKlaviyoServer) -> None:
        """The queued event reaches the fake; SIGTERM then stops the worker with status 0."""
        config = write_config(tmp_path, base_url=fake_klaviyo.url, private_key=fake_klaviyo.api_key)
        queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
        await queue.open()
        log = tmp_path / "work.log"
        message = {"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "m1"}
        try:
            job = NewJob(
                source="web",
                destination="klaviyo",
                message_id="m1",
                ordering_key=ordering_key(message),
                payload=orjson.dumps(message),
            )
            await queue.enqueue([job])
            async with child("work", ["work", "--config", str(config)], tmp_path) as worker:
                await worker.until(lambda: done(queue, 1))
                assert await worker.stop() == 0
        finally:
            await queue.close()
        assert [event.unique_id for event in fake_klaviyo.state.events] == ["m1"]
        logged = [orjson.loads(line)["event"] for line in log.read_bytes().splitlines()]
        assert logged[0] == "worker_started" and logged[-1] == "worker_stopped"
        assert "worker_stopping" in logged
        assert fake_klaviyo.api_key not in log.read_text()


class TestReloadOnSighup:
    """SIGHUP makes a running ``work`` read its mappings again: a set that fails its checks is
    logged and the running one stays; one that passes is what later batches are planned with (in
    its planning process too)."""

    @pytest.mark.timeout(90)
    async def test_sighup(self, tmp_path: Path, fake_klaviyo: FakeKlaviyoServer) -> None:
        folder = tmp_path / "mappings"
        folder.mkdir()
        metric_file(folder, "Seen")
        config = write_config(
            tmp_path, base_url=fake_klaviyo.url, private_key=fake_klaviyo.api_key, mappings_dir=folder
        )
        queue = open_queue(f"sqlite:///{tmp_path / 'queue.db'}")
        await queue.open()
        log = tmp_path / "work.log"
        sent = 0

        async def deliver(message_id: str) -> str:
            nonlocal sent
            message = {"type": "track", "userId": "u1", "event": "Viewed", "messageId": message_id}
            job = NewJob(
                source="web",
                destination="klaviyo",
                message_id=message_id,
                ordering_key="u1",
                payload=orjson.dumps(message),
            )
            await queue.enqueue([job])
            sent += 1
            await worker.until(lambda: done(queue, sent))
            return fake_klaviyo.state.events[-1].metric

        def logged(event: str) -> bool:
            return f'"event":"{event}"' in log.read_text()

        try:
            async with child("work", ["work", "--config", str(config)], tmp_path) as worker:
                assert await deliver("m1") == "Seen"
                metric_file(folder, "Glimpsed")
                (folder / "broken.json").write_text("{")
                worker.process.send_signal(signal.SIGHUP)
                await worker.until(lambda: logged("mappings_reload_refused"))
                assert await deliver("m2") == "Seen"  # the running set stayed
                (folder / "broken.json").unlink()
                worker.process.send_signal(signal.SIGHUP)
                await worker.until(lambda: logged("mappings_reloaded"))
                assert await deliver("m3") == "Glimpsed"
                assert await worker.stop() == 0
        finally:
            await queue.close()
        refused = [
            orjson.loads(line) for line in log.read_bytes().splitlines() if b"mappings_reload_refused" in line
        ]
        assert refused[0]["error"].startswith(f"{folder / 'broken.json'}: not valid JSON")
