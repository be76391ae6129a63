"""A read model's row, the same on every store: its key and version, which of two rows
of one key wins, and what a row may hold (``projection_json``: refused with Unstorable
before anything is written, on memory as on the durable stores)."""

from __future__ import annotations

import datetime as dt
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from .. import storable
from ..errors import IncidentError, InvalidArgument, Unstorable
from ..messages import Projection
from .tables import Kind, TableSpec, check_projection_type, qualified, table_spec

P = TypeVar("P", bound=Projection)

__all__ = [
    "check_projections",
    "newer_or_equal",
    "projection_json",
    "projection_key",
    "projection_version",
    "replacing_rows",
    "replacing_tables",
]


_specs: weakref.WeakKeyDictionary[type[Projection], TableSpec] = weakref.WeakKeyDictionary()


def check_projections(projections: Sequence[object]) -> None:
    """Refuse (Unstorable; InvalidArgument for what is not a Projection; IncidentError
    for a type no table can hold) what an append's projections break of the rule,
    before the append commits: a projection store in another database writes them only
    after the events, so refused there it would leave the events written. Checks as
    every store does (:func:`table_spec`, :func:`projection_json`)."""
    for projection in projections:
        kind: Any = type(projection)
        spec = _specs.get(kind)
        if spec is None:
            spec = _specs[kind] = table_spec(kind)
        assert isinstance(projection, Projection)  # table_spec refused any other type
        projection_json(projection, spec)


def projection_json(projection: Projection, spec: TableSpec) -> tuple[str, bytes, Projection]:
    """A read model's JSON, refusing (Unstorable) what its table cannot keep unchanged:
    see :func:`incident.storable.checked_json`; what does not read back as its own type
    (a str in an int field: a struct does not check its fields when built); and for
    columns, integers outside signed 64 bits, a naive datetime where the column holds
    instants, an aware one where it holds wall times (``tz=False``) or one that leaves
    the calendar in UTC. Returns the key, the JSON and the row read back from it.

    A float ``-0.0`` is written as ``0.0``: neither a SQLite REAL column nor Postgres
    (whose columns take rows as jsonb, which holds numbers as decimals) keeps the sign
    of zero, so no store keeps it in a read model (it compares equal either way)."""
    key = projection_key(projection)
    data = storable.checked_json(projection, "read model")
    if b"-0.0" in data:
        data = unsigned_zeros(data)
    for column in spec.checked_columns:
        value = getattr(projection, column.attribute)
        if value is None:
            continue
        # the usual values pass without building anything: an int in range, an instant
        # in UTC (whole minutes from UTC, and aware)
        kind = column.kind
        if kind is Kind.INT:
            if not isinstance(value, int) or storable.INT64_MIN <= value <= storable.INT64_MAX:
                continue
        elif kind is Kind.DATETIME and isinstance(value, dt.datetime) and value.tzinfo is dt.UTC:
            continue
        rule = _column_rule(kind, value)
        if rule is not None:
            raise Unstorable(f"read model {type(projection).__name__}", column.attribute, rule)
    try:  # after the columns' rules, which say more about a datetime than msgspec does
        row: Projection = spec.decoder.decode(data)
    except msgspec.ValidationError as error:
        raise Unstorable(f"read model {type(projection).__name__}", None, str(error)) from None
    return key, data, row


# a JSON string (skipped as it is) or the number -0.0 (no digit or exponent after it)
_STRING_OR_NEGATIVE_ZERO = re.compile(rb'"(?:[^"\\]|\\.)*"|-0\.0(?![0-9eE])')


def unsigned_zeros(data: bytes) -> bytes:
    """msgspec's JSON with every number ``-0.0`` written ``0.0``, strings untouched.

    >>> unsigned_zeros(b'{"a":-0.0,"b":[-0.05,-0.0],"c":"-0.0"}')
    b'{"a":0.0,"b":[-0.05,0.0],"c":"-0.0"}'
    """
    return _STRING_OR_NEGATIVE_ZERO.sub(
        lambda match: b"0.0" if match[0] == b"-0.0" else match[0], data
    )


def _column_rule(kind: Kind, value: Any) -> str | None:
    """What a column of this kind cannot keep of ``value`` unchanged, or None (an INT
    column's value is an int out of range: the caller passes over the others)."""
    if kind is Kind.INT:
        return f"{storable.shown(value)} does not fit a signed 64-bit integer column"
    if not isinstance(value, dt.datetime):
        return None
    offset = value.utcoffset()
    aware = offset is not None
    if offset is not None and offset % dt.timedelta(minutes=1):
        return (
            f"{value!r} is {offset} from UTC: ISO 8601 text keeps whole minutes, "
            "so it would come back as another instant"
        )
    if aware:
        try:
            value.astimezone(dt.UTC)
        except OverflowError:
            return f"{value.isoformat()} is outside years 1-9999 once in UTC, where it is kept"
    if kind is Kind.DATETIME and not aware:
        return (
            f"the naive datetime {value.isoformat()} would be stored as an instant; "
            "pass an aware datetime, or declare the field "
            "Annotated[datetime, msgspec.Meta(tz=False)] to keep naive wall times"
        )
    if kind is Kind.NAIVE_DATETIME and aware:
        return (
            f"the aware datetime {value.isoformat()} is in a field declared tz=False "
            "(naive wall times); pass a naive datetime or declare tz=True"
        )
    return None


def projection_key(projection: Projection) -> str:
    key = getattr(projection, "aggregate_id", None)
    if isinstance(key, str) and storable.keepable_id(key):
        return key  # the usual case, without naming the projection for an error
    if not isinstance(key, str) or not key:
        raise IncidentError(
            f"{type(projection).__name__} needs a non-empty str aggregate_id field to be stored"
        )
    return storable.check_id(key, f"read model {type(projection).__name__}'s aggregate_id")


def projection_version(projection: Projection) -> int | None:
    version = getattr(projection, "version", None)
    return version if isinstance(version, int) else None


def newer_or_equal(candidate: Projection, stored: Projection | None) -> bool:
    """Whether ``candidate`` may replace ``stored`` (never move a read model backwards)."""
    if stored is None:
        return True
    new, old = projection_version(candidate), projection_version(stored)
    return new is None or old is None or new >= old


def replacing_rows(projection_type: type[P], projections: Iterable[P]) -> list[P]:
    """The rows ``replace_all(projection_type, projections)`` keeps: each of that type
    (or of a class redefined under its name), else IncidentError before anything is
    written (InvalidArgument for a row that is not a Projection); of rows of one key,
    the one ``project`` would leave (never an older one)."""
    if not isinstance(projections, Iterable):
        raise InvalidArgument(
            f"replace_all({getattr(projection_type, '__name__', projection_type)!r}, ...) "
            f"needs an iterable of rows, got {storable.shown(projections)}"
        )
    kept: dict[str, P] = {}
    for projection in projections:
        check_projection_type(type(projection))
        if type(projection) is not projection_type and qualified(type(projection)) != (
            qualified(projection_type)
        ):
            raise IncidentError(
                f"replace_all({projection_type.__name__}, ...) was given a "
                f"{type(projection).__name__}: a table holds the rows of one type"
            )
        key = projection_key(projection)
        if newer_or_equal(projection, kept.get(key)):
            kept[key] = projection
    return list(kept.values())


def replacing_tables(
    tables: Mapping[type[Projection], Iterable[Projection]],
) -> dict[type[Projection], list[Projection]]:
    """The rows each table keeps when ``tables`` replace them (:func:`replacing_rows`),
    every one checked as every store checks it (:func:`check_projections`): refused
    before anything of any table is written."""
    kept = {kind: replacing_rows(kind, rows) for kind, rows in tables.items()}
    for rows in kept.values():
        check_projections(rows)
    return kept
