"""Captured event files, read as a stream of events (``transform`` and ``replay`` read them).

What a file may hold, gzip-compressed or not (told by its first bytes, not its name; decompressed
with ISA-L's ``isal`` where it is installed, else with :mod:`gzip`):

- NDJSON: one entry per line (blank lines skipped);
- a JSON array of entries, however it is laid out;
- one JSON object spanning the whole file (pretty-printed): a batch body, or one event.

An entry is a RudderStack/Segment event, a ``{"message": ..., "metadata": ...}`` wrapper (as
RudderStack's transformer takes them), or a batch body ``{"batch": [...], "sentAt"?, "context"?,
"integrations"?}`` as the SDKs post it, whose events come out one by one with its defaults.

Nothing is read whole. NDJSON is split into lines from 1 MiB blocks; arrays and whole-file objects
are parsed incrementally (ijson). A line is capped (``max_line``): a longer one is reported and
skipped, so one missing newline cannot take the memory. Every :class:`Record` says where it came
from (file, line, item); after the last record of each entry a later read can resume
(:attr:`Record.end`, given to :meth:`CaptureFile.records` as ``start``).
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import queue
import shutil
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO, Final, cast

import ijson
import orjson

from router import events
from router.errors import BadEvent
from router.events import NO_DEFAULTS, BatchDefaults

#: What reads gzip: ISA-L's inflate where it is installed (about three times zlib's speed:
#: decompressing was most of the reading thread's time), else the standard library's.
_GZIP_FILE: Callable[..., Any] = gzip.GzipFile
#: What reading a file that is not all there (or not gzip after all) raises.
READ_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error, gzip.BadGzipFile)
try:
    from isal import igzip, isal_zlib
except ImportError:  # pragma: no cover - a platform without a wheel of it
    pass
else:
    _GZIP_FILE = igzip.IGzipFile
    READ_ERRORS += (cast(type[Exception], isal_zlib.error),)

#: Bytes read at a time.
BLOCK: Final = 1 << 20
#: Longest line read by default (``replay`` caps lines at its request limit instead).
MAX_LINE: Final = 64 << 20
#: Standard input's name on the command line.
STDIN: Final = "-"
_GZIP_MAGIC: Final = b"\x1f\x8b"
_WHITESPACE: Final = b" \t\r\n"
#: Lines looked at to tell NDJSON from a pretty-printed object.
_SNIFF_LINES: Final = 20


class Unreadable(Exception):
    """A file (or the rest of it) cannot be read: missing, not gzip after all, cut short, not JSON."""


@dataclass(frozen=True, slots=True)
class Position:
    """How far into a file's entries a read got: where to resume it."""

    #: Entries (lines of NDJSON, items of an array or batch body) behind it.
    entries: int = 0
    #: Bytes of the decompressed text behind it (NDJSON only: a resumed read skips them unparsed).
    offset: int = 0


START: Final = Position()


class Record:
    """One event of a file, or one entry that could not be read (``problem``)."""

    __slots__ = ("defaults", "entry", "item", "last", "line", "offset", "problem", "text", "value")

    def __init__(
        self,
        line: int,
        item: int | None,
        entry: int,
        offset: int = 0,
        *,
        text: bytes | None = None,
        value: Any = None,
        defaults: BatchDefaults = NO_DEFAULTS,
        problem: str | None = None,
        last: bool = True,
    ) -> None:
        #: Line of NDJSON (1-based); 0 in a JSON array or whole-file object.
        self.line = line
        #: Index in the file's array, or in the batch body it came from.
        self.item = item
        #: Entries read up to and including this record's (a line, an array item, a batch item).
        self.entry = entry
        #: NDJSON: bytes of the decompressed text up to the end of its line.
        self.offset = offset
        #: An NDJSON line as it is, not decoded here: a bare event, or an entry to :func:`unpack`.
        self.text = text
        #: The event, decoded (when ``text`` is None and ``problem`` is None).
        self.value = value
        #: A batch body's sentAt, context and integrations, for its events.
        self.defaults = defaults
        #: Why the entry is unusable; ``text`` then holds what could be kept of it.
        self.problem = problem
        #: The last record of its entry: a read can resume after it (:attr:`end`).
        self.last = last

    @property
    def end(self) -> Position:
        """The position after this record's entry (meaningful on the last record of an entry)."""
        return Position(self.entry, self.offset)

    def where(self, name: str) -> str:
        """``events.ndjson line 3``, ``events.ndjson line 3 batch[2]``, ``events.json item 5``...
        (without ``name``: ``line 3``...)."""
        if self.line:
            place = f"line {self.line}" if self.item is None else f"line {self.line} batch[{self.item}]"
        else:
            place = f"item {self.item}"
        return f"{name} {place}" if name else place

    def plain(self) -> bool:
        """False for an NDJSON line that may hold a wrapper or a batch body (it names one of their
        keys): it must go through :func:`unpack`. True when its text can only be a bare event."""
        text = self.text
        return text is None or (b'"batch"' not in text and b'"message"' not in text)


def with_defaults(event: Any, defaults: BatchDefaults) -> Any:
    """``event`` with its batch body's ``sentAt``, ``context`` and ``integrations`` merged in, as
    ingest merges them (for ``transform``, which takes events as they are otherwise)."""
    if defaults is NO_DEFAULTS or not isinstance(event, dict):
        return event
    merged = dict(event)
    events._merge_defaults(merged, defaults)
    return merged


def expand(arguments: Sequence[str]) -> list[str]:
    """The files the arguments name: a file as it is, a folder's files (recursively, hidden ones
    left out, in name order), a glob pattern's matches (``**`` included), ``-`` for standard input.
    :class:`Unreadable` for an argument that names nothing."""
    files: list[str] = []
    for argument in arguments:
        if argument == STDIN:
            files.append(argument)
        elif os.path.isdir(argument):
            found = sorted(
                os.path.join(folder, name)
                for folder, subfolders, names in os.walk(argument)
                for name in names
                if not name.startswith(".")
                and not any(part.startswith(".") for part in Path(folder).relative_to(argument).parts)
            )
            if not found:
                raise Unreadable(f"{argument}: the folder holds no files")
            files.extend(found)
        elif os.path.exists(argument):
            files.append(argument)
        elif glob.has_magic(argument):
            matches = sorted(m for m in glob.glob(argument, recursive=True) if os.path.isfile(m))
            if not matches:
                raise Unreadable(f"{argument}: no file matches")
            files.extend(matches)
        else:
            raise Unreadable(f"{argument}: cannot read: No such file or directory")
    return files


class CaptureFile:
    """One input opened for reading: its size on disk and how much of it was read so far."""

    def __init__(self, name: str) -> None:
        self.name = name
        try:
            opened = sys.stdin.buffer if name == STDIN else open(name, "rb", buffering=BLOCK)  # noqa: SIM115
            self._raw: io.BufferedReader[Any] = cast(Any, opened)
        except OSError as exc:
            raise Unreadable(f"{name}: cannot read: {exc.strerror}") from None
        #: Size on disk (compressed), None for standard input or a pipe.
        self.size: int | None = None
        if name != STDIN:
            try:
                stat = os.fstat(self._raw.fileno())
            except OSError:
                stat = None
            if stat is not None and S_ISREG(stat.st_mode):
                self.size = stat.st_size
        self._spool: BinaryIO | None = None
        self._ahead: _ReadAhead | None = None
        self._gzip = False

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        if self._raw is not sys.stdin.buffer:
            self._raw.close()
        if self._spool is not None:
            self._spool.close()

    def __enter__(self) -> CaptureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def consumed(self) -> int:
        """Bytes of the file (as on disk) read so far."""
        try:
            return self._raw.tell() if self.size is not None else 0
        except (OSError, ValueError):
            return 0

    def records(self, *, max_line: int = MAX_LINE, start: Position = START) -> Iterator[Record]:
        """The file's events in order, from ``start`` (a :attr:`Record.end` of an earlier read of
        the same file). :class:`Unreadable` when the file cannot be read to its end."""
        try:
            text = self._text()
            head = _head(text)
            if head[:1] == b"[":
                yield from _array_records(self._read_ahead(text), start)
            elif head[:1] == b"{" and not _first_line_is_json(head):
                yield from _document_records(self._seekable(text), start)
            else:
                yield from _ndjson_records(self._read_ahead(text), max_line, start)
        except READ_ERRORS as exc:
            raise self.unreadable(exc) from None
        except ijson.JSONError as exc:
            raise Unreadable(f"{self.name}: not valid JSON: {_one_line(exc)}") from None

    def lines(self, *, max_line: int = MAX_LINE) -> Iterator[Record]:
        """The file read as NDJSON whatever its first bytes: each non-blank line as it is
        (:attr:`Record.text`, not decoded), a line over ``max_line`` bytes as a problem."""
        try:
            yield from _ndjson_records(self._read_ahead(self._text()), max_line, START)
        except READ_ERRORS as exc:
            raise self.unreadable(exc) from None

    def binary(self) -> io.BufferedReader[Any]:
        """The file's bytes, decompressed when it is gzip; what reading it raises is one of
        :data:`READ_ERRORS` (:meth:`unreadable` says it)."""
        return self._text()

    def unreadable(self, exc: BaseException) -> Unreadable:
        """The error saying the file cannot be read to its end, and why."""
        return Unreadable(f"{self.name}: cannot be read to its end: {_one_line(exc)}")

    def _text(self) -> io.BufferedReader[Any]:
        """The file's text, decompressed when it starts as gzip does (several members allowed)."""
        raw = self._raw if hasattr(self._raw, "peek") else io.BufferedReader(cast(Any, self._raw), BLOCK)
        if raw.peek(2)[:2] == _GZIP_MAGIC:
            self._gzip = True
            return io.BufferedReader(cast(Any, _GZIP_FILE(fileobj=raw, mode="rb")), BLOCK)
        return raw

    def _read_ahead(self, text: io.BufferedReader[Any]) -> BinaryIO:
        """``text`` as it is, or for gzip, decompressed ahead in a thread (:class:`_ReadAhead`)."""
        if not self._gzip:
            return text
        self._ahead = _ReadAhead(text)
        return cast(BinaryIO, self._ahead)

    def _seekable(self, text: io.BufferedReader[Any]) -> io.BufferedReader[Any]:
        """``text`` if it can be read again from its start, else a temporary copy of it (a whole-file
        object from a pipe is read twice: its batch defaults may come after its events)."""
        if self.name != STDIN and text.seekable():
            return text
        spool = io.BufferedReader(cast(Any, tempfile.TemporaryFile()), BLOCK)  # noqa: SIM115
        self._spool = cast(BinaryIO, spool)
        shutil.copyfileobj(text, spool.raw, BLOCK)
        spool.seek(0)
        return spool


class _ReadAhead:
    """A stream read block by block in a thread of its own, a few blocks ahead of its reader.

    zlib inflates without holding the GIL, so a gzip file is decompressed on another core while
    its lines are parsed here (decompression took about a sixth of replay's main thread). What
    the reading thread raises is raised by :meth:`read`, in order.
    """

    def __init__(self, source: io.BufferedReader[Any], depth: int = 4) -> None:
        self._blocks: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pending = memoryview(b"")
        self._ended = False
        self._thread = threading.Thread(
            target=self._run, args=(source,), name="capture-read-ahead", daemon=True
        )
        self._thread.start()

    def _run(self, source: io.BufferedReader[Any]) -> None:
        try:
            while not self._stop.is_set():
                block = source.read(BLOCK)
                self._put(block)
                if not block:
                    return
        except Exception as exc:  # handed to the reader, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (the rest of a block at most); b"" at the end."""
        if not self._pending:
            if self._ended:
                return b""
            item = self._blocks.get()
            if isinstance(item, BaseException):
                self._ended = True
                raise item
            if not item:
                self._ended = True
                return b""
            if size < 0 or size >= len(item):
                return item
            self._pending = memoryview(item)
        count = len(self._pending) if size < 0 else min(size, len(self._pending))
        piece = bytes(self._pending[:count])
        self._pending = self._pending[count:]
        return piece

    def close(self) -> None:
        self._stop.set()
        while True:  # let a reading thread blocked on a full queue see the stop
            try:
                self._blocks.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


def _head(text: io.BufferedReader[Any]) -> bytes:
    """The first block of ``text`` after leading blank space, not consumed."""
    return text.peek(BLOCK)[:BLOCK].lstrip(_WHITESPACE)


def _first_line_is_json(head: bytes) -> bool:
    """Whether ``head`` (the first block) reads as NDJSON rather than one pretty-printed object:
    its first line is a whole JSON value, or at least half of its first lines are (NDJSON whose
    first line is damaged); the lines of a pretty-printed object hardly ever are."""
    lines = [line for line in head.split(b"\n")[:_SNIFF_LINES] if line.strip(_WHITESPACE)]
    if len(lines) <= 1:  # one line, or a first line longer than a block: NDJSON either way
        return True
    if len(head) >= BLOCK:  # the last line may be cut by the block's end
        lines.pop()
    whole = [_is_json(line) for line in lines]
    return whole[0] or 2 * sum(whole) >= len(whole)


def _is_json(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (ijson's and gzip's can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- NDJSON


def _ndjson_records(text: BinaryIO, max_line: int, start: Position) -> Iterator[Record]:
    """Each non-blank line as it is (:attr:`Record.text`); a line over ``max_line`` bytes is
    reported and skipped, never held, so one missing newline cannot take the memory."""
    number = start.entries
    offset = start.offset
    _skip(text, offset)
    too_long = f"the line is over {max_line} bytes long"
    rest = b""
    skipped = 0  # bytes of a line over the cap read so far
    while block := text.read(BLOCK):
        lines = (rest + block).split(b"\n") if rest else block.split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            if skipped:
                offset += skipped + len(line) + 1
                skipped = 0
                yield Record(number, None, number, offset, problem=too_long)
                continue
            offset += len(line) + 1
            if len(line) > max_line:
                yield Record(number, None, number, offset, problem=too_long)
            elif line.strip(_WHITESPACE):
                yield Record(number, None, number, offset, text=line)
        if len(rest) > max_line:
            skipped += len(rest)
            rest = b""
    if skipped:
        number += 1
        yield Record(number, None, number, offset + skipped + len(rest), problem=too_long)
    elif rest.strip(_WHITESPACE):
        number += 1
        yield Record(number, None, number, offset + len(rest), text=rest)


def unpack(record: Record) -> Iterator[Record]:
    """The events of an NDJSON line that is not a bare event: a wrapper's message, a batch body's
    events one by one (only the last one :attr:`Record.last`), or the line itself, decoded, when it
    is an event after all; a line that is not JSON as a problem."""
    text = record.text or b""
    try:
        entry = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        yield Record(
            record.line, None, record.entry, record.offset, text=text, problem=f"not valid JSON: {exc}"
        )
        return
    yield from _entry_records(entry, record.line, None, record.entry, record.offset, text)


def _skip(text: BinaryIO, count: int) -> None:
    while count > 0:
        block = text.read(min(count, BLOCK))
        if not block:
            raise EOFError(f"the file is shorter than the {count} bytes a resumed read skips")
        count -= len(block)


# ---------------------------------------------------------------- entries


def _entry_records(
    entry: Any, line: int, item: int | None, number: int, offset: int, text: bytes | None = None
) -> Iterator[Record]:
    """The records of one entry: an event, a ``{message, metadata}`` wrapper, or a batch body."""
    if isinstance(entry, dict) and "type" not in entry:
        if isinstance(entry.get("message"), dict):
            yield Record(line, item, number, offset, value=entry["message"])
            return
        if "batch" in entry:
            yield from _batch_records(entry, line, number, offset, text)
            return
    yield Record(line, item, number, offset, text=text, value=entry)


def _batch_records(
    body: dict[str, Any], line: int, number: int, offset: int, text: bytes | None
) -> Iterator[Record]:
    events = body["batch"]
    try:
        if not isinstance(events, list):
            raise BadEvent('"batch" must be an array of events')
        if not events:
            raise BadEvent('"batch" is empty')
        defaults = BatchDefaults.from_body(body)
    except BadEvent as exc:
        yield Record(line, None, number, offset, text=text or orjson.dumps(body), problem=exc.message)
        return
    last = len(events) - 1
    for index, event in enumerate(events):
        yield Record(line, index, number, offset, value=event, defaults=defaults, last=index == last)


# ---------------------------------------------------------------- JSON documents


def _array_records(text: BinaryIO, start: Position) -> Iterator[Record]:
    items = ijson.items(text, "item", use_float=True)
    for index, entry in enumerate(items):
        if index >= start.entries:
            yield from _entry_records(entry, 0, index, index + 1, 0)


def _document_records(text: io.BufferedReader[Any], start: Position) -> Iterator[Record]:
    """A whole-file object: a batch body's events one by one (its defaults read first, wherever
    they stand in the file), or one event."""
    found = {key: _first(text, key) for key in ("sentAt", "context", "integrations")}
    try:
        defaults = BatchDefaults.from_body({key: value for key, value in found.items() if value is not None})
    except BadEvent as exc:
        yield Record(0, None, 1, problem=exc.message)
        return
    text.seek(0)
    any_event = False
    for index, event in enumerate(ijson.items(text, "batch.item", use_float=True)):
        any_event = True
        if index >= start.entries:
            yield Record(0, index, index + 1, value=event, defaults=defaults)
    if any_event or start.entries:
        return
    text.seek(0)
    yield from _entry_records(next(ijson.items(text, "", use_float=True)), 0, 0, 1, 0)


def _first(text: io.BufferedReader[Any], key: str) -> Any:
    text.seek(0)
    return next(ijson.items(text, key, use_float=True), None)
