"""``serve`` as a real process: the embedded default, config errors, and crash durability.

The crash test SIGKILLs the router (SQLite) while several senders post batches; after a restart,
every event that was answered 200 is in the queue, exactly once, and the restarted server accepts
events again and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from processes import child_env, run_router

from router.app import banner
from router.queue import JobState, open_queue
from router.sandbox import sandbox_klaviyo
from router.settings import Settings

WRITE_KEY = "wk_crash_test_0123456789"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
data_dir = "{data_dir}"
[server]
host = "127.0.0.1"
port = 0
[log]
level = "warning"
[[sources]]
name = "crash"
write_key = "{write_key}"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "pk_crash_test"
base_url = "http://127.0.0.1:9"  # delivery runs too: it must never leave loopback
"""
SENDERS = 4
EVENTS_PER_BATCH = 50
#: Batches answered 200 before the server is killed (the senders keep going meanwhile).
KILL_AFTER = 40
HEADERS = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}


class Server:
    """``python -m router.app --config FILE`` as a child process."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, banner: list[str]) -> None:
        self.process = process
        self.url = url
        #: The start-up banner's lines read so far (more may follow on stdout).
        self.banner = banner


@asynccontextmanager
async def running_server(
    config: Path | None, log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[Server]:
    """Start the router, read its address from the banner, and make sure it is gone afterwards."""
    args = ["--config", str(config)] if config else []
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.app",
            *args,
            cwd=ROOT,
            env=env or child_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdout is not None
    try:
        banner: list[str] = []
        url = await asyncio.wait_for(_banner_url(process.stdout, banner), timeout=30)
        yield Server(process, url, banner)
    finally:
        if process.returncode is None:
            process.kill()
        await process.stdout.read()
        await process.wait()


async def serve_to_exit(config: Path) -> tuple[int | None, bytes, bytes]:
    """Run the router with ``config`` until it exits by itself (30 s at most): status, stdout, stderr."""
    finished = await run_router(["--config", str(config)], module="router.app", within=30)
    return finished.status, finished.stdout, finished.stderr


async def _banner_url(stdout: asyncio.StreamReader, banner: list[str]) -> str:
    while line := (await stdout.readline()).decode():
        banner.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            return match.group(1)
    raise AssertionError("the router exited before listening")


def batch(sender: int, number: int) -> tuple[list[str], bytes]:
    ids = [f"s{sender}-b{number}-e{i}" for i in range(EVENTS_PER_BATCH)]
    events = [
        {"type": "track", "userId": f"user-{sender}-{i % 7}", "event": "Crash Test", "messageId": m}
        for i, m in enumerate(ids)
    ]
    return ids, orjson.dumps({"batch": events})


async def sender(
    url: str, index: int, acked: list[str], acked_batches: asyncio.Event, count: list[int]
) -> None:
    """Post batches until the server goes away; remember the ids of every batch answered 200."""
    async with aiohttp.ClientSession() as session:
        for number in range(10_000):
            ids, body = batch(index, number)
            try:
                async with session.post(url + "/v1/batch", data=body, headers=HEADERS) as response:
                    await response.read()
                    if response.status != 200:
                        continue
            except (aiohttp.ClientError, OSError):
                return
            acked.extend(ids)
            count[0] += 1
            if count[0] >= KILL_AFTER:
                acked_batches.set()


class TestCrash:
    """SIGKILL mid-stream loses nothing that was acknowledged."""

    async def test_sigkill_mid_stream(self, tmp_path: Path) -> None:
        """Every event answered 200 before the kill is in the queue after a restart, once."""
        config = tmp_path / "router.toml"
        config.write_text(CONFIG.format(data_dir=tmp_path / "data", write_key=WRITE_KEY))
        log = tmp_path / "router.log"
        acked: list[str] = []
        count = [0]
        enough = asyncio.Event()
        async with running_server(config, log) as server:
            senders = [
                asyncio.create_task(sender(server.url, i, acked, enough, count)) for i in range(SENDERS)
            ]
            waiter = asyncio.create_task(enough.wait())
            await asyncio.wait([waiter, *senders], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            assert enough.is_set(), [task.exception() for task in senders if task.done()]
            server.process.send_signal(signal.SIGKILL)
            await server.process.wait()
            await asyncio.wait_for(asyncio.gather(*senders), timeout=30)
        assert server.process.returncode == -signal.SIGKILL
        assert len(acked) >= KILL_AFTER * EVENTS_PER_BATCH

        async with running_server(config, log) as server:
            async with aiohttp.ClientSession() as session:
                ids, body = batch(99, 0)
                async with session.post(server.url + "/v1/batch", data=body, headers=HEADERS) as response:
                    assert response.status == 200
            server.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(server.process.wait(), timeout=30) == 0

        queue = open_queue(f"sqlite:///{tmp_path / 'data' / 'queue.db'}")
        await queue.open()
        try:  # serve also delivers: an acknowledged event may be in any state, but must be there
            jobs = [job for state in JobState for job in await queue.list_jobs(state, limit=1_000_000)]
        finally:
            await queue.close()
        stored = [job.message_id for job in jobs]
        assert len(stored) == len(set(stored))
        assert set(acked) | set(ids) <= set(stored)
        assert {job.source for job in jobs} == {"crash"}


async def read_banner(server: Server, last: str) -> str:
    """The banner up to and including the first line containing ``last``."""
    assert server.process.stdout is not None
    while not any(last in line for line in server.banner):
        server.banner.append((await server.process.stdout.readline()).decode())
    return "".join(server.banner)


class TestServe:
    """``python -m router.app``: the embedded default and configuration errors."""

    async def test_embedded_default(self, tmp_path: Path) -> None:
        """No config: the banner shows the generated write key and the sandbox; the key works."""
        env = child_env(KLAVIYO_ROUTER_DATA_DIR=str(tmp_path / "data"), KLAVIYO_ROUTER_PORT="0")
        log = tmp_path / "router.log"
        async with running_server(None, log, env) as server:
            banner = await asyncio.wait_for(read_banner(server, "SANDBOX"), timeout=10)
            key = (tmp_path / "data" / "write_key").read_text().strip()
            assert f"write key of source default: {key}" in banner
            assert "config: none (embedded default)" in banner
            assert "SANDBOX" in banner and "KLAVIYO_PRIVATE_KEY" in banner
            headers = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
            async with aiohttp.ClientSession() as session:
                body = {"userId": "u1", "event": "Signed Up"}
                async with session.post(server.url + "/v1/track", json=body, headers=headers) as response:
                    assert response.status == 200
            server.process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(server.process.wait(), timeout=30) == 0
        logged = log.read_text()
        assert '"event":"server_started"' in logged
        assert key not in logged

    async def test_config_error(self, tmp_path: Path) -> None:
        """A bad config stops start-up with exit status 2 and the key and reason on stderr."""
        config = tmp_path / "router.toml"
        config.write_text(CONFIG.format(data_dir=tmp_path, write_key="env:NOT_SET_FOR_THIS_TEST"))
        status, stdout, stderr = await serve_to_exit(config)
        assert status == 2 and stdout == b""
        assert stderr.decode().strip() == (
            "klaviyo-router: sources[0].write_key: environment variable NOT_SET_FOR_THIS_TEST is not set"
        )


class TestMappingsChecked:
    """A broken mapping folder stops ``serve`` before it listens or starts anything."""

    async def test_broken_mappings(self, tmp_path: Path) -> None:
        """Exit status 2 and one line naming the file, the JSON pointer and the reason."""
        folder = tmp_path / "mappings"
        folder.mkdir()
        (folder / "mine.json").write_text('{"kind": "profile", "fields": {"email": {"from": 7}}}')
        config = tmp_path / "router.toml"
        config.write_text(
            CONFIG.format(data_dir=tmp_path / "data", write_key=WRITE_KEY) + f'mappings_dir = "{folder}"\n'
        )
        status, stdout, stderr = await serve_to_exit(config)
        assert status == 2 and stdout == b""
        [line] = stderr.decode().splitlines()
        assert line.startswith(f"klaviyo-router: mappings: {folder / 'mine.json'}: at /fields/email/from: ")
        assert not (tmp_path / "data").exists()  # no queue, no write key: nothing started


class TestSandbox:
    """The sandbox destination is pointed at a fake Klaviyo on a loopback port for the run."""

    @pytest.mark.parametrize(
        ("value", "said"), [(None, "is not set"), ("", "is set but empty"), ("  ", "is set but empty")]
    )
    def test_banner_says_why(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, said: str
    ) -> None:
        """KLAVIYO_PRIVATE_KEY unset, or set to nothing: the sandbox, and the banner tells which."""
        if value is None:
            monkeypatch.delenv("KLAVIYO_PRIVATE_KEY", raising=False)
        else:
            monkeypatch.setenv("KLAVIYO_PRIVATE_KEY", value)
        settings = Settings.embedded_default(tmp_path, env=os.environ)
        assert settings.sandbox
        text = banner(settings, [("127.0.0.1", 8080)], "http://127.0.0.1:9")
        assert f"SANDBOX: KLAVIYO_PRIVATE_KEY {said}, so nothing is sent to Klaviyo" in text

    async def test_fake_klaviyo_started(self, tmp_path: Path) -> None:
        """Sandbox settings come back with the fake's URL, which answers HTTP; real settings are untouched."""
        settings = Settings.embedded_default(tmp_path, env={})
        async with sandbox_klaviyo(settings) as (sandboxed, sandbox):
            assert sandbox is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+", sandbox.url)
            url = sandbox.url
            assert sandboxed.destinations[0].base_url == url
            async with aiohttp.ClientSession() as session, session.get(url + "/api/accounts/") as response:
                assert response.status < 500
        real = Settings.embedded_default(tmp_path, env={"KLAVIYO_PRIVATE_KEY": "pk_real"})
        async with sandbox_klaviyo(real) as (unchanged, none):
            assert unchanged is real and none is None


class TestPortInUse:
    """A taken address: one line naming it, exit status 2, and nothing started (issue 12, item 11)."""

    async def run_cli(self, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        finished = await run_router(args, env=env)
        return finished.status, finished.stdout.decode(), finished.stderr.decode()

    async def test_serve(self, tmp_path: Path) -> None:
        """The embedded default (which starts a sandbox and workers) on a taken port stops first."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            env = child_env(KLAVIYO_ROUTER_DATA_DIR=str(tmp_path / "data"), KLAVIYO_ROUTER_PORT=str(port))
            status, stdout, stderr = await self.run_cli(["serve"], env)
        assert status == 2 and stdout == ""
        assert (
            stderr == f"klaviyo-router: server: cannot listen on 127.0.0.1:{port}: Address already in use\n"
        )
        assert not (tmp_path / "data" / "queue.db").exists()  # the queue was never opened

    async def test_fake_klaviyo(self) -> None:
        """``fake-klaviyo`` likewise."""
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            status, stdout, stderr = await self.run_cli(["fake-klaviyo", "--port", str(port)], child_env())
        assert (status, stdout) == (2, "")
        assert (
            stderr
            == f"klaviyo-router: fake-klaviyo: cannot listen on 127.0.0.1:{port}: Address already in use\n"
        )
