"""Named SQL queries, one ``<dialect>.sql`` file per backend.

A file is a list of sections, each opened by a ``-- name: <query_name>`` line and a one-line
``-- description`` comment, followed by the SQL. Sections named ``migrate_<n>`` are schema
migrations, applied in order of ``n``.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_HEADER = re.compile(r"^-- name: (?P<name>\w+)\n--(?P<description>[^\n]*)\n", re.MULTILINE)
_MIGRATION = re.compile(r"migrate_(\d+)")


@functools.cache
def load(dialect: str) -> dict[str, str]:
    """The queries of ``router/queue/sql/<dialect>.sql`` by name."""
    text = resources.files(__name__).joinpath(f"{dialect}.sql").read_text(encoding="utf-8")
    return parse(text)


def parse(text: str) -> dict[str, str]:
    """Split a SQL file into its named sections (without the header lines)."""
    headers = list(_HEADER.finditer(text))
    preamble = text[: headers[0].start()] if headers else text
    if not headers or any(line and not line.startswith("--") for line in preamble.splitlines()):
        raise ValueError("a SQL file holds only comments before its first '-- name: <query_name>' header")
    queries: dict[str, str] = {}
    for header, following in zip(headers, [*headers[1:], None], strict=True):
        name = header["name"]
        if name in queries:
            raise ValueError(f"SQL section {name!r} is defined twice")
        if not header["description"].strip():
            raise ValueError(f"SQL section {name!r} lacks its one-line description")
        end = following.start() if following else len(text)
        queries[name] = text[header.end() : end].strip()
    return queries


def migrations(queries: dict[str, str]) -> list[tuple[int, str]]:
    """The ``migrate_<n>`` sections as ``(n, sql)``, by ``n``."""
    found = [(int(m[1]), sql) for name, sql in queries.items() if (m := _MIGRATION.fullmatch(name))]
    return sorted(found)
