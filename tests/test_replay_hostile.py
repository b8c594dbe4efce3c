"""``klaviyo-router replay`` on hostile input: every bad line is refused on its own (reported by file
and line, kept as a dead letter) and the replay goes on; only a file that cannot be read to its end
changes the exit status (1, as ``--help`` says)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_replay import jobs, ndjson, run, summary, write_config

from router import capture_intake
from router import replay as replay_module
from router.queue import JobState
from router.replay import REASON_PREFIX

EVENT = {"type": "track", "event": "x", "userId": "u"}
GOOD_BEFORE = orjson.dumps({**EVENT, "messageId": "before"})
GOOD_AFTER = orjson.dumps({**EVENT, "messageId": "after"})
HUGE = b'{"type":"track","event":"x","userId":"u","properties":{"v":1e999}}'
DEEP = 100_000

#: A hostile line, and the end of the reason it is refused with.
HOSTILE_LINES: dict[str, tuple[bytes, str]] = {
    "number out of range, no messageId": (
        HUGE,
        '"properties" holds a number out of range (numbers must be finite doubles)',
    ),
    "number out of range, with a messageId": (
        HUGE.replace(b'"userId"', b'"messageId":"m","userId"'),
        '"properties" holds a number out of range (numbers must be finite doubles)',
    ),
    "userId out of range": (
        b'{"type":"track","event":"x","userId":1e999}',
        '"userId" holds a number out of range (numbers must be finite doubles)',
    ),
    "type out of range": (
        b'{"type":-1e999,"event":"x","userId":"u"}',
        '"type" holds a number out of range (numbers must be finite doubles)',
    ),
    "nesting 100 000 deep": (
        b'{"type":"track","event":"x","userId":"u","properties":' + b"[" * DEEP + b"]" * DEEP + b"}",
        "the line nests deeper than 255 levels; events may nest 64 (max_nesting_depth)",
    ),
    "invalid UTF-8": (
        b'{"type":"track","event":"caf\xe9\xff","userId":"u"}',
        "not valid JSON: str is not valid UTF-8: surrogates not allowed: line 1 column 1 (char 0)",
    ),
    "NUL bytes": (
        b'{"type":"track","event":"x\x00","userId":"u"}\x00',
        "not valid JSON: unexpected control character in string: line 1 column 27 (char 26)",
    ),
    "a JSON array": (orjson.dumps([EVENT]), "an event must be a JSON object, got an array"),
    "a line of 50 MB": (
        b'{"type":"track","event":"x","userId":"u","properties":{"s":"' + b"a" * (50 << 20) + b'"}}',
        "the line is over 4194304 bytes long",
    ),
}


@pytest.fixture(autouse=True)
def quiet_environment(no_router_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_module, "tune_runtime", lambda: None)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", HOSTILE_LINES)
def test_a_hostile_line_is_refused_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, compress: bool
) -> None:
    """The line between two good ones is reported by number with its reason and kept as a dead
    letter; both good lines are queued; exit 0 (1 with --strict); nothing escapes as a traceback."""
    line, reason = HOSTILE_LINES[name]
    config = write_config(tmp_path)
    path = tmp_path / ("events.ndjson.gz" if compress else "events.ndjson")
    text = b"\n".join([GOOD_BEFORE, line, GOOD_AFTER]) + b"\n"
    path.write_bytes(gzip.compress(text, compresslevel=1) if compress else text)
    status, out, err = run(capsys, "--config", str(config), "--json", str(path))
    assert "Traceback" not in err and "replay stopped" not in err, err
    assert status == 0
    counts = summary(out)
    assert (counts["read"], counts["queued"], counts["rejected"], counts["failed_files"]) == (3, 2, 1, [])
    assert [line for line in err.splitlines() if line.startswith("rejected: ")] == [
        f"rejected: {path} line 2: {reason}"
    ]
    assert [job.message_id for job in jobs(config, JobState.PENDING)] == ["before", "after"]
    (dead,) = jobs(config, JobState.DEAD)
    assert dead.last_error == f"{REASON_PREFIX}{path} line 2: {reason}"
    assert run(capsys, "--config", str(config), "--again", "--strict", str(path))[0] == 1


def test_a_replay_of_a_line_out_of_range_twice_refuses_it_twice_queues_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The content-derived messageId of an event that cannot be decoded is still derived: a replay
    read again finds the good lines duplicates."""
    config = write_config(tmp_path)
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n".join([GOOD_BEFORE, HUGE, orjson.dumps(EVENT)]) + b"\n")
    first = summary(run(capsys, "--config", str(config), "--json", str(path))[1])
    again = summary(run(capsys, "--config", str(config), "--json", "--again", str(path))[1])
    assert (first["queued"], first["rejected"]) == (2, 1)
    assert (again["queued"], again["duplicates"], again["rejected"]) == (0, 2, 1)


def test_a_truncated_gzip_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The lines before the break are queued; the file is named as failed; exit 1; the next file
    is replayed."""
    config = write_config(tmp_path)
    cut = tmp_path / "a-cut.ndjson.gz"
    cut.write_bytes(gzip.compress(ndjson(*({**EVENT, "messageId": f"c{i}"} for i in range(20_000))))[:-30])
    whole = tmp_path / "b-whole.ndjson"
    whole.write_bytes(GOOD_AFTER + b"\n")
    status, out, err = run(capsys, "--config", str(config), "--json", str(cut), str(whole))
    assert "Traceback" not in err
    assert status == 1
    (failed,) = summary(out)["failed_files"]
    assert failed.startswith(f"{cut}: cannot be read to its end: ")
    pending = [job.message_id for job in jobs(config, JobState.PENDING)]
    assert pending[-1] == "after"
    assert pending[:-1] == [f"c{i}" for i in range(len(pending) - 1)]
    assert len(pending) > 1


def test_an_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    path = tmp_path / "empty.ndjson"
    path.write_bytes(b"")
    status, out, err = run(capsys, "--config", str(config), "--json", str(path))
    assert "Traceback" not in err
    assert (status, summary(out)["files"], summary(out)["read"]) == (0, 1, 0)


def test_a_folder_with_a_file_of_no_events(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The event file is queued; each line of the other file is refused by number; exit 0."""
    config = write_config(tmp_path)
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "a.ndjson").write_bytes(GOOD_BEFORE + b"\n" + GOOD_AFTER + b"\n")
    notes = folder / "notes.txt"
    notes.write_bytes(b"replayed on Tuesday\n\nsee the wiki\n")
    status, out, err = run(capsys, "--config", str(config), "--json", str(folder))
    assert "Traceback" not in err
    assert status == 0
    assert (summary(out)["files"], summary(out)["queued"], summary(out)["rejected"]) == (2, 2, 2)
    reported = [line.split(": ", 3)[1] for line in err.splitlines() if line.startswith("rejected: ")]
    assert reported == [f"{notes} line 1", f"{notes} line 3"]
    assert [job.message_id for job in jobs(config, JobState.PENDING)] == ["before", "after"]


def stamped(message: dict[str, Any]) -> dict[str, Any]:
    """A queued message without the times a replay stamps on it (its own time, for these events)."""
    return {key: value for key, value in message.items() if key not in ("receivedAt", "timestamp")}


def test_worker_processes_give_what_the_reading_process_gives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of two lines prepared in a worker process: the same queue, dead letters and reports,
    in file order, as prepared in the reading process; batch lines keep their items' places."""
    lines = [
        GOOD_BEFORE,
        orjson.dumps({"batch": [{**EVENT, "messageId": f"b{i}"} for i in range(3)]}),
        HUGE,
        b"",
        orjson.dumps({"message": {**EVENT, "messageId": "wrapped"}, "metadata": {"jobId": 1}}),
        orjson.dumps({"batch": [{**EVENT, "messageId": "b3"}, {"type": "track", "event": "no one"}]}),
        b'{"type": "track", oops',
        orjson.dumps({**EVENT, "properties": {"n": 7}}),
        GOOD_AFTER,
    ]
    monkeypatch.setattr(capture_intake, "CHUNK_RECORDS", 2)
    results = []
    for processes in (0, 1):
        monkeypatch.setattr(replay_module, "worker_processes", lambda processes=processes: processes)
        folder = tmp_path / f"processes-{processes}"
        config = write_config(folder)
        path = folder / "events.ndjson"
        path.write_bytes(b"\n".join(lines) + b"\n")
        status, out, err = run(capsys, "--config", str(config), "--json", str(path))
        reported = [
            line.replace(str(path), "FILE") for line in err.splitlines() if line.startswith("rejected")
        ]
        queued = [(job.message_id, stamped(job.message())) for job in jobs(config, JobState.PENDING)]
        dead = [(job.last_error or "").replace(str(path), "FILE") for job in jobs(config, JobState.DEAD)]
        counts = summary(out) | {"seconds": 0, "events_per_second": 0}
        results.append((status, counts, reported, queued, dead))
    assert results[0] == results[1]
    status, counts, reported, queued, dead = results[1]
    assert (status, counts["read"], counts["queued"], counts["rejected"]) == (0, 11, 8, 3)
    assert reported == [
        'rejected: FILE line 3: "properties" holds a number out of range (numbers must be finite doubles)',
        'rejected: FILE line 6 batch[1]: "userId" or "anonymousId" is required',
        "rejected: FILE line 7: not valid JSON: unexpected character, expected a string key: line 1 column 19 (char 18)",
    ]
    assert [message_id for message_id, _ in queued][:7] == [
        "before",
        "b0",
        "b1",
        "b2",
        "wrapped",
        "b3",
        queued[6][0],
    ]
    assert queued[-1][0] == "after"
