"""One frozen :class:`Settings`, loaded from a TOML file plus ``KLAVIYO_ROUTER_*`` variables.

A config file (every key optional except ``[[sources]]`` and ``[[destinations]]``)::

    data_dir = "./data"                        # KLAVIYO_ROUTER_DATA_DIR
    admin_token = "env:ROUTER_ADMIN_TOKEN"     # KLAVIYO_ROUTER_ADMIN_TOKEN (literal or env:VAR)

    [server]
    host = "127.0.0.1"                         # KLAVIYO_ROUTER_HOST
    port = 8080                                # KLAVIYO_ROUTER_PORT (0: any free port)

    [queue]
    url = "sqlite:///data/queue.db"            # KLAVIYO_ROUTER_QUEUE_URL (default <data_dir>/queue.db); or
                                               # "postgresql://user:password@host:5432/db?pool_size=8":
                                               # any number of routers on one queue, sharing Klaviyo's limits
    dedupe_window = 86400                      # KLAVIYO_ROUTER_DEDUPE_WINDOW, seconds
    max_depth = 1000000                        # KLAVIYO_ROUTER_MAX_QUEUE_DEPTH, jobs waiting → 503
    retention = 604800                         # KLAVIYO_ROUTER_RETENTION, seconds done jobs are kept
    cleanup_interval = 300                     # KLAVIYO_ROUTER_CLEANUP_INTERVAL, seconds between two deletions
                                               # of done jobs and dedupe entries past their time (0: never)
    hot_key_threshold = 200                    # KLAVIYO_ROUTER_HOT_KEY_THRESHOLD

    [limits]
    max_request_bytes = 4194304                # KLAVIYO_ROUTER_MAX_REQUEST_BYTES (decompressed) → 413
    max_event_bytes = 32768                    # KLAVIYO_ROUTER_MAX_EVENT_BYTES → 413 / rejected
    max_batch_events = 10000                   # KLAVIYO_ROUTER_MAX_BATCH_EVENTS, events per request → 413
    max_nesting_depth = 64                     # KLAVIYO_ROUTER_MAX_NESTING_DEPTH, levels of an event (≤ 128)
    max_listed_rejections = 100                # KLAVIYO_ROUTER_MAX_LISTED_REJECTIONS, in one response
    body_timeout = 15                          # KLAVIYO_ROUTER_BODY_TIMEOUT, seconds to receive a body → 408
    min_free_disk_bytes = 268435456            # KLAVIYO_ROUTER_MIN_FREE_DISK_BYTES (data_dir) → 503
    retry_after = 5                            # KLAVIYO_ROUTER_RETRY_AFTER, seconds, on 503

    [delivery]
    workers = 4                                # KLAVIYO_ROUTER_DELIVERY_WORKERS, per destination (0: ingest only)
    batch_size = 1000                          # KLAVIYO_ROUTER_DELIVERY_BATCH_SIZE, jobs per claim
    lease = 600                                # KLAVIYO_ROUTER_DELIVERY_LEASE, seconds
    timeout = 30                               # KLAVIYO_ROUTER_DELIVERY_TIMEOUT, seconds per Klaviyo call
    rate_limit_scale = 1.0                     # KLAVIYO_ROUTER_DELIVERY_RATE_LIMIT_SCALE, share of Klaviyo's limits
    max_attempts = 12                          # KLAVIYO_ROUTER_DELIVERY_MAX_ATTEMPTS, then dead letter
    max_age = 86400                            # KLAVIYO_ROUTER_DELIVERY_MAX_AGE, seconds, then dead letter
    pause_probe = 30                           # KLAVIYO_ROUTER_DELIVERY_PAUSE_PROBE, seconds (401/403)
    planners = 1                               # KLAVIYO_ROUTER_DELIVERY_PLANNERS, planning processes (0: in-process)
    stall_after = 300                          # KLAVIYO_ROUTER_DELIVERY_STALL_AFTER, seconds an oldest job may stay
                                               # the same before /ready reports its destination stalled (0: never)

    [log]
    level = "info"                             # KLAVIYO_ROUTER_LOG_LEVEL: debug, info, warning, error
    format = "json"                            # KLAVIYO_ROUTER_LOG_FORMAT: json or console

    [[sources]]
    name = "web"
    write_key = "env:WEB_WRITE_KEY"            # literal or env:VAR
    destinations = ["klaviyo"]

    [[destinations]]                           # router.destination.Destination keys (or RudderStack's)
    name = "klaviyo"
    private_key = "env:KLAVIYO_PRIVATE_KEY"

    [[syncs]]                                  # optional: audience syncs (router.sync.config)
    name = "vip"
    source = "exports/vip.csv"                 # or query = "SELECT ..." with database = "..."
    list = "VIP customers"
    schedule = "every 6h"                      # manual (default): klaviyo-router sync --name vip

``KLAVIYO_ROUTER_CONFIG`` names the file when none is given. An environment variable wins over
the file, which wins over the default. Unknown keys are errors;
every error is a :class:`ConfigError` naming the key (``sources[1].write_key: ...``) and the reason.

Without a config file, :meth:`Settings.embedded_default` applies: SQLite under the data folder, a
generated write key, one source ``default`` and one destination ``klaviyo`` (real Klaviyo when
``KLAVIYO_PRIVATE_KEY`` is set, otherwise a sandbox pointing at an in-process fake Klaviyo).
"""

from __future__ import annotations

import os
import re
import secrets
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from router.destination import Destination, env_secret
from router.errors import ConfigError
from router.logs import SUBSTRING_SECRET_LENGTH
from router.queue import QueueOptions
from router.sync.config import SyncConfig, parse_syncs

ENV_PREFIX = "KLAVIYO_ROUTER_"
#: The config file to load when no path is given.
CONFIG_ENV = "KLAVIYO_ROUTER_CONFIG"
#: The private key of the embedded default's destination.
PRIVATE_KEY_ENV = "KLAVIYO_PRIVATE_KEY"
DEFAULT_DATA_DIR = Path("data")
#: The ``--config`` help of the commands that run on the router's configuration (:meth:`Settings.load`).
CONFIG_HELP = (
    f"TOML config file (default: the file {CONFIG_ENV} names, else the embedded default, its data in "
    f"./{DEFAULT_DATA_DIR})"
)
#: Placeholder base URL of the sandbox destination until the fake Klaviyo is listening.
SANDBOX_BASE_URL = "http://127.0.0.1:0"
#: Private key of the sandbox destination: a placeholder the fake Klaviyo accepts, not a secret.
SANDBOX_PRIVATE_KEY = "sandbox-placeholder-key"
WRITE_KEY_FILE = "write_key"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")
#: The deepest ``limits.max_nesting_depth`` may be: Klaviyo's request envelope adds about ten levels
#: around an event's properties, and orjson writes at most 255.
MAX_NESTING_DEPTH = 128
#: The fewest characters a write key or the admin token may have: a secret this long is masked
#: wherever it appears, in stored events (:class:`router.intake.WriteKeys`) and in logs
#: (:mod:`router.logs`), whatever surrounds it. A shorter one would either be left in place where it
#: runs into other text or mask ordinary words (a write key ``k`` would turn every ``track`` into
#: ``trac***``), and is a guessable credential anyway. The embedded default generates 32 characters.
MIN_SECRET_LENGTH = SUBSTRING_SECRET_LENGTH
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """A producer of events, known by its write key."""

    #: Name used in logs, metrics and queued jobs.
    name: str
    #: The key clients send (HTTP Basic user name or ``writeKey``); never logged.
    write_key: str = field(repr=False)
    #: Names of the destinations every event of this source goes to.
    destinations: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the router is configured with."""

    #: Folder for the SQLite queue, the generated write key and the disk-space check.
    data_dir: Path = DEFAULT_DATA_DIR
    #: ``sqlite:///path``, ``postgresql://...`` or ``memory://``; empty: ``<data_dir>/queue.db``.
    queue_url: str = ""
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (the start-up banner shows which).
    port: int = 8080
    #: Largest request body accepted, after gzip decompression.
    max_request_bytes: int = 4 * 1024 * 1024
    #: Largest single event accepted (serialised, after normalisation).
    max_event_bytes: int = 32 * 1024
    #: Most events one request may carry (413 past it).
    max_batch_events: int = 10_000
    #: Deepest an event may nest arrays and objects (the event itself is level 1); delivery writes
    #: Klaviyo's requests around it, and JSON writers stop at 255 levels.
    max_nesting_depth: int = 64
    #: Most rejected events an answer lists one by one; the rest are counted.
    max_listed_rejections: int = 100
    #: Seconds a client has to send a request's body (408 and the connection closed after).
    body_timeout: float = 15.0
    #: Seconds during which a ``(source, messageId)`` pair is a duplicate.
    dedupe_window: float = 24 * 3600.0
    #: Seconds done jobs are kept for replay.
    retention: float = 7 * 24 * 3600.0
    #: Seconds between two cleanups (``serve`` and ``work``: :mod:`router.retention`) of the done
    #: jobs past ``retention`` and the dedupe entries past ``dedupe_window``; 0: never.
    cleanup_interval: float = 300.0
    #: Jobs waiting on one ordering key beyond which ordering is given up for that key.
    hot_key_threshold: int = 200
    #: Jobs pending or in flight above which ingest answers 503.
    max_queue_depth: int = 1_000_000
    #: Free bytes on the data folder's disk below which ingest answers 503.
    min_free_disk_bytes: int = 256 * 1024 * 1024
    #: ``Retry-After`` seconds sent with a 503.
    retry_after: int = 5
    sources: tuple[Source, ...] = ()
    destinations: tuple[Destination, ...] = ()
    #: Token for administrative endpoints (none yet); never logged.
    admin_token: str | None = field(default=None, repr=False)
    #: Delivery workers per destination (0: this process only ingests; run ``work`` elsewhere),
    #: jobs per claimed batch, lease and Klaviyo timeout (s).
    delivery_workers: int = 4
    delivery_batch_size: int = 1000
    delivery_lease: float = 600.0
    delivery_timeout: float = 30.0
    #: Share of Klaviyo's documented rate limits to use (leave room for other clients of the account).
    delivery_rate_limit_scale: float = 1.0
    #: Retry bounds: attempts, and the age (s) after which an event is dead-lettered, not retried.
    delivery_max_attempts: int = 12
    delivery_max_age: float = 86_400.0
    #: While Klaviyo refuses the key, seconds between two tries.
    delivery_pause_probe: float = 30.0
    #: ``/ready`` reports a destination stalled when its oldest due job stays the same this long (0: never).
    delivery_stall_after: float = 300.0
    #: Processes that plan delivery batches (transform, batch, encode); 0: the delivering process.
    delivery_planners: int = 1
    log_level: str = "info"
    log_format: str = "json"
    #: True when the only destination is the sandbox (no private key given).
    sandbox: bool = False
    #: The file the settings came from; None for the embedded default.
    config_path: Path | None = None
    #: ``[[syncs]]``: audience syncs (``klaviyo-router sync --name``; scheduled ones run under ``serve``).
    syncs: tuple[SyncConfig, ...] = ()

    @classmethod
    def load(cls, path: Path | None, *, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from a TOML file plus env overrides.

        Without ``path``, the file named by ``KLAVIYO_ROUTER_CONFIG``; without either, the embedded default.
        """
        env = os.environ if env is None else env
        if path is None and env.get(CONFIG_ENV):
            path = Path(env[CONFIG_ENV])
        if path is None:
            data_dir = Path(env.get(ENV_PREFIX + "DATA_DIR") or DEFAULT_DATA_DIR)
            settings = replace(cls.embedded_default(data_dir, env=env), **_scalars({}, env))
            settings.check()
            return settings
        raw = _read_toml(path)
        _check_keys(raw, _TOP_LEVEL, where="")
        destinations = _destinations(raw.get("destinations"))
        sources = _sources(raw.get("sources"), {d.name for d in destinations})
        syncs = parse_syncs(raw.get("syncs"), tuple(d.name for d in destinations))
        settings = cls(
            sources=sources, destinations=destinations, syncs=syncs, config_path=path, **_scalars(raw, env)
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse combinations of values that are each fine alone."""
        if self.max_nesting_depth > MAX_NESTING_DEPTH:
            raise ConfigError(
                f"limits.max_nesting_depth: {self.max_nesting_depth} is over {MAX_NESTING_DEPTH}: delivery "
                "could not write Klaviyo's requests around such an event"
            )
        if self.delivery_lease <= self.delivery_timeout:
            raise ConfigError(
                f"delivery.lease: {self.delivery_lease:g} s must be longer than delivery.timeout "
                f"({self.delivery_timeout:g} s), or a batch still being sent is handed to another worker"
            )

    @classmethod
    def embedded_default(cls, data_dir: Path, *, env: Mapping[str, str] | None = None) -> Settings:
        """No config at all: SQLite in ``data_dir``, a persisted generated write key, one source.

        The destination is real Klaviyo when ``KLAVIYO_PRIVATE_KEY`` is set, else the sandbox.
        Creates ``data_dir`` and ``data_dir/write_key`` when missing.
        """
        env = os.environ if env is None else env
        write_key = read_or_create_write_key(data_dir)
        private_key = env.get(
            PRIVATE_KEY_ENV, ""
        ).strip()  # set but empty: the sandbox, and the banner says so
        if private_key:
            destination = Destination(name="klaviyo", private_key=private_key)
        else:
            destination = Destination(
                name="klaviyo", private_key=SANDBOX_PRIVATE_KEY, base_url=SANDBOX_BASE_URL
            )
        return cls(
            data_dir=data_dir,
            sources=(Source(name="default", write_key=write_key, destinations=("klaviyo",)),),
            destinations=(destination,),
            sandbox=not private_key,
        )

    @property
    def resolved_queue_url(self) -> str:
        """The queue URL, defaulting to ``sqlite:///<data_dir>/queue.db`` (absolute)."""
        return self.queue_url or f"sqlite:///{(self.data_dir / 'queue.db').absolute()}"

    def queue_options(self) -> QueueOptions:
        """The ``[queue]`` options, the same for every process that opens the queue."""
        return QueueOptions(
            dedupe_window=self.dedupe_window,
            retention=self.retention,
            hot_key_threshold=self.hot_key_threshold,
        )

    def secrets(self) -> tuple[str, ...]:
        """Every configured secret value (write keys, private keys, admin token), for log redaction."""
        values = [s.write_key for s in self.sources]
        values += [d.private_key for d in self.destinations if d.private_key != SANDBOX_PRIVATE_KEY]
        if self.admin_token:
            values.append(self.admin_token)
        password = urlsplit(self.queue_url).password if self.queue_url else None
        if password:
            values.append(password)
        return tuple(v for v in values if v)

    def destination(self, name: str, *, where: str = "destination") -> Destination:
        """The destination called ``name``; :class:`ConfigError` naming ``where`` (what asked for
        it: a flag, a file) and the destinations there are, when there is none."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise ConfigError(f"{where}: no [[destinations]] named {name!r} (known: {known})")

    def with_destination(self, destination: Destination) -> Settings:
        """A copy with the destination of the same name replaced (e.g. the sandbox's real URL)."""
        others = tuple(destination if d.name == destination.name else d for d in self.destinations)
        return replace(self, destinations=others)


def read_or_create_write_key(data_dir: Path) -> str:
    """The write key kept in ``data_dir/write_key``, generated (and stored, mode 0600) on first use."""
    path = data_dir / WRITE_KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _write_new_key(path)
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot keep the write key in {path}: {exc.strerror}") from exc
    if not key:
        raise ConfigError(f"data_dir: {path} is empty; delete it to generate a new write key")
    if len(key) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"data_dir: the write key in {path} has {len(key)} characters, under the {MIN_SECRET_LENGTH} a "
            "write key needs (to be masked wherever it appears); delete the file to generate a new one"
        )
    return key


def _write_new_key(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(24) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


# --- scalar keys: (section, key) ↔ Settings attribute ↔ environment variable ---------------------


@dataclass(frozen=True, slots=True)
class _Scalar:
    attr: str
    section: str | None
    key: str
    parse: Callable[[Any, str], Any]
    #: How to read the environment variable's text before ``parse``.
    from_text: Callable[[str, str], Any]

    @property
    def where(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.attr.upper()


def _text(value: str, where: str) -> str:
    return value


def _int_text(value: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None


def _float_text(value: str, where: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _non_negative_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected an integer ≥ 0, got {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    port = _non_negative_int(value, where)
    if port > 65535:
        raise ConfigError(f"{where}: expected a TCP port (0-65535), got {value!r}")
    return port


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: expected a number of seconds ≥ 0, got {value!r}")
    return float(value)


def _positive_seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: expected a number of seconds above 0, got {value!r}")
    return float(value)


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"{where}: expected a number above 0 and at most 1, got {value!r}")
    return float(value)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string")
    return value.strip()


def _path(value: Any, where: str) -> Path:
    return Path(_string(value, where))


def _queue_url(value: Any, where: str) -> str:
    url = _string(value, where)
    scheme = url.split(":", 1)[0] if ":" in url else ""
    if scheme not in ("sqlite", "postgresql", "postgres", "memory"):
        raise ConfigError(f"{where}: expected sqlite:///path, postgresql://... or memory://")
    return url


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in options:
            raise ConfigError(f"{where}: expected one of {', '.join(options)}, got {value!r}")
        return str(text)

    return parse


def _secret(value: Any, where: str) -> str:
    """A literal, or ``env:VAR`` read from the environment (never echoed in errors)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string (literal or env:VAR)")
    if value.startswith("env:"):
        return env_secret(value[4:].strip(), where=where)
    return value


def _long_secret(value: Any, where: str, subject: str = "the admin token") -> str:
    """:func:`_secret` of at least :data:`MIN_SECRET_LENGTH` characters; the error names ``subject``,
    where it came from and how long it is, never what it is."""
    secret = _secret(value, where)
    if len(secret) < MIN_SECRET_LENGTH:
        if value.startswith("env:"):
            subject += f" (environment variable {value[4:].strip()})"
        raise ConfigError(
            f"{where}: {subject} has {len(secret)} characters, fewer than the {MIN_SECRET_LENGTH} it needs to "
            "be masked wherever it appears in logs and stored events (generate one: openssl rand -hex 16)"
        )
    return secret


_SCALARS = (
    _Scalar("data_dir", None, "data_dir", _path, _text),
    _Scalar("admin_token", None, "admin_token", _long_secret, _text),
    _Scalar("host", "server", "host", _string, _text),
    _Scalar("port", "server", "port", _port, _int_text),
    _Scalar("queue_url", "queue", "url", _queue_url, _text),
    _Scalar("dedupe_window", "queue", "dedupe_window", _seconds, _float_text),
    _Scalar("max_queue_depth", "queue", "max_depth", _positive_int, _int_text),
    _Scalar("retention", "queue", "retention", _seconds, _float_text),
    _Scalar("cleanup_interval", "queue", "cleanup_interval", _seconds, _float_text),
    _Scalar("hot_key_threshold", "queue", "hot_key_threshold", _positive_int, _int_text),
    _Scalar("max_request_bytes", "limits", "max_request_bytes", _positive_int, _int_text),
    _Scalar("max_event_bytes", "limits", "max_event_bytes", _positive_int, _int_text),
    _Scalar("max_batch_events", "limits", "max_batch_events", _positive_int, _int_text),
    _Scalar("max_nesting_depth", "limits", "max_nesting_depth", _positive_int, _int_text),
    _Scalar("max_listed_rejections", "limits", "max_listed_rejections", _positive_int, _int_text),
    _Scalar("body_timeout", "limits", "body_timeout", _positive_seconds, _float_text),
    _Scalar("min_free_disk_bytes", "limits", "min_free_disk_bytes", _non_negative_int, _int_text),
    _Scalar("retry_after", "limits", "retry_after", _positive_int, _int_text),
    _Scalar("delivery_workers", "delivery", "workers", _non_negative_int, _int_text),
    _Scalar("delivery_batch_size", "delivery", "batch_size", _positive_int, _int_text),
    _Scalar("delivery_lease", "delivery", "lease", _seconds, _float_text),
    _Scalar("delivery_timeout", "delivery", "timeout", _seconds, _float_text),
    _Scalar("delivery_rate_limit_scale", "delivery", "rate_limit_scale", _fraction, _float_text),
    _Scalar("delivery_max_attempts", "delivery", "max_attempts", _positive_int, _int_text),
    _Scalar("delivery_max_age", "delivery", "max_age", _seconds, _float_text),
    _Scalar("delivery_pause_probe", "delivery", "pause_probe", _seconds, _float_text),
    _Scalar("delivery_stall_after", "delivery", "stall_after", _seconds, _float_text),
    _Scalar("delivery_planners", "delivery", "planners", _non_negative_int, _int_text),
    _Scalar("log_level", "log", "level", _choice(LOG_LEVELS), _text),
    _Scalar("log_format", "log", "format", _choice(LOG_FORMATS), _text),
)
_SECTIONS = {s.section for s in _SCALARS if s.section}
_TOP_LEVEL = {s.key for s in _SCALARS if s.section is None} | _SECTIONS | {"sources", "destinations", "syncs"}
#: Every environment variable :meth:`Settings.load` reads, for documentation and ``--help``.
ENV_VARS = {s.env: s.where for s in _SCALARS}


def _scalars(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec, value, where, from_env in _scalar_sources(raw, env):
        if from_env:
            value = spec.from_text(value, where)
        values[spec.attr] = spec.parse(value, where)
    return values


def _scalar_sources(
    raw: Mapping[str, Any], env: Mapping[str, str]
) -> Iterator[tuple[_Scalar, Any, str, bool]]:
    for section in _SECTIONS:
        if section in raw:
            if not isinstance(raw[section], dict):
                raise ConfigError(f"{section}: expected a table ([{section}])")
            _check_keys(raw[section], {s.key for s in _SCALARS if s.section == section}, where=section)
    for spec in _SCALARS:
        if env.get(spec.env, "") != "":
            yield spec, env[spec.env], spec.env, True
            continue
        table = raw.get(spec.section, {}) if spec.section else raw
        if spec.key in table:
            yield spec, table[spec.key], spec.where, False


def _check_keys(table: Mapping[str, Any], known: set[str], *, where: str) -> None:
    for key in table:
        if key not in known:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


# --- [[sources]] and [[destinations]] -----------------------------------------------------------

_SOURCE_KEYS = {"name", "write_key", "destinations"}


def _tables(value: Any, key: str) -> list[dict[str, Any]]:
    if value is None:
        raise ConfigError(f"{key}: at least one [[{key}]] table is required")
    if not isinstance(value, list) or not value or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{key}: expected one or more [[{key}]] tables")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(f"{where}: expected a name of letters, digits, '_', '-' or '.' (at most 64)")
    return value


def _destinations(value: Any) -> tuple[Destination, ...]:
    result: list[Destination] = []
    for index, table in enumerate(_tables(value, "destinations")):
        where = f"destinations[{index}]"
        if "name" not in table:
            raise ConfigError(f"{where}.name: required")
        _name(table["name"], f"{where}.name")
        destination = Destination.from_mapping(table, where=where)
        if not destination.private_key:
            raise ConfigError(f"{where}.private_key: required (a literal or env:VAR)")
        if any(d.name == destination.name for d in result):
            raise ConfigError(f"{where}.name: {destination.name!r} is used by another destination")
        result.append(destination)
    return tuple(result)


def _sources(value: Any, destination_names: set[str]) -> tuple[Source, ...]:
    result: list[Source] = []
    for index, table in enumerate(_tables(value, "sources")):
        where = f"sources[{index}]"
        _check_keys(table, _SOURCE_KEYS, where=where)
        missing = sorted(_SOURCE_KEYS - table.keys())
        if missing:
            raise ConfigError(f"{where}.{missing[0]}: required")
        name = _name(table["name"], f"{where}.name")
        source = Source(
            name=name,
            write_key=_long_secret(
                table["write_key"], f"{where}.write_key", f"the write key of source {name!r}"
            ),
            destinations=_destination_names(
                table["destinations"], destination_names, f"{where}.destinations"
            ),
        )
        for other in result:
            if other.name == source.name:
                raise ConfigError(f"{where}.name: {source.name!r} is used by another source")
            if other.write_key == source.write_key:
                raise ConfigError(f"{where}.write_key: the same key is used by source {other.name!r}")
        result.append(source)
    return tuple(result)


def _destination_names(value: Any, known: set[str], where: str) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: expected a list of destination names")
    for name in names:
        if name not in known:
            raise ConfigError(f"{where}: no [[destinations]] named {name!r}")
    return tuple(dict.fromkeys(names))
