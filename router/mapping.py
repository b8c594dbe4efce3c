"""Mapping files: load, check against ``mappings/schema.json``, compile into fast callables.

A mapping file is data (see ``mappings/schema.json``): it names where each Klaviyo field comes from
in a RudderStack/Segment message (ordered fallback paths), how the value is converted, and which
remaining properties pass through. :func:`load_mappings` reads the built-in files, lets a user folder
extend or override them (same file name replaces, new names add), validates everything, and compiles
it once into a :class:`Mappings` whose fields are plain callables. Any problem raises
:class:`MappingError` naming the file, the JSON pointer and what is wrong.

Delivery does not read the folders again by itself: :class:`MappingSets` holds the sets in use,
checked when ``serve`` or ``work`` starts, and replaces them only when told (SIGHUP, or
``POST /admin/mappings/reload``) and only with sets that pass every check. An operator edits
files, reloads, and learns at once whether the new set was taken; a half-saved file never reaches
a running worker.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jsonschema
import orjson
import structlog

from router.errors import MappingError
from router.fields import Field, FieldSet, Holders, PathTable, Rest, compile_field, compile_rest, field_map

#: The built-in mappings and the schema, shipped inside the package.
BUILTIN_DIR: Final = Path(__file__).resolve().parent / "builtin_mappings"
SCHEMA_PATH: Final = BUILTIN_DIR / "schema.json"
KLAVIYO_DIR: Final = BUILTIN_DIR / "klaviyo"
#: What a mapping folder held when read: ``(file name, path, content)`` of each file that counts,
#: the built-in ones included (plain data: planning processes compile it themselves).
MappingFiles = tuple[tuple[str, str, bytes], ...]

log = structlog.get_logger("router.mapping")


# ---------------------------------------------------------------- compiled mappings


@dataclass(frozen=True, slots=True)
class ProfileMapping:
    file: str
    #: Every field with every source: what calls without a ``call_sources`` rule read.
    fields: FieldSet
    properties: Rest | None
    #: Call type → the fields as that call may read them (``call_sources`` of the file).
    by_call: Mapping[str, FieldSet] = dataclasses.field(default_factory=dict)

    def fields_for(self, msg_type: str) -> FieldSet:
        """The profile fields of a ``msg_type`` call: a page's or a product's properties are not
        the person's, so on some calls some sources are not read for some fields."""
        return self.by_call.get(msg_type, self.fields)


@dataclass(frozen=True, slots=True)
class EventMapping:
    file: str
    types: frozenset[str]
    #: Normalised event names matched, or empty for the type's fallback mapping.
    events: frozenset[str]
    metric: Field
    #: value, value_currency, time, unique_id — those present in the file.
    attributes: FieldSet
    properties: FieldSet
    rest: Rest | None
    rest_when: str | None


@dataclass(frozen=True, slots=True)
class SubscriptionMapping:
    file: str
    types: frozenset[str]
    #: ``list_id``, ``subscribe`` and, when the file names them, ``consent`` and ``sms_consent``.
    fields: FieldSet
    use_default_list: bool
    #: What a message with a list id but no subscribe flag does: ``nothing`` or ``add`` (to the list,
    #: consent unchanged).
    when_subscribe_absent: str = "nothing"


@dataclass(frozen=True, slots=True)
class Mappings:
    """Every compiled mapping, indexed for the transform."""

    profile: ProfileMapping
    #: (type, normalised event name) → mapping for named events.
    named_events: Mapping[tuple[str, str], EventMapping]
    #: type → fallback event mapping.
    fallback_events: Mapping[str, EventMapping]
    #: type → subscription mapping.
    subscriptions: Mapping[str, SubscriptionMapping]
    #: file name → source path, for ``check-mappings`` output.
    files: Mapping[str, Path]
    #: The prefixes every message path goes through.
    table: PathTable

    def holders(self, message: Mapping[str, Any]) -> Holders:
        """Look up, once, every object the mapping paths read from in ``message``."""
        return self.table.holders(message)

    def event_for(self, msg_type: str, name: str | None) -> EventMapping | None:
        """The mapping for an event: a named one first, else the type's fallback."""
        if name is not None:
            found = self.named_events.get((msg_type, normalise_event_name(name)))
            if found is not None:
                return found
        return self.fallback_events.get(msg_type)


@functools.lru_cache(maxsize=4096)
def normalise_event_name(name: str) -> str:
    """Event names match ignoring case and extra spaces: ``' Product  Added'`` → ``'product added'``.

    Cached: a source sends the same few names over and over."""
    return " ".join(name.split()).lower()


# ---------------------------------------------------------------- loading and validation


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = orjson.loads(SCHEMA_PATH.read_bytes())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def _pointer(parts: Iterable[Any]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def validate_document(document: Any, file: str) -> None:
    """Check one parsed mapping file against the schema; raise :class:`MappingError` on the first problem."""
    errors = list(_validator().iter_errors(document))
    if not errors:
        return
    best = jsonschema.exceptions.best_match(errors)
    raise MappingError(f"{file}: at {_pointer(best.absolute_path)}: {best.message}")


def read_document(path: Path) -> Any:
    """Parse one mapping file, reporting JSON syntax errors with their position."""
    return _parse(_read(path), str(path))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MappingError(f"{path}: cannot read: {exc.strerror}") from None


def _parse(content: bytes, where: str) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise MappingError(f"{where}: not valid JSON: {exc}") from None


def mapping_files(user_dir: Path | None = None) -> dict[str, Path]:
    """Built-in files, then the user's: a user file with the same name replaces the built-in one."""
    files = {p.name: p for p in sorted(KLAVIYO_DIR.glob("*.json"))}
    if user_dir is not None:
        if not user_dir.is_dir():
            raise MappingError(f"{user_dir}: mappings_dir is not a folder")
        files.update({p.name: p for p in sorted(user_dir.glob("*.json"))})
    return files


def load_mappings(user_dir: Path | None = None) -> Mappings:
    """Load, validate and compile the built-in mappings extended by ``user_dir``.

    Compiled sets are cached by the files' names, sizes and modification times, so calling this
    again is cheap and picks up edited files (a worker always transforms with the current ones).
    """
    files = mapping_files(user_dir.resolve() if user_dir is not None else None)
    return _load_cached(tuple((name, path, _stamp(path)) for name, path in files.items()))


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as exc:
        raise MappingError(f"{path}: cannot read: {exc.strerror}") from None
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=16)
def _load_cached(signature: tuple[tuple[str, Path, tuple[int, int]], ...]) -> Mappings:
    return compile_mappings(tuple((name, str(path), _read(path)) for name, path, _ in signature))


def read_mapping_files(user_dir: Path | None = None) -> MappingFiles:
    """The built-in files and those of ``user_dir`` (see :func:`mapping_files`), read once."""
    files = mapping_files(user_dir.resolve() if user_dir is not None else None)
    return tuple((name, str(path), _read(path)) for name, path in files.items())


@functools.lru_cache(maxsize=16)
def compile_mappings(files: MappingFiles) -> Mappings:
    """Check and compile files as read (:func:`read_mapping_files`); cached by their content."""
    documents: dict[str, Any] = {}
    for name, path, content in files:
        document = _parse(content, path)
        validate_document(document, path)
        documents[name] = document
    return _index(documents, {name: Path(path) for name, path, _ in files})


class MappingSets:
    """The mapping sets delivery uses, one per mappings folder (``None``: the built-in files only).

    Every folder is read and checked when the object is made, which raises :class:`MappingError`
    for the first problem: ``serve`` and ``work`` stop there, before anything starts. Afterwards
    the sets change only through :meth:`reload`, which replaces all of them or, when any fails its
    checks, none (the running sets stay, and the error is logged and returned).
    """

    def __init__(self, folders: Iterable[Path | None]) -> None:
        self._folders = list(dict.fromkeys(folders))
        self._files, self._sets = self._read()
        #: Counts the sets taken; planning processes compile a new generation when it changes.
        self.generation = 1
        #: Why the last reload was refused (None when it was taken, or before any).
        self.reload_error: str | None = None

    def _read(self) -> tuple[dict[Path | None, MappingFiles], dict[Path | None, Mappings]]:
        files = {folder: read_mapping_files(folder) for folder in self._folders}
        return files, {folder: compile_mappings(read) for folder, read in files.items()}

    def get(self, folder: Path | None) -> Mappings:
        """The compiled set of ``folder`` (one this object was made with)."""
        return self._sets[folder]

    def files(self) -> dict[Path | None, MappingFiles]:
        """Every set as its files were read (plain data, for planning processes)."""
        return dict(self._files)

    def reload(self) -> str | None:
        """Read and check every folder again; take the new sets if they all pass. Returns None
        when they were taken, else why not (the running sets stay)."""
        try:
            files, sets = self._read()
        except MappingError as exc:
            self.reload_error = exc.message
            log.error("mappings_reload_refused", error=exc.message, generation=self.generation)
            return exc.message
        self.reload_error = None
        if files != self._files:
            self._files, self._sets = files, sets
            self.generation += 1
        log.info("mappings_reloaded", generation=self.generation, folders=len(self._folders))
        return None


def _index(documents: Mapping[str, Any], files: Mapping[str, Path]) -> Mappings:
    profiles: list[ProfileMapping] = []
    named: dict[tuple[str, str], EventMapping] = {}
    fallback: dict[str, EventMapping] = {}
    subscriptions: dict[str, SubscriptionMapping] = {}
    table = PathTable()
    for name, document in documents.items():
        where = str(files[name])
        kind = document["kind"]
        if kind == "profile":
            profiles.append(_compile_profile(document, where, table))
        elif kind == "event":
            _add_event(_compile_event(document, where, table), named, fallback)
        else:
            mapping = _compile_subscription(document, where, table)
            for msg_type in sorted(mapping.types):
                _claim(subscriptions, msg_type, mapping, f"subscription for {msg_type} calls")
    if len(profiles) != 1:
        found = ", ".join(p.file for p in profiles) or "none"
        raise MappingError(f"exactly one mapping of kind 'profile' is needed, found {found}")
    return Mappings(profiles[0], named, fallback, subscriptions, dict(files), table)


def _add_event(
    mapping: EventMapping,
    named: dict[tuple[str, str], EventMapping],
    fallback: dict[str, EventMapping],
) -> None:
    for msg_type in sorted(mapping.types):
        if not mapping.events:
            _claim(fallback, msg_type, mapping, f"every {msg_type} call")
        for event in sorted(mapping.events):
            _claim(named, (msg_type, event), mapping, f"{msg_type} {event!r}")


def _claim(index: dict[Any, Any], key: Any, mapping: Any, what: str) -> None:
    if key in index:
        raise MappingError(
            f"{mapping.file}: /match: {what} is already mapped by {index[key].file}; "
            "give your file the same name to replace it, or match other events"
        )
    index[key] = mapping


# ---------------------------------------------------------------- compiling


def _compile_profile(document: Mapping[str, Any], where: str, table: PathTable) -> ProfileMapping:
    fields = field_map(document["fields"], f"{where}: /fields", table)
    by_call: dict[str, FieldSet] = {}
    for n, rule in enumerate(document.get("call_sources", ())):
        only = set(rule["only"])
        unknown = sorted(only.difference(".".join(f.target) for f in fields))
        if unknown:
            raise MappingError(
                f"{where}: at /call_sources/{n}/only: {unknown[0]!r} is not a field of /fields"
            )
        for call in rule["calls"]:
            if call in by_call:
                raise MappingError(f"{where}: at /call_sources/{n}/calls: {call!r} has a rule already")
            under = (rule["under"],) if isinstance(rule["under"], str) else tuple(rule["under"])
            by_call[call] = FieldSet(
                f if ".".join(f.target) in only else _not_under(f, under) for f in fields
            )
    return ProfileMapping(where, fields, compile_rest(document.get("properties"), (), table), by_call)


def _not_under(field: Field, prefixes: tuple[str, ...]) -> Field:
    """``field`` without its sources at or under any of the dotted paths ``prefixes``."""
    sources = tuple(
        source
        for source in field.sources
        if not any(source[2] == p or source[2].startswith(p + ".") for p in prefixes)
    )
    return dataclasses.replace(field, sources=sources)


_EVENT_ATTRIBUTES: Final = ("value", "value_currency", "time", "unique_id")


def _compile_event(document: Mapping[str, Any], where: str, table: PathTable) -> EventMapping:
    match = document["match"]
    properties = document.get("properties", {})
    fields = field_map(properties.get("fields", {}), f"{where}: /properties/fields", table)
    attributes = FieldSet(
        compile_field(name, document[name], f"{where}: /{name}", table)
        for name in _EVENT_ATTRIBUTES
        if name in document
    )
    return EventMapping(
        file=where,
        types=frozenset(match["type"]),
        events=frozenset(normalise_event_name(e) for e in match.get("event", ())),
        metric=compile_field("name", document["metric"], f"{where}: /metric", table),
        attributes=attributes,
        properties=fields,
        rest=compile_rest(properties.get("rest"), (*fields, *attributes), table),
        rest_when=properties.get("rest_when"),
    )


def _compile_subscription(document: Mapping[str, Any], where: str, table: PathTable) -> SubscriptionMapping:
    names = [n for n in ("list_id", "subscribe", "consent", "sms_consent") if n in document]
    return SubscriptionMapping(
        file=where,
        types=frozenset(document["match"]["type"]),
        fields=FieldSet(compile_field(n, document[n], f"{where}: /{n}", table) for n in names),
        use_default_list=bool(document.get("use_default_list", False)),
        when_subscribe_absent=document.get("when_subscribe_absent", "nothing"),
    )
