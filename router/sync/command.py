"""The ``sync`` and ``sync-runs`` commands (registered by :mod:`router.cli`).

Exit status of ``sync``: 0 when the run is done (bad rows are in the report, not failures), 1 when
it was refused or failed (invalid credentials, the list limit, the removal guard, a broken source),
2 for unusable arguments or configuration; the reason is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from router.errors import ConfigError
from router.klaviyo.client import KlaviyoClient
from router.klaviyo.ratelimit import RateLimits
from router.logs import configure_logging
from router.sandbox import sandbox_url
from router.settings import CONFIG_HELP, Settings
from router.sync.config import SyncConfig, parse_renames, parse_sync
from router.sync.run import RunOptions, Summary, run_sync
from router.sync.send import Klaviyo
from router.sync.sources import SourceError
from router.sync.state import open_state

EXIT = {"done": 0, "dry-run": 0, "refused": 1, "failed": 1}


def configure_sync(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sync",
        help="sync query results (CSV, NDJSON, Parquet, SQL) to Klaviyo profiles and a list",
        description=(
            "Send the rows of a file or a SQL query to Klaviyo as profiles, through bulk import jobs,\n"
            "and make a list match them. Columns are Klaviyo's profile parameters (email, phone_number,\n"
            "external_id, first_name, last_name, organization, title, image, address1, address2, city,\n"
            "region, zip, country, latitude, longitude, timezone, ip, last_event_date, properties; any\n"
            "case; Email, PhoneNumber, ExternalID too); other columns are custom properties (with\n"
            "--full-profile). Only new and changed rows are sent again; a mirror run removes the\n"
            "members it added that the query no longer returns. Prints an estimate first and a\n"
            "summary last (kept in sync-runs).\n\n"
            "Exit status: 0 done (bad rows are in --report), 1 refused or failed, 2 unusable arguments."
        ),
        epilog=(
            "examples:\n"
            "  klaviyo-router sync audience.csv --list 'VIP customers' --dry-run\n"
            "  klaviyo-router sync --query 'SELECT email, first_name FROM customers' "
            "--database postgresql://localhost/crm --list Newsletter --full-profile\n"
            "  klaviyo-router sync --name vip --config router.toml   # a [[syncs]] entry"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", nargs="?", help="CSV, NDJSON or Parquet file (gzip of CSV/NDJSON too)")
    p.add_argument("--query", metavar="SQL", help="SQL query whose rows to sync (with --database)")
    p.add_argument("--database", metavar="URL", help="postgresql://..., sqlite:///path or duckdb:///path")
    p.add_argument("--name", help="run the [[syncs]] entry of this name from the config")
    p.add_argument(
        "--list", dest="list_name", metavar="NAME", help="the Klaviyo list, by name (created if missing)"
    )
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.add_argument(
        "--destination",
        metavar="NAME",
        help="the destination (Klaviyo account) to send to (default: the first)",
    )
    p.add_argument(
        "--mode",
        choices=("mirror", "add", "upsert"),
        help="mirror: the list holds exactly the valid rows (default with --list); add: only adds; "
        "upsert: profiles only, no list (default without --list)",
    )
    p.add_argument(
        "--full-profile",
        action="store_true",
        help="send every column (default: identity only, email required)",
    )
    p.add_argument("--column", action="append", default=[], metavar="SOURCE=PROFILE", help="rename a column")
    p.add_argument(
        "--dry-run", action="store_true", help="show creates, updates, unchanged and removals; change nothing"
    )
    p.add_argument(
        "--csv-out",
        type=Path,
        metavar="PATH",
        help="also write the valid rows in Klaviyo's CSV import format",
    )
    p.add_argument(
        "--report", type=Path, metavar="PATH", help="write bad and refused rows (row, column, reason) as CSV"
    )
    p.add_argument(
        "--allow-mass-removal", action="store_true", help="pass the max_removal_percent guard once"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines on stderr")
    p.set_defaults(run=run_sync_command)


def configure_sync_runs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sync-runs",
        help="the history of sync runs",
        description="The latest runs of every sync (or of one), newest first, with their summaries.",
    )
    p.add_argument("name", nargs="?", help="only this sync's runs")
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20)")
    p.add_argument("--json", action="store_true", help="NDJSON, one run a line")
    p.set_defaults(run=run_sync_runs)


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:64]
    return slug or "sync"


def sync_config(args: argparse.Namespace, settings: Settings) -> SyncConfig:
    """The sync the arguments name: a ``[[syncs]]`` entry, or one made of the arguments."""
    destinations = tuple(d.name for d in settings.destinations)
    if args.name is not None:
        if (
            args.source
            or args.query
            or args.database
            or args.list_name
            or args.mode
            or args.column
            or args.full_profile
        ):
            raise ConfigError(
                "--name runs a [[syncs]] entry as configured: leave out SOURCE, --query, --database, --list, --mode, --column and --full-profile"
            )
        found = next((sync for sync in settings.syncs if sync.name == args.name), None)
        if found is None:
            known = ", ".join(sync.name for sync in settings.syncs) or "none"
            raise ConfigError(f"--name: no [[syncs]] named {args.name!r} in the config (known: {known})")
        changes: dict[str, Any] = {"allow_mass_removal": args.allow_mass_removal}
        if args.destination:
            changes["destination"] = args.destination
        return replace(found, **changes)
    table: dict[str, Any] = {
        "name": _slug(args.list_name or (Path(args.source).stem if args.source else "query")),
        "full_profile": args.full_profile,
        "columns": parse_renames(args.column),
    }
    for key, value in (
        ("source", args.source),
        ("query", args.query),
        ("database", args.database),
        ("list", args.list_name),
        ("mode", args.mode),
        ("destination", args.destination),
    ):
        if value is not None:
            table[key] = value
    return replace(parse_sync(table, "sync", destinations), allow_mass_removal=args.allow_mass_removal)


def run_sync_command(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    config = sync_config(args, settings)
    level = settings.log_level if settings.log_level in ("debug", "warning", "error") else "warning"
    configure_logging(level, settings.log_format, secrets=settings.secrets())
    options = RunOptions(
        dry_run=args.dry_run, report=args.report, csv_out=args.csv_out, progress=not args.no_progress
    )
    summary = asyncio.run(sync_once(settings, config, options))
    if args.json:
        sys.stdout.write(orjson.dumps(summary.to_json()).decode() + "\n")
    else:
        print(summary.text())
    if summary.status in ("refused", "failed") and summary.message:
        print(f"klaviyo-router: {summary.message.splitlines()[0]}", file=sys.stderr)
    return EXIT.get(summary.status, 1)


async def sync_once(
    settings: Settings,
    config: SyncConfig,
    options: RunOptions,
    *,
    limits: RateLimits | None = None,
    sandbox: bool = True,
) -> Summary:
    """One run of ``config`` with the settings' destination and state (``sync`` and ``serve`` use it).

    ``sandbox``: start the sandbox's fake Klaviyo when the settings have no private key (``serve``
    has one running already). ``limits``: the destination's pacer, when shared with delivery.
    """
    if settings.resolved_queue_url.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    state = open_state(settings.resolved_queue_url)
    await state.open()
    try:
        resolved = settings if sandbox else replace(settings, sandbox=False)
        async with sandbox_url(resolved) as (settings, running):
            if running is not None:
                print(f"sandbox Klaviyo at {running}: nothing leaves this machine", file=sys.stderr)
            destination = settings.destination(
                config.destination or settings.destinations[0].name, where="--destination"
            )
            async with aiohttp.ClientSession() as session:
                client = KlaviyoClient(
                    session,
                    destination,
                    limits=limits or RateLimits(scale=settings.delivery_rate_limit_scale),
                    timeout=settings.delivery_timeout,
                )
                try:
                    return await run_sync(config, destination, state, Klaviyo(client), options)
                except SourceError as exc:
                    raise ConfigError(str(exc)) from None
    finally:
        await state.close()


def run_sync_runs(args: argparse.Namespace) -> int:
    settings = Settings.load(args.config)
    return asyncio.run(_print_runs(settings, args.name, args.limit, args.json))


async def _print_runs(settings: Settings, name: str | None, limit: int, as_json: bool) -> int:
    state = open_state(settings.resolved_queue_url)
    if settings.resolved_queue_url.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    await state.open()
    try:
        runs = await state.runs(name, limit)
    finally:
        await state.close()
    if as_json:
        for record in runs:
            sys.stdout.write(orjson.dumps(record.to_json()).decode() + "\n")
        return 0
    print(
        f"{'run':>5}  {'sync':<20} {'started (UTC)':<19} {'status':<11} {'rows':>8} {'sent':>8} "
        f"{'unchanged':>9} {'invalid':>7} {'failed':>6} {'added':>7} {'removed':>7} {'seconds':>8}"
    )
    for record in runs:
        summary = record.summary or {}
        started = datetime.fromtimestamp(record.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        counts = [
            summary.get(key, "")
            for key in ("rows", "sent", "unchanged", "invalid", "failed", "added", "removed")
        ]
        print(
            f"{record.id:>5}  {record.sync:<20} {started:<19} {record.status:<11} "
            + " ".join(
                f"{value!s:>{width}}" for value, width in zip(counts, (8, 8, 9, 7, 6, 7, 7), strict=True)
            )
            + f" {summary.get('seconds', ''):>8}"
        )
    print(f"{len(runs)} run" + ("" if len(runs) == 1 else "s"))
    return 0
