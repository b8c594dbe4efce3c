"""The sandbox of the embedded default (``router.sandbox``): kept across restarts, shown on the
router's port and by ``klaviyo-router sandbox``.

The last test runs ``serve`` as a process with no config: seed 003's identify, then a product view
whose properties carry the product's title, go through ingest and delivery to the sandbox, which
``GET /sandbox/state`` shows on the router's own port; after a restart the sandbox still holds them,
and the CLI prints them from the journal.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from processes import child_env, run_router
from test_serve import running_server

from router.cli import main
from router.klaviyo.spec import SPEC_REVISION
from router.sandbox import JOURNAL_FILE, URL_FILE, Journal, read_sandbox, sandbox_klaviyo, sandbox_url
from router.settings import Settings

HEADERS = {
    "Authorization": "Klaviyo-API-Key any-key",
    "revision": SPEC_REVISION,
    "Content-Type": "application/vnd.api+json",
}
PROFILE = {"data": {"type": "profile", "attributes": {"email": "ada@example.com", "first_name": "Ada"}}}
EVENT = {
    "data": {
        "type": "event",
        "attributes": {
            "properties": {"sku": "S1"},
            "metric": {"data": {"type": "metric", "attributes": {"name": "Viewed Product"}}},
            "profile": {"data": {"type": "profile", "attributes": {"email": "ada@example.com"}}},
            "unique_id": "m1",
        },
    }
}
CASES = Path(__file__).resolve().parent / "cases" / "transform"


async def post(url: str, body: Any, headers: dict[str, str] = HEADERS) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=orjson.dumps(body), headers=headers) as response,
    ):
        await response.read()
        return response.status


class TestOneSandboxPerDataFolder:
    """``sync`` and ``work`` send to the sandbox a running ``serve`` has for the same data folder."""

    async def test_a_running_sandbox_is_joined(self, tmp_path: Path) -> None:
        settings = Settings.embedded_default(tmp_path, env={})
        async with sandbox_klaviyo(settings) as (_, own):
            assert own is not None
            assert (tmp_path / URL_FILE).read_text().strip() == own.url
            async with sandbox_url(settings) as (pointed, url):
                assert url == own.url
                assert {d.base_url for d in pointed.destinations} == {own.url}
                assert await post(url + "/api/profile-import", PROFILE) == 201
            assert own.fake.find_profile(email="ada@example.com") is not None  # the running one has it
        assert not (tmp_path / URL_FILE).exists()

    @pytest.mark.parametrize("recorded", [None, "http://127.0.0.1:9", "not a url"])
    async def test_without_one_running_a_sender_runs_its_own(
        self, tmp_path: Path, recorded: str | None
    ) -> None:
        """No URL recorded, or one nothing answers at: its own sandbox, on the same journal."""
        settings = Settings.embedded_default(tmp_path, env={})
        if recorded is not None:
            (tmp_path / URL_FILE).write_text(recorded)
        async with sandbox_url(settings) as (_, url):
            assert url is not None and url != recorded
            assert (tmp_path / URL_FILE).read_text().strip() == url
            assert await post(url + "/api/profile-import", PROFILE) == 201
        assert len(Journal(tmp_path / JOURNAL_FILE).entries()) == 1


class TestJournal:
    """What the sandbox accepted is replayed into the next one; refusals and resets are not."""

    async def test_kept_across_restarts(self, tmp_path: Path) -> None:
        """A profile and an event written to one sandbox are in the next one, and in read_sandbox."""
        settings = Settings.embedded_default(tmp_path, env={})
        async with sandbox_klaviyo(settings) as (_, sandbox):
            assert sandbox is not None
            assert await post(sandbox.url + "/api/profile-import", PROFILE) == 201
            assert await post(sandbox.url + "/api/events", EVENT) == 202
            assert await post(sandbox.url + "/api/events", {"data": {}}) == 400  # refused: not kept
        assert len(Journal(tmp_path / JOURNAL_FILE).entries()) == 2
        async with sandbox_klaviyo(settings) as (_, again):
            assert again is not None
            profile = again.fake.find_profile(email="ada@example.com")
            assert profile is not None and profile.attributes["first_name"] == "Ada"
            assert [e.metric for e in again.fake.events] == ["Viewed Product"]
            assert [r.path for r in again.fake.requests] == ["/api/profile-import", "/api/events"]
        assert len(Journal(tmp_path / JOURNAL_FILE).entries()) == 2  # replaying added nothing
        fake = await read_sandbox(tmp_path)
        assert len(fake.profiles) == 1 and len(fake.events) == 1

    async def test_reset_empties_it(self, tmp_path: Path) -> None:
        """``POST /__fake__/reset`` forgets the journal too."""
        settings = Settings.embedded_default(tmp_path, env={})
        async with sandbox_klaviyo(settings) as (_, sandbox):
            assert sandbox is not None
            assert await post(sandbox.url + "/api/profile-import", PROFILE) == 201
            assert await post(sandbox.url + "/__fake__/reset", {}, headers={}) == 200
        assert not (tmp_path / JOURNAL_FILE).exists()
        async with sandbox_klaviyo(settings) as (_, again):
            assert again is not None and not again.fake.profiles

    async def test_line_cut_short_is_left_out(self, tmp_path: Path) -> None:
        """A journal whose last line was cut short (the process killed mid-write) still replays the rest."""
        settings = Settings.embedded_default(tmp_path, env={})
        async with sandbox_klaviyo(settings) as (_, sandbox):
            assert sandbox is not None
            assert await post(sandbox.url + "/api/profile-import", PROFILE) == 201
        with (tmp_path / JOURNAL_FILE).open("ab") as journal:
            journal.write(b'{"method": "POST", "path": "/api/ev')
        fake = await read_sandbox(tmp_path)
        assert len(fake.profiles) == 1


class TestCommand:
    """``klaviyo-router sandbox``."""

    def test_nothing_yet(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("KLAVIYO_ROUTER_DATA_DIR", str(tmp_path))
        monkeypatch.delenv("KLAVIYO_ROUTER_CONFIG", raising=False)
        assert main(["sandbox"]) == 0
        assert (
            capsys.readouterr().out
            == f"the sandbox has received nothing yet ({tmp_path / JOURNAL_FILE} does not exist)\n"
        )


async def banner_sandbox_url(server: Any) -> str:
    """The sandbox's own address, from the rest of the start-up banner."""
    assert server.process.stdout is not None
    for line in server.banner:
        if match := re.search(r"a fake Klaviyo at (http://\S+?),", line):
            return match.group(1)
    while line := (await server.process.stdout.readline()).decode():
        server.banner.append(line)
        if match := re.search(r"a fake Klaviyo at (http://\S+?),", line):
            return match.group(1)
    raise AssertionError(f"no sandbox address in the banner: {server.banner}")


async def test_serve_shows_its_sandbox_and_keeps_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 003's identify then a product view through serve: ``/sandbox/state`` shows the profile
    (title 'Owner', not the product's); a restart keeps it; ``klaviyo-router sandbox`` prints it."""
    data = tmp_path / "data"
    env = child_env(KLAVIYO_ROUTER_DATA_DIR=str(data), KLAVIYO_ROUTER_PORT="0")
    identify = orjson.loads((CASES / "seed-identify-subscribe.json").read_bytes())["message"]
    viewed = {
        "type": "track",
        "event": "Product Viewed",
        "userId": identify["userId"],
        "messageId": "viewed-1",
        "properties": {"title": "test_item", "name": "Shoe", "image": "https://shop.example/shoe.png"},
    }

    async def profile_of(url: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                async with session.get(url + "/sandbox/state") as response:
                    state = await response.json()
                if state["profiles"] and state["events"]:
                    attributes: dict[str, Any] = state["profiles"][0]["attributes"]
                    return attributes
                await asyncio.sleep(0.05)
        raise AssertionError(f"the sandbox received nothing: {state}")

    async with running_server(None, tmp_path / "router.log", env) as server:
        key = (data / "write_key").read_text().strip()
        headers = {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}
        async with aiohttp.ClientSession() as session:
            # the seed's list exists in the sandbox as in an account (an unknown list id is refused)
            lists = {"lists": [{"id": "XUepkK", "name": "Newsletter"}]}
            async with session.post(
                f"{await banner_sandbox_url(server)}/__fake__/lists", json=lists
            ) as response:
                assert response.status == 200
            for message in (identify, viewed):
                async with session.post(
                    f"{server.url}/v1/{message['type']}", json=message, headers=headers
                ) as response:
                    assert response.status == 200, await response.text()
        attributes = await profile_of(server.url)
        server.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(server.process.wait(), timeout=30) == 0
    assert attributes["title"] == "Owner" and attributes["email"] == "name@website.com"

    async with running_server(None, tmp_path / "router.log", env) as server:
        assert (await profile_of(server.url))["title"] == "Owner"
        server.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(server.process.wait(), timeout=30) == 0

    command = await run_router(["sandbox"], env=env)
    out = command.stdout.decode()
    assert command.status == 0
    assert out.startswith(f"1 profile, 1 event, 1 list (from {data / JOURNAL_FILE})\n")
    assert "event   'Viewed Product' of name@website.com at " in out
    assert 'profile name@website.com: {"external_id":"userid"' in out
    assert '"title":"Owner"' in out
