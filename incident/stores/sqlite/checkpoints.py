"""Subscription checkpoints, dead letters and handler locks in an SQLite file.

The tables live beside the events, so when the read models do too, a subscription's
projection upserts and its checkpoint commit in one ``BEGIN IMMEDIATE`` transaction: a
crash leaves both before or both after a batch, never one without the other.

The lock that keeps two processes from running one handler is an ``flock`` on a file
beside the database (``<db>.<handler>.lock``): the kernel drops it when its holder exits,
however it dies, so nothing ever has to expire.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import Sequence
from typing import IO, Any

from ..._forks import renew_in_forked_children
from ...errors import CheckpointConflict, StoreError
from ...messages import Projection
from .._common import parked_from_row, parked_row, poll, write_elsewhere
from ..arguments import check_checkpoint, check_parked
from ..protocols import Parked, ProjectionStore
from ..replacing import Tables, checked_tables, replace_elsewhere
from .database import Database
from .projection_tables import ProjectionTable
from .projections import encoded_tables, swap_tables, writes_into
from .sql import (
    CHECKPOINT_TABLES,
    CHECKPOINTS,
    LOAD_CHECKPOINT,
    PARK,
    PARKED,
    SAVE_CHECKPOINT,
    TABLE_EXISTS,
    UNPARK,
    UNPARK_ALL,
)

__all__ = ["SQLiteCheckpointStore", "SQLiteHandlerLock", "lock_path"]

# an in-memory database lives in one process: its handler locks are plain thread locks
_memory_locks: weakref.WeakKeyDictionary[Database, dict[str, threading.Lock]] = (
    weakref.WeakKeyDictionary()
)
_memory_locks_guard = threading.Lock()


class SQLiteCheckpointStore:
    """Checkpoints and dead letters in the SQLite file of an event store."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._ready = False

    def __repr__(self) -> str:
        return f"SQLiteCheckpointStore({self._db.path!r})"

    def initialize(self) -> list[str]:
        done = []
        with self._db.errors(), self._db.transaction() as conn:
            for name, statement in CHECKPOINT_TABLES:
                exists = conn.execute(TABLE_EXISTS, (name,)).fetchone()
                if exists is None:
                    conn.execute(statement)
                    done.append(f"created table {name}")
        self._ready = True
        return done

    def _ensure(self) -> None:
        if not self._ready:
            self.initialize()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self._ensure()
        with self._db.errors(), self._db.guard:
            rows: list[tuple[Any, ...]] = self._db.conn().execute(sql, params).fetchall()
        return rows

    def load(self, handler: str) -> int:
        check_checkpoint(handler)
        rows = self._query(LOAD_CHECKPOINT, (handler,))
        return int(rows[0][0]) if rows else 0

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
        shared = projection_store is not None and self.shares_database_with(projection_store)
        with self._db.errors(), self._db.transaction() as conn:
            row = conn.execute(LOAD_CHECKPOINT, (handler,)).fetchone()
            actual = int(row[0]) if row else 0
            if actual != expected:
                raise CheckpointConflict(handler, expected, actual)
            if projections and projection_store is not None and not shared:
                # another database: its rows once the checkpoint is ours (the write lock
                # is held), before it moves, so a crash re-applies them, never skips; a
                # conflict writes none. One wrapping a store on this database writes in
                # this transaction (lend), not waiting for the lock it holds.
                with self._db.lend(conn):
                    write_elsewhere(projection_store, projections)
            if shared and projections:
                _write_many(self._db, conn, projections)
            if parked:
                conn.executemany(
                    PARK, (parked_row(entry, dt.datetime.isoformat) for entry in parked)
                )
            conn.execute(SAVE_CHECKPOINT, (handler, position, _now()))

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
        shared = projection_store is not None and self.shares_database_with(projection_store)
        kept = checked_tables(tables, projection_store, shared)
        swap = encoded_tables(self._db, kept) if shared else []
        with self._db.errors(), self._db.transaction() as conn:
            swap_tables(self._db, conn, swap)
            if drop_parked:
                conn.execute(UNPARK_ALL, (handler,))
            conn.execute(SAVE_CHECKPOINT, (handler, position, _now()))
        if not shared:
            replace_elsewhere(kept, projection_store)

    def checkpoints(self) -> dict[str, int]:
        rows = self._query(CHECKPOINTS)
        return {handler: int(position) for handler, position in rows}

    def park(self, parked: Parked) -> None:
        check_parked(parked)
        self._ensure()
        with self._db.errors(), self._db.transaction() as conn:
            conn.execute(PARK, parked_row(parked, dt.datetime.isoformat))

    def parked(self, handler: str | None = None) -> list[Parked]:
        rows = self._query(PARKED, (handler, handler))
        return [parked_from_row(row) for row in rows]

    def unpark(self, handler: str, position: int) -> None:
        self._ensure()
        with self._db.errors(), self._db.transaction() as conn:
            conn.execute(UNPARK, (handler, position))

    def lock(self, handler: str) -> SQLiteHandlerLock:
        if self._db.in_memory:
            with _memory_locks_guard:
                locks = _memory_locks.setdefault(self._db, {})
                shared = locks.setdefault(handler, threading.Lock())
            return SQLiteHandlerLock(handler, None, shared)
        return SQLiteHandlerLock(handler, lock_path(self._db.path, handler), None)

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return writes_into(self._db, projection_store)

    def close(self) -> None:
        """Nothing to release: the file is the event store's, which closes it (a
        subscription closing its checkpoints must leave the event store usable)."""


class SQLiteHandlerLock:
    """An exclusive ``flock`` on ``<db>.<handler>.lock`` (a thread lock for in-memory
    databases). Each lock object opens its own file description, so two runners in one
    process exclude each other just as two processes do."""

    def __init__(self, handler: str, path: str | None, thread_lock: threading.Lock | None):
        self.handler = handler
        self.path = path
        self._thread_lock = thread_lock
        self._file: IO[bytes] | None = None
        self._held = False
        renew_in_forked_children(self._forked)

    def __repr__(self) -> str:
        return f"SQLiteHandlerLock({self.handler!r}, held={self._held})"

    def _try(self) -> bool:
        if self._thread_lock is not None:
            return self._thread_lock.acquire(blocking=False)
        assert self.path is not None
        if self._file is None:
            try:
                self._file = open(self.path, "ab")  # noqa: SIM115 - held open while locked
            except OSError as error:
                raise StoreError(f"Cannot open the lock file {self.path!r}: {error}") from error
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self, timeout: float | None = None) -> bool:
        if self._held:
            return True
        self._held = poll(self._try, timeout, first=0.005, cap=0.1)
        return self._held

    def _forked(self) -> None:
        """In a child process after fork(): the lock is the parent's. Close the copy of
        its file without unlocking (flock belongs to the file both share: unlocking
        would free the parent's lock, and keeping the copy open would keep it taken
        after the parent is gone)."""
        if self._file is not None:
            self._file.close()
        self._file, self._held = None, False

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._thread_lock is not None:
            self._thread_lock.release()
        elif self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def held(self) -> bool:
        return self._held


def lock_path(database_path: str, handler: str) -> str:
    """The lock file of one handler: readable when the name is, hashed when it is not.

    >>> lock_path("/data/bank.db", "bank_projections")
    '/data/bank.db.bank_projections.lock'
    """
    safe = handler if re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", handler) else None
    if safe is None:
        safe = hashlib.blake2b(handler.encode(), digest_size=8).hexdigest()
    return f"{os.path.abspath(database_path)}.{safe}.lock"


def _write_many(
    database: Database, conn: sqlite3.Connection, projections: Sequence[Projection]
) -> None:
    """Upsert a batch's projections with one ``executemany`` per table (a catch-up may
    write tens of thousands); everything is encoded before anything is written."""
    by_table: dict[ProjectionTable, list[tuple[Any, ...]]] = {}
    for projection in projections:
        table = database.table(type(projection))
        by_table.setdefault(table, []).append(table.row(projection))
    for table, rows in by_table.items():
        database.ensure_table(conn, table)
        conn.executemany(table.upsert_sql, rows)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()
