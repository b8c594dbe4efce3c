-- Queries of the PostgreSQL queue backend (router/queue/postgres.py), asyncpg's $n parameters.
-- Times are Unix seconds (double precision), as on SQLite. The schema version of each component is
-- a row of schema_versions; migrate_<n> sections run in order, each in the transaction that holds
-- the migration lock (an advisory lock) and records the new version, so processes starting at once
-- apply each migration exactly once. "Active" jobs are those pending or in flight.

-- name: migrate_1
-- Jobs (payload inline), the dedupe table, and the indexes claims, cleanup and listings read.
CREATE TABLE queue_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source text NOT NULL,
    destination text NOT NULL,
    message_id text NOT NULL,
    ordering_key text,
    payload bytea NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'in_flight', 'done', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    lease_expires_at double precision,
    last_error text,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL
);
-- Payloads out of line (uncompressed; orjson's bytes are short and dense): a claim, an ack or a
-- retry rewrites the job's row, and the payload would be copied with it every time. PostgreSQL
-- moves values out only from a row of ~2 KB on (toast_tuple_target sets how far such a row is
-- shrunk, not where moving starts): shorter payloads stay in the row.
ALTER TABLE queue_jobs ALTER COLUMN payload SET STORAGE EXTERNAL;
ALTER TABLE queue_jobs SET (toast_tuple_target = 128);
-- What a claim scans, in id order.
CREATE INDEX queue_jobs_pending ON queue_jobs (destination, id) WHERE state = 'pending';
-- Leases to release when they run out, and the keys in-flight jobs block.
CREATE INDEX queue_jobs_in_flight ON queue_jobs (destination, lease_expires_at) WHERE state = 'in_flight';
-- Jobs waiting for a retry (only retry_job counts an attempt and sets a later due time).
CREATE INDEX queue_jobs_retrying ON queue_jobs (destination, next_attempt_at)
    WHERE state = 'pending' AND attempts > 0;
CREATE INDEX queue_jobs_done ON queue_jobs (updated_at) WHERE state = 'done';
CREATE INDEX queue_jobs_dead ON queue_jobs (id) WHERE state = 'dead';
CREATE TABLE queue_dedupe (
    source text NOT NULL,
    message_id text NOT NULL,
    seen_at double precision NOT NULL,
    PRIMARY KEY (source, message_id)
);
CREATE INDEX queue_dedupe_seen ON queue_dedupe (seen_at);
-- Active jobs counted per ordering key, for the hot-key check of claims (a count of a hot key's jobs
-- would read all of them, on every claim). Statement-level triggers keep it, one upsert per statement
-- that changes which jobs are active, keys in sorted order: statements of several processes lock
-- the rows they share in the same order.
CREATE TABLE queue_keys (
    destination text NOT NULL,
    ordering_key text NOT NULL,
    active bigint NOT NULL,
    PRIMARY KEY (destination, ordering_key)
);
-- Active jobs of every destination, for enqueue's max_depth, kept by the same triggers: their sum
-- over 16 rows, each statement adding to the row of its server process (pg_backend_pid() % 16), so
-- that acks of several processes do not queue up on one row.
CREATE TABLE queue_depth (
    shard integer PRIMARY KEY,
    active bigint NOT NULL
);
INSERT INTO queue_depth (shard, active) SELECT shard, 0 FROM generate_series(0, 15) AS shard;
CREATE FUNCTION queue_keys_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queue_keys (destination, ordering_key, active)
    SELECT destination, ordering_key, count(*) FROM added_jobs
    WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
    GROUP BY destination, ordering_key
    ORDER BY destination, ordering_key
    ON CONFLICT (destination, ordering_key) DO UPDATE SET active = queue_keys.active + excluded.active;
    UPDATE queue_depth SET active = queue_depth.active + added.active
    FROM (SELECT count(*) AS active FROM added_jobs WHERE state IN ('pending', 'in_flight')) AS added
    WHERE shard = pg_backend_pid() % 16 AND added.active <> 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_keys_added AFTER INSERT ON queue_jobs
    REFERENCING NEW TABLE AS added_jobs FOR EACH STATEMENT EXECUTE FUNCTION queue_keys_added();
CREATE FUNCTION queue_keys_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- +1 per changed job active after, -1 per changed job active before: a job that stays active
    -- (a claim) or inactive cancels out, with no join of the two transition tables
    INSERT INTO queue_keys (destination, ordering_key, active)
    SELECT destination, ordering_key, sum(change) FROM (
        SELECT destination, ordering_key, 1 AS change FROM moved_to
        WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
        UNION ALL
        SELECT destination, ordering_key, -1 AS change FROM moved_from
        WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
    ) AS changes
    GROUP BY destination, ordering_key
    HAVING sum(change) <> 0
    ORDER BY destination, ordering_key
    ON CONFLICT (destination, ordering_key) DO UPDATE SET active = queue_keys.active + excluded.active;
    UPDATE queue_depth SET active = queue_depth.active + moved.active
    FROM (
        SELECT (SELECT count(*) FROM moved_to WHERE state IN ('pending', 'in_flight'))
            - (SELECT count(*) FROM moved_from WHERE state IN ('pending', 'in_flight')) AS active
    ) AS moved
    WHERE shard = pg_backend_pid() % 16 AND moved.active <> 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_keys_moved AFTER UPDATE ON queue_jobs
    REFERENCING OLD TABLE AS moved_from NEW TABLE AS moved_to
    FOR EACH STATEMENT EXECUTE FUNCTION queue_keys_moved();
CREATE FUNCTION queue_keys_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queue_keys (destination, ordering_key, active)
    SELECT destination, ordering_key, -count(*) FROM deleted_jobs
    WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
    GROUP BY destination, ordering_key
    ORDER BY destination, ordering_key
    ON CONFLICT (destination, ordering_key) DO UPDATE SET active = queue_keys.active + excluded.active;
    UPDATE queue_depth SET active = queue_depth.active - deleted.active
    FROM (SELECT count(*) AS active FROM deleted_jobs WHERE state IN ('pending', 'in_flight')) AS deleted
    WHERE shard = pg_backend_pid() % 16 AND deleted.active <> 0;
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_keys_deleted AFTER DELETE ON queue_jobs
    REFERENCING OLD TABLE AS deleted_jobs FOR EACH STATEMENT EXECUTE FUNCTION queue_keys_deleted();

-- name: migrate_2
-- Klaviyo's per-endpoint send budgets shared by every router of the cluster (router/klaviyo/shared_ratelimit.py).
-- Unlogged: a reservation writes no WAL and commits without waiting for a disk flush; after a
-- database crash the tables come back empty, which only forgets the last minute's sends.
-- ratelimit_buckets holds one row per bucket (destination and endpoint): how many sends were ever
-- reserved, the latest reserved time, and the time before which nothing may be sent (Retry-After).
-- ratelimit_slots is each bucket's ring of the last `steady` reserved send times, slot n % steady
-- holding reservation n.
CREATE UNLOGGED TABLE ratelimit_buckets (
    bucket text PRIMARY KEY,
    steady integer NOT NULL,
    reserved bigint NOT NULL,
    last_at double precision NOT NULL,
    blocked_until double precision NOT NULL
);
CREATE UNLOGGED TABLE ratelimit_slots (
    bucket text NOT NULL,
    slot integer NOT NULL,
    at double precision NOT NULL,
    PRIMARY KEY (bucket, slot)
);
-- Reserve the earliest send time that keeps at most p_burst sends in any one-second span and at
-- most p_steady in any one-minute span, over the reservations of every process (each p_margin
-- seconds further apart than the limits ask), and not before blocked_until. Reservations only grow,
-- so checking the new one against the p_burst-th and p_steady-th before it keeps every span within
-- the limits, whatever the alignment of Klaviyo's fixed windows. Returns the reserved time and the
-- database's clock: the caller sleeps for the difference. The bucket's row lock serialises the
-- reservations; each statement after it sees the slots the previous holder committed.
CREATE FUNCTION ratelimit_reserve(p_bucket text, p_burst integer, p_steady integer, p_margin double precision)
RETURNS TABLE (send_at double precision, now_at double precision)
LANGUAGE plpgsql AS $$
DECLARE
    bucket_row ratelimit_buckets;
    taken bigint;
    earlier double precision;
BEGIN
    INSERT INTO ratelimit_buckets (bucket, steady, reserved, last_at, blocked_until)
    VALUES (p_bucket, p_steady, 0, 0, 0)
    ON CONFLICT (bucket) DO NOTHING;
    SELECT * INTO bucket_row FROM ratelimit_buckets WHERE bucket = p_bucket FOR UPDATE;
    now_at := extract(epoch FROM clock_timestamp());
    taken := bucket_row.reserved;
    IF bucket_row.steady <> p_steady THEN
        -- another limit (a node with another rate_limit_scale): the ring starts afresh
        DELETE FROM ratelimit_slots WHERE bucket = p_bucket;
        taken := 0;
    END IF;
    send_at := greatest(now_at, bucket_row.last_at, bucket_row.blocked_until);
    IF taken >= least(p_burst, p_steady) THEN
        SELECT at INTO earlier FROM ratelimit_slots
        WHERE bucket = p_bucket AND slot = (taken - least(p_burst, p_steady)) % p_steady;
        send_at := greatest(send_at, earlier + 1.0 + p_margin);
    END IF;
    IF taken >= p_steady THEN
        SELECT at INTO earlier FROM ratelimit_slots WHERE bucket = p_bucket AND slot = taken % p_steady;
        send_at := greatest(send_at, earlier + 60.0 + p_margin);
    END IF;
    INSERT INTO ratelimit_slots (bucket, slot, at) VALUES (p_bucket, taken % p_steady, send_at)
    ON CONFLICT (bucket, slot) DO UPDATE SET at = excluded.at;
    UPDATE ratelimit_buckets SET steady = p_steady, reserved = taken + 1, last_at = send_at
    WHERE bucket = p_bucket;
    RETURN NEXT;
END
$$;

-- name: migrate_3
-- What delivery already achieved for each job (Job.progress: bits of the request kinds Klaviyo
-- accepted), so a retry sends only the rest. A column with a constant default: no table rewrite.
ALTER TABLE queue_jobs ADD COLUMN progress integer NOT NULL DEFAULT 0;

-- name: migrate_4
-- A claim in one statement: queue_claim takes the destination's claim lock, releases expired
-- leases, chooses and leases, all in the database, and the statement's end (its own transaction)
-- lets the lock go. Claims of a destination take turns under that lock, each seeing the leases
-- the one before took (per-profile order across processes); a claim made of several round trips
-- held the lock while its process's event loop was busy elsewhere (planning a batch), and every
-- other process's claim waited for it.
-- What it does, in order: (1) in-flight jobs whose lease ran out by p_now (their worker died) go
-- back to pending, as they were; (2) the ordering keys that hold back later jobs: each with its
-- first job in flight or waiting for a retry, unless hot (more than p_hot active jobs, counted in
-- queue_keys: order is given up for it), as a map key -> that first id; (3) due pending jobs in id
-- order, those of a blocked key after its first blocking job left out, p_window at most, read from
-- the pending index in id order (bitmap scans are off: the planner would read every pending job
-- into a bitmap and sort, which it prefers while the table's statistics still describe it nearly
-- empty, as they do after a burst); (4) whole keys of those, in the order of their first job (a
-- job without a key is a key of its own), p_limit at most (router.queue.key_major); (5) lease
-- them, locking them with SKIP LOCKED: a job another transaction holds (an operator's dead-letter
-- call) is left, and so are the chosen jobs after it of its ordering key. Returns the leased jobs
-- in no order.
CREATE FUNCTION queue_claim(
    p_destination text, p_now double precision, p_hot bigint, p_window integer, p_limit integer,
    p_lease_until double precision
) RETURNS SETOF queue_jobs
LANGUAGE plpgsql SET enable_bitmapscan = off AS $$
DECLARE
    blocked jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('klaviyo-router:claim:' || p_destination, 0));
    UPDATE queue_jobs SET state = 'pending', lease_expires_at = NULL, updated_at = p_now
    WHERE state = 'in_flight' AND destination = p_destination AND lease_expires_at <= p_now;
    SELECT coalesce(jsonb_object_agg(blocking.ordering_key, blocking.first_id), '{}') INTO blocked
    FROM (
        SELECT blocker.ordering_key, min(blocker.id) AS first_id FROM (
            SELECT ordering_key, id FROM queue_jobs
            WHERE state = 'in_flight' AND destination = p_destination AND ordering_key IS NOT NULL
            UNION ALL
            SELECT ordering_key, id FROM queue_jobs
            WHERE state = 'pending' AND attempts > 0 AND destination = p_destination
                AND next_attempt_at > p_now AND ordering_key IS NOT NULL
        ) AS blocker
        GROUP BY blocker.ordering_key
    ) AS blocking
    LEFT JOIN queue_keys AS counted
        ON counted.destination = p_destination AND counted.ordering_key = blocking.ordering_key
    WHERE coalesce(counted.active, 0) <= p_hot;
    RETURN QUERY
    WITH eligible AS (
        SELECT job.id, job.ordering_key FROM queue_jobs AS job
        WHERE job.destination = p_destination AND job.state = 'pending' AND job.next_attempt_at <= p_now
            AND coalesce((blocked ->> job.ordering_key)::bigint > job.id, true)
        ORDER BY job.id
        LIMIT p_window
    ),
    chosen AS (
        SELECT eligible.id, eligible.ordering_key FROM eligible
        ORDER BY min(eligible.id) OVER (
            PARTITION BY eligible.ordering_key, CASE WHEN eligible.ordering_key IS NULL THEN eligible.id END
        ), eligible.id
        LIMIT p_limit
    ),
    locked AS (
        SELECT job.id FROM queue_jobs AS job JOIN chosen ON chosen.id = job.id
        WHERE job.state = 'pending'
        ORDER BY job.id
        FOR UPDATE OF job SKIP LOCKED
    ),
    skipped AS (
        SELECT chosen.ordering_key, min(chosen.id) AS first_id FROM chosen
        WHERE chosen.ordering_key IS NOT NULL AND chosen.id NOT IN (SELECT locked.id FROM locked)
        GROUP BY chosen.ordering_key
    )
    UPDATE queue_jobs AS job
    SET state = 'in_flight', lease_expires_at = p_lease_until, updated_at = p_now
    FROM locked
    WHERE job.id = locked.id
        AND NOT EXISTS (
            SELECT FROM skipped WHERE skipped.ordering_key = job.ordering_key AND skipped.first_id < job.id
        )
    RETURNING job.*;
END
$$;

-- name: migrate_5
-- Less work for a claim, all of it done under the destination's claim lock, which every claim of
-- the cluster waits for (in a busy cluster most workers are queued at it):
-- (1) the keys that hold back later jobs (step 2 of queue_claim) are read by queue_blockers, which
-- groups the in-flight jobs by hashing: with every worker's batch in flight (some 20 000 jobs) the
-- sort by key that PostgreSQL chose from the table's statistics (stale after each burst) cost
-- about as much as reading those jobs;
-- (2) the chosen jobs are found again by their row address (ctid), not by a descent of the primary
-- key each to lock them and another to lease them;
-- (3) keys are compared byte by byte (COLLATE "C") where only equality and a fixed order matter;
-- (4) queue_keys_moved returns at once from updates that change no job's activity (a claim, a
-- release, a retry, a lease extension: active before and after; no statement changes a job's
-- destination or ordering key), and for an ack (active before, inactive after) reads only the
-- jobs as they were.
CREATE FUNCTION queue_blockers(p_destination text, p_now double precision, p_hot bigint) RETURNS jsonb
LANGUAGE sql STABLE SET enable_sort = off SET enable_bitmapscan = off AS $$
    SELECT coalesce(jsonb_object_agg(blocking.ordering_key, blocking.first_id), '{}')
    FROM (
        SELECT blocker.ordering_key, min(blocker.id) AS first_id FROM (
            SELECT ordering_key, id FROM queue_jobs
            WHERE state = 'in_flight' AND destination = p_destination AND ordering_key IS NOT NULL
            UNION ALL
            SELECT ordering_key, id FROM queue_jobs
            WHERE state = 'pending' AND attempts > 0 AND destination = p_destination
                AND next_attempt_at > p_now AND ordering_key IS NOT NULL
        ) AS blocker
        GROUP BY blocker.ordering_key
    ) AS blocking
    LEFT JOIN queue_keys AS counted
        ON counted.destination = p_destination AND counted.ordering_key = blocking.ordering_key
    WHERE coalesce(counted.active, 0) <= p_hot
$$;
CREATE OR REPLACE FUNCTION queue_claim(
    p_destination text, p_now double precision, p_hot bigint, p_window integer, p_limit integer,
    p_lease_until double precision
) RETURNS SETOF queue_jobs
LANGUAGE plpgsql SET enable_bitmapscan = off AS $$
DECLARE
    blocked jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('klaviyo-router:claim:' || p_destination, 0));
    UPDATE queue_jobs SET state = 'pending', lease_expires_at = NULL, updated_at = p_now
    WHERE state = 'in_flight' AND destination = p_destination AND lease_expires_at <= p_now;
    blocked := queue_blockers(p_destination, p_now, p_hot);
    RETURN QUERY
    WITH eligible AS (
        SELECT job.ctid AS address, job.id, job.ordering_key COLLATE "C" AS ordering_key
        FROM queue_jobs AS job
        WHERE job.destination = p_destination AND job.state = 'pending' AND job.next_attempt_at <= p_now
            AND coalesce((blocked ->> job.ordering_key)::bigint > job.id, true)
        ORDER BY job.id
        LIMIT p_window
    ),
    chosen AS (
        SELECT eligible.address, eligible.id, eligible.ordering_key FROM eligible
        ORDER BY min(eligible.id) OVER (
            PARTITION BY eligible.ordering_key, CASE WHEN eligible.ordering_key IS NULL THEN eligible.id END
        ), eligible.id
        LIMIT p_limit
    ),
    locked AS (
        SELECT job.ctid AS address, job.id FROM queue_jobs AS job JOIN chosen ON job.ctid = chosen.address
        WHERE job.state = 'pending' AND job.id = chosen.id
        ORDER BY job.id
        FOR UPDATE OF job SKIP LOCKED
    ),
    skipped AS (
        SELECT chosen.ordering_key, min(chosen.id) AS first_id FROM chosen
        WHERE chosen.ordering_key IS NOT NULL AND chosen.id NOT IN (SELECT locked.id FROM locked)
        GROUP BY chosen.ordering_key
    )
    UPDATE queue_jobs AS job
    SET state = 'in_flight', lease_expires_at = p_lease_until, updated_at = p_now
    FROM locked
    WHERE job.ctid = locked.address AND job.id = locked.id
        AND NOT EXISTS (
            SELECT FROM skipped
            WHERE skipped.ordering_key = job.ordering_key COLLATE "C" AND skipped.first_id < job.id
        )
    RETURNING job.*;
END
$$;
CREATE OR REPLACE FUNCTION queue_keys_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved bigint;
    active_before bigint;
    active_after bigint;
BEGIN
    SELECT count(*), count(*) FILTER (WHERE state IN ('pending', 'in_flight')) INTO moved, active_after
    FROM moved_to;
    SELECT count(*) FILTER (WHERE state IN ('pending', 'in_flight')) INTO active_before FROM moved_from;
    IF (active_before = moved AND active_after = moved) OR (active_before = 0 AND active_after = 0) THEN
        RETURN NULL;  -- no job changed between active and inactive (the statement changes no key)
    END IF;
    IF active_after = 0 THEN
        INSERT INTO queue_keys (destination, ordering_key, active)
        SELECT destination, ordering_key, -count(*) FROM moved_from
        WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
        GROUP BY destination, ordering_key
        ORDER BY destination, ordering_key
        ON CONFLICT (destination, ordering_key) DO UPDATE SET active = queue_keys.active + excluded.active;
    ELSE
        -- +1 per changed job active after, -1 per changed job active before: a job that stays
        -- active or inactive cancels out, with no join of the two transition tables
        INSERT INTO queue_keys (destination, ordering_key, active)
        SELECT destination, ordering_key, sum(change) FROM (
            SELECT destination, ordering_key, 1 AS change FROM moved_to
            WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
            UNION ALL
            SELECT destination, ordering_key, -1 AS change FROM moved_from
            WHERE state IN ('pending', 'in_flight') AND ordering_key IS NOT NULL
        ) AS changes
        GROUP BY destination, ordering_key
        HAVING sum(change) <> 0
        ORDER BY destination, ordering_key
        ON CONFLICT (destination, ordering_key) DO UPDATE SET active = queue_keys.active + excluded.active;
    END IF;
    UPDATE queue_depth SET active = queue_depth.active + active_after - active_before
    WHERE shard = pg_backend_pid() % 16 AND active_after <> active_before;
    RETURN NULL;
END
$$;

-- name: schema_table
-- The schema version of each component sharing the database (this queue is 'queue').
CREATE TABLE IF NOT EXISTS schema_versions (component text PRIMARY KEY, version integer NOT NULL);

-- name: migration_lock
-- Held until the migrating transaction ends: one process at a time checks and migrates.
SELECT pg_advisory_xact_lock(hashtextextended('klaviyo-router:migrate', 0));

-- name: schema_version
-- The version of a component's schema (no row: 0).
SELECT coalesce((SELECT version FROM schema_versions WHERE component = $1), 0);

-- name: set_schema_version
-- Record a component's schema version.
INSERT INTO schema_versions (component, version) VALUES ($1, $2)
ON CONFLICT (component) DO UPDATE SET version = excluded.version;

-- name: ping
-- Cheapest round trip through the database.
SELECT 1;

-- name: depth_lock
-- Held until the enqueueing transaction ends: enqueues with a max_depth take turns across the
-- cluster, each counting the jobs the one before stored.
SELECT pg_advisory_xact_lock(hashtextextended('klaviyo-router:depth', 0));

-- name: active_jobs
-- Jobs pending or in flight, of every destination (kept in queue_depth by the triggers).
SELECT coalesce(sum(active), 0)::bigint FROM queue_depth;

-- name: see_messages
-- Record (source, message_id) pairs as accepted at their time, in one statement: $1 sources, $2
-- message ids, $3 times, $4 the dedupe window. A pair accepted within the window before is a
-- duplicate: it is not recorded and not returned. The arrays hold no pair twice and are sorted, so
-- that processes inserting overlapping pairs lock them in the same order.
INSERT INTO queue_dedupe (source, message_id, seen_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::double precision[])
ON CONFLICT (source, message_id) DO UPDATE SET seen_at = excluded.seen_at
    WHERE queue_dedupe.seen_at <= excluded.seen_at - $4
RETURNING source, message_id;

-- name: insert_jobs
-- Store jobs in one statement, ids in array order: $1 sources, $2 destinations, $3 message ids,
-- $4 ordering keys, $5 payloads, $6 states, $7 times (due, created and updated), $8 errors.
INSERT INTO queue_jobs (
    source, destination, message_id, ordering_key, payload, state,
    next_attempt_at, last_error, created_at, updated_at
)
SELECT source, destination, message_id, ordering_key, payload, state, at, error, at, at
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
    $7::double precision[], $8::text[]
) AS job (source, destination, message_id, ordering_key, payload, state, at, error);

-- name: claim
-- Claim up to $5 due jobs of destination $1 at time $2, leased until $6, from the oldest $4
-- eligible ones (keys with more than $3 active jobs are hot); see queue_claim (migrate_4, migrate_5).
SELECT id, source, destination, message_id, ordering_key, payload, state, attempts, next_attempt_at,
    lease_expires_at, last_error, created_at, updated_at, progress
FROM queue_claim($1, $2, $3, $4, $5, $6);

-- name: ack_jobs
-- Mark in-flight jobs ($1) done at $2.
UPDATE queue_jobs SET state = 'done', lease_expires_at = NULL, updated_at = $2
WHERE id = ANY($1::bigint[]) AND state = 'in_flight';

-- name: extend_leases
-- Push back the lease of in-flight jobs ($1) to $3 (at $2).
UPDATE queue_jobs SET lease_expires_at = $3, updated_at = $2
WHERE id = ANY($1::bigint[]) AND state = 'in_flight';

-- name: retry_job
-- Return an in-flight job ($1) to pending, due at $2, counting one attempt; $3 the error, $4 now,
-- $5 progress bits to add.
UPDATE queue_jobs
SET state = 'pending', attempts = attempts + 1, next_attempt_at = $2, lease_expires_at = NULL,
    last_error = $3, updated_at = $4, progress = progress | $5
WHERE id = $1 AND state = 'in_flight';

-- name: dead_letter_job
-- Move a pending or in-flight job ($1) to the dead letters with reason $2 at $3, counting one attempt
-- and adding progress bits $4.
UPDATE queue_jobs
SET state = 'dead', attempts = attempts + 1, lease_expires_at = NULL, last_error = $2, updated_at = $3,
    progress = progress | $4
WHERE id = $1 AND state IN ('pending', 'in_flight');

-- name: release_jobs
-- Return in-flight jobs ($1) to pending at $2 without counting an attempt, adding progress bits $3.
UPDATE queue_jobs SET state = 'pending', lease_expires_at = NULL, updated_at = $2, progress = progress | $3
WHERE id = ANY($1::bigint[]) AND state = 'in_flight';

-- name: revive_jobs
-- Dead jobs ($1) back to pending, due at $2, with attempts reset.
UPDATE queue_jobs SET state = 'pending', attempts = 0, next_attempt_at = $2, updated_at = $2
WHERE id = ANY($1::bigint[]) AND state = 'dead';

-- name: list_delivered
-- Ids of done jobs acked at $2 <= updated_at < $3 (of destination $4, or all when NULL), above id
-- $1, by id, $5 at most (archive replay).
SELECT id FROM queue_jobs
WHERE state = 'done'
    AND id > $1
    AND updated_at >= $2 AND updated_at < $3
    AND ($4::text IS NULL OR destination = $4)
ORDER BY id
LIMIT $5;

-- name: resend_jobs
-- Done jobs ($1) back to pending, due at $2, attempts, last error and progress cleared (every step
-- goes again); their ids (so their place in per-profile order) and created_at are kept.
UPDATE queue_jobs
SET state = 'pending', attempts = 0, next_attempt_at = $2, lease_expires_at = NULL, last_error = NULL,
    updated_at = $2, progress = 0
WHERE id = ANY($1::bigint[]) AND state = 'done';

-- name: purge_jobs
-- Delete dead jobs ($1).
DELETE FROM queue_jobs WHERE id = ANY($1::bigint[]) AND state = 'dead';

-- name: purge_all_jobs
-- Delete every dead job.
DELETE FROM queue_jobs WHERE state = 'dead';

-- name: delete_old_jobs
-- Delete up to $2 done jobs last updated at or before $1. The cleanups of every node may run at
-- once, beside everything else: the rows are locked as they are chosen, skipping those another
-- transaction holds (a resend, another node's cleanup), so a cleanup never waits for a row lock and
-- never deletes a row whose change it did not see (a DELETE that waited would delete what the
-- subquery chose, resent to pending or not). The outer conditions say it again, for the reader.
DELETE FROM queue_jobs WHERE id IN (
    SELECT id FROM queue_jobs WHERE state = 'done' AND updated_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED
) AND state = 'done' AND updated_at <= $1;

-- name: delete_old_dedupe
-- Forget up to $2 (source, message_id) pairs last accepted at or before $1, skipping pairs another
-- transaction holds (an enqueue accepting the pair again, outside the window: it keeps it).
DELETE FROM queue_dedupe WHERE (source, message_id) IN (
    SELECT source, message_id FROM queue_dedupe WHERE seen_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED
) AND seen_at <= $1;

-- name: delete_idle_keys
-- Forget up to $1 ordering keys with no active job left (their counts stay at 0 until then),
-- skipping keys another transaction holds (an enqueue or a claim counting a job of the key again).
DELETE FROM queue_keys WHERE (destination, ordering_key) IN (
    SELECT destination, ordering_key FROM queue_keys WHERE active <= 0 LIMIT $1 FOR UPDATE SKIP LOCKED
) AND active <= 0;

-- name: get_job
-- One job by id, columns in the order of Job's fields.
SELECT id, source, destination, message_id, ordering_key, payload, state, attempts, next_attempt_at,
    lease_expires_at, last_error, created_at, updated_at, progress
FROM queue_jobs
WHERE id = $1;

-- name: list_jobs
-- Jobs in state $1 after id $3, by id, $2 at most, optionally of destination $5 or with an error
-- containing $4 (case-sensitive); columns in the order of Job's fields.
SELECT id, source, destination, message_id, ordering_key, payload, state, attempts, next_attempt_at,
    lease_expires_at, last_error, created_at, updated_at, progress
FROM queue_jobs
WHERE state = $1
    AND id > $3
    AND ($5::text IS NULL OR destination = $5)
    AND ($4::text IS NULL OR strpos(last_error, $4) > 0)
ORDER BY id
LIMIT $2;

-- name: oldest_due
-- The oldest job of destination $1 delivery should be working on at time $2 (Queue.oldest_due): in
-- flight, or pending and due unless an earlier job of its key waits for a retry. NULL when none.
WITH retrying AS (
    SELECT ordering_key, min(id) AS first_id FROM queue_jobs
    WHERE state = 'pending' AND attempts > 0 AND destination = $1 AND next_attempt_at > $2
        AND ordering_key IS NOT NULL
    GROUP BY ordering_key
)
SELECT least(
    (SELECT min(id) FROM queue_jobs WHERE state = 'in_flight' AND destination = $1),
    (
        SELECT job.id FROM queue_jobs AS job
        LEFT JOIN retrying ON retrying.ordering_key = job.ordering_key
        WHERE job.destination = $1 AND job.state = 'pending' AND job.next_attempt_at <= $2
            AND (retrying.first_id IS NULL OR retrying.first_id > job.id)
        ORDER BY job.id
        LIMIT 1
    )
);

-- name: count_jobs
-- Number of jobs per state (backpressure asks every few seconds), each state counted through its
-- own partial index, which autovacuum lets the count read without the rows and their payloads.
SELECT 'pending' AS state, count(*) AS jobs FROM queue_jobs WHERE state = 'pending'
UNION ALL
SELECT 'in_flight', count(*) FROM queue_jobs WHERE state = 'in_flight'
UNION ALL
SELECT 'done', count(*) FROM queue_jobs WHERE state = 'done'
UNION ALL
SELECT 'dead', count(*) FROM queue_jobs WHERE state = 'dead';

-- name: count_destination_jobs
-- Number of jobs of destination $1 per state.
SELECT state, count(*) AS jobs FROM queue_jobs WHERE destination = $1 GROUP BY state;

-- name: ratelimit_reserve
-- Reserve a send of bucket $1 under $2 per second and $3 per minute, $4 seconds apart beyond them.
SELECT send_at, now_at FROM ratelimit_reserve($1, $2, $3, $4);

-- name: ratelimit_block
-- Nothing is sent to bucket $1 for the next $2 seconds (Retry-After, or a used-up window).
INSERT INTO ratelimit_buckets (bucket, steady, reserved, last_at, blocked_until)
VALUES ($1, 1, 0, 0, extract(epoch FROM clock_timestamp()) + $2)
ON CONFLICT (bucket) DO UPDATE
    SET blocked_until = greatest(ratelimit_buckets.blocked_until, excluded.blocked_until);

-- name: ratelimit_blocked
-- Seconds before bucket $1 may send again (0: now).
SELECT greatest(0.0, coalesce(
    (SELECT blocked_until FROM ratelimit_buckets WHERE bucket = $1) - extract(epoch FROM clock_timestamp()),
    0.0
));
