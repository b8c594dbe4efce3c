"""Converting rows to encoded profiles, in processes of their own for big runs.

Converting is most of a sync's work (a phone number alone is tens of microseconds through
``phonenumbers``), and only rows that are new or changed are converted. A run of many rows
converts its batches in spawned processes, one a core (sharing nothing with this one's threads),
while this process reads and compares the next batch and sends the jobs already filled; a small
run converts in place, where starting a process would cost more than it saves. Either way the
result of a row is its profile as JSON bytes, or the :class:`~router.sync.rows.Invalid` saying why
it has none. The processes exit with this one, even when it is killed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import orjson

from router.runtime import collect_garbage_less, exit_with_parent
from router.sync.rows import MAX_PROFILE_BYTES, Invalid, Row, RowReader

#: Rows a run must have (by the source's count) to convert in processes of their own.
PROCESS_FROM_ROWS: Final = 50_000
#: Converting processes at most (one a core).
PROCESSES: Final = 2


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
    resource = reader.profile(row.number, row.raw)
    if isinstance(resource, Invalid):
        return resource
    encoded = _encoded(row.number, resource)
    if isinstance(encoded, Invalid):
        return encoded
    attributes = resource["attributes"]
    return Converted(
        encoded,
        reader.csv_values(resource) if csv else None,
        {k: attributes[k] for k in ("email", "phone_number") if k in attributes} if identifiers else None,
    )


def _encoded(number: int, resource: dict[str, Any]) -> bytes | Invalid:
    encoded = orjson.dumps(resource)
    if len(encoded) > MAX_PROFILE_BYTES:
        return Invalid(number, "", f"the profile is {len(encoded)} bytes; Klaviyo takes at most 100 KB")
    return encoded


_READER: RowReader | None = None


def _start(reader: RowReader, parent: int) -> None:
    global _READER
    _READER = reader
    collect_garbage_less()
    exit_with_parent(parent)


def _convert_rows(numbers: Sequence[int], raws: Sequence[Mapping[str, Any]]) -> list[bytes | Invalid]:
    """In a converting process: each row's profile as JSON, or why not (only what crosses the pipe)."""
    reader = _READER
    assert reader is not None, "the converting process was started without its reader"
    converted: list[bytes | Invalid] = []
    for number, raw in zip(numbers, raws, strict=True):
        resource = reader.profile(number, raw)
        converted.append(resource if isinstance(resource, Invalid) else _encoded(number, resource))
    return converted


class Converter:
    """Converts batches of rows, here or in processes of their own (one a core, up to :data:`PROCESSES`).

    Batches may be handed in while earlier ones convert (up to :attr:`depth` at once); each
    :meth:`convert` returns its own batch's results. Only the rows' cells go to a process and only
    the profiles' JSON comes back: pickling whole rows and results cost as much as converting.
    """

    def __init__(self, reader: RowReader, *, csv: bool, identifiers: bool, in_process: bool) -> None:
        self._reader = reader
        self._csv = csv
        self._identifiers = identifiers
        self._pool: ProcessPoolExecutor | None = None
        #: Batches worth converting at once.
        self.depth = 1
        if not (in_process or csv or identifiers):
            self.depth = max(1, min(PROCESSES, os.cpu_count() or 1))
            self._pool = ProcessPoolExecutor(
                max_workers=self.depth,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(reader, os.getpid()),
            )

    async def convert(self, rows: Sequence[Row]) -> list[Converted | Invalid]:
        if not rows:
            return []
        if self._pool is None:
            return [convert(self._reader, row, csv=self._csv, identifiers=self._identifiers) for row in rows]
        results = await asyncio.get_running_loop().run_in_executor(
            self._pool, _convert_rows, [row.number for row in rows], [row.raw for row in rows]
        )
        return [Converted(result) if isinstance(result, bytes) else result for result in results]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
