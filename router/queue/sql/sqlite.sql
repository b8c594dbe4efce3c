-- Queries of the SQLite queue backend (router/queue/sqlite.py).
-- Times are Unix seconds (REAL). The schema version is PRAGMA user_version: each migrate_<n>
-- section ends by setting it to n, and runs in the same transaction as the version check.
-- "Active" jobs are those pending or in flight; the partial indexes cover only them.

-- name: migrate_1
-- Create the jobs table, the dedupe table and their indexes.
CREATE TABLE queue_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    message_id TEXT NOT NULL,
    ordering_key TEXT,
    payload BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'in_flight', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_expires_at REAL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX queue_jobs_active ON queue_jobs (destination, id)
    WHERE state IN ('pending', 'in_flight');
CREATE INDEX queue_jobs_active_key ON queue_jobs (destination, ordering_key, id)
    WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL;
CREATE INDEX queue_jobs_state ON queue_jobs (state, id);
CREATE INDEX queue_jobs_done ON queue_jobs (updated_at) WHERE state = 'done';
CREATE TABLE queue_dedupe (
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
CREATE INDEX queue_dedupe_seen ON queue_dedupe (seen_at);
PRAGMA user_version = 1;

-- name: migrate_2
-- Jobs waiting for a retry, so a claim finds the keys they block without scanning the backlog.
-- Only retry_job sets a future next_attempt_at, and it always counts an attempt: new jobs
-- (attempts = 0) never enter this index, which stays as small as the set of retrying jobs.
CREATE INDEX queue_jobs_retrying ON queue_jobs (destination, next_attempt_at)
    WHERE state = 'pending' AND attempts > 0;
PRAGMA user_version = 2;

-- name: migrate_3
-- Payloads move to a table of their own. A claim, an ack or a retry rewrites the job's whole row:
-- with the payload (a couple of KB) inside it, every state change rewrote a page or more per job.
CREATE TABLE queue_payloads (
    job_id INTEGER PRIMARY KEY,
    payload BLOB NOT NULL
);
INSERT INTO queue_payloads (job_id, payload) SELECT id, payload FROM queue_jobs;
ALTER TABLE queue_jobs DROP COLUMN payload;
CREATE TRIGGER queue_jobs_delete_payload AFTER DELETE ON queue_jobs BEGIN
    DELETE FROM queue_payloads WHERE job_id = old.id;
END;
PRAGMA user_version = 3;

-- name: migrate_4
-- Active jobs counted per ordering key, for the hot-key check of claims, instead of an index.
-- The index of active jobs by (destination, ordering_key, id) served only that check, and every
-- enqueue paid for it with one insert at a random place per job (ordering keys are user ids): a
-- quarter of the enqueue cost. queue_keys holds one small row per key with active jobs, kept by
-- triggers on every way a job enters or leaves the active states (pending, in_flight).
CREATE TABLE queue_keys (
    destination TEXT NOT NULL,
    ordering_key TEXT NOT NULL,
    active INTEGER NOT NULL,
    PRIMARY KEY (destination, ordering_key)
) WITHOUT ROWID;
INSERT INTO queue_keys (destination, ordering_key, active)
SELECT destination, ordering_key, count(*) FROM queue_jobs
WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
GROUP BY destination, ordering_key;
CREATE TRIGGER queue_keys_job_added AFTER INSERT ON queue_jobs
WHEN new.state IN ('pending', 'in_flight') AND new.ordering_key IS NOT NULL
BEGIN
    INSERT INTO queue_keys (destination, ordering_key, active)
    VALUES (new.destination, new.ordering_key, 1)
    ON CONFLICT (destination, ordering_key) DO UPDATE SET active = active + 1;
END;
CREATE TRIGGER queue_keys_job_moved AFTER UPDATE OF state ON queue_jobs
WHEN new.ordering_key IS NOT NULL
    AND (old.state IN ('pending', 'in_flight')) <> (new.state IN ('pending', 'in_flight'))
BEGIN
    INSERT INTO queue_keys (destination, ordering_key, active)
    VALUES (new.destination, new.ordering_key, iif(new.state IN ('pending', 'in_flight'), 1, -1))
    ON CONFLICT (destination, ordering_key) DO UPDATE SET active = active + excluded.active;
END;
CREATE TRIGGER queue_keys_job_deleted AFTER DELETE ON queue_jobs
WHEN old.state IN ('pending', 'in_flight') AND old.ordering_key IS NOT NULL
BEGIN
    UPDATE queue_keys SET active = active - 1
    WHERE destination = old.destination AND ordering_key = old.ordering_key;
END;
DROP INDEX queue_jobs_active_key;
PRAGMA user_version = 4;

-- name: migrate_5
-- Pending and in-flight jobs indexed apart, each index holding what a claim reads of them. A claim
-- scanned the index of all active jobs in id order, visiting the table for each entry to learn its
-- state, due time and key, and stepped over every in-flight job on the way; the blocking keys came
-- from the state index, again through the table. Now both are index-only scans (the state column
-- rides along so that SQLite sees the indexes as covering), and expired leases are released to
-- pending first (release_expired_leases), so a claim scans pending jobs only.
CREATE INDEX queue_jobs_pending ON queue_jobs (destination, id, next_attempt_at, ordering_key, state)
    WHERE state = 'pending';
CREATE INDEX queue_jobs_in_flight ON queue_jobs (destination, ordering_key, id, lease_expires_at, state)
    WHERE state = 'in_flight';
DROP INDEX queue_jobs_active;
PRAGMA user_version = 5;

-- name: migrate_6
-- Active jobs (pending or in flight) counted in one row, kept by triggers on every way a job
-- enters or leaves the active states, so that an enqueue with a max_depth refuses what would take
-- the queue past it in the same transaction that stores (a count(*) would read every active job).
CREATE TABLE queue_depth (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active INTEGER NOT NULL
);
INSERT INTO queue_depth (id, active)
SELECT 1, count(*) FROM queue_jobs WHERE state IN ('pending', 'in_flight');
CREATE TRIGGER queue_depth_job_added AFTER INSERT ON queue_jobs
WHEN new.state IN ('pending', 'in_flight')
BEGIN
    UPDATE queue_depth SET active = active + 1 WHERE id = 1;
END;
CREATE TRIGGER queue_depth_job_moved AFTER UPDATE OF state ON queue_jobs
WHEN (old.state IN ('pending', 'in_flight')) <> (new.state IN ('pending', 'in_flight'))
BEGIN
    UPDATE queue_depth SET active = active + iif(new.state IN ('pending', 'in_flight'), 1, -1)
    WHERE id = 1;
END;
CREATE TRIGGER queue_depth_job_deleted AFTER DELETE ON queue_jobs
WHEN old.state IN ('pending', 'in_flight')
BEGIN
    UPDATE queue_depth SET active = active - 1 WHERE id = 1;
END;
PRAGMA user_version = 6;

-- name: migrate_7
-- What delivery already achieved for each job (Job.progress: bits of the request kinds Klaviyo
-- accepted), so a retry sends only the rest.
ALTER TABLE queue_jobs ADD COLUMN progress INTEGER NOT NULL DEFAULT 0;
PRAGMA user_version = 7;

-- name: configure_writer
-- Write-ahead log. The WAL is not synced inside COMMIT (NORMAL): the writer's sync thread fsyncs
-- it after each commit and only then reports the group's writes done, so a returned write still
-- survives a power cut, and the next group's statements run while the disk syncs the last one's.
-- The writer does not checkpoint after its commits (copying the WAL into the database file and
-- syncing that, a quarter of a large group's time): the checkpoint thread does, beside it
-- (router/queue/sqlite_threads.py, Checkpointer). A cache of 16 MiB holds a whole group's changed
-- pages (a 4 MB group and its index pages), which the default 2 MiB spilled into the WAL before
-- the commit.
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA wal_autocheckpoint = 0;
PRAGMA cache_size = -16384;

-- name: configure_checkpointer
-- The checkpoint thread's connection: it syncs the WAL before a checkpoint and the database
-- file after one (NORMAL), and never writes rows.
PRAGMA synchronous = NORMAL;

-- name: checkpoint
-- Copy what the WAL holds into the database file (PASSIVE: it neither waits for nor blocks
-- anyone); returns (busy, frames in the WAL, frames copied).
PRAGMA wal_checkpoint(PASSIVE);

-- name: configure_reader
-- The read connection never writes.
PRAGMA query_only = ON;

-- name: begin
-- Start a write transaction, taking the write lock now (waits up to the busy timeout).
BEGIN IMMEDIATE;

-- name: commit
-- Make the transaction durable.
COMMIT;

-- name: rollback
-- Abandon the transaction.
ROLLBACK;

-- name: savepoint
-- Isolate one operation of a group commit.
SAVEPOINT operation;

-- name: release_savepoint
-- Keep the operation's changes in the transaction.
RELEASE operation;

-- name: rollback_to_savepoint
-- Undo the operation's changes, keeping the rest of the transaction.
ROLLBACK TO operation;

-- name: schema_version
-- The version of the schema in this file (0 when empty).
PRAGMA user_version;

-- name: ping
-- Cheapest round trip through the database.
SELECT 1;

-- name: active_jobs
-- Jobs pending or in flight, of every destination (kept by the queue_depth triggers).
SELECT active FROM queue_depth WHERE id = 1;

-- name: see_message
-- Record (source, message_id) as accepted now; returns a row unless it was seen after :cutoff.
INSERT INTO queue_dedupe (source, message_id, seen_at) VALUES (:source, :message_id, :now)
ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at
    WHERE queue_dedupe.seen_at <= :cutoff
RETURNING seen_at;

-- name: see_messages
-- Record every pair of :messages (a JSON array of [source, message_id]) as accepted now, in one
-- statement. A pair seen after :cutoff, or repeating an earlier pair of the array, is a duplicate
-- and is not recorded: the statement's change count falls short of the array's length.
INSERT INTO queue_dedupe (source, message_id, seen_at)
SELECT value ->> 0, value ->> 1, :now FROM json_each(:messages) WHERE true
ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at
    WHERE queue_dedupe.seen_at <= :cutoff;

-- name: insert_pending_payloads
-- The payloads of the jobs insert_pending_jobs stores next, in one statement: :jobs is a JSON
-- array of [source, destination, message_id, ordering_key, payload_bytes] and :payloads holds
-- the payloads one after the other. Job i of the array gets the id after the last one ever
-- given (AUTOINCREMENT) plus i, here and in insert_pending_jobs, which runs right after. The
-- window already yields the rows by key: an ORDER BY here would sort them again, payloads and
-- all, through a temporary b-tree (it made this statement take twice as long).
INSERT INTO queue_payloads (job_id, payload)
SELECT
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'queue_jobs'), 0) + 1 + key,
    substr(:payloads, payload_end - payload_bytes + 1, payload_bytes)
FROM (
    SELECT key, value ->> 4 AS payload_bytes,
        sum(value ->> 4) OVER (ORDER BY key ROWS UNBOUNDED PRECEDING) AS payload_end
    FROM json_each(:jobs)
);

-- name: insert_pending_jobs
-- Store the jobs of insert_pending_payloads as pending, due now, in one statement, with the ids
-- their payloads got.
INSERT INTO queue_jobs (
    id, source, destination, message_id, ordering_key, state,
    next_attempt_at, last_error, created_at, updated_at
)
SELECT
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'queue_jobs'), 0) + 1 + key,
    value ->> 0, value ->> 1, value ->> 2, value ->> 3, 'pending', :now, NULL, :now, :now
FROM json_each(:jobs)
ORDER BY key;

-- name: insert_job
-- Store one job in the given state, due now (parameters in this order); insert_payload follows.
INSERT INTO queue_jobs (
    source, destination, message_id, ordering_key, state,
    next_attempt_at, last_error, created_at, updated_at
) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6, ?6);

-- name: insert_payload
-- The payload of the job insert_job just stored.
INSERT INTO queue_payloads (job_id, payload) VALUES (last_insert_rowid(), ?1);

-- name: release_expired_leases
-- In-flight jobs of a destination whose lease ran out (their worker died) go back to pending, as
-- they were; run by a claim just before claim_jobs, in the same transaction.
UPDATE queue_jobs INDEXED BY queue_jobs_in_flight
SET state = 'pending', lease_expires_at = NULL, updated_at = :now
WHERE state = 'in_flight' AND destination = :destination AND lease_expires_at <= :now;

-- name: claim_jobs
-- Lease due pending jobs of a destination key by key (Queue.claim): of the :window oldest eligible
-- jobs, each ordering key's together, keys in the order of their oldest, :limit at most. A job is
-- not eligible while an earlier job of its key is in flight or waiting for a retry, unless more
-- than :hot_key_threshold jobs of that key are active (counted in queue_keys). The keys that block,
-- and which of them are hot, are worked out once per claim, not per candidate row. Returns the
-- ids, in no order.
WITH blockers AS (
    SELECT ordering_key, id FROM queue_jobs INDEXED BY queue_jobs_in_flight
    WHERE state = 'in_flight' AND destination = :destination AND lease_expires_at > :now
        AND ordering_key IS NOT NULL
    UNION ALL
    SELECT ordering_key, id FROM queue_jobs INDEXED BY queue_jobs_retrying
    WHERE state = 'pending' AND attempts > 0 AND destination = :destination AND next_attempt_at > :now
        AND ordering_key IS NOT NULL
),
blocking AS (
    SELECT ordering_key, min(id) AS first_id FROM blockers GROUP BY ordering_key
),
hot AS (
    SELECT blocking.ordering_key
    FROM blocking
    JOIN queue_keys AS counted
        ON counted.destination = :destination AND counted.ordering_key = blocking.ordering_key
    WHERE counted.active > :hot_key_threshold
),
eligible AS (
    SELECT job.id, job.ordering_key
    FROM queue_jobs AS job INDEXED BY queue_jobs_pending
    LEFT JOIN blocking ON blocking.ordering_key = job.ordering_key
    WHERE job.destination = :destination
        AND job.state = 'pending'
        AND job.next_attempt_at <= :now
        AND (
            blocking.first_id IS NULL
            OR blocking.first_id > job.id
            OR job.ordering_key IN (SELECT ordering_key FROM hot)
        )
    ORDER BY job.id
    LIMIT :window
),
ranked AS (
    SELECT id, min(id) OVER (PARTITION BY coalesce(ordering_key, id)) AS key_first FROM eligible
)
UPDATE queue_jobs
SET state = 'in_flight', lease_expires_at = :lease_expires_at, updated_at = :now
WHERE id IN (SELECT id FROM ranked ORDER BY key_first, id LIMIT :limit)
RETURNING id;

-- name: select_jobs
-- Jobs (ids as a JSON array) with their payloads, by id; columns in the order of Job's fields.
SELECT job.id, job.source, job.destination, job.message_id, job.ordering_key, payload.payload,
    job.state, job.attempts, job.next_attempt_at, job.lease_expires_at, job.last_error,
    job.created_at, job.updated_at, job.progress
FROM queue_jobs AS job
JOIN queue_payloads AS payload ON payload.job_id = job.id
WHERE job.id IN (SELECT value FROM json_each(:ids))
ORDER BY job.id;

-- name: ack_jobs
-- Mark in-flight jobs (ids as a JSON array) done.
UPDATE queue_jobs
SET state = 'done', lease_expires_at = NULL, updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'in_flight';

-- name: extend_leases
-- Push back the lease of in-flight jobs (ids as a JSON array) to :lease_expires_at.
UPDATE queue_jobs
SET lease_expires_at = :lease_expires_at, updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'in_flight';

-- name: retry_job
-- Return an in-flight job to pending, due at :at, counting one attempt and adding :progress.
UPDATE queue_jobs
SET state = 'pending', attempts = attempts + 1, next_attempt_at = :at, lease_expires_at = NULL,
    last_error = :error, updated_at = :now, progress = progress | :progress
WHERE id = :id AND state = 'in_flight';

-- name: dead_letter_job
-- Move a pending or in-flight job to the dead letters, counting one attempt and adding :progress.
UPDATE queue_jobs
SET state = 'dead', attempts = attempts + 1, lease_expires_at = NULL, last_error = :reason,
    updated_at = :now, progress = progress | :progress
WHERE id = :id AND state IN ('pending', 'in_flight');

-- name: release_jobs
-- Return in-flight jobs (ids as a JSON array) to pending without counting an attempt, adding
-- :progress to each.
UPDATE queue_jobs
SET state = 'pending', lease_expires_at = NULL, updated_at = :now, progress = progress | :progress
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'in_flight';

-- name: revive_jobs
-- Dead jobs (ids as a JSON array) back to pending, due now, with attempts reset.
UPDATE queue_jobs
SET state = 'pending', attempts = 0, next_attempt_at = :now, updated_at = :now
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'dead';

-- name: list_delivered
-- Done jobs acked at :since <= updated_at < :until (of :destination, or all when NULL), ids above
-- :after_id, by id, :limit at most (archive replay). Walks the done jobs by id through the state
-- index: a page reads on from the last one's id.
SELECT id FROM queue_jobs INDEXED BY queue_jobs_state
WHERE state = 'done'
    AND id > :after_id
    AND updated_at >= :since AND updated_at < :until
    AND (:destination IS NULL OR destination = :destination)
ORDER BY id
LIMIT :limit;

-- name: resend_jobs
-- Done jobs (ids as a JSON array) back to pending, due now, attempts, last error and progress
-- cleared (every step goes again); their ids (so their place in per-profile order) and created_at
-- are kept.
UPDATE queue_jobs
SET state = 'pending', attempts = 0, next_attempt_at = :now, lease_expires_at = NULL, last_error = NULL,
    updated_at = :now, progress = 0
WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'done';

-- name: purge_jobs
-- Delete dead jobs (ids as a JSON array).
DELETE FROM queue_jobs WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'dead';

-- name: purge_all_jobs
-- Delete every dead job.
DELETE FROM queue_jobs WHERE state = 'dead';

-- name: delete_old_jobs
-- Delete up to :batch done jobs last updated at or before :cutoff.
DELETE FROM queue_jobs WHERE id IN (
    SELECT id FROM queue_jobs INDEXED BY queue_jobs_done
    WHERE state = 'done' AND updated_at <= :cutoff
    LIMIT :batch
);

-- name: delete_idle_keys
-- Forget up to :batch ordering keys with no active job left (their counts stay at 0 until then).
DELETE FROM queue_keys WHERE (destination, ordering_key) IN (
    SELECT destination, ordering_key FROM queue_keys WHERE active <= 0 LIMIT :batch
);

-- name: delete_old_dedupe
-- Forget up to :batch (source, message_id) pairs last accepted at or before :cutoff.
DELETE FROM queue_dedupe WHERE (source, message_id) IN (
    SELECT source, message_id FROM queue_dedupe INDEXED BY queue_dedupe_seen
    WHERE seen_at <= :cutoff
    LIMIT :batch
);

-- name: get_job
-- One job by id.
SELECT job.*, payload.payload
FROM queue_jobs AS job
JOIN queue_payloads AS payload ON payload.job_id = job.id
WHERE job.id = :id;

-- name: list_jobs
-- Jobs in a state after :after_id, by id, optionally of one destination or with a matching error.
SELECT job.*, payload.payload
FROM queue_jobs AS job
JOIN queue_payloads AS payload ON payload.job_id = job.id
WHERE job.state = :state
    AND job.id > :after_id
    AND (:destination IS NULL OR job.destination = :destination)
    AND (:reason_contains IS NULL OR instr(job.last_error, :reason_contains) > 0)
ORDER BY job.id
LIMIT :limit;

-- name: oldest_due
-- The oldest job of a destination delivery should be working on (Queue.oldest_due): in flight, or
-- pending and due unless an earlier job of its key waits for a retry. NULL when there is none.
WITH retrying AS (
    SELECT ordering_key, min(id) AS first_id FROM queue_jobs INDEXED BY queue_jobs_retrying
    WHERE state = 'pending' AND attempts > 0 AND destination = :destination AND next_attempt_at > :now
        AND ordering_key IS NOT NULL
    GROUP BY ordering_key
),
heads (id) AS (
    SELECT (
        SELECT min(id) FROM queue_jobs INDEXED BY queue_jobs_in_flight
        WHERE state = 'in_flight' AND destination = :destination
    )
    UNION ALL
    SELECT (
        SELECT job.id FROM queue_jobs AS job INDEXED BY queue_jobs_pending
        LEFT JOIN retrying ON retrying.ordering_key = job.ordering_key
        WHERE job.destination = :destination AND job.state = 'pending' AND job.next_attempt_at <= :now
            AND (retrying.first_id IS NULL OR retrying.first_id > job.id)
        ORDER BY job.id
        LIMIT 1
    )
)
SELECT min(id) AS id FROM heads;

-- name: count_jobs
-- Number of jobs per state.
SELECT state, count(*) AS jobs FROM queue_jobs GROUP BY state;

-- name: count_destination_jobs
-- Number of jobs of one destination per state.
SELECT state, count(*) AS jobs FROM queue_jobs WHERE destination = :destination GROUP BY state;
