"""Settings: the TOML file, KLAVIYO_ROUTER_* overrides, errors naming the key, the embedded default."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

import router.settings as settings_module
from router.destination import KLAVIYO_BASE_URL
from router.errors import ConfigError
from router.settings import ENV_VARS, MIN_SECRET_LENGTH, SANDBOX_BASE_URL, Settings

ROOT = Path(__file__).resolve().parent.parent

FULL = """
data_dir = "{data_dir}"
admin_token = "env:TEST_ADMIN_TOKEN"

[server]
host = "0.0.0.0"
port = 9090

[queue]
url = "memory://"
dedupe_window = 3600
max_depth = 500

[limits]
max_request_bytes = 1000000
max_event_bytes = 10000
min_free_disk_bytes = 0
retry_after = 7

[log]
level = "DEBUG"
format = "console"

[[sources]]
name = "web"
write_key = "env:TEST_WEB_KEY"
destinations = ["main", "eu"]

[[sources]]
name = "backend"
write_key = "literal-backend-key"
destinations = "main"

[[destinations]]
name = "main"
private_key = "pk_main_literal"
list_id = "XyZ123"
consent = ["email", "sms"]

[[destinations]]
name = "eu"
privateApiKey = "env:TEST_EU_KEY"
enforceEmailAsPrimary = true
"""

MINIMAL = """
[[sources]]
name = "web"
write_key = "wk_minimal_0123456"
destinations = ["klaviyo"]

[[destinations]]
name = "klaviyo"
private_key = "pk"
"""


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "admin-token-value")
    monkeypatch.setenv("TEST_WEB_KEY", "web-key-from-env")
    monkeypatch.setenv("TEST_EU_KEY", "pk_eu_from_env")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.load(write(tmp_path, text), env=env or {})
    return caught.value.message


@pytest.mark.usefixtures("secrets_env")
class TestConfigFile:
    """A TOML file sets every field; env:VAR secrets are resolved."""

    def test_every_section(self, tmp_path: Path) -> None:
        """All documented keys land in the matching Settings fields."""
        settings = Settings.load(write(tmp_path, FULL.format(data_dir=tmp_path / "d")), env={})
        assert settings.data_dir == tmp_path / "d"
        assert (settings.host, settings.port) == ("0.0.0.0", 9090)
        assert (settings.queue_url, settings.dedupe_window, settings.max_queue_depth) == (
            "memory://",
            3600.0,
            500,
        )
        assert (settings.max_request_bytes, settings.max_event_bytes) == (1_000_000, 10_000)
        assert (settings.min_free_disk_bytes, settings.retry_after) == (0, 7)
        assert (settings.log_level, settings.log_format) == ("debug", "console")
        assert settings.admin_token == "admin-token-value"
        web, backend = settings.sources
        assert (web.name, web.write_key, web.destinations) == ("web", "web-key-from-env", ("main", "eu"))
        assert (backend.write_key, backend.destinations) == ("literal-backend-key", ("main",))
        main, eu = settings.destinations
        assert (main.private_key, main.list_id, main.consent) == (
            "pk_main_literal",
            "XyZ123",
            ("email", "sms"),
        )
        assert (eu.private_key, eu.enforce_email_as_primary, eu.base_url) == (
            "pk_eu_from_env",
            True,
            KLAVIYO_BASE_URL,
        )
        assert settings.config_path is not None and not settings.sandbox

    def test_defaults(self, tmp_path: Path) -> None:
        """Only sources and destinations are required; the rest has documented defaults."""
        settings = Settings.load(write(tmp_path, MINIMAL), env={})
        assert (settings.port, settings.max_request_bytes, settings.max_event_bytes) == (
            8080,
            4 << 20,
            32 << 10,
        )
        assert settings.dedupe_window == 24 * 3600
        assert settings.resolved_queue_url == f"sqlite:///{(Path('data') / 'queue.db').absolute()}"

    def test_secrets_stay_out_of_repr(self, tmp_path: Path) -> None:
        """repr() shows no write key, private key or admin token; secrets() lists them all."""
        settings = Settings.load(write(tmp_path, FULL.format(data_dir=tmp_path)), env={})
        text = repr(settings)
        for secret in (
            "web-key-from-env",
            "literal-backend-key",
            "pk_main_literal",
            "pk_eu_from_env",
            "admin-token",
        ):
            assert secret not in text
        assert set(settings.secrets()) == {
            "web-key-from-env",
            "literal-backend-key",
            "pk_main_literal",
            "pk_eu_from_env",
            "admin-token-value",
        }


class TestEnvironment:
    """KLAVIYO_ROUTER_* variables override the file."""

    def test_overrides(self, tmp_path: Path) -> None:
        """Env values win over the file and are parsed like it."""
        env = {
            "KLAVIYO_ROUTER_PORT": "7000",
            "KLAVIYO_ROUTER_QUEUE_URL": "memory://",
            "KLAVIYO_ROUTER_MAX_EVENT_BYTES": "2048",
            "KLAVIYO_ROUTER_DEDUPE_WINDOW": "60.5",
            "KLAVIYO_ROUTER_LOG_LEVEL": "warning",
            "KLAVIYO_ROUTER_DATA_DIR": str(tmp_path / "elsewhere"),
        }
        settings = Settings.load(write(tmp_path, "[server]\nport = 1\n" + MINIMAL), env=env)
        assert (settings.port, settings.queue_url, settings.max_event_bytes) == (7000, "memory://", 2048)
        assert (settings.dedupe_window, settings.log_level) == (60.5, "warning")
        assert settings.data_dir == tmp_path / "elsewhere"

    def test_config_file_from_env(self, tmp_path: Path) -> None:
        """KLAVIYO_ROUTER_CONFIG names the file when no path is given."""
        path = write(tmp_path, MINIMAL)
        settings = Settings.load(None, env={"KLAVIYO_ROUTER_CONFIG": str(path)})
        assert settings.config_path == path and settings.sources[0].name == "web"

    def test_bad_value_names_the_variable(self, tmp_path: Path) -> None:
        """A malformed env value is reported under the variable's name."""
        message = load_error(tmp_path, MINIMAL, env={"KLAVIYO_ROUTER_PORT": "eighty"})
        assert message == "KLAVIYO_ROUTER_PORT: expected an integer, got 'eighty'"

    def test_documented_mapping(self) -> None:
        """Every scalar key has a variable named after its field."""
        assert ENV_VARS["KLAVIYO_ROUTER_QUEUE_URL"] == "queue.url"
        assert ENV_VARS["KLAVIYO_ROUTER_PORT"] == "server.port"
        assert ENV_VARS["KLAVIYO_ROUTER_MAX_QUEUE_DEPTH"] == "queue.max_depth"
        assert ENV_VARS["KLAVIYO_ROUTER_DATA_DIR"] == "data_dir"

    def test_every_variable_is_in_the_reference(self) -> None:
        """The module's docstring, the reference of every key (the README points there), names every variable."""
        reference = settings_module.__doc__ or ""
        assert [name for name in ENV_VARS if name not in reference] == []


class TestErrors:
    """Every config error names the key and the reason."""

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("colour = 'red'\n" + MINIMAL, "colour: unknown key"),
            ("[server]\nprot = 1\n" + MINIMAL, "server.prot: unknown key"),
            ("[server]\nport = 'x'\n" + MINIMAL, "server.port: expected an integer ≥ 0, got 'x'"),
            ("[server]\nport = 70000\n" + MINIMAL, "server.port: expected a TCP port (0-65535)"),
            ("server = 1\n" + MINIMAL, "server: expected a table ([server])"),
            ("[queue]\nurl = 'redis://x'\n" + MINIMAL, "queue.url: expected sqlite:///path"),
            (
                "[limits]\nmax_event_bytes = 0\n" + MINIMAL,
                "limits.max_event_bytes: expected a positive integer",
            ),
            ("[log]\nlevel = 'loud'\n" + MINIMAL, "log.level: expected one of debug, info, warning, error"),
            (
                MINIMAL.replace('write_key = "wk_minimal_0123456"', 'write_key = "env:NOT_SET_ANYWHERE"'),
                "sources[0].write_key: environment variable NOT_SET_ANYWHERE is not set",
            ),
            (
                MINIMAL.replace('["klaviyo"]', '["nope"]'),
                "sources[0].destinations: no [[destinations]] named 'nope'",
            ),
            (
                MINIMAL.replace('name = "web"\n', 'name = "web"\ncolour = 1\n'),
                "sources[0].colour: unknown key",
            ),
            (MINIMAL.replace('write_key = "wk_minimal_0123456"\n', ""), "sources[0].write_key: required"),
            (MINIMAL.replace('private_key = "pk"\n', ""), "destinations[0].private_key: required"),
            (
                MINIMAL.replace('private_key = "pk"', 'private_key = "pk"\nsend_page_as_track = "yes"'),
                "destinations[0].send_page_as_track: expected true or false",
            ),
            (
                MINIMAL.replace('private_key = "pk"', 'private_key = "pk"\ncolour = 1'),
                "destinations[0].colour: unknown key (known: additional_page_info, base_url, consent, ",
            ),
            (
                MINIMAL.split("[[destinations]]")[0],
                "destinations: at least one [[destinations]] table is required",
            ),
            (
                MINIMAL + MINIMAL.split("[[destinations]]")[0].replace('"web"', '"app"'),
                "sources[1].write_key: the same key is used by source 'web'",
            ),
            ("[[sources]\n", "not valid TOML"),
        ],
    )
    def test_message(self, tmp_path: Path, text: str, expected: str) -> None:
        """The ConfigError text starts with (or contains) the key path and the reason."""
        assert expected in load_error(tmp_path, text)

    def test_variable_set_but_empty(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """env:VAR with VAR set to nothing says so, rather than 'not set'."""
        monkeypatch.setenv("EMPTY_FOR_THIS_TEST", "")
        for old, new, key in (
            (
                'write_key = "wk_minimal_0123456"',
                'write_key = "env:EMPTY_FOR_THIS_TEST"',
                "sources[0].write_key",
            ),
            ('private_key = "pk"', 'private_key = "env:EMPTY_FOR_THIS_TEST"', "destinations[0].private_key"),
        ):
            error = load_error(tmp_path, MINIMAL.replace(old, new))
            assert f"{key}: environment variable EMPTY_FOR_THIS_TEST is set but empty" in error

    def test_short_secrets_are_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write key or admin token shorter than MIN_SECRET_LENGTH could not be masked wherever it
        appears: refused, naming the source (or the token), where it came from and the minimum,
        never the value."""
        assert MIN_SECRET_LENGTH == 16
        monkeypatch.setenv("SHORT_KEY_FOR_THIS_TEST", "wk_fifteen_char")
        cases = [
            (
                MINIMAL.replace('"wk_minimal_0123456"', '"k"'),
                {},
                "sources[0].write_key: the write key of source 'web' has 1 characters, fewer than the 16",
            ),
            (
                MINIMAL.replace('"wk_minimal_0123456"', '"env:SHORT_KEY_FOR_THIS_TEST"'),
                {},
                "sources[0].write_key: the write key of source 'web' (environment variable "
                "SHORT_KEY_FOR_THIS_TEST) has 15 characters, fewer than the 16",
            ),
            (
                'admin_token = "admin-token"\n' + MINIMAL,
                {},
                "admin_token: the admin token has 11 characters, fewer than the 16",
            ),
            (
                MINIMAL,
                {"KLAVIYO_ROUTER_ADMIN_TOKEN": "tok"},
                "KLAVIYO_ROUTER_ADMIN_TOKEN: the admin token has 3",
            ),
        ]
        for text, env, expected in cases:
            error = load_error(tmp_path, text, env)
            assert error.startswith(expected) and "masked wherever it appears" in error, error
            assert "wk_fifteen_char" not in error and "admin-token" not in error
        key = "wk_exactly_16_ch"
        assert len(key) == 16
        settings = Settings.load(write(tmp_path, MINIMAL.replace("wk_minimal_0123456", key)), env={})
        assert settings.sources[0].write_key == key

    def test_unknown_consent_channel(self, tmp_path: Path) -> None:
        """A destination's consent is checked when the config loads."""
        error = load_error(
            tmp_path, MINIMAL.replace('private_key = "pk"', 'private_key = "pk"\nconsent = ["emial"]')
        )
        assert (
            "destinations[0].consent: unknown consent channel 'emial' (Klaviyo's current API subscribes"
            in error
        )

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable config file is a ConfigError naming the file."""
        with pytest.raises(ConfigError, match="cannot read the config file"):
            Settings.load(tmp_path / "absent.toml", env={})


class TestEmbeddedDefault:
    """No config: SQLite in the data folder, a persisted generated write key, sandbox or real Klaviyo."""

    def test_sandbox_without_private_key(self, tmp_path: Path) -> None:
        """Without KLAVIYO_PRIVATE_KEY the one destination is the announced sandbox."""
        settings = Settings.embedded_default(tmp_path / "data", env={})
        assert settings.sandbox
        (source,) = settings.sources
        (destination,) = settings.destinations
        assert (source.name, source.destinations, destination.name) == ("default", ("klaviyo",), "klaviyo")
        assert destination.base_url == SANDBOX_BASE_URL
        assert settings.resolved_queue_url == f"sqlite:///{(tmp_path / 'data' / 'queue.db').absolute()}"
        assert settings.config_path is None
        assert settings.secrets() == (source.write_key,)

    def test_real_klaviyo_with_private_key(self, tmp_path: Path) -> None:
        """KLAVIYO_PRIVATE_KEY makes the destination real Klaviyo."""
        settings = Settings.embedded_default(tmp_path, env={"KLAVIYO_PRIVATE_KEY": "pk_live_1"})
        assert not settings.sandbox
        assert settings.destinations[0].private_key == "pk_live_1"
        assert settings.destinations[0].base_url == KLAVIYO_BASE_URL

    def test_a_short_write_key_in_the_key_file_is_refused(self, tmp_path: Path) -> None:
        """An edited key file holding a key too short to be masked stops start-up, naming the file."""
        (tmp_path / "write_key").write_text("short\n")
        with pytest.raises(ConfigError) as caught:
            Settings.embedded_default(tmp_path, env={})
        assert caught.value.message == (
            f"data_dir: the write key in {tmp_path / 'write_key'} has 5 characters, under the 16 a write key "
            "needs (to be masked wherever it appears); delete the file to generate a new one"
        )

    def test_write_key_generated_once(self, tmp_path: Path) -> None:
        """The key is generated on first start, stored with mode 0600 and reused afterwards."""
        first = Settings.embedded_default(tmp_path / "data", env={}).sources[0].write_key
        again = Settings.embedded_default(tmp_path / "data", env={}).sources[0].write_key
        key_file = tmp_path / "data" / "write_key"
        assert first == again == key_file.read_text().strip()
        assert len(first) >= 24
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    def test_load_without_file(self, tmp_path: Path) -> None:
        """Settings.load(None) is the embedded default in KLAVIYO_ROUTER_DATA_DIR, with env overrides."""
        env = {"KLAVIYO_ROUTER_DATA_DIR": str(tmp_path / "d"), "KLAVIYO_ROUTER_PORT": "0"}
        settings = Settings.load(None, env=env)
        assert settings.data_dir == tmp_path / "d" and settings.port == 0
        assert (tmp_path / "d" / "write_key").exists()


class TestDeliveryChecks:
    """Delivery settings that contradict each other stop start-up."""

    def test_lease_must_outlast_the_timeout(self, tmp_path: Path) -> None:
        """A lease no longer than one Klaviyo call would hand a batch in flight to another worker."""
        config = tmp_path / "router.toml"
        config.write_text(
            '[delivery]\nlease = 30\ntimeout = 30\n[[sources]]\nname = "web"\nwrite_key = "wk_settings_0123456"\n'
            'destinations = ["klaviyo"]\n[[destinations]]\nname = "klaviyo"\nprivate_key = "pk"\n'
        )
        with pytest.raises(ConfigError, match=r"delivery.lease: 30 s must be longer than delivery.timeout"):
            Settings.load(config, env={})

    def test_planners(self, tmp_path: Path) -> None:
        """``[delivery] planners``: a count of processes, from the file or the environment."""
        config = tmp_path / "router.toml"
        destination = (
            '\n[[sources]]\nname = "web"\nwrite_key = "wk_settings_0123456"\ndestinations = ["klaviyo"]\n'
        )
        destination += '[[destinations]]\nname = "klaviyo"\nprivate_key = "pk"\n'
        config.write_text("[delivery]\nplanners = 0\n" + destination)
        assert Settings.load(config, env={}).delivery_planners == 0
        env = {"KLAVIYO_ROUTER_DELIVERY_PLANNERS": "2"}
        assert Settings.load(config, env=env).delivery_planners == 2
        assert Settings().delivery_planners == 1
        config.write_text("[delivery]\nplanners = -1\n" + destination)
        with pytest.raises(ConfigError, match=r"delivery.planners: expected an integer ≥ 0, got -1"):
            Settings.load(config, env={})


def test_the_compose_deployments_config_loads_with_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/router.toml, with what deploy/compose.yaml sets, is a working config on PostgreSQL."""
    env = {
        "KLAVIYO_ROUTER_QUEUE_URL": "postgresql://router:secret@postgres:5432/router?pool_size=8",
        "KLAVIYO_ROUTER_HOST": "0.0.0.0",
        "KLAVIYO_PRIVATE_KEY": "pk_0123456789",
        "WEB_WRITE_KEY": "wk_compose_0123456789",
    }
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    assert all(name in compose for name in env if name != "KLAVIYO_ROUTER_HOST")  # the image sets the host
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.load(ROOT / "deploy" / "router.toml", env=env)
    assert settings.resolved_queue_url == env["KLAVIYO_ROUTER_QUEUE_URL"]
    assert [source.write_key for source in settings.sources] == ["wk_compose_0123456789"]
    assert settings.destination("klaviyo").private_key == "pk_0123456789"
