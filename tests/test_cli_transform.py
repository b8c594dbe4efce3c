"""``klaviyo-router transform``: input formats, output lines, rejections, exit statuses, secrecy."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.cli import main
from router.destination import Destination
from router.klaviyo.batch import batch
from router.transform import transform

SECRET = "pk_live_DO_NOT_PRINT_0123456789"
CONFIG: dict[str, Any] = {"privateApiKey": SECRET, "apiVersion": "v2", "listId": "L1"}

IDENTIFY: dict[str, Any] = {
    "type": "identify",
    "userId": "u1",
    "traits": {"email": "u1@example.com", "properties": {"subscribe": True}},
}
TRACK: dict[str, Any] = {
    "type": "track",
    "userId": "u1",
    "event": "Ordered",
    "messageId": "m1",
    "properties": {},
}
TRACK_2: dict[str, Any] = {
    "type": "track",
    "userId": "u2",
    "event": "Ordered",
    "messageId": "m2",
    "properties": {},
}
PAGE: dict[str, Any] = {"type": "page", "anonymousId": "a1", "name": "Home"}
NO_ID: dict[str, Any] = {"type": "track", "event": "Ordered", "properties": {}}
PAGE_SKIPPED = "page call skipped: the destination's send_page_as_track is off"


class Cli:
    """Runs the command in-process with files under ``tmp_path``; checks that the key never leaks."""

    def __init__(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.tmp_path = tmp_path
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.config = self.write("destination.json", orjson.dumps(CONFIG))

    def write(self, name: str, data: bytes) -> Path:
        path = self.tmp_path / name
        path.write_bytes(data)
        return path

    def ndjson(self, *messages: Any, name: str = "events.ndjson") -> Path:
        return self.write(name, b"".join(orjson.dumps(m) + b"\n" for m in messages))

    def run(self, *args: str, stdin: bytes | None = None, config: Path | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        status = main(["transform", "--destination", str(config or self.config), *args])
        out, err = self.capsys.readouterr()
        assert SECRET not in out
        assert SECRET not in err
        return status, out, err

    def lines(self, *args: str, stdin: bytes | None = None) -> list[dict[str, Any]]:
        """Output lines of a successful run (exit 0, nothing on stderr)."""
        status, out, err = self.run(*args, stdin=stdin)
        assert (status, err) == (0, "")
        return [orjson.loads(line) for line in out.splitlines()]

    def usage_error(self, *args: str, config: Path | None = None) -> str:
        """The stderr line of a run refused with exit 2 (nothing on stdout)."""
        status, out, err = self.run(*args, config=config)
        assert (status, out) == (2, "")
        assert err.startswith("klaviyo-router: ")
        assert err.endswith("\n")
        assert err.count("\n") == 1
        return err.removeprefix("klaviyo-router: ").rstrip("\n")


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path, capsys, monkeypatch)


def expected(*messages: dict[str, Any], batched: bool = False) -> list[dict[str, Any]]:
    """What the transform itself makes of ``messages`` under CONFIG, as output lines."""
    destination = Destination.from_mapping(CONFIG)
    produced = [r for i, m in enumerate(messages) for r in transform(m, destination, index=i)]
    return [r.to_json() for r in (batch(produced) if batched else produced)]


class TestInputFormats:
    """NDJSON, a JSON array, {message, metadata} entries, a file or standard input."""

    def test_ndjson_file(self, cli: Cli) -> None:
        """One output line per request, in input order, as {method, path, body}."""
        lines = cli.lines(str(cli.ndjson(IDENTIFY, TRACK)))
        assert lines == expected(IDENTIFY, TRACK)
        assert [line["path"] for line in lines] == [
            "/api/profile-import",
            "/api/profile-subscription-bulk-create-jobs",
            "/api/events",
        ]
        assert all(set(line) == {"method", "path", "body"} for line in lines)

    def test_json_array(self, cli: Cli) -> None:
        """A JSON array (even pretty-printed, after blank space) is read as the messages."""
        path = cli.write("events.json", b"\n  " + orjson.dumps([IDENTIFY, TRACK], option=orjson.OPT_INDENT_2))
        assert cli.lines(str(path)) == expected(IDENTIFY, TRACK)

    def test_message_metadata_entries(self, cli: Cli) -> None:
        """{message, metadata} entries are unwrapped, in NDJSON and in arrays."""
        entries = [
            {"message": IDENTIFY, "metadata": {"jobId": 1}},
            {"message": TRACK, "metadata": {"jobId": 2}},
        ]
        assert cli.lines(str(cli.ndjson(*entries))) == expected(IDENTIFY, TRACK)
        path = cli.write("entries.json", orjson.dumps(entries))
        assert cli.lines(str(path)) == expected(IDENTIFY, TRACK)

    def test_stdin(self, cli: Cli) -> None:
        """'-' (and no input argument) read standard input."""
        data = orjson.dumps(TRACK) + b"\n"
        assert cli.lines("-", stdin=data) == expected(TRACK)
        assert cli.lines(stdin=data) == expected(TRACK)

    def test_blank_lines_are_not_inputs(self, cli: Cli) -> None:
        """Blank lines are skipped and do not count as indexes."""
        path = cli.write(
            "events.ndjson", b"\n" + orjson.dumps(NO_ID) + b"\n\n   \n" + orjson.dumps(NO_ID) + b"\n"
        )
        assert [line["index"] for line in cli.lines(str(path))] == [0, 1]

    def test_empty_input(self, cli: Cli) -> None:
        """No messages, no output, exit 0."""
        assert cli.lines(str(cli.write("empty.ndjson", b""))) == []


class TestBatch:
    """--batch prints the bulk jobs delivery would send for the whole input."""

    def test_batch(self, cli: Cli) -> None:
        """Events merge into one bulk job; the lone profile and subscription stay single."""
        lines = cli.lines("--batch", str(cli.ndjson(IDENTIFY, TRACK, TRACK_2)))
        assert lines == expected(IDENTIFY, TRACK, TRACK_2, batched=True)
        assert [line["path"] for line in lines] == [
            "/api/profile-import",
            "/api/event-bulk-create-jobs",
            "/api/profile-subscription-bulk-create-jobs",
        ]

    def test_batch_reports_rejections_too(self, cli: Cli) -> None:
        """Rejected inputs are reported by index beside the bulk jobs of the rest."""
        lines = cli.lines("--batch", str(cli.ndjson(TRACK, NO_ID, TRACK_2)))
        assert [line.get("index") for line in lines if "error" in line] == [1]
        assert [line["path"] for line in lines if "path" in line] == ["/api/event-bulk-create-jobs"]


class TestRejectedAndSkipped:
    """Inputs that make no request are reported on stdout by index; the exit status stays 0."""

    def test_rejected_line(self, cli: Cli) -> None:
        """{"error", "status", "index"} with the transform's text, between the other lines."""
        lines = cli.lines(str(cli.ndjson(TRACK, NO_ID, TRACK_2)))
        assert lines[1] == {
            "error": "no usable identifier: the message has no userId, anonymousId, email or phone",
            "status": 400,
            "index": 1,
        }
        assert [line["body"]["data"]["attributes"]["unique_id"] for line in (lines[0], lines[2])] == [
            "m1",
            "m2",
        ]

    def test_skipped_line(self, cli: Cli) -> None:
        """A page call with send_page_as_track off is {"skipped", "index"}."""
        lines = cli.lines(str(cli.ndjson(TRACK, PAGE)))
        assert lines[1] == {
            "skipped": "page call skipped: the destination's send_page_as_track is off",
            "index": 1,
        }

    def test_warning_line(self, cli: Cli) -> None:
        """A phone dropped under invalid_phone 'drop' is a {"warning", "code", "index"} line after
        the input's requests."""
        config = cli.write("drop.json", orjson.dumps({**CONFIG, "invalid_phone": "drop"}))
        message = {"type": "identify", "userId": "u1", "traits": {"email": "a@x.com", "phone": "12"}}
        status, out, _ = cli.run(str(cli.ndjson(TRACK, message)), config=config)
        lines = [orjson.loads(line) for line in out.splitlines()]
        assert status == 0
        assert [line.get("path") for line in lines] == ["/api/events", "/api/profile-import", None]
        assert "phone_number" not in lines[1]["body"]["data"]["attributes"]
        assert lines[2] == {
            "warning": "traits.phone: Phone number is not in E.164 format ('12'); set default_phone_region "
            "to accept national numbers; sent without it (invalid_phone = drop)",
            "code": "invalid_phone_dropped",
            "index": 1,
        }

    def test_partly_refused_line(self, cli: Cli) -> None:
        """An identify whose subscription is refused prints its profile request, then its error line."""
        message = {
            **IDENTIFY,
            "traits": {"email": "a@x.com", "properties": {"subscribe": False, "consent": "emial"}},
        }
        lines = cli.lines(str(cli.ndjson(message)))
        assert [line.get("path") for line in lines] == ["/api/profile-import", None]
        assert lines[1]["index"] == 0
        assert lines[1]["error"].startswith("consent: unknown consent channel 'emial'")

    def test_bad_json_line(self, cli: Cli) -> None:
        """A line that is not JSON is rejected at its index, naming its line number; the rest go on."""
        path = cli.write(
            "events.ndjson", orjson.dumps(TRACK) + b"\n\n{not json\n" + orjson.dumps(TRACK_2) + b"\n"
        )
        lines = cli.lines(str(path))
        assert [("error" in line, line.get("index")) for line in lines] == [
            (False, None),
            (True, 1),
            (False, None),
        ]
        assert lines[1]["error"].startswith("line 3: not valid JSON: ")
        assert lines[1]["status"] == 400

    @pytest.mark.parametrize(("entry", "kind"), [(7, "int"), (["x"], "list"), ("text", "str")])
    def test_entry_not_an_object(self, cli: Cli, entry: Any, kind: str) -> None:
        """An array entry or line that is not an object is rejected at its index."""
        path = cli.write("events.json", orjson.dumps([TRACK, entry]))
        assert cli.lines(str(path))[1] == {
            "error": f"message must be a JSON object, got {kind}",
            "status": 400,
            "index": 1,
        }


class TestUsageErrors:
    """Unusable arguments or config: exit 2, one line on stderr, nothing on stdout."""

    def test_missing_config_file(self, cli: Cli) -> None:
        """The config path and the reason are named."""
        missing = cli.tmp_path / "nope.json"
        text = cli.usage_error(str(cli.ndjson(TRACK)), config=missing)
        assert text == f"{missing}: cannot read destination config: No such file or directory"

    def test_invalid_json_config(self, cli: Cli) -> None:
        """A config that is not JSON names the file and the position, never the content."""
        config = cli.write("bad.json", b'{"privateApiKey": "' + SECRET.encode() + b'",,}')
        text = cli.usage_error(str(cli.ndjson(TRACK)), config=config)
        assert text.startswith(f"{config}: destination config is not valid JSON: ")
        assert "line 1 column" in text

    def test_config_not_an_object(self, cli: Cli) -> None:
        """A JSON array as config is refused."""
        config = cli.write("list.json", b"[]")
        assert cli.usage_error(str(cli.ndjson(TRACK)), config=config) == (
            f"{config}: destination config must be a JSON object"
        )

    def test_unknown_config_key(self, cli: Cli) -> None:
        """An unknown key is named with the file, and the known keys are listed."""
        config = cli.write("extra.json", orjson.dumps({**CONFIG, "list_idd": "L1"}))
        error = cli.usage_error(str(cli.ndjson(TRACK)), config=config)
        assert error.startswith(f"{config}.list_idd: unknown key (known: additional_page_info, ")
        assert ", list_id, " in error

    def test_ignored_rudderstack_keys(self, cli: Cli) -> None:
        """RudderStack keys that do not apply are accepted and ignored."""
        config = cli.write(
            "rudder.json", orjson.dumps({**CONFIG, "publicApiKey": "pub", "useNativeSDK": False})
        )
        status, out, _ = cli.run(str(cli.ndjson(TRACK)), config=config)
        assert status == 0
        assert orjson.loads(out.splitlines()[0])["path"] == "/api/events"

    @pytest.mark.parametrize(
        ("key", "value", "reason"),
        [
            ("consent", 5, "consent: expected a channel name or a list of them"),
            ("consent", ["email", 1], "consent: expected a channel name or a list of them"),
            (
                "consent",
                ["emial"],
                "consent: unknown consent channel 'emial' (Klaviyo's current API subscribes 'email' and 'sms')",
            ),
            ("smsConsent", "yes", "smsConsent: expected true or false, got str"),
            (
                "default_phone_region",
                "USA",
                "default_phone_region: expected a two-letter region code such as 'US'",
            ),
            ("invalid_phone", "ignore", "invalid_phone: expected 'reject' or 'drop'"),
            ("privateApiKey", 12345, "privateApiKey: expected a string"),
        ],
    )
    def test_bad_config_value(self, cli: Cli, key: str, value: Any, reason: str) -> None:
        """A value of the wrong type is named by file and key."""
        config = cli.write("typed.json", orjson.dumps({**CONFIG, key: value}))
        assert cli.usage_error(str(cli.ndjson(TRACK)), config=config) == f"{config}.{reason}"

    def test_private_key_from_unset_environment_variable(self, cli: Cli) -> None:
        """env:VAR with VAR unset is named without a value."""
        cli.monkeypatch.delenv("KLAVIYO_ROUTER_TEST_UNSET_KEY", raising=False)
        config = cli.write("env.json", orjson.dumps({"privateApiKey": "env:KLAVIYO_ROUTER_TEST_UNSET_KEY"}))
        assert cli.usage_error(str(cli.ndjson(TRACK)), config=config) == (
            f"{config}.privateApiKey: environment variable KLAVIYO_ROUTER_TEST_UNSET_KEY is not set"
        )

    def test_missing_mappings_dir(self, cli: Cli) -> None:
        """--mappings-dir that is not a folder."""
        missing = cli.tmp_path / "no-such-dir"
        text = cli.usage_error("--mappings-dir", str(missing), str(cli.ndjson(TRACK)))
        assert text == f"{missing}: mappings_dir is not a folder"

    def test_invalid_mapping_in_dir(self, cli: Cli) -> None:
        """A mappings folder with an invalid file: its error, naming file and pointer."""
        folder = cli.tmp_path / "mappings"
        folder.mkdir()
        (folder / "bad.json").write_bytes(b'{"kind": "widget"}')
        text = cli.usage_error("--mappings-dir", str(folder), str(cli.ndjson(TRACK)))
        assert text.startswith(f"{folder / 'bad.json'}: at /kind: 'widget' is not one of")

    def test_mappings_dir_in_config(self, cli: Cli) -> None:
        """mappings_dir in the config is checked the same way."""
        missing = cli.tmp_path / "elsewhere"
        config = cli.write("dir.json", orjson.dumps({**CONFIG, "mappings_dir": str(missing)}))
        assert (
            cli.usage_error(str(cli.ndjson(TRACK)), config=config)
            == f"{missing}: mappings_dir is not a folder"
        )

    def test_missing_input_file(self, cli: Cli) -> None:
        """An input file that cannot be read."""
        missing = cli.tmp_path / "events.missing"
        assert cli.usage_error(str(missing)) == f"{missing}: cannot read: No such file or directory"

    def test_broken_json_array(self, cli: Cli) -> None:
        """An array cut short: what came before it is written (the input is streamed), then the
        file and the reason on stderr, exit status 1."""
        path = cli.write("events.json", b"[" + orjson.dumps(TRACK) + b",")
        status, out, err = cli.run(str(path))
        assert status == 1
        assert [orjson.loads(line) for line in out.splitlines()] == expected(TRACK)
        assert err.startswith(f"klaviyo-router: {path}: not valid JSON: ")
        assert err.count("\n") == 1

    def test_destination_is_required(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --destination (or --config) there is nothing to transform for."""
        assert main(["transform", "-"]) == 2
        assert capsys.readouterr().err == (
            "klaviyo-router: transform needs --destination CONFIG.json, or --config router.toml\n"
        )


class TestSubprocess:
    """The installed command behaves the same from a shell: stdin, --batch, exit statuses."""

    def command(self) -> list[str]:
        script = Path(sys.executable).parent / "klaviyo-router"
        return [str(script)] if script.exists() else [sys.executable, "-m", "router"]

    def test_stdin_batch(self, tmp_path: Path) -> None:
        """NDJSON on stdin with --batch: bulk jobs and a rejection on stdout, exit 0, quiet stderr."""
        config = tmp_path / "destination.json"
        config.write_bytes(orjson.dumps(CONFIG))
        data = b"".join(orjson.dumps(m) + b"\n" for m in (IDENTIFY, TRACK, NO_ID, TRACK_2))
        proc = subprocess.run(
            [*self.command(), "transform", "--destination", str(config), "--batch", "-"],
            input=data,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert (proc.returncode, proc.stderr) == (0, b"")
        lines = [orjson.loads(line) for line in proc.stdout.splitlines()]
        assert lines[0]["index"] == 2
        assert lines[1:] == expected(IDENTIFY, TRACK, TRACK_2, batched=True)
        assert SECRET.encode() not in proc.stdout

    def test_usage_error_exit_status(self, tmp_path: Path) -> None:
        """A refused config exits 2 with one line on stderr."""
        proc = subprocess.run(
            [*self.command(), "transform", "--destination", str(tmp_path / "nope.json"), "-"],
            input=b"",
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2
        assert proc.stdout == b""
        assert proc.stderr.decode().count("\n") == 1
        assert proc.stderr.startswith(b"klaviyo-router: ")


class TestConfigAndStreams:
    """--config (the TOML serve uses) with --destination NAME, gzip, several files, --strict."""

    TOML = """
[[sources]]
name = "web"
write_key = "wk_transform_test"
destinations = ["klaviyo", "eu"]
[[destinations]]
name = "klaviyo"
private_key = "{secret}"
list_id = "L1"
[[destinations]]
name = "eu"
private_key = "{secret}"
send_page_as_track = true
"""

    def config(self, cli: Cli) -> Path:
        return cli.write("router.toml", self.TOML.format(secret=SECRET).encode())

    def run_config(self, cli: Cli, *args: str) -> tuple[int, str, str]:
        status = main(["transform", "--config", str(self.config(cli)), *args])
        out, err = cli.capsys.readouterr()
        assert SECRET not in out + err
        return status, out, err

    def test_destination_by_name(self, cli: Cli) -> None:
        """The named destination's settings apply (eu sends pages as events, klaviyo skips them)."""
        events = str(cli.ndjson(PAGE))
        status, out, _ = self.run_config(cli, "--destination", "eu", events)
        assert status == 0
        assert orjson.loads(out)["path"] == "/api/events"
        status, out, _ = self.run_config(cli, "--destination", "klaviyo", events)
        assert (status, orjson.loads(out)) == (0, {"skipped": PAGE_SKIPPED, "index": 0})

    def test_destination_name_needed_or_unknown(self, cli: Cli) -> None:
        events = str(cli.ndjson(TRACK))
        config = self.config(cli)
        status, out, err = self.run_config(cli, events)
        assert (status, out) == (2, "")
        assert err == (
            f"klaviyo-router: {config} has several destinations: name one with --destination (klaviyo, eu)\n"
        )
        status, _, err = self.run_config(cli, "--destination", "us", events)
        assert (status, err) == (
            2,
            f"klaviyo-router: {config}: no [[destinations]] named 'us' (known: klaviyo, eu)\n",
        )

    def test_gzip_and_several_files(self, cli: Cli) -> None:
        """gzip is read by its first bytes; indexes run on across files; an error names its file."""
        first = cli.write("a.ndjson.gz", gzip.compress(orjson.dumps(TRACK) + b"\n"))
        second = cli.write("b.ndjson", b"{broken\n" + orjson.dumps(TRACK_2) + b"\n")
        lines = cli.lines(str(first), str(second))
        assert lines[0] == expected(TRACK)[0]
        assert lines[1]["index"] == 1 and lines[1]["error"].startswith(f"{second} line 1: not valid JSON: ")
        assert lines[2] == expected(TRACK_2)[0]

    def test_strict(self, cli: Cli) -> None:
        """--strict: exit 1 once any input was rejected (the lines are written all the same)."""
        status, out, _ = cli.run("--strict", str(cli.ndjson(TRACK, NO_ID)))
        assert status == 1
        assert [("error" in orjson.loads(line)) for line in out.splitlines()] == [False, True]
        assert cli.run("--strict", str(cli.ndjson(TRACK, PAGE)))[0] == 0  # skipping is no rejection
