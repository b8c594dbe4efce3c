"""One run of one sync: read, compare with the state, send the changes, remove who left, summarise.

The order of a run, and what it guarantees:

1. The source opens and says its columns (an unreadable source or a clash of columns stops here,
   before anything is recorded or sent); the rows are counted for the estimate printed first.
2. The list is found by name: the first call to Klaviyo, so a refused key stops the run before any
   change ("Invalid credentials"). A missing list is created; Klaviyo's 1000 lists and segments or
   its daily creation cap refuse the run, still before any change. Import jobs a killed run left
   unfollowed are followed now, so what Klaviyo acknowledged then is not sent again.
3. Rows stream in batches: each row is read (key, checksum), looked up in the state, and only new
   or changed rows (or rows not yet members) are converted and put into bulk import jobs of up to
   10 000 profiles / 5 MB, with ``relationships.lists`` so they join the list in the same job.
   Jobs are sent while the next rows are read, as many at a time as the endpoint's limits allow;
   each is recorded once Klaviyo accepts it, followed to its end, and its import errors are mapped
   back to their rows (report) and to failed keys (sent again next run).
4. ``mirror``: once every row was read and every job settled, members this sync added that the
   query no longer returns are removed (after ``grace_runs`` absences), by stored profile ids —
   never members anyone else added. Removing more than ``max_removal_percent`` of them is refused.
5. The summary is printed and kept in the run history (``sync-runs``).

``dry_run`` does all the reading and comparing, sends nothing and records nothing but the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import orjson
import structlog

from router.destination import Destination
from router.fields import Context
from router.klaviyo.imports import IMPORT_PATH
from router.mapping import load_mappings
from router.sync.columns import column_table
from router.sync.config import SyncConfig
from router.sync.convert import PROCESS_FROM_ROWS, Converted, Converter
from router.sync.plan import (
    MAX_FILTER_VALUES,
    MAX_JOB_BYTES,
    MAX_JOB_PROFILES,
    MAX_LIST_IDS,
    MAX_SUBSCRIBE,
    Change,
    estimate,
    removal_refusal,
)
from router.sync.report import CsvOut, Progress, Report
from router.sync.rows import Invalid, Row, RowReader, key_identifier
from router.sync.send import Klaviyo, Refused
from router.sync.sources import BadRow, Rows, Source, SourceError, open_source
from router.sync.state import AlreadyRunning, Changed, SyncState

log = structlog.get_logger("router.sync")

#: Import jobs in flight at once (Klaviyo's burst for bulk imports is 10 a second).
JOBS_IN_FLIGHT: Final = 8
#: Keys shown per kind in a dry run's sample.
SAMPLE: Final = 5
HEARTBEAT_SECONDS: Final = 30.0
_POINTER: Final = re.compile(r"\(at (/[^)]*)\)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """How one run is done and reported (the ``sync`` command's flags)."""

    dry_run: bool = False
    report: Path | None = None
    csv_out: Path | None = None
    #: Progress display on stderr (a bar on a terminal, lines otherwise).
    progress: bool = True
    #: Print the estimate before sending (``serve``'s scheduled runs only log their summary).
    estimate: bool = True
    #: Rows (by the source's count) from which rows are converted in a process of their own.
    process_from_rows: int = PROCESS_FROM_ROWS
    #: Where the estimate and notes go (stderr by default).
    notes: IO[str] | None = None


@dataclass(slots=True, kw_only=True)
class Summary:
    """What a run did; ``to_json`` is the ``--json`` output and the history's record."""

    sync: str
    run_id: int | None = None
    status: str = "running"
    dry_run: bool = False
    rows: int = 0
    invalid: int = 0
    sent: int = 0
    unchanged: int = 0
    failed: int = 0
    added: int = 0
    removed: int = 0
    creates: int = 0
    updates: int = 0
    removals: int = 0
    seconds: float = 0.0
    requests: int = 0
    list_name: str | None = None
    list_id: str | None = None
    list_created: bool = False
    message: str | None = None
    sample: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["sample"] = dict(self.sample) if self.dry_run else {}
        return data

    def text(self) -> str:
        head = f"sync {self.sync}" + (f" (run {self.run_id})" if self.run_id else "")
        if self.dry_run:
            body = (
                f"dry run: {self.rows} rows, {self.creates} to create, {self.updates} to update, "
                f"{self.unchanged} unchanged, {self.invalid} invalid, {self.removals} to remove"
            )
        else:
            body = (
                f"{self.status}: {self.rows} rows, {self.sent} sent, {self.unchanged} unchanged, "
                f"{self.invalid} invalid, {self.failed} failed, {self.added} added, {self.removed} removed"
            )
        lines = [f"{head}: {body}, {self.seconds:.1f} s, {self.requests} requests"]
        if self.list_name:
            lines.append(
                f"  list {self.list_name!r}: {self.list_id or 'not created yet'}"
                + (" (created)" if self.list_created else "")
            )
        for kind, keys in self.sample.items() if self.dry_run else ():
            lines.append(f"  {kind}: {', '.join(keys)}")
        if self.message:
            lines.append(f"  {self.message}")
        return "\n".join(lines)


@dataclass(slots=True)
class _Entry:
    """One row inside an import job: enough to record it and report on it, not the row itself."""

    number: int
    key: str
    checksum: str
    was_member: bool
    #: Email / phone of the profile, for a subscribe job (only when the sync subscribes).
    identifiers: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Pending:
    """A row to convert, and what the comparison found."""

    row: Row
    kind: Change
    was_member: bool


@dataclass(slots=True)
class _Job:
    entries: list[_Entry] = field(default_factory=list)
    items: list[bytes] = field(default_factory=list)
    size: int = 0


def fingerprint(config: SyncConfig, destination: Destination, profile_mapping: Path) -> str:
    """Of everything besides a row's cells that shapes what is sent: a change sends every row again."""
    parts = [
        config.full_profile,
        config.clear_empty,
        sorted(config.columns.items()),
        destination.default_phone_region,
        hashlib.blake2b(profile_mapping.read_bytes(), digest_size=8).hexdigest(),
    ]
    return orjson.dumps(parts).decode()


class Runner:
    """Runs one sync once (see the module's docstring for the order and the guarantees)."""

    def __init__(
        self,
        config: SyncConfig,
        destination: Destination,
        state: SyncState,
        klaviyo: Klaviyo,
        options: RunOptions | None = None,
    ) -> None:
        self.config = config
        self.destination = destination
        self.state = state
        self.klaviyo = klaviyo
        self.options = options or RunOptions()
        self.summary = Summary(sync=config.name, dry_run=self.options.dry_run, list_name=config.list_name)
        self.list_id: str | None = None
        self._notes = self.options.notes or sys.stderr
        self._slots = asyncio.Semaphore(JOBS_IN_FLIGHT)
        self._report = Report(None)
        self._csv: CsvOut | None = None
        self._progress: Progress | None = None
        self._source_names: dict[str, str] = {}
        self._started = time.monotonic()

    # -- the run ----------------------------------------------------------------------------------------

    async def run(self) -> Summary:
        """The run; :class:`~router.errors.ConfigError` / :class:`SourceError` before it starts mean
        unusable arguments (nothing recorded or sent)."""
        self._started = time.monotonic()
        mappings = load_mappings(self.destination.mappings_dir)
        source = open_source(self.config.source, query=self.config.query, database=self.config.database)
        try:
            reader = RowReader(
                await source.columns(),
                column_table(mappings),
                renames=self.config.columns,
                full_profile=self.config.full_profile,
                clear_empty=self.config.clear_empty,
                fingerprint=fingerprint(self.config, self.destination, Path(mappings.profile.file)),
                ctx=Context(default_phone_region=self.destination.default_phone_region),
            )
            self._source_names = {name: source_name for source_name, (_, name) in reader.names.items()}
            await self._run(source, reader)
        finally:
            await source.close()
            self._stamp()
        return self.summary

    def _stamp(self) -> None:
        self.summary.seconds = time.monotonic() - self._started
        self.summary.requests = self.klaviyo.requests

    async def _run(self, source: Source, reader: RowReader) -> None:
        details = {
            "source": self.config.describe_source(),
            "list": self.config.list_name,
            "mode": self.config.mode,
            "dry_run": self.options.dry_run,
        }
        try:
            self.summary.run_id = await self.state.start_run(self.config.name, details)
        except AlreadyRunning as exc:
            self.summary.status = "refused"
            self.summary.message = str(exc)
            return
        self._report = Report(self.options.report)
        if self.options.csv_out is not None:
            self._csv = CsvOut(self.options.csv_out, reader.output_columns)
        try:
            total = await source.count()
            if total is not None and self.options.estimate:
                for line in estimate(total).lines():
                    print(f"sync {self.config.name}: {line}", file=self._notes, flush=True)
            self._progress = Progress(
                self.config.name, total, enabled=self.options.progress, stream=self._notes
            )
            self.list_id = await self._prepare_list()
            await self._finish_open_jobs()
            await self._stream(source, reader, total)
            if self.config.mode == "mirror":
                await self._remove()
            self.summary.status = "dry-run" if self.options.dry_run else "done"
        except Refused as exc:
            self.summary.status = "refused"
            self.summary.message = str(exc)
        except SourceError as exc:
            self.summary.status = "failed"
            self.summary.message = f"reading the source failed, nothing removed: {exc}"
        except BaseException as exc:  # recorded as failed (a crash, or cancelled under serve), then raised
            self.summary.status = "failed"
            self.summary.message = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if self._progress is not None:
                self._progress.close()
            self._report.close()
            if self._csv is not None:
                self._csv.close()
            self._stamp()
            summary = self.summary.to_json()
            await self.state.finish_run(self.summary.run_id, self.summary.status, summary)
            log.info("sync_finished", **{k: v for k, v in summary.items() if k != "sample"})

    # -- the list ---------------------------------------------------------------------------------------

    async def _prepare_list(self) -> str | None:
        name = self.config.list_name
        if name is None:
            await self.klaviyo.find_list("")  # checks the key before any change
            return None
        list_id = await self.klaviyo.find_list(name)
        if list_id is None:
            if self.options.dry_run:
                self.summary.message = f"list {name!r} does not exist: a run creates it"
                return None
            list_id = await self.klaviyo.create_list(name)
            self.summary.list_created = True
            log.info("sync_list_created", sync=self.config.name, list=name, list_id=list_id)
        if not self.options.dry_run:
            await self.state.set_list(self.config.name, name, list_id)
        self.summary.list_id = list_id
        return list_id

    async def _finish_open_jobs(self) -> None:
        """Jobs Klaviyo accepted in a run that was killed before their end was known."""
        if self.options.dry_run:
            return
        for job in await self.state.open_jobs(self.config.name):
            log.info("sync_resuming_job", sync=self.config.name, job_id=job.job_id, items=job.items)
            if (await self.klaviyo.get(f"{IMPORT_PATH}/{job.job_id}")).status == 404:  # expired: send again
                gone = dict.fromkeys(range(job.items), f"import job {job.job_id} is gone from Klaviyo")
                await self.state.finish_job(job.job_id, gone, member=False)
                continue
            await self._settle(
                job.job_id, None, member=job.list_id is not None and job.list_id == self.list_id
            )

    # -- reading and sending ------------------------------------------------------------------------------

    async def _stream(self, source: Source, reader: RowReader, total: int | None) -> None:
        converter = Converter(
            reader,
            csv=self._csv is not None,
            identifiers=bool(self.config.subscribe),
            in_process=total is None or total < self.options.process_from_rows,
        )
        number = 0
        beat = time.monotonic()
        job = _Job()
        # a batch is looked up in the state while the next one is read (the database works without
        # the GIL), and converted while the ones after it are; the jobs filled are sent meanwhile
        looking: tuple[asyncio.Future[tuple[dict[str, Changed], set[str]]], list[Row]] | None = None
        converting: deque[tuple[asyncio.Future[list[Converted | Invalid]], list[_Pending]]] = deque()
        try:
            async with asyncio.TaskGroup() as group:
                async for batch in source.batches():
                    rows = self._read(reader, batch, number)
                    number += len(batch)
                    if looking is not None:
                        job = await self._convert(group, job, looking, converting, converter)
                    looking = (asyncio.ensure_future(self._look_up(rows)), rows)
                    # start the look-up now: a batch read ahead is awaited without a pause
                    await asyncio.sleep(0)
                    self.summary.rows = number
                    if self._progress is not None:
                        self._progress.update(read=len(batch))
                    if time.monotonic() - beat > HEARTBEAT_SECONDS:
                        beat = time.monotonic()
                        await self.state.heartbeat(self.summary.run_id or 0)
                if looking is not None:
                    job = await self._convert(group, job, looking, converting, converter)
                    looking = None
                while converting:
                    done, waiting = converting.popleft()
                    job = await self._fill(group, job, waiting, await done)
                if job.entries:
                    await self._dispatch(group, job)
        except BaseExceptionGroup as group:  # one failure (a broken source, a refusal) is raised as itself
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
        finally:
            if looking is not None:
                looking[0].cancel()
            for unfinished, _ in converting:
                unfinished.cancel()
            converter.close()

    async def _convert(
        self,
        group: asyncio.TaskGroup,
        job: _Job,
        looking: tuple[asyncio.Future[tuple[dict[str, Changed], set[str]]], list[Row]],
        converting: deque[tuple[asyncio.Future[list[Converted | Invalid]], list[_Pending]]],
        converter: Converter,
    ) -> _Job:
        """A batch looked up: its rows to send handed to conversion; conversions beyond the
        converter's depth put into jobs. The job being filled."""
        found, rows = looking
        pending = self._compare(rows, *(await found))
        converting.append((asyncio.ensure_future(converter.convert([p.row for p in pending])), pending))
        while len(converting) > converter.depth:
            done, waiting = converting.popleft()
            job = await self._fill(group, job, waiting, await done)
        return job

    def _read(self, reader: RowReader, batch: Rows, before: int) -> list[Row]:
        """The batch's readable rows (numbered from ``before + 1``); the others are reported."""
        rows: list[Row] = []
        for number, raw in enumerate(batch, start=before + 1):
            read = (
                Invalid(number, raw.column, raw.reason)
                if isinstance(raw, BadRow)
                else reader.read(number, raw)
            )
            if isinstance(read, Invalid):
                self._invalid(read)
            else:
                rows.append(read)
        return rows

    async def _look_up(self, rows: Sequence[Row]) -> tuple[dict[str, Changed], set[str]]:
        """The rows the state says must be sent, and keys seen before (:meth:`SyncState.see`).
        Every key is marked seen, so it is kept out of this run's removals, even when a bad value
        keeps its row from being sent (it is reported)."""
        return await self.state.see(
            self.config.name, [(row.key, row.checksum) for row in rows], membership=self.config.uses_list
        )

    def _compare(self, rows: Sequence[Row], changed: dict[str, Changed], before: set[str]) -> list[_Pending]:
        """Rows to convert (new, changed, or for the CSV output); duplicates reported, the rest counted
        (the state left the unchanged rows out in bulk)."""
        if not before and len({row.key for row in rows}) == len(rows):  # no duplicates: the usual
            unique: Sequence[Row] = rows
        else:
            unique = self._unique(rows, before)
        pending: list[_Pending] = []
        unchanged = 0
        for row in unique:
            found = changed.get(row.key)
            if found is not None:
                pending.append(_Pending(row, "update" if found.known else "create", found.member))
                continue
            unchanged += 1
            if self._csv is not None:  # its line of the CSV output
                pending.append(_Pending(row, "unchanged", True))
        self.summary.unchanged += unchanged
        return pending

    def _unique(self, rows: Sequence[Row], before: set[str]) -> list[Row]:
        """The rows whose key no row before them had (the others are reported)."""
        seen: dict[str, int] = {}
        unique: list[Row] = []
        for row in rows:
            if row.key in seen or row.key in before:
                where = f"row {seen[row.key]}" if row.key in seen else "an earlier row"
                self._invalid(Invalid(row.number, "", f"the same {row.key} as {where}: left out"), row.key)
                continue
            seen[row.key] = row.number
            unique.append(row)
        return unique

    async def _fill(
        self,
        group: asyncio.TaskGroup,
        job: _Job,
        pending: Sequence[_Pending],
        converted: Sequence[Converted | Invalid],
    ) -> _Job:
        """Put converted rows into jobs (a full one is sent); the job being filled."""
        for item, result in zip(pending, converted, strict=True):
            if isinstance(result, Invalid):
                self._invalid(result, item.row.key)
                if item.kind == "unchanged":
                    self.summary.unchanged -= 1
                continue
            if self._csv is not None and result.csv_values is not None:
                self._csv.add(result.csv_values)
            if item.kind == "unchanged":
                continue
            if item.kind == "create":
                self.summary.creates += 1
            else:
                self.summary.updates += 1
            row = item.row
            if self.options.dry_run:
                sample = self.summary.sample.setdefault(item.kind, [])
                if len(sample) < SAMPLE:
                    sample.append(row.key)
                continue
            size = len(result.encoded)
            if job.entries and (len(job.items) >= MAX_JOB_PROFILES or job.size + size + 1 > MAX_JOB_BYTES):
                await self._dispatch(group, job)  # full: sent, and a new one filled
                job = _Job()
            job.entries.append(_Entry(row.number, row.key, row.checksum, item.was_member, result.identifiers))
            job.items.append(result.encoded)
            job.size += size + 1
        return job

    def _invalid(self, problem: Invalid, key: str = "") -> None:
        self.summary.invalid += 1
        self._report.add(problem.row, problem.column, problem.reason, key)

    async def _dispatch(self, group: asyncio.TaskGroup, job: _Job) -> None:
        await self._slots.acquire()
        group.create_task(self._send(job))

    async def _send(self, job: _Job) -> None:
        try:
            items, job.items = job.items, []  # the job's bytes are let go once Klaviyo has them
            await self._send_job(job.entries, items)
        finally:
            self._slots.release()

    async def _send_job(self, entries: Sequence[_Entry], items: list[bytes], *, again: bool = True) -> None:
        with_list = self.list_id if not self.config.subscribe else None
        job_id, outcome = await self.klaviyo.import_profiles(items, with_list)
        if job_id is not None:
            items.clear()
        else:
            failed = dict(outcome.failed_items) if outcome.kind == "permanent" else {}
            # Klaviyo named the bad items: the others go again, once
            if again and failed and len(failed) < len(entries):
                await self._fail([(entries[i], reason) for i, reason in failed.items()])
                keep = [i for i in range(len(entries)) if i not in failed]
                await self._send_job([entries[i] for i in keep], [items[i] for i in keep], again=False)
                return
            detail = outcome.detail or "no job id in Klaviyo's answer"
            await self._fail([(entry, f"not sent: {detail}") for entry in entries])
            return
        await self.state.add_job(self.config.name, self.summary.run_id or 0, job_id, len(entries), with_list)
        await self.state.record_sent(
            self.config.name,
            self.summary.run_id or 0,
            job_id,
            [(entry.key, entry.checksum, index) for index, entry in enumerate(entries)],
        )
        if self._progress is not None:
            self._progress.update(sent=len(entries))
        await self._settle(job_id, entries, member=with_list is not None)

    async def _settle(self, job_id: str, entries: Sequence[_Entry] | None, *, member: bool) -> None:
        """Follow a job to its end; record and report what Klaviyo refused, subscribe the rest."""
        result = await self.klaviyo.follow(job_id)
        if result.unknown is not None:
            log.warning("sync_job_unfinished", sync=self.config.name, job_id=job_id, reason=result.unknown)
            self._report.add(
                None,
                "",
                f"import job {job_id}: its end is not known yet ({result.unknown}); the next run follows it",
            )
            if entries is not None:
                self.summary.sent += len(entries)
            return
        refused = dict(result.refused)
        if result.cancelled and entries is not None:
            refused = {index: "Klaviyo cancelled the import job" for index in range(len(entries))}
        if self.config.subscribe and entries is not None and not result.cancelled:
            member = await self._subscribe(entries, refused)
        keys = await self.state.finish_job(job_id, refused, member=member)
        for index, reason in sorted(refused.items()):
            entry = entries[index] if entries is not None and index < len(entries) else None
            self._report.add(
                entry.number if entry else None,
                self._column(reason),
                reason,
                entry.key if entry else keys.get(index, ""),
            )
        if entries is None:
            return
        self.summary.failed += len(refused)
        self.summary.sent += len(entries) - len(refused)
        if member:
            self.summary.added += sum(
                1 for i, e in enumerate(entries) if i not in refused and not e.was_member
            )
        if self._progress is not None:
            self._progress.update(failed=len(refused))

    async def _subscribe(self, entries: Sequence[_Entry], refused: dict[int, str]) -> bool:
        """Subscribe the imported profiles (consent, and the list with it); refused ones are added to ``refused``."""
        assert self.list_id is not None
        ok = True
        chosen = [i for i in range(len(entries)) if i not in refused]
        for start in range(0, len(chosen), MAX_SUBSCRIBE):
            part = chosen[start : start + MAX_SUBSCRIBE]
            profiles = [{"attributes": entries[i].identifiers or {}} for i in part]
            outcome, unmatched = await self.klaviyo.subscribe(profiles, self.list_id, self.config.subscribe)
            for position in unmatched:
                refused[part[position]] = (
                    f"not subscribed: no identifier for {', '.join(self.config.subscribe)}"
                )
            if outcome is not None and outcome.kind != "ok":
                ok = False
                for index in part:
                    refused.setdefault(index, f"not subscribed: {outcome.detail}")
        return ok

    async def _fail(self, failures: Sequence[tuple[_Entry, str]]) -> None:
        await self.state.record_failed(
            self.config.name, self.summary.run_id or 0, [(entry.key, reason) for entry, reason in failures]
        )
        for entry, reason in failures:
            self._report.add(entry.number, self._column(reason), reason, entry.key)
        self.summary.failed += len(failures)
        if self._progress is not None:
            self._progress.update(failed=len(failures))

    def _column(self, reason: str) -> str:
        """The source column an import error's pointer names (``.../attributes/location/city`` → city)."""
        match = _POINTER.search(reason)
        if match is None or "/attributes/" not in match.group(1):
            return ""
        name = match.group(1).rsplit("/", 1)[-1]
        return self._source_names.get(name, name)

    # -- removal ----------------------------------------------------------------------------------------

    async def _remove(self) -> None:
        """Members this sync added that the query no longer returns leave the list (``mirror``)."""
        sync, grace = self.config.name, self.config.grace_runs
        leaving = await self.state.count_leaving(sync, grace)
        self.summary.removals = leaving
        if self.options.dry_run or self.list_id is None:
            for key, _ in await self.state.leaving(sync, grace, limit=SAMPLE):
                self.summary.sample.setdefault("remove", []).append(key)
            return
        members = await self.state.count_members(sync)
        refusal = removal_refusal(leaving, members, self.config.max_removal_percent)
        if refusal is not None and not self.config.allow_mass_removal:
            raise Refused(refusal)
        after = ""
        while page := await self.state.leaving(sync, grace, after=after, limit=MAX_LIST_IDS):
            after = page[-1][0]
            ids = await self._profile_ids(page)
            present = {key: profile_id for key, profile_id in ids.items() if profile_id}
            if present:
                outcome = await self.klaviyo.remove(self.list_id, present.values())
                if outcome.kind != "ok":
                    raise Refused(f"removing members from the list failed: {outcome.detail}")
            await self.state.record_removed(sync, [key for key, _ in page])
            self.summary.removed += len(present)
        await self.state.note_absent(sync)

    async def _profile_ids(self, page: Sequence[tuple[str, str | None]]) -> dict[str, str | None]:
        """Profile ids of members to remove: stored ones, else looked up by identifier (and stored)."""
        ids: dict[str, str | None] = {key: profile_id for key, profile_id in page}
        missing: dict[str, dict[str, str]] = defaultdict(dict)
        for key, profile_id in page:
            if profile_id is None:
                name, value = key_identifier(key)
                missing[name][value] = key
        learnt: dict[str, str] = {}
        for name, by_value in missing.items():
            values = list(by_value)
            for start in range(0, len(values), MAX_FILTER_VALUES):
                found = await self.klaviyo.profile_ids(name, values[start : start + MAX_FILTER_VALUES])
                for value, profile_id in found.items():
                    if value in by_value:
                        learnt[by_value[value]] = profile_id
        await self.state.set_profile_ids(self.config.name, learnt)
        ids.update(learnt)
        return ids


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a group and of the groups inside it."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def run_sync(
    config: SyncConfig,
    destination: Destination,
    state: SyncState,
    klaviyo: Klaviyo,
    options: RunOptions | None = None,
) -> Summary:
    """Run ``config`` once (see :class:`Runner`)."""
    return await Runner(config, destination, state, klaviyo, options).run()
