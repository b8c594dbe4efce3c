"""What only the PostgreSQL queue promises: several processes on one database (each stood for by a
queue with its own connection pool), migrations when they start at once, group commit, text that
PostgreSQL cannot hold, and connection loss (server processes terminated, or a proxy cut)."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from postgres_server import (
    CuttableProxy,
    empty_tables,
    terminate_connections,
)
from test_queue_contract import LEASE, T0, claim_ids, enqueued, new_job

from router.errors import ConfigError
from router.queue import JobState, NewJob, QueueOptions, QueueUnavailable
from router.queue.postgres import COMPONENT, QUERIES, PostgresQueue

pytestmark = pytest.mark.postgres


@pytest.fixture
async def url(postgres_url: str) -> str:
    """The session's database, its queue tables empty (the schema made by a first open)."""
    queue = PostgresQueue(postgres_url)
    await queue.open()
    await queue.close()
    await empty_tables(postgres_url)
    return postgres_url


async def opened(url: str, **options: float) -> PostgresQueue:
    queue = PostgresQueue(url, **options)  # type: ignore[arg-type]
    await queue.open()
    return queue


# --- several processes -----------------------------------------------------------------------


async def test_claims_of_several_processes_never_share_a_job_and_keep_each_key_in_order(url: str) -> None:
    queues = [await opened(url) for _ in range(3)]
    try:
        await queues[0].enqueue([new_job(f"m{i}", key=f"u{i % 30}") for i in range(300)], now=T0)
        claims = await asyncio.gather(
            *(q.claim("klaviyo", 9, lease_seconds=LEASE, now=T0) for q in queues * 4)
        )
        claimed = [job.id for batch in claims for job in batch]
        assert len(claimed) == len(set(claimed)) >= 30
        for key in range(30):  # each key's claimed jobs are its earliest, none skipped
            ids = [i for i in range(1, 301) if (i - 1) % 30 == key]
            mine = sorted(i for i in claimed if (i - 1) % 30 == key)
            assert mine == ids[: len(mine)]
        # a key whose jobs another process holds stays blocked for everyone
        assert await claim_ids(queues[1], limit=1000) == []
    finally:
        for queue in queues:
            await queue.close()


async def test_one_message_sent_to_several_processes_at_once_is_stored_once(url: str) -> None:
    queues = [await opened(url) for _ in range(3)]
    try:
        batch = [new_job(f"m{i}") for i in range(200)]
        results = await asyncio.gather(*(q.enqueue(batch, now=T0) for q in queues for _ in range(3)))
        assert sum(r.inserted for r in results) == 200
        assert sum(r.duplicates for r in results) == 200 * 8
        stored = await queues[0].list_jobs(JobState.PENDING, limit=1000)
        assert sorted(j.message_id for j in stored) == sorted(f"m{i}" for i in range(200))
    finally:
        for queue in queues:
            await queue.close()


async def test_an_expired_lease_of_a_dead_process_is_claimed_by_another(url: str) -> None:
    first, second = await opened(url), await opened(url)
    try:
        await first.enqueue([new_job("a", key="u"), new_job("b", key="u")], now=T0)
        assert await claim_ids(first, limit=1) == [1]
        await first.close()  # the process dies holding job 1
        assert await claim_ids(second, now=T0 + LEASE - 1) == []
        assert await claim_ids(second, now=T0 + LEASE) == [1, 2]
    finally:
        await second.close()


# --- migrations ------------------------------------------------------------------------------


async def test_processes_starting_at_once_migrate_once(fresh_postgres_url: str) -> None:
    queues = [PostgresQueue(fresh_postgres_url) for _ in range(4)]
    await asyncio.gather(*(queue.open() for queue in queues))
    try:
        assert await queues[3].enqueue([new_job("a")], now=T0) == enqueued(1, 0)
    finally:
        for queue in queues:
            await queue.close()
    conn = await asyncpg.connect(fresh_postgres_url)
    try:
        version = await conn.fetchval("SELECT version FROM schema_versions WHERE component = $1", COMPONENT)
        assert version == 5
        await conn.execute("UPDATE schema_versions SET version = 99 WHERE component = $1", COMPONENT)
    finally:
        await conn.close()
    with pytest.raises(ConfigError, match="newer"):
        await PostgresQueue(fresh_postgres_url).open()


# --- group commit and text -------------------------------------------------------------------


async def test_concurrent_enqueues_share_transactions_and_one_bad_call_fails_alone(url: str) -> None:
    queue = await opened(url)
    try:
        commits = queue.commits
        bad = NewJob(
            source="web\x00", destination="klaviyo", message_id="x", ordering_key=None, payload=b"{}"
        )
        outcomes = await asyncio.gather(
            *(queue.enqueue([new_job(f"m{i}")], now=T0) for i in range(100)),
            queue.enqueue([bad], now=T0),
            queue.add_dead([new_job("refused")], "bad input", now=T0),
            return_exceptions=True,
        )
        assert isinstance(outcomes[100], asyncpg.PostgresError)
        assert outcomes[:100] == [enqueued(1, 0)] * 100 and outcomes[101] is None
        assert queue.commits - commits < 50
        assert len(await queue.list_jobs(JobState.PENDING, limit=1000)) == 100
        assert [j.message_id for j in await queue.list_jobs(JobState.DEAD)] == ["refused"]
    finally:
        await queue.close()


@pytest.mark.parametrize("text", ["a\x00b", "\ufffe", '\ufffe"a"'])
async def test_text_postgresql_cannot_hold_is_kept_exactly(url: str, text: str) -> None:
    queue = await opened(url)
    try:
        jobs = [new_job(text, key=text), new_job(f"{text}-2", key=text)]
        assert await queue.enqueue(jobs, now=T0) == enqueued(2, 0)
        assert await queue.enqueue([new_job(text)], now=T0) == enqueued(0, 1)
        lookalike = "\ufffe" + json.dumps(text)  # how it is stored: another message all the same
        assert await queue.enqueue([new_job(lookalike)], now=T0) == enqueued(1, 0)
        claimed = await queue.claim("klaviyo", 10, lease_seconds=LEASE, now=T0)
        assert [(j.message_id, j.ordering_key) for j in claimed[:2]] == [(text, text), (f"{text}-2", text)]
        await queue.dead_letter(claimed[0].id, reason=f"bad {text}", now=T0)
        [dead] = await queue.list_jobs(JobState.DEAD, reason_contains="bad")
        assert dead.message_id == text and dead.last_error == f"bad {text}".replace("\x00", "\ufffd")
    finally:
        await queue.close()


# --- connection loss -------------------------------------------------------------------------


async def test_terminated_server_processes_are_replaced_without_failing_a_call(url: str) -> None:
    queue = await opened(url, patience=5.0)
    try:
        await queue.enqueue([new_job("a"), new_job("b")], now=T0)
        for round_ in range(3):
            assert await terminate_connections(url) >= 1
            assert await queue.enqueue([new_job(f"m{round_}")], now=T0) == enqueued(1, 0)
            assert await terminate_connections(url) >= 1
            [job] = await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0)
            assert await terminate_connections(url) >= 1
            await queue.ack([job.id], now=T0)
            assert await terminate_connections(url) >= 1
            await queue.ping()
        assert (await queue.counts())[JobState.DONE] == 3
    finally:
        await queue.close()


async def test_a_cut_connection_makes_calls_fail_clearly_then_heal(url: str) -> None:
    host, port = "127.0.0.1", 5432
    proxy = CuttableProxy(host, port)
    await proxy.start()
    queue = await opened(proxy.url(url), patience=10.0, connect_timeout=1.0)
    try:
        await queue.enqueue([new_job("a")], now=T0)
        [job] = await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0)
        proxy.sever()
        with pytest.raises(
            QueueUnavailable, match=rf"PostgreSQL at 127\.0\.0\.1:{proxy.port}/\S+ unreachable"
        ):
            await queue.enqueue([new_job("b")], now=T0)
        with pytest.raises(QueueUnavailable):
            await queue.ping()
        with pytest.raises(QueueUnavailable):
            await queue.claim("klaviyo", 1, lease_seconds=LEASE, now=T0)
        # settling keeps trying while the database is away, and succeeds once it is back
        acking = asyncio.ensure_future(queue.ack([job.id], now=T0))
        await asyncio.sleep(0.3)
        assert not acking.done()
        proxy.restore()
        await acking
        assert await queue.enqueue([new_job("b")], now=T0) == enqueued(1, 0)
        assert await state_of(queue, job.id) == JobState.DONE
    finally:
        await queue.close()
        await proxy.stop()


async def state_of(queue: PostgresQueue, job_id: int) -> JobState | None:
    job = await queue.get(job_id)
    return job.state if job else None


async def test_an_unreachable_server_fails_open_clearly() -> None:
    proxy = CuttableProxy("127.0.0.1", 5432)
    await proxy.start()
    proxy.sever()
    try:
        queue = PostgresQueue(proxy.url("postgresql://postgres@127.0.0.1/postgres"), connect_timeout=1.0)
        with pytest.raises(QueueUnavailable, match="unreachable"):
            await queue.open()
    finally:
        await proxy.stop()


# --- the cluster's Klaviyo send budgets ------------------------------------------------------


async def test_send_reservations_of_several_processes_keep_both_limits(url: str) -> None:
    queues = [await opened(url) for _ in range(3)]
    try:
        # 3 a second: twelve sends take three seconds, never four in one
        await asyncio.gather(*(q.reserve_send("klaviyo/bulk_create_events", 3, 100, 0.0) for q in queues * 4))
        conn = await asyncpg.connect(url)
        try:
            times = sorted(await conn.fetchval("SELECT array_agg(at) FROM ratelimit_slots"))
        finally:
            await conn.close()
        assert len(times) == 12
        assert all(times[k] - times[k - 3] >= 1.0 for k in range(3, 12))
        assert times[-1] - times[0] < 3.5
        # 4 a minute: the fifth and sixth wait a minute
        delays = sorted(
            await asyncio.gather(*(q.reserve_send("klaviyo/create_event", 10, 4, 0.0) for q in queues * 2))
        )
        assert delays[3] < 1.0 and 59.0 < delays[4] <= delays[5] < 60.5
        # another bucket is not held up, and a block holds every process back
        assert await queues[0].reserve_send("klaviyo/get_lists", 3, 7, 0.0) == 0.0
        await queues[1].block_sends("klaviyo/get_lists", 5.0)
        assert 4.0 < await queues[2].sends_blocked_for("klaviyo/get_lists") <= 5.0
        assert 4.0 < await queues[2].reserve_send("klaviyo/get_lists", 3, 7, 0.0) <= 5.0
        assert await queues[2].sends_blocked_for("klaviyo/other") == 0.0
    finally:
        for queue in queues:
            await queue.close()


async def test_claims_keep_per_key_order_when_a_row_is_locked_elsewhere(url: str) -> None:
    """A claim skips a row another transaction holds, and the later jobs of its key with it."""
    queue = await opened(url)
    conn = await asyncpg.connect(url)
    try:
        await queue.enqueue([new_job("u1", key="u"), new_job("u2", key="u"), new_job("v1", key="v")], now=T0)
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM queue_jobs WHERE id = 1 FOR UPDATE")
            assert await claim_ids(queue) == [3]
        assert await claim_ids(queue) == [1, 2]
    finally:
        await conn.close()
        await queue.close()


@pytest.mark.parametrize("queue_options", [QueueOptions(hot_key_threshold=2)])
async def test_hot_key_escape_holds_across_processes(url: str, queue_options: QueueOptions) -> None:
    first, second = PostgresQueue(url, queue_options), PostgresQueue(url, queue_options)
    await first.open()
    await second.open()
    try:
        await first.enqueue([new_job(f"u{i}", key="u") for i in range(2)], now=T0)
        assert await claim_ids(first, limit=1) == [1]
        assert await claim_ids(second) == []  # 2 waiting for "u": ordered
        await second.enqueue([new_job("u2", key="u")], now=T0)
        assert await claim_ids(second) == [
            2,
            3,
        ]  # 3 waiting > 2: the other process's lease no longer holds them
    finally:
        await first.close()
        await second.close()


async def kept_and_counted(url: str) -> tuple[tuple[int, dict[str, int]], tuple[int, dict[str, int]]]:
    """(what queue_depth and queue_keys say, what the jobs say): active jobs, and per ordering key."""
    conn = await asyncpg.connect(url)
    try:
        depth = await conn.fetchval("SELECT sum(active) FROM queue_depth")
        keys = dict(await conn.fetch("SELECT ordering_key, active FROM queue_keys WHERE active <> 0"))
        active = "state IN ('pending', 'in_flight')"
        counted = await conn.fetchval(f"SELECT count(*) FROM queue_jobs WHERE {active}")
        per_key = dict(
            await conn.fetch(
                f"SELECT ordering_key, count(*) FROM queue_jobs WHERE {active} AND ordering_key IS NOT NULL"
                " GROUP BY ordering_key"
            )
        )
    finally:
        await conn.close()
    return (depth, keys), (counted, per_key)


async def test_max_depth_holds_across_processes_and_the_counts_follow_every_change(url: str) -> None:
    queues = [await opened(url) for _ in range(3)]
    try:
        batches = [[new_job(f"{n}-{i}", key=f"u{i % 7}") for i in range(100)] for n in range(12)]
        results = await asyncio.gather(
            *(queues[n % 3].enqueue(batch, now=T0, max_depth=450) for n, batch in enumerate(batches)),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["EnqueueResult"] * 4 + ["QueueFull"] * 8
        kept, counted = await kept_and_counted(url)
        assert kept == counted and kept[0] == 400
        # every way a job enters or leaves the active states, from several processes
        first, second, *rest = await claim_ids(queues[0], limit=50)
        await queues[1].ack([first], now=T0)
        await queues[2].retry(second, at=T0 + 5, error="503", now=T0)
        await queues[0].dead_letter(rest[0], reason="400", now=T0)
        await queues[1].release(rest[1:], now=T0)
        assert await queues[2].revive([rest[0]], now=T0) == 1
        assert await queues[0].resend([first], now=T0) == 1
        await queues[1].add_dead([new_job("refused", key="u1")], "bad input", now=T0)
        await queues[2].purge()
        kept, counted = await kept_and_counted(url)
        assert kept == counted and kept[0] == 400
        await queues[0].ack(await claim_ids(queues[0], now=T0 + 10, limit=1000), now=T0 + 10)
        kept, counted = await kept_and_counted(url)
        assert kept == counted and kept[0] < 400
        assert await queues[1].enqueue([new_job("late")], now=T0, max_depth=kept[0] + 1) == enqueued(1, 0)
    finally:
        for queue in queues:
            await queue.close()


# --- cleanup beside everything else -------------------------------------------------------------


async def test_cleanups_of_several_processes_at_once_delete_each_row_once(url: str) -> None:
    """Every node runs the cleanup: at once, in small chunks, they share the rows and none fails."""
    options = QueueOptions(retention=100, dedupe_window=100)
    queues = [PostgresQueue(url, options, cleanup_batch=50) for _ in range(3)]
    for queue in queues:
        await queue.open()
    try:
        await queues[0].enqueue([new_job(f"m{i}", key=f"u{i % 40}") for i in range(1200)], now=T0)
        while ids := await claim_ids(queues[0], limit=1000):
            await queues[0].ack(ids, now=T0)
        deleted = await asyncio.gather(*(queue.cleanup(now=T0 + 100) for queue in queues))
        assert sum(deleted) == 2400  # 1200 done jobs and 1200 dedupe entries, each deleted once
        assert await queues[1].counts() == dict.fromkeys(JobState, 0)
        conn = await asyncpg.connect(url)
        try:
            left = await conn.fetchval(
                "SELECT (SELECT count(*) FROM queue_dedupe) + (SELECT count(*) FROM queue_keys)"
            )
        finally:
            await conn.close()
        assert left == 0
    finally:
        for queue in queues:
            await queue.close()


async def test_cleanup_skips_rows_another_transaction_is_changing(url: str) -> None:
    """While a resend, an enqueue accepting an old messageId again and an enqueue counting a job of
    an idle key are still open, a cleanup deletes none of their rows (nor waits for them): a DELETE
    that waited would then delete the rows it chose, the resent job, the fresh dedupe entry and the
    key's new count with them."""
    queue = PostgresQueue(url, QueueOptions(retention=100, dedupe_window=100))
    await queue.open()
    conn = await asyncpg.connect(url)
    try:
        await queue.enqueue([new_job("old", key="u1")], now=T0)
        [job_id] = await claim_ids(queue)
        await queue.ack([job_id], now=T0)  # a done job, its dedupe entry and the idle key u1, all old
        later = T0 + 500
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(QUERIES["resend_jobs"], [job_id], later)
        await conn.fetch(QUERIES["see_messages"], ["web"], ["old"], [later], 100.0)
        columns = (["web"], ["klaviyo"], ["new"], ["u1"], [b"{}"], ["pending"], [later], [None])
        await conn.execute(QUERIES["insert_jobs"], *columns)
        cleaning = asyncio.create_task(queue.cleanup(now=later))
        await asyncio.sleep(0.5)
        assert cleaning.done(), "the cleanup waited for another transaction's rows"
        await transaction.commit()
        deleted = await cleaning
        resent = await queue.get(job_id)
        assert resent is not None and resent.state == JobState.PENDING
        assert await queue.enqueue([new_job("old")], now=later + 1) == enqueued(0, 1)  # still deduped
        assert await conn.fetchval("SELECT active FROM queue_keys WHERE ordering_key = 'u1'") == 2
        assert deleted == 0
    finally:
        await conn.close()
        await queue.close()
