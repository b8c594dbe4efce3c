"""``klaviyo-router replay``: captured event logs into the queue, as if they were posted to ingest.

Files (NDJSON, JSON arrays, batch bodies, gzip of any: :mod:`router.capture`) are read as a
stream. Every event goes through :class:`router.intake.Intake`, the per-event half of HTTP
ingest, so a replayed event meets the same limits, errors and scrubbing as a live one; accepted
events are enqueued for every destination of the source with the queue's ``(source, messageId)``
dedupe, rejected ones are reported (file, line, reason) and kept as dead letters. An event without
a ``messageId`` gets one derived from its content (:func:`content_message_id`), so replaying a file
twice enqueues nothing new while the dedupe window lasts.

Speed: intake runs in worker processes (:class:`router.capture_intake.Workers`: one per core but
one) while this process decompresses and splits the file and queues what they accepted; events
are enqueued in groups of :data:`GROUP_EVENTS` (or :data:`GROUP_BYTES`) through the queue's
batched insert (one call stores a whole group with a few statements), and the next group is read
and prepared while the queue commits the last one, so the stages overlap.

Resuming: after each group is durable, the position reached in the file is saved in a checkpoint
under ``<data_dir>/replay/``, keyed by the file's identity (its size and a hash of its first MiB)
and the arguments that choose what is replayed (source, ``--since``, ``--until``, ``--type``).
Started again with the same arguments, replay goes on from there; a file it finished is skipped
(``--again`` reads it anyway). Events between the last checkpoint and an interruption are read
again and found duplicates.

Flow control: replay waits (never fails) while a group would take the queue past ``max_depth``
(the queue refuses it whole) or the disk is under ``min_free_disk_bytes``, where ingest would answer
503; ``--rate`` caps events read per second.

``--archive`` sends delivered jobs still in the queue's retention window through delivery again,
with the current mappings: :mod:`router.archive`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import orjson

from router import progress
from router.capture import START, STDIN, CaptureFile, Position, Record, Unreadable, expand
from router.capture_intake import Preparer, Selection, Workers, worker_processes
from router.destination import Destination
from router.events import TYPES, parse_timestamp
from router.health import disk_short
from router.intake import Accepted, Rejected, dead_jobs
from router.mapping import load_mappings
from router.preview import PLANNING_PROCESSES, BatchPreview
from router.queue import EnqueueResult, NewJob, Queue, QueueFull, open_queue
from router.runtime import tune_runtime
from router.settings import Settings, Source

#: Events enqueued per queue call (and checkpoint).
GROUP_EVENTS: Final = 10_000
#: ... or fewer, once their payloads reach this many bytes.
GROUP_BYTES: Final = 4 << 20
#: Dead-letter reasons of events refused by replay start with this (then the file and line).
REASON_PREFIX: Final = "rejected at replay: "
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReplayError(Exception):
    """Arguments replay cannot use (exit status 2)."""


# ---------------------------------------------------------------- what is replayed


def parse_moment(text: str, now: float) -> float:
    """Unix time for ``--since``/``--until``: an ISO 8601 date or date-time (UTC when no zone is
    given), or a duration ago (``90m``, ``36h``, ``7d``, ``2w``)."""
    duration = _DURATION.match(text)
    if duration:
        return now - float(duration[1]) * _UNITS[duration[2]]
    moment = parse_timestamp(text.strip())
    if moment is None:
        raise ReplayError(
            f"{text!r} is not a time: use an ISO 8601 date or date-time (2026-11-20, "
            "2026-11-20T08:00:00Z) or a duration ago (90m, 36h, 7d, 2w)"
        )
    return moment.timestamp()


@dataclass(slots=True)
class Tally:
    """What a replay did so far."""

    #: Events read (each batch body's events one by one), unusable entries included.
    read: int = 0
    #: Events intake accepted (duplicates included).
    accepted: int = 0
    #: Accepted events newly enqueued.
    queued: int = 0
    #: Accepted events the queue already had (same source and messageId).
    duplicates: int = 0
    #: Events and entries refused, kept as dead letters.
    rejected: int = 0
    #: Events outside ``--since``/``--until``/``--type``.
    filtered: int = 0
    files: int = 0
    #: Files skipped: finished by an earlier run with the same arguments.
    skipped_files: list[str] = field(default_factory=list)
    #: Files that could not be read to their end, with why.
    failed_files: list[str] = field(default_factory=list)

    def as_json(self, seconds: float) -> dict[str, Any]:
        return {
            "files": self.files,
            "read": self.read,
            "accepted": self.accepted,
            "queued": self.queued,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "filtered": self.filtered,
            "skipped_files": self.skipped_files,
            "failed_files": self.failed_files,
            "seconds": round(seconds, 3),
            "events_per_second": round(self.read / seconds) if seconds > 0 else None,
        }


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where a replay of one file with one set of arguments got to."""

    key: str
    position: Position = START
    done: bool = False


class Checkpoints:
    """One small JSON file per (file identity, arguments) in a folder (``<data_dir>/replay``)."""

    def __init__(self, folder: Path, arguments: str) -> None:
        self.folder = folder
        self.arguments = arguments

    def find(self, name: str) -> Checkpoint | None:
        """The checkpoint of file ``name`` (a new one if none was saved); None for standard input,
        which has no identity to find it by."""
        if name == STDIN:
            return None
        key = hashlib.sha256(f"{file_identity(name)}\n{self.arguments}".encode()).hexdigest()[:32]
        try:
            saved = orjson.loads((self.folder / f"{key}.json").read_bytes())
            position = Position(int(saved["entries"]), int(saved["offset"]))
            return Checkpoint(key, position, bool(saved["done"]))
        except FileNotFoundError:
            return Checkpoint(key)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: start the file again
            return Checkpoint(key)

    def save(self, checkpoint: Checkpoint, name: str, *, read: int) -> None:
        """Write ``checkpoint`` atomically (a crash leaves the old one or the new one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{checkpoint.key}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(
            orjson.dumps(
                {
                    "file": os.path.abspath(name),
                    "arguments": self.arguments,
                    "entries": checkpoint.position.entries,
                    "offset": checkpoint.position.offset,
                    "done": checkpoint.done,
                    "events_read": read,
                    "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
                },
                option=orjson.OPT_INDENT_2,
            )
        )
        os.replace(tmp, path)


def file_identity(name: str) -> str:
    """A file's size and the SHA-256 of its first MiB (as stored, compressed or not): the same
    file found again wherever it was moved, and a different one when it was changed or grew."""
    with open(name, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(1 << 20)
    return f"{size}:{hashlib.sha256(head).hexdigest()}"


# ---------------------------------------------------------------- progress


class Progress(progress.Progress):
    """Events read, accepted, rejected and duplicates, the rate and an ETA by bytes read: a bar on
    a terminal, otherwise a plain line every few seconds. Rejections are written as lines."""

    def __init__(self, total_bytes: int | None, stream: TextIO, *, enabled: bool = True) -> None:
        super().__init__(
            stream,
            label="replay",
            total=total_bytes,
            unit="B",
            units="bytes",
            unit_scale=True,
            enabled=enabled,
        )

    def update(self, tally: Tally, done_bytes: int, *, note: str = "") -> None:
        counts = (
            f"{tally.read:,} read, {tally.accepted:,} accepted, {tally.rejected:,} rejected, "
            f"{tally.duplicates:,} duplicates, {self.rate(tally.read):,.0f} events/s"
        )
        self.show(done_bytes, counts, note=note)


# ---------------------------------------------------------------- replay into the queue


@dataclass(slots=True)
class _Group:
    """Jobs and dead letters committed together."""

    jobs: list[NewJob] = field(default_factory=list)
    dead: dict[str, list[NewJob]] = field(default_factory=dict)
    #: Events taken (accepted or not), and of them accepted.
    events: int = 0
    accepted: int = 0
    bytes: int = 0

    def full(self, limit: int) -> bool:
        return self.events >= limit or self.bytes >= GROUP_BYTES


class Replayer:
    """Replays files into the queue for one source (see the module's text)."""

    def __init__(
        self,
        settings: Settings,
        queue: Queue,
        source: Source,
        selection: Selection,
        checkpoints: Checkpoints,
        progress: Progress,
        *,
        rate: float | None = None,
        again: bool = False,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.source = source
        self.preparer = Workers(Preparer(settings, selection), worker_processes())
        self.checkpoints = checkpoints
        self.progress = progress
        self.rate = rate
        self.again = again
        self.tally = Tally()
        self._destinations = max(1, len(source.destinations))
        #: Events per group: fewer with ``--rate`` (ten groups a second), and few enough that a
        #: group's jobs fit in the queue's ``max_depth`` twice over.
        fits = max(1, settings.max_queue_depth // (2 * self._destinations))
        self.group_limit = min(GROUP_EVENTS, fits, GROUP_EVENTS if rate is None else max(1, int(rate // 10)))
        self._started = time.monotonic()
        self._done_bytes = 0
        #: The group being committed, with the checkpoint to save once it is durable.
        self._in_flight: tuple[asyncio.Future[EnqueueResult], _Group, Checkpoint | None, str] | None = None

    async def run(self, files: Sequence[str]) -> Tally:
        try:
            for name in files:
                await self._file(name)
        finally:
            self.preparer.close()
        return self.tally

    async def _file(self, name: str) -> None:
        checkpoint = self.checkpoints.find(name)
        if checkpoint is not None and checkpoint.done and not self.again:
            self.tally.skipped_files.append(name)
            self.progress.write(
                f"{name}: replayed before with these arguments, skipped (--again to replay it)"
            )
            return
        if checkpoint is not None and self.again:
            checkpoint = Checkpoint(checkpoint.key)
        position = checkpoint.position if checkpoint is not None else START
        self.tally.files += 1
        max_line = max(self.settings.max_request_bytes, self.settings.max_event_bytes)
        finished: Record | None = None  # the last record that ended an entry: the position reached
        with CaptureFile(name) as capture:
            group = _Group()
            try:
                records = capture.records(max_line=max_line, start=position)
                for record, outcome in self.preparer.outcomes(records):
                    self._take(record, outcome, name, group)
                    if record.last:
                        finished = record
                        if group.full(self.group_limit):
                            await self._flush(group, _at(checkpoint, record.end), name, capture.consumed)
                            group = _Group()
            except Unreadable as exc:
                self.tally.failed_files.append(str(exc))
                self.progress.write(f"failed: {exc}")
                if finished is not None:
                    position = finished.end
                await self._flush(group, _at(checkpoint, position), name, capture.consumed)
                await self._settle()
                return
            if finished is not None:
                position = finished.end
            await self._flush(group, _at(checkpoint, position, done=True), name, capture.consumed)
            await self._settle()
            self._done_bytes += capture.size or 0

    def _take(self, record: Record, outcome: Accepted | Rejected | None, name: str, group: _Group) -> None:
        """One record into ``group``: its jobs, or its dead letters (and a line saying why)."""
        self.tally.read += 1
        if outcome is None:
            self.tally.filtered += 1
            return
        if isinstance(outcome, Accepted):
            self.tally.accepted += 1
            group.jobs.extend(outcome.jobs(self.source))
            group.events += 1
            group.accepted += 1
            group.bytes += len(outcome.payload)
            return
        self.tally.rejected += 1
        where = record.where(name)
        group.dead.setdefault(f"{REASON_PREFIX}{where}: {outcome.reason}", []).extend(
            dead_jobs(self.source, outcome.message_id, outcome.payload)
        )
        group.events += 1
        self.progress.write(f"rejected: {where}: {outcome.reason}")

    async def _flush(self, group: _Group, checkpoint: Checkpoint | None, name: str, consumed: int) -> None:
        """Commit ``group`` once the group before it is durable (this one was read meanwhile), so
        that groups reach the queue in file order; then pace to ``--rate``."""
        await self._settle()
        await self._wait_for_disk()
        self._in_flight = (asyncio.ensure_future(self._commit(group)), group, checkpoint, name)
        await asyncio.sleep(0)  # the commit starts now: it goes to the queue's writer, then waits
        self.progress.update(self.tally, self._done_bytes + consumed)
        if self.rate is not None:
            ahead = self.tally.read / self.rate - (time.monotonic() - self._started)
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def _settle(self) -> None:
        """Wait for the group in flight to be durable (committing it again, after a pause, while the
        queue is at ``max_queue_depth``); count it and save its checkpoint."""
        if self._in_flight is None:
            return
        task, group, checkpoint, name = self._in_flight
        self._in_flight = None
        while True:
            try:
                result = await task
                break
            except QueueFull as full:
                self.progress.update(self.tally, self._done_bytes, note=f"waiting: {full}")
                await asyncio.sleep(self.settings.retry_after)
                task = asyncio.ensure_future(self._commit(group))
        self.tally.duplicates += min(group.accepted, result.duplicates // self._destinations)
        self.tally.queued += result.inserted // self._destinations
        if checkpoint is not None:
            self.checkpoints.save(checkpoint, name, read=self.tally.read)

    async def _commit(self, group: _Group) -> EnqueueResult:
        """Enqueue the group's jobs (refused whole, :class:`QueueFull`, while they would take the
        queue past ``max_queue_depth``), then keep its dead letters: as ingest commits a request,
        so a group committed again leaves its dead letters once."""
        result = EnqueueResult(inserted=0, duplicates=0)
        if group.jobs:
            result = await self.queue.enqueue(group.jobs, max_depth=self.settings.max_queue_depth)
        if group.dead:
            await asyncio.gather(*(self.queue.add_dead(jobs, reason) for reason, jobs in group.dead.items()))
        return result

    async def _wait_for_disk(self) -> None:
        """Wait while the data disk is nearly full (ingest would answer 503)."""
        while (short := disk_short(self.settings.data_dir, self.settings.min_free_disk_bytes)) is not None:
            self.progress.update(self.tally, self._done_bytes, note=f"waiting: {short}")
            await asyncio.sleep(self.settings.retry_after)


def _at(checkpoint: Checkpoint | None, position: Position, *, done: bool = False) -> Checkpoint | None:
    """``checkpoint`` moved to ``position`` (None stays None: standard input has none)."""
    return None if checkpoint is None else Checkpoint(checkpoint.key, position, done)


# ---------------------------------------------------------------- dry run


def dry_run(
    settings: Settings,
    destination: Destination,
    files: Sequence[str],
    selection: Selection,
    out: Any,
    progress: Progress,
) -> tuple[Tally, int]:
    """Print the requests the files would produce for ``destination`` (as ``transform --batch``
    does), through intake as a replay would; nothing is enqueued. Returns the tally and how many
    inputs were refused."""
    mappings = load_mappings(destination.mappings_dir)
    preview = BatchPreview(
        out, destination, mappings, window=settings.delivery_batch_size, processes=PLANNING_PROCESSES
    )
    preparer = Preparer(settings, selection)
    tally = Tally()
    max_line = max(settings.max_request_bytes, settings.max_event_bytes)
    for name in files:
        tally.files += 1
        label = name if len(files) > 1 else ""
        try:
            with CaptureFile(name) as capture:
                for record, outcome in preparer.outcomes(capture.records(max_line=max_line)):
                    tally.read += 1
                    if outcome is None:
                        tally.filtered += 1
                    elif isinstance(outcome, Accepted):
                        tally.accepted += 1
                        preview.add(outcome.payload, record, label)
                    else:
                        tally.rejected += 1
                        preview.refuse(f"{record.where(label)}: {outcome.reason}")
        except Unreadable as exc:
            tally.failed_files.append(str(exc))
            progress.write(f"failed: {exc}")
    preview.finish()
    return tally, preview.refused


# ---------------------------------------------------------------- the command


def _source(settings: Settings, name: str | None) -> Source:
    names = [s.name for s in settings.sources]
    if name is None:
        if len(settings.sources) == 1:
            return settings.sources[0]
        raise ReplayError(f"the config has several sources: name one with --source ({', '.join(names)})")
    for source in settings.sources:
        if source.name == name:
            return source
    raise ReplayError(f"--source {name}: no [[sources]] named {name!r} (known: {', '.join(names)})")


def _selection(args: argparse.Namespace, now: float) -> Selection:
    types = None
    if args.type:
        types = frozenset(t.strip().lower() for value in args.type for t in value.split(",") if t.strip())
        unknown = sorted(types - set(TYPES))
        if unknown:
            raise ReplayError(f"--type {unknown[0]}: not a call type (one of {', '.join(TYPES)})")
    since = parse_moment(args.since, now) if args.since else None
    until = parse_moment(args.until, now) if args.until else None
    if since is not None and until is not None and since >= until:
        raise ReplayError("--since must be before --until")
    return Selection(since, until, types)


def _arguments_key(source: Source, args: argparse.Namespace) -> str:
    """The arguments that decide what a replay of a file takes in (a checkpoint belongs to them)."""
    return orjson.dumps(
        {"source": source.name, "since": args.since, "until": args.until, "type": sorted(args.type or [])}
    ).decode()


def _check(args: argparse.Namespace) -> None:
    if args.rate is not None and args.rate <= 0:
        raise ReplayError("--rate must be a number of events per second above 0")
    if args.archive:
        if args.files:
            raise ReplayError("--archive re-sends delivered jobs from the queue: it takes no files")
        if not args.since:
            raise ReplayError("--archive needs --since (which deliveries to send again)")
        for flag in ("dry_run", "type", "again"):
            if getattr(args, flag):
                raise ReplayError(f"--{flag.replace('_', '-')} does not apply to --archive")
    elif not args.files:
        raise ReplayError("name the files to replay (or - for standard input), or use --archive")


def run(args: argparse.Namespace) -> int:
    """The ``replay`` command (see :mod:`router.cli` for its arguments); its exit status."""
    _check(args)
    settings = Settings.load(args.config)
    tune_runtime()
    now = time.time()
    selection = _selection(args, now)
    json_out = bool(args.json)
    if args.archive:
        from router.archive import resend_delivered

        return asyncio.run(resend_delivered(settings, args, selection, json_out))
    source = _source(settings, args.source)
    try:
        files = expand(args.files)
    except Unreadable as exc:
        raise ReplayError(str(exc)) from None
    if files.count(STDIN) > 1:
        raise ReplayError("standard input (-) can be read only once")
    total = _total_bytes(files)
    progress = Progress(total, sys.stderr, enabled=not args.dry_run or sys.stderr.isatty())
    started = time.monotonic()
    try:
        if args.dry_run:
            destination = _dry_run_destination(settings, source, args.destination)
            tally, refused = dry_run(settings, destination, files, selection, sys.stdout.buffer, progress)
        else:
            if args.destination is not None:
                raise ReplayError("--destination applies to --dry-run and --archive only")
            tally = asyncio.run(_run_queue(settings, source, selection, files, progress, args))
            refused = tally.rejected
    except (ReplayError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the queue (or the disk) failed: what was committed stands
        print(f"klaviyo-router: replay stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    _summary(tally, time.monotonic() - started, json_out=json_out, dry_run=args.dry_run)
    if tally.failed_files:
        return 1
    return 1 if args.strict and refused else 0


def _total_bytes(files: Sequence[str]) -> int | None:
    total = 0
    for name in files:
        if name == STDIN:
            return None
        try:
            total += os.path.getsize(name)
        except OSError:
            return None
    return total


def _dry_run_destination(settings: Settings, source: Source, name: str | None) -> Destination:
    if name is None:
        if len(source.destinations) != 1:
            raise ReplayError(
                f"source {source.name} goes to several destinations: choose one with --destination "
                f"({', '.join(source.destinations)})"
            )
        name = source.destinations[0]
    if name not in source.destinations:
        raise ReplayError(f"--destination {name}: not a destination of source {source.name}")
    return settings.destination(name)


async def open_settings_queue(settings: Settings) -> Queue:
    """The queue of ``settings``, opened (its folder made first for SQLite)."""
    url = settings.resolved_queue_url
    if url.startswith("sqlite:"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    queue = open_queue(url, settings.queue_options())
    await queue.open()
    return queue


async def _run_queue(
    settings: Settings,
    source: Source,
    selection: Selection,
    files: Sequence[str],
    progress: Progress,
    args: argparse.Namespace,
) -> Tally:
    queue = await open_settings_queue(settings)
    try:
        checkpoints = Checkpoints(settings.data_dir / "replay", _arguments_key(source, args))
        replayer = Replayer(
            settings, queue, source, selection, checkpoints, progress, rate=args.rate, again=args.again
        )
        return await replayer.run(files)
    finally:
        await queue.close()


def _summary(tally: Tally, seconds: float, *, json_out: bool, dry_run: bool) -> None:
    if json_out:
        body = tally.as_json(seconds)
        if dry_run:
            body["dry_run"] = True
        out = sys.stderr if dry_run else sys.stdout
        print(orjson.dumps(body).decode(), file=out, flush=True)
        return
    rate = f"{tally.read / seconds:,.0f} events/s" if seconds > 0 else ""
    lines = [
        f"{'dry run' if dry_run else 'replayed'} {tally.files} file{'s' if tally.files != 1 else ''} "
        f"in {seconds:.1f} s ({rate}): {tally.read:,} events read",
        f"  {tally.accepted:,} accepted"
        + ("" if dry_run else f": {tally.queued:,} queued, {tally.duplicates:,} duplicates (already queued)"),
        f"  {tally.rejected:,} rejected" + ("" if dry_run else " (kept as dead letters: dead-letters list)"),
    ]
    if tally.filtered:
        lines.append(f"  {tally.filtered:,} left out by --since/--until/--type")
    lines += [f"  skipped (replayed before): {name}" for name in tally.skipped_files]
    lines += [f"  FAILED: {reason}" for reason in tally.failed_files]
    print("\n".join(lines), file=sys.stderr if dry_run else sys.stdout, flush=True)
