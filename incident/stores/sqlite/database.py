"""One SQLite file (or in-memory database) as the stores opened on it share it: its
connections (one per thread for a file, so readers never wait for each other; the one
connection of an in-memory database, under ``Database.guard``), its write transactions
(``WriteTransaction``, which takes the write lock at its first statement), driver errors
as StoreError, the schema gate (``Database.migrate``) and the projection tables known to
exist.
"""

# Long: the connections and the three kinds of write transaction (whole, savepoint, lent)
# share one thread-local bookkeeping of the tables each made, which a rollback undoes.
from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

from ..._forks import renew_in_forked_children
from ...errors import StoreError
from ...messages import Projection
from ..live import AppendSignal, signal_for
from ..tables import TableOwners
from .migrations import SCHEMA_VERSION, schema_version, upgrade
from .projection_tables import ProjectionTable
from .url import MEMORY
from .write_lock import LOCK_POLL, begin_immediate

__all__ = ["Database", "LentTransaction", "Savepoint", "WriteTransaction"]

# where a thread keeps its connections: reading (False) and writing (True)
_SLOTS = {False: "conn", True: "writer"}
# this thread's write transactions lent to every store on their database (Database.lend)
_lent = threading.local()


class Database:
    """One SQLite file (or in-memory database): connections, transactions, the schema,
    and the projection tables known to exist. Shared by an event store, its projection
    store and its checkpoint store."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        timeout: float = 30.0,
        lock_poll: float = LOCK_POLL,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.timeout = timeout
        self.lock_poll = lock_poll  # 0: SQLite's busy handler waits for the write lock
        self.closed = False
        self._local = threading.local()
        self._lock = threading.RLock()
        self._connections: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self.schema_ready = False
        self._tables: dict[type[Projection], ProjectionTable] = {}
        self._table_owners = TableOwners()
        self._ready_tables: set[str] = set()
        # an in-memory database lives in its connection: one, shared under the lock;
        # a file gets one connection per thread, which need no lock
        self._shared = self._connect() if path == MEMORY else None
        self.guard: AbstractContextManager[Any] = (
            self._lock if self._shared is not None else nullcontext()
        )
        # wakes this process's live readers after an append commits (stores.live)
        self.appends = AppendSignal() if self.in_memory else signal_for(os.path.realpath(path))
        renew_in_forked_children(self._forget_connections)

    def _forget_connections(self) -> None:
        """In a forked child: SQLite connections must not cross a fork, so the child opens
        its own (the parent's are left alone, not closed: they are still the parent's)."""
        self._local = threading.local()
        self._connections = []
        self._lock = threading.RLock()
        if self._shared is not None:
            self.guard = self._lock

    @property
    def in_memory(self) -> bool:
        return self._shared is not None

    def same_as(self, other: Database) -> bool:
        if other is self:
            return True
        if self.in_memory or other.in_memory:
            return False
        return os.path.realpath(self.path) == os.path.realpath(other.path)

    # -- connections and transactions -----------------------------------------

    def _connect(self, *, writes: bool = False) -> sqlite3.Connection:
        """A reading connection waits in SQLite's busy handler; a writing one does not:
        ``begin_immediate`` polls for the write lock itself, so waiting writers take turns
        (the busy handler's sleeps grow to 100 ms, and a process that has waited long
        keeps losing the lock to those that have just arrived)."""
        with self.errors():
            # isolation_level=None: no implicit transactions, we BEGIN IMMEDIATE ourselves
            conn = sqlite3.connect(
                self.path,
                timeout=0 if writes and self.lock_poll else self.timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                if self.path != MEMORY:
                    self._use_wal(conn)
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            except sqlite3.Error:
                conn.close()
                raise
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL needs an exclusive lock, and SQLite answers "locked"
        # at once instead of waiting (it avoids a deadlock that way) when several
        # processes open the file together: wait here instead, within the same timeout.
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _thread_connection(self, *, writes: bool = False) -> sqlite3.Connection:
        conn = self._connect(writes=writes)
        with self._lock:
            if self.closed:
                conn.close()
                raise StoreError(f"The SQLite store {self.path!r} is closed")
            # close what threads that have ended left behind
            alive = []
            for thread, other in self._connections:
                owner = thread()
                if owner is None or not owner.is_alive():
                    other.close()
                else:
                    alive.append((thread, other))
            self._connections = [*alive, (weakref.ref(threading.current_thread()), conn)]
        setattr(self._local, _SLOTS[writes], conn)
        return conn

    def _discard(self, conn: sqlite3.Connection) -> None:
        if conn is self._shared:
            return  # an in-memory database cannot be reopened; SQLite rolls it back itself
        for name in _SLOTS.values():
            if getattr(self._local, name, None) is conn:
                setattr(self._local, name, None)
        with self._lock:
            self._connections = [(t, c) for t, c in self._connections if c is not conn]
        conn.close()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection; use it inside ``with self.guard``."""
        return self._this_threads(writes=False)

    def write_conn(self) -> sqlite3.Connection:
        """This thread's writing connection (see ``_connect``): write transactions run on
        it, reads on ``conn()``."""
        return self._this_threads(writes=True)

    def _this_threads(self, *, writes: bool) -> sqlite3.Connection:
        if self.closed:
            self._drop_own()  # no statement of this thread runs on them now
            raise StoreError(f"The SQLite store {self.path!r} is closed")
        if self._shared is not None:
            return self._shared
        conn: sqlite3.Connection | None = getattr(self._local, _SLOTS[writes], None)
        return conn if conn is not None else self._thread_connection(writes=writes)

    def transaction(self) -> WriteTransaction | LentTransaction:
        """``with database.transaction() as conn``: a write transaction holding SQLite's
        write lock from its first statement, committed at the end or rolled back (inside
        ``lend``, a savepoint in the lent one)."""
        lent: dict[object, tuple[Database, sqlite3.Connection]] | None
        if lent := getattr(_lent, "by_database", None):  # only while a save lends one
            found = lent.get(self._lending_key())
            if found is not None:
                return LentTransaction(self, found[1], own=found[0] is self)
        return WriteTransaction(self)

    @contextmanager
    def lend(self, conn: sqlite3.Connection) -> Iterator[None]:
        """Inside a write transaction on ``conn``: this thread's transactions on this
        database, through any store opened on it, are savepoints in it until the block
        ends. A checkpoint's save writes a projection store it does not recognise (a
        wrapper of one on this file) that way, in its own transaction, instead of
        waiting for the lock it holds."""
        lent = _lent.__dict__.setdefault("by_database", {})
        key = self._lending_key()
        before, lent[key] = lent.get(key), (self, conn)
        try:
            yield
        finally:
            if before is None:
                del lent[key]
            else:
                lent[key] = before

    def _lending_key(self) -> object:
        """The database a lent transaction writes: its file, or this in-memory one."""
        return self if self.in_memory else os.path.realpath(self.path)

    def savepoint(self, conn: sqlite3.Connection) -> Savepoint:
        """``with database.savepoint(conn)``, inside a write transaction on ``conn``: what
        the block writes is undone alone if it raises (group commit: one append)."""
        return Savepoint(self, conn)

    def forget_tables(self, changed: list[str]) -> None:
        """Tables created or altered in a transaction that failed are undone: forget them
        before the lock is released, so the next writer makes them again."""
        self._ready_tables.difference_update(changed)

    def store_error(self, error: sqlite3.Error) -> StoreError:
        """A driver error as callers see it, naming the file, and the wait when the write
        lock was the cause."""
        hint = ""
        if "locked" in str(error) or "busy" in str(error):
            hint = f" (another connection holds the lock; writers wait up to {self.timeout} s)"
        return StoreError(f"SQLite failed on {self.path!r}: {error}{hint}")

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Driver errors become StoreError, chained."""
        try:
            yield
        except sqlite3.Error as error:
            raise self.store_error(error) from error

    def close(self) -> None:
        """Closed for every thread. Another live thread's connection is closed by that
        thread at its next use, or when it ends: it may be running a statement on it
        now, and closing a connection under a running statement crashes the process."""
        me = threading.current_thread()  # its connections run nothing now
        with self._lock:
            self.closed = True
            for thread, conn in self._connections:
                if (owner := thread()) is None or owner is me or not owner.is_alive():
                    conn.close()
            self._connections = []
            if self._shared is not None:
                self._shared.close()
        self._drop_own()

    def _drop_own(self) -> None:  # this thread's connections, once the store is closed
        for name in _SLOTS.values():
            conn = getattr(self._local, name, None)
            setattr(self._local, name, None)
            if conn is not None and conn is not self._shared:
                conn.close()

    # -- schema -------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Create or migrate the event tables (:mod:`incident.stores.sqlite.migrations`);
        returns one line per step taken. Stores call it while ``schema_ready`` is false."""
        with self.errors():
            with self.guard:
                if schema_version(self.conn()) == SCHEMA_VERSION:
                    self.schema_ready = True
                    return []
            with self.transaction() as conn:  # two processes initializing take turns
                lines = upgrade(conn, self.path)
        self.schema_ready = True
        return lines

    # -- projection tables ------------------------------------------------------

    def table(self, projection_type: type[Projection]) -> ProjectionTable:
        table = self._tables.get(projection_type)
        if table is not None:
            return table
        spec, took_over = self._table_owners.claim(projection_type)
        table = ProjectionTable(spec)
        with self._lock:
            if took_over:
                # a class redefined (in a notebook, say) may have new fields: check again
                self._ready_tables.discard(table.name)
            self._tables[projection_type] = table
        return table

    def ensure_table(self, conn: sqlite3.Connection, table: ProjectionTable) -> None:
        """Inside a write transaction: create or migrate the table once per process."""
        if table.name not in self._ready_tables:
            if table.ensure(conn):
                self._local.changed_tables.append(table.name)
            self._ready_tables.add(table.name)

    def table_ready(self, table: ProjectionTable) -> bool:
        """Whether this process made or checked the table already (no DDL to run)."""
        return table.name in self._ready_tables

    def ready(self, table: ProjectionTable) -> None:
        """Outside a transaction: make sure the table exists before reading it."""
        if table.name not in self._ready_tables:
            with self.transaction() as conn:
                self.ensure_table(conn, table)


class WriteTransaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception. A class rather than a
    generator-based context manager: every append opens one. Unlike Postgres, a commit
    here cannot succeed unseen: it runs in this process, returns or raises, and one that
    raised is rolled back before the error leaves, so no append needs looking up."""

    __slots__ = ("_changed", "_conn", "_db")

    def __init__(self, db: Database) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        db = self._db
        db.guard.__enter__()
        try:
            conn = db.write_conn()
            begin_immediate(conn, db.timeout, db.lock_poll)
        except BaseException:
            db.guard.__exit__(None, None, None)
            raise
        self._conn = conn
        self._changed = db._local.changed_tables = []
        return conn

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                try:
                    self._conn.execute("COMMIT")
                    return
                except BaseException:
                    self._roll_back()
                    raise
            self._roll_back()
        finally:
            self._db.guard.__exit__(None, None, None)

    def _roll_back(self) -> None:
        self._db.forget_tables(self._changed)
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._db._discard(self._conn)  # unusable now: the next use reconnects


class LentTransaction:
    """A transaction opened inside ``Database.lend``: a savepoint in the lent one, whose
    writes commit with it (or are undone alone if the block raises). Opened through
    another Database on the same file (``own`` false), the tables it made are forgotten
    by that one at the end: the lender's transaction may still roll them back, so the
    next writer checks them again."""

    __slots__ = ("_conn", "_db", "_own", "_savepoint")

    def __init__(self, db: Database, conn: sqlite3.Connection, *, own: bool) -> None:
        self._db, self._conn, self._own = db, conn, own
        self._savepoint = Savepoint(db, conn)

    def __enter__(self) -> sqlite3.Connection:
        if not self._own:
            if self._db.closed:
                raise StoreError(f"The SQLite store {self._db.path!r} is closed")
            self._db._local.changed_tables = []
        self._savepoint.__enter__()
        return self._conn

    def __exit__(self, kind: type[BaseException] | None, *rest: Any) -> None:
        try:
            self._savepoint.__exit__(kind, *rest)
        finally:
            if not self._own:
                self._db.forget_tables(self._db._local.changed_tables)


class Savepoint:
    """SAVEPOINT ... RELEASE inside a WriteTransaction, or on an exception ROLLBACK TO
    and RELEASE, which undoes the block's writes alone and forgets the projection tables
    it made (they are gone with it, so the next writer makes them again). When the
    savepoint cannot be closed, the whole transaction is rolled back (if it can be)
    rather than left holding writes whose caller is told they failed. ``closed`` says
    whether the block ended cleanly, kept or undone; when it is false the transaction
    must not commit (SQLite may also have rolled it all back by itself: a full disk)."""

    __slots__ = ("_conn", "_db", "_mark", "closed")

    def __init__(self, db: Database, conn: sqlite3.Connection) -> None:
        self._db = db
        self._conn = conn
        self.closed = False

    def __enter__(self) -> None:
        self._conn.execute("SAVEPOINT incident_append")
        self._mark = len(self._db._local.changed_tables)

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        conn = self._conn
        try:
            if kind is None:
                conn.execute("RELEASE incident_append")
                self.closed = True
                return
            changed = self._db._local.changed_tables
            self._db.forget_tables(changed[self._mark :])
            del changed[self._mark :]
            if not conn.in_transaction:
                return  # SQLite rolled the whole transaction back itself
            conn.execute("ROLLBACK TO incident_append")
            conn.execute("RELEASE incident_append")
            self.closed = True
        except BaseException:
            if conn.in_transaction:
                # should this fail too, the transaction's own rollback tries again
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
