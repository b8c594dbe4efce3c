"""The ``klaviyo-router`` command line: one ``configure_<command>`` and one ``run_<command>`` per
subcommand (``sync`` and ``sync-runs`` have theirs in :mod:`router.sync.command`).

Exit status: 0 on success (``transform`` also when some inputs were rejected: they are reported
on stdout; with ``--strict``, 1), 1 when the work failed, 2 for unusable arguments or
configuration, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from router import __version__
from router.capture import STDIN, CaptureFile, Record, Unreadable, expand, unpack, with_defaults
from router.destination import Destination
from router.errors import ConfigError, MappingError
from router.mapping import BUILTIN_DIR, load_mappings, mapping_files
from router.preview import PLANNING_PROCESSES, WINDOW, BatchPreview, Preview, SinglePreview
from router.runtime import tune_runtime
from router.settings import CONFIG_HELP, Settings

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Arguments or configuration the command cannot use (exit status 2)."""


# ---------------------------------------------------------------- transform


def configure_transform(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transform",
        help="print the Klaviyo requests that events would produce (offline, nothing is sent)",
        description=(
            "Read RudderStack/Segment events and print one NDJSON line per Klaviyo request "
            '({"method","path","body"}), one per rejected input ({"error","status","index"}; an '
            "identify whose list subscription is refused also prints its profile request), one per "
            'skipped input ({"skipped","index"}) and one per thing an input was sent without '
            '({"warning","code","index"}: a phone dropped under invalid_phone = drop, a consent '
            "channel the current API has not). Input: NDJSON, a JSON array, or a batch body "
            '({"batch": [...]}) per line or per file; each event bare or as {"message": ..., '
            '"metadata": ...}; gzip-compressed or not. Read and written as a stream: any size of '
            "input runs in the same memory. Use it to test a mapping change offline."
        ),
    )
    p.add_argument(
        "--destination",
        metavar="CONFIG.json|NAME",
        help="without --config: a JSON file of destination settings, with the project's keys "
        "(private_key, list_id, consent, ...) or RudderStack's (privateApiKey, listId, consent, "
        "smsConsent, enforceEmailAsPrimary, ...); with --config: the name of one of its "
        "[[destinations]] (needed only when it has several)",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="router.toml",
        help="take the destination from this config file (the one serve uses) instead of a JSON file",
    )
    p.add_argument(
        "--batch",
        action="store_true",
        help="merge the requests into the bulk jobs delivery would send: inputs are planned by "
        "windows of [delivery] batch_size (1000 without --config), as the workers plan their claims",
    )
    p.add_argument(
        "--mappings-dir", type=Path, metavar="DIR", help="folder of mapping files extending the built-in ones"
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any input was rejected")
    p.add_argument(
        "input",
        nargs="*",
        default=[STDIN],
        help="event files, folders or glob patterns, or - for standard input (the default)",
    )
    p.set_defaults(run=run_transform)


def run_transform(args: argparse.Namespace) -> int:
    destination, window = _transform_destination(args)
    tune_runtime()
    try:
        mappings = load_mappings(destination.mappings_dir)
    except MappingError as exc:
        raise UsageError(exc.message) from None
    files = _input_files(args.input)
    out = sys.stdout.buffer
    preview: Preview = (
        BatchPreview(out, destination, mappings, window=window, processes=PLANNING_PROCESSES)
        if args.batch
        else SinglePreview(out, destination, mappings)
    )
    failed = False
    for name in files:
        label = name if len(files) > 1 else ""
        try:
            with CaptureFile(name) as capture:
                for record in capture.records():
                    if record.plain():
                        preview_record(preview, record, label)
                    else:
                        for event in unpack(record):
                            preview_record(preview, event, label)
        except Unreadable as exc:
            preview.finish()
            print(f"klaviyo-router: {exc}", file=sys.stderr)
            failed = True
    preview.finish()
    if failed:
        return 1
    return 1 if args.strict and preview.refused else 0


def preview_record(preview: Preview, record: Record, label: str) -> None:
    """One record of a captured file through ``preview`` (``label``: the file's name in errors)."""
    if record.problem is not None:
        preview.refuse(f"{record.where(label)}: {record.problem}")
    elif record.text is not None:
        preview.add(record.text, record, label)
    else:
        preview.add(orjson.dumps(with_defaults(record.value, record.defaults)), record, label)


def _transform_destination(args: argparse.Namespace) -> tuple[Destination, int]:
    """The destination to transform for, and the window of inputs planned together."""
    if args.config is None:
        if args.destination is None:
            raise UsageError("transform needs --destination CONFIG.json, or --config router.toml")
        return _load_destination(Path(args.destination), args.mappings_dir), WINDOW
    settings = Settings.load(args.config)
    destination = _configured_destination(settings, args.destination, f"{args.config}")
    if args.mappings_dir is not None:
        destination = dataclasses.replace(destination, mappings_dir=args.mappings_dir)
    return destination, settings.delivery_batch_size


def _configured_destination(settings: Settings, name: str | None, where: str) -> Destination:
    """The destination called ``name`` in ``settings``, or its only one."""
    if name is not None:
        return settings.destination(name, where=where)
    if len(settings.destinations) == 1:
        return settings.destinations[0]
    known = ", ".join(d.name for d in settings.destinations)
    raise UsageError(f"{where} has several destinations: name one with --destination ({known})")


def _input_files(arguments: Sequence[str]) -> list[str]:
    try:
        return expand(arguments)
    except Unreadable as exc:
        raise UsageError(str(exc)) from None


def _emit(out: BinaryIO, obj: dict[str, Any]) -> None:
    out.write(orjson.dumps(obj) + b"\n")


def _load_destination(path: Path, mappings_dir: Path | None) -> Destination:
    try:
        config = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read destination config: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"{path}: destination config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: destination config must be a JSON object")
    if mappings_dir is not None:
        config = {**config, "mappings_dir": str(mappings_dir)}
    try:
        return Destination.from_mapping(config, where=str(path))
    except ConfigError as exc:
        raise UsageError(exc.message) from None


# ---------------------------------------------------------------- replay


def configure_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay captured event files into the queue (or re-send delivered ones: --archive)",
        description=(
            "Read captured RudderStack/Segment events (NDJSON, JSON arrays, batch bodies "
            '{"batch": [...]} per line or per file, gzip of any; files, folders, glob patterns, '
            "or - for standard input) and enqueue them for delivery as if they had been posted to "
            "the source's write key: the same validation, limits and dead letters as ingest, the "
            "same (source, messageId) dedupe (an event without messageId gets one derived from its "
            "content), so replaying a file again enqueues nothing new. Started again with the same "
            "arguments after an interruption, it goes on where it stopped. With --archive, jobs "
            "delivered in a time window are sent to delivery again through the current mappings."
        ),
        epilog="Exit status: 0 done; 1 when a file could not be read to its end, the queue failed, "
        "or (--strict) an event was rejected; 2 for unusable arguments or configuration.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="event files, folders, glob patterns, or -")
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.add_argument(
        "--source",
        metavar="NAME",
        help="the [[sources]] the events are replayed as (needed when there are several)",
    )
    p.add_argument(
        "--since",
        metavar="T",
        help="only events at or after T (ISO 8601 date or date-time, UTC unless a zone is given; or a "
        "duration ago: 90m, 36h, 7d); the event's timestamp, else originalTimestamp, receivedAt, sentAt. "
        "With --archive: jobs delivered at or after T",
    )
    p.add_argument("--until", metavar="T", help="only events before T (same forms as --since)")
    p.add_argument(
        "--type", action="append", metavar="TYPE", help="only events of these call types (repeat, or a,b)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="enqueue nothing: print the Klaviyo requests the files would produce, as transform --batch does",
    )
    p.add_argument("--rate", type=float, metavar="N", help="read at most N events a second")
    p.add_argument(
        "--again", action="store_true", help="replay files that a run with the same arguments finished"
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any event was rejected")
    p.add_argument(
        "--archive",
        action="store_true",
        help="send jobs delivered between --since and --until (default: now) to delivery again, "
        "through the current mappings (needs --since; asks first unless --yes)",
    )
    p.add_argument(
        "--destination",
        metavar="NAME",
        help="--archive: only this destination's jobs; --dry-run: the destination to plan for",
    )
    p.add_argument("--yes", action="store_true", help="--archive: do not ask for confirmation")
    p.set_defaults(run=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    from router import replay

    try:
        return replay.run(args)
    except replay.ReplayError as exc:
        raise UsageError(str(exc)) from None


# ---------------------------------------------------------------- check-mappings


def configure_check_mappings(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check-mappings",
        help="validate mapping files",
        description="Validate the built-in mapping files and, when given, a folder of your own that "
        "extends or overrides them. Prints each file used; exits 1 naming the file, JSON pointer "
        "and problem when one is invalid.",
    )
    p.add_argument("dir", nargs="?", type=Path, help="your mappings folder (default: only the built-in ones)")
    p.set_defaults(run=run_check_mappings)


def run_check_mappings(args: argparse.Namespace) -> int:
    try:
        files = mapping_files(args.dir)
        load_mappings(args.dir)
    except MappingError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    for name, path in files.items():
        origin = "built-in" if path.resolve().is_relative_to(BUILTIN_DIR.resolve()) else "yours"
        print(f"ok  {name:32} {origin:8} {_shown(path)}")
    print(f"{len(files)} mapping files valid")
    return 0


def _shown(path: Path) -> Path:
    """The file itself (a built-in one of a clone is ``mappings/klaviyo/...``), relative to the
    current folder when under it."""
    real = path.resolve()
    try:
        return real.relative_to(Path.cwd())
    except ValueError:
        return real


# ---------------------------------------------------------------- serve and the sandbox


def configure_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP ingest server (and delivery workers)",
        description="Run the RudderStack/Segment-compatible HTTP API. Without a config file (--config "
        "or KLAVIYO_ROUTER_CONFIG), runs the embedded default: SQLite under ./data, a generated write "
        "key, and a sandbox Klaviyo until KLAVIYO_PRIVATE_KEY is set. The mapping files are checked before anything starts "
        "(exit 2 naming the file and the problem); SIGHUP reloads them. Delivered jobs older than "
        "[queue] retention and dedupe entries older than dedupe_window are deleted at start and "
        "every [queue] cleanup_interval seconds (logged as queue_cleaned).",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.add_argument(
        "--host",
        help="address to listen on (default: KLAVIYO_ROUTER_HOST, else the config's [server] host, else 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        help="port to listen on (default: KLAVIYO_ROUTER_PORT, else the config's [server] port, else 8080)",
    )
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from router.app import serve

    return serve(args.config, host=args.host, port=args.port)


def configure_fake_klaviyo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fake-klaviyo",
        help="run the fake Klaviyo API locally (a sandbox for trying the router)",
        description="Run an in-memory emulation of the Klaviyo endpoints the router uses, with Klaviyo's\n"
        "validation, status codes and rate limits. Point a destination's base_url at it (any private\n"
        "key is accepted unless POST /__fake__/config names some). Its control API is below.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=FAKE_CONTROL_API,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    p.add_argument("--no-rate-limits", action="store_true", help="never answer 429")
    p.add_argument(
        "--no-store",
        action="store_true",
        help="validate, rate-limit and count writes without keeping them (for load tests)",
    )
    p.set_defaults(run=run_fake_klaviyo)


#: The control API of the fake (``router.fake_klaviyo.control``), for ``fake-klaviyo --help``.
FAKE_CONTROL_API = """\
control API (JSON in and out):
  GET    /__fake__/state       everything it holds: profiles, events, lists, memberships,
                               subscriptions, import jobs, counters (?summary=1: counts only)
  GET    /__fake__/requests    every request received, with the status answered
                               (Authorization redacted; ?since=N skips the first N)
  POST   /__fake__/reset       forget all data, counters, rate-limit windows and faults
  POST   /__fake__/lists       create lists with chosen ids: {"lists": [{"id": "XUepkK", "name": "News"}]}
  POST   /__fake__/config      {"rate_limits": false, "rate_limit_scale": 0.5, "api_keys": ["pk_a"]}
                               (api_keys null: any key is accepted)
  GET    /__fake__/faults      the faults configured
  DELETE /__fake__/faults      remove every fault
  POST   /__fake__/faults      add faults; every key optional ("clear": true first):
    "scripts": {"/api/events": [503, {"status": 429, "retry_after": 2}, "timeout", "pass"]}
               answers for the next requests to a path, "METHOD path" or operationId, in order
    "random_5xx_rate": 0.05, "seed": 1, "random_statuses": [500, 503]
    "hold_seconds": 30         how long a "timeout" holds a request before dropping it
    "revoked_keys": ["pk_a"]   answer 401 to these keys
    "bulk_failures": [{"operation_id": "bulk_create_events", "indices": [0], "detail": "Invalid."}]
               report items of the next bulk job invalid (or, with "values": [...], every
               item containing one of those strings)

example:
  curl -X POST localhost:8765/__fake__/faults -d '{"scripts": {"/api/events": [503]}}'
"""


def run_fake_klaviyo(args: argparse.Namespace) -> int:
    from router.fake_klaviyo import run

    return run(args.host, args.port, rate_limits=not args.no_rate_limits, store=not args.no_store)


def configure_sandbox(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sandbox",
        help="show what the sandbox Klaviyo of serve received (profiles, events, lists)",
        description="Without KLAVIYO_PRIVATE_KEY, serve delivers to a sandbox: a fake Klaviyo whose writes "
        "are kept in <data_dir>/sandbox.ndjson. This prints what it holds, rebuilt from that file "
        "(the router need not run). A running router shows the same at GET /sandbox/state and "
        "GET /sandbox/requests; POST /__fake__/reset on the sandbox's own port empties it.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="everything it holds, as GET /sandbox/state gives it")
    p.set_defaults(run=run_sandbox)


def run_sandbox(args: argparse.Namespace) -> int:
    from router.logs import configure_logging
    from router.sandbox import JOURNAL_FILE, read_sandbox

    settings = Settings.load(args.config)
    configure_logging("warning", settings.log_format)  # stdout is the listing
    journal = settings.data_dir / JOURNAL_FILE
    if not journal.exists():
        print(f"the sandbox has received nothing yet ({journal} does not exist)")
        return 0
    fake = asyncio.run(read_sandbox(settings.data_dir))
    if args.json:
        _emit(sys.stdout.buffer, fake.to_json())
        return 0
    state = fake.to_json()
    print(
        f"{_count(len(state['profiles']), 'profile')}, {_count(len(state['events']), 'event')}, "
        f"{_count(len(state['lists']), 'list')} (from {journal})"
    )
    emails = {p["id"]: _who(p["attributes"]) for p in state["profiles"]}
    for profile in state["profiles"]:
        attributes = {k: v for k, v in profile["attributes"].items() if v is not None and k not in SERVER_SET}
        print(f"profile {emails[profile['id']]}: {orjson.dumps(attributes).decode()}")
    for event in state["events"]:
        print(
            f"event   {event['metric']!r} of {emails.get(event['profile_id'], event['profile_id'])} at {event['time']}"
        )
    for klaviyo_list in state["lists"]:
        members = state["memberships"].get(klaviyo_list["id"], [])
        names = ", ".join(emails.get(m, m) for m in members) or "no members"
        print(f"list    {klaviyo_list['id']} ({klaviyo_list['attributes']['name']}): {names}")
    for profile_id, channels in state["subscriptions"].items():
        consent = ", ".join(f"{channel} {record['status']}" for channel, record in channels.items())
        print(f"consent {emails.get(profile_id, profile_id)}: {consent}")
    return 0


#: Profile attributes Klaviyo sets itself, left out of the sandbox listing.
SERVER_SET = frozenset({"created", "updated", "last_event_date"})


def _who(attributes: dict[str, Any]) -> str:
    for key in ("email", "phone_number", "external_id", "anonymous_id"):
        if attributes.get(key):
            return str(attributes[key])
    return "?"


# ---------------------------------------------------------------- work


def configure_work(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "work",
        help="run delivery workers only (no HTTP server), beside an ingest-only serve or on other machines",
        description="Deliver queued events to every configured destination until SIGINT/SIGTERM, "
        "from the queue of the config. Pair it with serve and [delivery] workers = 0 to keep ingest "
        'and delivery in separate processes. With queue.url = "postgresql://..." run as many as you '
        "like, on any machines, beside any number of serve processes: they take turns at claims and "
        "share one Klaviyo account's rate limits through the database. With SQLite, only on the "
        "machine that holds the file. The mapping files are checked before anything starts; SIGHUP reloads them. "
        "Like serve, it deletes what [queue] retention and dedupe_window let go, every cleanup_interval seconds.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.set_defaults(run=run_work)


def run_work(args: argparse.Namespace) -> int:
    from router.app import work

    return work(args.config)


# ---------------------------------------------------------------- dead letters


def configure_dead_letters(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dead-letters",
        help="list, show, retry or purge events that could not be delivered",
        description="Dead letters are events Klaviyo refused, the transform rejected, or ingest "
        "could not accept; each keeps its reason. A retried dead letter goes back to the queue and "
        "is transformed again with the current mappings.",
    )
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per dead letter")
    listing.add_argument("--reason", metavar="TEXT", help="only those whose reason contains TEXT")
    listing.add_argument("--destination", metavar="NAME", help="only this destination's")
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (default 100)")
    listing.add_argument("--json", action="store_true", help="NDJSON instead of a table")
    listing.set_defaults(action="list")
    show = actions.add_parser("show", help="one dead letter with its event, as JSON")
    show.add_argument("id", type=int, help="the dead letter's id (the ID column of dead-letters list)")
    show.set_defaults(action="show")
    for name, text in (("retry", "send back to the queue"), ("purge", "delete for good")):
        act = actions.add_parser(name, help=f"{text}: the ids given, --all, or --reason TEXT")
        act.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead-letter ids")
        act.add_argument("--all", action="store_true", help="every dead letter")
        act.add_argument("--reason", metavar="TEXT", help="those whose reason contains TEXT")
        act.set_defaults(action=name)
    p.set_defaults(run=run_dead_letters)


def run_dead_letters(args: argparse.Namespace) -> int:
    from router import deadletters
    from router.queue import open_queue, sqlite_path

    settings = Settings.load(args.config)
    url = settings.resolved_queue_url
    if url.startswith("sqlite:") and not Path(sqlite_path(url)).exists():
        raise UsageError(f"no queue at {sqlite_path(url)} (is --config the one serve uses?)")

    async def act() -> int:
        queue = open_queue(url, settings.queue_options())
        await queue.open()
        try:
            return await _dead_letter_action(args, queue, deadletters)
        finally:
            await queue.close()

    return asyncio.run(act())


async def _dead_letter_action(args: argparse.Namespace, queue: Any, deadletters: Any) -> int:
    if args.action == "list":
        jobs = await deadletters.list_dead(
            queue, limit=args.limit, reason=args.reason, destination=args.destination
        )
        rows = [deadletters.summary(job) for job in jobs]
        if args.json:
            for row in rows:
                _emit(sys.stdout.buffer, row)
        else:
            if rows:
                print(_dead_letter_line(DEAD_LETTER_HEADER))
            for row in rows:
                print(_dead_letter_line({k: "-" if v is None else v for k, v in row.items()}))
            limited = " (limit reached)" if len(jobs) == args.limit else ""
            print(f"{_count(len(jobs), 'dead letter')}{limited}")
        sys.stdout.flush()
        return 0
    if args.action == "show":
        job = await queue.get(args.id)
        if job is None or job.state.value != "dead":
            raise UsageError(f"no dead letter {args.id}")
        print(orjson.dumps(deadletters.detail(job), option=orjson.OPT_INDENT_2).decode())
        return 0
    selection = deadletters.Selection(tuple(args.ids), args.all, args.reason)
    if problem := selection.problem():
        raise UsageError(problem)
    count = await getattr(deadletters, args.action)(queue, selection)
    print(f"{'retried' if args.action == 'retry' else 'purged'} {_count(count, 'dead letter')}")
    return 0


#: The header row of ``dead-letters list``, keyed like :func:`router.deadletters.summary`.
DEAD_LETTER_HEADER = {
    "id": "ID",
    "dead_since": "DEAD SINCE",
    "destination": "DESTINATION",
    "type": "TYPE",
    "event": "EVENT",
    "reason": "REASON",
}


def _dead_letter_line(row: dict[str, Any]) -> str:
    return (
        f"{row['id']!s:>8}  {row['dead_since']!s:<20}  {row['destination']!s:<12}  "
        f"{row['type']!s:<8}  {row['event']!s:<24}  {row['reason']}"
    )


def _count(n: int, noun: str) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- sync and sync-runs


def configure_sync(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from router.sync.command import configure_sync as configure

    configure(sub)


def configure_sync_runs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from router.sync.command import configure_sync_runs as configure

    configure(sub)


# ---------------------------------------------------------------- entry point

CONFIGURE = (
    configure_serve,
    configure_work,
    configure_transform,
    configure_replay,
    configure_check_mappings,
    configure_dead_letters,
    configure_sync,
    configure_sync_runs,
    configure_sandbox,
    configure_fake_klaviyo,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klaviyo-router",
        description="Route RudderStack/Segment events into Klaviyo: an HTTP API the SDKs post to, a "
        "durable queue (SQLite, or PostgreSQL for several nodes), mapping files, delivery with "
        "Klaviyo's rate limits, dead letters; captured event files replayed into the queue; query "
        "results synced to Klaviyo profiles and a list.",
        epilog="Run 'klaviyo-router COMMAND --help' for a command's options. The commands that use the "
        "router's configuration read --config FILE, else the file KLAVIYO_ROUTER_CONFIG names, else "
        "the embedded default (data in ./data, a sandbox Klaviyo until KLAVIYO_PRIVATE_KEY is set). "
        "Exit status: 0 done, 1 the work failed, 2 unusable arguments or configuration (one line on "
        "stderr says why).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for configure in CONFIGURE:
        configure(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = parser().parse_args(argv)
    command: Command = args.run
    try:
        return command(args)
    except UsageError as exc:
        print(f"klaviyo-router: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, MappingError) as exc:
        print(f"klaviyo-router: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
