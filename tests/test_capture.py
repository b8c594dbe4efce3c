"""Reading captured event files (router/capture.py): every format, gzip, positions to resume from,
lines over the cap, files cut short, folders and globs."""

from __future__ import annotations

import gzip
import io
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.capture import STDIN, CaptureFile, Position, Record, Unreadable, expand, unpack, with_defaults
from router.events import NO_DEFAULTS

E1: dict[str, Any] = {"type": "track", "userId": "u1", "event": "A", "messageId": "m1"}
E2: dict[str, Any] = {
    "type": "identify",
    "userId": "u2",
    "traits": {"email": "b@example.com"},
    "messageId": "m2",
}
E3: dict[str, Any] = {"type": "track", "anonymousId": "a3", "event": "C", "messageId": "m3"}
BATCH: dict[str, Any] = {
    "batch": [E1, E2],
    "sentAt": "2026-11-20T08:00:00.000Z",
    "context": {"ip": "203.0.113.1"},
}


def events(path: Path, **options: Any) -> list[Record]:
    """Every event of a file, lines unpacked as transform and replay do."""
    with CaptureFile(str(path)) as capture:
        return [event for record in capture.records(**options) for event in _unpacked(record)]


def _unpacked(record: Record) -> Iterator[Record]:
    return iter([record]) if record.plain() else unpack(record)


def decoded(record: Record) -> Any:
    return orjson.loads(record.text) if record.value is None and record.text is not None else record.value


def ndjson(*entries: Any) -> bytes:
    return b"".join(orjson.dumps(entry) + b"\n" for entry in entries)


@pytest.fixture(params=["plain", "gzip"])
def write(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Writes a file as it is or gzip-compressed (the reader tells by the first bytes, not the name)."""

    def writer(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if request.param == "gzip" else data)
        return path

    return writer


class TestFormats:
    def test_ndjson_lines_are_kept_as_text(self, write: Any) -> None:
        """Bare events come out as their line's text, numbered; blank lines are neither events nor lost
        from the numbering."""
        path = write("events.ndjson", ndjson(E1) + b"\n  \n" + ndjson(E3))
        found = events(path)
        assert [(r.line, r.item, r.last, decoded(r)) for r in found] == [
            (1, None, True, E1),
            (4, None, True, E3),
        ]
        assert found[0].text == orjson.dumps(E1)

    def test_ndjson_wrappers_and_batch_bodies(self, write: Any) -> None:
        """A {message, metadata} line gives its message; a batch body line its events one by one, with
        the body's defaults, only the last ending the entry."""
        path = write("mixed.ndjson", ndjson({"message": E3, "metadata": {"jobId": 1}}, BATCH, E1))
        found = events(path)
        assert [(r.line, r.item, r.last, decoded(r)) for r in found] == [
            (1, None, True, E3),
            (2, 0, False, E1),
            (2, 1, True, E2),
            (3, None, True, E1),
        ]
        defaults = found[1].defaults
        assert (defaults.sent_at, defaults.context) == (BATCH["sentAt"], BATCH["context"])
        assert found[0].defaults is NO_DEFAULTS
        assert with_defaults(found[1].value, defaults)["context"] == {"ip": "203.0.113.1"}

    def test_json_array_streamed(self, write: Any) -> None:
        """A pretty-printed array: its items, a batch body among them unpacked."""
        path = write("events.json", b"  \n" + orjson.dumps([E1, BATCH, E3], option=orjson.OPT_INDENT_2))
        found = events(path)
        assert [(r.line, r.item, decoded(r)) for r in found] == [
            (0, 0, E1),
            (0, 0, E1),
            (0, 1, E2),
            (0, 2, E3),
        ]
        assert [r.entry for r in found] == [1, 2, 2, 3]
        assert found[0].where("events.json") == "events.json item 0"

    def test_whole_file_batch_body_with_its_defaults_last(self, write: Any) -> None:
        """A pretty-printed batch body whose sentAt and context come after the events: they apply."""
        body = orjson.dumps({"batch": [E1, E2], "context": {"ip": "1.2.3.4"}, "sentAt": BATCH["sentAt"]})
        path = write("body.json", orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2))
        found = events(path)
        assert [(r.item, decoded(r)) for r in found] == [(0, E1), (1, E2)]
        assert all(r.defaults.context == {"ip": "1.2.3.4"} for r in found)
        assert found[1].where("") == "item 1"

    def test_whole_file_single_event(self, write: Any) -> None:
        path = write("one.json", orjson.dumps(E2, option=orjson.OPT_INDENT_2))
        assert [decoded(r) for r in events(path)] == [E2]

    def test_batch_body_problems_are_records(self, write: Any) -> None:
        """A body whose batch is not a list, is empty, or has a mistyped sentAt: one problem record."""
        path = write(
            "bad.ndjson",
            ndjson({"batch": {"a": 1}}, {"batch": []}, {"batch": [E1], "sentAt": 7}, "just text")
            + b"{nope\n",
        )
        found = events(path)
        assert [(r.line, r.problem) for r in found[:3]] == [
            (1, '"batch" must be an array of events'),
            (2, '"batch" is empty'),
            (3, '"sentAt" must be an ISO 8601 date-time string, got a number'),
        ]
        assert decoded(found[3]) == "just text"  # not an object: for intake to refuse, with its words
        # a line that only looks like an event goes out as it is; its reader finds it is not JSON
        assert (found[4].text, found[4].problem, found[4].plain()) == (b"{nope", None, True)
        (unpacked,) = unpack(found[4])
        assert unpacked.problem is not None and unpacked.problem.startswith("not valid JSON: ")

    def test_multi_member_gzip(self, tmp_path: Path) -> None:
        """Concatenated gzip members (logs rotated by appending) read as one text."""
        path = tmp_path / "joined.ndjson.gz"
        path.write_bytes(gzip.compress(ndjson(E1)) + gzip.compress(ndjson(E3)))
        assert [decoded(r) for r in events(path)] == [E1, E3]

    def test_standard_input(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """'-' reads standard input, gzip too; a whole-file body from a pipe is spooled (read twice)."""
        body = orjson.dumps({"batch": [E1], "sentAt": BATCH["sentAt"]}, option=orjson.OPT_INDENT_2)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(body))))
        with CaptureFile(STDIN) as capture:
            found = list(capture.records())
            assert capture.size is None
        assert [(decoded(r), r.defaults.sent_at) for r in found] == [(E1, BATCH["sentAt"])]


class TestLimitsAndDamage:
    def test_line_over_the_cap_is_reported_and_skipped(self, write: Any) -> None:
        """A line longer than max_line is a problem record and never held; the next lines read on."""
        huge = {**E1, "properties": {"blob": "x" * 5000}}
        path = write("big.ndjson", ndjson(E1, huge, E3))
        found = events(path, max_line=1000)
        assert [(r.line, r.problem) for r in found] == [
            (1, None),
            (2, "the line is over 1000 bytes long"),
            (3, None),
        ]
        assert decoded(found[2]) == E3

    def test_line_over_the_cap_at_the_end_without_newline(self, write: Any) -> None:
        path = write("tail.ndjson", ndjson(E1) + b"x" * 3000)
        found = events(path, max_line=1000)
        assert [(r.line, r.problem) for r in found] == [(1, None), (2, "the line is over 1000 bytes long")]

    def test_last_line_without_newline(self, write: Any) -> None:
        path = write("tail.ndjson", ndjson(E1) + orjson.dumps(E3))
        assert [decoded(r) for r in events(path)] == [E1, E3]

    def test_array_cut_short(self, write: Any) -> None:
        """The items before the break are read; then Unreadable names the file."""
        path = write("cut.json", b"[" + orjson.dumps(E1) + b"," + orjson.dumps(E2)[:10])
        found: list[Record] = []
        with (
            pytest.raises(Unreadable, match=r"cut\.json: not valid JSON: "),
            CaptureFile(str(path)) as capture,
        ):
            found.extend(capture.records())
        assert [decoded(r) for r in found] == [E1]

    def test_gzip_cut_short(self, tmp_path: Path) -> None:
        path = tmp_path / "cut.ndjson.gz"
        path.write_bytes(gzip.compress(ndjson(E1, E2, E3) * 200)[:-40])
        with pytest.raises(Unreadable, match=r"cut\.ndjson\.gz: cannot be read to its end: "):
            events(path)

    @pytest.mark.parametrize("at", [20, 200, 2000])
    def test_gzip_damaged_inside(self, tmp_path: Path, at: int) -> None:
        """Bytes of the compressed stream overwritten: the inflater's error (ISA-L's) is reported
        as the file's, not raised as it is."""
        data = bytearray(gzip.compress(ndjson(E1, E2, E3) * 200))
        data[at : at + 8] = b"\xff" * 8
        path = tmp_path / "damaged.ndjson.gz"
        path.write_bytes(bytes(data))
        with pytest.raises(Unreadable, match=r"damaged\.ndjson\.gz: cannot be read to its end: "):
            events(path)

    def test_reading_ahead_stops_with_its_reader(self, tmp_path: Path) -> None:
        """A gzip file left half read: closing it ends the thread that decompresses ahead."""
        path = tmp_path / "long.ndjson.gz"
        path.write_bytes(gzip.compress(ndjson(E1) * 200_000))
        with CaptureFile(str(path)) as capture:
            next(iter(capture.records()))
            assert any(t.name == "capture-read-ahead" for t in threading.enumerate())
        assert not any(t.name == "capture-read-ahead" for t in threading.enumerate())


class TestResume:
    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(ndjson(E1, BATCH, {"message": E3}, E2), id="ndjson"),
            pytest.param(orjson.dumps([E1, BATCH, E3, E2], option=orjson.OPT_INDENT_2), id="array"),
            pytest.param(
                orjson.dumps({"batch": [E1, E2, E3, E1]}, option=orjson.OPT_INDENT_2), id="whole-file body"
            ),
        ],
    )
    def test_a_read_resumes_after_any_entry(self, write: Any, data: bytes) -> None:
        """Started from the end of any entry, a read yields exactly what followed it."""
        path = write("events", data)
        everything = events(path)
        for cut, record in enumerate(everything):
            if record.last:
                rest = events(path, start=record.end)
                assert [(r.line, r.item, decoded(r)) for r in rest] == [
                    (r.line, r.item, decoded(r)) for r in everything[cut + 1 :]
                ]

    def test_resume_skips_a_line_over_the_cap_by_its_length(self, write: Any) -> None:
        path = write("big.ndjson", ndjson(E1, {"blob": "x" * 5000}, E3))
        _, long, _ = events(path, max_line=1000)
        assert [decoded(r) for r in events(path, max_line=1000, start=long.end)] == [E3]
        assert long.end == Position(2, len(ndjson(E1)) + len(ndjson({"blob": "x" * 5000})))


class TestExpand:
    def test_files_folders_and_globs(self, tmp_path: Path) -> None:
        """A folder's files recursively, hidden ones left out, in name order; glob patterns
        (``**`` too); files as given; '-' as it is."""
        (tmp_path / "logs" / "2026" / ".cache").mkdir(parents=True)
        for name in (
            "logs/b.ndjson",
            "logs/a.ndjson.gz",
            "logs/2026/c.json",
            "logs/.hidden",
            "logs/2026/.cache/x",
        ):
            (tmp_path / name).write_bytes(b"")
        logs = str(tmp_path / "logs")
        assert expand([logs]) == [f"{logs}/2026/c.json", f"{logs}/a.ndjson.gz", f"{logs}/b.ndjson"]
        assert expand([f"{logs}/*.ndjson*", "-"]) == [f"{logs}/a.ndjson.gz", f"{logs}/b.ndjson", "-"]
        assert expand([f"{logs}/**/*.json"]) == [f"{logs}/2026/c.json"]

    @pytest.mark.parametrize(
        ("argument", "reason"),
        [
            ("missing.ndjson", "cannot read: No such file or directory"),
            ("nothing-*.ndjson", "no file matches"),
            ("empty", "the folder holds no files"),
        ],
    )
    def test_arguments_naming_nothing(self, tmp_path: Path, argument: str, reason: str) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(Unreadable) as refused:
            expand([str(tmp_path / argument)])
        assert str(refused.value) == f"{tmp_path / argument}: {reason}"

    def test_size_and_bytes_read(self, tmp_path: Path) -> None:
        path = tmp_path / "events.ndjson"
        path.write_bytes(ndjson(E1, E2, E3))
        with CaptureFile(str(path)) as capture:
            assert capture.size == path.stat().st_size
            list(capture.records())
            assert capture.consumed == capture.size


def test_ndjson_with_a_damaged_first_line(tmp_path: Path) -> None:
    """A broken first line does not make NDJSON look like one pretty-printed object."""
    path = tmp_path / "events.ndjson"
    path.write_bytes(b'{"type": "track", "userId": \n' + ndjson(E1, E3))
    found = events(path)
    assert [r.line for r in found] == [1, 2, 3]
    assert (found[0].text, [decoded(r) for r in found[1:]]) == (b'{"type": "track", "userId": ', [E1, E3])
