"""The SQLite writer's fast path: a run of enqueue calls stored by a few statements in one group
commit, and its fallback to one call at a time (duplicates, NUL in a string, errors). The
behaviour must be that of the contract (tests/test_queue_contract.py) either way."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from router.queue import JOB_FIELDS, EnqueueResult, JobState, NewJob, sqlite
from router.queue.sqlite import QUERIES, SqliteQueue

T0 = 1_700_000_000.0


def job(
    message_id: str, destination: str = "klaviyo", *, key: str | None = "u:1", payload: bytes = b""
) -> NewJob:
    return NewJob(
        source="web",
        destination=destination,
        message_id=message_id,
        ordering_key=key,
        payload=payload or b'{"messageId":"%s"}' % message_id.encode(),
    )


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SqliteQueue]:
    queue = SqliteQueue(tmp_path / "queue.db")
    await queue.open()
    yield queue
    await queue.close()


async def in_one_commit(queue: SqliteQueue, *calls: Awaitable[Any]) -> list[Any]:
    """Run ``calls`` in the same group commit: the writer is held until all are submitted."""
    gate = threading.Event()
    held = asyncio.ensure_future(queue._writer.run(lambda conn: gate.wait(10)))
    await asyncio.sleep(0.05)  # the writer is now inside the holding operation
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)  # every call submitted
    commits = queue.commits
    gate.set()
    await held
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert queue.commits == commits + 2  # the holding operation's commit, then one for all calls
    return results


@pytest.fixture
def row_by_row(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The message ids of the first job of each call stored by the fallback, row by row."""
    calls: list[str] = []
    store_rows = sqlite._store_rows

    def spy(conn: Any, *, call: Any, now: float, cutoff: float) -> EnqueueResult:
        calls.append(call.groups[0][0].message_id if call.groups else "")
        return store_rows(conn, call=call, now=now, cutoff=cutoff)

    monkeypatch.setattr(sqlite, "_store_rows", spy)
    return calls


async def pending(queue: SqliteQueue) -> list[tuple[str, str, str | None, bytes]]:
    jobs = await queue.list_jobs(JobState.PENDING, limit=10_000)
    assert [j.id for j in jobs] == sorted(j.id for j in jobs)
    return [(j.message_id, j.destination, j.ordering_key, j.payload) for j in jobs]


async def test_a_run_of_calls_is_stored_in_order(queue: SqliteQueue, row_by_row: list[str]) -> None:
    calls = [
        [job(f"m{c}-{i}", d, key=None if i % 3 == 0 else f"u:{i}") for i in range(10) for d in ("a", "b")]
        for c in range(8)
    ]
    results = await in_one_commit(queue, *(queue.enqueue(jobs) for jobs in calls))
    assert results == [EnqueueResult(inserted=20, duplicates=0)] * 8
    expected = [(j.message_id, j.destination, j.ordering_key, j.payload) for jobs in calls for j in jobs]
    assert await pending(queue) == expected
    stored = await queue.list_jobs(JobState.PENDING, limit=1)
    assert stored[0].attempts == 0 and stored[0].created_at == stored[0].next_attempt_at
    assert row_by_row == []  # the fast path


async def test_payload_bytes_are_kept_exactly(queue: SqliteQueue) -> None:
    payloads = [b"\xff\x00\xfe", b"{}", "é\u2028😀".encode(), b"x" * 70_000, b"\x00"]
    jobs = [job(f"p{i}", payload=payload) for i, payload in enumerate(payloads)]
    await in_one_commit(queue, queue.enqueue(jobs[:2]), queue.enqueue(jobs[2:]))
    assert [p for *_, p in await pending(queue)] == payloads


async def test_a_duplicate_across_calls_of_one_commit(queue: SqliteQueue, row_by_row: list[str]) -> None:
    results = await in_one_commit(
        queue,
        queue.enqueue([job("a"), job("b"), job("b", "other")]),
        queue.enqueue([job("b"), job("c")]),
        queue.enqueue([job("c", "other"), job("a"), job("a")]),
    )
    assert results == [
        EnqueueResult(inserted=3, duplicates=0),
        EnqueueResult(inserted=1, duplicates=1),
        EnqueueResult(inserted=0, duplicates=3),
    ]
    assert [(m, d) for m, d, *_ in await pending(queue)] == [
        ("a", "klaviyo"),
        ("b", "klaviyo"),
        ("b", "other"),
        ("c", "klaviyo"),
    ]
    assert row_by_row == ["a", "b", "c"]


async def test_a_duplicate_of_an_earlier_commit_and_an_expired_one(queue: SqliteQueue) -> None:
    await queue.enqueue([job("old")], now=T0)
    await queue.enqueue([job("recent")], now=T0 + 86_000)
    results = await in_one_commit(
        queue,
        queue.enqueue([job("old"), job("new")], now=T0 + 86_401),
        queue.enqueue([job("recent")], now=T0 + 86_401),
    )
    assert results == [EnqueueResult(inserted=2, duplicates=0), EnqueueResult(inserted=0, duplicates=1)]
    assert [m for m, *_ in await pending(queue)] == ["old", "recent", "old", "new"]


@pytest.mark.parametrize("text", ["a\x00b", "\x00"])
async def test_nul_in_a_message_id_or_key(queue: SqliteQueue, text: str, row_by_row: list[str]) -> None:
    results = await in_one_commit(
        queue,
        queue.enqueue([job(text), job("plain")]),
        queue.enqueue([job("k", key=text)]),
    )
    assert results == [EnqueueResult(inserted=2, duplicates=0), EnqueueResult(inserted=1, duplicates=0)]
    assert [(m, k) for m, _, k, _ in await pending(queue)] == [(text, "u:1"), ("plain", "u:1"), ("k", text)]
    assert row_by_row == [text, "k"]
    assert await queue.enqueue([job(text)]) == EnqueueResult(inserted=0, duplicates=1)


async def test_calls_with_their_own_clock(queue: SqliteQueue) -> None:
    await in_one_commit(
        queue,
        queue.enqueue([job("a")], now=T0),
        queue.enqueue([job("b")], now=T0 + 5),
        queue.enqueue([job("c")], now=T0 + 5),
        queue.enqueue([]),
        queue.enqueue([job("d")]),
    )
    jobs = await queue.list_jobs(JobState.PENDING)
    assert [(j.message_id, j.created_at) for j in jobs[:3]] == [("a", T0), ("b", T0 + 5), ("c", T0 + 5)]
    assert jobs[3].created_at > T0 + 5


async def test_a_failing_run_is_retried_call_by_call(
    queue: SqliteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(QUERIES, "insert_pending_jobs", "INSERT INTO no_such_table VALUES (1)")
    results = await in_one_commit(queue, queue.enqueue([job("a"), job("b")]), queue.enqueue([job("c")]))
    assert results == [EnqueueResult(inserted=2, duplicates=0), EnqueueResult(inserted=1, duplicates=0)]
    assert [m for m, *_ in await pending(queue)] == ["a", "b", "c"]


async def test_other_operations_keep_their_place(queue: SqliteQueue) -> None:
    await queue.enqueue([job("first")], now=T0)
    (claimed,) = await queue.claim("klaviyo", 10, lease_seconds=30, now=T0)
    results = await in_one_commit(
        queue,
        queue.enqueue([job("a")], now=T0),
        queue.ack([claimed.id], now=T0),
        queue.enqueue([job("b")], now=T0),
        queue.add_dead([job("dead")], "bad", now=T0),
        queue.enqueue([job("c")], now=T0),
    )
    assert results[0] == results[2] == results[4] == EnqueueResult(inserted=1, duplicates=0)
    assert [m for m, *_ in await pending(queue)] == ["a", "b", "c"]
    assert (await queue.counts())[JobState.DONE] == 1
    assert [j.message_id for j in await queue.list_jobs(JobState.DEAD)] == ["dead"]
    # the dead letter does not count for dedupe
    assert await queue.enqueue([job("dead")]) == EnqueueResult(inserted=1, duplicates=0)


async def test_claimed_jobs_are_read_in_field_order(queue: SqliteQueue) -> None:
    """A claim reads plain rows whose columns are the Job's fields in order; the jobs it builds
    are those ``get`` reads by column name."""
    columns = await queue._writer.run(
        lambda conn: [c[0] for c in conn.execute(QUERIES["select_jobs"], {"ids": "[]"}).description]
    )
    assert tuple(columns) == JOB_FIELDS
    await queue.enqueue([job("m1", key="u:1"), job("m2", key=None, payload=b'{"x":1}')], now=T0)
    claimed = await queue.claim("klaviyo", 10, lease_seconds=30, now=T0 + 1)
    assert [j.message_id for j in claimed] == ["m1", "m2"]
    assert claimed == [await queue.get(j.id) for j in claimed]
    assert {j.state for j in claimed} == {JobState.IN_FLIGHT}
    assert all(type(j.state) is JobState for j in claimed)
