"""The ``klaviyo-router`` command line: one ``configure_<command>`` and one ``<command>`` per subcommand.

Exit status: 0 on success (``transform`` also when some inputs were rejected: they are reported
on stdout), 1 when the work failed, 2 for unusable arguments or configuration, with a one-line
reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from router import __version__
from router.destination import Destination
from router.errors import ConfigError, MappingError, Skipped, TransformError
from router.klaviyo.batch import batch
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import BUILTIN_DIR, load_mappings, mapping_files
from router.transform import transform

Command = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Arguments or configuration the command cannot use (exit status 2)."""


# ---------------------------------------------------------------- transform


def configure_transform(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transform",
        help="print the Klaviyo requests that events would produce (offline, nothing is sent)",
        description=(
            "Read RudderStack/Segment messages (NDJSON, or a JSON array; each a bare message or "
            '{"message": ..., "metadata": ...}) and print one NDJSON line per Klaviyo request '
            '({"method","path","body"}), one per rejected input ({"error","status","index"}) and one '
            'per skipped input ({"skipped","index"}). Use it to test a mapping change offline.'
        ),
    )
    p.add_argument(
        "--destination",
        required=True,
        type=Path,
        metavar="CONFIG.json",
        help="destination settings: the project's keys (private_key, list_id, consent, ...) "
        "or RudderStack's (privateApiKey, listId, consent, smsConsent, enforceEmailAsPrimary, ...)",
    )
    p.add_argument(
        "--batch",
        action="store_true",
        help="merge the requests into the bulk jobs delivery would send for the whole input",
    )
    p.add_argument("--mappings-dir", type=Path, help="folder of mapping files extending the built-in ones")
    p.add_argument("input", nargs="?", default="-", help="event file, or - for standard input (default)")
    p.set_defaults(run=run_transform)


def run_transform(args: argparse.Namespace) -> int:
    destination = _load_destination(args.destination, args.mappings_dir)
    try:
        mappings = load_mappings(destination.mappings_dir)
    except MappingError as exc:
        raise UsageError(exc.message) from None
    out = sys.stdout.buffer
    requests: list[KlaviyoRequest] = []
    for index, message in enumerate(_read_messages(args.input)):
        try:
            if isinstance(message, _Unreadable):
                raise TransformError(message.reason)
            produced = transform(message, destination, mappings, index=index)
        except TransformError as exc:
            _emit(out, {"error": exc.message, "status": exc.status, "index": index})
            continue
        except Skipped as exc:
            _emit(out, {"skipped": exc.message, "index": index})
            continue
        if args.batch:
            requests.extend(produced)
        else:
            for request in produced:
                _emit(out, request.to_json())
    for request in batch(requests):
        _emit(out, request.to_json())
    out.flush()
    return 0


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


class _Unreadable:
    """An input line that is not a message; reported as a rejection at its index."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _read_messages(source: str) -> Iterator[Any]:
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"{source}: cannot read: {exc.strerror}") from None
    if data.lstrip()[:1] == b"[":
        try:
            entries = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"{source}: not a valid JSON array: {exc}") from None
        yield from (_unwrap(entry) for entry in entries)
        return
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield _unwrap(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            yield _Unreadable(f"line {number}: not valid JSON: {exc}")


def _unwrap(entry: Any) -> Any:
    """Accept ``{"message": ..., "metadata": ...}`` entries as well as bare messages."""
    if isinstance(entry, dict) and isinstance(entry.get("message"), dict) and "type" not in entry:
        return entry["message"]
    if not isinstance(entry, dict):
        return _Unreadable(f"message must be a JSON object, got {type(entry).__name__}")
    return entry


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
        print(f"ok  {name:32} {origin:8} {path}")
    print(f"{len(files)} mapping files valid")
    return 0


# ---------------------------------------------------------------- serve and the sandbox


def configure_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP ingest server (and delivery workers)",
        description="Run the RudderStack/Segment-compatible HTTP API. With no --config, runs the "
        "embedded default: SQLite under ./data, a generated write key, and a sandbox Klaviyo "
        "until KLAVIYO_PRIVATE_KEY is set.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (env: KLAVIYO_ROUTER_CONFIG)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8080)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from router.app import serve

    return serve(args.config, host=args.host, port=args.port)


def configure_fake_klaviyo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fake-klaviyo",
        help="run the fake Klaviyo API locally (a sandbox for trying the router)",
        description="Run an in-memory emulation of the Klaviyo endpoints the router uses, with "
        "Klaviyo's validation, status codes and rate limits. GET /__fake__/state shows what it received.",
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


def run_fake_klaviyo(args: argparse.Namespace) -> int:
    from router.fake_klaviyo import run

    return run(args.host, args.port, rate_limits=not args.no_rate_limits, store=not args.no_store)


# ---------------------------------------------------------------- work


def configure_work(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "work",
        help="run delivery workers only (no HTTP server), e.g. beside serve on other machines",
        description="Deliver queued events to every configured destination until SIGINT/SIGTERM. "
        "Run as many as you like against one PostgreSQL queue; with SQLite, on the same machine.",
    )
    p.add_argument("--config", type=Path, help="TOML config file (env: KLAVIYO_ROUTER_CONFIG)")
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
    p.add_argument("--config", type=Path, help="TOML config file (default: the embedded default's queue)")
    actions = p.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per dead letter")
    listing.add_argument("--reason", help="only those whose reason contains TEXT")
    listing.add_argument("--destination", help="only this destination's")
    listing.add_argument("--limit", type=int, default=100, help="at most N (default 100)")
    listing.add_argument("--json", action="store_true", help="NDJSON instead of a table")
    listing.set_defaults(action="list")
    show = actions.add_parser("show", help="one dead letter with its event, as JSON")
    show.add_argument("id", type=int)
    show.set_defaults(action="show")
    for name, text in (("retry", "send back to the queue"), ("purge", "delete for good")):
        act = actions.add_parser(name, help=f"{text}: the ids given, --all, or --reason TEXT")
        act.add_argument("ids", nargs="*", type=int, help="dead-letter ids")
        act.add_argument("--all", action="store_true", help="every dead letter")
        act.add_argument("--reason", help="those whose reason contains TEXT")
        act.set_defaults(action=name)
    p.set_defaults(run=run_dead_letters)


def run_dead_letters(args: argparse.Namespace) -> int:
    from router import deadletters
    from router.queue import open_queue, sqlite_path
    from router.settings import Settings

    settings = Settings.load(args.config)
    url = settings.resolved_queue_url
    if url.startswith("sqlite:") and not Path(sqlite_path(url)).exists():
        raise UsageError(f"no queue at {sqlite_path(url)} (is --config the one serve uses?)")

    async def act() -> int:
        queue = open_queue(url)
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
        for job in jobs:
            row = deadletters.summary(job)
            if args.json:
                _emit(sys.stdout.buffer, row)
            else:
                what = row["event"] or row["type"] or "?"
                print(
                    f"{row['id']:>8}  {row['dead_since']}  {row['destination']:<12} {what!s:<24} {row['reason']}"
                )
        if not args.json:
            print(f"{len(jobs)} dead letters" + (" (limit reached)" if len(jobs) == args.limit else ""))
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
    print(f"{'retried' if args.action == 'retry' else 'purged'} {count} dead letters")
    return 0


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
    configure_check_mappings,
    configure_dead_letters,
    configure_sync,
    configure_sync_runs,
    configure_fake_klaviyo,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="klaviyo-router",
        description="Route RudderStack/Segment events, captured logs and query results into Klaviyo.",
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
