"""SQLite stores: the embedded default, safe for several threads and several processes.

``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, or ``sqlite://`` for a
private in-memory database (one connection shared by the threads of this process).

How it stays correct:

- Every write opens with ``BEGIN IMMEDIATE``, which takes SQLite's single write lock at
  once; a racing writer waits for it (the busy timeout, 30 s by default) and then finds
  the stream moved on, so it gets a clean ConcurrencyError, never "database is locked".
  ``UNIQUE (aggregate_id, version)`` backs the check up inside the database.
- Positions are assigned inside that lock, so they are gapless and in commit order.
- When the projection store is the same file, a command's events and the projections its
  inline handlers return are written in the same transaction: one commit, one fsync.
- Each thread gets its own connection, so readers never wait for each other (WAL).

Durability: the file is in WAL mode with ``synchronous=FULL`` by default, so a command
that returned is on disk even if the machine loses power right after. ``synchronous=
"NORMAL"`` (``open_event_store(url, synchronous="NORMAL")`` or ``?synchronous=normal``
in the URL) skips the fsync at each commit and syncs at checkpoints instead: commits get
several times cheaper and the database can never be corrupted, but a power cut (not a
crash of the process) may lose the last transactions that had returned. See
``docs/sqlite.md``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from .._forks import renew_in_forked_children
from ..codec import EventTypes
from ..errors import (
    ConcurrencyError,
    CorruptEvent,
    DuplicateCommand,
    IncidentError,
    StoreError,
)
from ..messages import Event, Projection, Recorded
from ..storable import keepable_id
from ._common import (
    OWED_COLUMNS,
    AppendVerbs,
    ChainedBatches,
    check_expected_version,
    check_positions,
    check_versions,
    checked_events,
    effects_of,
    event_json,
    metadata_json,
    owed_from_row,
    projection_key,
    stamp,
)
from ._sqlite_projections import ProjectionTable, _quote
from .protocols import Outcome, Owed, ProjectFn, ProjectionStore
from .tables import TableOwners

if TYPE_CHECKING:
    from .sqlite_checkpoints import SQLiteCheckpointStore

log = logging.getLogger("incident.stores.sqlite")

__all__ = ["SQLiteEventStore", "SQLiteProjectionStore", "open_sqlite", "sqlite_path"]

P = TypeVar("P", bound=Projection)

MEMORY = ":memory:"
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
BATCH = 1000  # rows per query when streaming; bounds memory whatever the log's size
EVENTS_BATCH = 4096  # rows fetched and decoded at a time when folding a stream

_EVENTS_TABLE = textwrap.dedent("""\
    CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        aggregate TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        schema_version INTEGER NOT NULL DEFAULT 1,
        event_date TEXT NOT NULL,
        data TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        UNIQUE (aggregate_id, version)
    )""")
# as schema 2 made it; schema 4 adds the outcome of a rejected command
_IDEMPOTENCY_TABLE_2 = textwrap.dedent("""\
    CREATE TABLE incident_idempotency (
        key TEXT PRIMARY KEY,
        first_position INTEGER NOT NULL,
        last_position INTEGER NOT NULL
    )""")
# a rejected command stored no events: its row keeps the reason, and positions 0, 0
_IDEMPOTENCY_TABLE = textwrap.dedent("""\
    CREATE TABLE incident_idempotency (
        key TEXT PRIMARY KEY,
        first_position INTEGER NOT NULL,
        last_position INTEGER NOT NULL,
        rejected TEXT,
        detail TEXT
    )""")
_OWED_TABLE = textwrap.dedent("""\
    CREATE TABLE incident_owed (
        handler TEXT NOT NULL,
        position INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        error TEXT,
        attempts INTEGER NOT NULL,
        owed_at TEXT NOT NULL,
        PRIMARY KEY (handler, position)
    )""")
_EVENT_COLUMNS = (
    "position, event_id, aggregate_id, aggregate, version, event_type, schema_version, "
    "event_date, data, metadata"
)


ANNOUNCED_REBUILD = 100_000  # events: a copy long enough to wonder about says so first


def _rebuild_events(conn: sqlite3.Connection) -> str:
    """Copy the log into the layout of version 3, whose only index is the streams' one.

    Every index is a page written at each commit; the log is read by position (the
    primary key) and streams by ``UNIQUE (aggregate_id, version)``, so the unique index
    on event_id (ids are random UUIDs, made by incident) and events_by_type (no incident
    query reads by type) cost commits and served nothing. SQLite cannot drop a UNIQUE
    constraint in place, so the table is copied, inside the migration's transaction:
    it is rebuilt whole or not at all. Indexes and triggers users added are kept."""
    (events,) = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
    if events >= ANNOUNCED_REBUILD:
        log.warning(
            "incident: migrating the SQLite event log to schema version 3 copies its %d "
            "events once (about 10 s per million); the file stays as it was until it is done",
            events,
        )
    kept = [
        sql
        for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'events' "
            "AND type IN ('index', 'trigger') AND sql IS NOT NULL AND name != 'events_by_type'"
        )
    ]
    conn.execute(_EVENTS_TABLE.replace("CREATE TABLE events", "CREATE TABLE incident_events_v3"))
    copied = conn.execute(
        f"INSERT INTO incident_events_v3 ({_EVENT_COLUMNS}) "
        f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY position"
    ).rowcount
    conn.execute("DROP TABLE events")
    # legacy rename: users' views that read events would otherwise fail the renaming,
    # since SQLite checks the whole schema while the old table is gone
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        conn.execute("ALTER TABLE incident_events_v3 RENAME TO events")
    finally:
        conn.execute("PRAGMA legacy_alter_table = OFF")
    for sql in kept:
        conn.execute(sql)
    return f"rebuilt table events with one index instead of three ({copied} events copied)"


# A fresh file gets the current layout at once, recorded as SCHEMA_VERSION.
LAYOUT: list[tuple[str, str]] = [
    ("created table events", _EVENTS_TABLE),
    ("created table incident_idempotency", _IDEMPOTENCY_TABLE),
    ("created table incident_owed", _OWED_TABLE),
]
# A file made by an earlier release takes the steps after its version, in order: a step
# is (what it does, a statement), or a function of the connection that says what it
# did. A later release changes LAYOUT and appends the step that brings older files to it.
Step = tuple[str, str] | Callable[[sqlite3.Connection], str]
MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (1, "the event log", []),  # the first release's layout: no older file to bring to it
    (2, "idempotency keys", [("created table incident_idempotency", _IDEMPOTENCY_TABLE_2)]),
    (3, "one index on events", [_rebuild_events]),
    (
        4,
        "remembered rejections and owed follow-ups",
        [
            (
                "added column incident_idempotency.rejected",
                "ALTER TABLE incident_idempotency ADD COLUMN rejected TEXT",
            ),
            (
                "added column incident_idempotency.detail",
                "ALTER TABLE incident_idempotency ADD COLUMN detail TEXT",
            ),
            ("created table incident_owed", _OWED_TABLE),
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# the columns of an envelope, cheapest first; a stream's reader knows its aggregate_id
_ENVELOPE = (
    "position, version, event_type, data, event_id, event_date, metadata, aggregate, schema_version"
)
_INSERT = f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = ?"
# inside the write lock: the stream's version and the log's last position, in one step
_HEAD = f"SELECT ({_VERSION}), (SELECT coalesce(max(position), 0) FROM events)"
_STREAM = f"SELECT {_ENVELOPE} FROM events WHERE aggregate_id = ? AND version > ? ORDER BY version"
# One batch of a stream's payloads for a fold, joined by commas in SQL (one Python string
# instead of one per row), with what proves the batch whole: how many rows there are and
# the last version (gapless exactly when it is the batch's ``after`` + that count), how
# many are at the first schema version and open with their row's type as the tag
# ({"type":"<event_type>"...), as an encoded event does, and whether the stream goes on
# past the batch (an empty batch before more rows is a hole, not the end). A batch short
# of any of these goes down the row-by-row path, which upcasts and names the damage. The
# WHERE pins the scan to the UNIQUE (aggregate_id, version) index, which SQLite walks in
# version order and feeds to the aggregate in that order (tests/test_sqlite.py checks it).
_TAG_AT = len(f'{{"{Event.__struct_config__.tag_field}":"') + 1
_JOINED = (
    "SELECT group_concat(data, ','), count(*), max(version), "
    "sum(schema_version = 1 AND instr(data, event_type || '\"') = ?1), "
    "EXISTS (SELECT 1 FROM events WHERE aggregate_id = ?2 AND version > ?4) "
    "FROM events WHERE aggregate_id = ?2 AND version > ?3 AND version <= ?4"
)
_PAYLOADS = (
    "SELECT position, version, event_type, data, schema_version FROM events "
    "WHERE aggregate_id = ? AND version > ? ORDER BY version LIMIT ?"
)
_LOG = f"SELECT {_ENVELOPE}, aggregate_id FROM events WHERE position > ? ORDER BY position LIMIT ?"
_BETWEEN = f"SELECT {_ENVELOPE}, aggregate_id FROM events WHERE position BETWEEN ? AND ?"
_KEY = (
    "SELECT first_position, last_position, rejected, detail FROM incident_idempotency WHERE key = ?"
)
_ADD_KEY = "INSERT INTO incident_idempotency (key, first_position, last_position) VALUES (?, ?, ?)"
_ADD_REJECTION = (
    "INSERT OR IGNORE INTO incident_idempotency (key, first_position, last_position, rejected,"
    " detail) VALUES (?, 0, 0, ?, ?)"
)
_OWE = f"INSERT OR REPLACE INTO incident_owed ({OWED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_OWED = f"SELECT {OWED_COLUMNS} FROM incident_owed ORDER BY position, handler"
_OWED_BY = f"SELECT {OWED_COLUMNS} FROM incident_owed WHERE handler = ? ORDER BY position"
_SETTLE = "DELETE FROM incident_owed WHERE handler = ? AND position = ?"
_metadata_decoder = msgspec.json.Decoder(dict[str, Any])


def sqlite_path(url: str) -> str:
    """The file a ``sqlite://`` URL names (``:memory:`` for ``sqlite://``).

    >>> sqlite_path("sqlite:///bank.db"), sqlite_path("sqlite:////var/lib/bank.db")
    ('bank.db', '/var/lib/bank.db')
    >>> sqlite_path("sqlite://")
    ':memory:'
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite" or parts.netloc:
        raise IncidentError(
            f"Not an SQLite URL: {url!r}; expected sqlite:///relative.db, "
            "sqlite:////absolute/path.db or sqlite:// (in memory)"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return path or MEMORY


def _date_text(when: dt.datetime) -> str:
    # fixed width, so the text sorts like the instant it names
    if when.tzinfo is not dt.UTC:
        when = when.astimezone(dt.UTC)
    return when.isoformat(timespec="microseconds")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class _Database:
    """One SQLite file (or in-memory database): connections, transactions, the schema,
    and the projection tables known to exist. Shared by an event store and its
    projection store."""

    def __init__(self, path: str, *, synchronous: str = "FULL", timeout: float = 30.0) -> None:
        self.path = path
        self.synchronous = synchronous
        self.timeout = timeout
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

    def same_as(self, other: _Database) -> bool:
        if other is self:
            return True
        if self.in_memory or other.in_memory:
            return False
        return os.path.realpath(self.path) == os.path.realpath(other.path)

    # -- connections and transactions -----------------------------------------

    def _connect(self) -> sqlite3.Connection:
        with self.errors():
            # isolation_level=None: no implicit transactions, we BEGIN IMMEDIATE ourselves
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
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

    def _thread_connection(self) -> sqlite3.Connection:
        conn = self._connect()
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
        self._local.conn = conn
        return conn

    def _discard(self, conn: sqlite3.Connection) -> None:
        if conn is self._shared:
            return  # an in-memory database cannot be reopened; SQLite rolls it back itself
        self._local.conn = None
        with self._lock:
            self._connections = [(t, c) for t, c in self._connections if c is not conn]
        conn.close()

    def conn(self) -> sqlite3.Connection:
        """This thread's connection; use it inside ``with self.guard``."""
        if self.closed:
            raise StoreError(f"The SQLite store {self.path!r} is closed")
        if self._shared is not None:
            return self._shared
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        return conn if conn is not None else self._thread_connection()

    def transaction(self) -> _WriteTransaction:
        """``with database.transaction() as conn``: a write transaction holding SQLite's
        write lock from its first statement, committed at the end or rolled back."""
        return _WriteTransaction(self)

    def forget_tables(self, changed: list[str]) -> None:
        """Tables created or altered in a transaction that failed are undone: forget them
        before the lock is released, so the next writer makes them again."""
        self._ready_tables.difference_update(changed)

    def store_error(self, error: sqlite3.Error) -> StoreError:
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
        with self._lock:
            self.closed = True
            for _, conn in self._connections:
                conn.close()
            self._connections.clear()
            if self._shared is not None:
                self._shared.close()

    # -- schema -------------------------------------------------------------------

    def schema_version(self, conn: sqlite3.Connection) -> int | None:
        """The recorded layout version, or None when the file has no incident tables."""
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'incident_schema'"
        ).fetchone()
        if exists is None:
            return None
        version: int = conn.execute(
            "SELECT coalesce(max(version), 0) FROM incident_schema"
        ).fetchone()[0]
        return version

    def migrate(self) -> list[str]:
        """Create or migrate the event tables; returns one line per step taken."""
        with self.errors():
            with self.guard:
                if self.schema_version(self.conn()) == SCHEMA_VERSION:
                    self.schema_ready = True
                    return []
            lines: list[str] = []
            with self.transaction() as conn:  # two processes initializing take turns
                current = self.schema_version(conn)
                if current is not None and current > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path!r} has schema version {current}, but this incident knows "
                        f"versions up to {SCHEMA_VERSION}; upgrade incident to use it"
                    )
                if current is None:
                    lines += self._create_layout(conn)
                else:
                    lines += self._migrate_from(conn, current)
        self.schema_ready = True
        return lines

    def _create_layout(self, conn: sqlite3.Connection) -> list[str]:
        conn.execute(
            "CREATE TABLE incident_schema (version INTEGER PRIMARY KEY, "
            "description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        lines = ["created table incident_schema"]
        for line, statement in LAYOUT:
            conn.execute(statement)
            lines.append(line)
        return [*lines, self._record(conn, SCHEMA_VERSION, "the event log")]

    def _migrate_from(self, conn: sqlite3.Connection, current: int) -> list[str]:
        lines = []
        for version, description, steps in MIGRATIONS:
            if version <= current:
                continue
            for step in steps:
                if callable(step):
                    lines.append(step(conn))
                else:
                    line, statement = step
                    conn.execute(statement)
                    lines.append(line)
            lines.append(self._record(conn, version, description))
        return lines

    def _record(self, conn: sqlite3.Connection, version: int, description: str) -> str:
        conn.execute(
            "INSERT INTO incident_schema VALUES (?, ?, ?)",
            (version, description, _date_text(dt.datetime.now(dt.UTC))),
        )
        return f"recorded schema version {version} ({description})"

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

    def ready(self, table: ProjectionTable) -> None:
        """Outside a transaction: make sure the table exists before reading it."""
        if table.name not in self._ready_tables:
            with self.transaction() as conn:
                self.ensure_table(conn, table)

    def write_projections(
        self, conn: sqlite3.Connection, projections: Sequence[Projection]
    ) -> None:
        """Upsert inside the caller's transaction; everything is encoded before any write."""
        if len(projections) == 1:  # what a command's inline handler usually returns
            table = self.table(type(projections[0]))
            row = table.row(projections[0])
            self.ensure_table(conn, table)
            conn.execute(table.upsert_sql, row)
            return
        tables = [self.table(type(p)) for p in projections]
        rows = [table.row(p) for table, p in zip(tables, projections, strict=True)]
        for table, row in zip(tables, rows, strict=True):
            self.ensure_table(conn, table)
            conn.execute(table.upsert_sql, row)


class _WriteTransaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception. A class rather than a
    generator-based context manager: every append opens one. Unlike Postgres, a commit
    here cannot succeed unseen: it runs in this process, returns or raises, and one that
    raised is rolled back before the error leaves, so no append needs looking up."""

    __slots__ = ("_changed", "_conn", "_db")

    def __init__(self, db: _Database) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        db = self._db
        db.guard.__enter__()
        try:
            conn = db.conn()
            conn.execute("BEGIN IMMEDIATE")
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


class SQLiteProjectionStore:
    """Read models in an SQLite file: one table per Projection type (see
    :mod:`incident.stores._sqlite_projections`)."""

    def __init__(self, database: _Database) -> None:
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
        table = self._db.table(projection_type)
        rows = [table.row(p) for p in projections]
        with self._db.errors(), self._db.transaction() as conn:
            self._db.ensure_table(conn, table)
            conn.execute(f"DELETE FROM {_quote(table.name)}")
            conn.executemany(table.upsert_sql, rows)
        return len(rows)

    def get(self, projection_type: type[P], key: str) -> P | None:
        if not keepable_id(key):
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
                rows = self._db.conn().execute(f"{table.select_sql} ORDER BY rowid").fetchall()
        return [table.decode(row) for row in rows]

    def close(self) -> None:
        """Closes the database, which the event store it came from shares."""
        self._db.close()


class SQLiteEventStore(AppendVerbs):
    """An event log in an SQLite file. ``projections()`` is a projection store in the same
    file; ``append_and_project`` then commits events and projections together."""

    def __init__(self, database: _Database, *, types: EventTypes | None = None) -> None:
        self.types = types or EventTypes()
        self._db = database
        self._projections: SQLiteProjectionStore | None = None

    def __repr__(self) -> str:
        return f"SQLiteEventStore({self._db.path!r})"

    @property
    def path(self) -> str:
        return self._db.path

    # -- writing ------------------------------------------------------------------

    def _append(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        expected_version: object,
        aggregate: str | None,
        metadata: Mapping[str, Any] | None,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
        idempotency_key: str | None = None,
    ) -> list[Recorded[Any]]:
        batch = checked_events(aggregate_id, events)
        # encode before taking the lock: a bad event or metadata fails with nothing written
        payloads = [(event_json(e)[0], type(e).schema_version) for e in batch]
        metadata_text = metadata_json(metadata)
        together = projection_store is not None and self.shares_database_with(projection_store)
        projections: Sequence[Projection] = ()
        if not self._db.schema_ready:
            self._db.migrate()
        try:
            try:
                with self._db.transaction() as conn:
                    if idempotency_key is not None:
                        earlier = self._outcome(conn, idempotency_key)
                        if earlier is not None:
                            raise DuplicateCommand(idempotency_key, *earlier)
                    actual, last = conn.execute(_HEAD, (aggregate_id,)).fetchone()
                    check_expected_version(aggregate_id, expected_version, actual)
                    if not batch:
                        return []
                    recorded = stamp(
                        aggregate_id,
                        aggregate,
                        batch,
                        first_position=last + 1,
                        first_version=actual + 1,
                        metadata=metadata,
                    )
                    date = _date_text(recorded[0].event_date)
                    conn.executemany(
                        _INSERT,
                        [
                            (
                                r.position,
                                r.event_id,
                                r.aggregate_id,
                                r.aggregate,
                                r.version,
                                r.event_type,
                                schema_version,
                                date,
                                data,
                                metadata_text,
                            )
                            for r, (data, schema_version) in zip(recorded, payloads, strict=True)
                        ],
                    )
                    if idempotency_key is not None:
                        keyed = (idempotency_key, recorded[0].position, recorded[-1].position)
                        conn.execute(_ADD_KEY, keyed)
                    if project is not None:
                        projections, owed = effects_of(project, recorded)
                        if together:
                            self._db.write_projections(conn, projections)
                        if owed:  # in this file whatever the projection store: with the events
                            conn.executemany(_OWE, [_owed_row(o) for o in owed])
            except sqlite3.IntegrityError as error:
                if "events.aggregate_id, events.version" not in str(error):
                    raise
                # only a writer that skipped BEGIN IMMEDIATE could get here; same meaning
                raise ConcurrencyError(
                    aggregate_id, expected_version, self.version(aggregate_id)
                ) from error
        except sqlite3.Error as error:  # what errors() does, without a context per append
            raise self._db.store_error(error) from error
        if projection_store is not None and not together:
            # another database: the events are committed, the projections follow
            for projection in projections:
                projection_store.project(projection)
        return recorded

    def _outcome(self, conn: sqlite3.Connection, key: str) -> Outcome | None:
        found = conn.execute(_KEY, (key,)).fetchone()
        if found is None:
            return None
        first, last, rejected, detail = found
        if rejected is not None:
            return Outcome([], rejected, detail)
        return Outcome(self._decode(conn.execute(_BETWEEN, (first, last)).fetchall(), None))

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        found: Outcome | None = self._read(lambda conn: self._outcome(conn, idempotency_key))
        return found

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        with self._db.errors(), self._db.transaction() as conn:
            conn.execute(_ADD_REJECTION, (idempotency_key, reason, detail))
            stored = self._outcome(conn, idempotency_key)
        assert stored is not None  # inserted, or there already
        return stored

    def owed(self, handler: str | None = None) -> list[Owed]:
        rows = self._rows(_OWED, ()) if handler is None else self._rows(_OWED_BY, (handler,))
        return [owed_from_row(row) for row in rows]

    def owe(self, owed: Owed) -> None:
        self._write(_OWE, _owed_row(owed))

    def settle(self, handler: str, position: int) -> None:
        self._write(_SETTLE, (handler, position))

    def _write(self, statement: str, params: tuple[Any, ...]) -> None:
        if not self._db.schema_ready:
            self._db.migrate()
        with self._db.errors(), self._db.transaction() as conn:
            conn.execute(statement, params)

    def _read(self, read: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        with db.errors(), db.guard:
            return read(db.conn())

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return writes_into(self._db, projection_store)

    # -- reading ------------------------------------------------------------------

    def _decode(self, rows: list[tuple[Any, ...]], aggregate_id: str | None) -> list[Recorded[Any]]:
        """Rows (``_ENVELOPE`` columns, without aggregate_id when reading one stream) back
        as envelopes. This is the hot loop of every load, hence the local caches: events of
        one append share their date and metadata text, and a stream few event types."""
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}
        metadata_cache: dict[str, dict[str, Any]] = {}
        last_date, event_date = "", _EPOCH
        recorded = []
        for row in rows:
            position, version, event_type, data, event_id, date, meta, aggregate, schema = row[:9]
            stream = aggregate_id if aggregate_id is not None else row[9]
            try:
                event = self._payload(decoders, event_type, data, schema, position, stream)
                if date != last_date:
                    last_date, event_date = date, dt.datetime.fromisoformat(date)
                metadata = metadata_cache.get(meta)
                if metadata is None:
                    metadata = metadata_cache[meta] = _metadata_decoder.decode(meta)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                raise CorruptEvent(
                    position, stream, str(error), version=version, event_type=event_type
                ) from error
            except (ValueError, TypeError) as error:
                raise CorruptEvent(
                    position,
                    stream,
                    f"bad envelope: {error}",
                    version=version,
                    event_type=event_type,
                ) from error
            recorded.append(
                Recorded(
                    position=position,
                    event_id=event_id,
                    aggregate_id=stream,
                    aggregate=aggregate,
                    version=version,
                    event_type=event_type,
                    event_date=event_date,
                    data=event,
                    metadata=metadata.copy(),  # each envelope owns its dict, as on append
                )
            )
        return recorded

    def _payload(
        self,
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]],
        event_type: str,
        data: str,
        schema: int,
        position: int,
        aggregate_id: str,
    ) -> Event:
        """One stored payload as an event: straight through the reused decoder, or, when
        older code stored it, through the aggregate's upcasters."""
        known = decoders.get(event_type)
        if known is None:
            known = decoders[event_type] = self._decoder(event_type, position, aggregate_id)
        decoder, current = known
        if schema == current:
            event: Event = decoder.decode(data)
            return event
        return self.types.decode(
            event_type, data, position=position, aggregate_id=aggregate_id, schema_version=schema
        )

    def _decoder(
        self, event_type: str, position: int, aggregate_id: str
    ) -> tuple[msgspec.json.Decoder[Any], int]:
        """The reusable decoder for a stored type and the schema version it reads directly."""
        decoder = self.types.decoder(event_type, position=position, aggregate_id=aggregate_id)
        resolved = self.types.resolve(event_type)
        return decoder, resolved.schema_version if resolved is not None else 1

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        try:
            with db.guard:
                rows: list[tuple[Any, ...]] = db.conn().execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise db.store_error(error) from error
        return rows

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream in version order, read in one snapshot."""
        if not keepable_id(aggregate_id):
            return []
        rows = self._rows(_STREAM, (aggregate_id, after))
        check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        return self._decode(rows, aggregate_id)

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes, in version order and in batches:
        all a fold needs (``aggregate.fold(store.events(id))``), at close to the cost of
        raw SQL and in constant memory (full envelopes cost two to three times as much).
        Versions are gapless, so each batch must end at its start + its number of events,
        and each payload's tag must agree with its row's type name; a hole or a mismatch
        is a CorruptEvent.

        One query per ``EVENTS_BATCH`` versions hands back the batch's payloads joined in
        SQL, decoded in one call by the registered types' union decoder
        (``EventTypes.decode_joined``). A batch it stands aside for (a type not
        registered, a damaged payload, a schema version other than the first) is read
        again with the type names and decoded row by row, upcasting where needed and
        naming the position of whatever is wrong.
        """
        if not keepable_id(aggregate_id):
            return iter(())
        # chained lists: the caller's loop steps through each batch at C speed
        return ChainedBatches.of(self._event_batches(aggregate_id, after))

    def _event_batches(self, aggregate_id: str, after: int) -> Generator[list[Event], None, None]:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}
        with db.guard:
            try:
                conn = db.conn()
                while True:
                    window = (_TAG_AT, aggregate_id, after, after + EVENTS_BATCH)
                    joined, count, last, tagged, more = conn.execute(_JOINED, window).fetchone()
                    events = None
                    if count and last == after + count and tagged == count:
                        events = self.types.decode_joined(joined, count)
                    elif not count and not more:
                        return  # the stream's end
                    if events is None:
                        again = conn.execute(_PAYLOADS, (aggregate_id, after, EVENTS_BATCH))
                        events, damage = self._checked(
                            again.fetchall(), aggregate_id, after, decoders
                        )
                        # a fold that stops short of the damage (a subscription's, up to
                        # one event) gets the events before it first
                        yield events
                        if damage is not None:
                            raise damage
                    else:
                        yield events
                    if not more or not events:  # the end (or rows deleted as we read)
                        return
                    after += len(events)
            except sqlite3.Error as error:
                raise db.store_error(error) from error

    def _checked(
        self,
        rows: list[tuple[Any, ...]],
        aggregate_id: str,
        after: int,
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]],
    ) -> tuple[list[Event], CorruptEvent | None]:
        """``_PAYLOADS`` rows decoded one by one up to the first hole in their versions or
        the first that cannot be read, and the CorruptEvent for it."""
        try:
            check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        except CorruptEvent as hole:
            assert hole.version is not None
            events, bad = self._one_by_one(rows[: hole.version - after - 1], aggregate_id, decoders)
            return events, bad or hole
        return self._one_by_one(rows, aggregate_id, decoders)

    def _one_by_one(
        self,
        rows: list[tuple[Any, ...]],
        aggregate_id: str,
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]],
    ) -> tuple[list[Event], CorruptEvent | None]:
        """The rows' events up to the first that cannot be read, and why it cannot."""
        batch = []
        for position, version, event_type, data, schema in rows:
            try:
                batch.append(
                    self._payload(decoders, event_type, data, schema, position, aggregate_id)
                )
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                damage = CorruptEvent(
                    position, aggregate_id, str(error), version=version, event_type=event_type
                )
                damage.__cause__ = error
                return batch, damage
            except CorruptEvent as damage:
                return batch, damage
        return batch, None

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches: fold a stream of any length
        (``aggregate.fold(store.stream(id))``) without holding it in memory."""
        if not keepable_id(aggregate_id):
            return
        while True:
            rows = self._rows(f"{_STREAM} LIMIT {BATCH}", (aggregate_id, after))
            check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
            yield from self._decode(rows, aggregate_id)
            if len(rows) < BATCH:
                return
            after = rows[-1][1]

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log in position order, fetched in batches as it is consumed."""
        remaining = limit
        while remaining is None or remaining > 0:
            size = BATCH if remaining is None else min(BATCH, remaining)
            rows = self._rows(_LOG, (after, size))
            check_positions(after, [r[0] for r in rows])
            yield from self._decode(rows, None)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def version(self, aggregate_id: str) -> int:
        if not keepable_id(aggregate_id):
            return 0
        version: int = self._rows(_VERSION, (aggregate_id,))[0][0]
        return version

    # -- the database ----------------------------------------------------------

    def projections(self) -> SQLiteProjectionStore:
        if self._projections is None:
            self._projections = SQLiteProjectionStore(self._db)
        return self._projections

    def checkpoints(self) -> SQLiteCheckpointStore:
        """Subscription checkpoints in this file (beside the projections: one commit)."""
        from .sqlite_checkpoints import SQLiteCheckpointStore

        return SQLiteCheckpointStore(self._db)

    def last_position(self) -> int:
        position: int = self._rows("SELECT coalesce(max(position), 0) FROM events", ())[0][0]
        return position

    def initialize(self) -> list[str]:
        """Create or migrate the tables; returns what was done (nothing the second time).

        >>> store = open_sqlite("sqlite://")
        >>> for line in store.initialize():
        ...     print(line)
        created table incident_schema
        created table events
        created table incident_idempotency
        created table incident_owed
        recorded schema version 4 (the event log)
        >>> store.initialize()
        []
        """
        return self._db.migrate()

    def close(self) -> None:
        """Close the database (its projection store shares it)."""
        self._db.close()


def _owed_row(owed: Owed) -> tuple[Any, ...]:
    return (
        owed.handler,
        owed.position,
        owed.event_id,
        owed.aggregate_id,
        owed.event_type,
        owed.error,
        owed.attempts,
        _date_text(owed.owed_at),
    )


def writes_into(database: _Database, projection_store: ProjectionStore) -> bool:
    """Whether a transaction on ``database`` can write ``projection_store``'s tables: an
    SQLite projection store on the same file (or the same in-memory database)."""
    return isinstance(projection_store, SQLiteProjectionStore) and database.same_as(
        projection_store._db
    )


def open_sqlite(url: str, **options: Any) -> SQLiteEventStore:
    """Open ``sqlite:///path.db`` (created on first use) or ``sqlite://`` (in memory).

    Options, as keywords or in the URL's query string (keywords win): ``synchronous``
    (``FULL`` by default; ``NORMAL`` trades the last commits on power loss for speed)
    and ``timeout`` (seconds a writer waits for the write lock, 30 by default).

    >>> open_sqlite("sqlite://?synchronous=normal")
    SQLiteEventStore(':memory:')
    """
    path = sqlite_path(url.split("?", 1)[0])
    settings: dict[str, Any] = dict(parse_qsl(urlsplit(url).query))
    settings.update(options)
    unknown = set(settings) - {"synchronous", "timeout", "types"}
    if unknown:
        raise IncidentError(
            f"Unknown SQLite store options {sorted(unknown)}; known: synchronous, timeout, types"
        )
    synchronous = str(settings.get("synchronous", "FULL")).upper()
    if synchronous not in SYNCHRONOUS:
        raise IncidentError(
            f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {settings['synchronous']!r}"
        )
    try:
        timeout = float(settings.get("timeout", 30.0))
    except ValueError as error:
        raise IncidentError(f"timeout must be a number of seconds: {error}") from error
    types = settings.get("types")
    if types is not None and not isinstance(types, EventTypes):
        raise IncidentError(f"types must be an incident.EventTypes, got {types!r}")
    database = _Database(path, synchronous=synchronous, timeout=timeout)
    return SQLiteEventStore(database, types=types)
