"""What a store accepts, checked at the door the same way on every backend, so that what
is accepted comes back unchanged (see docs/storable.md).

The checks ride on the JSON msgspec writes anyway, so a value that is fine costs a few
byte scans: msgspec writes a non-finite float as ``null``, so JSON without ``null`` holds
none; nesting cannot be deeper than the number of ``[`` and ``{``; a NUL is always
written ``\\u0000``. Only when a scan finds something is the value walked, to confirm it
and name the field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
from collections.abc import Mapping
from typing import Any

import msgspec
import msgspec.inspect as mi

from .errors import Unstorable

__all__ = [
    "MAX_DEPTH",
    "MAX_ID_LENGTH",
    "check_id",
    "check_metadata",
    "error_text",
    "keepable_id",
    "kept_text",
    "event_json",
    "metadata_json",
    "problem_in",
]

MAX_DEPTH = (
    64  # containers (structs, lists, dicts...) inside one another, the value itself included
)
MAX_ID_LENGTH = 255
#: an idempotency key's longest, in UTF-8 bytes: Postgres indexes the key, and an index
#: entry holds at most 2,704 bytes
MAX_KEY_BYTES = 2000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_encoder = msgspec.json.Encoder()
_SHOWN = 80  # characters of a refused value quoted back


def shown(value: Any) -> str:
    """A value for an error message, cut to about 80 characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."


def _short(path: str) -> str:
    return path if len(path) <= _SHOWN else f"{path[: _SHOWN - 3]}..."


def _str_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character, which Postgres cannot store"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "contains a lone surrogate, which is not UTF-8"
    return None


def problem_in(value: Any, path: str = "", depth: int = 1) -> tuple[str, str] | None:
    """The first thing in ``value`` no store can keep and give back unchanged, as (path,
    rule), or None: a non-finite float, a NUL or lone surrogate in a str, or nesting
    deeper than MAX_DEPTH."""
    if isinstance(value, enum.Enum) and not isinstance(value, str | int):
        value = value.value  # written as its value
    if isinstance(value, str):
        rule = _str_problem(value)
        return None if rule is None else (path, f"{shown(value)} {rule}")
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"{value!r} is not a finite number")
    if isinstance(value, int | bool | None | dt.date | dt.time | dt.timedelta):
        return None
    items: Any = ()
    if isinstance(value, msgspec.Struct):
        items = ((f"{path}.{k}" if path else k, getattr(value, k)) for k in value.__struct_fields__)
    elif (names := _object_fields(value)) is not None:  # a dataclass or attrs instance
        items = ((f"{path}.{k}" if path else k, getattr(value, k)) for k in names)
    elif isinstance(value, Mapping):
        for key in value:
            if isinstance(key, str) and (rule := _str_problem(key)) is not None:
                return (path, f"the key {shown(key)} {rule}")
        items = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    if depth > MAX_DEPTH:
        return (_short(path), f"nests deeper than {MAX_DEPTH} levels")
    for where, item in items:
        if (found := problem_in(item, where, depth + 1)) is not None:
            return found
    return None


def _object_fields(value: Any) -> list[str] | None:
    """The field names msgspec writes of a dataclass or attrs instance, else None."""
    if isinstance(value, type):
        return None
    if dataclasses.is_dataclass(value):
        return [field.name for field in dataclasses.fields(value)]
    attributes = getattr(type(value), "__attrs_attrs__", None)
    return None if attributes is None else [attribute.name for attribute in attributes]


def suspicious(data: bytes, plan: tuple[bool, bool, bool] = (True, True, True)) -> bool:
    """Whether JSON msgspec wrote may hide something :func:`problem_in` refuses (a NUL,
    a non-finite float written as null, nesting past MAX_DEPTH); False proves not. The
    plan says which of the three the value's type can hold at all."""
    strings, floats, deep = plan
    return (
        (strings and b"\\u0000" in data)
        or (floats and b"null" in data)
        or (deep and data.count(b"[") + data.count(b"{") > MAX_DEPTH)
    )


_plans: dict[type[Any], tuple[bool, bool, bool]] = {}
_ALL = (True, True, True)
_NOTHING = (False, False, False)
_SCALARS = (
    mi.IntType, mi.BoolType, mi.NoneType, mi.BytesType, mi.ByteArrayType, mi.MemoryViewType,
    mi.DateTimeType, mi.DateType, mi.TimeType, mi.TimeDeltaType, mi.UUIDType,
    mi.DecimalType, mi.LiteralType,
)  # fmt: skip


def plan_of(value_type: type[Any]) -> tuple[bool, bool, bool]:
    """Whether values of this type can hold (a str, a float, nesting past MAX_DEPTH),
    from its declared fields, cached per type: a type of ints and dates needs no scan."""
    plan = _plans.get(value_type)
    if plan is None:
        try:
            plan = _plan(mi.type_info(value_type), 1, set())
        except (TypeError, ValueError):  # msgspec cannot inspect it: check everything
            plan = _ALL
        _plans[value_type] = plan
    return plan


def _plan(info: mi.Type, depth: int, seen: set[type[Any]]) -> tuple[bool, bool, bool]:
    if isinstance(info, mi.Metadata):
        return _plan(info.type, depth, seen)
    if isinstance(info, _SCALARS):
        return _NOTHING
    if isinstance(info, mi.StrType):
        return (True, False, False)
    if isinstance(info, mi.FloatType):
        return (False, True, False)
    if isinstance(info, mi.EnumType):  # written as its values, which may be anything flat
        return (True, True, False)
    if depth > MAX_DEPTH:
        return _ALL
    parts: list[mi.Type] = []
    if isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
        if info.cls in seen:
            return _ALL  # recursive: any depth
        seen = seen | {info.cls}
        parts = [field.type for field in info.fields]
    elif isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        parts = [info.item_type]
    elif isinstance(info, mi.TupleType):
        parts = list(info.item_types)
    elif isinstance(info, mi.DictType):
        parts = [info.key_type, info.value_type]
    elif isinstance(info, mi.UnionType):
        parts = list(info.types)
        depth -= 1  # a union is not a level of nesting
    else:
        return _ALL  # Any, custom types: anything
    found = [_plan(part, depth + 1, seen) for part in parts]
    return (any(p[0] for p in found), any(p[1] for p in found), any(p[2] for p in found))


def checked_json(value: Any, what: str) -> bytes:
    """``value`` as JSON bytes, refusing with Unstorable what would not come back unchanged
    (``what`` and the value's type name the value in the error)."""
    try:
        data = _encoder.encode(value)
    except (UnicodeEncodeError, RecursionError):
        data = None  # a lone surrogate or nesting too deep: the walk below names where
    except (TypeError, msgspec.EncodeError) as error:
        raise Unstorable(f"{what} {type(value).__name__}", None, f"is not JSON: {error}") from None
    if (data is None or suspicious(data, plan_of(type(value)))) and (
        found := problem_in(value)
    ) is not None:
        raise Unstorable(f"{what} {type(value).__name__}", found[0] or None, found[1])
    if data is None:  # the encoder failed on something the walk does not look at
        raise Unstorable(f"{what} {type(value).__name__}", None, "could not be encoded as JSON")
    return data


def event_json(event: msgspec.Struct) -> str:
    """An event's JSON text for the event table, refusing what would not come back."""
    return checked_json(event, "event").decode()


_PLAIN = (str, int, float, bool, type(None))
_FLAT = frozenset({str, int, bool, type(None)})  # encoded as they are (not float: NaN)


def _metadata_problem(value: Any, path: str, depth: int) -> tuple[str, str] | None:
    kind = type(value)
    if kind in _PLAIN:
        return problem_in(value, path, depth)
    if depth > MAX_DEPTH:
        return (_short(path), f"nests deeper than {MAX_DEPTH} levels")
    if kind is list:
        for i, item in enumerate(value):
            if (found := _metadata_problem(item, f"{path}[{i}]", depth + 1)) is not None:
                return found
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return (path, f"the key {shown(key)} is not a str")
            if (rule := _str_problem(key)) is not None:
                return (path, f"the key {shown(key)} {rule}")
            if (found := _metadata_problem(item, f"{path}[{key!r}]", depth + 1)) is not None:
                return found
        return None
    return (
        path,
        f"{shown(value)} is a {kind.__name__}: metadata holds plain JSON only "
        "(str, int, float, bool, None, list, dict with str keys)",
    )


def check_metadata(metadata: object) -> None:
    """Unstorable unless ``metadata`` is None or a mapping (a list of pairs would come
    back as a dict it never was)."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise Unstorable("metadata", None, f"must be a mapping or None, got {shown(metadata)}")


def metadata_json(metadata: Mapping[str, Any] | None) -> str:
    """The metadata as JSON text, refusing (Unstorable) anything but plain JSON values
    that come back as they are: every store checks it the same way."""
    check_metadata(metadata)
    if not metadata:
        return "{}"
    plain = dict(metadata)
    # the usual case, flat str keys to str, None, int or bool values (a correlation id,
    # no causation id yet), skips the walk when the scan finds no NUL
    flat = all(type(k) is str and type(v) in _FLAT for k, v in plain.items())
    data = None
    if flat:
        try:
            data = _encoder.encode(plain)
        except UnicodeEncodeError:
            data = None
    if data is None or b"\\u0000" in data:
        if (found := _metadata_problem(plain, "", 1)) is not None:
            raise Unstorable("metadata", found[0] or None, found[1])
        data = _encoder.encode(plain)
    return data.decode()


def keepable_id(value: str) -> bool:
    """Whether :func:`check_id` accepts ``value``. A store reads an id it refuses as an
    empty stream (no stream can have it) instead of passing it to a driver that chokes."""
    return 0 < len(value) <= MAX_ID_LENGTH and _str_problem(value) is None


def check_id(value: object, what: str = "aggregate_id") -> str:
    """An id every store keeps as it is: a non-empty str of at most MAX_ID_LENGTH
    characters, without NUL or lone surrogates."""
    if not isinstance(value, str) or not value:
        raise Unstorable(what, None, f"must be a non-empty str, got {shown(value)}")
    if len(value) > MAX_ID_LENGTH:
        raise Unstorable(
            what, None, f"{shown(value)} is {len(value)} characters, more than {MAX_ID_LENGTH}"
        )
    if (rule := _str_problem(value)) is not None:
        raise Unstorable(what, None, f"{shown(value)} {rule}")
    return value


def error_text(error: BaseException) -> str:
    r"""What a store keeps of an error (a parked event's, owed work's): its type and
    message, with what no store keeps written as escapes (a NUL as ``\x00``, a lone
    surrogate as ``\udcff``), so that recording a failure cannot fail too.

    >>> print(error_text(ValueError("bad\x00byte")))
    ValueError: bad\x00byte
    """
    try:
        message = str(error)
    except Exception:  # a broken __str__ must not hide the failure it describes
        message = f"<{type(error).__name__} whose message cannot be read>"
    return kept_text(f"{type(error).__name__}: {message}")


def kept_text(text: str) -> str:
    r"""``text`` with what no store keeps written as escapes (a NUL as ``\x00``, a lone
    surrogate as ``\udcff``): every store keeps the result and gives it back as it is.

    >>> print(kept_text("bad\x00byte"))
    bad\x00byte
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")
