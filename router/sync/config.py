"""A sync's settings: one ``[[syncs]]`` table of the config, or the ``sync`` command's arguments.

::

    [[syncs]]
    name = "vip"                        # letters, digits, '_', '-', '.'
    destination = "klaviyo"             # default: the config's first destination
    source = "exports/vip.csv"          # CSV / NDJSON (.gz) / Parquet file ...
    # query = "SELECT ..."              # ... or a query,
    # database = "postgresql://..."     #     on postgresql://, sqlite:///path or duckdb:///path
    list = "VIP customers"              # the Klaviyo list, by name (created when missing)
    mode = "mirror"                     # mirror (default with a list), add, upsert (no list)
    full_profile = false                # false: identity only (email); true: every column
    schedule = "every 6h"               # manual (default) or every <n><s|m|h|d>, run by serve
    subscribe = []                      # ["email", "sms"]: bulk subscribe jobs (consent) instead
    max_removal_percent = 20            # refuse a mirror run removing more of the list
    grace_runs = 0                      # runs a member may be absent before it is removed
    clear_empty = false                 # an empty custom property cell unsets the property
    columns = { "Amperity ID" = "external_id" }   # renames: source column = profile column

Every problem is a :class:`ConfigError` naming the key (``syncs[0].mode: ...``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from router.errors import ConfigError

MODES: Final = ("mirror", "add", "upsert")
CHANNELS: Final = ("email", "sms")
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_EVERY: Final = re.compile(r"^every\s+(\d+)\s*([smhd])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
KEYS: Final = frozenset(
    {
        "name",
        "destination",
        "source",
        "query",
        "database",
        "list",
        "mode",
        "full_profile",
        "schedule",
        "subscribe",
        "max_removal_percent",
        "grace_runs",
        "clear_empty",
        "columns",
    }
)
DATABASE_SCHEMES: Final = ("postgresql", "postgres", "sqlite", "duckdb")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncConfig:
    """What one sync reads, where it sends it and how carefully."""

    #: Names the sync's state and history; an ad-hoc ``sync`` derives one from the source and list.
    name: str
    #: The destination (Klaviyo account) to send to; ``None``: the config's first one.
    destination: str | None = None
    #: A file to read (CSV, NDJSON, Parquet; gzip of CSV/NDJSON) ...
    source: str | None = None
    #: ... or a SQL query on ``database`` (``postgresql://``, ``sqlite:///path``, ``duckdb:///path``).
    query: str | None = None
    database: str | None = field(default=None, repr=False)
    #: The list's name; ``None`` with ``mode = "upsert"``.
    list_name: str | None = None
    mode: str = "upsert"
    #: Send every column (the seed's "Use full profile to update list"); else identity only.
    full_profile: bool = False
    #: Seconds between two runs under ``serve``; ``None``: run by hand only.
    every: float | None = None
    #: Consent channels to subscribe with (bulk subscribe jobs); empty: membership without consent.
    subscribe: tuple[str, ...] = ()
    max_removal_percent: float = 20.0
    grace_runs: int = 0
    clear_empty: bool = False
    #: Source column (any case) → profile column or custom property name.
    columns: Mapping[str, str] = field(default_factory=dict)
    #: ``--allow-mass-removal``: let this run pass the removal guard (never from a config file).
    allow_mass_removal: bool = False

    @property
    def uses_list(self) -> bool:
        return self.mode != "upsert"

    def describe_source(self) -> str:
        """The source for humans and the run history (never a database password)."""
        if self.source is not None:
            return self.source
        return f"query on {safe_dsn(self.database or '')}"


def safe_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)


def parse_syncs(value: Any, destinations: tuple[str, ...]) -> tuple[SyncConfig, ...]:
    """The ``[[syncs]]`` tables of a config file."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(table, dict) for table in value):
        raise ConfigError("syncs: expected [[syncs]] tables")
    result: list[SyncConfig] = []
    for index, table in enumerate(value):
        sync = parse_sync(table, f"syncs[{index}]", destinations)
        if any(other.name == sync.name for other in result):
            raise ConfigError(f"syncs[{index}].name: {sync.name!r} is used by another sync")
        result.append(sync)
    return tuple(result)


def parse_sync(table: Mapping[str, Any], where: str, destinations: tuple[str, ...]) -> SyncConfig:
    """One ``[[syncs]]`` table (also the ``sync`` command's arguments, as the same keys)."""
    for key in table:
        if key not in KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(KEYS))})")
    name = table.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected a name of letters, digits, '_', '-' or '.' (at most 64)")
    destination = _optional_text(table, "destination", where)
    if destination is not None and destination not in destinations:
        known = ", ".join(destinations) or "none"
        raise ConfigError(f"{where}.destination: no [[destinations]] named {destination!r} (known: {known})")
    source, query, database = (_optional_text(table, key, where) for key in ("source", "query", "database"))
    if (source is None) == (query is None):
        raise ConfigError(f"{where}: give either source (a file) or query (with database)")
    if query is not None and database is None:
        raise ConfigError(
            f"{where}.database: a query needs a database (postgresql://, sqlite:///, duckdb:///)"
        )
    if database is not None:
        scheme = database.split(":", 1)[0].lower()
        if scheme not in DATABASE_SCHEMES:
            raise ConfigError(
                f"{where}.database: expected postgresql://..., sqlite:///path or duckdb:///path, got {safe_dsn(database)!r}"
            )
    list_name = _optional_text(table, "list", where)
    mode = table.get("mode", "mirror" if list_name is not None else "upsert")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode == "upsert" and list_name is not None:
        raise ConfigError(f"{where}.mode: upsert sends profiles only; drop list or use mode add or mirror")
    if mode != "upsert" and list_name is None:
        raise ConfigError(f"{where}.list: mode {mode} needs the name of a list")
    return SyncConfig(
        name=name,
        destination=destination,
        source=source,
        query=query,
        database=database,
        list_name=list_name,
        mode=mode,
        full_profile=_bool(table, "full_profile", where),
        every=parse_schedule(table.get("schedule", "manual"), f"{where}.schedule"),
        subscribe=_channels(table.get("subscribe", []), f"{where}.subscribe", list_name),
        max_removal_percent=_percent(table.get("max_removal_percent", 20), f"{where}.max_removal_percent"),
        grace_runs=_count(table.get("grace_runs", 0), f"{where}.grace_runs"),
        clear_empty=_bool(table, "clear_empty", where),
        columns=_columns(table.get("columns", {}), f"{where}.columns"),
    )


def parse_schedule(value: Any, where: str) -> float | None:
    """``manual`` → ``None``; ``every 30m`` / ``every 6h`` / ``every 1d`` → seconds."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "manual":
        return None
    match = _EVERY.match(text or "")
    if match is None or int(match.group(1)) == 0:
        raise ConfigError(
            f"{where}: expected 'manual' or 'every <n><s|m|h|d>' (e.g. 'every 6h'), got {value!r}"
        )
    return float(int(match.group(1)) * _UNITS[match.group(2)])


def _optional_text(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}.{key}: expected a non-empty string")
    return value.strip()


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ConfigError(f"{where}: expected a percentage from 0 to 100, got {value!r}")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: expected an integer ≥ 0, got {value!r}")
    return value


def _channels(value: Any, where: str, list_name: str | None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{where}: expected a list of consent channels ({', '.join(CHANNELS)})")
    channels = tuple(dict.fromkeys(item.strip().lower() for item in items))
    unknown = [channel for channel in channels if channel not in CHANNELS]
    if unknown:
        raise ConfigError(f"{where}: unknown consent channel {unknown[0]!r} (known: {', '.join(CHANNELS)})")
    if channels and list_name is None:
        raise ConfigError(f"{where}: subscribing needs a list")
    return channels


def _columns(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k.strip() and v.strip() for k, v in value.items()
    ):
        raise ConfigError(
            f'{where}: expected a table of source column = profile column (e.g. {{"Amperity ID" = "external_id"}})'
        )
    return {k.strip(): v.strip() for k, v in value.items()}


def parse_renames(items: list[str], where: str = "--column") -> dict[str, str]:
    """``--column "Amperity ID=external_id"`` arguments as renames."""
    renames: dict[str, str] = {}
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ConfigError(f"{where} {item!r}: expected SOURCE COLUMN=PROFILE COLUMN")
        renames[source.strip()] = target.strip()
    return renames
