"""One behaviour suite for every :class:`router.queue.Queue` backend (the ``queue`` fixture),
then what only the SQLite backend promises: group commit, crash durability, migrations."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.queue import (
    EnqueueResult,
    JobState,
    NewJob,
    Queue,
    QueueFull,
    QueueOptions,
    open_queue,
    sql,
    sqlite_path,
    sqlite_threads,
)
from router.queue.memory import MemoryQueue
from router.queue.postgres import PostgresQueue
from router.queue.sqlite import SqliteQueue

T0 = 1_700_000_000.0
LEASE = 30.0


def new_job(
    message_id: str, *, destination: str = "klaviyo", key: str | None = None, source: str = "web"
) -> NewJob:
    return NewJob(
        source=source,
        destination=destination,
        message_id=message_id,
        ordering_key=key,
        payload=b'{"messageId": "%s"}' % message_id.encode(),
    )


def enqueued(inserted: int, duplicates: int) -> EnqueueResult:
    return EnqueueResult(inserted=inserted, duplicates=duplicates)


async def claim_ids(
    queue: Queue, now: float = T0, limit: int = 100, destination: str = "klaviyo"
) -> list[int]:
    return [job.id for job in await queue.claim(destination, limit, lease_seconds=LEASE, now=now)]


async def state_of(queue: Queue, job_id: int) -> JobState | None:
    job = await queue.get(job_id)
    return job.state if job else None


# --- enqueue, claim, ack ---------------------------------------------------------------------


async def test_enqueue_claim_ack(queue: Queue) -> None:
    result = await queue.enqueue([new_job("a"), new_job("b"), new_job("c")], now=T0)
    assert (result.inserted, result.duplicates) == (3, 0)

    claimed = await queue.claim("klaviyo", 2, lease_seconds=LEASE, now=T0)
    assert [job.id for job in claimed] == [1, 2]
    first = claimed[0]
    assert (first.state, first.lease_expires_at, first.attempts) == (JobState.IN_FLIGHT, T0 + LEASE, 0)
    assert (first.source, first.message_id, first.message()) == ("web", "a", {"messageId": "a"})
    assert await claim_ids(queue) == [3]

    await queue.ack([1, 2], now=T0 + 1)
    done = await queue.get(1)
    assert done is not None
    assert (done.state, done.lease_expires_at, done.updated_at) == (JobState.DONE, None, T0 + 1)
    assert await claim_ids(queue, now=T0 + 1000) == [3]  # only its expired lease brings 3 back
    assert await queue.get(99) is None


async def test_claim_takes_only_due_jobs_of_its_destination(queue: Queue) -> None:
    await queue.enqueue([new_job("a", destination="other"), new_job("b")], now=T0)
    assert await claim_ids(queue, now=T0 - 1) == []
    assert await claim_ids(queue) == [2]
    assert await claim_ids(queue, destination="other") == [1]


async def test_ack_retry_release_ignore_jobs_not_in_flight(queue: Queue) -> None:
    await queue.enqueue([new_job("a")], now=T0)
    await queue.ack([1], now=T0)
    await queue.retry(1, at=T0, error="boom", now=T0)
    await queue.release([1], now=T0)
    job = await queue.get(1)
    assert job is not None
    assert (job.state, job.attempts) == (JobState.PENDING, 0)


# --- dedupe ----------------------------------------------------------------------------------


async def test_one_event_for_several_destinations_dedupes_as_one(queue: Queue) -> None:
    batch = [new_job("a", destination="klaviyo"), new_job("a", destination="eu"), new_job("b")]
    assert await queue.enqueue(batch, now=T0) == enqueued(3, 0)
    # The same pair again in a later call, for any destination, is a duplicate; another source is not.
    repeat = [new_job("a"), new_job("a", destination="eu"), new_job("a", destination="new")]
    assert await queue.enqueue(repeat, now=T0 + 1) == enqueued(0, 3)
    assert await queue.enqueue([new_job("a", source="app")], now=T0 + 1) == enqueued(1, 0)


async def test_duplicates_inside_one_batch(queue: Queue) -> None:
    batch = [new_job("a"), new_job("a", destination="eu"), new_job("a"), new_job("b"), new_job("b")]
    assert await queue.enqueue(batch, now=T0) == enqueued(3, 2)
    assert [j.message_id for j in await queue.list_jobs(JobState.PENDING)] == ["a", "a", "b"]


async def test_dedupe_outlives_delivery(queue: Queue) -> None:
    await queue.enqueue([new_job("a")], now=T0)
    await claim_ids(queue)
    await queue.ack([1], now=T0 + 1)
    assert await queue.enqueue([new_job("a")], now=T0 + 2) == enqueued(0, 1)


@pytest.mark.parametrize("queue_options", [QueueOptions(dedupe_window=100)])
async def test_dedupe_window_expires(queue: Queue) -> None:
    await queue.enqueue([new_job("a")], now=T0)
    assert await queue.enqueue([new_job("a")], now=T0 + 99) == enqueued(0, 1)
    assert await queue.enqueue([new_job("a")], now=T0 + 100) == enqueued(1, 0)
    # Accepting it again restarted the window.
    assert await queue.enqueue([new_job("a")], now=T0 + 150) == enqueued(0, 1)


async def test_dead_letters_do_not_count_for_dedupe(queue: Queue) -> None:
    await queue.add_dead([new_job("a")], "missing userId", now=T0)
    assert await queue.enqueue([new_job("a")], now=T0 + 1) == enqueued(1, 0)
    dead = await queue.list_jobs(JobState.DEAD)
    assert [(j.id, j.message_id, j.last_error, j.attempts) for j in dead] == [(1, "a", "missing userId", 0)]
    assert await claim_ids(queue, now=T0 + 1) == [2]


# --- ordering --------------------------------------------------------------------------------


async def test_consecutive_due_jobs_of_a_key_are_claimed_together_in_order(queue: Queue) -> None:
    jobs = [new_job("u1", key="u"), new_job("u2", key="u"), new_job("v1", key="v"), new_job("n1")]
    await queue.enqueue(jobs, now=T0)
    assert await claim_ids(queue) == [1, 2, 3, 4]


async def test_claim_takes_whole_keys_so_the_next_claim_finds_others_free(queue: Queue) -> None:
    await queue.enqueue([new_job(f"{key}{n}", key=key) for n in range(3) for key in "uv"], now=T0)
    assert await claim_ids(queue, limit=3) == [1, 3, 5]  # u's three, not u1 v1 u2
    assert await claim_ids(queue, limit=3) == [2, 4, 6]  # so v is free for a second worker


async def test_claim_ranks_keys_by_their_oldest_job_and_jobs_without_a_key_alone(queue: Queue) -> None:
    jobs = [
        new_job("n1"),
        new_job("u1", key="u"),
        new_job("n2"),
        new_job("v1", key="v"),
        new_job("u2", key="u"),
    ]
    await queue.enqueue(jobs, now=T0)
    assert await claim_ids(queue, limit=3) == [1, 2, 5]  # n1, then u1 with u2, then the limit
    assert await claim_ids(queue, limit=3) == [3, 4]


async def test_in_flight_job_blocks_later_jobs_of_its_key(queue: Queue) -> None:
    await queue.enqueue([new_job("u1", key="u"), new_job("v1", key="v")], now=T0)
    assert await claim_ids(queue) == [1, 2]
    await queue.enqueue([new_job("u2", key="u"), new_job("v2", key="v"), new_job("n1")], now=T0)
    await queue.ack([2], now=T0)
    assert await claim_ids(queue) == [4, 5]  # u2 waits while u1 is in flight


async def test_job_waiting_for_retry_blocks_later_jobs_of_its_key(queue: Queue) -> None:
    await queue.enqueue([new_job("u1", key="u")], now=T0)
    await claim_ids(queue)
    await queue.enqueue([new_job("u2", key="u")], now=T0)
    await queue.retry(1, at=T0 + 60, error="429", now=T0 + 1)
    assert await claim_ids(queue, now=T0 + 59) == []  # 2 waits while 1 is pending retry
    assert await claim_ids(queue, now=T0 + 60) == [1, 2]  # both due: together, in order


async def test_claim_limit_never_skips_ahead_within_a_key(queue: Queue) -> None:
    await queue.enqueue([new_job(f"u{i}", key="u") for i in range(3)], now=T0)
    assert await claim_ids(queue, limit=2) == [1, 2]
    assert await claim_ids(queue) == []  # 3 waits for 1 and 2


async def test_ordering_is_per_destination(queue: Queue) -> None:
    await queue.enqueue([new_job("a", key="u"), new_job("b", key="u", destination="eu")], now=T0)
    assert await claim_ids(queue) == [1]
    assert await claim_ids(queue, destination="eu") == [2]


async def test_dead_job_stops_blocking_its_key(queue: Queue) -> None:
    await queue.enqueue([new_job("a", key="u"), new_job("b", key="u")], now=T0)
    await claim_ids(queue, limit=1)
    await queue.dead_letter(1, reason="422 invalid email", now=T0)
    assert await claim_ids(queue) == [2]


@pytest.mark.parametrize("queue_options", [QueueOptions(hot_key_threshold=3)])
async def test_hot_key_loses_ordering(queue: Queue) -> None:
    await queue.enqueue([new_job(f"u{i}", key="u") for i in range(3)], now=T0)
    assert await claim_ids(queue, limit=1) == [1]
    await queue.enqueue([new_job("u3", key="u"), new_job("v0", key="v")], now=T0)
    assert await claim_ids(queue) == [2, 3, 4, 5]  # 4 waiting for "u" > 3: anything goes
    await queue.ack([1, 2, 3], now=T0)
    await queue.enqueue([new_job("u4", key="u")], now=T0)
    assert await claim_ids(queue) == []  # "u" cooled down: 6 waits for 4 in flight


# --- leases, retry, release ------------------------------------------------------------------


async def test_expired_lease_is_claimed_again(queue: Queue) -> None:
    await queue.enqueue([new_job("a", key="u"), new_job("b", key="u")], now=T0)
    assert await claim_ids(queue, limit=1) == [1]
    assert await claim_ids(queue, now=T0 + LEASE - 1) == []
    again = await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0 + LEASE)
    assert [(j.id, j.attempts, j.lease_expires_at) for j in again] == [(1, 0, T0 + 2 * LEASE)]


async def test_retry_counts_an_attempt_and_waits(queue: Queue) -> None:
    await queue.enqueue([new_job("a")], now=T0)
    await claim_ids(queue)
    await queue.retry(1, at=T0 + 10, error="503 from Klaviyo", now=T0 + 1)
    job = await queue.get(1)
    assert job is not None
    assert (job.state, job.attempts, job.next_attempt_at, job.last_error) == (
        JobState.PENDING,
        1,
        T0 + 10,
        "503 from Klaviyo",
    )
    assert job.lease_expires_at is None
    assert await claim_ids(queue, now=T0 + 9) == []
    assert [j.attempts for j in await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0 + 10)] == [1]


async def test_release_returns_jobs_without_an_attempt(queue: Queue) -> None:
    await queue.enqueue([new_job("a"), new_job("b")], now=T0)
    await claim_ids(queue)
    await queue.release([1, 2], now=T0 + 1)
    assert [(j.id, j.attempts, j.lease_expires_at) for j in await queue.list_jobs(JobState.PENDING)] == [
        (1, 0, None),
        (2, 0, None),
    ]
    assert await claim_ids(queue, now=T0 + 1) == [1, 2]


async def test_progress_is_added_by_retry_release_and_dead_letter_and_kept_by_revive(queue: Queue) -> None:
    """What delivery achieved for a job survives it leaving in flight, so a later attempt sends only the rest."""
    await queue.enqueue([new_job("a"), new_job("b"), new_job("c")], now=T0)
    claimed = await queue.claim("klaviyo", 10, lease_seconds=LEASE, now=T0)
    assert [job.progress for job in claimed] == [0, 0, 0]
    await queue.retry(1, at=T0, error="503", progress=0b01, now=T0)
    await queue.release([2, 3], progress=0b10, now=T0)
    again = await queue.claim("klaviyo", 10, lease_seconds=LEASE, now=T0)
    assert [(job.id, job.progress, job.attempts) for job in again] == [
        (1, 0b01, 1),
        (2, 0b10, 0),
        (3, 0b10, 0),
    ]
    await queue.retry(1, at=T0, error="503", progress=0b100, now=T0)  # added, never cleared
    await queue.release([2], now=T0)
    await queue.dead_letter(3, reason="400", progress=0b01, now=T0)
    jobs = [await queue.get(job_id) for job_id in (1, 2, 3)]
    assert [job.progress if job else None for job in jobs] == [0b101, 0b10, 0b11]
    assert await queue.revive([3], now=T0) == 1
    revived = await queue.get(3)
    assert revived is not None and (revived.attempts, revived.progress) == (0, 0b11)
    assert [job.progress for job in await queue.list_jobs(JobState.PENDING)] == [0b101, 0b10, 0b11]
    assert [job.id for job in await queue.claim("klaviyo", 10, lease_seconds=LEASE, now=T0)] == [1, 2, 3]
    await queue.ack([1], now=T0)
    assert await queue.resend([1], now=T0) == 1  # sent again: every step
    resent = await queue.get(1)
    assert resent is not None and (resent.state, resent.progress) == (JobState.PENDING, 0)


async def test_oldest_due_is_the_job_delivery_should_be_working_on(queue: Queue) -> None:
    assert await queue.oldest_due("klaviyo", now=T0) is None
    await queue.enqueue(
        [new_job("a", key="u"), new_job("b", key="u"), new_job("c", key="v"), new_job("d", key="w")], now=T0
    )
    await queue.enqueue([new_job("e", destination="eu")], now=T0)
    assert await queue.oldest_due("klaviyo", now=T0) == 1
    assert await queue.oldest_due("eu", now=T0) == 5
    assert await claim_ids(queue, limit=2) == [1, 2]
    assert await queue.oldest_due("klaviyo", now=T0) == 1  # in flight
    await queue.retry(1, at=T0 + 10, error="503", now=T0)
    await queue.release([2], now=T0)
    # 1 waits for its retry and 2 behind it: delivery should be on 3
    assert await queue.oldest_due("klaviyo", now=T0) == 3
    assert await queue.oldest_due("klaviyo", now=T0 + 10) == 1  # due again
    await queue.dead_letter(1, reason="400", now=T0)
    assert await queue.oldest_due("klaviyo", now=T0) == 2
    assert await queue.oldest_due("nowhere", now=T0) is None


# --- dead letters ----------------------------------------------------------------------------


async def test_dead_letter_revive_purge(queue: Queue) -> None:
    await queue.enqueue([new_job("a"), new_job("b", destination="eu"), new_job("c")], now=T0)
    await claim_ids(queue)
    await queue.dead_letter(1, reason="400 invalid phone", now=T0 + 1)
    await queue.dead_letter(2, reason="404 no such list", now=T0 + 1)  # still pending: allowed
    dead = await queue.get(1)
    assert dead is not None
    assert (dead.state, dead.attempts, dead.last_error, dead.lease_expires_at) == (
        JobState.DEAD,
        1,
        "400 invalid phone",
        None,
    )

    assert await queue.revive([1, 3, 42], now=T0 + 5) == 1  # 3 is in flight, 42 does not exist
    revived = await queue.get(1)
    assert revived is not None
    assert (revived.state, revived.attempts, revived.next_attempt_at) == (JobState.PENDING, 0, T0 + 5)
    assert await claim_ids(queue, now=T0 + 5) == [1]

    await queue.add_dead([new_job("d"), new_job("e")], "bad event", now=T0)
    assert await queue.purge([2, 1]) == 1  # 1 is no longer dead
    assert await state_of(queue, 2) is None
    assert await queue.purge() == 2
    assert await queue.list_jobs(JobState.DEAD) == []


async def test_list_jobs_filters_and_pages(queue: Queue) -> None:
    await queue.add_dead(
        [new_job(f"m{i}", destination=("eu" if i % 2 else "klaviyo")) for i in range(6)], "x", now=T0
    )
    await queue.add_dead([new_job("late")], "429 too many", now=T0)
    ids = [j.id for j in await queue.list_jobs(JobState.DEAD, limit=3)]
    assert ids == [1, 2, 3]
    assert [j.id for j in await queue.list_jobs(JobState.DEAD, limit=3, after_id=3)] == [4, 5, 6]
    assert [j.id for j in await queue.list_jobs(JobState.DEAD, destination="eu")] == [2, 4, 6]
    assert [j.id for j in await queue.list_jobs(JobState.DEAD, reason_contains="429")] == [7]
    assert await queue.list_jobs(JobState.DEAD, reason_contains="too MANY") == []  # case-sensitive
    assert await queue.list_jobs(JobState.PENDING) == []


# --- archive replay: delivered jobs sent again -----------------------------------------------


async def delivered_at(queue: Queue, moments: list[float], **job: str) -> list[int]:
    """One job per moment, each claimed and acked at it; their ids."""
    ids: list[int] = []
    for i, moment in enumerate(moments):
        await queue.enqueue([new_job(f"d{len(ids)}-{i}-{moment}", **job)], now=T0)
        (claimed,) = await queue.claim(job.get("destination", "klaviyo"), 1, lease_seconds=LEASE, now=T0)
        await queue.ack([claimed.id], now=moment)
        ids.append(claimed.id)
    return ids


async def test_delivered_lists_done_jobs_by_when_they_were_acked(queue: Queue) -> None:
    """[since, until) on the time of the ack, by id, per destination or all, in pages; pending,
    in-flight and dead jobs are never listed."""
    early, on_since, inside, on_until = await delivered_at(queue, [T0 + 1, T0 + 10, T0 + 15, T0 + 20])
    (eu,) = await delivered_at(queue, [T0 + 12], destination="eu")
    await queue.enqueue([new_job("pending"), new_job("flying")], now=T0)
    await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0)
    await queue.add_dead([new_job("dead")], "bad", now=T0 + 12)
    assert await queue.delivered(since=T0 + 10, until=T0 + 20) == [on_since, inside, eu]
    assert await queue.delivered(since=T0 + 10, until=T0 + 20, destination="klaviyo") == [on_since, inside]
    assert await queue.delivered(since=T0 + 10, until=T0 + 21, limit=2) == [on_since, inside]
    assert await queue.delivered(since=T0 + 10, until=T0 + 21, after_id=inside) == [on_until, eu]
    assert await queue.delivered(since=T0, until=T0 + 1) == []
    assert early not in await queue.delivered(since=T0 + 2, until=T0 + 100)


async def test_resend_sends_done_jobs_back_in_their_place(queue: Queue) -> None:
    """Done → pending with attempts and error cleared, claimable in id order with what is pending;
    the row is otherwise kept (id, payload, created_at); other states and unknown ids are ignored."""
    await queue.enqueue([new_job("a", key="u1"), new_job("b", key="u1")], now=T0)
    await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0)
    await queue.retry(1, at=T0, error="503 busy", now=T0)  # a retried job later delivered
    await queue.ack(await claim_ids(queue, limit=1), now=T0 + 1)
    await queue.ack(await claim_ids(queue, limit=1, now=T0 + 1), now=T0 + 2)
    await queue.enqueue([new_job("c", key="u1")], now=T0 + 3)
    await queue.add_dead([new_job("dead")], "bad", now=T0 + 3)
    assert await queue.resend([1, 3, 4, 99], now=T0 + 5) == 1  # 3 is pending, 4 dead, 99 unknown
    again = await queue.get(1)
    assert again is not None
    assert (again.state, again.attempts, again.last_error, again.next_attempt_at, again.updated_at) == (
        JobState.PENDING,
        0,
        None,
        T0 + 5,
        T0 + 5,
    )
    assert (again.message_id, again.created_at, again.message()) == ("a", T0, {"messageId": "a"})
    assert await queue.delivered(since=T0, until=T0 + 10) == [2]
    # the key's jobs travel together, the one sent again (id 1) before the pending one (id 3)
    assert await claim_ids(queue, now=T0 + 5) == [1, 3]
    assert await queue.resend([1, 2], now=T0 + 6) == 1  # 1 is in flight again
    assert (await queue.counts())[JobState.DONE] == 0


# --- counts and cleanup ----------------------------------------------------------------------


async def test_counts(queue: Queue) -> None:
    assert await queue.counts() == dict.fromkeys(JobState, 0)
    await queue.enqueue([new_job(f"m{i}") for i in range(4)] + [new_job("eu", destination="eu")], now=T0)
    await queue.add_dead([new_job("bad")], "bad", now=T0)
    await claim_ids(queue, limit=2)
    await queue.ack([1], now=T0)
    expected = {JobState.PENDING: 3, JobState.IN_FLIGHT: 1, JobState.DONE: 1, JobState.DEAD: 1}
    assert await queue.counts() == expected
    assert await queue.counts("eu") == {**dict.fromkeys(JobState, 0), JobState.PENDING: 1}


@pytest.mark.parametrize("queue_options", [QueueOptions(retention=100)])
async def test_depth_counts_active_jobs_through_every_change(queue: Queue) -> None:
    """depth() (what backpressure samples) is the pending and in-flight jobs of every destination,
    whichever way a job enters or leaves those states."""

    async def depth_and_counted() -> tuple[int, int]:
        counts = await queue.counts()
        return await queue.depth(), counts[JobState.PENDING] + counts[JobState.IN_FLIGHT]

    assert await depth_and_counted() == (0, 0)
    await queue.enqueue([new_job(f"m{i}", key=f"u{i % 3}" if i % 2 else None) for i in range(9)], now=T0)
    await queue.enqueue([new_job("eu", destination="eu")], now=T0)
    await queue.add_dead([new_job("refused")], "bad input", now=T0)
    assert await depth_and_counted() == (10, 10)
    first, second, third, fourth, _held, *rest = await claim_ids(queue)
    await queue.ack([first, second], now=T0)
    await queue.retry(third, at=T0 + 5, error="503", now=T0)
    await queue.dead_letter(fourth, reason="400", now=T0)
    await queue.release(rest, now=T0)
    assert await depth_and_counted() == (7, 7)  # _held stays in flight
    assert await queue.revive([fourth, 11], now=T0) == 2
    assert await queue.resend([first], now=T0) == 1
    assert await depth_and_counted() == (10, 10)
    assert await queue.purge() == 0
    await queue.ack(
        await claim_ids(queue, now=T0 + LEASE + 10), now=T0 + LEASE + 10
    )  # _held: its lease ran out
    await queue.ack(await claim_ids(queue, now=T0 + LEASE + 10, destination="eu"), now=T0 + LEASE + 10)
    assert await depth_and_counted() == (0, 0)
    await queue.cleanup(now=T0 + 1000)
    assert await depth_and_counted() == (0, 0)
    assert await queue.counts() == dict.fromkeys(JobState, 0)


@pytest.mark.parametrize("queue_options", [QueueOptions(dedupe_window=100, retention=1000)])
async def test_cleanup_deletes_old_done_jobs_and_dedupe_entries(queue: Queue) -> None:
    await queue.enqueue([new_job("a"), new_job("b")], now=T0)
    await queue.add_dead([new_job("c")], "bad", now=T0)
    await claim_ids(queue, limit=1)
    await queue.ack([1], now=T0)
    assert await queue.cleanup(now=T0 + 99) == 0
    assert await queue.cleanup(now=T0 + 100) == 2  # the two dedupe entries
    assert await state_of(queue, 1) == JobState.DONE
    assert await queue.cleanup(now=T0 + 1000) == 1  # the done job
    assert [await state_of(queue, i) for i in (1, 2, 3)] == [None, JobState.PENDING, JobState.DEAD]


# --- concurrency -----------------------------------------------------------------------------


async def test_concurrent_enqueues_are_all_stored(queue: Queue) -> None:
    calls = 200
    results = await asyncio.gather(*(queue.enqueue([new_job(f"m{i}")], now=T0) for i in range(calls)))
    assert sum(r.inserted for r in results) == calls
    stored = await queue.list_jobs(JobState.PENDING, limit=calls + 1)
    assert sorted(j.message_id for j in stored) == sorted(f"m{i}" for i in range(calls))
    if isinstance(queue, SqliteQueue):
        assert queue.commits < calls  # group commit: many enqueues per transaction


async def test_enqueue_refuses_what_would_pass_max_depth(queue: Queue) -> None:
    """Past max_depth active jobs an enqueue stores nothing, its messageIds included; acks make room."""
    await queue.enqueue([new_job(f"a{i}") for i in range(3)], now=T0, max_depth=5)
    with pytest.raises(QueueFull, match=r"holds 3 jobs; 3 more would pass its limit of 5"):
        await queue.enqueue([new_job(f"b{i}") for i in range(3)], now=T0, max_depth=5)
    with pytest.raises(QueueFull):  # one batch larger than the limit, on an emptier queue too
        await queue.enqueue([new_job(f"c{i}") for i in range(9)], now=T0, max_depth=5)
    assert await queue.enqueue([new_job("b0"), new_job("b1")], now=T0, max_depth=5) == enqueued(2, 0)
    await queue.dead_letter(1, reason="400", now=T0)
    await queue.ack(await claim_ids(queue, limit=1), now=T0)  # in flight still counts until acked
    assert await queue.enqueue([new_job("b2"), new_job("b2")], now=T0, max_depth=5) == enqueued(1, 1)
    with pytest.raises(QueueFull):
        await queue.enqueue([new_job("b3")], now=T0, max_depth=4)
    stored = await queue.list_jobs(JobState.PENDING) + await queue.list_jobs(JobState.DONE)
    assert sorted(job.message_id for job in stored) == ["a1", "a2", "b0", "b1", "b2"]


async def test_concurrent_enqueues_never_pass_max_depth(queue: Queue) -> None:
    """40 batches of 100 at once on an empty queue with max_depth 500: five are stored, whole."""
    outcomes = await asyncio.gather(
        *(
            queue.enqueue([new_job(f"m{b}-{i}") for i in range(100)], now=T0, max_depth=500)
            for b in range(40)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(o, QueueFull) for o in outcomes) == 35
    assert [o for o in outcomes if isinstance(o, EnqueueResult)] == [enqueued(100, 0)] * 5
    assert (await queue.counts())[JobState.PENDING] == 500


async def test_concurrent_claims_never_share_a_job(queue: Queue) -> None:
    await queue.enqueue([new_job(f"m{i}", key=f"u{i % 40}") for i in range(100)], now=T0)
    batches = await asyncio.gather(*(claim_ids(queue, limit=7) for _ in range(10)))
    claimed = [job_id for batch in batches for job_id in batch]
    assert len(claimed) == len(set(claimed)) >= 40  # none twice
    for key in range(40):  # a key's claimed jobs are its earliest, never one skipped
        ids = [i for i in range(1, 101) if (i - 1) % 40 == key]
        mine = sorted(i for i in claimed if (i - 1) % 40 == key)
        assert mine == ids[: len(mine)]


async def test_ping(queue: Queue) -> None:
    await queue.ping()


# --- open_queue ------------------------------------------------------------------------------


def test_open_queue_picks_the_backend(tmp_path: Path) -> None:
    memory = open_queue("memory://", hot_key_threshold=5)
    assert isinstance(memory, MemoryQueue)
    assert memory.options == QueueOptions(hot_key_threshold=5)
    assert isinstance(open_queue(f"sqlite:///{tmp_path}/q.db"), SqliteQueue)
    with pytest.raises(ConfigError, match="unsupported"):
        open_queue("redis://localhost")
    with pytest.raises(TypeError):
        open_queue("memory://", no_such_option=1)


@pytest.mark.parametrize(
    ("url", "path"),
    [("sqlite:///data/q.db", "data/q.db"), ("sqlite:////var/lib/q.db", "/var/lib/q.db")],
)
def test_sqlite_path(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/q.db"])
def test_sqlite_path_rejects(url: str) -> None:
    with pytest.raises(ConfigError):
        sqlite_path(url)


# --- sqlite only -----------------------------------------------------------------------------


async def test_sqlite_group_commit_keeps_failures_apart(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db")
    await queue.open()
    try:

        def broken(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO queue_dedupe VALUES ('s', 'm', 1)")
            raise RuntimeError("operation failed half way")

        commits = queue.commits
        outcomes = await asyncio.gather(
            queue.enqueue([new_job("a")], now=T0),
            queue._writer.run(broken),
            queue.enqueue([new_job("b")], now=T0),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], RuntimeError)
        assert queue.commits == commits + 1
        assert [j.message_id for j in await queue.list_jobs(JobState.PENDING)] == ["a", "b"]
        # The failed operation's own writes were rolled back.
        assert await queue.enqueue([new_job("m", source="s")], now=T0) == enqueued(1, 0)
    finally:
        await queue.close()


async def test_sqlite_cleanup_deletes_in_chunks(tmp_path: Path) -> None:
    queue = SqliteQueue(
        tmp_path / "queue.db", QueueOptions(dedupe_window=100, retention=100), cleanup_batch=2
    )
    await queue.open()
    try:
        await queue.enqueue([new_job(f"m{i}") for i in range(5)], now=T0)
        await queue.ack(await claim_ids(queue), now=T0)
        commits = queue.commits
        assert await queue.cleanup(now=T0 + 100) == 10
        # 2 + 2 + 1 jobs, then 2 + 2 + 1 dedupe entries, then the count of their key, now idle
        assert queue.commits == commits + 7
        assert await queue.counts() == dict.fromkeys(JobState, 0)
    finally:
        await queue.close()


async def test_sqlite_deleted_jobs_take_their_payloads_along(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db", QueueOptions(retention=100))
    await queue.open()
    try:
        await queue.enqueue([new_job(f"m{i}") for i in range(4)], now=T0)
        first, second, *dead = await claim_ids(queue)
        await queue.ack([first, second], now=T0)
        for job_id in dead:
            await queue.dead_letter(job_id, reason="bad", now=T0)
        await queue.cleanup(now=T0 + 100)
        await queue.purge(dead[:1])
    finally:
        await queue.close()
    with sqlite3.connect(tmp_path / "queue.db") as conn:
        assert conn.execute("SELECT job_id FROM queue_payloads").fetchall() == [(dead[1],)]
    conn.close()


def active_counts(path: Path) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """(what queue_keys says, what the jobs say): active jobs per (destination, ordering key)."""
    with sqlite3.connect(path) as conn:
        kept = conn.execute("SELECT destination, ordering_key, active FROM queue_keys WHERE active > 0")
        counted = conn.execute(
            "SELECT destination, ordering_key, count(*) FROM queue_jobs"
            " WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL"
            " GROUP BY destination, ordering_key"
        )
        result = {(d, k): n for d, k, n in kept}, {(d, k): n for d, k, n in counted}
    conn.close()
    return result


async def test_sqlite_counts_active_jobs_per_key_through_every_change(tmp_path: Path) -> None:
    """queue_keys (what the hot-key check reads) follows every way a job enters or leaves the
    active states: enqueue (both paths), claim, ack, retry, dead letter, revive, release, purge,
    resend."""
    path = tmp_path / "queue.db"
    queue = SqliteQueue(path, QueueOptions(retention=100, dedupe_window=100))
    await queue.open()
    try:
        await queue.enqueue([new_job(f"m{i}", key=f"u{i % 3}") for i in range(9)], now=T0)
        await queue.enqueue([new_job("single", key="u0")], now=T0)  # a lone message: the row path
        await queue.enqueue([new_job("other", key="u0", destination="eu")], now=T0)
        await queue.add_dead([new_job("refused", key="u1")], "bad input", now=T0)
        assert active_counts(path) == ({("klaviyo", "u0"): 4, ("klaviyo", "u1"): 3, ("klaviyo", "u2"): 3,
                                        ("eu", "u0"): 1},) * 2  # fmt: skip
        first, second, third, fourth, *rest = await claim_ids(queue)
        await queue.ack([first, second], now=T0)
        await queue.retry(third, at=T0 + 5, error="503", now=T0)
        await queue.dead_letter(fourth, reason="400", now=T0)
        await queue.release(rest, now=T0)
        kept, counted = active_counts(path)
        assert kept == counted and sum(counted.values()) == 11 - 3
        assert await queue.revive([fourth], now=T0) == 1
        await queue.purge()
        assert await queue.resend([first], now=T0) == 1
        kept, counted = active_counts(path)
        assert kept == counted and sum(counted.values()) == 11 - 1
        await queue.ack(await claim_ids(queue, now=T0 + 10), now=T0 + 10)
        await queue.ack(await claim_ids(queue, now=T0 + 10, destination="eu"), now=T0 + 10)
        assert active_counts(path) == ({}, {})
        await queue.cleanup(now=T0 + 1000)
    finally:
        await queue.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM queue_keys").fetchone() == (0,)  # idle keys forgotten
    conn.close()


async def test_sqlite_counts_active_jobs_through_every_change(tmp_path: Path) -> None:
    """queue_depth (what an enqueue with max_depth reads) follows every way a job enters or leaves
    the active states, for jobs with and without an ordering key."""
    path = tmp_path / "queue.db"
    queue = SqliteQueue(path, QueueOptions(retention=100))
    await queue.open()

    def kept_and_counted() -> tuple[int, int]:
        with sqlite3.connect(path) as conn:
            kept = conn.execute("SELECT active FROM queue_depth").fetchone()[0]
            counted = conn.execute(
                "SELECT count(*) FROM queue_jobs WHERE state IN ('pending', 'in_flight')"
            ).fetchone()[0]
        conn.close()
        return kept, counted

    try:
        await queue.enqueue([new_job(f"m{i}", key=f"u{i % 3}" if i % 2 else None) for i in range(9)], now=T0)
        await queue.enqueue([new_job("single")], now=T0)
        await queue.add_dead([new_job("refused")], "bad input", now=T0)
        assert kept_and_counted() == (10, 10)
        first, second, third, fourth, *rest = await claim_ids(queue)
        await queue.ack([first, second], now=T0)
        await queue.retry(third, at=T0 + 5, error="503", now=T0)
        await queue.dead_letter(fourth, reason="400", now=T0)
        await queue.release(rest, now=T0)
        assert kept_and_counted() == (7, 7)
        assert await queue.revive([fourth, 11], now=T0) == 2
        assert kept_and_counted() == (9, 9)
        await queue.ack(await claim_ids(queue, now=T0 + 10), now=T0 + 10)
        await queue.cleanup(now=T0 + 1000)
        assert kept_and_counted() == (0, 0)
    finally:
        await queue.close()


async def test_sqlite_reports_a_write_only_after_the_wal_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits do not sync (synchronous = NORMAL); the sync thread fsyncs the WAL, and only then
    does the write return: an acknowledged event survives a power cut."""
    queue = SqliteQueue(tmp_path / "queue.db")
    await queue.open()
    synced = threading.Event()
    paths: list[str] = []
    real_fsync = sqlite_threads.fsync_file

    def held_fsync(path: str) -> None:
        paths.append(path)
        assert synced.wait(10)
        real_fsync(path)

    monkeypatch.setattr(sqlite_threads, "fsync_file", held_fsync)
    try:
        commits = queue.commits
        enqueue = asyncio.ensure_future(queue.enqueue([new_job("m1")], now=T0))
        await asyncio.sleep(0.2)
        assert queue.commits == commits + 1 and not enqueue.done()  # committed, not yet durable
        synced.set()
        assert await enqueue == EnqueueResult(inserted=1, duplicates=0)
        assert paths and all(path == f"{tmp_path / 'queue.db'}-wal" for path in paths)
    finally:
        synced.set()
        await queue.close()


async def test_sqlite_write_fails_when_the_wal_cannot_be_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the fsync fails, whether the write is durable is unknown: the caller is told it failed
    (ingest answers 503, and the client sends the events again)."""
    queue = SqliteQueue(tmp_path / "queue.db")
    await queue.open()

    def failing_fsync(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sqlite_threads, "fsync_file", failing_fsync)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            await queue.enqueue([new_job("m1")], now=T0)
    finally:
        monkeypatch.undo()
        await queue.close()


def wal_size(database: Path) -> int:
    return Path(f"{database}-wal").stat().st_size


async def test_sqlite_wal_is_checkpointed_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint thread copies the WAL into the database beside the writer, which never
    checkpoints: the WAL is started over, not grown, as data passes through it, even by a writer
    that never finds the checkpoints caught up (here once it holds 256 frames, 1 MiB; with a
    checkpoint after every commit)."""
    monkeypatch.setattr(sqlite_threads, "RESTART_FRAMES", 256)
    monkeypatch.setattr(sqlite_threads, "CHECKPOINT_PAUSE", 0)
    queue = SqliteQueue(tmp_path / "queue.db")
    await queue.open()
    payload = b'{"pad": "%s"}' % (b"x" * 4000)
    try:
        for call in range(200):  # ~8 MB, one commit per call
            jobs = [
                NewJob(
                    source="web",
                    destination="klaviyo",
                    message_id=f"m{call}-{i}",
                    ordering_key="u",
                    payload=payload,
                )
                for i in range(10)
            ]
            await queue.enqueue(jobs, now=T0)
        assert wal_size(tmp_path / "queue.db") < 6_000_000
    finally:
        await queue.close()


async def test_sqlite_writes_from_two_connections(tmp_path: Path) -> None:
    """Two queues on one file stand for two processes: claims stay disjoint."""
    first, second = SqliteQueue(tmp_path / "queue.db"), SqliteQueue(tmp_path / "queue.db")
    await first.open()
    await second.open()
    try:
        await asyncio.gather(
            first.enqueue([new_job(f"a{i}") for i in range(50)], now=T0),
            second.enqueue([new_job(f"b{i}") for i in range(50)], now=T0),
        )
        claims = await asyncio.gather(
            *(q.claim("klaviyo", 30, lease_seconds=LEASE, now=T0) for q in (first, second) * 2)
        )
        ids = [job.id for batch in claims for job in batch]
        assert sorted(ids) == list(range(1, 101))
    finally:
        await first.close()
        await second.close()


async def test_sqlite_migrations_run_once(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    for _ in range(2):
        queue = SqliteQueue(path)
        await queue.open()
        await queue.enqueue([new_job("a")], now=T0)
        await queue.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (7,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM queue_jobs").fetchone() == (1,)
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    newer = SqliteQueue(path)
    with pytest.raises(ConfigError, match="newer"):
        await newer.open()


async def test_sqlite_closed_queue_refuses_work(tmp_path: Path) -> None:
    queue = SqliteQueue(tmp_path / "queue.db")
    with pytest.raises(RuntimeError, match="not open"):
        await queue.enqueue([new_job("a")])
    await queue.open()
    await queue.close()
    with pytest.raises(RuntimeError, match="not open"):
        await queue.get(1)
    await queue.close()  # twice is fine


CHILD = """
import asyncio, sys
from router.queue import NewJob
from router.queue.sqlite import SqliteQueue

async def enqueue(queue, i):
    job = NewJob(source="s", destination="d", message_id=f"m{i}", ordering_key=None, payload=b"{}")
    await queue.enqueue([job])
    sys.stdout.write(f"m{i}\\n")
    sys.stdout.flush()

async def main():
    queue = SqliteQueue(sys.argv[1])
    await queue.open()
    for start in range(0, 10**9, 16):
        await asyncio.gather(*(enqueue(queue, i) for i in range(start, start + 16)))

asyncio.run(main())
"""


def test_sqlite_sigkill_keeps_every_acknowledged_job(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        acknowledged = [child.stdout.readline() for _ in range(300)]
        child.send_signal(signal.SIGKILL)
        acknowledged += child.stdout.readlines()
        stderr = child.stderr.read()
    assert child.returncode == -signal.SIGKILL, stderr
    message_ids = {line.strip() for line in acknowledged if line.endswith("\n")}
    assert len(message_ids) >= 300, stderr

    async def stored() -> set[str]:
        queue = SqliteQueue(path)
        await queue.open()
        try:
            return {job.message_id for job in await queue.list_jobs(JobState.PENDING, limit=10**6)}
        finally:
            await queue.close()

    assert message_ids <= asyncio.run(stored())


# --- the SQL file loader ---------------------------------------------------------------------


def test_sql_sections() -> None:
    queries = sql.load("sqlite")
    assert queries["ping"] == "SELECT 1;"
    assert [number for number, _ in sql.migrations(queries)] == [1, 2, 3, 4, 5, 6, 7]


async def test_sqlite_version_1_file_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    version_1 = dict(sql.migrations(sql.load("sqlite")))[1]
    with sqlite3.connect(path) as conn:
        conn.executescript(version_1)
        conn.execute(
            "INSERT INTO queue_jobs (source, destination, message_id, ordering_key, payload, state,"
            " attempts, next_attempt_at, created_at, updated_at)"
            " VALUES ('web', 'klaviyo', 'm1', 'u', x'7b7d', 'pending', 0, ?, ?, ?)",
            (T0, T0, T0),
        )
    conn.close()
    queue = SqliteQueue(path)
    await queue.open()
    try:
        [job] = await queue.claim("klaviyo", 10, lease_seconds=60, now=T0)
        assert (job.id, job.message_id, job.payload, job.progress) == (1, "m1", b"{}", 0)
        await queue.enqueue([new_job("m2")], now=T0)
        assert [j.id for j in await queue.claim("klaviyo", 10, lease_seconds=60, now=T0)] == [2]
    finally:
        await queue.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (7,)
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"queue_jobs_retrying", "queue_jobs_pending", "queue_jobs_in_flight"} <= names
        assert not names & {"queue_jobs_active", "queue_jobs_active_key"}
        columns = {row[1] for row in conn.execute("PRAGMA table_info(queue_jobs)")}
        assert "payload" not in columns
    conn.close()
    assert active_counts(path) == ({("klaviyo", "u"): 1},) * 2  # m1 in flight, counted by migration 4


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("SELECT 1;\n-- name: a\n-- A.\nSELECT 1;\n", "only comments"),
        ("-- name: a\n--\nSELECT 1;\n", "description"),
        ("-- name: a\n-- A.\nSELECT 1;\n-- name: a\n-- A.\nSELECT 2;\n", "twice"),
    ],
)
def test_sql_file_mistakes(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        sql.parse(text)


def test_open_queue_picks_postgresql_and_reads_its_pool_size() -> None:
    for scheme in ("postgresql", "postgres"):
        queue = open_queue(f"{scheme}://router:secret@db.example:5433/router?pool_size=3", retention=9)
        assert isinstance(queue, PostgresQueue)
        assert queue.options == QueueOptions(retention=9)
        assert queue.where == "db.example:5433/router"  # what messages name: never the password
    with pytest.raises(ConfigError, match="pool_size must be a whole number of at least 2, not 'x'"):
        open_queue("postgresql://127.0.0.1/router?pool_size=x")


async def test_extend_keeps_a_job_leased(queue: Queue) -> None:
    await queue.enqueue([new_job("a")], now=T0)
    assert await claim_ids(queue) == [1]
    await queue.extend([1], lease_seconds=LEASE, now=T0 + LEASE - 1)
    assert await claim_ids(queue, now=T0 + LEASE) == []  # the old lease would have run out here
    assert await claim_ids(queue, now=T0 + 2 * LEASE - 1) == [1]  # the renewed lease ran out
    await queue.ack([1], now=T0 + 2 * LEASE)
    await queue.extend([1], lease_seconds=LEASE, now=T0 + 2 * LEASE)  # done: nothing happens
    job = await queue.get(1)
    assert job is not None and (job.state, job.lease_expires_at) == (JobState.DONE, None)
