"""Bulk profile imports finish after Klaviyo answers: follow the job to learn which items it refused.

``POST /api/profile-bulk-import-jobs`` answers 202 with a job; Klaviyo imports afterwards and
records each profile it could not import as an *import error* on the job. :func:`follow` polls the
job until it is ``complete`` (or ``cancelled``), then pages through its import errors and returns,
per item index of the request, Klaviyo's reason — so those events become dead letters instead of
being acknowledged as delivered.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson

IMPORT_PATH: Final = "/api/profile-bulk-import-jobs"
#: An import error's ``source.pointer`` into the request: ``/data/attributes/profiles/data/<i>/...``.
ITEM_POINTER: Final = re.compile(r"^/data/attributes/profiles/data/(\d+)(?:/|$)")
FINISHED: Final = frozenset({"complete", "cancelled"})


class Getter(Protocol):
    async def get(self, path: str) -> Any:
        """A paced GET whose result has ``kind``, ``detail`` and ``body`` (a client Outcome)."""


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What became of one bulk import job."""

    #: Item index in the request → Klaviyo's reason for not importing it.
    refused: dict[int, str] = field(default_factory=dict)
    #: The job was cancelled: nothing of it can be assumed imported.
    cancelled: bool = False
    #: Why the job's end could not be learned (then nothing is known to be refused).
    unknown: str | None = None


def job_id(body: bytes) -> str | None:
    """The job id in a 202 answer to an import, if there is one."""
    try:
        data = orjson.loads(body).get("data") if body else None
    except (orjson.JSONDecodeError, AttributeError):
        return None
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str) and found else None


def refused_items(page: Any) -> dict[int, str]:
    """Item index → reason, for each import error of one page that points at an item."""
    refused: dict[int, str] = {}
    for error in page.get("data") or [] if isinstance(page, dict) else []:
        attributes = (error or {}).get("attributes") or {}
        pointer = (attributes.get("source") or {}).get("pointer") or ""
        if match := ITEM_POINTER.match(pointer):
            code = attributes.get("code")
            text = attributes.get("detail") or attributes.get("title") or "refused"
            refused[int(match.group(1))] = (
                f"Klaviyo import error: {code + ': ' if code else ''}{text} (at {pointer})"
            )
    return refused


async def follow(
    client: Getter,
    job: str,
    *,
    wait: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> ImportResult:
    """Poll job ``job`` until it finishes (at most ``wait`` seconds), then read its import errors."""
    deadline = clock() + wait
    delay = 0.5
    while True:
        answer = await client.get(f"{IMPORT_PATH}/{job}")
        if answer.kind != "ok":
            return ImportResult(unknown=f"job {job}: {answer.detail}")
        attributes = ((orjson.loads(answer.body) or {}).get("data") or {}).get("attributes") or {}
        if attributes.get("status") in FINISHED:
            break
        if clock() + delay > deadline:
            return ImportResult(unknown=f"job {job} still {attributes.get('status')!r} after {wait:g} s")
        await sleep(delay)
        delay = min(delay * 2, 10.0)
    if attributes["status"] == "cancelled":
        return ImportResult(cancelled=True)
    if not attributes.get("failed_count"):
        return ImportResult()
    return await _errors(client, job)


async def _errors(client: Getter, job: str) -> ImportResult:
    refused: dict[int, str] = {}
    path: str | None = f"{IMPORT_PATH}/{job}/import-errors?page[size]=100"
    while path:
        answer = await client.get(path)
        if answer.kind != "ok":
            return ImportResult(refused, unknown=f"job {job} import errors: {answer.detail}")
        page = orjson.loads(answer.body)
        refused.update(refused_items(page))
        path = _relative(((page.get("links") or {}).get("next")) if isinstance(page, dict) else None)
    return ImportResult(refused)


def _relative(link: Any) -> str | None:
    """A ``links.next`` URL as a path with its query (the client adds the base URL)."""
    if not isinstance(link, str) or not link:
        return None
    start = link.find("/api/")
    return link[start:] if start >= 0 else None
