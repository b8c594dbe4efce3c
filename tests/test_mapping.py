"""Mapping files: schema validation, loading, user folders and ``check-mappings``.

The fixtures are data: every file in ``cases/mappings/valid`` must load, every file in
``cases/mappings/invalid`` must fail with the error ``cases/mappings/expected_errors.json`` gives
for it. Each fixture is installed alone as a user ``mappings_dir`` (under its own name, so a file
named like a built-in one replaces it). Adding a case is adding a file and one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from pytest_aiohttp import AiohttpClient

from router.app import build_app
from router.cli import main
from router.destination import Destination
from router.errors import MappingError
from router.fields import Context, PathTable, compile_field
from router.mapping import (
    BUILTIN_DIR,
    KLAVIYO_DIR,
    SCHEMA_PATH,
    MappingSets,
    load_mappings,
    mapping_files,
    normalise_event_name,
    read_document,
    validate_document,
)
from router.queue.memory import MemoryQueue
from router.settings import Settings
from router.transform import transform

CASES = Path(__file__).resolve().parent / "cases" / "mappings"
VALID = sorted((CASES / "valid").glob("*.json"))
INVALID = sorted((CASES / "invalid").glob("*.json"))
EXPECTED: dict[str, dict[str, Any]] = orjson.loads((CASES / "expected_errors.json").read_bytes())
BUILTIN = sorted(KLAVIYO_DIR.glob("*.json"))


def install(tmp_path: Path, *files: Path) -> Path:
    """A fresh user mappings folder holding copies of ``files`` under their own names."""
    folder = tmp_path / "mappings"
    folder.mkdir()
    for file in files:
        shutil.copy(file, folder / file.name)
    return folder


def load_error(folder: Path) -> str:
    with pytest.raises(MappingError) as caught:
        load_mappings(folder)
    return caught.value.message


class TestBuiltinMappings:
    """The shipped mapping files are valid and compile into the indexes the transform uses."""

    def test_schema_is_a_valid_draft_2020_12_schema(self) -> None:
        """The schema itself passes the meta-schema."""
        schema = orjson.loads(SCHEMA_PATH.read_bytes())
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"].endswith("/draft/2020-12/schema")

    @pytest.mark.parametrize("path", BUILTIN, ids=[p.name for p in BUILTIN])
    def test_builtin_file_validates(self, path: Path) -> None:
        """Each built-in file passes the schema and says what it is for."""
        document = read_document(path)
        validate_document(document, str(path))
        assert document["description"].strip()

    def test_builtin_files_are_the_expected_set(self) -> None:
        """The built-ins cover identify, track, screen, page, group and the three e-commerce renames."""
        assert [p.name for p in BUILTIN] == [
            "added-to-cart.json",
            "group.json",
            "identify-subscription.json",
            "page.json",
            "profile.json",
            "screen.json",
            "started-checkout.json",
            "track.json",
            "viewed-product.json",
        ]

    def test_builtins_compile_into_indexes(self) -> None:
        """One profile, named e-commerce events, fallbacks for track/screen/page, list rules for identify/group."""
        mappings = load_mappings(None)
        assert mappings.profile.file.endswith("profile.json")
        named = {key: Path(m.file).name for key, m in mappings.named_events.items()}
        assert named == {
            ("track", "product viewed"): "viewed-product.json",
            ("track", "product clicked"): "viewed-product.json",
            ("track", "product added"): "added-to-cart.json",
            ("track", "checkout started"): "started-checkout.json",
        }
        assert {t: Path(m.file).name for t, m in mappings.fallback_events.items()} == {
            "track": "track.json",
            "screen": "screen.json",
            "page": "page.json",
        }
        assert {t: Path(m.file).name for t, m in mappings.subscriptions.items()} == {
            "identify": "identify-subscription.json",
            "group": "group.json",
        }

    def test_the_package_ships_the_repository_mappings(self) -> None:
        """``router/builtin_mappings`` is the repository's ``mappings/`` folder, not a stale copy."""
        repository = Path(__file__).resolve().parents[1] / "mappings"
        assert BUILTIN_DIR.resolve() == repository.resolve()

    def test_load_is_cached_per_folder(self, tmp_path: Path) -> None:
        """Loading the same folder twice compiles once."""
        folder = install(tmp_path, CASES / "valid" / "order-completed.json")
        assert load_mappings(folder) is load_mappings(folder)
        assert load_mappings(None) is load_mappings(None)


class TestValidFixtures:
    """Every valid fixture loads as a user folder, alone or all together, and is the file used."""

    @pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
    def test_valid_fixture_loads(self, tmp_path: Path, path: Path) -> None:
        """The file is accepted and listed as the user's."""
        folder = install(tmp_path, path)
        mappings = load_mappings(folder)
        assert mappings.files[path.name] == folder / path.name

    def test_whole_valid_folder_loads_together(self) -> None:
        """The valid fixtures do not conflict with each other or with the built-ins."""
        mappings = load_mappings(CASES / "valid")
        assert mappings.named_events[("track", "order completed")].file.endswith("valid/order-completed.json")
        assert mappings.named_events[("track", "refund issued")].file.endswith("valid/order-refunded.json")

    def test_fixture_lists_are_not_empty(self) -> None:
        """The parametrised tests above have cases to run."""
        assert len(VALID) >= 4
        assert len(INVALID) >= 15


class TestInvalidFixtures:
    """Every invalid fixture fails with an error naming the file, the JSON pointer and the reason."""

    @pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
    def test_invalid_fixture_fails_with_expected_error(self, tmp_path: Path, path: Path) -> None:
        """The error text holds the expected reason, the installed file's path and the pointer."""
        expected = EXPECTED[path.name]
        folder = install(tmp_path, path)
        message = load_error(folder)
        assert expected["error"] in message
        if expected.get("names_file", True):
            assert str(folder / path.name) in message
        if "pointer" in expected:
            assert f"{expected['pointer']}: " in message
        for other in expected.get("names", ()):
            assert str(KLAVIYO_DIR.parent / other) in message

    def test_every_fixture_has_one_expectation(self) -> None:
        """Adding a fixture without its expected error (or the reverse) fails here."""
        assert sorted(p.name for p in INVALID) == sorted(EXPECTED)

    def test_duplicate_claim_names_both_files(self, tmp_path: Path) -> None:
        """Two files matching one event: the error names the new file and the one that already maps it."""
        path = CASES / "invalid" / "claims-checkout-started.json"
        message = load_error(install(tmp_path, path))
        assert message.startswith(f"{tmp_path / 'mappings' / path.name}: /match: ")
        assert message.index(path.name) < message.index(str(KLAVIYO_DIR / "started-checkout.json"))
        assert "give your file the same name to replace it" in message

    def test_two_user_files_claiming_one_event(self, tmp_path: Path) -> None:
        """The conflict is found between two user files as well, naming both."""
        first = CASES / "valid" / "order-completed.json"
        folder = install(tmp_path, first)
        document = orjson.loads(first.read_bytes())
        document["match"]["event"] = ["  ORDER   completed "]
        (folder / "z-orders.json").write_bytes(orjson.dumps(document))
        message = load_error(folder)
        assert "track 'order completed' is already mapped by" in message
        assert str(folder / "z-orders.json") in message
        assert str(folder / "order-completed.json") in message

    def test_two_profiles_names_both_files(self, tmp_path: Path) -> None:
        """A second profile mapping: the error lists the built-in one and the user's."""
        folder = install(tmp_path, CASES / "invalid" / "second-profile.json")
        message = load_error(folder)
        assert str(KLAVIYO_DIR / "profile.json") in message
        assert str(folder / "second-profile.json") in message

    def test_unreadable_file_is_named(self, tmp_path: Path) -> None:
        """A mapping file that cannot be read is reported with its path."""
        folder = install(tmp_path)
        (folder / "broken.json").mkdir()
        message = load_error(folder)
        assert message.startswith(f"{folder / 'broken.json'}: cannot read: ")


class TestUserFolder:
    """A user folder extends the built-ins (new names) and overrides them (same names)."""

    def test_same_name_replaces_builtin(self, tmp_path: Path) -> None:
        """A user ``added-to-cart.json`` is used instead of the built-in one, which is not loaded."""
        folder = install(tmp_path, CASES / "valid" / "added-to-cart.json")
        mappings = load_mappings(folder)
        assert mappings.named_events[("track", "product added")].file == str(folder / "added-to-cart.json")
        assert mappings.files["added-to-cart.json"] == folder / "added-to-cart.json"
        assert sum(1 for name in mappings.files if name == "added-to-cart.json") == 1

    def test_new_name_adds_to_builtins(self, tmp_path: Path) -> None:
        """A new file is added; every built-in stays."""
        folder = install(tmp_path, CASES / "valid" / "order-completed.json")
        files = mapping_files(folder)
        assert set(files) == {p.name for p in BUILTIN} | {"order-completed.json"}

    def test_other_files_are_ignored(self, tmp_path: Path) -> None:
        """Only ``*.json`` files are mappings; a README beside them is not read."""
        folder = install(tmp_path)
        (folder / "README.md").write_text("{not json")
        assert set(mapping_files(folder)) == {p.name for p in BUILTIN}
        load_mappings(folder)

    def test_missing_folder_is_an_error(self, tmp_path: Path) -> None:
        """A mappings_dir that is not a folder is refused, naming it."""
        missing = tmp_path / "nope"
        with pytest.raises(MappingError, match="mappings_dir is not a folder") as caught:
            mapping_files(missing)
        assert str(missing) in caught.value.message


class TestCompileField:
    """Compiling a field spec outside the schema still refuses an unknown type directive."""

    def test_unknown_type_names_where(self) -> None:
        """The error names the file and pointer passed in."""
        with pytest.raises(MappingError, match=r"^m\.json: /value: unknown type 'e165'$"):
            compile_field(
                "value", {"from": "properties.value", "type": "e165"}, "m.json: /value", PathTable()
            )

    def test_string_spec_is_a_path(self) -> None:
        """A bare string is a source path with no conversion."""
        table = PathTable()
        field = compile_field("email", "traits.email", "m.json: /fields/email", table)
        holders = table.holders({"traits": {"email": "a@example.com"}})
        assert field.target == ("email",)
        assert [where for _, _, where in field.sources] == ["traits.email"]
        assert field.resolve(holders, Context()) == "a@example.com"


class TestEventNames:
    """Event names match ignoring case and extra spaces."""

    @pytest.mark.parametrize(
        ("name", "normalised"),
        [
            ("Product Added", "product added"),
            (" Product  Added ", "product added"),
            ("CHECKOUT\tstarted", "checkout started"),
            ("checkout started ", "checkout started"),
            ("Viewed Product", "viewed product"),
        ],
    )
    def test_normalise(self, name: str, normalised: str) -> None:
        """Whitespace runs become one space, case is folded."""
        assert normalise_event_name(name) == normalised


class TestCheckMappingsCommand:
    """``klaviyo-router check-mappings [DIR]``: 0 and a listing when valid, 1 and the error on stderr."""

    def test_builtins_only(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a folder the built-ins are checked and listed as built-in."""
        assert main(["check-mappings"]) == 0
        out, err = capsys.readouterr()
        lines = out.splitlines()
        assert err == ""
        assert lines[-1] == f"{len(BUILTIN)} mapping files valid"
        assert len(lines) == len(BUILTIN) + 1
        for path in BUILTIN:
            assert any(line.split()[:3] == ["ok", path.name, "built-in"] for line in lines)

    def test_builtins_printed_where_the_readme_says(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """From a clone's top folder, built-in files are shown as ``mappings/klaviyo/<name>``."""
        monkeypatch.chdir(Path(__file__).resolve().parents[1])
        assert main(["check-mappings"]) == 0
        paths = [line.split()[3] for line in capsys.readouterr().out.splitlines() if line.startswith("ok")]
        assert paths and all(p.startswith("mappings/klaviyo/") for p in paths)

    def test_user_folder_marks_users_files(self, capsys: pytest.CaptureFixture[str]) -> None:
        """User files are marked ``yours``, a replaced built-in appears once as the user's."""
        assert main(["check-mappings", str(CASES / "valid")]) == 0
        out, _ = capsys.readouterr()
        rows = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("ok")}
        assert rows["added-to-cart.json"] == "yours"
        assert rows["order-completed.json"] == "yours"
        assert rows["track.json"] == "built-in"
        assert out.splitlines()[-1] == f"{len(rows)} mapping files valid"
        assert len(rows) == len(BUILTIN) + len({p.name for p in VALID} - {p.name for p in BUILTIN})

    @pytest.mark.parametrize("name", ["unknown-kind.json", "bad-json-syntax.json", "second-profile.json"])
    def test_invalid_folder_exits_1(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
    ) -> None:
        """An invalid file: exit 1, nothing on stdout, one ``error:`` line with the expected text."""
        folder = install(tmp_path, CASES / "invalid" / name)
        assert main(["check-mappings", str(folder)]) == 1
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("error: ")
        assert err.count("\n") == 1
        assert EXPECTED[name]["error"] in err
        assert str(folder / name) in err

    def test_missing_folder_exits_1(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A folder that does not exist is an invalid mapping set."""
        assert main(["check-mappings", str(tmp_path / "nope")]) == 1
        _, err = capsys.readouterr()
        assert err == f"error: {tmp_path / 'nope'}: mappings_dir is not a folder\n"


class TestReload:
    """The mapping sets delivery uses change only when reloaded (SIGHUP, or the admin API), and
    only to sets that pass every check; ``/ready`` tells which generation runs."""

    async def test_admin_reload(self, tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
        folder = tmp_path / "mappings"
        folder.mkdir()
        (folder / "viewed.json").write_bytes(orjson.dumps(VIEWED))
        token = "admin-token-0123456789"
        settings = Settings(
            data_dir=tmp_path,
            min_free_disk_bytes=0,
            admin_token=token,
            destinations=(Destination(name="klaviyo", private_key="pk_reload", mappings_dir=folder),),
        )
        sets = MappingSets([folder])
        client = await aiohttp_client(build_app(settings, MemoryQueue(), mappings=sets))
        headers = {"Authorization": f"Bearer {token}"}

        assert (await client.post("/admin/mappings/reload")).status == 401
        (folder / "broken.json").write_text('{"kind": "event", "match": {"type": ["track"]}}')
        response = await client.post("/admin/mappings/reload", headers=headers)
        body = await response.json()
        assert response.status == 422 and body["reloaded"] is False
        assert body["error"].startswith(
            f"mappings not reloaded, the running set is kept: {folder / 'broken.json'}: at /: 'metric' is a required"
        )
        ready = await client.get("/ready")
        assert ready.status == 200  # the running set is a good one
        assert (await ready.json())["mappings"] == {"generation": 1, "last_reload_refused": sets.reload_error}

        (folder / "broken.json").unlink()
        (folder / "viewed.json").write_bytes(orjson.dumps({**VIEWED, "metric": {"value": "Glimpsed"}}))
        response = await client.post("/admin/mappings/reload", headers=headers)
        assert (response.status, await response.json()) == (200, {"reloaded": True, "generation": 2})
        message = {"type": "track", "userId": "u1", "event": "Viewed"}
        [request] = transform(message, settings.destinations[0], sets.get(folder))
        assert request.body["data"]["attributes"]["metric"]["data"]["attributes"]["name"] == "Glimpsed"
        assert (await (await client.get("/ready")).json())["mappings"] == {
            "generation": 2,
            "last_reload_refused": None,
        }


VIEWED = {"kind": "event", "match": {"type": ["track"], "event": ["viewed"]}, "metric": {"value": "Seen"}}
