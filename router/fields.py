"""Compiled fields: where a value comes from in a message, how it is converted, where it goes.

A field spec of a mapping file (``{"from": [paths...], "type": ..., "default": ..., "required": ...,
"each": {...}}``) compiles into a :class:`Field`; the fields a mapping resolves together compile into
one :class:`FieldSet`, which runs as a single generated function of straight ``dict.get`` chains.
:class:`PathTable` numbers every object the paths read through, so each is looked up once per
message. The ``type`` names map to the small converters in :data:`CONVERTERS`; an unknown one is a
:class:`MappingError`.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import re
import zoneinfo
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, Final

import dateutil.parser
import orjson
import phonenumbers

from router.errors import MappingError, TransformError


class _Missing:
    """Marker for 'no value found' (``None`` is a value a message may carry)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

Path_ = tuple[str, ...]
Converter = Callable[[Any, str, "Context"], Any]


@dataclass(frozen=True, slots=True)
class Context:
    """Destination settings a converter may need."""

    default_phone_region: str | None = None
    #: Drop a phone that cannot be made E.164 instead of rejecting the message.
    drop_invalid_phone: bool = False


# ---------------------------------------------------------------- value converters (directive registry)


def _as_any(value: Any, where: str, ctx: Context) -> Any:
    return value


def _as_string(value: Any, where: str, ctx: Context) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise TransformError(f"{where}: expected text, got {_kind(value)}")


def _as_float(value: Any, where: str, ctx: Context) -> float:
    if isinstance(value, bool):
        raise TransformError(f"{where}: expected a number, got {_kind(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TransformError(f"{where}: expected a number, got {_show(value)}") from None
    if not math.isfinite(number):
        raise TransformError(f"{where}: expected a finite number, got {_show(value)}")
    return number


def _as_integer(value: Any, where: str, ctx: Context) -> int:
    number = _as_float(value, where, ctx)
    if not number.is_integer():
        raise TransformError(f"{where}: expected a whole number, got {_show(value)}")
    return int(number)


def _as_round4(value: Any, where: str, ctx: Context) -> float:
    return round(_as_float(value, where, ctx), 4)


_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})


def _as_boolean(value: Any, where: str, ctx: Context) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise TransformError(f"{where}: expected true or false, got {_show(value)}")


def _as_iso8601(value: Any, where: str, ctx: Context) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, str):
        return _iso_text(value, where)
    raise TransformError(f"{where}: expected an ISO 8601 time, got {_kind(value)}")


@functools.lru_cache(maxsize=65536)
def _iso_text(value: str, where: str) -> str:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise TransformError(f"{where}: {value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
    return value


_PHONE_NOISE: Final = re.compile(r"[^\d+]")


def _as_e164(value: Any, where: str, ctx: Context) -> Any:
    try:
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise TransformError(f"{where}: Phone number is not in E.164 format ({_kind(value)})")
        return e164(str(value), ctx.default_phone_region, where)
    except TransformError:
        if ctx.drop_invalid_phone:
            return MISSING
        raise


@functools.lru_cache(maxsize=65536)
def e164(raw: str, region: str | None, where: str = "phone") -> str:
    """Normalise a phone number to strict E.164 (``+12 345 578 900`` → ``+12345578900``).

    A national number (no ``+``) is read in ``region`` when one is given. Anything that does
    not come out as the same digits in E.164 raises :class:`TransformError`.
    """
    stripped = _PHONE_NOISE.sub("", raw)
    error = TransformError(f"{where}: Phone number is not in E.164 format ({raw!r})")
    if not stripped or "+" in stripped[1:]:
        raise error
    if not stripped.startswith("+") and region is None:
        raise TransformError(
            f"{where}: Phone number is not in E.164 format ({raw!r}); "
            "set default_phone_region to accept national numbers"
        )
    try:
        parsed = phonenumbers.parse(stripped, None if stripped.startswith("+") else region)
    except phonenumbers.NumberParseException:
        raise error from None
    formatted: str = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if stripped.startswith("+") and formatted != stripped:
        raise error
    if not _valid(parsed, international=stripped.startswith("+")):
        raise TransformError(
            f"{where}: Phone number is not in E.164 format ({raw!r}): {_invalid_why(parsed)}"
        )
    return formatted


def _invalid_why(parsed: phonenumbers.PhoneNumber) -> str:
    """Why a well-formed number is refused: which numbering plan it does not fit."""
    region = phonenumbers.region_code_for_country_code(parsed.country_code or 0)
    if region in (None, "ZZ"):
        return f"+{parsed.country_code} is not a country calling code"
    return f"not a valid number in the {region} numbering plan"


def _valid(parsed: phonenumbers.PhoneNumber, *, international: bool) -> bool:
    """Whether a parsed number is one Klaviyo can take, beyond a plausible length.

    A national number read in the destination's region must be valid there
    (``phonenumbers.is_valid_number``): ``12345`` or a US number read as British are refused.
    A number given in international form must be valid too, or at least name a country whose
    numbering plan it fits in length: ``+10000000000`` or ``+4412345`` belong to no region and
    are refused, while RudderStack's own test number ``+9112340375`` (India, short of the
    current plan) is sent as RudderStack sends it (the conformance cases expect it).
    """
    if phonenumbers.is_valid_number(parsed):
        return True
    if not international:
        return False
    region = phonenumbers.region_code_for_number(parsed)
    return region not in (None, "ZZ") and bool(phonenumbers.is_possible_number(parsed))


#: An address of the WHATWG HTML "valid e-mail address" grammar (what browsers accept in
#: ``<input type=email>``), with a dot in the domain as Klaviyo requires.
_EMAIL: Final = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


def _as_email(value: Any, where: str, ctx: Context) -> str:
    text = _as_string(value, where, ctx).strip()
    if len(text) > 100 or not _EMAIL.match(text):
        raise TransformError(f"{where}: {_show(value)} is not a valid email address")
    return text


@functools.cache
def _timezones() -> Mapping[str, str]:
    """IANA zone names by their lower-case spelling (the tz database the system or tzdata has)."""
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def _as_timezone(value: Any, where: str, ctx: Context) -> str:
    """An IANA time zone name (``America/New_York``), spelled as the database spells it."""
    name = _timezones().get(_as_string(value, where, ctx).strip().lower())
    if name is None:
        raise TransformError(f"{where}: {_show(value)} is not an IANA time zone name (e.g. Europe/Paris)")
    return name


def _as_ip(value: Any, where: str, ctx: Context) -> str:
    """An IPv4 or IPv6 address, in its canonical text."""
    try:
        return str(ipaddress.ip_address(_as_string(value, where, ctx).strip()))
    except ValueError:
        raise TransformError(f"{where}: {_show(value)} is not an IP address") from None


def _as_datetime(value: Any, where: str, ctx: Context) -> str:
    """Any common date or time (ISO 8601, ``2024-03-01 10:00``, ``03/01/2024``, ``1 Mar 2024``,
    epoch seconds or milliseconds, a date/datetime object) as ISO 8601; no zone means UTC.
    A slashed date is read month first (``03/01/2024`` is 1 March), as in the United States."""
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return _iso(datetime.combine(value, time()))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _as_iso8601(value, where, ctx)
    return _any_date_text(_as_string(value, where, ctx).strip(), where)


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat().replace("+00:00", "Z")


@functools.lru_cache(maxsize=65536)
def _any_date_text(text: str, where: str) -> str:
    """Dates repeat (days, seconds) in a column: parsed once each."""
    try:
        return _iso(datetime.fromisoformat(text))
    except ValueError:
        pass
    try:
        return _iso(dateutil.parser.parse(text))
    except (ValueError, OverflowError):
        raise TransformError(f"{where}: {text!r} is not a date or time") from None


def _as_array(value: Any, where: str, ctx: Context) -> list[Any]:
    if isinstance(value, list):
        return value
    raise TransformError(f"{where}: expected a list, got {_kind(value)}")


def _as_object(value: Any, where: str, ctx: Context) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise TransformError(f"{where}: expected an object, got {_kind(value)}")


#: Converters that leave a value out, instead of refusing the message, when the destination says so
#: (``invalid_phone = "drop"``): :meth:`FieldSet.dropped` tells what they left out and why.
DROPPING: Final = frozenset({_as_e164})

#: Every ``type`` a field may name; an unknown one is refused by the schema and here.
CONVERTERS: Final[Mapping[str, Converter]] = {
    "any": _as_any,
    "string": _as_string,
    "float": _as_float,
    "integer": _as_integer,
    "boolean": _as_boolean,
    "iso8601": _as_iso8601,
    "e164": _as_e164,
    "round4": _as_round4,
    "email": _as_email,
    "timezone": _as_timezone,
    "ip": _as_ip,
    "datetime": _as_datetime,
    "array": _as_array,
    "object": _as_object,
}


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- compiled fields


#: Stands for an absent object in holders. A plain dict, because ``dict.get`` is the cheapest
#: lookup and holders are looked up ~75 times per message; nothing writes into holders.
_EMPTY: Final[Mapping[str, Any]] = {}


def _define(lines: list[str], name: str, env: dict[str, Any]) -> Any:
    """Compile generated source ``lines`` defining ``name``; only literals made by ``repr`` go in."""
    namespace = dict(env)
    exec(compile("\n".join(lines), f"<mapping {name}>", "exec"), namespace)
    return namespace[name]


class PathTable:
    """Every object a set of paths passes through (``context``, ``context.traits``, ...), numbered.

    Compiling registers each source path's parent; :meth:`holders` then looks each parent up once
    per message, so a source lookup is one ``dict.get`` however deep its path.
    """

    def __init__(self) -> None:
        self._index: dict[Path_, int] = {(): 0}
        #: (parent index, key) for every registered prefix after the root, parents first.
        self._steps: list[tuple[int, str]] = []

    def index(self, prefix: Path_) -> int:
        """The slot of ``prefix`` (registering it and its parents)."""
        found = self._index.get(prefix)
        if found is None:
            parent = self.index(prefix[:-1])
            self._steps.append((parent, prefix[-1]))
            found = self._index[prefix] = len(self._steps)
        return found

    def source(self, path: Path_) -> tuple[int, str, str]:
        """(slot of the parent, last key, dotted path for error texts)."""
        return self.index(path[:-1]), path[-1], ".".join(path)

    def holders(self, root: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The object at every registered prefix of ``root`` (an empty mapping where absent)."""
        return self.compiled(root)

    @functools.cached_property
    def compiled(self) -> Callable[[Mapping[str, Any]], list[Mapping[str, Any]]]:
        """:meth:`holders` as one generated function (call after every path is registered)."""
        lines = ["def holders(h0):"]
        for n, (parent, key) in enumerate(self._steps, start=1):
            lines.append(f"    h{n} = h{parent}.get({key!r})")
            lines.append(f"    if h{n}.__class__ is not dict: h{n} = EMPTY")
        lines.append(f"    return [{', '.join(f'h{n}' for n in range(len(self._steps) + 1))}]")
        holders: Callable[[Mapping[str, Any]], list[Mapping[str, Any]]] = _define(
            lines, "holders", {"EMPTY": _EMPTY}
        )
        return holders


Holders = list[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Field:
    """One compiled field: ordered source lookups, a converter, default, required text."""

    #: Where the value goes, split on dots.
    target: Path_
    #: (holder slot, key, dotted path) in fallback order; empty for a literal.
    sources: tuple[tuple[int, str, str], ...]
    convert: Converter
    literal: Any
    default: Any
    required: str | None
    #: For arrays of objects: the element fields and the table their paths use.
    each: tuple[FieldSet, PathTable] | None

    def resolve(self, holders: Holders, ctx: Context) -> Any:
        """The converted value, or :data:`MISSING`; raises :class:`TransformError` if required."""
        if self.literal is not MISSING:
            return self.literal
        for slot, key, where in self.sources:
            value = holders[slot].get(key)
            if value is not None and value != "":
                return self._convert(value, where, ctx)
        if self.default is not MISSING:
            return self.default
        if self.required is not None:
            raise TransformError(self.required)
        return MISSING

    def _convert(self, value: Any, where: str, ctx: Context) -> Any:
        value = self.convert(value, where, ctx)
        if self.each is None or value is MISSING:
            return value
        fields, table = self.each
        holders = table.compiled
        mapped: list[dict[str, Any]] = []
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if not isinstance(item, dict):
                raise TransformError(f"{where}[{i}]: expected an object, got {_kind(item)}")
            try:
                element = fields.run(holders(item), ctx)
            except TransformError as exc:  # the element's place is spelled out only when it is wrong
                raise TransformError(f"{where}[{i}].{exc.message}") from None
            if element:
                mapped.append(element)
        return mapped


def _holds(out: Mapping[str, Any], path: Path_) -> bool:
    """Whether ``out`` has a value at the nested ``path``."""
    for key in path:
        if not isinstance(out, Mapping) or key not in out:
            return False
        out = out[key]
    return True


def put(target: dict[str, Any], path: Path_, value: Any) -> None:
    """Set ``value`` at a nested ``path`` of ``target``, creating objects on the way."""
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


class FieldSet:
    """Fields resolved together into one dict, compiled into a single generated function.

    The function is what :meth:`Field.resolve` would do for each field in turn, unrolled:
    a chain of ``dict.get`` per source path, the converter, then the assignment.
    """

    def __init__(self, fields: Iterable[Field]) -> None:
        self.fields = tuple(fields)
        #: The generated function itself (callers on hot paths skip ``__call__``).
        self.run: Callable[[Holders, Context], dict[str, Any]] = self._generate()

    def __call__(self, holders: Holders, ctx: Context) -> dict[str, Any]:
        return self.run(holders, ctx)

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def dropped(self, holders: Holders, ctx: Context, out: Mapping[str, Any]) -> list[str]:
        """Why each value a :data:`DROPPING` converter left out of ``out`` (a result of :meth:`run`)
        was left out: the error it would have raised. Called only when ``ctx`` lets them drop, so
        the run itself stays one generated function."""
        strict = dataclasses.replace(ctx, drop_invalid_phone=False)
        reasons: list[str] = []
        for field in self.fields:
            if field.convert in DROPPING and not _holds(out, field.target):
                try:
                    field.resolve(holders, strict)
                except TransformError as exc:
                    reasons.append(exc.message)
        return reasons

    def _generate(self) -> Callable[[Holders, Context], dict[str, Any]]:
        env: dict[str, Any] = {"MISSING": MISSING, "TransformError": TransformError}
        slots = sorted({slot for field in self.fields for slot, _, _ in field.sources})
        targets = {field.target for field in self.fields}
        lines = ["def run(h, ctx):", "    out = {}"]
        lines += [f"    g{slot} = h[{slot}].get" for slot in slots]
        for n, field in enumerate(self.fields):
            env[f"f{n}"] = field
            env[f"c{n}"] = field.convert
            nested = any(field.target[:i] in targets for i in range(1, len(field.target)))
            lines.extend(_field_lines(n, field, nested))
        lines.append("    return out")
        run: Callable[[Holders, Context], dict[str, Any]] = _define(lines, "run", env)
        return run


def _field_lines(n: int, field: Field, nested: bool = False) -> list[str]:
    """Source lookups nested so the branch that finds a value knows its path as a literal.

    ``nested``: another field of the set writes the object this one goes into (see :func:`_store_lines`).
    """
    if field.literal is not MISSING:
        return [f"    x = f{n}.literal", *_store_lines(field.target, "    ", nested)]
    if not field.sources:
        return []
    lines: list[str] = []
    indent = "    "
    for slot, key, where in field.sources:
        lines.append(f"{indent}v = g{slot}({key!r})")
        lines.append(f"{indent}if v is not None and v != '':")
        lines.extend(_convert_lines(n, field, where, indent + "    ", nested))
        lines.append(f"{indent}else:")
        indent += "    "
    if field.default is not MISSING:
        lines += [f"{indent}x = f{n}.default", *_store_lines(field.target, indent, nested)]
    elif field.required is not None:
        lines.append(f"{indent}raise TransformError(f{n}.required)")
    else:
        lines.append(f"{indent}pass")
    return lines


def _convert_lines(n: int, field: Field, where: str, indent: str, nested: bool = False) -> list[str]:
    if field.each is not None:
        convert = f"f{n}._convert(v, {where!r}, ctx)"
    elif field.convert is _as_any:
        convert = "v"
    elif field.convert is _as_string:
        convert = f"v if v.__class__ is str else c{n}(v, {where!r}, ctx)"
    else:
        convert = f"c{n}(v, {where!r}, ctx)"
    store = _store_lines(field.target, indent + "    ", nested)
    if field.convert in (_as_any, _as_string) and field.each is None:
        return [f"{indent}x = {convert}", *_store_lines(field.target, indent, nested)]
    return [f"{indent}x = {convert}", f"{indent}if x is not MISSING:", *store]


def _store_lines(target: Path_, indent: str, nested: bool = False) -> list[str]:
    """``out[a][b]... = x``, creating the nested objects on the way.

    With ``nested`` another field stores a value at a prefix of ``target``: that value may be an
    object of the message (copied, never written into) or not an object at all (replaced).
    """
    if len(target) == 1:
        return [f"{indent}out[{target[0]!r}] = x"]
    lines = [f"{indent}o = out"]
    for key in target[:-1]:
        if nested:
            lines.append(f"{indent}p = o.get({key!r})")
            lines.append(f"{indent}p = o[{key!r}] = dict(p) if p.__class__ is dict else {{}}")
            lines.append(f"{indent}o = p")
        else:
            lines.append(f"{indent}o = o.get({key!r}) or o.setdefault({key!r}, {{}})")
    lines.append(f"{indent}o[{target[-1]!r}] = x")
    return lines


@dataclass(frozen=True, slots=True)
class Rest:
    """Pass-through of the keys of one or more objects, later objects winning."""

    #: Holder slots of the objects copied.
    slots: tuple[int, ...]
    #: Keys never copied: the file's ``exclude`` plus keys that a field of the same mapping reads.
    exclude: frozenset[str]

    def collect(self, holders: Holders) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for slot in self.slots:
            out.update(holders[slot])
        for key in self.exclude.intersection(out):  # set operations run in C: cheaper than a filter
            del out[key]
        return out


# ---------------------------------------------------------------- compiling


def _paths(spec: str | list[str]) -> tuple[Path_, ...]:
    items = [spec] if isinstance(spec, str) else spec
    return tuple(tuple(item.split(".")) for item in items)


def compile_field(target: str, spec: Any, where: str, table: PathTable) -> Field:
    """Compile one field spec (a path string or an object) for ``target``, registering its paths."""
    if isinstance(spec, str):
        spec = {"from": spec}
    sources = _paths(spec["from"]) if "from" in spec else ()
    required = spec.get("required", False)
    if required is True:
        required = f"missing required value {target!r} (looked in {', '.join('.'.join(p) for p in sources)})"
    each = spec.get("each")
    type_name = spec.get("type", "array" if each is not None else "any")
    if type_name not in CONVERTERS:
        raise MappingError(f"{where}: unknown type {type_name!r}")
    compiled_each = None
    if each:
        item_table = PathTable()
        compiled_each = (field_map(each, f"{where}/each", item_table), item_table)
    return Field(
        target=tuple(target.split(".")),
        sources=tuple(table.source(p) for p in sources),
        convert=CONVERTERS[type_name],
        literal=spec.get("value", MISSING),
        default=spec.get("default", MISSING),
        required=required or None,
        each=compiled_each,
    )


def field_map(specs: Mapping[str, Any], where: str, table: PathTable) -> FieldSet:
    return FieldSet(compile_field(target, spec, f"{where}/{target}", table) for target, spec in specs.items())


def compile_rest(spec: Mapping[str, Any] | None, fields: Iterable[Field], table: PathTable) -> Rest | None:
    if spec is None:
        return None
    slots = tuple(table.index(p) for p in _paths(spec["from"]))
    used = {key for field in fields for slot, key, _ in field.sources if slot in slots}
    return Rest(slots, frozenset(spec.get("exclude", ())) | used)
