"""Audience sync against the fake Klaviyo (a real server on loopback) and real databases."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from processes import child, run_router
from pytest_aiohttp import AiohttpServer

from router.destination import Destination
from router.errors import ConfigError
from router.fake_klaviyo import FakeKlaviyo, build_fake_app, fake_of
from router.klaviyo.client import KlaviyoClient
from router.klaviyo.ratelimit import RateLimits
from router.klaviyo.requests import KlaviyoRequest
from router.mapping import load_mappings
from router.sync.columns import column_table
from router.sync.config import SyncConfig, parse_schedule, parse_sync
from router.sync.plan import estimate, removal_refusal
from router.sync.run import RunOptions, Summary, run_sync
from router.sync.send import Klaviyo, import_body
from router.sync.state import SqliteSyncState, SyncState

ROOT = Path(__file__).resolve().parent.parent
KEY = "pk_sync_test_0123456789"
COLUMNS = ["email", "first_name", "phone_number", "city", "timezone", "latitude", "longitude", "tier"]


def people(count: int, *, start: int = 0, tier: str = "gold") -> list[dict[str, Any]]:
    return [
        {
            "email": f"person{n}@example.com",
            "first_name": f"P{n}",
            "phone_number": f"+1617{2_000_000 + n}",
            "city": "Boston",
            "timezone": "America/New_York",
            "latitude": "42.361145",
            "longitude": "-71.057083",
            "tier": tier,
        }
        for n in range(start, start + count)
    ]


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@dataclass
class Rig:
    """A fake Klaviyo on loopback, a destination pointing at it, and the sync state in SQLite."""

    fake: FakeKlaviyo
    destination: Destination
    state: SyncState
    folder: Path

    def config(self, source: Path, **table: Any) -> SyncConfig:
        table.setdefault("list", "VIP")
        if table["list"] is None:
            del table["list"]
        allow = table.pop("allow_mass_removal", False)
        config = parse_sync({"name": "vip", "source": str(source), **table}, "sync", ("klaviyo",))
        return replace(config, allow_mass_removal=allow)

    async def sync(self, source: Path, *, options: RunOptions | None = None, **table: Any) -> Summary:
        async with aiohttp.ClientSession() as session:
            client = KlaviyoClient(session, self.destination, limits=RateLimits())
            return await run_sync(
                self.config(source, **table),
                self.destination,
                self.state,
                Klaviyo(client, sleep=_no_wait),
                options or RunOptions(progress=False),
            )

    def list_id(self, name: str = "VIP") -> str:
        return next(item.id for item in self.fake.lists.values() if item.name == name)

    def member_emails(self, name: str = "VIP") -> set[str]:
        return {
            self.fake.profiles[profile_id].attributes.get("email", "")
            for profile_id in self.fake.members(self.list_id(name))
        }

    def imported(self) -> int:
        """Profiles sent through bulk import jobs so far."""
        return sum(
            len(record.json["data"]["attributes"]["profiles"]["data"])
            for record in self.fake.requests
            if record.operation_id == "bulk_import_profiles" and record.status == 202
        )


async def _no_wait(seconds: float) -> None:
    await asyncio.sleep(0)


async def started_rig(
    aiohttp_server: AiohttpServer, app: web.Application, state: SyncState, folder: Path
) -> Rig:
    """``app`` served on loopback, a destination pointing at it, and ``state`` opened."""
    server = await aiohttp_server(app)
    await state.open()
    destination = Destination(private_key=KEY, base_url=str(server.make_url("")).rstrip("/"))
    return Rig(fake_of(app), destination, state, folder)


@pytest.fixture
async def rig(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[Rig]:
    app = build_fake_app(rate_limits=False, api_keys=[KEY], import_job_reads=3)
    started = await started_rig(aiohttp_server, app, SqliteSyncState(str(tmp_path / "queue.db")), tmp_path)
    try:
        yield started
    finally:
        await started.state.close()


class TestMirror:
    async def test_first_run_creates_the_list_and_its_members(self, rig: Rig) -> None:
        source = write_csv(rig.folder / "a.csv", people(25))
        summary = await rig.sync(source, full_profile=True)
        assert (summary.status, summary.rows, summary.sent, summary.added, summary.invalid) == (
            "done",
            25,
            25,
            25,
            0,
        )
        assert summary.list_created
        assert rig.member_emails() == {f"person{n}@example.com" for n in range(25)}
        profile = rig.fake.find_profile(email="person3@example.com")
        assert profile is not None
        assert profile.attributes["location"] == {
            "city": "Boston",
            "timezone": "America/New_York",
            "latitude": 42.3611,
            "longitude": -71.0571,
        }
        assert profile.attributes["properties"] == {"tier": "gold"}
        # the job was followed through queued and processing to complete
        reads = [r for r in rig.fake.requests if r.operation_id == "get_bulk_import_profiles_job"]
        assert len(reads) == 3

    async def test_second_run_sends_only_changes_and_leaves_the_list_equal_to_the_query(
        self, rig: Rig
    ) -> None:
        await rig.sync(write_csv(rig.folder / "a.csv", people(25)), full_profile=True)
        other = rig.fake.upsert_profile({"email": "signup@example.com"})[0]
        rig.fake.add_members(rig.list_id(), [other.id])  # added by someone else (a signup form)
        sent_before = rig.imported()

        rows = people(25, start=5)  # 0-4 leave, 25-29 join
        rows[0]["tier"] = "platinum"  # person5 changes
        second = await rig.sync(
            write_csv(rig.folder / "b.csv", rows), full_profile=True, allow_mass_removal=True
        )

        assert (second.sent, second.unchanged, second.added, second.removed) == (6, 19, 5, 5)
        assert rig.imported() - sent_before == 6
        expected = {f"person{n}@example.com" for n in range(5, 30)} | {"signup@example.com"}
        assert rig.member_emails() == expected  # the query's rows, and the other member stays
        changed = rig.fake.find_profile(email="person5@example.com")
        assert changed is not None and changed.attributes["properties"]["tier"] == "platinum"

        third = await rig.sync(write_csv(rig.folder / "c.csv", rows), full_profile=True)
        assert (third.sent, third.unchanged, third.removed, third.requests) == (0, 25, 0, 1)

    async def test_the_removal_guard_refuses_and_removes_nothing(self, rig: Rig) -> None:
        await rig.sync(write_csv(rig.folder / "a.csv", people(10)), full_profile=True)
        summary = await rig.sync(write_csv(rig.folder / "b.csv", people(5)), full_profile=True)
        assert summary.status == "refused"
        assert summary.message is not None and "Refusing to remove 5 of the 10 members" in summary.message
        assert len(rig.fake.members(rig.list_id())) == 10

    async def test_a_source_broken_midway_removes_nothing(self, rig: Rig) -> None:
        await rig.sync(write_csv(rig.folder / "a.csv", people(5)), full_profile=True)
        broken = write_csv(rig.folder / "b.csv", people(2))
        with broken.open("a", encoding="utf-8") as out:
            out.write("x@example.com,1,2,3,4,5,6,7,8,9,10\n")  # more cells than the header
        summary = await rig.sync(broken, full_profile=True, allow_mass_removal=True)
        assert summary.status == "failed"
        assert summary.message is not None and "line 4: 11 fields, the header has 8" in summary.message
        assert len(rig.fake.members(rig.list_id())) == 5

    async def test_an_empty_result_is_stopped_by_the_guard(self, rig: Rig) -> None:
        await rig.sync(write_csv(rig.folder / "a.csv", people(5)), full_profile=True)
        summary = await rig.sync(write_csv(rig.folder / "empty.csv", []), full_profile=True)
        assert (summary.status, summary.rows, summary.removed) == ("refused", 0, 0)
        assert len(rig.fake.members(rig.list_id())) == 5

    async def test_grace_runs_delay_removal(self, rig: Rig) -> None:
        await rig.sync(write_csv(rig.folder / "a.csv", people(10)), full_profile=True)
        smaller = write_csv(rig.folder / "b.csv", people(9))
        first = await rig.sync(smaller, full_profile=True, grace_runs=1)
        assert first.removed == 0 and len(rig.fake.members(rig.list_id())) == 10
        second = await rig.sync(smaller, full_profile=True, grace_runs=1)
        assert second.removed == 1 and "person9@example.com" not in rig.member_emails()

    async def test_rows_converted_in_a_process_of_their_own(self, rig: Rig) -> None:
        """Big runs convert in spawned processes: the same profiles, report and state."""
        rows = people(30)
        rows[4]["timezone"] = "Nowhere/Land"
        rows[7]["email"] = rows[7]["phone_number"] = ""  # no key
        report = rig.folder / "report.csv"
        options = RunOptions(progress=False, process_from_rows=0, report=report)
        summary = await rig.sync(write_csv(rig.folder / "a.csv", rows), full_profile=True, options=options)
        assert (summary.sent, summary.invalid, summary.added) == (28, 2, 28)
        lines = list(csv.DictReader(report.read_text().splitlines()))
        assert sorted((line["row"], line["column"]) for line in lines) == [("5", "timezone"), ("8", "email")]
        again = await rig.sync(write_csv(rig.folder / "a.csv", rows), full_profile=True, options=options)
        assert (again.sent, again.unchanged, again.invalid) == (0, 28, 2)  # the bad rows are reported again

    async def test_subscribe_uses_bulk_subscribe_jobs_with_explicit_consent(self, rig: Rig) -> None:
        rows = people(3)
        rows[2]["email"] = ""  # phone only: no email consent possible
        summary = await rig.sync(
            write_csv(rig.folder / "a.csv", rows), full_profile=True, subscribe=["email"]
        )
        assert (summary.sent, summary.failed, summary.added) == (2, 1, 2)
        list_id = rig.list_id()
        for n in (0, 1):
            profile = rig.fake.find_profile(email=f"person{n}@example.com")
            assert profile is not None
            assert rig.fake.consent(profile.id, "email.marketing") == "SUBSCRIBED"
            assert rig.fake.subscriptions[profile.id]["email.marketing"].list_id == list_id
        imports = [r for r in rig.fake.requests if r.operation_id == "bulk_import_profiles"]
        assert all("relationships" not in r.json["data"] for r in imports)  # membership comes with consent

    async def test_add_mode_never_removes(self, rig: Rig) -> None:
        await rig.sync(write_csv(rig.folder / "a.csv", people(10)), full_profile=True, mode="add")
        summary = await rig.sync(write_csv(rig.folder / "b.csv", people(2)), full_profile=True, mode="add")
        assert (summary.status, summary.removed) == ("done", 0)
        assert len(rig.fake.members(rig.list_id())) == 10

    async def test_upsert_mode_sends_profiles_without_a_list(self, rig: Rig) -> None:
        summary = await rig.sync(write_csv(rig.folder / "a.csv", people(3)), full_profile=True, list=None)
        assert (summary.status, summary.sent) == ("done", 3)
        assert rig.fake.lists == {} and len(rig.fake.profiles) == 3

    async def test_a_recreated_list_gets_every_member_again(self, rig: Rig) -> None:
        source = write_csv(rig.folder / "a.csv", people(4))
        await rig.sync(source, full_profile=True)
        del rig.fake.lists[rig.list_id()]  # deleted in Klaviyo
        summary = await rig.sync(source, full_profile=True)
        assert (summary.list_created, summary.sent, summary.added) == (True, 4, 4)
        assert len(rig.member_emails()) == 4


class TestRows:
    async def test_bad_rows_are_reported_and_the_rest_go_on(self, rig: Rig) -> None:
        rows = people(6)
        rows[1]["phone_number"] = "12345"
        rows[2]["timezone"] = "Mars/Olympus"
        rows[3]["email"] = rows[3]["phone_number"] = ""
        rows[4]["latitude"] = "north"
        rows[5]["email"] = "not-an-email"
        report = rig.folder / "report.csv"
        summary = await rig.sync(
            write_csv(rig.folder / "a.csv", rows),
            full_profile=True,
            options=RunOptions(progress=False, report=report),
        )
        assert (summary.rows, summary.invalid, summary.sent) == (6, 5, 1)
        lines = sorted(csv.DictReader(report.read_text().splitlines()), key=lambda line: int(line["row"]))
        assert [(line["row"], line["column"]) for line in lines] == [
            ("2", "phone_number"),
            ("3", "timezone"),
            ("4", "email"),
            ("5", "latitude"),
            ("6", "email"),
        ]
        reasons = [line["reason"] for line in lines]
        assert "Phone number is not in E.164 format ('12345')" in reasons[0]
        assert "'Mars/Olympus' is not an IANA time zone name" in reasons[1]
        assert "an email is required" in reasons[2] or "no identifier" in reasons[2]
        assert "expected a number, got 'north'" in reasons[3]
        assert "'not-an-email' is not a valid email address" in reasons[4]

    async def test_import_errors_are_mapped_back_to_rows_and_sent_again(self, rig: Rig) -> None:
        rig.fake.fail_bulk_items("bulk_import_profiles", values=["person2@example.com"], detail="Nope.")
        report = rig.folder / "report.csv"
        source = write_csv(rig.folder / "a.csv", people(4))
        summary = await rig.sync(source, full_profile=True, options=RunOptions(progress=False, report=report))
        assert (summary.sent, summary.failed) == (3, 1)
        (line,) = list(csv.DictReader(report.read_text().splitlines()))
        assert (line["row"], line["key"]) == ("3", "email:person2@example.com")
        assert "Nope." in line["reason"]
        rig.fake.clear_faults()
        again = await rig.sync(source, full_profile=True)
        assert (again.sent, again.unchanged) == (1, 3)

    async def test_a_jobs_import_errors_are_mapped_back_to_rows(self, rig: Rig) -> None:
        rig.fake.refuse_in_imports(["+16172000003"], "This phone number belongs to another profile.")
        report = rig.folder / "report.csv"
        source = write_csv(rig.folder / "a.csv", people(5))
        summary = await rig.sync(source, full_profile=True, options=RunOptions(progress=False, report=report))
        assert (summary.sent, summary.failed, summary.added) == (4, 1, 4)
        (line,) = list(csv.DictReader(report.read_text().splitlines()))
        assert (line["row"], line["column"], line["key"]) == (
            "4",
            "phone_number",
            "email:person3@example.com",
        )
        assert "belongs to another profile" in line["reason"]
        assert "person3@example.com" not in rig.member_emails()
        rig.fake.import_refusals.clear()
        again = await rig.sync(source, full_profile=True)
        assert (again.sent, again.unchanged, again.added) == (1, 4, 1)

    async def test_a_cell_not_utf8_or_too_long_is_a_bad_row_and_the_run_goes_on(self, rig: Rig) -> None:
        rows = people(7)
        rows[2]["city"] = "Bo__ston"
        rows[4]["tier"] = "x" * 5_000_000  # one line, unquoted
        rows[5]["tier"] = "line\n" * 40_000  # quoted, over many lines
        path = write_csv(rig.folder / "a.csv", rows)
        path.write_bytes(path.read_bytes().replace(b"Bo__ston", b"Bo\xffston"))
        report = rig.folder / "report.csv"
        summary = await rig.sync(path, full_profile=True, options=RunOptions(progress=False, report=report))
        assert (summary.status, summary.rows, summary.invalid, summary.sent) == ("done", 7, 3, 4)
        lines = list(csv.DictReader(report.read_text().splitlines()))
        assert [(line["row"], line["column"]) for line in lines] == [
            ("3", "city"),
            ("5", "tier"),
            ("6", "tier"),
        ]
        assert lines[0]["reason"] == "not UTF-8 text: byte 0xff at character 3"
        assert "a cell of more than 131072 characters" in lines[1]["reason"]
        assert lines[1]["reason"] == lines[2]["reason"]
        assert rig.member_emails() == {f"person{n}@example.com" for n in (0, 1, 3, 6)}

    async def test_bad_ndjson_lines_are_bad_rows_and_the_run_goes_on(self, rig: Rig) -> None:
        path = rig.folder / "rows.ndjson"
        lines = [orjson.dumps(row) for row in people(3)]
        lines[1:1] = [
            b'{"email": "bad\xff@example.com"}',
            b"[1, 2]",
            b'{"email": "big@example.com", "note": "' + b"x" * 2_000_000 + b'"}',
            b"{not json",
        ]
        path.write_bytes(b"\n".join(lines) + b"\n")
        report = rig.folder / "report.csv"
        summary = await rig.sync(path, full_profile=True, options=RunOptions(progress=False, report=report))
        assert (summary.status, summary.rows, summary.invalid, summary.sent) == ("done", 7, 4, 3)
        found = [(line["row"], line["reason"]) for line in csv.DictReader(report.read_text().splitlines())]
        assert [row for row, _ in found] == ["2", "3", "4", "5"]
        assert "line 2: not valid JSON" in found[0][1] and "UTF-8" in found[0][1]
        assert found[1][1] == "line 3: expected a JSON object, got list"
        assert "line 4: the line is over 1048576 bytes long" in found[2][1]
        assert "line 5: not valid JSON" in found[3][1]

    async def test_email_only_sends_identity_only_and_needs_an_email(self, rig: Rig) -> None:
        rows = people(3)
        rows[2]["email"] = ""
        summary = await rig.sync(write_csv(rig.folder / "a.csv", rows))
        assert (summary.sent, summary.invalid) == (2, 1)
        profile = rig.fake.find_profile(email="person0@example.com")
        assert profile is not None
        assert set(profile.attributes) == {"email", "phone_number"}

    async def test_klaviyo_csv_names_renames_and_properties(self, rig: Rig) -> None:
        path = rig.folder / "a.csv"
        columns = ["Amperity ID", "Email", "PhoneNumber", "properties", "Store"]
        write_csv(
            path,
            [
                {
                    "Amperity ID": "amp-1",
                    "Email": "A@Example.com",
                    "PhoneNumber": "",
                    "properties": '{"vip": true}',
                    "Store": "7",
                }
            ],
            columns,
        )
        await rig.sync(path, full_profile=True, columns={"Amperity ID": "external_id"})
        profile = rig.fake.find_profile(email="A@Example.com")
        assert profile is not None
        assert profile.attributes["external_id"] == "amp-1"
        assert profile.attributes["properties"] == {"vip": True, "Store": "7"}

    async def test_csv_out_has_klaviyos_headers_first(self, rig: Rig) -> None:
        out = rig.folder / "klaviyo.csv"
        source = write_csv(rig.folder / "a.csv", people(2))
        await rig.sync(
            source, full_profile=True, options=RunOptions(progress=False, csv_out=out, dry_run=True)
        )
        header, first, *_ = list(csv.reader(out.read_text().splitlines()))
        assert header[:3] == ["Email", "PhoneNumber", "ExternalID"]
        assert header[3:] == ["first_name", "city", "timezone", "latitude", "longitude", "tier"]
        assert first[:2] == ["person0@example.com", "+16172000000"]

    async def test_clear_empty_unsets_custom_properties(self, rig: Rig) -> None:
        source = write_csv(rig.folder / "a.csv", people(1))
        await rig.sync(source, full_profile=True)
        rows = people(1)
        rows[0]["tier"] = ""
        await rig.sync(write_csv(rig.folder / "b.csv", rows), full_profile=True)
        profile = rig.fake.find_profile(email="person0@example.com")
        assert profile is not None and profile.attributes["properties"] == {"tier": "gold"}  # kept by default
        await rig.sync(write_csv(rig.folder / "c.csv", rows), full_profile=True, clear_empty=True)
        assert profile.attributes["properties"] == {}


class TestResume:
    async def test_an_open_job_gone_from_klaviyo_is_sent_again(self, rig: Rig) -> None:
        source = write_csv(rig.folder / "a.csv", people(3))
        run = await rig.state.start_run("vip", {})
        await rig.state.add_job("vip", run, "01GONE", 3, None)
        await rig.state.record_sent(
            "vip", run, "01GONE", [(f"email:person{n}@example.com", "x", n) for n in range(3)]
        )
        await rig.state.finish_run(run, "interrupted", {})
        summary = await rig.sync(source, full_profile=True)
        assert (summary.status, summary.sent) == ("done", 3)
        assert await rig.state.open_jobs("vip") == []


class TestRefusals:
    async def test_dry_run_changes_nothing(self, rig: Rig) -> None:
        summary = await rig.sync(
            write_csv(rig.folder / "a.csv", people(5)),
            full_profile=True,
            options=RunOptions(progress=False, dry_run=True),
        )
        assert (summary.status, summary.creates, summary.sent) == ("dry-run", 5, 0)
        assert summary.sample["create"][:2] == ["email:person0@example.com", "email:person1@example.com"]
        assert rig.fake.lists == {} and rig.fake.profiles == {}
        assert {r.method for r in rig.fake.requests} == {"GET"}
        real = await rig.sync(write_csv(rig.folder / "a.csv", people(5)), full_profile=True)
        assert real.sent == 5  # the dry run recorded nothing the real run would skip

    async def test_invalid_key_changes_nothing(self, rig: Rig) -> None:
        rig.destination = replace(rig.destination, private_key="pk_wrong_000000000")
        summary = await rig.sync(write_csv(rig.folder / "a.csv", people(5)), full_profile=True)
        assert summary.status == "refused"
        assert summary.message is not None and summary.message.startswith("Invalid credentials:")
        assert rig.fake.lists == {} and rig.fake.profiles == {}

    async def test_a_key_refused_midway_stops_the_run(self, rig: Rig) -> None:
        rig.fake.script("bulk_import_profiles", [401])
        summary = await rig.sync(write_csv(rig.folder / "a.csv", people(3)), full_profile=True)
        assert summary.status == "refused"
        assert summary.message is not None and summary.message.startswith("Invalid credentials:")
        again = await rig.sync(write_csv(rig.folder / "a.csv", people(3)), full_profile=True)
        assert (again.status, again.sent) == ("done", 3)  # nothing was recorded as sent

    async def test_an_account_at_1000_lists_changes_nothing(self, rig: Rig) -> None:
        for number in range(1000):
            rig.fake.create_list(f"list {number}")
        summary = await rig.sync(write_csv(rig.folder / "a.csv", people(5)), full_profile=True)
        assert summary.status == "refused"
        assert summary.message is not None and summary.message.startswith("Maximum number of lists exceeded:")
        assert "Remove unused lists or segments" in summary.message
        assert rig.fake.profiles == {}

    async def test_the_daily_list_creation_cap_changes_nothing(
        self, aiohttp_server: AiohttpServer, tmp_path: Path
    ) -> None:
        app = build_fake_app(api_keys=[KEY], rate_limit_scale=1 / 150)  # 1 list a day, 1 a second
        rig = await started_rig(aiohttp_server, app, SqliteSyncState(str(tmp_path / "queue.db")), tmp_path)
        state = rig.state
        try:
            source = write_csv(tmp_path / "a.csv", people(2))
            assert (await rig.sync(source, list="first")).status == "done"
            summary = await rig.sync(source, list="second")
        finally:
            await state.close()
        assert summary.status == "refused"
        assert summary.message is not None and summary.message.startswith(
            "Daily list creation limit reached:"
        )
        assert [item.name for item in rig.fake.lists.values()] == ["first"]

    async def test_a_second_run_of_the_same_sync_is_refused_while_one_goes_on(self, rig: Rig) -> None:
        run = await rig.state.start_run("vip", {})
        summary = await rig.sync(write_csv(rig.folder / "a.csv", people(1)))
        assert summary.status == "refused" and "already running" in (summary.message or "")
        await rig.state.finish_run(run, "done", {})


# -- sources -----------------------------------------------------------------------------------------------


def _rows() -> list[dict[str, Any]]:
    return [{"email": f"s{n}@example.com", "first_name": f"S{n}", "score": n} for n in range(7)]


def _csv(path: Path) -> Path:
    return write_csv(path / "rows.csv", _rows(), ["email", "first_name", "score"])


def _csv_gz(path: Path) -> Path:
    target = path / "rows.csv.gz"
    target.write_bytes(gzip.compress(_csv(path).read_bytes()))
    return target


def _ndjson(path: Path) -> Path:
    target = path / "rows.ndjson.gz"
    target.write_bytes(gzip.compress(b"".join(orjson.dumps(row) + b"\n" for row in _rows())))
    return target


def _parquet(path: Path) -> Path:
    import pyarrow
    import pyarrow.parquet

    target = path / "rows.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(_rows()), str(target))
    return target


FILES = {"csv": _csv, "csv.gz": _csv_gz, "ndjson.gz": _ndjson, "parquet": _parquet}


class TestSources:
    @pytest.mark.parametrize("kind", list(FILES))
    async def test_each_file_kind(self, rig: Rig, kind: str) -> None:
        summary = await rig.sync(FILES[kind](rig.folder), full_profile=True)
        assert (summary.rows, summary.sent) == (7, 7)
        profile = rig.fake.find_profile(email="s3@example.com")
        assert profile is not None and profile.attributes["first_name"] == "S3"
        assert str(profile.attributes["properties"]["score"]) == "3"

    @pytest.mark.parametrize("kind", ["csv.gz", "ndjson.gz"])
    async def test_a_gzip_file_cut_short_is_a_clear_error_before_any_change(
        self, rig: Rig, kind: str
    ) -> None:
        path = rig.folder / f"big.{kind}"
        rows = people(20_000)  # more than the first block read
        if kind == "csv.gz":
            text = write_csv(rig.folder / "big.csv", rows).read_bytes()
        else:
            text = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        whole = gzip.compress(text)
        path.write_bytes(whole[: len(whole) // 2])
        summary = await rig.sync(path, full_profile=True)
        assert (summary.status, summary.sent) == ("failed", 0)
        assert summary.message is not None
        assert f"big.{kind}: cannot be read to its end: Compressed file ended before the" in summary.message
        assert rig.fake.lists == {}

    async def test_sqlite_query(self, rig: Rig) -> None:
        database = rig.folder / "crm.db"
        with sqlite3.connect(database) as db:
            db.execute("CREATE TABLE customers (email TEXT, first_name TEXT, score INTEGER)")
            db.executemany("INSERT INTO customers VALUES (:email, :first_name, :score)", _rows())
        summary = await self._query(rig, f"sqlite:///{database}", "SELECT * FROM customers WHERE score < 5")
        assert (summary.rows, summary.sent) == (5, 5)

    async def test_duckdb_query_of_a_parquet_file(self, rig: Rig) -> None:
        parquet = _parquet(rig.folder)
        summary = await self._query(rig, "duckdb:///:memory:", f"SELECT * FROM '{parquet}' WHERE score >= 2")
        assert (summary.rows, summary.sent) == (5, 5)

    @pytest.mark.postgres
    async def test_postgresql_query(self, rig: Rig, fresh_postgres_url: str) -> None:
        import asyncpg

        connection = await asyncpg.connect(fresh_postgres_url)
        try:
            await connection.execute("CREATE TABLE customers (email text, first_name text, score numeric)")
            await connection.executemany(
                "INSERT INTO customers VALUES ($1, $2, $3)",
                [(r["email"], r["first_name"], r["score"]) for r in _rows()],
            )
        finally:
            await connection.close()
        summary = await self._query(rig, fresh_postgres_url, "SELECT email, first_name, score FROM customers")
        assert (summary.rows, summary.sent) == (7, 7)
        profile = rig.fake.find_profile(email="s6@example.com")
        assert profile is not None and profile.attributes["properties"] == {"score": 6}

    async def _query(self, rig: Rig, database: str, query: str) -> Summary:
        config = parse_sync(
            {"name": "q", "query": query, "database": database, "list": "Q", "full_profile": True},
            "sync",
            ("klaviyo",),
        )
        async with aiohttp.ClientSession() as session:
            client = KlaviyoClient(session, rig.destination, limits=RateLimits())
            return await run_sync(
                config, rig.destination, rig.state, Klaviyo(client), RunOptions(progress=False)
            )


class TestPostgresState:
    @pytest.mark.postgres
    async def test_state_in_postgresql(
        self, aiohttp_server: AiohttpServer, tmp_path: Path, fresh_postgres_url: str
    ) -> None:
        """The same runs with the state in PostgreSQL (the queue's database when queue.url is postgresql://)."""
        from router.sync.state import open_state

        app = build_fake_app(rate_limits=False, api_keys=[KEY])
        rig = await started_rig(aiohttp_server, app, open_state(fresh_postgres_url), tmp_path)
        state = rig.state
        try:
            await rig.sync(write_csv(tmp_path / "a.csv", people(10)), full_profile=True)
            second = await rig.sync(
                write_csv(tmp_path / "b.csv", people(9)), full_profile=True, max_removal_percent=50
            )
            assert (second.unchanged, second.removed) == (9, 1)
            assert [run.status for run in await state.runs("vip")] == ["done", "done"]
            await state.open()  # migrating twice is harmless
        finally:
            await state.close()


# -- killed midway, and serve's schedule (child processes) --------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, which only waits to be reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _config(folder: Path, fake_url: str, extra: str = "") -> Path:
    path = folder / "router.toml"
    path.write_text(
        f"""
data_dir = "{folder / "data"}"
[server]
port = 0
[delivery]
workers = 0
[[sources]]
name = "web"
write_key = "wk-sync-test-0123456"
destinations = ["klaviyo"]
[[destinations]]
name = "klaviyo"
private_key = "{KEY}"
base_url = "{fake_url}"
{extra}
"""
    )
    return path


CONVERTING_PARENT = """
import asyncio, os, sys
from router.destination import Destination
from router.fields import Context
from router.mapping import load_mappings
from router.sync.columns import column_table
from router.sync.convert import Converter
from router.sync.rows import RowReader

async def main():
    reader = RowReader(["email"], column_table(load_mappings(Destination().mappings_dir)), renames={},
                       full_profile=True, clear_empty=False, fingerprint="", ctx=Context())
    converter = Converter(reader, csv=False, identifiers=False, in_process=False)
    rows = [reader.read(n, {"email": f"p{n}@example.com"}) for n in range(1, 9)]
    await asyncio.gather(*(converter.convert(rows[n::2]) for n in range(2)))
    print(" ".join(str(pid) for pid in converter._pool._processes), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


class TestChildProcesses:
    def test_converting_processes_exit_when_their_parent_is_killed(self) -> None:
        with subprocess.Popen(
            [sys.executable, "-c", CONVERTING_PARENT], stdout=subprocess.PIPE, cwd=ROOT
        ) as parent:
            assert parent.stdout is not None
            workers = [int(pid) for pid in parent.stdout.readline().split()]
            assert workers and all(_alive(pid) for pid in workers)
            parent.kill()
            parent.wait()
        deadline = time.monotonic() + 30
        while left := [pid for pid in workers if _alive(pid)]:
            assert time.monotonic() < deadline, f"converting processes {left} outlived their parent"
            time.sleep(0.01)

    @pytest.mark.timeout(150)
    async def test_a_run_killed_midway_resumes_without_resending(
        self, aiohttp_server: AiohttpServer, tmp_path: Path
    ) -> None:
        app = build_fake_app(rate_limits=False, api_keys=[KEY])
        fake = fake_of(app)
        fake.faults.hold_seconds = 30.0
        fake.script("get_bulk_import_profiles_job", ["timeout"])  # the first job's end never comes
        server = await aiohttp_server(app)
        config = _config(tmp_path, str(server.make_url("")).rstrip("/"))
        source = write_csv(tmp_path / "a.csv", people(12_000))  # two import jobs
        args = ("sync", str(source), "--list", "VIP", "--config", str(config), "--no-progress")

        async with child("sync", args, tmp_path) as first:
            await first.until(
                lambda: sum(r.operation_id == "bulk_import_profiles" for r in fake.requests) == 2
            )
            await asyncio.sleep(0.5)  # the second job is followed; the first one's end is held
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        accepted = sum(r.operation_id == "bulk_import_profiles" and r.status == 202 for r in fake.requests)
        assert accepted == 2

        second = await run_router([*args, "--json"], within=120)
        assert second.status == 0, (second.stdout + second.stderr).decode()[-2000:]
        assert sum(r.operation_id == "bulk_import_profiles" for r in fake.requests) == 2  # nothing sent again
        (list_id,) = fake.lists
        assert len(fake.members(list_id)) == 12_000

    @pytest.mark.timeout(60)
    async def test_serve_runs_a_scheduled_sync(self, aiohttp_server: AiohttpServer, tmp_path: Path) -> None:
        app = build_fake_app(rate_limits=False, api_keys=[KEY])
        fake = fake_of(app)
        server = await aiohttp_server(app)
        source = write_csv(tmp_path / "a.csv", people(3))
        extra = f"""
[[syncs]]
name = "vip"
source = "{source}"
list = "VIP"
schedule = "every 1h"
"""
        config = _config(tmp_path, str(server.make_url("")).rstrip("/"), extra)
        async with child("serve", ["serve", "--config", str(config)], tmp_path) as router:
            await router.until(lambda: any(len(members) == 3 for members in fake.memberships.values()))
            await router.until(lambda: _statuses(tmp_path / "data" / "queue.db") == ["done"])
            assert await router.stop() == 0
        listed = await run_router(["sync-runs", "--json", "--config", str(config)])
        runs = [orjson.loads(line) for line in listed.stdout.splitlines()]
        assert [(run["sync"], run["status"]) for run in runs] == [("vip", "done")]


def _statuses(database: Path) -> list[str]:
    """The statuses of the runs recorded so far (none while the tables do not exist)."""
    try:
        with contextlib.closing(sqlite3.connect(database)) as db:
            return [row[0] for row in db.execute("SELECT status FROM sync_runs ORDER BY id")]
    except sqlite3.Error:
        return []


class TestSandbox:
    async def test_the_sandbox_has_the_configured_list_and_refuses_others(self, tmp_path: Path) -> None:
        """A mistyped list id fails in the sandbox as it would in Klaviyo (issue 14, item 9)."""
        from router.sandbox import sandbox_klaviyo
        from router.settings import Settings

        settings = replace(Settings.embedded_default(tmp_path, env={}), data_dir=tmp_path)
        settings = settings.with_destination(replace(settings.destinations[0], list_id="XUepkK"))
        async with sandbox_klaviyo(settings) as (sandboxed, running), aiohttp.ClientSession() as session:
            assert running is not None
            destination = sandboxed.destinations[0]
            client = KlaviyoClient(session, destination)
            for list_id, expected in (("XUepkK", "ok"), ("XUepkk", "permanent")):
                profile = b'{"type":"profile","attributes":{"email":"ada@example.com"}}'
                request = KlaviyoRequest.from_json(
                    import_body([profile], list_id), path="/api/profile-bulk-import-jobs"
                )
                outcome = await client.send(request)
                assert outcome.kind == expected, outcome
            assert "List 'XUepkk' does not exist" in outcome.detail


class TestCommand:
    def test_sync_runs_counts_its_runs(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        from router.cli import main
        from router.settings import Settings
        from router.sync.state import open_state

        config = _config(tmp_path, "http://127.0.0.1:9")
        counted = []
        for _ in range(3):
            assert main(["sync-runs", "--config", str(config)]) == 0
            counted.append(capsys.readouterr().out.splitlines()[-1])

            async def one_run() -> None:
                settings = Settings.load(config)
                state = open_state(settings.resolved_queue_url)
                await state.open()
                try:
                    await state.finish_run(await state.start_run("vip", {}), "done", {"rows": 1})
                finally:
                    await state.close()

            asyncio.run(one_run())
        assert counted == ["0 runs", "1 run", "2 runs"]

    @pytest.mark.parametrize(
        ("args", "reason"),
        [
            (["missing.csv", "--list", "VIP"], "missing.csv: cannot read"),
            (["--name", "nope"], "--name: no [[syncs]] named 'nope'"),
            ([], "give either source (a file) or query"),
            (["--query", "SELECT 1", "--list", "VIP"], "a query needs a database"),
            (["a.csv", "--mode", "mirror"], "mode mirror needs the name of a list"),
            (["a.csv", "--list", "VIP", "--column", "oops"], "expected SOURCE COLUMN=PROFILE COLUMN"),
        ],
    )
    def test_unusable_arguments_exit_2_with_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
    ) -> None:
        from router.cli import main

        config = _config(tmp_path, "http://127.0.0.1:9")
        assert main(["sync", *args, "--config", str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert reason in err and len(err.splitlines()) == 1, err


class TestReadmeExample:
    async def test_the_example_config_and_csv_run_as_the_readme_says(
        self, aiohttp_server: AiohttpServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``sync --name vip --config examples/sync.toml``: 5 sent, the two bad rows reported, then unchanged."""
        from router.settings import Settings
        from router.sync.command import sync_once

        app = build_fake_app(rate_limits=False)
        server = await aiohttp_server(app)
        monkeypatch.chdir(ROOT)
        settings = Settings.load(ROOT / "examples" / "sync.toml", env={})
        destination = replace(settings.destinations[0], base_url=str(server.make_url("")).rstrip("/"))
        settings = replace(settings.with_destination(destination), data_dir=tmp_path)
        (vip,) = settings.syncs
        report = tmp_path / "bad-rows.csv"
        dry = await sync_once(settings, vip, RunOptions(progress=False, dry_run=True))
        assert (dry.creates, dry.invalid, fake_of(app).lists) == (5, 2, {})
        first = await sync_once(settings, vip, RunOptions(progress=False, report=report))
        assert (first.status, first.sent, first.invalid, first.added) == ("done", 5, 2, 5)
        assert [line.split(",")[:2] for line in report.read_text().splitlines()[1:]] == [
            ["5", "phone_number"],
            ["6", "timezone"],
        ]
        again = await sync_once(settings, vip, RunOptions(progress=False))
        assert (again.sent, again.unchanged) == (0, 5)


# -- pure parts ---------------------------------------------------------------------------------------------


class TestPureParts:
    def test_columns_come_from_the_profile_mapping(self) -> None:
        table = column_table(load_mappings())
        assert {
            "email",
            "phone_number",
            "external_id",
            "address1",
            "address2",
            "city",
            "region",
            "zip",
            "country",
            "latitude",
            "longitude",
            "timezone",
            "ip",
            "last_event_date",
            "first_name",
            "last_name",
            "organization",
            "title",
            "image",
        } <= set(table)
        assert table["city"].target == ("location", "city")
        assert table["last_event_date"].target == ("properties", "last_event_date")

    def test_estimate_for_a_million_rows(self) -> None:
        found = estimate(1_000_000)
        assert found.import_jobs == 100
        assert found.seconds == 9
        assert 21 * 3600 < found.one_by_one_seconds < 23 * 3600

    def test_removal_guard(self) -> None:
        assert removal_refusal(2, 10, 20) is None
        assert removal_refusal(3, 10, 20) is not None
        assert removal_refusal(0, 0, 0) is None

    @pytest.mark.parametrize(
        ("table", "error"),
        [
            ({"name": "x", "list": "L"}, "give either source"),
            ({"name": "x", "source": "a.csv", "mode": "mirror"}, "mode mirror needs the name of a list"),
            ({"name": "x", "source": "a.csv", "list": "L", "mode": "upsert"}, "upsert sends profiles only"),
            ({"name": "x", "query": "SELECT 1"}, "a query needs a database"),
            ({"name": "x", "query": "SELECT 1", "database": "mysql://h/db"}, "expected postgresql://"),
            (
                {"name": "x", "source": "a.csv", "list": "L", "subscribe": ["emial"]},
                "unknown consent channel 'emial'",
            ),
            ({"name": "x", "source": "a.csv", "list": "L", "schedule": "hourly"}, "every <n><s|m|h|d>"),
            ({"name": "x", "source": "a.csv", "lsit": "L"}, "sync.lsit: unknown key"),
            (
                {"name": "x", "source": "a.csv", "destination": "nope"},
                "no [[destinations]] named 'nope' (known: klaviyo)",
            ),
        ],
    )
    def test_config_errors_name_the_key(self, table: dict[str, Any], error: str) -> None:
        with pytest.raises(ConfigError, match=None) as caught:
            parse_sync(table, "sync", ("klaviyo",))
        assert error in caught.value.message

    def test_schedule(self) -> None:
        assert parse_schedule("manual", "s") is None
        assert parse_schedule("every 6h", "s") == 21600
        assert parse_schedule("every 30m", "s") == 1800
