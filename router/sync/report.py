"""What a run writes for its operator: the bad-rows report, Klaviyo's CSV import file, progress.

- ``--report PATH``: one CSV line per row not sent or refused by Klaviyo: ``row`` (1 = the first
  row after the header), ``column``, ``reason``, ``key`` (the row's identifier, when it has one).
- ``--csv-out PATH``: the valid rows in Klaviyo's CSV import format: ``Email``, ``PhoneNumber``,
  ``ExternalID`` first, with exactly those names (seed 000), then the other columns.
- progress: a tqdm bar on a terminal (rows read, sent, failed, rate, ETA), plain lines otherwise.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import orjson

from router import progress
from router.errors import TransformError
from router.fields import CONVERTERS, Context
from router.sync.columns import CSV_NAMES

REPORT_COLUMNS = ("row", "column", "reason", "key")


class Report:
    """The ``--report`` CSV (or nothing, without a path); lines are written as problems are found."""

    def __init__(self, path: Path | None) -> None:
        self._file: IO[str] | None = None
        self._writer: Any = None
        if path is not None:
            self._file = path.open("w", encoding="utf-8", newline="")
            self._writer = csv.writer(self._file)
            self._writer.writerow(REPORT_COLUMNS)
        self.lines = 0

    def add(self, row: int | None, column: str, reason: str, key: str = "") -> None:
        self.lines += 1
        if self._writer is not None:
            self._writer.writerow(["" if row is None else row, column, reason, key])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class CsvOut:
    """The ``--csv-out`` file in Klaviyo's CSV import format."""

    def __init__(self, path: Path, columns: Iterable[str]) -> None:
        identifiers = list(CSV_NAMES.values())
        others = [name for name in columns if name not in CSV_NAMES and name not in identifiers]
        self.header = identifiers + [name for name in dict.fromkeys(others) if name != "properties"]
        self._file = path.open("w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, self.header, extrasaction="ignore")
        self._writer.writeheader()

    def add(self, values: Mapping[str, Any]) -> None:
        self._writer.writerow({name: _text(value) for name, value in values.items()})

    def close(self) -> None:
        self._file.close()


def _text(value: Any) -> str:
    """A cell: text as the transform writes it (``true``, ``42.5``), objects and lists as JSON."""
    if value is None:
        return ""
    try:
        return str(CONVERTERS["string"](value, "", Context()))
    except TransformError:
        return orjson.dumps(value).decode()


class Progress(progress.Progress):
    """Rows read / sent / failed while a run goes: a bar on a terminal, a line every few seconds else."""

    def __init__(self, name: str, total: int | None, *, enabled: bool, stream: IO[str] | None = None) -> None:
        super().__init__(
            stream or sys.stderr, label=f"sync {name}", total=total, unit="row", units="rows", enabled=enabled
        )
        self.read = self.sent = self.failed = 0

    def update(self, *, read: int = 0, sent: int = 0, failed: int = 0) -> None:
        self.read += read
        self.sent += sent
        self.failed += failed
        self.show(self.read, self.counts())

    def counts(self) -> str:
        return (
            f"{self.read:,} rows read, {self.sent:,} sent, {self.failed:,} failed, "
            f"{self.rate(self.read):,.0f} rows/s"
        )

    def close(self, counts: str | None = None) -> None:
        super().close(self.counts() if counts is None else counts)
