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
import functools
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import msgspec

from ..codec import EventTypes, encode
from ..errors import ConcurrencyError, CorruptEvent, IncidentError, StoreError
from ..messages import Event, Projection, Recorded
from ._common import check_expected_version, checked_events, stamp
from ._sqlite_projections import ProjectionTable
from .protocols import ProjectFn, ProjectionStore

__all__ = ["SQLiteEventStore", "SQLiteProjectionStore", "open_sqlite", "sqlite_path"]

P = TypeVar("P", bound=Projection)

MEMORY = ":memory:"
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
BATCH = 1000  # rows per query when streaming; bounds memory whatever the log's size
EVENTS_BATCH = 4096  # payloads decoded per call when folding a stream

# The layout, one entry per schema version: (version, what it is, [(line, statement)]).
# A later release appends entries; initialize() applies the ones a file lacks.
MIGRATIONS: list[tuple[int, str, list[tuple[str, str]]]] = [
    (
        1,
        "the event log",
        [
            (
                "created table events",
                """CREATE TABLE events (
                    position INTEGER PRIMARY KEY,
                    event_id TEXT NOT NULL UNIQUE,
                    aggregate_id TEXT NOT NULL,
                    aggregate TEXT NOT NULL,
                    version INTEGER NOT NULL,
                    event_type TEXT NOT NULL,
                    schema_version INTEGER NOT NULL DEFAULT 1,
                    event_date TEXT NOT NULL,
                    data TEXT NOT NULL,
                    metadata TEXT NOT NULL DEFAULT '{}',
                    UNIQUE (aggregate_id, version)
                )""",
            ),
            # streams are read through the UNIQUE index, the log through the primary key
            (
                "created index events_by_type",
                "CREATE INDEX events_by_type ON events (event_type, position)",
            ),
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_COLUMNS = (
    "position, event_id, aggregate_id, aggregate, version, event_type, event_date, data, metadata"
)
_INSERT = (
    "INSERT INTO events (position, event_id, aggregate_id, aggregate, version, event_type, "
    "schema_version, event_date, data, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = ?"
# the stream's version and the log's last position, in one statement under the write lock
_HEADS = (
    "SELECT (SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = ?),"
    " (SELECT coalesce(max(position), 0) FROM events)"
)
_STREAM = f"SELECT {_COLUMNS} FROM events WHERE aggregate_id = ? AND version > ? ORDER BY version"
_PAYLOADS = "SELECT data FROM events WHERE aggregate_id = ? AND version > ? ORDER BY version"
_LOG = f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
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
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=4096)
def _parse_date(text: str) -> dt.datetime:
    # the events of one append share a date: caching makes long streams cheap to read
    return dt.datetime.fromisoformat(text)


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
        self._schema_ready = False
        self._tables: dict[type[Projection], ProjectionTable] = {}
        self._table_owners: dict[str, type[Projection]] = {}
        self._ready_tables: set[str] = set()
        # an in-memory database lives in its connection: one, shared under the lock
        self._shared = self._connect() if path == MEMORY else None

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
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            except sqlite3.Error:
                conn.close()
                raise
        return conn

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

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        if self.closed:
            raise StoreError(f"The SQLite store {self.path!r} is closed")
        if self._shared is not None:
            with self._lock:
                yield self._shared
            return
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        yield conn if conn is not None else self._thread_connection()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from its first statement."""
        with self.connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # tables created in this transaction are gone again: forget them first,
                # before another writer can take the lock
                self._ready_tables.clear()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def errors(self) -> Iterator[None]:
        """Driver errors become StoreError, chained."""
        try:
            yield
        except sqlite3.Error as error:
            hint = ""
            if "locked" in str(error) or "busy" in str(error):
                hint = f" (another writer held the lock longer than the {self.timeout} s timeout)"
            raise StoreError(f"SQLite failed on {self.path!r}: {error}{hint}") from error

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
            with self.connection() as conn:
                if self.schema_version(conn) == SCHEMA_VERSION:
                    self._schema_ready = True
                    return []
            lines: list[str] = []
            with self.transaction() as conn:  # two processes initializing take turns
                current = self.schema_version(conn)
                if current is None:
                    conn.execute(
                        "CREATE TABLE incident_schema (version INTEGER PRIMARY KEY, "
                        "description TEXT NOT NULL, applied_at TEXT NOT NULL)"
                    )
                    lines.append("created table incident_schema")
                    current = 0
                if current > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path!r} has schema version {current}, but this incident knows "
                        f"versions up to {SCHEMA_VERSION}; upgrade incident to use it"
                    )
                for version, description, steps in MIGRATIONS:
                    if version <= current:
                        continue
                    for line, statement in steps:
                        conn.execute(statement)
                        lines.append(line)
                    conn.execute(
                        "INSERT INTO incident_schema VALUES (?, ?, ?)",
                        (version, description, _date_text(dt.datetime.now(dt.UTC))),
                    )
                    lines.append(f"recorded schema version {version} ({description})")
        self._schema_ready = True
        return lines

    def ensure_schema(self) -> None:
        if not self._schema_ready:
            self.migrate()

    # -- projection tables ------------------------------------------------------

    def table(self, projection_type: type[Projection]) -> ProjectionTable:
        table = self._tables.get(projection_type)
        if table is not None:
            return table
        table = ProjectionTable(projection_type)
        with self._lock:
            owner = self._table_owners.get(table.name)
            if owner is not None and _qualified(owner) != _qualified(projection_type):
                raise IncidentError(
                    f"{_qualified(projection_type)} and {_qualified(owner)} would both be "
                    f"stored in table {table.name!r}; give one a table_name: ClassVar[str]"
                )
            self._table_owners[table.name] = projection_type  # a redefinition replaces it
            self._tables[projection_type] = table
        return table

    def ensure_table(self, conn: sqlite3.Connection, table: ProjectionTable) -> None:
        """Inside a write transaction: create or migrate the table once per process."""
        if table.name not in self._ready_tables:
            table.ensure(conn)
            self._ready_tables.add(table.name)

    def ready(self, table: ProjectionTable) -> None:
        """Outside a transaction: make sure the table exists before reading it."""
        if table.name not in self._ready_tables:
            with self.transaction() as conn:
                self.ensure_table(conn, table)

    def write_projections(
        self, conn: sqlite3.Connection, projections: Iterable[Projection]
    ) -> None:
        """Upsert inside the caller's transaction; everything is encoded before any write."""
        rows = [(self.table(type(p)), self.table(type(p)).row(p)) for p in projections]
        for table, row in rows:
            self.ensure_table(conn, table)
            conn.execute(table.upsert_sql, row)


def _qualified(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
            stored = conn.execute(table.select_one_sql, (row[0],)).fetchone()
        winner: P = table.decode(stored)
        return winner

    def get(self, projection_type: type[P], key: str) -> P | None:
        table = self._db.table(projection_type)
        with self._db.errors():
            self._db.ready(table)
            with self._db.connection() as conn:
                row = conn.execute(table.select_one_sql, (key,)).fetchone()
        found: P | None = None if row is None else table.decode(row)
        return found

    def all(self, projection_type: type[P]) -> list[P]:
        table = self._db.table(projection_type)
        with self._db.errors():
            self._db.ready(table)
            with self._db.connection() as conn:
                rows = conn.execute(f"{table.select_sql} ORDER BY rowid").fetchall()
        return [table.decode(row) for row in rows]

    def close(self) -> None:
        """Closes the database, which the event store it came from shares."""
        self._db.close()


class SQLiteEventStore:
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

    def append(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        *,
        expected_version: object,
        aggregate: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Recorded[Any]]:
        return self._append(aggregate_id, events, expected_version, aggregate, metadata)

    def append_and_project(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        *,
        expected_version: object,
        aggregate: str | None,
        metadata: Mapping[str, Any] | None,
        projection_store: ProjectionStore,
        project: ProjectFn,
    ) -> list[Recorded[Any]]:
        return self._append(
            aggregate_id, events, expected_version, aggregate, metadata, projection_store, project
        )

    def _append(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        expected_version: object,
        aggregate: str | None,
        metadata: Mapping[str, Any] | None,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> list[Recorded[Any]]:
        batch = checked_events(aggregate_id, events)
        # encode before taking the lock: a bad event or metadata fails with nothing written
        payloads = [(encode(e).decode(), type(e).schema_version) for e in batch]
        metadata_json = encode(dict(metadata or {})).decode()
        together = projection_store is not None and self.shares_database_with(projection_store)
        projections: list[Projection] = []
        self._db.ensure_schema()
        with self._db.errors():
            try:
                with self._db.transaction() as conn:
                    actual: int
                    last: int
                    actual, last = conn.execute(_HEADS, (aggregate_id,)).fetchone()
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
                                metadata_json,
                            )
                            for r, (data, schema_version) in zip(recorded, payloads, strict=True)
                        ],
                    )
                    if project is not None:
                        projections = list(project(recorded))
                        if together:
                            self._db.write_projections(conn, projections)
            except sqlite3.IntegrityError as error:
                if "events.aggregate_id, events.version" not in str(error):
                    raise
                # only a writer that skipped BEGIN IMMEDIATE could get here; same meaning
                raise ConcurrencyError(
                    aggregate_id, expected_version, self.version(aggregate_id)
                ) from error
        if projection_store is not None and not together:
            # another database: the events are committed, the projections follow
            for projection in projections:
                projection_store.project(projection)
        return recorded

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return isinstance(projection_store, SQLiteProjectionStore) and self._db.same_as(
            projection_store._db
        )

    # -- reading ------------------------------------------------------------------

    def _recorded(self, row: tuple[Any, ...]) -> Recorded[Any]:
        position, event_id, aggregate_id, aggregate, version, event_type, date, data, meta = row
        event = self.types.decode(event_type, data, position=position, aggregate_id=aggregate_id)
        try:
            event_date = _parse_date(date)
            metadata = _metadata_decoder.decode(meta)
        except (ValueError, TypeError, msgspec.DecodeError) as error:
            raise CorruptEvent(position, aggregate_id, f"bad envelope: {error}") from error
        return Recorded(
            position=position,
            event_id=event_id,
            aggregate_id=aggregate_id,
            aggregate=aggregate,
            version=version,
            event_type=event_type,
            event_date=event_date,
            data=event,
            metadata=metadata,
        )

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        self._db.ensure_schema()
        with self._db.errors(), self._db.connection() as conn:
            rows: list[tuple[Any, ...]] = conn.execute(sql, params).fetchall()
        return rows

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream in version order, read in one snapshot."""
        return [self._recorded(row) for row in self._rows(_STREAM, (aggregate_id, after))]

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events alone, from one query read in batches, each batch decoded
        in one call; a batch the fast decoder refuses is read again row by row (which
        raises CorruptEvent or UnknownEventType naming the position)."""
        self._db.ensure_schema()
        with self._db.errors(), self._db.connection() as conn:
            cursor = conn.execute(_PAYLOADS, (aggregate_id, after))
            try:
                while rows := cursor.fetchmany(EVENTS_BATCH):
                    payloads = [data for (data,) in rows]
                    events = self.types.decode_batch(payloads)
                    if events is None:  # this batch again, whole rows, one by one
                        again = conn.execute(f"{_STREAM} LIMIT ?", (aggregate_id, after, len(rows)))
                        events = [self._recorded(row).data for row in again.fetchall()]
                    yield from events
                    after += len(payloads)
            finally:
                cursor.close()

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches: fold a stream of any length
        (``aggregate.fold(store.stream(id))``) without holding it in memory."""
        while True:
            rows = self._rows(f"{_STREAM} LIMIT {BATCH}", (aggregate_id, after))
            for row in rows:
                yield self._recorded(row)
            if len(rows) < BATCH:
                return
            after = rows[-1][4]

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log in position order, fetched in batches as it is consumed."""
        remaining = limit
        while remaining is None or remaining > 0:
            size = BATCH if remaining is None else min(BATCH, remaining)
            rows = self._rows(_LOG, (after, size))
            for row in rows:
                yield self._recorded(row)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def version(self, aggregate_id: str) -> int:
        version: int = self._rows(_VERSION, (aggregate_id,))[0][0]
        return version

    # -- the database ----------------------------------------------------------

    def projections(self) -> SQLiteProjectionStore:
        if self._projections is None:
            self._projections = SQLiteProjectionStore(self._db)
        return self._projections

    def initialize(self) -> list[str]:
        """Create or migrate the tables; returns what was done (nothing the second time).

        >>> store = open_sqlite("sqlite://")
        >>> for line in store.initialize():
        ...     print(line)
        created table incident_schema
        created table events
        created index events_by_type
        recorded schema version 1 (the event log)
        >>> store.initialize()
        []
        """
        return self._db.migrate()

    def close(self) -> None:
        """Close the database (its projection store shares it)."""
        self._db.close()


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
    database = _Database(path, synchronous=synchronous, timeout=timeout)
    return SQLiteEventStore(database, types=settings.get("types"))
