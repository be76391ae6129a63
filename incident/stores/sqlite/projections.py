"""Read models in an SQLite file: the projection store, one table per Projection type.

Its tables live in the event store's file, so a command's events and the projections its
inline handlers return commit together when both stores are on one file (``writes_into``
says whether they are). How a type becomes a table is
:mod:`incident.stores.sqlite.projection_tables`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ...messages import Projection
from ..arguments import readable_id
from ..protocols import ProjectionStore
from ..read_model_rows import projection_key, replacing_rows
from .database import Database
from .projection_tables import ProjectionTable, quote_identifier

__all__ = ["SQLiteProjectionStore", "encoded_tables", "swap_tables", "writes_into"]

P = TypeVar("P", bound=Projection)


class SQLiteProjectionStore:
    """Read models in an SQLite file: one table per Projection type (see
    :mod:`incident.stores.sqlite.projection_tables`)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def __repr__(self) -> str:
        return f"SQLiteProjectionStore({self._db.path!r})"

    def project(self, projection: P) -> P:
        table = self._db.table(type(projection))
        row = table.row(projection)
        with self._db.errors(), self._db.transaction() as conn:
            self._db.ensure_table(conn, table)
            if conn.execute(table.upsert_sql, row).rowcount:
                return projection
            # a newer version is stored: say which one won
            stored = conn.execute(table.select_one_sql, (projection_key(projection),)).fetchone()
        winner: P = table.decode(stored)
        return winner

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        """Swap the whole table for ``projections`` in one transaction (replay)."""
        rows = encoded_tables(
            self._db, {projection_type: replacing_rows(projection_type, projections)}
        )
        with self._db.errors(), self._db.transaction() as conn:
            swap_tables(self._db, conn, rows)
        return len(rows[0][1])

    def get(self, projection_type: type[P], key: str) -> P | None:
        if not readable_id(key):
            return None  # no row can have it
        table = self._db.table(projection_type)
        with self._db.errors():
            self._db.ready(table)
            with self._db.guard:
                row = self._db.conn().execute(table.select_one_sql, (key,)).fetchone()
        found: P | None = None if row is None else table.decode(row)
        return found

    def all(self, projection_type: type[P]) -> list[P]:
        table = self._db.table(projection_type)
        with self._db.errors():
            self._db.ready(table)
            with self._db.guard:
                rows = (
                    self._db.conn()
                    .execute(f"{table.select_sql} ORDER BY {quote_identifier(table.key)}")
                    .fetchall()
                )
        return [table.decode(row) for row in rows]

    def close(self) -> None:
        """Closes the database, which the event store it came from shares."""
        self._db.close()


def writes_into(database: Database, projection_store: ProjectionStore) -> bool:
    """Whether a transaction on ``database`` can write ``projection_store``'s tables: an
    SQLite projection store on the same file (or the same in-memory database)."""
    return isinstance(projection_store, SQLiteProjectionStore) and database.same_as(
        projection_store._db
    )


Encoded = list[tuple[ProjectionTable, list[tuple[Any, ...]]]]


def encoded_tables(
    database: Database, tables: Mapping[type[Projection], Iterable[Projection]]
) -> Encoded:
    """Each table and its rows, every one encoded before anything is written."""
    encoded: Encoded = []
    for projection_type, projections in tables.items():
        table = database.table(projection_type)
        encoded.append((table, [table.row(projection) for projection in projections]))
    return encoded


def swap_tables(database: Database, conn: sqlite3.Connection, encoded: Encoded) -> None:
    """Inside the caller's write transaction: each table emptied, then given its rows."""
    for table, rows in encoded:
        database.ensure_table(conn, table)
        conn.execute(f"DELETE FROM {quote_identifier(table.name)}")
        conn.executemany(table.upsert_sql, rows)
