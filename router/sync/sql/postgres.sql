-- Queries of the audience sync's state in the queue's PostgreSQL database (router/sync/state.py).
-- The same tables and query names as sqlite.sql; parameters are positional, in the order
-- router/sync/state.py's PARAMS gives. JSON arrays (jsonb) carry a batch of keys in one parameter.

-- name: migrate_1
-- Keys, import jobs, runs and lists of every sync.
CREATE TABLE sync_keys (
    sync TEXT NOT NULL,
    key TEXT NOT NULL,
    checksum TEXT,
    status TEXT NOT NULL CHECK (status IN ('sent', 'failed')),
    profile_id TEXT,
    member BOOLEAN NOT NULL DEFAULT false,
    seen_run BIGINT,
    absent_runs INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    job_index INTEGER,
    last_error TEXT,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (sync, key)
);
CREATE INDEX sync_keys_job ON sync_keys (job_id, job_index) WHERE job_id IS NOT NULL;
CREATE INDEX sync_keys_members ON sync_keys (sync, key) WHERE member;
CREATE TABLE sync_jobs (
    job_id TEXT PRIMARY KEY,
    sync TEXT NOT NULL,
    run_id BIGINT NOT NULL,
    items INTEGER NOT NULL,
    list_id TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION
);
CREATE INDEX sync_jobs_open ON sync_jobs (sync) WHERE finished_at IS NULL;
CREATE TABLE sync_runs (
    id BIGSERIAL PRIMARY KEY,
    sync TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    status TEXT NOT NULL,
    details TEXT NOT NULL,
    summary TEXT
);
CREATE INDEX sync_runs_sync ON sync_runs (sync, id);
CREATE TABLE sync_lists (
    sync TEXT PRIMARY KEY,
    list_name TEXT NOT NULL,
    list_id TEXT NOT NULL
);
UPDATE sync_schema SET version = 1;

-- name: seen_table
-- The keys the running query returned, kept for the run (the state's one connection's own).
CREATE TEMP TABLE IF NOT EXISTS sync_seen (key TEXT PRIMARY KEY);

-- name: seen_clear
-- A new run starts with no key seen.
TRUNCATE sync_seen;

-- name: changed
-- Of a batch of rows ([[key, checksum], ...]), those to send: new, changed since they were sent,
-- failed, or not members yet when the sync has a list; as [key, known, member]. The unchanged
-- rows (most of a re-run's) are left out here, one statement a batch.
SELECT b.value ->> 0, k.key IS NOT NULL, coalesce(k.member, false)
FROM jsonb_array_elements($2::jsonb) AS b (value)
LEFT JOIN sync_keys AS k ON k.sync = $1 AND k.key = b.value ->> 0
WHERE k.key IS NULL OR k.status <> 'sent' OR k.checksum IS DISTINCT FROM b.value ->> 1 OR ($3 AND NOT k.member);

-- name: seen_before
-- Keys of a batch the run has seen already (duplicates in the query's result).
SELECT key FROM sync_seen WHERE key IN (SELECT jsonb_array_elements_text($1::jsonb));

-- name: mark_seen
-- Keys of a batch the run has seen.
INSERT INTO sync_seen (key) SELECT DISTINCT jsonb_array_elements_text($1::jsonb) ON CONFLICT DO NOTHING;

-- name: record_sent
-- Keys an import job Klaviyo accepted carries: [[key, checksum, index], ...]. Membership waits for the job's end.
INSERT INTO sync_keys (sync, key, checksum, status, seen_run, job_id, job_index, updated_at)
SELECT $1, e ->> 0, e ->> 1, 'sent', $2, $3, (e ->> 2)::int, $4 FROM jsonb_array_elements($5::jsonb) AS e
ON CONFLICT (sync, key) DO UPDATE SET
    checksum = excluded.checksum, status = 'sent', seen_run = excluded.seen_run, absent_runs = 0,
    job_id = excluded.job_id, job_index = excluded.job_index, last_error = NULL, updated_at = excluded.updated_at;

-- name: record_failed
-- Keys that could not be sent: [[key, error], ...]; they are sent again next run.
INSERT INTO sync_keys (sync, key, checksum, status, seen_run, last_error, updated_at)
SELECT $1, e ->> 0, NULL, 'failed', $2, e ->> 1, $3 FROM jsonb_array_elements($4::jsonb) AS e
ON CONFLICT (sync, key) DO UPDATE SET
    checksum = NULL, status = 'failed', seen_run = excluded.seen_run, absent_runs = 0,
    job_id = NULL, job_index = NULL, last_error = excluded.last_error, updated_at = excluded.updated_at;

-- name: refuse_job_items
-- Items of a finished job Klaviyo refused ([[index, error], ...]): failed, to be sent again; their keys.
UPDATE sync_keys SET checksum = NULL, status = 'failed', last_error = e ->> 1, updated_at = $2
FROM jsonb_array_elements($3::jsonb) AS e
WHERE sync_keys.job_id = $1 AND sync_keys.job_index = (e ->> 0)::int
RETURNING sync_keys.key, sync_keys.job_index;

-- name: confirm_job
-- The job's other keys are imported: with a list, they are members now. The job is done with.
UPDATE sync_keys SET member = member OR ($2 AND status = 'sent'), job_id = NULL, job_index = NULL
WHERE job_id = $1;

-- name: add_job
-- An import job Klaviyo accepted, followed until it finishes (also by the next run, after a crash).
INSERT INTO sync_jobs (job_id, sync, run_id, items, list_id, created_at) VALUES ($1, $2, $3, $4, $5, $6);

-- name: finish_job
-- A job whose end is known.
UPDATE sync_jobs SET finished_at = $2 WHERE job_id = $1;

-- name: open_jobs
-- Jobs of a sync whose end is not known yet (their run was interrupted).
SELECT job_id, items, list_id FROM sync_jobs WHERE sync = $1 AND finished_at IS NULL ORDER BY created_at;

-- name: count_members
-- Members this sync added.
SELECT count(*) FROM sync_keys WHERE sync = $1 AND member;

-- name: count_leaving
-- Members the run did not see, absent for at least $2 runs before it.
SELECT count(*) FROM sync_keys AS k
WHERE k.sync = $1 AND k.member AND k.absent_runs >= $2
    AND NOT EXISTS (SELECT 1 FROM sync_seen AS s WHERE s.key = k.key);

-- name: leaving
-- A page of those members, by key after $3.
SELECT k.key, k.profile_id FROM sync_keys AS k
WHERE k.sync = $1 AND k.member AND k.absent_runs >= $2 AND k.key > $3
    AND NOT EXISTS (SELECT 1 FROM sync_seen AS s WHERE s.key = k.key)
ORDER BY k.key LIMIT $4;

-- name: note_absent
-- Members the run did not see count one more absence (grace_runs); those it saw none (only the
-- rows whose count changes are written).
UPDATE sync_keys AS k SET absent_runs =
    CASE WHEN EXISTS (SELECT 1 FROM sync_seen AS s WHERE s.key = k.key) THEN 0 ELSE k.absent_runs + 1 END
WHERE k.sync = $1 AND k.member
    AND (k.absent_runs > 0 OR NOT EXISTS (SELECT 1 FROM sync_seen AS s WHERE s.key = k.key));

-- name: set_profile_ids
-- Klaviyo profile ids learnt for keys: [[key, id], ...].
UPDATE sync_keys SET profile_id = e ->> 1 FROM jsonb_array_elements($2::jsonb) AS e
WHERE sync = $1 AND key = e ->> 0;

-- name: record_removed
-- Keys removed from the list.
UPDATE sync_keys SET member = false, absent_runs = 0, updated_at = $2
WHERE sync = $1 AND key IN (SELECT jsonb_array_elements_text($3::jsonb));

-- name: start_run
-- A new run.
INSERT INTO sync_runs (sync, started_at, heartbeat_at, status, details) VALUES ($1, $2, $2, 'running', $3)
RETURNING id;

-- name: running
-- The newest run of a sync still marked running.
SELECT id, heartbeat_at, details FROM sync_runs WHERE sync = $1 AND status = 'running' ORDER BY id DESC LIMIT 1;

-- name: interrupt_runs
-- Runs marked running whose process is gone.
UPDATE sync_runs SET status = 'interrupted', finished_at = heartbeat_at WHERE sync = $1 AND status = 'running';

-- name: heartbeat
-- A run is still going.
UPDATE sync_runs SET heartbeat_at = $2 WHERE id = $1;

-- name: finish_run
-- A run's end and summary.
UPDATE sync_runs SET status = $2, finished_at = $3, heartbeat_at = $3, summary = $4 WHERE id = $1;

-- name: runs
-- Recent runs, newest first ($1 NULL: every sync's).
SELECT id, sync, started_at, finished_at, status, details, summary FROM sync_runs
WHERE $1::text IS NULL OR sync = $1 ORDER BY id DESC LIMIT $2;

-- name: get_list
-- The list a sync sends to.
SELECT list_name, list_id FROM sync_lists WHERE sync = $1;

-- name: set_list
-- Remember the list a sync sends to.
INSERT INTO sync_lists (sync, list_name, list_id) VALUES ($1, $2, $3)
ON CONFLICT (sync) DO UPDATE SET list_name = excluded.list_name, list_id = excluded.list_id;

-- name: reset_members
-- The sync's list was replaced (deleted and created again): nobody is its member yet.
UPDATE sync_keys SET member = false, absent_runs = 0 WHERE sync = $1 AND member;
