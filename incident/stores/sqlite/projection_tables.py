"""How a Projection type becomes an SQLite table: one typed column per struct field.

Scalars (int, float, str, bool, bytes) keep their SQLite type; dates, times, UUIDs,
decimals, enums and literals are stored as the text (or integer) msgspec gives them;
anything nested (lists, dicts, structs, mixed unions) is stored as JSON text. So read
models can be queried with plain SQL, sqlite-utils or Datasette, and come back exactly
as they were written (an aware UTC datetime returns aware UTC).

The table's name, columns, key and version guard come from the spec every backend shares
(:mod:`incident.stores.tables`); this module maps its column kinds to SQLite types. When
the type has an integer ``version`` field the upsert only replaces a row whose stored
version is not higher, in SQL, so racing writers (threads or processes) can never move a
read model backwards.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
import sqlite_utils

from ...codec import encode
from ...errors import IncidentError
from ...messages import Projection
from ..read_model_rows import projection_json
from ..tables import Kind, TableSpec

__all__ = ["ProjectionTable", "quote_identifier"]

P = TypeVar("P", bound=Projection)

# the SQL type of each column kind, and how its values are written: "native" (what
# sqlite3 stores already, passed through: the fast path), "builtin" (the text or integer
# msgspec gives them: ISO 8601, canonical UUID, exact decimal text) or "json"
_COLUMNS: dict[Kind, tuple[str, str]] = {
    Kind.BOOL: ("INTEGER", "native"),
    Kind.INT: ("INTEGER", "native"),
    Kind.FLOAT: ("REAL", "native"),
    Kind.STR: ("TEXT", "native"),
    Kind.BYTES: ("BLOB", "native"),
    Kind.DATETIME: ("TEXT", "builtin"),
    Kind.NAIVE_DATETIME: ("TEXT", "builtin"),
    Kind.DATE: ("TEXT", "builtin"),
    Kind.TIME: ("TEXT", "builtin"),
    Kind.TIMEDELTA: ("TEXT", "builtin"),
    Kind.UUID: ("TEXT", "builtin"),
    Kind.DECIMAL: ("TEXT", "builtin"),
    Kind.STR_LITERAL: ("TEXT", "builtin"),
    Kind.STR_ENUM: ("TEXT", "builtin"),
    Kind.INT_CHOICE: ("INTEGER", "builtin"),
    Kind.JSON: ("TEXT", "json"),
}


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

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.type = spec.type
        self.name = spec.name
        self.key = spec.key
        self.columns: dict[str, str] = {}
        # the columns whose values need converting, by position (the rest go as they are)
        self._converted: list[tuple[int, Callable[[Any], Any]]] = []
        self._json_columns: set[str] = set()
        self._not_null = {column.name for column in spec.columns if not column.nullable}
        self._instants = [
            index for index, column in enumerate(spec.columns) if column.kind is Kind.DATETIME
        ]
        for index, column in enumerate(spec.columns):
            sql_type, how = _COLUMNS[column.kind]
            self.columns[column.name] = sql_type
            write = _WRITERS[how]
            if write is not None:
                self._converted.append((index, write))
            if how == "json":
                self._json_columns.add(column.name)
        q = quote_identifier
        names = ", ".join(q(c) for c in self.columns)
        updates = ", ".join(f"{q(c)} = excluded.{q(c)}" for c in self.columns if c != self.key)
        conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        if spec.version is not None and updates:
            v = q(spec.version)
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
        # the row as it reads back from its checked JSON (a -0.0 there is 0.0, as on
        # every store), in field order, as the columns are
        values = msgspec.structs.astuple(projection_json(projection, self.spec)[2])
        if not self._converted:
            return values
        row = list(values)
        for index in self._instants:  # one rule on every store: instants in UTC
            value = row[index]
            if isinstance(value, dt.datetime) and value.tzinfo is not dt.UTC:
                row[index] = value.astimezone(dt.UTC)
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
            try:
                return msgspec.convert(values, self.type, strict=False)
            except msgspec.ValidationError:
                # A column added after its rows were written holds NULL; where the field
                # cannot be None, NULL means "missing" and the field's default applies
                # (as in Postgres).
                fixed = {
                    k: v for k, v in values.items() if v is not None or k not in self._not_null
                }
                if len(fixed) == len(values):
                    raise
                return msgspec.convert(fixed, self.type, strict=False)
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


def quote_identifier(identifier: str) -> str:
    """A table or column name as SQL reads it whatever it holds (a keyword, a space, a
    quote: quotes are doubled), for the statements built from a projection type's names.

    >>> print(quote_identifier("order"), quote_identifier('my"table'))
    "order" "my""table"
    """
    return '"' + identifier.replace('"', '""') + '"'
