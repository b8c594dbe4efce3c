"""The sandbox of the embedded default: a fake Klaviyo on a free loopback port, in this process.

When no private key is configured (:attr:`Settings.sandbox`), ``serve`` starts
``router.fake_klaviyo.build_fake_app()`` on ``127.0.0.1:<free port>`` and points the sandbox
destination's ``base_url`` at it, so delivery has somewhere harmless to send to. The lists the
destinations name (``list_id``) exist there from the start; any other list id is refused, as
Klaviyo refuses it, so a mistyped id does not "work" in the sandbox only to fail for real (create
more with ``POST /__fake__/lists``, or let ``klaviyo-router sync`` create its list by name).

One data folder has one sandbox: the process that runs it writes its URL to
``<data_dir>/sandbox.url`` meanwhile, and ``sync`` and ``work`` started beside a running ``serve``
send to that sandbox (:func:`sandbox_url`) rather than start a second one on the same journal,
whose writes the running router would not see until it restarts.

What the sandbox holds outlives a restart: every write it accepts (a ``/api/...`` request answered
2xx, a list created over ``/__fake__/lists``) is appended to ``<data_dir>/sandbox.ndjson``, and a new
sandbox replays that journal into itself before delivery starts. ``POST /__fake__/reset`` empties
it. What it received is shown on the router's own port (:func:`add_sandbox_routes`:
``GET /sandbox/state``, ``GET /sandbox/requests``) and by ``klaviyo-router sandbox``
(:func:`read_sandbox`, from the journal, whether or not the router runs).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
import structlog
from aiohttp import web

from router.fake_klaviyo import FakeKlaviyo, build_fake_app, fake_of
from router.klaviyo.spec import SPEC_REVISION
from router.settings import Settings

log = structlog.get_logger("router.sandbox")

#: The sandbox's journal, in the data folder.
JOURNAL_FILE: Final = "sandbox.ndjson"
#: The URL of the sandbox running for the data folder, while it runs.
URL_FILE: Final = "sandbox.url"
#: Seconds a process waits for the sandbox named in ``URL_FILE`` to answer before starting its own.
JOIN_TIMEOUT: Final = 2.0
#: Control-API writes that change what the account holds (journaled like ``/api/...`` writes).
JOURNALED_CONTROL: Final = frozenset({"/__fake__/lists"})
RESET_PATH: Final = "/__fake__/reset"
#: The key replayed requests carry: the sandbox accepts any key, and none is kept in the journal.
REPLAY_KEY: Final = "sandbox-replay"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Sandbox:
    """A running sandbox: where it listens and what it holds."""

    url: str
    fake: FakeKlaviyo


class Journal:
    """The writes a sandbox accepted, one JSON line each (method, path, query, content type, body):
    appended as they are answered, replayed in order into a new sandbox."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: While replaying, the requests are the journal's own: not appended again.
        self.replaying = False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if self.replaying or not 200 <= response.status < 300:
            return response
        if request.method == "POST" and request.path == RESET_PATH:
            self.clear()
        elif request.method != "GET" and (
            request.path.startswith("/api/") or request.path in JOURNALED_CONTROL
        ):
            self.append(request, await request.read())
        return response

    def append(self, request: web.Request, body: bytes) -> None:
        entry = {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "content_type": request.headers.get("Content-Type", "application/json"),
            "body": base64.b64encode(body).decode(),
        }
        with self.path.open("ab") as out:
            out.write(orjson.dumps(entry) + b"\n")

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def entries(self) -> list[dict[str, Any]]:
        """The journal's entries; a line cut short (the process killed while writing it) is left out."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        entries = []
        for line in data.splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    async def replay(self, sandbox: Sandbox) -> int:
        """Send the journal's writes to ``sandbox`` again, its rate limits off meanwhile; how many."""
        entries = self.entries()
        if not entries:
            return 0
        fake = sandbox.fake
        limits = fake.rate_limits
        fake.set_rate_limits(False)
        self.replaying = True
        headers = {"Authorization": f"Klaviyo-API-Key {REPLAY_KEY}", "revision": SPEC_REVISION}
        try:
            async with aiohttp.ClientSession() as session:
                for entry in entries:
                    async with session.request(
                        entry["method"],
                        sandbox.url + entry["path"],
                        params=entry.get("query") or {},
                        data=base64.b64decode(entry.get("body", "")),
                        headers={**headers, "Content-Type": entry.get("content_type", "application/json")},
                    ) as response:
                        await response.read()
        finally:
            self.replaying = False
            fake.set_rate_limits(limits)
        return len(entries)


@contextlib.asynccontextmanager
async def running_sandbox(journal: Journal) -> AsyncIterator[Sandbox]:
    """A fake Klaviyo on a free loopback port, holding what ``journal`` recorded and recording more."""
    app = build_fake_app()
    app.middlewares.append(journal.middleware)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        sandbox = Sandbox(f"http://{host}:{port}", fake_of(app))
        replayed = await journal.replay(sandbox)
        log.info("sandbox_started", base_url=sandbox.url, replayed=replayed, journal=str(journal.path))
        yield sandbox
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def sandbox_klaviyo(settings: Settings) -> AsyncIterator[tuple[Settings, Sandbox | None]]:
    """Yield the settings (sandbox destinations pointed at the fake Klaviyo) and the sandbox, which
    this process runs (``serve``: it shows what it holds on the router's port).

    Settings without a sandbox come back unchanged with None.
    """
    if not settings.sandbox:
        yield settings, None
        return
    async with _own_sandbox(settings.data_dir) as sandbox:
        await _create_lists(sandbox.url, settings, known=sandbox.fake.lists.keys())
        yield _pointed_at(settings, sandbox.url), sandbox


@contextlib.asynccontextmanager
async def sandbox_url(settings: Settings) -> AsyncIterator[tuple[Settings, str | None]]:
    """:func:`sandbox_klaviyo` for ``work`` and ``sync``, which only send: the sandbox another process
    runs for the same data folder (its ``URL_FILE``) when it answers, else one of their own; yields
    the settings pointed at it and its URL (None without a sandbox)."""
    if not settings.sandbox:
        yield settings, None
        return
    running = await _answering(_recorded_url(settings.data_dir / URL_FILE))
    if running is not None:
        log.info("sandbox_joined", base_url=running)
        await _create_lists(running, settings, known=())
        yield _pointed_at(settings, running), running
        return
    async with sandbox_klaviyo(settings) as (pointed, sandbox):
        yield pointed, sandbox.url if sandbox is not None else None


def _pointed_at(settings: Settings, url: str) -> Settings:
    for destination in settings.destinations:
        settings = settings.with_destination(replace(destination, base_url=url))
    return settings


@contextlib.asynccontextmanager
async def _own_sandbox(data_dir: Path) -> AsyncIterator[Sandbox]:
    """:func:`running_sandbox` on the data folder's journal, its URL in ``URL_FILE`` while it runs."""
    url_file = data_dir / URL_FILE
    async with running_sandbox(Journal(data_dir / JOURNAL_FILE)) as sandbox:
        with contextlib.suppress(OSError):
            url_file.write_text(sandbox.url + "\n")
        try:
            yield sandbox
        finally:
            if _recorded_url(url_file) == sandbox.url:
                url_file.unlink(missing_ok=True)


def _recorded_url(url_file: Path) -> str | None:
    try:
        return url_file.read_text().strip() or None
    except OSError:
        return None


async def _answering(url: str | None) -> str | None:
    """``url`` when a fake Klaviyo answers there, else None."""
    if url is None:
        return None
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=JOIN_TIMEOUT)) as session,
            session.get(f"{url}/__fake__/faults") as response,
        ):
            return url if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _create_lists(url: str, settings: Settings, *, known: Collection[str]) -> None:
    """The lists the destinations name and ``known`` lacks, through the control API of the sandbox at
    ``url`` (so its journal has them too; lists it has already are left as they are)."""
    missing = sorted({d.list_id for d in settings.destinations if d.list_id and d.list_id not in known})
    if missing:
        async with aiohttp.ClientSession() as session:
            body = {"lists": [{"id": list_id, "name": list_id} for list_id in missing]}
            async with session.post(f"{url}/__fake__/lists", json=body) as response:
                response.raise_for_status()


async def read_sandbox(data_dir: Path) -> FakeKlaviyo:
    """What the sandbox of ``data_dir`` holds, rebuilt from its journal (the journal is left as it is)."""
    journal = Journal(data_dir / JOURNAL_FILE)
    journal.replaying = True  # a reader adds nothing to the journal
    async with running_sandbox(journal) as sandbox:
        await journal.replay(sandbox)
        return sandbox.fake


def add_sandbox_routes(app: web.Application, fake: FakeKlaviyo) -> None:
    """``GET /sandbox/state`` (``?summary=1``: counts only) and ``GET /sandbox/requests`` (``?since=N``)
    on the router's own port: what the sandbox received, read-only."""

    async def state(request: web.Request) -> web.Response:
        document = fake.summary() if request.query.get("summary") else fake.to_json()
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    async def requests(request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="since: expected a number of requests to skip") from None
        records = [record.to_json() for record in fake.requests[since:]]
        return web.Response(body=orjson.dumps(records), content_type="application/json")

    app.router.add_get("/sandbox/state", state)
    app.router.add_get("/sandbox/requests", requests)
