"""Which column of a query is which profile attribute: derived from the profile mapping.

The profile mapping (``mappings/klaviyo/profile.json``) reads Klaviyo's own attribute names from a
message's traits (``traits.phone_number``, ``traits.address1``, ``traits.timezone`` ...). A query's
columns are the same names (seed 000's customer profile parameters), so the sync's column table
is every profile field that reads ``traits.<its own name>``, with that field's target and
converter: one field table for the event transform and the sync, and a user's mapping folder
changes both. Klaviyo's CSV names (``Email``, ``PhoneNumber``, ``ExternalID``) and any case are
accepted too; ``properties`` holds custom properties as an object; every other column is a custom
property of its own name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from router.errors import ConfigError
from router.fields import CONVERTERS, Converter, Path_
from router.mapping import Mappings

#: The identifiers, in the order a full-profile sync keys its rows by.
IDENTIFIERS: Final = ("email", "phone_number", "external_id")
#: Klaviyo's CSV import header names of the identifiers (seed 000: "they must have those exact names").
CSV_NAMES: Final = {"email": "Email", "phone_number": "PhoneNumber", "external_id": "ExternalID"}
#: The column holding custom properties as an object (or its JSON text).
PROPERTIES: Final = "properties"


@dataclass(frozen=True, slots=True)
class Column:
    """A profile attribute a column can hold."""

    #: Klaviyo's name for it, e.g. ``city``.
    name: str
    #: Where it goes in the profile's attributes, e.g. ``("location", "city")``.
    target: Path_
    convert: Converter


def column_table(mappings: Mappings) -> dict[str, Column]:
    """Profile column name → :class:`Column`, from the profile mapping's fields."""
    table: dict[str, Column] = {}
    for field in mappings.profile.fields:
        name = field.target[-1]
        if any(where == f"traits.{name}" for _, _, where in field.sources):
            table[name] = Column(name, field.target, field.convert)
    missing = [name for name in IDENTIFIERS if name not in table]
    if missing:
        raise ConfigError(
            f"{mappings.profile.file}: the profile mapping reads no traits.{missing[0]}, which the audience sync needs"
        )
    # a sync keys its rows by their email: it must be an address, not only text
    table["email"] = replace(table["email"], convert=CONVERTERS["email"])
    return table


@dataclass(frozen=True, slots=True)
class Header:
    """How each source column is read: ``(source name, profile column or None)``.

    ``None`` marks a custom property (kept under the source name, or the rename's target).
    """

    columns: tuple[tuple[str, str | None, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The profile columns present, in source order."""
        return tuple(column for _, column, _ in self.columns if column is not None)


def read_header(names: Sequence[str], renames: Mapping[str, str], table: Mapping[str, Column]) -> Header:
    """Resolve a source's column names: renames first, then profile names in any case, then custom.

    Two source columns meaning the same profile column is an error naming both.
    """
    by_lower = {name.lower(): name for name in table}
    by_lower.update({csv.lower(): name for name, csv in CSV_NAMES.items()})
    by_lower[PROPERTIES] = PROPERTIES
    lowered_renames = {source.lower(): target for source, target in renames.items()}
    seen: dict[str, str] = {}
    columns: list[tuple[str, str | None, str]] = []
    for name in names:
        wanted = lowered_renames.get(name.lower(), name)
        column = by_lower.get(wanted.lower())
        if column is not None:
            if column in seen:
                raise ConfigError(f"columns {seen[column]!r} and {name!r} are both {column}; rename one")
            seen[column] = name
        columns.append((name, column, wanted))
    unknown = set(lowered_renames) - {name.lower() for name in names}
    if unknown:
        raise ConfigError(f"column rename of {sorted(unknown)[0]!r}: the source has no such column")
    return Header(tuple(columns))
