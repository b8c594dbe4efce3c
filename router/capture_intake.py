"""Captured records through intake (:mod:`router.intake`): what ``replay`` and its dry run make of
each event of a file, here or in worker processes.

:class:`Preparer` answers, for each record of :mod:`router.capture`, intake's outcome: accepted
(ready to queue), rejected (why, and what to keep as a dead letter), or left out by the
:class:`Selection`. An event without a ``messageId`` gets one derived from its content
(:func:`content_message_id`).

:class:`Workers` spreads that work over worker processes, one per core but the one the reading
process keeps busy itself (decompressing, splitting lines, queueing: about half of the CPU time
per event); with one core everything stays in the reading process. The reading process hands the
lines over in chunks (their bytes, nothing decoded) and takes the outcomes back in file order, a
few chunks ahead, so memory stays bounded. A small file (one chunk) is prepared in the reading
process: starting a process would cost more than it saves.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import orjson
import structlog

from router.capture import Record, unpack
from router.events import NO_DEFAULTS, BatchDefaults, decoded, encode, parse_timestamp, read_event
from router.intake import PARSE_DEPTH, Accepted, Intake, Rejected
from router.runtime import collect_garbage_less, exit_with_parent
from router.settings import Settings

log = structlog.get_logger("router.capture_intake")

#: Namespace of the messageIds derived from event content.
MESSAGE_ID_NAMESPACE: Final = uuid.UUID("6f0b2f4e-5f5c-4b0e-9a51-8a7c2d9e1c3b")
#: Records handed to a worker process at a time...
CHUNK_RECORDS: Final = 1000
#: ... or fewer, once their text reaches this many bytes.
CHUNK_BYTES: Final = 1 << 20
#: Chunks in the workers' hands per worker (read ahead of the outcomes taken).
CHUNKS_AHEAD: Final = 2

Outcome = Accepted | Rejected | None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events of the files are replayed: by time and call type (None: no limit)."""

    since: float | None = None
    until: float | None = None
    types: frozenset[str] | None = None

    @property
    def everything(self) -> bool:
        return self.since is None and self.until is None and self.types is None

    def admits(self, event: Mapping[str, Any], defaults: BatchDefaults, now: float) -> bool:
        """Whether ``event`` is in the selection (only an object can be; anything else goes on to
        be refused by intake, whatever the selection)."""
        if self.types is not None and str(event.get("type", "")).lower() not in self.types:
            return False
        if self.since is None and self.until is None:
            return True
        moment = event_time(event, defaults, now)
        return (self.since is None or moment >= self.since) and (self.until is None or moment < self.until)


def event_time(event: Mapping[str, Any], defaults: BatchDefaults, now: float) -> float:
    """When an event happened, as far as it says: its ``timestamp``, else ``originalTimestamp``,
    ``receivedAt``, ``sentAt`` (its own or its batch's); else ``now``."""
    for key in ("timestamp", "originalTimestamp", "receivedAt", "sentAt"):
        moment = parse_timestamp(event.get(key))
        if moment is not None:
            return moment.timestamp()
    sent = parse_timestamp(defaults.sent_at)
    return sent.timestamp() if sent is not None else now


def received_at(event: Mapping[str, Any], defaults: BatchDefaults, now: datetime) -> datetime:
    """The arrival time intake stamps on a replayed event: ``now``, except for an event without a
    ``timestamp``, whose timestamp intake derives from it (``receivedAt - (sentAt -
    originalTimestamp)``): then the event's own ``receivedAt``, else its ``sentAt``, so that an old
    event keeps its time instead of taking the replay's."""
    if event.get("timestamp") not in (None, ""):
        return now
    for value in (event.get("receivedAt"), event.get("sentAt"), defaults.sent_at):
        moment = parse_timestamp(value)
        if moment is not None:
            return moment
    return now


def content_message_id(event: Mapping[str, Any], defaults: BatchDefaults) -> str:
    """A messageId for an event that has none, derived from what it holds (and its batch's
    defaults): the same event replayed again gets the same id, so the queue's dedupe holds."""
    try:
        readable = decoded(event)
    except msgspec.MsgspecError:  # a number out of range, which intake refuses: the text as it is
        readable = {"raw_event": encode(event).decode()}
    content: dict[str, Any] = {"event": readable}
    if defaults is not NO_DEFAULTS:
        content["batch"] = [defaults.sent_at, defaults.context, defaults.integrations]
    text = orjson.dumps(content, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, text.hex()))


class Preparer:
    """Captured records → intake outcomes (the part shared by a replay and a dry run)."""

    def __init__(self, settings: Settings, selection: Selection) -> None:
        self.intake = Intake(settings)
        self.selection = selection
        self.now = time.time()
        self._now = datetime.now(UTC)

    def outcomes(self, records: Iterable[Record]) -> Iterator[tuple[Record, Accepted | Rejected | None]]:
        """Each event of ``records`` with intake's outcome (None: the selection leaves it out).

        An NDJSON line is screened first, as ingest screens a request body (:meth:`Intake.screen`:
        one nesting past :data:`router.intake.PARSE_DEPTH` is refused unparsed; a clean one spares
        its events the per-event checks), then read as ingest reads a batch's events (only the
        fields intake looks at are decoded); one that is not a bare event is unpacked.
        """
        for record in records:
            try:
                yield from self._entry(record)
            except Exception as exc:  # a line must never stop the replay: this one is refused
                log.error("replay_entry_failed", error_type=type(exc).__name__, exc_info=True)
                yield (
                    record,
                    self.unreadable(record.text, f"the entry could not be read ({type(exc).__name__})"),
                )

    def _entry(self, record: Record) -> list[tuple[Record, Accepted | Rejected | None]]:
        """The outcomes of one record: of each event of it when it is an NDJSON line to unpack."""
        text = record.text
        if text is None or record.value is not None or record.problem is not None:
            return [(record, self.prepare(record))]
        screening = self.intake.screen(text)
        if screening.depth > PARSE_DEPTH:
            reason = (
                f"the line nests deeper than {PARSE_DEPTH} levels; events may nest "
                f"{self.intake.max_depth} (max_nesting_depth)"
            )
            return [(record, self.unreadable(text, reason))]
        event = read_event(text)
        if event is None or ("type" not in event and ("message" in event or "batch" in event)):
            return [(inner, self.prepare(inner, screened=screening.clean)) for inner in unpack(record)]
        return [(record, self._intake(event, record.defaults, screening.clean))]

    def prepare(self, record: Record, *, screened: bool = False) -> Accepted | Rejected | None:
        """Intake's outcome for a decoded record (or one that could not be read)."""
        if record.problem is not None:
            return self.unreadable(record.text, record.problem)
        return self._intake(record.value, record.defaults, screened)

    def _intake(self, event: Any, defaults: BatchDefaults, screened: bool) -> Accepted | Rejected | None:
        if isinstance(event, dict):
            if not self.selection.everything and not self.selection.admits(event, defaults, self.now):
                return None
            if event.get("messageId") in (None, ""):
                event = {**event, "messageId": content_message_id(event, defaults)}
            arrival = received_at(event, defaults, self._now)
        else:
            arrival = self._now
        return self.intake.prepare(event, received_at=arrival, defaults=defaults, screened=screened)

    def unreadable(self, text: bytes | None, reason: str) -> Rejected:
        """An entry that is no event: refused, its text kept (write keys masked) as the dead letter,
        as ingest keeps a body it cannot use (:meth:`Intake.refuse_text`)."""
        return self.intake.refuse_text(text, reason)


# ---------------------------------------------------------------- worker processes


def worker_processes() -> int:
    """Processes that prepare records: one per core this process may run on but one, which the
    reading process keeps busy (decompressing, splitting, queueing); none with one core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores - 1


class Workers:
    """:meth:`Preparer.outcomes` over worker processes, in file order (see the module's text)."""

    def __init__(self, preparer: Preparer, processes: int) -> None:
        self.preparer = preparer
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        #: Chunks prepared here so far.
        self._prepared_here = 0

    def outcomes(self, records: Iterable[Record]) -> Iterator[tuple[Record, Outcome]]:
        """Each event of ``records`` with intake's outcome, as :meth:`Preparer.outcomes` gives them.
        What reading ``records`` raises is raised after the outcomes of every record read before."""
        pending: deque[tuple[list[Record], Future[list[_Packed]]] | Exception] = deque()
        try:
            for chunk in _chunks(records):
                pending.append(chunk if isinstance(chunk, Exception) else (chunk, self._submit(chunk)))
                while len(pending) > CHUNKS_AHEAD * max(1, self.processes):
                    yield from _unpacked(pending.popleft())
            while pending:
                yield from _unpacked(pending.popleft())
        finally:
            for taken in pending:
                if not isinstance(taken, Exception):
                    taken[1].cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, chunk: list[Record]) -> Future[list[_Packed]]:
        """The chunk to a worker process; the first chunk (all of a small file: starting the
        processes would cost more than it saves), or every one without processes, here."""
        if self.processes and self._prepared_here:
            return self._executor().submit(_prepare, _sent(chunk))
        self._prepared_here += 1
        done: Future[list[_Packed]] = Future()
        done.set_result(_prepared(self.preparer, _sent(chunk)))
        return done

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(os.getpid(), self.preparer),
            )
        return self._pool


def _chunks(records: Iterable[Record]) -> Iterator[list[Record] | Exception]:
    """``records`` in lists; what reading them raises comes last, after the records read before."""
    chunk: list[Record] = []
    size = 0
    try:
        for record in records:
            chunk.append(record)
            size += len(record.text) if record.text is not None else 1024
            if len(chunk) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield chunk
                chunk = []
                size = 0
    except Exception as exc:
        if chunk:
            yield chunk
        yield exc
        return
    if chunk:
        yield chunk


def _sent(chunk: list[Record]) -> list[bytes | Record]:
    """What a worker is given of a chunk: an NDJSON line's bytes (its place stays here), or a
    record as it is (decoded array items, entries that could not be read: rare)."""
    return [
        record.text if record.text is not None and record.value is None and record.problem is None else record
        for record in chunk
    ]


#: An outcome as a worker sends it back: ("a", messageId, ordering key, payload) for accepted,
#: ("r", messageId, reason, payload) for rejected, None for left out; with the record's batch item
#: and whether it is the last of its entry when a line held several events.
_Packed = tuple[int | None, bool, tuple[str, Any, Any, bytes] | None]


def _pack(record: Record, outcome: Outcome) -> _Packed:
    if outcome is None:
        return record.item, record.last, None
    if isinstance(outcome, Accepted):
        return record.item, record.last, ("a", outcome.message_id, outcome.ordering_key, outcome.payload)
    return record.item, record.last, ("r", outcome.message_id, outcome.reason, outcome.payload)


def _unpacked(
    taken: tuple[list[Record], Future[list[_Packed]]] | Exception,
) -> Iterator[tuple[Record, Outcome]]:
    """The outcomes of a chunk, each with its record (a line's events with records of their own);
    or the error that ended the reading, raised."""
    if isinstance(taken, Exception):
        raise taken
    chunk, future = taken
    results = future.result()
    position = 0
    for record in chunk:
        item, last, packed = results[position]
        position += 1
        if item is not None and record.item is None:  # the events of a batch line, one by one
            while True:
                yield Record(record.line, item, record.entry, record.offset, last=last), _outcome(packed)
                if last:
                    break
                item, last, packed = results[position]
                position += 1
            continue
        yield record, _outcome(packed)


def _outcome(packed: tuple[str, Any, Any, bytes] | None) -> Outcome:
    if packed is None:
        return None
    kind, message_id, detail, payload = packed
    if kind == "a":
        return Accepted(message_id, detail, payload)
    return Rejected(message_id, detail, payload)


#: In a worker process: the preparer it was started with.
_worker: list[Preparer] = []


def _start_worker(parent: int, preparer: Preparer) -> None:
    """In a worker process, first: keep the preparer, leave Ctrl-C to the reading process (which
    stops the pool), collect garbage as rarely as the router does, and exit once the reading process
    is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    collect_garbage_less()
    _worker.append(preparer)
    exit_with_parent(parent)


def _prepare(items: list[bytes | Record]) -> list[_Packed]:
    """In a worker process: the packed outcome of each event of ``items``, in order."""
    return _prepared(_worker[0], items)


def _prepared(preparer: Preparer, items: list[bytes | Record]) -> list[_Packed]:
    """The packed outcome of each event of ``items`` (a chunk as :func:`_sent` gives it), in order."""
    records = (item if isinstance(item, Record) else Record(0, None, 0, text=item) for item in items)
    return [_pack(record, outcome) for record, outcome in preparer.outcomes(records)]
