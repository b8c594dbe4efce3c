"""Converting rows to encoded profiles, in a process of its own for big runs.

Converting is most of a sync's work (a phone number alone is tens of microseconds through
``phonenumbers``), and only rows that are new or changed are converted. A run of many rows
converts each batch in a spawned process (sharing nothing with this one's threads) while this
process reads and compares the next batch and sends the jobs already filled; a small run converts
in place, where starting a process would cost more than it saves. Either way the result of a row
is its profile as JSON bytes, or the :class:`~router.sync.rows.Invalid` saying why it has none.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import orjson

from router.sync.rows import MAX_PROFILE_BYTES, Invalid, Row, RowReader

#: Rows a run must have (by the source's count) to convert in a process of its own.
PROCESS_FROM_ROWS: Final = 50_000


@dataclass(frozen=True, slots=True)
class Converted:
    """A row's profile: its JSON, and what else the run asked for (CSV output, subscribe identifiers)."""

    encoded: bytes
    csv_values: dict[str, Any] | None = None
    identifiers: dict[str, Any] | None = None


def convert(
    reader: RowReader, row: Row, *, csv: bool = False, identifiers: bool = False
) -> Converted | Invalid:
    """One row's :class:`Converted`, or why it cannot be sent."""
    resource = reader.profile(row)
    if isinstance(resource, Invalid):
        return resource
    encoded = orjson.dumps(resource)
    if len(encoded) > MAX_PROFILE_BYTES:
        return Invalid(row.number, "", f"the profile is {len(encoded)} bytes; Klaviyo takes at most 100 KB")
    attributes = resource["attributes"]
    return Converted(
        encoded,
        reader.csv_values(resource) if csv else None,
        {k: attributes[k] for k in ("email", "phone_number") if k in attributes} if identifiers else None,
    )


_READER: RowReader | None = None


def _start(reader: RowReader) -> None:
    global _READER
    _READER = reader


def _convert_rows(rows: Sequence[Row]) -> list[Converted | Invalid]:
    assert _READER is not None, "the converting process was started without its reader"
    return [convert(_READER, row) for row in rows]


class Converter:
    """Converts batches of rows, here or in a process of its own."""

    def __init__(self, reader: RowReader, *, csv: bool, identifiers: bool, in_process: bool) -> None:
        self._reader = reader
        self._csv = csv
        self._identifiers = identifiers
        self._pool: ProcessPoolExecutor | None = None
        if not (in_process or csv or identifiers):
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(reader,),
            )

    async def convert(self, rows: Sequence[Row]) -> list[Converted | Invalid]:
        if not rows:
            return []
        if self._pool is None:
            return [convert(self._reader, row, csv=self._csv, identifiers=self._identifiers) for row in rows]
        return await asyncio.get_running_loop().run_in_executor(self._pool, _convert_rows, rows)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
