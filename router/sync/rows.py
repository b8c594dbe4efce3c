"""A source row → its key, its checksum and, when it must be sent, the Klaviyo profile (pure).

Reading a row (:meth:`RowReader.read`) is cheap: it resolves the column names, drops empty cells,
finds the key and checksums what the row holds. Only rows that are new or changed since the last
run are converted (:meth:`RowReader.profile`): every cell through the converter of its profile
column (the profile mapping's), which is where a bad phone, time zone or coordinate is refused.
A refused row is an :class:`Invalid` naming the row, the column and why; it goes to the report and
the other rows go on.

Keys: an email-only sync (the default, seed 001's "Email address only") keys rows by email and
requires it; a full-profile sync by the first of email, phone number and external id present.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from router.errors import ConfigError, TransformError
from router.fields import MISSING, Context, put
from router.sync.columns import CSV_NAMES, IDENTIFIERS, PROPERTIES, Column, read_header

#: Klaviyo's limit on one profile of a bulk import job.
MAX_PROFILE_BYTES: Final = 100 * 1024
_KEY_PREFIX: Final = {"email": "email:", "phone_number": "phone:", "external_id": "external_id:"}


@dataclass(frozen=True, slots=True)
class Invalid:
    """A row that is not sent: its number (1 = the first row after the header), column and reason."""

    row: int
    column: str
    reason: str


@dataclass(slots=True)
class Row:
    """A readable row, before conversion: the source's cells as they came (not frozen: a run
    builds one a row, and a frozen dataclass takes three times as long to build)."""

    number: int
    #: ``email:ada@example.com``, ``phone:+1617...``, ``external_id:42``.
    key: str
    #: Of the settings and the row's cells: equal checksums mean nothing to send again.
    checksum: str
    #: Source column → value.
    raw: Mapping[str, Any]


_COLUMN: Final = "column"
_CUSTOM: Final = "custom"
_PROPERTIES: Final = "properties"
_SKIP: Final = "skip"


@dataclass(frozen=True, slots=True)
class _Plan:
    """A source column when converting: a profile column (and its converter), a custom property,
    the ``properties`` object, or left out (identity only)."""

    kind: str
    name: str
    convert: Any = None
    target: tuple[str, ...] = ()


def key_identifier(key: str) -> tuple[str, str]:
    """``("email", "ada@example.com")`` for a key: the filter a profile id look-up uses."""
    for name, prefix in _KEY_PREFIX.items():
        if key.startswith(prefix):
            return name, key[len(prefix) :]
    raise ValueError(f"not a sync key: {key!r}")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class RowReader:
    """Reads rows of one source for one sync."""

    def __init__(
        self,
        columns: Iterable[str],
        table: Mapping[str, Column],
        *,
        renames: Mapping[str, str],
        full_profile: bool,
        clear_empty: bool,
        fingerprint: str,
        ctx: Context,
    ) -> None:
        self._table = table
        self._full = full_profile
        self._clear_empty = clear_empty and full_profile
        self._fingerprint = fingerprint.encode()
        self._ctx = ctx
        header = read_header(list(columns), renames, table)
        #: source name → (profile column or None, the name it is kept under)
        self._names: dict[str, tuple[str | None, str]] = {
            source: (column, column or wanted) for source, column, wanted in header.columns
        }
        self._id_sources: list[tuple[str, list[str]]] | None = None
        self._plans: dict[str, _Plan] = {}
        #: The profile columns and custom properties, in source order (the CSV output's columns).
        self.output_columns: tuple[str, ...] = tuple(name for _, name in self._names.values())

    @property
    def names(self) -> Mapping[str, tuple[str | None, str]]:
        """Source column → (its profile column or None, the name it is kept under)."""
        return self._names

    def _resolve(self, source: str) -> tuple[str | None, str]:
        """A column the header did not name (a later NDJSON object's key): resolved alone."""
        found = self._names.get(source)
        if found is None:
            try:
                ((_, column, wanted),) = read_header([source], {}, self._table).columns
            except ConfigError:
                column, wanted = None, source
            found = self._names[source] = (column, column or wanted)
            self._id_sources = None
        return found

    def read(self, number: int, raw: Mapping[str, Any]) -> Row | Invalid:
        """The row's key and checksum, or why it has none (cheap: nothing is converted here)."""
        if not self._names.keys() >= raw.keys():
            for source in raw:
                self._resolve(source)
        try:
            cells = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a byte that is not UTF-8 (kept as a surrogate by the reader)
            return _not_utf8(number, raw)
        key = self._key(raw)
        if isinstance(key, str):
            digest = hashlib.blake2b(self._fingerprint, digest_size=16)
            digest.update(cells)
            return Row(number, key, digest.hexdigest(), raw)
        return Invalid(number, *key)

    def _key(self, raw: Mapping[str, Any]) -> str | tuple[str, str]:
        for name, sources in self._identifier_sources():
            for source in sources:
                value = raw.get(source)
                if _blank(value):
                    continue
                text = str(value).strip()
                if name == "email":
                    return _KEY_PREFIX[name] + text.lower()
                if name == "phone_number":  # in E.164, as Klaviyo holds it (a removal looks it up)
                    try:
                        text = self._table[name].convert(text, source, self._ctx)
                    except TransformError as exc:
                        return source, _reason(exc.message, source)
                return _KEY_PREFIX[name] + text
        if self._full:
            return "email", "no identifier: a row needs an email, phone_number or external_id"
        return (
            "email",
            "an email is required (an email-only sync; --full-profile also matches on phone_number or external_id)",
        )

    def _identifier_sources(self) -> list[tuple[str, list[str]]]:
        """Each identifier the key may come from, in order, with the source columns holding it."""
        if self._id_sources is None:
            names = IDENTIFIERS if self._full else ("email",)
            self._id_sources = [
                (name, [s for s, (column, _) in self._names.items() if column == name]) for name in names
            ]
        return self._id_sources

    def profile(self, number: int, raw: Mapping[str, Any]) -> dict[str, Any] | Invalid:
        """The profile resource of row ``number`` (``{"type": "profile", "attributes", "meta"?}``), or why not."""
        attributes: dict[str, Any] = {}
        custom: dict[str, Any] = {}
        empty: list[str] = []
        plans = self._plans
        ctx = self._ctx
        for source, value in raw.items():
            plan = plans.get(source) or self._plan(source)
            if value is None or (value.__class__ is str and not value.strip()):
                if plan.kind is _CUSTOM:
                    empty.append(plan.name)
                continue
            if plan.kind is _COLUMN:
                try:
                    converted = plan.convert(value, source, ctx)
                except TransformError as exc:
                    return Invalid(number, source, _reason(exc.message, source))
                if converted is MISSING:
                    continue
                if len(plan.target) == 1:
                    attributes[plan.target[0]] = converted
                else:
                    put(attributes, plan.target, converted)
            elif plan.kind is _CUSTOM:
                custom[plan.name] = value
            elif plan.kind is _PROPERTIES:
                merged = _properties(value)
                if merged is None:
                    return Invalid(number, source, "expected an object of custom properties (JSON)")
                custom.update(merged)
        if custom:
            attributes["properties"] = {**custom, **(attributes.get("properties") or {})}
        resource: dict[str, Any] = {"type": "profile", "attributes": attributes}
        if empty and self._clear_empty:
            resource["meta"] = {"patch_properties": {"unset": empty}}
        return resource

    def _plan(self, source: str) -> _Plan:
        """What converting does with a source column, decided once per column."""
        column_name, name = self._resolve(source)
        column = self._table.get(name) if column_name is not None else None
        if column is not None and (self._full or name in IDENTIFIERS):
            plan = _Plan(_COLUMN, name, column.convert, column.target)
        elif not self._full or (column is None and column_name is not None and name != PROPERTIES):
            plan = _Plan(_SKIP, name)
        elif name == PROPERTIES:
            plan = _Plan(_PROPERTIES, name)
        else:
            plan = _Plan(_CUSTOM, name)
        self._plans[source] = plan
        return plan

    def csv_values(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """A profile as the columns of Klaviyo's CSV import (identifiers under their CSV names)."""
        attributes = resource["attributes"]
        values: dict[str, Any] = {}
        for name in self.output_columns:
            column = self._table.get(name)
            if column is not None:
                value = _at(attributes, column.target)
                values[CSV_NAMES.get(name, name)] = value
            elif name != PROPERTIES:
                values[name] = (attributes.get("properties") or {}).get(name)
        return values


def _not_utf8(number: int, raw: Mapping[str, Any]) -> Invalid:
    """The row whose cell holds a byte that is not UTF-8: the column, and which byte where."""
    for source, value in raw.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = ord(value[exc.start]) & 0xFF
                return Invalid(
                    number, source, f"not UTF-8 text: byte 0x{byte:02x} at character {exc.start + 1}"
                )
    return Invalid(number, "", "a value JSON cannot hold")


def _properties(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, dict) else None
    return None


def _at(attributes: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = attributes
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _reason(message: str, source: str) -> str:
    """A converter's text without the column name it starts with (the report has a column of its own)."""
    prefix = f"{source}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
