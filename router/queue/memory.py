"""An in-process queue with the same semantics as the durable backends (tests, dry runs).

Nothing survives the process. Every method runs without awaiting anything, so each call is
atomic with respect to other tasks on the event loop.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from router.queue import (
    CLAIM_WINDOW,
    EnqueueResult,
    Job,
    JobState,
    NewJob,
    QueueOptions,
    check_depth,
    group_by_message,
    key_major,
)

_ACTIVE = (JobState.PENDING, JobState.IN_FLIGHT)


class MemoryQueue:
    """:class:`router.queue.Queue` kept in dicts."""

    def __init__(self, options: QueueOptions | None = None) -> None:
        self.options = options or QueueOptions()
        self._jobs: dict[int, Job] = {}
        #: Ids of pending and in-flight jobs, the only ones :meth:`claim` looks at.
        self._active: set[int] = set()
        #: ``(source, message_id)`` → when it was last accepted.
        self._seen: dict[tuple[str, str], float] = {}
        self._last_id = 0
        self._open = False

    async def open(self) -> None:
        """Nothing to connect to."""
        self._open = True

    async def close(self) -> None:
        """Nothing to release; the jobs are kept until the object is dropped."""
        self._open = False

    async def ping(self) -> None:
        """Raise unless opened."""
        if not self._open:
            raise RuntimeError("memory queue is not open")

    async def enqueue(
        self, jobs: Sequence[NewJob], *, now: float | None = None, max_depth: int | None = None
    ) -> EnqueueResult:
        """Store jobs as pending, skipping ``(source, message_id)`` pairs seen in the dedupe window;
        :class:`router.queue.QueueFull` past ``max_depth`` active jobs (see :class:`Queue`)."""
        now = time.time() if now is None else now
        groups, duplicates = group_by_message(jobs)
        check_depth(len(self._active), len(jobs) - duplicates, max_depth)
        inserted = 0
        for group in groups:
            key = (group[0].source, group[0].message_id)
            seen_at = self._seen.get(key)
            if seen_at is not None and seen_at > now - self.options.dedupe_window:
                duplicates += len(group)
                continue
            self._seen[key] = now
            for new in group:
                self._insert(new, JobState.PENDING, None, now)
            inserted += len(group)
        return EnqueueResult(inserted=inserted, duplicates=duplicates)

    async def add_dead(self, jobs: Sequence[NewJob], reason: str, *, now: float | None = None) -> None:
        """Store jobs directly as dead letters; they do not count for dedupe."""
        now = time.time() if now is None else now
        for new in jobs:
            self._insert(new, JobState.DEAD, reason, now)

    async def claim(
        self, destination: str, limit: int, *, lease_seconds: float, now: float | None = None
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs of a destination, keeping per-key order (see :class:`Queue`)."""
        now = time.time() if now is None else now
        active = sorted(i for i in self._active if self._jobs[i].destination == destination)
        waiting = Counter(self._jobs[i].ordering_key for i in active)
        # keys with an earlier job in flight or waiting for a retry: their later jobs wait
        blocked: set[str] = set()
        eligible: list[tuple[int, str | None]] = []
        for job_id in active:
            if len(eligible) >= CLAIM_WINDOW * limit:
                break
            job = self._jobs[job_id]
            key = job.ordering_key
            ordered = key is not None and waiting[key] <= self.options.hot_key_threshold
            if ordered and key in blocked:
                continue
            if not _due(job, now):
                if key is not None:
                    blocked.add(key)
                continue
            eligible.append((job_id, key))
        lease = {"state": JobState.IN_FLIGHT, "lease_expires_at": now + lease_seconds, "updated_at": now}
        return [self._put(self._jobs[job_id], **lease) for job_id in key_major(eligible, limit)]

    async def ack(self, job_ids: Sequence[int], *, now: float | None = None) -> None:
        """Mark in-flight jobs done."""
        now = time.time() if now is None else now
        for job in self._in_state(job_ids, JobState.IN_FLIGHT):
            self._put(job, state=JobState.DONE, lease_expires_at=None, updated_at=now)

    async def retry(
        self, job_id: int, *, at: float, error: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Return an in-flight job to pending, due at ``at``, counting one attempt."""
        now = time.time() if now is None else now
        for job in self._in_state([job_id], JobState.IN_FLIGHT):
            self._put(
                job,
                state=JobState.PENDING,
                attempts=job.attempts + 1,
                next_attempt_at=at,
                lease_expires_at=None,
                last_error=error,
                updated_at=now,
                progress=job.progress | progress,
            )

    async def dead_letter(
        self, job_id: int, *, reason: str, progress: int = 0, now: float | None = None
    ) -> None:
        """Move a pending or in-flight job to the dead letters, counting one attempt."""
        now = time.time() if now is None else now
        for job in self._in_state([job_id], *_ACTIVE):
            self._put(
                job,
                state=JobState.DEAD,
                attempts=job.attempts + 1,
                lease_expires_at=None,
                last_error=reason,
                updated_at=now,
                progress=job.progress | progress,
            )

    async def extend(self, job_ids: Sequence[int], *, lease_seconds: float, now: float | None = None) -> None:
        """Keep leased jobs leased for another ``lease_seconds``."""
        now = time.time() if now is None else now
        for job in self._in_state(job_ids, JobState.IN_FLIGHT):
            self._put(job, lease_expires_at=now + lease_seconds, updated_at=now)

    async def release(self, job_ids: Sequence[int], *, progress: int = 0, now: float | None = None) -> None:
        """Give back leased jobs without counting an attempt."""
        now = time.time() if now is None else now
        for job in self._in_state(job_ids, JobState.IN_FLIGHT):
            self._put(
                job,
                state=JobState.PENDING,
                lease_expires_at=None,
                updated_at=now,
                progress=job.progress | progress,
            )

    async def get(self, job_id: int) -> Job | None:
        """One job by id."""
        return self._jobs.get(job_id)

    async def list_jobs(
        self,
        state: JobState,
        *,
        limit: int = 100,
        after_id: int = 0,
        reason_contains: str | None = None,
        destination: str | None = None,
    ) -> list[Job]:
        """Jobs in a state with ids above ``after_id``, by id."""
        found: list[Job] = []
        for job_id in sorted(i for i in self._jobs if i > after_id):
            job = self._jobs[job_id]
            if len(found) >= limit:
                break
            if job.state != state or (destination is not None and job.destination != destination):
                continue
            if reason_contains is not None and (
                job.last_error is None or reason_contains not in job.last_error
            ):
                continue
            found.append(job)
        return found

    async def revive(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Dead → pending, due now, with attempts reset; returns how many were revived."""
        now = time.time() if now is None else now
        revived = self._in_state(job_ids, JobState.DEAD)
        for job in revived:
            self._put(job, state=JobState.PENDING, attempts=0, next_attempt_at=now, updated_at=now)
        return len(revived)

    async def oldest_due(self, destination: str, *, now: float | None = None) -> int | None:
        """The oldest job in flight or due, unless it waits behind a retry of its key (see :class:`Queue`)."""
        now = time.time() if now is None else now
        retrying: set[str] = set()
        for job_id in sorted(self._active):
            job = self._jobs[job_id]
            if job.destination != destination:
                continue
            key = job.ordering_key
            if job.state == JobState.IN_FLIGHT:
                return job_id
            if job.next_attempt_at > now:
                if key is not None and job.attempts:
                    retrying.add(key)
            elif key is None or key not in retrying:
                return job_id
        return None

    async def purge(self, job_ids: Sequence[int] | None = None) -> int:
        """Delete dead jobs (all of them when ``job_ids`` is None); returns how many."""
        ids = list(self._jobs) if job_ids is None else job_ids
        dead = self._in_state(ids, JobState.DEAD)
        for job in dead:
            del self._jobs[job.id]
        return len(dead)

    async def delivered(
        self,
        *,
        since: float,
        until: float,
        destination: str | None = None,
        after_id: int = 0,
        limit: int = 1000,
    ) -> list[int]:
        """Ids of done jobs acked in ``[since, until)``, above ``after_id``, by id."""
        found = [
            job.id
            for job in self._jobs.values()
            if job.state == JobState.DONE
            and job.id > after_id
            and since <= job.updated_at < until
            and (destination is None or job.destination == destination)
        ]
        return sorted(found)[:limit]

    async def resend(self, job_ids: Sequence[int], *, now: float | None = None) -> int:
        """Done → pending, due now, attempts, last error and progress cleared; returns how many."""
        now = time.time() if now is None else now
        done = self._in_state(job_ids, JobState.DONE)
        for job in done:
            self._put(
                job,
                state=JobState.PENDING,
                attempts=0,
                next_attempt_at=now,
                last_error=None,
                updated_at=now,
                progress=0,
            )
        return len(done)

    async def counts(self, destination: str | None = None) -> dict[JobState, int]:
        """Number of jobs per state."""
        result = dict.fromkeys(JobState, 0)
        for job in self._jobs.values():
            if destination is None or job.destination == destination:
                result[job.state] += 1
        return result

    async def depth(self) -> int:
        """Active jobs (pending or in flight) of every destination."""
        return len(self._active)

    async def cleanup(self, *, now: float | None = None) -> int:
        """Delete done jobs past retention and dedupe entries past the window; returns how many."""
        now = time.time() if now is None else now
        done_cutoff = now - self.options.retention
        old = [j.id for j in self._jobs.values() if j.state == JobState.DONE and j.updated_at <= done_cutoff]
        for job_id in old:
            del self._jobs[job_id]
        seen_cutoff = now - self.options.dedupe_window
        expired = [key for key, seen_at in self._seen.items() if seen_at <= seen_cutoff]
        for key in expired:
            del self._seen[key]
        return len(old) + len(expired)

    def _insert(self, new: NewJob, state: JobState, error: str | None, now: float) -> None:
        self._last_id += 1
        job = Job(
            id=self._last_id,
            source=new.source,
            destination=new.destination,
            message_id=new.message_id,
            ordering_key=new.ordering_key,
            payload=new.payload,
            state=state,
            attempts=0,
            next_attempt_at=now,
            lease_expires_at=None,
            last_error=error,
            created_at=now,
            updated_at=now,
        )
        self._put(job)

    def _put(self, job: Job, **changes: object) -> Job:
        job = job.evolve(**changes) if changes else job
        self._jobs[job.id] = job
        if job.state in _ACTIVE:
            self._active.add(job.id)
        else:
            self._active.discard(job.id)
        return job

    def _in_state(self, job_ids: Sequence[int], *states: JobState) -> list[Job]:
        jobs = (self._jobs.get(i) for i in dict.fromkeys(job_ids))
        return [job for job in jobs if job is not None and job.state in states]


def _due(job: Job, now: float) -> bool:
    if job.state == JobState.PENDING:
        return job.next_attempt_at <= now
    return job.lease_expires_at is not None and job.lease_expires_at <= now
