"""Read models in Postgres: one typed table per Projection type (see
:mod:`incident.stores.tables`), created, given new columns, or taken over from its
legacy name on first use, and written in the caller's transaction when an append or a
checkpoint commits them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec
from psycopg import sql

from ...errors import StoreError
from ...messages import Projection
from ..arguments import readable_id
from ..protocols import ProjectionStore
from ..read_model_rows import projection_json, replacing_rows
from ..tables import Kind, TableSpec, legacy_name, qualified
from .database import Database
from .durability import durable_rows
from .session import Connection, Query, fetch_value, lock_key, log

P = TypeVar("P", bound=Projection)

# the Postgres type of each column kind; jsonb for the rest (nested values and mixed unions)
_COLUMN_TYPES: dict[Kind, str] = {
    Kind.STR: "text",
    Kind.STR_LITERAL: "text",
    Kind.INT: "bigint",
    Kind.FLOAT: "double precision",
    Kind.BOOL: "boolean",
    Kind.DATE: "date",
    Kind.UUID: "uuid",
    Kind.DATETIME: "timestamptz",
    Kind.NAIVE_DATETIME: "timestamp",
}


class _Table:
    """How one Projection type's table (see :mod:`incident.stores.tables`) is kept in
    Postgres: typed columns named like the struct's encoded fields. Rows travel as JSON
    both ways (jsonb_populate_record in, to_jsonb out), so msgspec alone converts values,
    exactly as it does for events."""

    def __init__(self, db: Database, spec: TableSpec) -> None:
        self.spec = spec
        self.schema = db.schema
        self.owners = db.owners
        self.name = spec.name
        self.key = sql.Identifier(spec.key)
        self.columns = {c.name: _COLUMN_TYPES.get(c.kind, "jsonb") for c in spec.columns}
        self.not_null = {c.name for c in spec.columns if not c.nullable}
        self.table = db.table(self.name)
        self.ddl_lock = lock_key(db.schema, f"table {self.name}")  # racing creators queue
        self.decoder = spec.decoder  # the one the checks on writing read with
        self.create = sql.SQL("CREATE TABLE {} ({})").format(
            self.table,
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(column), sql.SQL(kind))
                + sql.SQL(" PRIMARY KEY" if column == spec.key else "")
                for column, kind in self.columns.items()
            ),
        )
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(column)) for column in self.columns
        )
        # A row of a higher version is never replaced: racing writers cannot move it back.
        guard = (
            sql.SQL(
                " WHERE stored.{0} IS NULL OR EXCLUDED.{0} IS NULL OR stored.{0} <= EXCLUDED.{0}"
            ).format(sql.Identifier(spec.version))
            if spec.version is not None
            else sql.SQL("")
        )
        self.upsert = (
            sql.SQL(
                "INSERT INTO {0} AS stored"
                " SELECT * FROM jsonb_populate_record(NULL::{0}, %s::jsonb)"
                " ON CONFLICT ({1}) DO UPDATE SET {2}{3} RETURNING 1"
            )
            .format(self.table, self.key, updates, guard)
            .as_string()
        )
        # t.*, not t: a column named t would stand for the row (t.* is the alias's only)
        self.select = sql.SQL("SELECT to_jsonb(t.*)::text FROM {} AS t").format(self.table)
        self.select_one = self.select + sql.SQL(" WHERE {} = %s").format(self.key)
        # code point order on every store: "C" is the byte order of UTF-8, as SQLite's
        # BINARY and Python's own, whatever the database's collation says
        self.select_all = self.select + sql.SQL(' ORDER BY {} COLLATE "C"').format(self.key)

    def ensure(self, conn: Connection) -> None:
        """Create the table, or add the columns of fields added since (nullable)."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [self.ddl_lock])
        # DDL only when something is missing: a role without CREATE works on tables in place
        missing = fetch_value(conn, "SELECT to_regclass(%s)", self.table.as_string(conn)) is None
        if missing and not self._rename_legacy(conn):
            conn.execute(self.create)
        existing = {
            name
            for (name,) in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
                " AND attnum > 0 AND NOT attisdropped",
                [self.table.as_string(conn)],
            )
        }
        for column, kind in self.columns.items():
            if column not in existing:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        self.table, sql.Identifier(column), sql.SQL(kind)
                    )
                )

    def _rename_legacy(self, conn: Connection) -> bool:
        """Take over the table earlier releases kept this type in (:func:`legacy_name`),
        unless another class of this store owns that name."""
        old = legacy_name(self.spec)
        if old is None:
            return False
        owner = self.owners.owner_of(old)
        if owner is not None and qualified(owner) != self.spec.owner:
            return False
        legacy = sql.Identifier(self.schema, old)
        if fetch_value(conn, "SELECT to_regclass(%s)", legacy.as_string(conn)) is None:
            return False
        conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(legacy, sql.Identifier(self.name))
        )
        log.warning(
            "incident: renamed table %s.%s to %s.%s, the table_name %s declares",
            self.schema,
            old,
            self.schema,
            self.name,
            self.spec.owner,
        )
        return True

    def decode(self, text: str) -> Any:
        try:
            return self.decoder.decode(text)
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        # A column added after its rows were written holds NULL; where the field cannot
        # be None, NULL means "missing" and the field's default applies.
        row = msgspec.json.decode(text)
        fixed = {k: v for k, v in row.items() if v is not None or k not in self.not_null}
        try:
            return self.decoder.decode(msgspec.json.encode(fixed))
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise StoreError(
                f"A row of {self.name} does not fit its projection: {error}"
            ) from error


class PostgresProjectionStore:
    """Read models, one table per Projection type (see :mod:`incident.stores.tables`)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._tables: dict[type[Projection], _Table] = {}  # those known to exist

    def __repr__(self) -> str:
        return f"PostgresProjectionStore({self._db.describe()})"

    def _table(self, projection_type: type[Projection]) -> _Table:
        table = self._tables.get(projection_type)
        if table is None:
            spec, _ = self._db.owners.claim(projection_type)
            table = _Table(self._db, spec)
        return table

    def prepare(
        self, conn: Connection, types: Iterable[type[Projection]]
    ) -> list[type[Projection]]:
        """Create missing tables inside the caller's transaction; returns the types to
        remember as ready once that transaction has committed."""
        fresh = [t for t in dict.fromkeys(types) if t not in self._tables]
        if self._db.create_tables:
            for projection_type in fresh:
                self._table(projection_type).ensure(conn)
        return fresh

    def remember(self, types: Iterable[type[Projection]]) -> None:
        """After the transaction that prepared them committed: these types' tables exist."""
        for projection_type in types:
            self._tables.setdefault(projection_type, self._table(projection_type))

    def _check(self, projection: Projection) -> tuple[_Table, str, str]:
        """The projection's table, key and checked JSON: a type that is not a Projection
        is refused (table_spec) before anything else is looked at."""
        table = self._table(type(projection))
        key, data, _ = projection_json(projection, table.spec)
        return table, key, data.decode()

    def project(self, projection: P) -> P:
        table, key, payload = self._check(projection)
        self._db.ready()
        with self._db.connection(f"projecting {table.name} {key!r}") as conn:
            with conn.transaction():
                fresh = self.prepare(conn, [type(projection)])
                stored = None
                if conn.execute(table.upsert, [payload]).fetchone() is None:
                    stored = fetch_value(conn, table.select_one, key)
            self.remember(fresh)
        if stored is None:
            return projection
        newer: P = table.decode(stored)
        return newer

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        """Swap the whole table for ``projections`` in one transaction (replay)."""
        rows = replacing_rows(projection_type, projections)
        table = self._table(projection_type)
        self._db.ready()
        with self._db.connection(f"replacing {table.name}") as conn:
            with conn.transaction():
                fresh = self.swap(conn, {projection_type: rows})
            self.remember(fresh)
        return len(rows)

    def swap(
        self, conn: Connection, tables: Mapping[type[Projection], Sequence[Projection]]
    ) -> list[type[Projection]]:
        """Inside the caller's transaction: each table emptied, then given its rows;
        returns the types to :meth:`remember` once that transaction has committed."""
        fresh = self.prepare(conn, tables)
        for projection_type, rows in tables.items():
            conn.execute(sql.SQL("DELETE FROM {}").format(self._table(projection_type).table))
            self.queue(conn, rows)
        return fresh

    def queue(self, conn: Connection, projections: Sequence[Projection]) -> None:
        """Inside an append's transaction: checks every row, then sends the upserts."""
        for upsert, payload in self.upserts(projections):
            conn.execute(upsert, [payload])

    def upserts(self, projections: Sequence[Projection]) -> list[tuple[str, str]]:
        """Each projection's upsert statement and its checked JSON."""
        rows = []
        for projection in projections:
            table, _, payload = self._check(projection)
            rows.append((table.upsert, payload))
        return rows

    def known(self, types: Iterable[type[Projection]]) -> bool:
        """Whether these types' tables are known to exist (no DDL is needed to write)."""
        return all(projection_type in self._tables for projection_type in types)

    def write_many(self, conn: Connection, projections: Sequence[Projection]) -> None:
        """Upsert a batch's projections, one pipelined ``executemany`` per table rather than
        a round trip per row (a catch-up may write tens of thousands); every row checked
        first, as ``project`` checks it (Unstorable: nothing of the batch is sent)."""
        by_table: dict[str, list[list[str]]] = {}
        for upsert, payload in self.upserts(projections):
            by_table.setdefault(upsert, []).append([payload])
        for upsert, rows in by_table.items():
            with conn.cursor() as cursor:
                cursor.executemany(upsert, rows)

    def ensure_table(self, projection_type: type[Projection]) -> None:
        """Create (or, for a newer class, extend) the type's table on first use, as a read
        of it does; the async store's reads call this on a worker first."""
        if projection_type in self._tables:
            return
        table = self._table(projection_type)
        self._db.ready()
        with self._db.connection(f"reading {table.name}") as conn:
            with conn.transaction():
                fresh = self.prepare(conn, [projection_type])
            self.remember(fresh)

    def queries(self, projection_type: type[Projection]) -> tuple[str, Query, Query, Any]:
        """The type's table name, its statements to read one row (by key) and every row,
        and the function that turns a row's text back into the projection."""
        table = self._table(projection_type)
        return table.name, table.select_one, table.select_all, table.decode

    def _rows(self, projection_type: type[Projection], one: bool, *params: Any) -> list[Any]:
        table = self._table(projection_type)
        self._db.ready()
        with self._db.connection(f"reading {table.name}") as conn:
            if projection_type not in self._tables:
                with conn.transaction():
                    fresh = self.prepare(conn, [projection_type])
                self.remember(fresh)
            query = table.select_one if one else table.select_all
            # rows an append committed are read once they are durable, as its events are
            rows = durable_rows(conn, self._db.durability, query, params)
        return [table.decode(text) for (text,) in rows]

    def get(self, projection_type: type[P], key: str) -> P | None:
        if not readable_id(key):
            return None  # no row can have it
        rows: list[P] = self._rows(projection_type, True, key)
        return rows[0] if rows else None

    def all(self, projection_type: type[P]) -> list[P]:
        rows: list[P] = self._rows(projection_type, False)
        return rows

    def close(self) -> None:
        """Closes the pool this store shares with its event store."""
        self._db.close()


def writes_into(database: Database, projection_store: ProjectionStore) -> bool:
    """True for a Postgres projection store on the same server, database and schema (even
    with a pool of its own): a transaction on ``database`` can write its tables."""
    return (
        isinstance(projection_store, PostgresProjectionStore)
        and projection_store._db.conninfo == database.conninfo
        and projection_store._db.schema == database.schema
    )
