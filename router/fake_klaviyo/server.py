"""Run the fake as a local sandbox: ``klaviyo-router fake-klaviyo [--port]``."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aiohttp import web

from router.errors import ConfigError
from router.fake_klaviyo.app import build_fake_app
from router.fake_klaviyo.ratelimit import ManualClock
from router.fake_klaviyo.state import FakeKlaviyo
from router.klaviyo.spec import SPEC_REVISION
from router.runtime import collect_garbage_less
from router.sockets import BACKLOG, listen

log = structlog.get_logger("router.fake_klaviyo")


@dataclass(frozen=True)
class FakeKlaviyoServer:
    """A running fake (tests): base URL, state (assertions, faults), clock and a private key it accepts."""

    url: str
    state: FakeKlaviyo
    clock: ManualClock
    api_key: str

    def headers(self) -> dict[str, str]:
        """The headers a well-behaved client sends."""
        return {
            "Authorization": f"Klaviyo-API-Key {self.api_key}",
            "revision": SPEC_REVISION,
            "Content-Type": "application/vnd.api+json",
            "Accept": "application/vnd.api+json",
        }


async def serve(
    app: web.Application,
    host: str,
    port: int,
    stop: asyncio.Event | None = None,
    *,
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """Serve ``app`` on ``host:port`` (or on ``sockets`` already listening) until ``stop`` is set,
    or SIGINT / SIGTERM arrives."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5)
    await runner.setup()
    try:
        if sockets is None:
            await web.TCPSite(runner, host, port).start()
        for sock in sockets or ():
            await web.SockSite(runner, sock, backlog=BACKLOG).start()
        bound_host, bound_port = runner.addresses[0][:2]
        log.info("fake_klaviyo_listening", url=f"http://{bound_host}:{bound_port}")
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def run(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    rate_limits: bool = True,
    api_keys: Sequence[str] | None = None,
    store: bool = True,
) -> int:
    """Run the fake Klaviyo until SIGINT/SIGTERM; logs one line with its URL. Returns the exit status.

    ``port=0`` picks a free port (the logged URL says which). A taken address is one line on
    stderr and exit status 2. ``api_keys=None`` accepts any private key.
    ``store=False`` validates, rate-limits and counts writes without keeping them (load tests).
    Garbage is collected as rarely as in the router: every body it checks is a tree of thousands
    of short-lived objects.
    """
    try:
        sockets = listen(host, port, where="fake-klaviyo")  # before anything: a taken port is one line
    except ConfigError as exc:
        print(f"klaviyo-router: {exc.message}", file=sys.stderr)
        return 2
    try:
        collect_garbage_less()
        app = build_fake_app(rate_limits=rate_limits, api_keys=api_keys, store=store)
        asyncio.run(serve(app, host, port, sockets=sockets))
    finally:
        for sock in sockets:
            sock.close()
    return 0
