"""The sandbox of the embedded default: a fake Klaviyo on a free loopback port, in this process.

When no private key is configured (:attr:`Settings.sandbox`), ``serve`` starts
``router.fake_klaviyo.build_fake_app()`` on ``127.0.0.1:<free port>`` and points the sandbox
destination's ``base_url`` at it, so delivery has somewhere harmless to send to. The lists the
destinations name (``list_id``) exist there from the start; any other list id is refused, as
Klaviyo refuses it, so a mistyped id does not "work" in the sandbox only to fail for real.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import structlog
from aiohttp import web

from router.fake_klaviyo import build_fake_app, fake_of
from router.settings import Settings

log = structlog.get_logger("router.sandbox")


@contextlib.asynccontextmanager
async def sandbox_klaviyo(settings: Settings) -> AsyncIterator[tuple[Settings, str | None]]:
    """Yield the settings (sandbox destinations pointed at the fake Klaviyo) and the fake's URL.

    Settings without a sandbox come back unchanged with None.
    """
    if not settings.sandbox:
        yield settings, None
        return
    app = build_fake_app()
    for destination in settings.destinations:
        if destination.list_id and destination.list_id not in fake_of(app).lists:
            fake_of(app).create_list(destination.list_id, list_id=destination.list_id)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        for destination in settings.destinations:
            settings = settings.with_destination(replace(destination, base_url=url))
        log.info("sandbox_started", base_url=url)
        yield settings, url
    finally:
        await runner.cleanup()
