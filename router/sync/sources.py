"""Where rows come from, streamed in batches of plain dicts and never loaded whole.

- files: CSV with a header row, NDJSON (one JSON object a line), Parquet, and gzip of CSV/NDJSON
  (recognised by its magic bytes, whatever the name says);
- SQL: ``postgresql://...`` (asyncpg, a server-side cursor in a read-only transaction),
  ``sqlite:///path`` (the standard library) and ``duckdb:///path`` (DuckDB, which can also query
  Parquet and CSV files: ``SELECT * FROM 'exports/*.parquet'``).

Every source says its columns before its first row, can count its rows for the estimate printed
before sending, and yields values Klaviyo's JSON can carry (``Decimal`` → number, ``UUID`` → text).
Parquet and DuckDB need the ``parquet`` / ``duckdb`` extras; a missing one is a clear error.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import decimal
import importlib
import io
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import orjson

from router.capture import READ_ERRORS, CaptureFile, Record, Unreadable
from router.errors import ConfigError

#: Rows per batch a source yields.
BATCH_ROWS: Final = 5000
_PARQUET_MAGIC: Final = b"PAR1"

#: Longest NDJSON line read (longer ones are bad rows): a profile of Klaviyo's 100 KB is far shorter.
MAX_LINE_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row a file source could not read (it keeps its place, so its row number): the column, when
    known, and why."""

    column: str
    reason: str


Rows = list[dict[str, Any] | BadRow]


class SourceError(Exception):
    """The source cannot be read (missing file, bad query, broken line): says which and where."""


class Source(Protocol):
    """A stream of rows."""

    #: Shown in logs and the run history.
    description: str

    async def columns(self) -> list[str]:
        """The column names, in order (opens the source)."""

    async def count(self) -> int | None:
        """How many rows there are (for the estimate), or ``None`` when that costs too much."""

    def batches(self) -> AsyncIterator[Rows]:
        """The rows, a batch at a time."""

    async def close(self) -> None:
        """Release files and connections."""


def cell(value: Any) -> Any:
    """A database value as something JSON carries (and the checksum sees the same way every run)."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dt.time):
        return value.isoformat()
    return value


def open_source(path: str | None = None, *, query: str | None = None, database: str | None = None) -> Source:
    """The source of a file, or of a query on a database."""
    if path is not None:
        return _file_source(Path(path))
    if query is None or database is None:
        raise ConfigError("a sync needs a source file, or a query and a database")
    scheme = database.split(":", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        return PostgresSource(database, query)
    location = database.split(":///", 1)[1] if ":///" in database else ""
    if not location:
        raise ConfigError(f"database {database.split('?')[0]!r}: expected {scheme}:///path")
    if scheme == "sqlite":
        return ThreadedSource(f"query on sqlite:///{location}", _SqliteQuery(location, query))
    if scheme == "duckdb":
        return ThreadedSource(f"query on duckdb:///{location}", _DuckdbQuery(location, query))
    raise ConfigError(f"database: unsupported scheme {scheme!r} (postgresql, sqlite, duckdb)")


def _file_source(path: Path) -> Source:
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    name = path.name.lower().removesuffix(".gz")
    if head == _PARQUET_MAGIC or name.endswith(".parquet"):
        return ThreadedSource(str(path), _ParquetFile(path))
    if name.endswith((".ndjson", ".jsonl", ".json")):
        return ThreadedSource(str(path), _NdjsonFile(path))
    if name.endswith((".csv", ".tsv", ".txt")) or not _looks_like_json(path):
        return ThreadedSource(str(path), _CsvFile(path))
    return ThreadedSource(str(path), _NdjsonFile(path))


def _looks_like_json(path: Path) -> bool:
    with _open(path) as file:
        try:
            return file.binary().read(64).lstrip()[:1] == b"{"
        except READ_ERRORS as exc:
            raise _unreadable(file, exc) from None


def _open(path: Path) -> CaptureFile:
    """A source file, its bytes decompressed when it is gzip (told by its first bytes)."""
    try:
        return CaptureFile(str(path))
    except Unreadable as exc:
        raise SourceError(str(exc)) from None


def _unreadable(file: CaptureFile, exc: BaseException) -> SourceError:
    """A file cut short or damaged (a truncated gzip file): what and where."""
    return SourceError(str(file.unreadable(exc)))


class _Reader(Protocol):
    """A blocking reader, run on a thread of its own by :class:`ThreadedSource`."""

    def columns(self) -> list[str]: ...

    def count(self) -> int | None: ...

    def batches(self) -> Iterator[Rows]: ...

    def close(self) -> None: ...


class ThreadedSource:
    """A blocking reader driven from the event loop: every call runs on one thread of its own,
    so a slow query or a big file does not hold up the requests being sent meanwhile."""

    def __init__(self, description: str, reader: _Reader) -> None:
        self.description = description
        self._reader = reader
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync-source")

    async def _call(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def columns(self) -> list[str]:
        columns: list[str] = await self._call(self._reader.columns)
        return columns

    async def count(self) -> int | None:
        counted: int | None = await self._call(self._reader.count)
        return counted

    async def batches(self) -> AsyncIterator[Rows]:
        """The batches, each read while the one before is handled (one batch ahead)."""
        iterator = await self._call(self._reader.batches)
        loop = asyncio.get_running_loop()
        ahead: asyncio.Future[Rows | None] = loop.run_in_executor(self._thread, next, iterator, None)
        try:
            while (batch := await ahead) is not None:
                ahead = loop.run_in_executor(self._thread, next, iterator, None)
                yield batch
        finally:  # left early: what the batch read ahead raises is of no interest any more
            ahead.add_done_callback(lambda future: future.cancelled() or future.exception())

    async def close(self) -> None:
        await self._call(self._reader.close)
        self._thread.shutdown(wait=False)


class _CsvFile:
    """A CSV file: invalid UTF-8 and cells too long for a profile are bad rows, not the end of the run.

    Text is decoded with ``surrogateescape``, so a byte that is not UTF-8 reaches its cell (the row
    is refused by :meth:`~router.sync.rows.RowReader.read`, which names the column); a cell longer
    than the csv module's field limit (128 Ki characters, more than the 100 KB Klaviyo takes for a
    whole profile) makes its row a :class:`BadRow` naming the column, and reading goes on.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: CaptureFile | None = None
        self._text: io.TextIOWrapper | None = None
        self._reader: Any = None
        self._header: list[str] | None = None
        self._dialect = csv.excel_tab if path.name.lower().removesuffix(".gz").endswith(".tsv") else csv.excel
        #: The lines of the record being read (a quoted cell may span lines).
        self._record: list[str] = []

    def _lines(self, text: Iterator[str]) -> Iterator[str]:
        record = self._record
        for line in text:
            record.append(line)
            yield line

    def columns(self) -> list[str]:
        if self._header is None:
            self._file = _open(self._path)
            self._text = io.TextIOWrapper(
                self._file.binary(), encoding="utf-8-sig", errors="surrogateescape", newline=""
            )
            self._reader = csv.reader(self._lines(self._text), self._dialect)
            try:
                self._header = [name.strip() for name in next(self._reader)]
            except StopIteration:
                raise SourceError(f"{self._path}: empty file, expected a header row") from None
            except csv.Error as exc:
                raise SourceError(f"{self._path}: line 1: {exc}") from None
            except READ_ERRORS as exc:
                raise _unreadable(self._file, exc) from None
            if not any(self._header):
                raise SourceError(f"{self._path}: line 1: expected a header row of column names")
            for name in self._header:
                if not _utf8(name):
                    raise SourceError(f"{self._path}: line 1: column name {name!r} is not UTF-8 text")
        return self._header

    def count(self) -> int | None:
        lines = 0
        last = b""
        with _open(self._path) as file:
            try:
                stream = file.binary()
                while chunk := stream.read(1 << 20):
                    lines += chunk.count(b"\n")
                    last = chunk
            except READ_ERRORS as exc:
                raise _unreadable(file, exc) from None
        if lines and not last.endswith(b"\n"):
            lines += 1
        return max(0, lines - 1)

    def batches(self) -> Iterator[Rows]:
        header = self.columns()
        reader, record = self._reader, self._record
        record.clear()
        width = len(header)
        batch: Rows = []
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                if "field limit" not in str(exc):
                    raise SourceError(f"{self._path}: line {reader.line_num}: {exc}") from None
                batch.append(self._too_long(header))
                continue
            except READ_ERRORS as exc:
                assert self._file is not None
                raise _unreadable(self._file, exc) from None
            finally:
                record.clear()
            if not fields:
                continue
            if len(fields) > width:
                raise SourceError(
                    f"{self._path}: line {reader.line_num}: {len(fields)} fields, the header has {width}"
                )
            if len(fields) < width:  # trailing empty cells left out
                fields += [""] * (width - len(fields))
            batch.append(dict(zip(header, fields, strict=True)))
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
        if batch:
            yield batch

    def _too_long(self, header: Sequence[str]) -> BadRow:
        """The row whose cell went over the field limit; the rest of its record is skipped."""
        text = "".join(self._record)
        limit = csv.field_size_limit()
        index = _long_cell(text, str(self._dialect.delimiter), limit)
        quotes = text.count('"')
        if quotes % 2:  # the long cell is quoted and goes on over the next lines: skip to its end
            assert self._text is not None
            for line in self._text:
                quotes += line.count('"')
                if not quotes % 2:
                    break
        column = header[index] if index is not None and index < len(header) else ""
        return BadRow(
            column,
            f"a cell of more than {limit} characters (Klaviyo takes at most 100 KB a profile)",
        )

    def close(self) -> None:
        if self._text is not None:
            self._text.close()
        if self._file is not None:
            self._file.close()


def _utf8(text: str) -> bool:
    """Whether ``text`` holds no byte that was not UTF-8 (``surrogateescape`` keeps those as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _long_cell(text: str, delimiter: str, limit: int) -> int | None:
    """The index of the first cell of a CSV record longer than ``limit`` characters, if any."""
    index, position, end = 0, 0, len(text)
    while position <= end:
        if text.startswith('"', position):
            close = position + 1
            while (close := text.find('"', close)) >= 0 and text.startswith('"', close + 1):
                close += 2
            after = end if close < 0 else close + 1
        else:
            after = position
        stop = text.find(delimiter, after)
        stop = end if stop < 0 else stop
        if stop - position > limit:
            return index
        index, position = index + 1, stop + 1
    return None


class _NdjsonFile:
    """One JSON object a line (read by :meth:`~router.capture.CaptureFile.lines`): a line that is
    not JSON, not UTF-8, not an object, or longer than :data:`MAX_LINE_BYTES` is a :class:`BadRow`."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._first: dict[str, Any] | None = None

    def columns(self) -> list[str]:
        """The first object's keys (a later object's other keys are custom properties too)."""
        if self._first is None:
            self._first = {}
            for row in self._rows():
                if isinstance(row, dict):
                    self._first = row
                    break
        return list(self._first)

    def count(self) -> int | None:
        return sum(1 for _ in self._lines())

    def _lines(self) -> Iterator[Record]:
        with _open(self._path) as file:
            try:
                yield from file.lines(max_line=MAX_LINE_BYTES)
            except Unreadable as exc:
                raise SourceError(str(exc)) from None

    def _rows(self) -> Iterator[dict[str, Any] | BadRow]:
        for record in self._lines():
            if record.problem is not None:
                yield BadRow(
                    "", f"line {record.line}: {record.problem} (Klaviyo takes at most 100 KB a profile)"
                )
                continue
            try:
                row = orjson.loads(record.text or b"")
            except orjson.JSONDecodeError as exc:
                yield BadRow("", f"line {record.line}: not valid JSON: {exc}")
                continue
            if isinstance(row, dict):
                yield row
            else:
                yield BadRow("", f"line {record.line}: expected a JSON object, got {type(row).__name__}")

    def batches(self) -> Iterator[Rows]:
        batch: Rows = []
        for row in self._rows():
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        pass


def _module(name: str, extra: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        raise ConfigError(
            f"reading this source needs {name}: pip install 'klaviyo-router[{extra}]'"
        ) from None


class _ParquetFile:
    def __init__(self, path: Path) -> None:
        parquet = _module("pyarrow.parquet", "parquet")
        try:
            self._file = parquet.ParquetFile(str(path))
        except Exception as exc:  # pyarrow raises its own errors for a file it cannot read
            raise SourceError(f"{path}: not a Parquet file pyarrow can read: {exc}") from None

    def columns(self) -> list[str]:
        return list(self._file.schema_arrow.names)

    def count(self) -> int | None:
        return int(self._file.metadata.num_rows)

    def batches(self) -> Iterator[Rows]:
        for batch in self._file.iter_batches(batch_size=BATCH_ROWS):
            yield [{name: cell(value) for name, value in row.items()} for row in batch.to_pylist()]

    def close(self) -> None:
        self._file.close()


class _DbQuery:
    """A query through a DB-API cursor: ``fetchmany`` batches."""

    def __init__(self, query: str) -> None:
        self._query = query.strip().rstrip(";")
        self._cursor: Any = None

    def _connection(self) -> Any:
        raise NotImplementedError

    def _execute(self) -> Any:
        if self._cursor is None:
            try:
                self._cursor = self._connection().cursor()
                self._cursor.execute(self._query)
            except Exception as exc:  # each driver has its own error classes: all mean the query failed
                raise SourceError(f"the query failed: {type(exc).__name__}: {exc}") from None
        return self._cursor

    def columns(self) -> list[str]:
        return [str(description[0]) for description in self._execute().description or ()]

    def count(self) -> int | None:
        try:
            cursor = self._connection().cursor()
            cursor.execute(f"SELECT count(*) FROM ({self._query}) AS sync_rows")
            return int(cursor.fetchone()[0])
        except Exception:  # an estimate only: a query that cannot be wrapped still runs
            return None

    def batches(self) -> Iterator[Rows]:
        cursor = self._execute()
        names = self.columns()
        while rows := cursor.fetchmany(BATCH_ROWS):
            yield [{name: cell(value) for name, value in zip(names, row, strict=True)} for row in rows]


class _SqliteQuery(_DbQuery):
    def __init__(self, path: str, query: str) -> None:
        super().__init__(query)
        if not Path(path).exists():
            raise ConfigError(f"database sqlite:///{path}: no such file")
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    def _connection(self) -> Any:
        return self._db

    def close(self) -> None:
        self._db.close()


class _DuckdbQuery(_DbQuery):
    def __init__(self, path: str, query: str) -> None:
        super().__init__(query)
        duckdb = _module("duckdb", "duckdb")
        if path != ":memory:" and not Path(path).exists():
            raise ConfigError(f"database duckdb:///{path}: no such file")
        self._db = duckdb.connect(path, read_only=path != ":memory:")

    def _connection(self) -> Any:
        return self._db

    def close(self) -> None:
        self._db.close()


class PostgresSource:
    """A query on PostgreSQL through a server-side cursor (rows arrive as they are fetched)."""

    def __init__(self, dsn: str, query: str) -> None:
        self._asyncpg = _module("asyncpg", "postgres")
        self._dsn = dsn
        self._query = query.strip().rstrip(";")
        self._connection: Any = None
        self.description = "query on " + dsn.split("@")[-1].split("?")[0]

    async def _connect(self) -> Any:
        if self._connection is None:
            try:
                self._connection = await self._asyncpg.connect(self._dsn)
            except (OSError, self._asyncpg.PostgresError) as exc:
                raise SourceError(f"cannot connect to the database: {type(exc).__name__}: {exc}") from None
        return self._connection

    async def columns(self) -> list[str]:
        connection = await self._connect()
        try:
            statement = await connection.prepare(self._query)
        except self._asyncpg.PostgresError as exc:
            raise SourceError(f"the query failed: {type(exc).__name__}: {exc}") from None
        return [attribute.name for attribute in statement.get_attributes()]

    async def count(self) -> int | None:
        connection = await self._connect()
        try:
            counted = await connection.fetchval(f"SELECT count(*) FROM ({self._query}) AS sync_rows")
        except self._asyncpg.PostgresError:
            return None
        return int(counted)

    async def batches(self) -> AsyncIterator[Rows]:
        connection = await self._connect()
        try:
            async with connection.transaction(readonly=True, isolation="repeatable_read"):
                cursor = await connection.cursor(self._query)
                while records := await cursor.fetch(BATCH_ROWS):
                    yield [{key: cell(value) for key, value in record.items()} for record in records]
        except self._asyncpg.PostgresError as exc:
            raise SourceError(f"the query failed: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
