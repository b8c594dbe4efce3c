"""The aiohttp application (:func:`build_app`) and the ``serve`` command (:func:`serve`).

Routes: the ingest paths of :mod:`router.ingest`, ``GET /health`` (the process answers),
``GET /ready`` (queue reachable, no destination paused or stalled, not shutting down), ``GET
/metrics`` (Prometheus text, the app's own registry) and the admin API of :mod:`router.admin`.

``serve`` and ``work`` check every destination's mappings before anything starts (exit 2 with the
file, the JSON pointer and the reason); SIGHUP, like ``POST /admin/mappings/reload``, reloads them,
and a set that fails its checks leaves the running one in place (:class:`~router.mapping.MappingSets`).

Resources live in ``cleanup_ctx``: the queue is opened before the first request and closed after
the last commit; the backpressure sampler and the retention cleanup (:mod:`router.retention`) run
in between. Extra contexts (the delivery worker) are entered after those and left before them, so
they always see an open queue.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router import __version__
from router.admin import add_admin_routes
from router.deliver import DeliverySettings, deliver_all
from router.errors import ConfigError, MappingError
from router.health import Backpressure, PausedDestinations, Stalls
from router.ingest import Ingest, json_response
from router.klaviyo.ratelimit import RateLimits
from router.klaviyo.shared_ratelimit import shared_pacers
from router.logs import configure_logging
from router.mapping import MappingSets
from router.metrics import Metrics
from router.middleware import PROTOCOL_LOG, middleware
from router.queue import Queue, open_queue
from router.retention import retention_kept
from router.runtime import tune_runtime
from router.sandbox import JOURNAL_FILE, add_sandbox_routes, sandbox_klaviyo, sandbox_url
from router.settings import PRIVATE_KEY_ENV, Settings
from router.sockets import BACKLOG, listen
from router.sync.schedule import sync_contexts

log = structlog.get_logger("router.app")

CleanupContext = Callable[[web.Application], AsyncIterator[None]]

SETTINGS = web.AppKey("settings", Settings)
QUEUE: web.AppKey[Queue] = web.AppKey("queue")
METRICS = web.AppKey("metrics", Metrics)
PAUSED = web.AppKey("paused", PausedDestinations)
PRESSURE = web.AppKey("pressure", Backpressure)
STALLS = web.AppKey("stalls", Stalls)
MAPPINGS = web.AppKey("mappings", MappingSets)
INGEST = web.AppKey("ingest", Ingest)

#: Seconds between two samples of the queue depth and free disk (backpressure) and of each
#: destination's oldest due job (stalls).
SAMPLE_INTERVAL = 5.0
#: Seconds shutdown waits for in-flight requests before cancelling them.
SHUTDOWN_TIMEOUT = 30.0


def build_app(
    settings: Settings,
    queue: Queue,
    *,
    paused: PausedDestinations | None = None,
    contexts: Sequence[CleanupContext] = (),
    manage_queue: bool = True,
    sample_interval: float = SAMPLE_INTERVAL,
    mappings: MappingSets | None = None,
) -> web.Application:
    """The router's web application.

    ``queue`` is opened and closed by the app unless ``manage_queue`` is False. ``paused`` is the
    registry the delivery worker updates (a new one by default). ``contexts`` are extra cleanup
    contexts (the delivery worker) run inside the app's own. ``mappings``: the sets delivery uses,
    which ``POST /admin/mappings/reload`` reloads (default: the destinations' sets, read now).
    """
    metrics = Metrics()
    paused = paused if paused is not None else PausedDestinations(metrics)
    if mappings is None:
        mappings = MappingSets(destination.mappings_dir for destination in settings.destinations)
    stalls = Stalls(
        queue,
        [destination.name for destination in settings.destinations],
        stall_after=settings.delivery_stall_after,
    )
    pressure = Backpressure(
        queue,
        data_dir=settings.data_dir,
        max_queue_depth=settings.max_queue_depth,
        min_free_disk_bytes=settings.min_free_disk_bytes,
        metrics=metrics,
    )
    ingest = Ingest(settings, queue, metrics=metrics, pressure=pressure)
    # Ingest decompresses gzip bodies itself (capped, with JSON errors), so aiohttp must not.
    app = web.Application(
        client_max_size=settings.max_request_bytes + 1,
        handler_args={"auto_decompress": False, "logger": PROTOCOL_LOG},
        middlewares=[middleware(metrics)],
    )
    app[SETTINGS] = settings
    app[QUEUE] = queue
    app[METRICS] = metrics
    app[PAUSED] = paused
    app[PRESSURE] = pressure
    app[STALLS] = stalls
    app[MAPPINGS] = mappings
    app[INGEST] = ingest
    app.add_routes(ingest.routes())
    app.add_routes(
        [
            web.get("/health", health, name="health"),
            web.get("/ready", ready, name="ready"),
            web.get("/metrics", metrics_text, name="metrics"),
        ]
    )
    add_admin_routes(app, queue, settings.admin_token, mappings)
    if manage_queue:
        app.cleanup_ctx.append(_queue_context)
    app.cleanup_ctx.append(_sampler_context(sample_interval))
    app.cleanup_ctx.append(_retention_context)
    app.cleanup_ctx.extend(contexts)
    app.on_shutdown.append(_start_draining)
    return app


async def _queue_context(app: web.Application) -> AsyncIterator[None]:
    queue = app[QUEUE]
    await queue.open()
    try:
        yield
    finally:
        await app[INGEST].wait_idle()
        await queue.close()


def _sampler_context(interval: float) -> CleanupContext:
    async def sampler(app: web.Application) -> AsyncIterator[None]:
        pressure = app[PRESSURE]
        await pressure.refresh()
        tasks = [
            asyncio.create_task(pressure.run(interval), name="backpressure-sampler"),
            asyncio.create_task(app[STALLS].run(interval), name="stall-sampler"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return sampler


async def _retention_context(app: web.Application) -> AsyncIterator[None]:
    async with retention_kept(app[QUEUE], app[SETTINGS].cleanup_interval, app[METRICS]):
        yield


async def _start_draining(app: web.Application) -> None:
    app[INGEST].draining = True


async def health(request: web.Request) -> web.Response:
    """``GET /health``: 200 while the process answers."""
    return json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    """``GET /ready``: 200 when the queue answers and no destination is paused, else 503 with why."""
    app = request.app
    problems: list[str] = []
    if app[INGEST].draining:
        problems.append("shutting down")
    try:
        await app[QUEUE].ping()
    except Exception as exc:  # any failure of the backend means "not ready"
        problems.append(f"queue unreachable: {type(exc).__name__}: {exc}")
    paused = app[PAUSED].snapshot()
    problems.extend(f"destination {name} paused: {reason}" for name, reason in sorted(paused.items()))
    stalled = app[STALLS].stalled()
    problems.extend(f"destination {name} stalled: {reason}" for name, reason in stalled.items())
    overloaded = app[PRESSURE].overloaded()
    mappings = app[MAPPINGS]
    body: dict[str, Any] = {
        "ready": not problems,
        "problems": problems,
        "paused": paused,
        "stalled": stalled,
        "mappings": {"generation": mappings.generation, "last_reload_refused": mappings.reload_error},
    }
    if overloaded:
        body["backpressure"] = overloaded
    return json_response(body, status=200 if not problems else 503)


async def metrics_text(request: web.Request) -> web.Response:
    """``GET /metrics``: the app's Prometheus registry."""
    response = web.Response(body=request.app[METRICS].render())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


# --- serve --------------------------------------------------------------------------------------


def serve(config_path: Path | None, *, host: str | None = None, port: int | None = None) -> int:
    """Run the ingest server until SIGINT/SIGTERM; the exit status (2: unusable configuration).

    Without ``config_path`` the embedded default applies (see :meth:`Settings.embedded_default`).
    """
    try:
        settings = Settings.load(config_path)
    except ConfigError as exc:
        print(f"klaviyo-router: {exc.message}", file=sys.stderr)
        return 2
    settings = replace(
        settings, host=settings.host if host is None else host, port=settings.port if port is None else port
    )
    mappings = checked_mappings(settings)
    if mappings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secrets())
    tune_runtime()
    try:
        return asyncio.run(_serve(settings, mappings))
    except ConfigError as exc:
        print(f"klaviyo-router: {exc.message}", file=sys.stderr)
        return 2


def checked_mappings(settings: Settings) -> MappingSets | None:
    """Every destination's mappings, read and checked; None (said on stderr, one line) when any fails."""
    try:
        return MappingSets(destination.mappings_dir for destination in settings.destinations)
    except MappingError as exc:
        print(f"klaviyo-router: mappings: {exc.message}", file=sys.stderr)
        return None


def delivery_contexts(
    settings: Settings, limits: Mapping[str, RateLimits] | None = None, mappings: MappingSets | None = None
) -> Sequence[CleanupContext]:
    """The cleanup context that runs the delivery workers inside ``serve`` (with ``mappings``).

    None without destinations, or with ``[delivery] workers = 0`` (an ingest-only node).

    On shutdown the workers finish the batch they are sending (up to :data:`SHUTDOWN_TIMEOUT`);
    a batch still unfinished then is cancelled and its jobs are released to the queue.
    """
    if not settings.destinations or settings.delivery_workers == 0:
        return ()

    async def delivery(app: web.Application) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(
            deliver_all(
                app[QUEUE],
                settings.destinations,
                stop,
                settings=DeliverySettings.from_settings(settings),
                paused=app[PAUSED],
                metrics=app[METRICS],
                limits=limits,
                mappings=mappings,
            ),
            name="delivery",
        )
        try:
            yield
        finally:
            await _stop_delivery(stop, task)

    return (delivery,)


async def _stop_delivery(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    try:
        await asyncio.wait_for(task, SHUTDOWN_TIMEOUT)
    except TimeoutError:
        log.warning("delivery_stop_timed_out", seconds=SHUTDOWN_TIMEOUT)


def work(config_path: Path | None) -> int:
    """Run delivery workers only (``klaviyo-router work``) until SIGINT/SIGTERM."""
    try:
        settings = Settings.load(config_path)
    except ConfigError as exc:
        print(f"klaviyo-router: {exc.message}", file=sys.stderr)
        return 2
    if settings.delivery_workers == 0 or not settings.destinations:
        print("klaviyo-router: nothing to do: no destinations, or [delivery] workers = 0", file=sys.stderr)
        return 2
    mappings = checked_mappings(settings)
    if mappings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secrets())
    tune_runtime()
    return asyncio.run(_work(settings, mappings))


async def _work(settings: Settings, mappings: MappingSets) -> int:
    queue = open_queue(settings.resolved_queue_url, settings.queue_options())
    await queue.open()
    try:
        async with sandbox_url(settings) as (settings, sandbox):
            if sandbox is not None:
                print(f"sandbox Klaviyo at {sandbox}: nothing leaves this machine", flush=True)
            stop = asyncio.Event()
            task = asyncio.create_task(
                deliver_all(
                    queue,
                    settings.destinations,
                    stop,
                    settings=DeliverySettings.from_settings(settings),
                    mappings=mappings,
                )
            )
            log.info("worker_started", destinations=[d.name for d in settings.destinations])
            async with retention_kept(queue, settings.cleanup_interval):
                await _wait_for_signal(mappings)
                log.info("worker_stopping")
            await _stop_delivery(stop, task)
    finally:
        await queue.close()
    log.info("worker_stopped")
    return 0


async def _serve(settings: Settings, mappings: MappingSets) -> int:
    sockets = listen(
        settings.host, settings.port
    )  # first: a taken address stops serve before anything starts
    try:
        return await _serve_on(settings, mappings, sockets)
    finally:
        for sock in sockets:
            sock.close()


async def _serve_on(settings: Settings, mappings: MappingSets, sockets: list[socket.socket]) -> int:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {settings.data_dir}: {exc.strerror}") from exc
    queue = open_queue(settings.resolved_queue_url, settings.queue_options())
    async with sandbox_klaviyo(settings) as (settings, sandbox):
        # one pacer per destination, shared by delivery and the scheduled syncs (Klaviyo counts per
        # account), the cluster's when the queue keeps send budgets
        limits = {
            d.name: RateLimits(scale=settings.delivery_rate_limit_scale, pacer=shared_pacers(queue, d.name))
            for d in settings.destinations
        }
        contexts = [*delivery_contexts(settings, limits, mappings), *sync_contexts(settings, limits)]
        app = build_app(settings, queue, contexts=contexts, mappings=mappings)
        if sandbox is not None:
            add_sandbox_routes(app, sandbox.fake)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        try:
            await runner.setup()
        except Exception as exc:
            print(f"klaviyo-router: cannot open the queue: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        try:
            for sock in sockets:
                await web.SockSite(runner, sock, backlog=BACKLOG).start()
            print(banner(settings, runner.addresses, sandbox.url if sandbox else None), flush=True)
            log.info(
                "server_started",
                address=_address(runner.addresses),
                queue=_safe_url(settings.resolved_queue_url),
            )
            await _wait_for_signal(mappings)
            log.info("server_stopping")
            app[INGEST].draining = True
        finally:
            await runner.cleanup()
        log.info("server_stopped")
    return 0


async def _wait_for_signal(mappings: MappingSets) -> None:
    """Until SIGINT or SIGTERM; SIGHUP reloads ``mappings`` meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, mappings.reload)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _address(addresses: Sequence[Any]) -> str:
    if not addresses:
        return "?"
    host, port = addresses[0][0], addresses[0][1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def banner(settings: Settings, addresses: Sequence[Any], sandbox_url: str | None) -> str:
    """The start-up text for the operator's terminal (the one place a generated write key is shown)."""
    lines = [
        f"klaviyo-router {__version__} listening on {_address(addresses)}",
        f"  queue: {_safe_url(settings.resolved_queue_url)}",
        f"  config: {settings.config_path or 'none (embedded default)'}",
    ]
    lines += [f"  source {s.name} -> {', '.join(s.destinations)}" for s in settings.sources]
    lines += [f"  destination {d.name}: {d.base_url}" for d in settings.destinations]
    if settings.config_path is None:
        source = settings.sources[0]
        lines.append(
            f"  write key of source {source.name}: {source.write_key}"
            f"  (kept in {settings.data_dir / 'write_key'})"
        )
    if settings.sandbox:
        key_is = "set but empty" if os.environ.get(PRIVATE_KEY_ENV) is not None else "not set"
        lines.append(
            f"  SANDBOX: {PRIVATE_KEY_ENV} is {key_is}, so nothing is sent to Klaviyo "
            f"(set it, or use --config, to deliver for real)."
        )
        if sandbox_url:
            lines.append(
                f"  sandbox: a fake Klaviyo at {sandbox_url}, kept in {settings.data_dir / JOURNAL_FILE}"
            )
            lines.append(
                f"  what it received: {_address(addresses)}/sandbox/state, or `klaviyo-router sandbox`"
            )
        else:
            lines.append("  sandbox: none available, so events are queued but not delivered.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m router.app [--config FILE] [--host HOST] [--port PORT]`` (``klaviyo-router serve``)."""
    parser = argparse.ArgumentParser(prog="python -m router.app", description="Run the ingest server.")
    parser.add_argument("--config", type=Path, help="TOML config file (default: the embedded default)")
    parser.add_argument("--host", help="address to listen on (KLAVIYO_ROUTER_HOST)")
    parser.add_argument("--port", type=int, help="TCP port, 0 for any free one (KLAVIYO_ROUTER_PORT)")
    args = parser.parse_args(argv)
    return serve(args.config, host=args.host, port=args.port)


if __name__ == "__main__":
    raise SystemExit(main())
