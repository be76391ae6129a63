"""How a Projection type becomes an SQLite table: one typed column per struct field.

Scalars (int, float, str, bool, bytes) keep their SQLite type; dates, times, UUIDs,
decimals, enums and literals are stored as the text (or integer) msgspec gives them;
anything nested (lists, dicts, structs, mixed unions) is stored as JSON text. So read
models can be queried with plain SQL, sqlite-utils or Datasette, and come back exactly
as they were written (an aware UTC datetime returns aware UTC).

The table is named after the class in snake_case (``BankAccount`` -> ``bank_account``)
unless the class declares ``table_name: ClassVar[str]``. It is keyed by the
``aggregate_id`` column; when the type has an integer ``version`` field the upsert only
replaces a row whose stored version is not higher, in SQL, so racing writers (threads or
processes) can never move a read model backwards.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
import msgspec.inspect as mi
import sqlite_utils

from ..codec import encode
from ..errors import IncidentError
from ..messages import Projection
from ._common import projection_key

__all__ = ["ProjectionTable", "table_name"]

P = TypeVar("P", bound=Projection)

# tables the event store owns; a projection may not take their names
RESERVED_TABLES = frozenset({"events", "incident_schema"})

_SCALARS: tuple[tuple[type[mi.Type], str], ...] = (
    (mi.BoolType, "INTEGER"),
    (mi.IntType, "INTEGER"),
    (mi.FloatType, "REAL"),
    (mi.StrType, "TEXT"),
    (mi.BytesType, "BLOB"),
    (mi.ByteArrayType, "BLOB"),
    # msgspec writes these as strings (ISO 8601, canonical UUID, exact decimal text)
    (mi.DateTimeType, "TEXT"),
    (mi.DateType, "TEXT"),
    (mi.TimeType, "TEXT"),
    (mi.TimeDeltaType, "TEXT"),
    (mi.UUIDType, "TEXT"),
    (mi.DecimalType, "TEXT"),
)
# values that are already what sqlite3 stores, passed through untouched (the fast path)
_NATIVE = (mi.BoolType, mi.IntType, mi.FloatType, mi.StrType, mi.BytesType)


def table_name(projection_type: type[Projection]) -> str:
    """The table a Projection type is stored in.

    >>> class BankAccount(Projection):
    ...     aggregate_id: str
    >>> class HTTPStatusView(Projection):
    ...     aggregate_id: str
    >>> table_name(BankAccount), table_name(HTTPStatusView)
    ('bank_account', 'http_status_view')
    """
    explicit = getattr(projection_type, "table_name", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", projection_type.__name__)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def _column(field_type: mi.Type) -> tuple[str, str]:
    """(SQL type, how values are written: "native", "builtin" or "json")."""
    if isinstance(field_type, mi.Metadata):
        return _column(field_type.type)
    if isinstance(field_type, mi.UnionType):
        present = [t for t in field_type.types if not isinstance(t, mi.NoneType)]
        return _column(present[0]) if len(present) == 1 else ("TEXT", "json")
    for kind, sql_type in _SCALARS:
        if isinstance(field_type, kind):
            return sql_type, "native" if isinstance(field_type, _NATIVE) else "builtin"
    values: Sequence[Any] = ()
    if isinstance(field_type, mi.LiteralType):
        values = field_type.values
    elif isinstance(field_type, mi.EnumType):
        values = [member.value for member in field_type.cls]
    if values and all(isinstance(v, str) for v in values):
        return "TEXT", "builtin"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INTEGER", "builtin"
    return "TEXT", "json"


def _to_builtin(value: Any) -> Any:
    return msgspec.to_builtins(value, builtin_types=(bytes, bytearray))


def _to_json(value: Any) -> Any:
    return None if value is None else encode(_to_builtin(value)).decode()


_WRITERS: dict[str, Callable[[Any], Any] | None] = {
    "native": None,
    "builtin": _to_builtin,
    "json": _to_json,
}
_json_decoder = msgspec.json.Decoder()


class ProjectionTable:
    """The table of one Projection type: its DDL, its upsert and its row codec."""

    def __init__(self, projection_type: type[Projection]) -> None:
        info = mi.type_info(projection_type)
        assert isinstance(info, mi.StructType)
        self.type = projection_type
        self.name = table_name(projection_type)
        if self.name in RESERVED_TABLES or self.name.startswith("sqlite_"):
            raise IncidentError(
                f"{projection_type.__qualname__} would be stored in table {self.name!r}, which "
                "the event store owns; rename the class or declare table_name: ClassVar[str]"
            )
        by_attribute = {field.name: field for field in info.fields}
        key_field = by_attribute.get("aggregate_id")
        if key_field is None or _column(key_field.type)[0] != "TEXT":
            raise IncidentError(
                f"{projection_type.__qualname__} needs an aggregate_id: str field to be stored"
            )
        self.key = key_field.encode_name
        self.columns: dict[str, str] = {}
        # the columns whose values need converting, by position (the rest go as they are)
        self._converted: list[tuple[int, Callable[[Any], Any]]] = []
        self._json_columns: set[str] = set()
        for index, field in enumerate(info.fields):
            sql_type, how = _column(field.type)
            self.columns[field.encode_name] = sql_type
            write = _WRITERS[how]
            if write is not None:
                self._converted.append((index, write))
            if how == "json":
                self._json_columns.add(field.encode_name)
        version = by_attribute.get("version")
        versioned = version is not None and _column(version.type) == ("INTEGER", "native")
        q = _quote
        names = ", ".join(q(c) for c in self.columns)
        updates = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in self.columns if c != self.key)
        conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        if versioned and updates:
            assert version is not None
            v = q(version.encode_name)
            # never move a read model backwards; a NULL version on either side does not guard
            conflict += (
                f" WHERE excluded.{v} IS NULL OR {q(self.name)}.{v} IS NULL"
                f" OR excluded.{v} >= {q(self.name)}.{v}"
            )
        marks = ", ".join("?" for _ in self.columns)
        self.upsert_sql = (
            f"INSERT INTO {q(self.name)} ({names}) VALUES ({marks}) "
            f"ON CONFLICT({q(self.key)}) {conflict}"
        )
        self.select_sql = f"SELECT {names} FROM {q(self.name)}"
        self.select_one_sql = f"{self.select_sql} WHERE {q(self.key)} = ?"

    def __repr__(self) -> str:
        return f"ProjectionTable({self.type.__qualname__} -> {self.name})"

    def row(self, projection: Projection) -> tuple[Any, ...]:
        """The column values of one projection, in column order (refuses what cannot be
        stored before anything is written)."""
        projection_key(projection)
        values = msgspec.structs.astuple(projection)  # in field order, as the columns are
        if not self._converted:
            return values
        row = list(values)
        try:
            for index, write in self._converted:
                if row[index] is not None:
                    row[index] = write(row[index])
            return tuple(row)
        except (TypeError, msgspec.EncodeError) as error:
            raise IncidentError(f"Cannot store {projection!r} in SQLite: {error}") from error

    def decode(self, row: Sequence[Any]) -> Any:
        """A stored row back as the Projection type."""
        values = dict(zip(self.columns, row, strict=True))
        try:
            for column in self._json_columns:
                if values[column] is not None:
                    values[column] = _json_decoder.decode(values[column])
            return msgspec.convert(values, self.type, strict=False)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise IncidentError(
                f"Row {values.get(self.key)!r} of table {self.name!r} does not decode as "
                f"{self.type.__qualname__}: {error}"
            ) from error

    def ensure(self, conn: sqlite3.Connection) -> list[str]:
        """Create the table, or add the columns of fields added since; returns what it did.
        Run inside the caller's transaction (sqlite-utils only builds and inspects here)."""
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        table = db.table(self.name)
        if not table.exists():
            conn.execute(db.create_table_sql(self.name, self.columns, pk=self.key))
            return [f"created table {self.name}"]
        if table.pks != [self.key]:
            raise IncidentError(
                f"Table {self.name!r} exists but is not keyed by {self.key!r}, so it cannot "
                f"hold {self.type.__qualname__} projections"
            )
        existing = table.columns_dict
        added = []
        for column, sql_type in self.columns.items():
            if column not in existing:
                table.add_column(column, sql_type)
                added.append(f"added column {self.name}.{column}")
        return added


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
