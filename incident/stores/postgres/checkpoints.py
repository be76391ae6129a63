"""Subscription checkpoints, dead letters and handler locks in Postgres.

The tables live in the event store's schema, so when the read models do too, a
subscription's projection upserts and its checkpoint commit in one transaction.

One runner per handler, across processes and machines: a session-level advisory lock
(``pg_try_advisory_lock``) taken on a connection the runner keeps open. Postgres drops it
when that session ends, however the runner dies, and a runner waiting for it takes over
from the checkpoint: nothing has to expire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from ..._forks import renew_in_forked_children
from ...errors import CheckpointConflict, StoreError
from ...messages import Projection
from .._common import PARKED_COLUMNS, parked_from_row, parked_row, poll, write_elsewhere
from ..arguments import check_checkpoint, check_parked
from ..protocols import Parked, ProjectionStore
from ..replacing import Tables, checked_tables, replace_elsewhere
from .database import Database
from .inherited import opened
from .projections import PostgresProjectionStore, writes_into
from .session import lock_key

__all__ = ["PostgresCheckpointStore", "PostgresHandlerLock"]

_TABLES = {
    "incident_checkpoints": (
        "handler text PRIMARY KEY, position bigint NOT NULL, updated_at timestamptz NOT NULL"
    ),
    "incident_parked": (
        "handler text NOT NULL, position bigint NOT NULL, event_id text NOT NULL,"
        " aggregate_id text NOT NULL, event_type text NOT NULL, error text NOT NULL,"
        " attempts integer NOT NULL, parked_at timestamptz NOT NULL,"
        " PRIMARY KEY (handler, position)"
    ),
}


class PostgresCheckpointStore:
    """Checkpoints and dead letters in the schema of a Postgres event store."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._ready = False
        checkpoints, self._parked = (
            database.table("incident_checkpoints"),
            database.table("incident_parked"),
        )
        self._load = sql.SQL("SELECT position FROM {} WHERE handler = %s").format(checkpoints)
        self._all = sql.SQL("SELECT handler, position FROM {}").format(checkpoints)
        self._save = sql.SQL(
            "INSERT INTO {} (handler, position, updated_at) VALUES (%s, %s, now())"
            " ON CONFLICT (handler) DO UPDATE SET position = EXCLUDED.position,"
            " updated_at = EXCLUDED.updated_at"
        ).format(checkpoints)
        self._first = sql.SQL(
            "INSERT INTO {} (handler, position, updated_at) VALUES (%s, 0, now())"
            " ON CONFLICT (handler) DO NOTHING"
        ).format(checkpoints)
        self._park = sql.SQL(
            f"INSERT INTO {{}} ({PARKED_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (handler, position) DO UPDATE SET error = EXCLUDED.error,"
            " attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at"
        ).format(self._parked)

    def __repr__(self) -> str:
        return f"PostgresCheckpointStore({self._db.describe()})"

    def initialize(self) -> list[str]:
        done = []
        self._db.ready()
        doing = "creating the subscription tables"
        with self._db.connection(doing) as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._db.migrate_lock])
            for name, columns in _TABLES.items():
                table = self._db.table(name)
                row = conn.execute("SELECT to_regclass(%s)", [table.as_string(conn)]).fetchone()
                if row is None or row[0] is None:
                    conn.execute(sql.SQL("CREATE TABLE {} ({})").format(table, sql.SQL(columns)))
                    done.append(f"created table {self._db.schema}.{name}")
        self._ready = True
        return done

    def _ensure(self) -> None:
        if not self._ready:
            self.initialize()

    def load(self, handler: str) -> int:
        check_checkpoint(handler)
        self._ensure()
        with self._db.connection(f"loading the checkpoint of {handler}") as conn:
            row = conn.execute(self._load, [handler]).fetchone()
        return int(row[0]) if row else 0

    def save(
        self,
        handler: str,
        position: int,
        *,
        expected: int,
        projections: Sequence[Projection] = (),
        projection_store: ProjectionStore | None = None,
        parked: Sequence[Parked] = (),
    ) -> None:
        check_checkpoint(handler, position=position, expected=expected)
        for entry in parked:
            check_parked(entry)
        self._ensure()
        shared = isinstance(projection_store, PostgresProjectionStore) and (
            self.shares_database_with(projection_store)
        )
        fresh: list[type[Projection]] = []
        doing = f"saving the checkpoint of {handler}"
        with self._db.connection(doing) as conn, conn.transaction():
            row = conn.execute(self._load + sql.SQL(" FOR UPDATE"), [handler]).fetchone()
            if row is None:  # a first save: nothing to lock, unless a row is made to lock
                conn.execute(self._first, [handler])  # waits for another first save's
                row = conn.execute(self._load + sql.SQL(" FOR UPDATE"), [handler]).fetchone()
            actual = int(row[0]) if row else 0
            if actual != expected:
                raise CheckpointConflict(handler, expected, actual)
            if projections and projection_store is not None and not shared:
                # another database: its rows once the checkpoint is ours (locked), before
                # it moves, so a crash re-applies them, never skips; a conflict writes none
                write_elsewhere(projection_store, projections)
            if shared and projections:
                assert isinstance(projection_store, PostgresProjectionStore)
                fresh = projection_store.prepare(conn, map(type, projections))
                projection_store.write_many(conn, projections)
            if parked:
                conn.cursor().executemany(self._park, [parked_row(entry) for entry in parked])
            conn.execute(self._save, [handler, position])
        if fresh:
            assert isinstance(projection_store, PostgresProjectionStore)
            projection_store.remember(fresh)

    def reset(
        self,
        handler: str,
        position: int = 0,
        *,
        drop_parked: bool = False,
        tables: Tables | None = None,
        projection_store: ProjectionStore | None = None,
    ) -> None:
        check_checkpoint(handler, position=position)
        self._ensure()
        shared = isinstance(projection_store, PostgresProjectionStore) and (
            self.shares_database_with(projection_store)
        )
        kept = checked_tables(tables, projection_store, shared)
        fresh: list[type[Projection]] = []
        doing = f"resetting the checkpoint of {handler}"
        with self._db.connection(doing) as conn, conn.transaction():
            if shared and kept:
                assert isinstance(projection_store, PostgresProjectionStore)
                fresh = projection_store.swap(conn, kept)
            if drop_parked:
                conn.execute(
                    sql.SQL("DELETE FROM {} WHERE handler = %s").format(self._parked), [handler]
                )
            conn.execute(self._save, [handler, position])
        if fresh:
            assert isinstance(projection_store, PostgresProjectionStore)
            projection_store.remember(fresh)
        if not shared:
            replace_elsewhere(kept, projection_store)

    def checkpoints(self) -> dict[str, int]:
        self._ensure()
        with self._db.connection("listing checkpoints") as conn:
            rows = conn.execute(self._all).fetchall()
        return {handler: int(position) for handler, position in rows}

    def park(self, parked: Parked) -> None:
        check_parked(parked)
        self._ensure()
        with self._db.connection(f"parking #{parked.position} of {parked.handler}") as conn:
            conn.execute(self._park, parked_row(parked))

    def parked(self, handler: str | None = None) -> list[Parked]:
        self._ensure()
        with self._db.connection("listing parked events") as conn:
            rows = conn.execute(
                sql.SQL(
                    f"SELECT {PARKED_COLUMNS} FROM {{}} WHERE %s::text IS NULL OR handler = %s"
                    " ORDER BY handler, position"
                ).format(self._parked),
                [handler, handler],
            ).fetchall()
        return [parked_from_row(row) for row in rows]

    def unpark(self, handler: str, position: int) -> None:
        self._ensure()
        with self._db.connection(f"unparking #{position} of {handler}") as conn:
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE handler = %s AND position = %s").format(self._parked),
                [handler, position],
            )

    def lock(self, handler: str) -> PostgresHandlerLock:
        key = lock_key(self._db.schema, f"handler {handler}")
        return PostgresHandlerLock(handler, self._db.conninfo, key)

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return writes_into(self._db, projection_store)

    def close(self) -> None:
        """Nothing to release: the pool is the event store's, which closes it (a
        subscription closing its checkpoints must leave the event store usable)."""


class PostgresHandlerLock:
    """A session-level advisory lock on a connection of its own, held while it is open.

    Every attempt asks on that one connection (a standby polling while another runner
    holds the lock opens no connection per attempt); the attempt that succeeds makes
    it the holder's session. ``release`` closes it, held or not; one that died while
    idle is replaced at the next attempt."""

    def __init__(self, handler: str, conninfo: str, key: int) -> None:
        self.handler = handler
        self._conninfo = conninfo
        self._key = key
        self._conn: psycopg.Connection[Any] | None = None
        self._held = False
        renew_in_forked_children(self._forked)

    def __repr__(self) -> str:
        return f"PostgresHandlerLock({self.handler!r}, held={self._held})"

    def _ask(self) -> bool:
        if self._conn is None or self._conn.closed:
            self._conn = opened(psycopg.connect(self._conninfo, autocommit=True))
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", [self._key]).fetchone()
        return row is not None and bool(row[0])

    def _try(self) -> bool:
        kept = self._conn is not None and not self._conn.closed
        try:
            try:
                self._held = self._ask()
            except psycopg.OperationalError:
                if not kept:
                    raise
                self._close()  # the session died while idle (a restart, a kill): anew
                self._held = self._ask()
        except psycopg.Error as error:
            self._close()
            raise StoreError(f"Postgres failed locking {self.handler}: {error}") from error
        return self._held

    def acquire(self, timeout: float | None = None) -> bool:
        if self._held:
            return True
        return poll(self._try, timeout, first=0.01, cap=0.25)

    def _forked(self) -> None:
        """In a child process after fork(): the connection is the parent's session, and
        with it the lock; it was severed (:mod:`.inherited`). The child starts without."""
        self._conn, self._held = None, False

    def _close(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None:
            conn.close()  # ending the session releases its advisory locks

    def release(self) -> None:
        """Give the lock up, or stop trying: either way the session ends."""
        self._close()

    def held(self) -> bool:
        """Still ours: the session holding the lock answers (a dropped one lost it)."""
        if not self._held or self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error:
            self._close()
            return False
        return True
