-- Queries of the audience sync's state in the queue's SQLite file (router/sync/state.py).
-- The tables are the sync's own (prefix sync_); the schema version is the one row of
-- sync_schema (PRAGMA user_version is the queue's). Times are Unix seconds (REAL).
-- JSON arrays carry a batch of keys in one parameter (json_each), so one statement serves
-- a whole batch of rows whatever its size.

-- name: migrate_1
-- Keys, import jobs, runs and lists of every sync.
CREATE TABLE sync_keys (
    sync TEXT NOT NULL,
    key TEXT NOT NULL,
    checksum TEXT,
    status TEXT NOT NULL CHECK (status IN ('sent', 'failed')),
    profile_id TEXT,
    member INTEGER NOT NULL DEFAULT 0,
    seen_run INTEGER,
    absent_runs INTEGER NOT NULL DEFAULT 0,
    job_id TEXT,
    job_index INTEGER,
    last_error TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (sync, key)
) WITHOUT ROWID;
CREATE INDEX sync_keys_job ON sync_keys (job_id, job_index) WHERE job_id IS NOT NULL;
CREATE INDEX sync_keys_members ON sync_keys (sync, key) WHERE member = 1;
CREATE TABLE sync_jobs (
    job_id TEXT PRIMARY KEY,
    sync TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    items INTEGER NOT NULL,
    list_id TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX sync_jobs_open ON sync_jobs (sync) WHERE finished_at IS NULL;
CREATE TABLE sync_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sync TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    finished_at REAL,
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
-- The keys the running query returned, kept in memory for the run (this connection's own).
CREATE TEMP TABLE IF NOT EXISTS sync_seen (key TEXT PRIMARY KEY) WITHOUT ROWID;

-- name: seen_clear
-- A new run starts with no key seen.
DELETE FROM temp.sync_seen;

-- name: changed
-- Of a batch of rows ([[key, checksum], ...]), those to send: new, changed since they were sent,
-- failed, or not members yet when the sync has a list; as [key, known, member]. The unchanged
-- rows (most of a re-run's) are left out here, one statement a batch.
SELECT b.value ->> 0, k.key IS NOT NULL, coalesce(k.member, 0)
FROM json_each(:rows) AS b
LEFT JOIN sync_keys AS k ON k.sync = :sync AND k.key = b.value ->> 0
WHERE k.key IS NULL OR k.status != 'sent' OR k.checksum IS NOT b.value ->> 1 OR (:membership AND k.member = 0);

-- name: seen_before
-- Keys of a batch the run has seen already (duplicates in the query's result).
SELECT key FROM temp.sync_seen WHERE key IN (SELECT value FROM json_each(:keys));

-- name: mark_seen
-- Keys of a batch the run has seen.
INSERT OR IGNORE INTO temp.sync_seen (key) SELECT value FROM json_each(:keys);

-- name: record_sent
-- Keys an import job Klaviyo accepted carries: [[key, checksum, index], ...]. Membership waits for the job's end.
INSERT INTO sync_keys (sync, key, checksum, status, seen_run, job_id, job_index, updated_at)
SELECT :sync, value ->> 0, value ->> 1, 'sent', :run, :job, value ->> 2, :now FROM json_each(:entries) WHERE true
ON CONFLICT (sync, key) DO UPDATE SET
    checksum = excluded.checksum, status = 'sent', seen_run = excluded.seen_run, absent_runs = 0,
    job_id = excluded.job_id, job_index = excluded.job_index, last_error = NULL, updated_at = excluded.updated_at;

-- name: record_failed
-- Keys that could not be sent: [[key, error], ...]; they are sent again next run.
INSERT INTO sync_keys (sync, key, checksum, status, seen_run, last_error, updated_at)
SELECT :sync, value ->> 0, NULL, 'failed', :run, value ->> 1, :now FROM json_each(:entries) WHERE true
ON CONFLICT (sync, key) DO UPDATE SET
    checksum = NULL, status = 'failed', seen_run = excluded.seen_run, absent_runs = 0,
    job_id = NULL, job_index = NULL, last_error = excluded.last_error, updated_at = excluded.updated_at;

-- name: refuse_job_items
-- Items of a finished job Klaviyo refused ([[index, error], ...]): failed, to be sent again; their keys.
UPDATE sync_keys SET checksum = NULL, status = 'failed', updated_at = :now,
    last_error = (SELECT value ->> 1 FROM json_each(:refused) WHERE value ->> 0 = sync_keys.job_index)
WHERE job_id = :job AND job_index IN (SELECT value ->> 0 FROM json_each(:refused))
RETURNING key, job_index;

-- name: confirm_job
-- The job's other keys are imported: with a list, they are members now. The job is done with.
UPDATE sync_keys SET member = CASE WHEN :member AND status = 'sent' THEN 1 ELSE member END,
    job_id = NULL, job_index = NULL
WHERE job_id = :job;

-- name: add_job
-- An import job Klaviyo accepted, followed until it finishes (also by the next run, after a crash).
INSERT INTO sync_jobs (job_id, sync, run_id, items, list_id, created_at) VALUES (:job, :sync, :run, :items, :list_id, :now);

-- name: finish_job
-- A job whose end is known.
UPDATE sync_jobs SET finished_at = :now WHERE job_id = :job;

-- name: open_jobs
-- Jobs of a sync whose end is not known yet (their run was interrupted).
SELECT job_id, items, list_id FROM sync_jobs WHERE sync = :sync AND finished_at IS NULL ORDER BY created_at;

-- name: count_members
-- Members this sync added.
SELECT count(*) FROM sync_keys WHERE sync = :sync AND member = 1;

-- name: count_leaving
-- Members the run did not see, absent for at least :grace runs before it.
SELECT count(*) FROM sync_keys
WHERE sync = :sync AND member = 1 AND absent_runs >= :grace AND key NOT IN (SELECT key FROM temp.sync_seen);

-- name: leaving
-- A page of those members, by key after :after.
SELECT key, profile_id FROM sync_keys
WHERE sync = :sync AND member = 1 AND absent_runs >= :grace AND key > :after
    AND key NOT IN (SELECT key FROM temp.sync_seen)
ORDER BY key LIMIT :limit;

-- name: note_absent
-- Members the run did not see count one more absence (grace_runs); those it saw none (only the
-- rows whose count changes are written).
UPDATE sync_keys SET absent_runs = CASE WHEN key IN (SELECT key FROM temp.sync_seen) THEN 0 ELSE absent_runs + 1 END
WHERE sync = :sync AND member = 1 AND (absent_runs > 0 OR key NOT IN (SELECT key FROM temp.sync_seen));

-- name: set_profile_ids
-- Klaviyo profile ids learnt for keys: [[key, id], ...].
UPDATE sync_keys SET profile_id = (SELECT value ->> 1 FROM json_each(:ids) WHERE value ->> 0 = sync_keys.key)
WHERE sync = :sync AND key IN (SELECT value ->> 0 FROM json_each(:ids));

-- name: record_removed
-- Keys removed from the list.
UPDATE sync_keys SET member = 0, absent_runs = 0, updated_at = :now
WHERE sync = :sync AND key IN (SELECT value FROM json_each(:keys));

-- name: start_run
-- A new run.
INSERT INTO sync_runs (sync, started_at, heartbeat_at, status, details) VALUES (:sync, :now, :now, 'running', :details)
RETURNING id;

-- name: running
-- The newest run of a sync still marked running.
SELECT id, heartbeat_at, details FROM sync_runs WHERE sync = :sync AND status = 'running' ORDER BY id DESC LIMIT 1;

-- name: interrupt_runs
-- Runs marked running whose process is gone.
UPDATE sync_runs SET status = 'interrupted', finished_at = heartbeat_at WHERE sync = :sync AND status = 'running';

-- name: heartbeat
-- A run is still going.
UPDATE sync_runs SET heartbeat_at = :now WHERE id = :run;

-- name: finish_run
-- A run's end and summary.
UPDATE sync_runs SET status = :status, finished_at = :now, heartbeat_at = :now, summary = :summary WHERE id = :run;

-- name: runs
-- Recent runs, newest first (:sync NULL: every sync's).
SELECT id, sync, started_at, finished_at, status, details, summary FROM sync_runs
WHERE :sync IS NULL OR sync = :sync ORDER BY id DESC LIMIT :limit;

-- name: get_list
-- The list a sync sends to.
SELECT list_name, list_id FROM sync_lists WHERE sync = :sync;

-- name: set_list
-- Remember the list a sync sends to.
INSERT INTO sync_lists (sync, list_name, list_id) VALUES (:sync, :list_name, :list_id)
ON CONFLICT (sync) DO UPDATE SET list_name = excluded.list_name, list_id = excluded.list_id;

-- name: reset_members
-- The sync's list was replaced (deleted and created again): nobody is its member yet.
UPDATE sync_keys SET member = 0, absent_runs = 0 WHERE sync = :sync AND member = 1;
