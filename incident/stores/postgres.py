"""Postgres stores: the server backend, for many processes on many machines sharing one
database. psycopg 3 with a psycopg_pool connection pool; the same verbs as memory.py.

``postgresql://user@host:5432/db?schema=bank`` opens the event store of schema ``bank``
(default ``public``); its ``projections()`` share the pool, so a command's events and its
projections commit in one transaction. Options: ``schema``, ``pool_size`` (default 10),
``create_tables`` (default True: create or migrate missing tables on first use; turn it off
for roles that may not run DDL, and run ``incident init URL`` with one that may),
``timeout`` (seconds to wait for a pooled connection) and ``batch_size`` (rows per
round trip when ``read_all`` streams the log).

Tables, in the store's schema: ``incident_migrations`` (what ran), ``events`` (payloads
and metadata as ``json``, stored as written), ``idempotency_keys``, ``incident_owed``, and
one table per Projection type (its ``table_name``, else the snake_case of the class name:
see :mod:`incident.stores.tables`); and the function ``begin_append``
(a one-round-trip append). Stores are thread-safe, and a store opened before ``fork()``
opens a pool of its own in the child.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import select
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout

from .._forks import renew_in_forked_children
from ..codec import EventTypes
from ..errors import (
    CommitUnknown,
    ConcurrencyError,
    CorruptEvent,
    DuplicateCommand,
    IncidentError,
    StoreError,
)
from ..messages import ANY, Event, Projection, Recorded
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
    projection_json,
    projection_key,
    stamp,
)
from .protocols import Outcome, Owed, ProjectFn, ProjectionStore
from .tables import Kind, TableOwners, TableSpec, legacy_name, qualified

if TYPE_CHECKING:
    from .postgres_checkpoints import PostgresCheckpointStore

__all__ = ["PostgresEventStore", "PostgresProjectionStore", "open_postgres"]

log = logging.getLogger("incident.stores.postgres")
# psycopg and its pool log each failed reconnection; with no handler of the
# application's anywhere, Python's last resort would print them to stderr, while the
# StoreError already says what failed. A NullHandler stops only that: handlers the
# application installs still receive every record.
logging.getLogger("psycopg").addHandler(logging.NullHandler())

P = TypeVar("P", bound=Projection)
EVENTS_PAGE = 16_384  # rows per query when folding a stream: one page for most streams
_TAG = f'{{"{Event.__struct_config__.tag_field}":"'  # how an encoded event's payload opens
Connection = psycopg.Connection[tuple[Any, ...]]
Query = str | sql.SQL | sql.Composed

# name, what it does (printed by `incident init`), statements ({schema} is filled in)
MIGRATIONS: list[tuple[str, str, list[str]]] = [
    (
        "0001_events",
        "the events table, unique per (aggregate_id, version), indexed for stream reads",
        [
            """
            CREATE TABLE {schema}.events (
                position bigint PRIMARY KEY,
                event_id uuid NOT NULL CONSTRAINT events_event_id UNIQUE,
                aggregate_id text NOT NULL,
                aggregate text NOT NULL,
                version integer NOT NULL CHECK (version > 0),
                event_type text NOT NULL,
                schema_version integer NOT NULL DEFAULT 1,
                event_date timestamptz NOT NULL,
                data jsonb NOT NULL,
                metadata jsonb NOT NULL DEFAULT '{{}}',
                CONSTRAINT events_stream_version UNIQUE (aggregate_id, version)
            )
            """,
        ],
    ),
    (
        "0002_idempotency_keys",
        "the idempotency keys table: which positions each keyed command stored",
        [
            """
            CREATE TABLE {schema}.idempotency_keys (
                key text PRIMARY KEY,
                first_position bigint NOT NULL,
                last_position bigint NOT NULL
            )
            """,
        ],
    ),
    (
        "0003_begin_append",
        "a function that starts an append with predicted heads, so it takes one round trip",
        [
            # Each query in a volatile function takes its own snapshot, so the checks
            # below, made once the lock is granted, see every append committed before.
            """
            CREATE FUNCTION {schema}.begin_append(
                append_lock bigint, stream text, stream_version integer,
                last_position bigint, wanted_key text, channel text, new_last_position text
            ) RETURNS void LANGUAGE plpgsql AS $$
            DECLARE
                actual integer;
            BEGIN
                PERFORM pg_advisory_xact_lock(append_lock);
                IF (SELECT coalesce(max(position), 0) FROM {schema}.events) <> last_position
                THEN
                    RAISE EXCEPTION 'another writer appended' USING ERRCODE = 'IN410';
                END IF;
                SELECT coalesce(max(version), 0) INTO actual FROM {schema}.events
                    WHERE aggregate_id = stream;
                IF actual <> stream_version THEN
                    RAISE EXCEPTION 'stream % is at version %', stream, actual
                        USING ERRCODE = 'IN409', DETAIL = actual::text;
                END IF;
                IF EXISTS (SELECT 1 FROM {schema}.idempotency_keys WHERE key = wanted_key) THEN
                    RAISE EXCEPTION 'idempotency key % was used', wanted_key
                        USING ERRCODE = 'IN411';
                END IF;
                PERFORM pg_notify(channel, new_last_position);
            END
            $$
            """,
        ],
    ),
    (
        "0004_json_payloads",
        "events keep data and metadata as json, the text incident wrote, which reads back"
        " without jsonb's conversion to text",
        [
            # jsonb is rebuilt into text on every read: a third of a stream's load time.
            # json is stored as written and still checked on the way in.
            """
            ALTER TABLE {schema}.events
                ALTER COLUMN data TYPE json USING data::json,
                ALTER COLUMN metadata DROP DEFAULT,
                ALTER COLUMN metadata TYPE json USING metadata::json,
                ALTER COLUMN metadata SET DEFAULT '{{}}'
            """,
        ],
    ),
    (
        "0005_outcomes_and_owed_work",
        "idempotency keys remember rejections; the owed follow-ups of inline handlers",
        [
            # a rejected command stored no events: its row keeps the reason, positions 0
            """
            ALTER TABLE {schema}.idempotency_keys
                ADD COLUMN rejected text,
                ADD COLUMN detail text
            """,
            """
            CREATE TABLE {schema}.incident_owed (
                handler text NOT NULL,
                position bigint NOT NULL,
                event_id uuid NOT NULL,
                aggregate_id text NOT NULL,
                event_type text NOT NULL,
                error text,
                attempts integer NOT NULL,
                owed_at timestamptz NOT NULL,
                PRIMARY KEY (handler, position)
            )
            """,
        ],
    ),
]
# a migration that rewrites the events table says so first when the log is this long
ANNOUNCED_REWRITE = 100_000
REWRITES_EVENTS = {"0004_json_payloads"}
# what begin_append raises: a conflict (its detail is the stream's version), another
# writer's append (the locked path appends), a used key (the locked path says so)
STREAM_MOVED, LOG_MOVED, KEY_USED = "IN409", "IN410", "IN411"
# how long a writer queues for a stream's turn before it goes on without one: a holder
# that takes this long is stuck, and the expected version keeps the append correct anyway
TURN_WAIT = "5s"

_EVENT_COLUMNS = (
    "position, event_id::text, aggregate_id, aggregate, version, event_type, schema_version,"
    " event_date, data::text, metadata::text"
)


def _lock_key(schema: str, purpose: str) -> int:
    """A stable 64-bit advisory lock key per schema, so applications in other schemas of
    the same database never wait on each other."""
    digest = hashlib.blake2b(f"incident:{schema}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class _Database:
    """One pool and one schema: what an event store and its projection store share."""

    def __init__(
        self, conninfo: str, *, schema: str, pool_size: int, create_tables: bool, timeout: float
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.create_tables = create_tables
        self.append_lock = _lock_key(schema, "append")
        self.migrate_lock = _lock_key(schema, "migrate")
        self._lock = threading.Lock()  # guards initialization
        self._pool_lock = threading.Lock()  # guards opening a pool after a fork
        self.append_turns = threading.Lock()  # this process's appends, while predicting
        self.pinned = threading.local()  # the connection of a thread's turn on a stream
        self._initialized = False
        self._closed = False
        self.tables: dict[type[Projection], _Table] = {}  # those known to exist
        self.owners = TableOwners()
        self._pool_options = {"max_size": pool_size, "timeout": timeout}
        self.last_lost: tuple[float, str] = (-float("inf"), "")  # when, why: see lost()
        self._pool: ConnectionPool[Connection] | None = self._open_pool()
        self._inherited: list[ConnectionPool[Connection]] = []
        renew_in_forked_children(self.forked)

    def _open_pool(self) -> ConnectionPool[Connection]:
        # check: a connection the server dropped while idle (a restart, a kill) is
        # replaced on checkout instead of failing the next call; broken connections
        # returned to the pool are discarded by the pool itself.
        return ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=int(self._pool_options["max_size"]),
            kwargs={"autocommit": True, "options": _in_utc(self.conninfo)},
            configure=_read_committed,
            check=self._check_if_disturbed,
            timeout=self._pool_options["timeout"],
            open=True,
            name=f"incident:{self.schema}",
        )

    def _check_if_disturbed(self, conn: Connection) -> None:
        """The pool's checkout check, without a round trip for a connection left as it
        was.

        A server that ends a session (a restart, pg_terminate_backend) sends a last
        message and closes the socket, so the socket of a live idle connection has
        nothing to read. Only a readable one is worth the round trip of a real check,
        which fails for a dead connection and makes the pool hand out another."""
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        if readable:
            try:
                ConnectionPool.check_connection(conn)
            except psycopg.Error as error:
                self.lost(error)  # its idle neighbours were likely ended with it
                raise

    @property
    def pool(self) -> ConnectionPool[Connection]:
        pool = self._pool
        if pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = self._open_pool()
                pool = self._pool
        return pool

    def forked(self) -> None:
        """In a child process after fork(): the pool's threads are gone and its
        connections are the parent's sessions. Keep them referenced and unused (collecting
        the pool would try to stop threads that do not exist) and open a new pool on
        first use, so stores opened before a fork (gunicorn --preload, multiprocessing)
        work in every process."""
        # a parent thread may have held one at the fork: the child starts with its own
        self._lock, self._pool_lock = threading.Lock(), threading.Lock()
        self.append_turns = threading.Lock()
        self.pinned = threading.local()  # a turn the forking thread held is the parent's
        if self._pool is not None and not self._closed:
            self._inherited.append(self._pool)
            self._pool = None

    def describe(self) -> str:
        params = conninfo_to_dict(self.conninfo)
        where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        return f"{where}/{params.get('dbname', '')}, schema={self.schema!r}"

    def table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    @contextmanager
    def connection(self, doing: str, *, fresh: bool = False) -> Iterator[Connection]:
        """A pooled connection (inside a turn on a stream, the turn's own, unless
        ``fresh``); driver failures become StoreError saying what failed."""
        pinned: Connection | None = None if fresh else getattr(self.pinned, "conn", None)
        used: list[Connection] = []
        try:
            with self.pool.connection() if pinned is None else nullcontext(pinned) as conn:
                used.append(conn)
                yield conn
        except psycopg.errors.UndefinedTable as error:
            raise StoreError(
                f"Postgres failed {doing}: {_first_line(error)}. Create the tables with "
                f"`incident init URL`, or open the store with create_tables=True"
            ) from error
        except PoolTimeout as error:
            raise StoreError(f"Postgres failed {doing}: {self._why_no_connection()}") from error
        except psycopg.Error as error:
            if used and used[0].broken:
                self.lost(error)
            raise StoreError(f"Postgres failed {doing}: {_first_line(error)}") from error

    def lost(self, error: BaseException) -> None:
        """A session the server ended: remembered for the pool's next timeout to report,
        and the idle ones are checked now. A server that ends one (a restart, an admin's
        kill) has likely ended the others, and the pool's checkout waits a second or more
        after each dead one it finds, which would use up a caller's whole timeout."""
        self.last_lost = (time.monotonic(), _first_line(error))
        with suppress(psycopg.Error):
            self.pool.check()

    def _why_no_connection(self) -> str:
        """The pool only says it timed out; one direct attempt, and what the pool's
        connections met lately, tell why. Only a pool that is really busy is told to grow."""
        try:
            psycopg.connect(self.conninfo, connect_timeout=5).close()
        except psycopg.Error as error:
            return f"the server refused a new connection: {_first_line(error)}"
        timeout = float(self.pool.timeout)
        when, why = self.last_lost
        if time.monotonic() - when < timeout + 1:
            return (
                f"no pooled connection was usable for {timeout}s: the server kept ending "
                f"them (last: {why}), though it accepts new ones now"
            )
        return (
            f"all {self.pool.max_size} pooled connections stayed busy for {timeout}s;"
            " raise pool_size or timeout"
        )

    def ready(self) -> None:
        """Create or migrate the tables once per process, when allowed to."""
        if self._initialized or not self.create_tables:
            return
        with self._lock:
            if not self._initialized:
                self.initialize()

    def initialize(self) -> list[str]:
        done: list[str] = []
        schema = sql.Identifier(self.schema)
        migrations = self.table("incident_migrations")
        with self.connection("creating the tables") as conn, conn.transaction():
            # one migrator per schema at a time, across processes and machines
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [self.migrate_lock])
            if not _fetch_value(
                conn, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", self.schema
            ):
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
                done.append(f"created schema {self.schema}")
            if _fetch_value(conn, "SELECT to_regclass(%s)", migrations.as_string(conn)) is None:
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {} (name text PRIMARY KEY, description text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(migrations)
                )
                done.append(f"created table {self.schema}.incident_migrations")
            applied = {
                name for (name,) in conn.execute(sql.SQL("SELECT name FROM {}").format(migrations))
            }
            for name, description, statements in MIGRATIONS:
                if name in applied:
                    continue
                if name in REWRITES_EVENTS:
                    self._announce_rewrite(conn, name)
                for statement in statements:
                    conn.execute(sql.SQL(statement.strip()).format(schema=schema))
                conn.execute(
                    sql.SQL("INSERT INTO {} (name, description) VALUES (%s, %s)").format(
                        migrations
                    ),
                    [name, description],
                )
                done.append(f"applied migration {name}: {description}")
        self._initialized = True
        return done

    def _announce_rewrite(self, conn: Connection, migration: str) -> None:
        """A rewrite of a long log takes a while, and holds every reader and writer of the
        table off until it commits: say so before it starts. (0001 made the table, in an
        earlier run or earlier in this one.)"""
        count = _fetch_value(
            conn,
            sql.SQL("SELECT coalesce(max(position), 0) FROM {}").format(self.table("events")),
        )
        if count >= ANNOUNCED_REWRITE:
            log.warning(
                "incident: migration %s rewrites the %d events of %s.events once; until it "
                "commits, every reader and writer of the table waits",
                migration,
                count,
                self.schema,
            )

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.close()


def _read_committed(conn: Connection) -> None:
    """Every transaction of the store runs at READ COMMITTED, whatever the server's or
    the role's default: each statement then sees what committed before it began, so the
    statement after a lock sees the work of whoever held it (appends, migrations).
    Every session also runs in UTC (``_in_utc``); a client that asks for another zone
    itself (PGTZ) is set back here, the only case that costs a round trip."""
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    if conn.info.parameter_status("TimeZone") != "UTC":
        conn.execute("SET TimeZone TO 'UTC'")


def _in_utc(conninfo: str) -> str:
    """The connection's ``options`` with TimeZone=UTC added, so that no server, role or
    PGTZ setting shifts the datetimes read models hold (docs/storable.md). Set at
    connection start rather than by a SET: no round trip, and no statement a server
    ending sessions could interrupt while the pool is making a connection.

    >>> _in_utc("postgresql://db/app?options=-c%20search_path%3Dx")
    '-c search_path=x -c TimeZone=UTC'
    """
    given = conninfo_to_dict(conninfo).get("options") or ""
    return f"{given} -c TimeZone=UTC".strip()


@contextmanager
def _one_sync_transaction(conn: Connection) -> Iterator[None]:
    """BEGIN, the block's statements and COMMIT in one pipeline, synced once at the end
    (psycopg's ``transaction()`` syncs once more, before its COMMIT). A failed statement
    makes the server skip everything after it up to the sync, the COMMIT included; the
    transaction it leaves open, or one a Python error left open, is rolled back here."""
    failed: psycopg.Error | None = None
    try:
        with conn.pipeline():
            try:
                conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")  # see _read_committed
                yield
                conn.execute("COMMIT")
            except psycopg.Error as error:
                # a statement failed and its error came back before the block ended: end
                # the pipeline quietly (its sync then says it was aborted), raise it below
                failed = error
    except BaseException:
        _roll_back(conn)
        if failed is not None:
            raise failed from None  # not the "pipeline aborted" that followed it
        raise
    if failed is not None:
        _roll_back(conn)
        raise failed


def _roll_back(conn: Connection) -> None:
    """psycopg's rollback(), not a ROLLBACK statement: it also forgets the statements it
    has prepared on the connection. A failed pipeline skips the statements queued after
    the failure, and psycopg would otherwise count one it was preparing there as
    prepared ("prepared statement _pg3_4 does not exist" on its next use)."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with suppress(psycopg.Error):  # a broken connection: the pool discards it
            conn.rollback()


def _take_turn(conn: Connection, key: int) -> bool:
    """Queue for a stream's lock, for TURN_WAIT at most; False when it did not come.
    Taken inside a transaction only to bound the wait: a session lock outlives it."""
    try:
        with _one_sync_transaction(conn):
            conn.execute(f"SET LOCAL lock_timeout = '{TURN_WAIT}'")
            conn.execute("SELECT pg_advisory_lock(%s)", [key])
    except psycopg.errors.LockNotAvailable:
        log.warning("incident: a stream's turn took over %s; appending without it", TURN_WAIT)
        return False
    return True


def _give_turn(conn: Connection, key: int) -> None:
    """Release a stream's lock; a session that cannot say so is closed, which releases
    it as well (and the pool discards a closed connection)."""
    try:
        _roll_back(conn)  # a transaction left open would keep the unlock waiting
        conn.execute("SELECT pg_advisory_unlock(%s)", [key])
    except psycopg.Error:
        conn.close()


def _may_hide_a_commit(conn: Connection, error: BaseException | None) -> bool:
    """Whether an append's failure leaves its COMMIT in doubt: the connection died, or
    the driver lost track of it (a kill can also surface as "cannot exit pipeline mode
    while busy", the connection not yet marked broken), so the reply may be what was
    lost. An error the server sent (a conflict, a constraint) is an answer."""
    if conn.broken or conn.closed:
        return True
    if isinstance(error, psycopg.InterfaceError):
        return True
    return isinstance(error, psycopg.OperationalError) and (
        error.sqlstate is None or error.sqlstate.startswith(("08", "57P"))
    )


def _fetch_value(conn: Connection, query: Query, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


# -- projections -------------------------------------------------------------------------


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

    def __init__(self, db: _Database, spec: TableSpec) -> None:
        self.spec = spec
        self.schema = db.schema
        self.owners = db.owners
        self.name = spec.name
        self.key = sql.Identifier(spec.key)
        self.columns = {c.name: _COLUMN_TYPES.get(c.kind, "jsonb") for c in spec.columns}
        self.not_null = {c.name for c in spec.columns if not c.nullable}
        self.table = db.table(self.name)
        self.ddl_lock = _lock_key(db.schema, f"table {self.name}")  # racing creators queue
        self.decoder = msgspec.json.Decoder(spec.type)
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
        self.select = sql.SQL("SELECT to_jsonb(t)::text FROM {} AS t").format(self.table)
        self.select_one = self.select + sql.SQL(" WHERE {} = %s").format(self.key)
        self.select_all = self.select + sql.SQL(" ORDER BY {}").format(self.key)

    def ensure(self, conn: Connection) -> None:
        """Create the table, or add the columns of fields added since (nullable)."""
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [self.ddl_lock])
        # DDL only when something is missing: a role without CREATE works on tables in place
        missing = _fetch_value(conn, "SELECT to_regclass(%s)", self.table.as_string(conn)) is None
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
        """A type with a table_name used to be stored under the snake_case of its class
        name: take that table over, unless a class of this store now owns that name."""
        old = legacy_name(self.spec)
        if old is None:
            return False
        owner = self.owners.owner_of(old)
        if owner is not None and qualified(owner) != self.spec.owner:
            return False
        legacy = sql.Identifier(self.schema, old)
        if _fetch_value(conn, "SELECT to_regclass(%s)", legacy.as_string(conn)) is None:
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

    def __init__(self, db: _Database) -> None:
        self._db = db

    def __repr__(self) -> str:
        return f"PostgresProjectionStore({self._db.describe()})"

    def _table(self, projection_type: type[Projection]) -> _Table:
        table = self._db.tables.get(projection_type)
        if table is None:
            spec, _ = self._db.owners.claim(projection_type)
            table = _Table(self._db, spec)
        return table

    def _prepare(
        self, conn: Connection, types: Iterable[type[Projection]]
    ) -> list[type[Projection]]:
        """Create missing tables inside the caller's transaction; returns the types to
        remember as ready once that transaction has committed."""
        fresh = [t for t in dict.fromkeys(types) if t not in self._db.tables]
        if self._db.create_tables:
            for projection_type in fresh:
                self._table(projection_type).ensure(conn)
        return fresh

    def _remember(self, types: Iterable[type[Projection]]) -> None:
        for projection_type in types:
            self._db.tables.setdefault(projection_type, self._table(projection_type))

    @staticmethod
    def _check(projection: Projection) -> str:
        key = projection_key(projection)
        if not isinstance(projection, Projection):
            raise IncidentError(f"Cannot store {projection!r}: not an incident.Projection")
        return key

    def project(self, projection: P) -> P:
        key = self._check(projection)
        table = self._table(type(projection))
        payload = projection_json(projection, table.spec)[1].decode()
        self._db.ready()
        with self._db.connection(f"projecting {table.name} {key!r}") as conn:
            with conn.transaction():
                fresh = self._prepare(conn, [type(projection)])
                stored = None
                if conn.execute(table.upsert, [payload]).fetchone() is None:
                    stored = _fetch_value(conn, table.select_one, key)
            self._remember(fresh)
        if stored is None:
            return projection
        newer: P = table.decode(stored)
        return newer

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        """Swap the whole table for ``projections`` in one transaction (replay)."""
        rows = list(projections)
        for projection in rows:
            self._check(projection)
        table = self._table(projection_type)
        self._db.ready()
        with self._db.connection(f"replacing {table.name}") as conn:
            with conn.transaction():
                fresh = self._prepare(conn, [projection_type])
                conn.execute(sql.SQL("DELETE FROM {}").format(table.table))
                self._queue(conn, rows)
            self._remember(fresh)
        return len(rows)

    def _queue(self, conn: Connection, projections: Sequence[Projection]) -> None:
        """Inside an append's transaction: checks every row, then sends the upserts."""
        rows = []
        for projection in projections:
            self._check(projection)
            table = self._table(type(projection))
            rows.append((table, projection_json(projection, table.spec)[1].decode()))
        for table, payload in rows:
            conn.execute(table.upsert, [payload])

    def _rows(self, projection_type: type[Projection], one: bool, *params: Any) -> list[Any]:
        table = self._table(projection_type)
        self._db.ready()
        with self._db.connection(f"reading {table.name}") as conn:
            if projection_type not in self._db.tables:
                with conn.transaction():
                    fresh = self._prepare(conn, [projection_type])
                self._remember(fresh)
            query = table.select_one if one else table.select_all
            rows = conn.execute(query, params).fetchall()
        return [table.decode(text) for (text,) in rows]

    def get(self, projection_type: type[P], key: str) -> P | None:
        if not keepable_id(key):
            return None  # no row can have it
        rows: list[P] = self._rows(projection_type, True, key)
        return rows[0] if rows else None

    def all(self, projection_type: type[P]) -> list[P]:
        rows: list[P] = self._rows(projection_type, False)
        return rows

    def close(self) -> None:
        """Closes the pool this store shares with its event store."""
        self._db.close()


# -- events ------------------------------------------------------------------------------


# what an append wrote: its events, its projections, the projection types it created
_Written = tuple[list[Recorded[Any]], list[Projection], list[type[Projection]]]


@dataclass(frozen=True)
class _Job:
    """One append, checked and encoded, ready to write. ``sent`` keeps what each try
    of it wrote into a transaction, so a commit the connection died in can be looked up
    by its events' ids."""

    aggregate_id: str
    aggregate: str | None
    events: list[Event]
    payloads: list[str]
    expected_version: object
    metadata: Mapping[str, Any] | None
    metadata_text: str  # encoded once, for every row
    idempotency_key: str | None
    project: ProjectFn | None
    shared: bool  # the projections go into this database, in the same transaction
    sent: list[_Written] = field(default_factory=list)


class _Predictor:
    """Whether appends predict the log's last position: while this store seems to be
    the schema's only writer, which it assumes until shown otherwise.

    While predicting, the appends of this process take turns (``PostgresEventStore.
    _append``), so the last position this store committed is the log's, unless another
    process appended. Then a prediction fails: it cost a round trip and a second wait
    for the lock, so the store stops predicting, and its appends queue for the lock in
    the server, reading the heads under it. When one finds this store's own last event
    still the last, nobody else appended in between; ``needed`` of those in a row and it
    predicts again, ``needed`` doubling after each wrong prediction (up to 1,024): busy
    neighbours soon stop it for good, a lone writer predicts from its second append on.
    Its fields are read and written without a lock: a race can only make a prediction
    wrong, and the database checks every prediction."""

    MOST_NEEDED = 1_024

    def __init__(self) -> None:
        self.last_position: int | None = None  # the last one this store committed
        self.available = True  # False on a schema without begin_append
        self._predicting = True
        self._alone = 0  # locked appends in a row that found no one else's events
        self._needed = 1

    @property
    def predicting(self) -> bool:
        return self.available and self._predicting

    def guess(self) -> int | None:
        return self.last_position if self.predicting else None

    def committed(self, position: int) -> None:
        if self.last_position is None or position > self.last_position:
            self.last_position = position

    def observed(self, last_position: int) -> None:
        """The locked path read the real last position."""
        if self.last_position is not None and last_position == self.last_position:
            self._alone += 1
            self._predicting = self._predicting or self._alone >= self._needed
        else:
            self._alone = 0

    def missed(self) -> None:
        self._predicting = False
        self._alone = 0
        self._needed = min(self._needed * 2, self.MOST_NEEDED)

    def unavailable(self) -> None:
        self.available = False


class _Listener:
    """One LISTEN connection per store, shared by all its waiting threads, so a thread
    that waited once and ended leaves nothing open. One waiter at a time reads the
    connection; the others wait on a condition it signals when a notification comes,
    and one of them takes over the reading when the reader's own wait is over."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
        self._conn: psycopg.Connection[Any] | None = None
        self._inherited: list[psycopg.Connection[Any]] = []
        self._renew()
        renew_in_forked_children(self.forked)

    def _renew(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._reading = False
        self._wakes = 0  # notifications read (and reconnections): waiters compare it

    def forked(self) -> None:
        """The parent's session must not be read (its notifications are the parent's)
        nor closed (that would end it): kept aside, and the child listens afresh."""
        self._renew()
        if self._conn is not None:
            self._inherited.append(self._conn)
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        """Under the lock: the connection, opened and LISTENing. A new one may have
        missed notifications since the last one died: it counts as a wake-up."""
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._conninfo, autocommit=True)
            self._conn.execute(self._listen)
            self._wakes += 1
        return self._conn

    def wait(self, timeout: float, arrived: Callable[[], bool]) -> bool:
        """Wait until ``arrived()`` after a notification, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._connection()
            seen = self._wakes
        # listening first, then looking: an append in between still wakes us
        if arrived():
            return True
        with self._lock:
            while self._wakes == seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._reading:
                    self._changed.wait(remaining)
                    continue
                conn = self._connection()
                if self._wakes != seen:
                    break
                self._reading, notified = True, False
                self._lock.release()
                try:
                    notified = any(True for _ in conn.notifies(timeout=remaining, stop_after=1))
                except psycopg.Error:
                    conn.close()  # the next waiter opens another
                    raise
                finally:
                    self._lock.acquire()
                    self._reading = False
                    self._wakes += notified
                    self._changed.notify_all()  # a wake-up, or someone else's turn to read
        return arrived()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresEventStore(AppendVerbs):
    """The event log in one Postgres table; thread-safe, many processes may share it.

    Positions are gapless and in commit order. A bigserial is neither: a sequence value
    is taken when a row is inserted, not when its transaction commits, so a transaction
    that took 7 can commit after one that took 8, and a reader tailing the log that has
    already seen 8 never looks back for 7 (and rolled-back transactions leave holes).
    So every append takes a transaction-scoped advisory lock (one per schema) before it
    reads the last position, and holds it until its commit: appends to one schema commit
    one at a time, each numbered after the last committed one, and a reader's snapshot
    always holds a gapless prefix of the log. The lock is taken in a statement of its
    own: under READ COMMITTED each statement takes a fresh snapshot, so the statement
    after the lock sees every append committed before it was granted.

    Reading the heads under the lock costs a round trip before the rows can be sent. A
    store that wrote the last position it knows of predicts the heads instead (the
    caller's expected version, its own last position) and sends the lock, a check of
    that prediction and the rows in one round trip; a wrong prediction rolls back and
    the append is done again the locked way (see ``_Predictor``).
    """

    def __init__(self, db: _Database, *, types: EventTypes | None = None, batch_size: int) -> None:
        self.types = types or EventTypes()
        self._db = db
        self._batch_size = batch_size
        self._projections = PostgresProjectionStore(db)
        # Plain strings, rendered once: the schema is the only variable, quoted by psycopg.
        events = db.table("events").as_string()
        keys = db.table("idempotency_keys").as_string()
        self._insert = (
            f"INSERT INTO {events} (position, event_id, aggregate_id, aggregate, version,"
            " event_type, schema_version, event_date, data, metadata)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::json, %s::json)"
        )
        self._heads = (
            f"SELECT (SELECT coalesce(max(version), 0) FROM {events} WHERE aggregate_id = %s),"
            f" (SELECT coalesce(max(position), 0) FROM {events})"
        )
        self._last_position = f"SELECT coalesce(max(position), 0) FROM {events}"
        self._by_ids = (
            f"SELECT {_EVENT_COLUMNS} FROM {events} WHERE event_id = ANY(%s::uuid[])"
            " ORDER BY position"
        )
        begin_append = db.table("begin_append").as_string()
        self._begin_append = f"SELECT {begin_append}(%s, %s, %s, %s, %s, %s, %s)"
        self._predictor = _Predictor()
        # appends NOTIFY this channel as they commit; subscribers LISTEN instead of polling
        self._channel = f"incident_events:{db.schema}"
        self._listener = _Listener(db.conninfo, self._channel)
        self._version = f"SELECT coalesce(max(version), 0) FROM {events} WHERE aggregate_id = %s"
        select = f"SELECT {_EVENT_COLUMNS} FROM {events}"
        self._stream = f"{select} WHERE aggregate_id = %s AND version > %s ORDER BY version"
        self._stream_page = f"{self._stream} LIMIT %s"
        self._page = f"{select} WHERE position > %s ORDER BY position LIMIT %s"
        self._span = f"{select} WHERE position BETWEEN %s AND %s ORDER BY position"
        # a payload stored at a later schema version than the first comes back NULL; the
        # version and type name come along to notice a lost row or another type's payload
        # one page of a stream for a fold: its payloads joined in version order, with
        # what proves it whole (the row count and last version, for a gapless run; how
        # many are at the first schema version and open with their row's type as the tag;
        # whether the stream goes on past the page); a page short of any goes row by row
        self._joined = (
            "SELECT string_agg(data::text, ',' ORDER BY version), count(*), max(version),"
            " count(*) FILTER (WHERE schema_version = 1"
            " AND starts_with(data::text, %s || event_type || '\"')),"
            f" EXISTS (SELECT 1 FROM {events} WHERE aggregate_id = %s AND version > %s)"
            f" FROM {events} WHERE aggregate_id = %s AND version > %s AND version <= %s"
        )
        self._payloads = (
            f"SELECT position, version, event_type, schema_version, data::text FROM {events}"
            " WHERE aggregate_id = %s AND version > %s ORDER BY version LIMIT %s"
        )
        self._key = (
            f"SELECT first_position, last_position, rejected, detail FROM {keys} WHERE key = %s"
        )
        self._remember_key = (
            f"INSERT INTO {keys} (key, first_position, last_position) VALUES (%s, %s, %s)"
        )
        self._remember_rejection = (
            f"INSERT INTO {keys} (key, first_position, last_position, rejected, detail)"
            " VALUES (%s, 0, 0, %s, %s) ON CONFLICT (key) DO NOTHING"
        )
        owed = db.table("incident_owed").as_string()
        columns = OWED_COLUMNS.replace("event_id", "event_id::text")
        self._owe = (
            f"INSERT INTO {owed} ({OWED_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (handler, position) DO UPDATE SET error = excluded.error,"
            " attempts = excluded.attempts"
        )
        self._owed = f"SELECT {columns} FROM {owed} ORDER BY position, handler"
        self._owed_by = f"SELECT {columns} FROM {owed} WHERE handler = %s ORDER BY position"
        self._settle = f"DELETE FROM {owed} WHERE handler = %s AND position = %s"

    def __repr__(self) -> str:
        return f"PostgresEventStore({self._db.describe()})"

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
        # everything that can be refused is refused before the database is touched
        batch = checked_events(aggregate_id, events)
        if expected_version is not ANY and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 0
        ):
            check_expected_version(aggregate_id, expected_version, 0)  # raises: not a version
        payloads = [event_json(event)[0] for event in batch]
        if not batch:
            if expected_version is not ANY:
                check_expected_version(aggregate_id, expected_version, self.version(aggregate_id))
            return []
        job = _Job(
            aggregate_id,
            aggregate,
            batch,
            payloads,
            expected_version,
            metadata,
            metadata_json(metadata),
            idempotency_key,
            project,
            shared=projection_store is not None and self.shares_database_with(projection_store),
        )
        self._db.ready()
        written = self._append_resolved(job)
        recorded, projections, fresh = written
        self._projections._remember(fresh)
        if projection_store is not None and not job.shared:
            # another database: the events have committed, the projections follow
            for projection in projections:
                projection_store.project(projection)
        return recorded

    def _append_resolved(self, job: _Job) -> _Written:
        """Append; when the connection dies during it, find out whether it committed
        rather than leave the caller guessing. Found: what was stored. Not found:
        nothing was written, so the same append (same expected version) is tried once
        more, on a new connection. Not knowable in time: CommitUnknown."""
        doing = f"appending {len(job.events)} event(s) to {job.aggregate_id!r}"
        for attempt in range(2):
            job.sent.clear()
            used: list[Connection] = []
            try:
                # a turn's connection that died stays dead: the second try takes another
                with self._db.connection(doing, fresh=attempt > 0) as conn:
                    used.append(conn)
                    return self._append_once(conn, job)
            except StoreError as error:
                if not (used and _may_hide_a_commit(used[0], error.__cause__)):
                    raise  # the server answered: it said what happened
                stored = self._look_up_sent(job, doing, error)
                if stored is not None:
                    log.info("incident: %s: the connection was lost, not the commit", doing)
                    return stored
                log.info("incident: %s: the connection was lost, nothing was stored", doing)
                if attempt > 0:
                    raise StoreError(
                        f"Postgres failed {doing}: the connection was lost twice and "
                        "nothing was stored (looked up); it is safe to try again"
                    ) from error.__cause__
        raise AssertionError("unreachable")  # pragma: no cover

    def _append_once(self, conn: Connection, job: _Job) -> _Written:
        try:
            # while predicting, this process's appends take turns so each one's guess
            # holds; while others are writing, they queue for the lock in the server
            turn = self._db.append_turns if self._predictor.predicting else nullcontext()
            with turn:
                written = self._append_predicted(conn, job) or self._append_locked(conn, job)
                self._predictor.committed(written[0][-1].position)
        except psycopg.errors.UniqueViolation as error:
            # only a writer that bypassed the lock could get here; still a clean conflict
            if error.diag.constraint_name != "events_stream_version":
                raise
            actual = _fetch_value(conn, self._version, job.aggregate_id)
            raise ConcurrencyError(job.aggregate_id, job.expected_version, actual) from error
        return written

    def _look_up_sent(self, job: _Job, doing: str, lost: StoreError) -> _Written | None:
        """After a lost connection: the append as stored, or None when it was not (its
        transaction's rows are all there or none is). Event ids are made here, before
        sending, and unique in the table. Connections are asked for until the pool's
        timeout has passed; then CommitUnknown."""
        if not job.sent:
            return None  # no row was sent: there was nothing to commit
        recorded, projections, fresh = job.sent[-1]  # an earlier try rolled back
        ids = [record.event_id for record in recorded]
        deadline = time.monotonic() + max(float(self._db.pool.timeout), 1.0)
        seen: BaseException = lost.__cause__ or lost
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                with self._db.pool.connection(timeout=remaining) as conn:
                    rows = conn.execute(self._by_ids, [ids]).fetchall()
            except psycopg.Error as error:
                seen = error
                if not isinstance(error, PoolTimeout):
                    self._db.lost(error)
                time.sleep(min(0.05, max(remaining, 0)))
                continue
            if not rows:
                return None
            stored = [self._recorded(row) for row in rows]
            self._predictor.committed(stored[-1].position)
            return stored, projections, fresh
        raise CommitUnknown(
            f"Postgres lost the connection {doing} ({_first_line(lost.__cause__ or lost)})"
            f" and could not find out whether it committed ({_first_line(seen)})",
            aggregate_id=job.aggregate_id,
            event_ids=ids,
        ) from lost.__cause__

    @contextmanager
    def turn(self, aggregate_id: str) -> Iterator[None]:
        """``with store.turn(stream):`` read the stream, decide and append while writers
        of every process that take the same turn wait in the server: a session-level
        advisory lock per stream, on a pooled connection that this thread's calls to
        the store use until the block ends, so the turn costs no second connection.

        CommandHandler takes it on the streams its process has collided on, so writers
        that keep colliding queue instead of spending their retries; an uncontended
        stream never takes it. The lock is released when the block ends, however it
        ends (or the session is closed, which releases it too). A turn taken inside a
        turn takes nothing more: one stream lock per session, so no two writers can
        each hold one stream and wait for the other's."""
        db = self._db
        if getattr(db.pinned, "conn", None) is not None:
            yield
            return
        db.ready()
        key = _lock_key(db.schema, f"stream {aggregate_id}")
        with db.connection(f"taking the turn on {aggregate_id!r}") as conn:
            taken = _take_turn(conn, key)
            db.pinned.conn = conn
            try:
                yield
            finally:
                db.pinned.conn = None
                if taken:
                    _give_turn(conn, key)

    def _append_locked(self, conn: Connection, job: _Job) -> _Written:
        """Take the lock and read the heads, then write and commit: two round trips."""
        with _one_sync_transaction(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._db.append_lock])
            heads = conn.execute(self._heads, [job.aggregate_id])
            if job.idempotency_key is not None:
                earlier = self._outcome(conn, job.idempotency_key)
                if earlier is not None:
                    raise DuplicateCommand(job.idempotency_key, *earlier)
            version, last_position = heads.fetchone()  # type: ignore[misc]
            self._predictor.observed(last_position)
            check_expected_version(job.aggregate_id, job.expected_version, version)
            written = self._write(conn, job, version, last_position)
            # delivered when (and only if) this transaction commits
            new_last = str(written[0][-1].position)
            conn.execute("SELECT pg_notify(%s, %s)", [self._channel, new_last])
            return written

    def _append_predicted(self, conn: Connection, job: _Job) -> _Written | None:
        """Send the lock, a check of the heads this process expects and the writes in one
        round trip. The expected version is the caller's; the last position is the one
        this process last committed, right whenever nobody else has appended since, as
        with a single writer. begin_append (migration 0003) takes the lock, checks, and
        queues the NOTIFY. A stream at another version is a ConcurrencyError at once;
        another writer's append, or a used key, returns None (nothing written) for the
        locked path to append, or to say what the key stored."""
        last_position = self._predictor.guess()
        version = job.expected_version
        if last_position is None or not isinstance(version, int):
            return None
        new_last = str(last_position + len(job.events))
        try:
            with _one_sync_transaction(conn):
                conn.execute(
                    self._begin_append,
                    [
                        self._db.append_lock,
                        job.aggregate_id,
                        version,
                        last_position,
                        job.idempotency_key,
                        self._channel,
                        new_last,
                    ],
                )
                written = self._write(conn, job, version, last_position)
        except psycopg.errors.UndefinedFunction:
            self._predictor.unavailable()  # a schema from before 0003, not migrated here
            return None
        except psycopg.Error as error:
            if error.sqlstate == STREAM_MOVED:
                actual = int(error.diag.message_detail or 0)
                raise ConcurrencyError(job.aggregate_id, version, actual) from None
            if error.sqlstate == LOG_MOVED:
                self._predictor.missed()
            elif error.sqlstate != KEY_USED:
                raise
            return None
        return written

    def _write(self, conn: Connection, job: _Job, version: int, last_position: int) -> _Written:
        """Inside the append's transaction, the heads known: the rows, the key and the
        projections, queued in the pipeline."""
        recorded = stamp(
            job.aggregate_id,
            job.aggregate,
            job.events,
            first_position=last_position + 1,
            first_version=version + 1,
            metadata=job.metadata,
        )
        # one execute per row: queued in the pipeline all the same, while executemany
        # opens a pipeline of its own, which logs a warning when the check before it failed
        for record, payload in zip(recorded, job.payloads, strict=True):
            conn.execute(self._insert, _row(record, payload, job.metadata_text))
        if job.idempotency_key is not None:
            conn.execute(
                self._remember_key,
                [job.idempotency_key, recorded[0].position, recorded[-1].position],
            )
        projections, owed = effects_of(job.project, recorded)
        for work in owed:  # in this schema whatever the projection store: with the events
            conn.execute(self._owe, _owed_row(work))
        fresh: list[type[Projection]] = []
        if job.shared:
            fresh = self._projections._prepare(conn, map(type, projections))
            self._projections._queue(conn, projections)
        job.sent.append((recorded, list(projections), fresh))
        return job.sent[-1]

    def _outcome(self, conn: Connection, key: str) -> Outcome | None:
        """What the key came to (positions of one append are consecutive: appends commit
        one at a time), or None."""
        found = conn.execute(self._key, [key]).fetchone()
        if found is None:
            return None
        first, last, rejected, detail = found
        if rejected is not None:
            return Outcome([], rejected, detail)
        rows = conn.execute(self._span, [first, last]).fetchall()
        return Outcome([self._recorded(row) for row in rows])

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        self._db.ready()
        with self._db.connection(f"looking up idempotency key {idempotency_key!r}") as conn:
            return self._outcome(conn, idempotency_key)

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        """Under the append lock, like an append's key, so the two cannot both win."""
        self._db.ready()
        doing = f"remembering the rejection of idempotency key {idempotency_key!r}"
        with self._db.connection(doing) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._db.append_lock])
                conn.execute(self._remember_rejection, [idempotency_key, reason, detail])
            stored = self._outcome(conn, idempotency_key)
        assert stored is not None  # inserted, or there already
        return stored

    def owed(self, handler: str | None = None) -> list[Owed]:
        if handler is None:
            rows = self._fetch("reading owed work", self._owed)
        else:
            rows = self._fetch(f"reading the work {handler} owes", self._owed_by, handler)
        return [owed_from_row(row) for row in rows]

    def owe(self, owed: Owed) -> None:
        self._db.ready()
        with self._db.connection(f"recording the work {owed.handler} owes") as conn:
            conn.execute(self._owe, _owed_row(owed))

    def settle(self, handler: str, position: int) -> None:
        self._db.ready()
        with self._db.connection(f"settling the work {handler} owed") as conn:
            conn.execute(self._settle, [handler, position])

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return writes_into(self._db, projection_store)

    def _fetch(self, doing: str, query: Query, *params: Any) -> list[tuple[Any, ...]]:
        self._db.ready()
        with self._db.connection(doing) as conn:
            return conn.execute(query, params).fetchall()

    def _recorded(self, row: tuple[Any, ...]) -> Recorded[Any]:
        (position, event_id, aggregate_id, aggregate, version, event_type, schema_version,
         event_date, data, metadata) = row  # fmt: skip
        event = self.types.decode(
            event_type,
            data,
            position=position,
            aggregate_id=aggregate_id,
            schema_version=schema_version,
        )
        try:
            meta = msgspec.json.decode(metadata, type=dict[str, Any])
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise CorruptEvent(position, aggregate_id, f"metadata: {error}") from error
        return Recorded(
            position=position,
            event_id=event_id,
            aggregate_id=aggregate_id,
            aggregate=aggregate,
            version=version,
            event_type=event_type,
            event_date=event_date.astimezone(dt.UTC),
            data=event,
            metadata=meta,
        )

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        if not keepable_id(aggregate_id):
            return []  # no stream can have it
        rows = self._fetch(f"reading stream {aggregate_id!r}", self._stream, aggregate_id, after)
        check_versions(aggregate_id, after, [r[4] for r in rows], [r[0] for r in rows])
        return [self._recorded(row) for row in rows]

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches, so a stream of any length
        folds in constant memory (``aggregate.fold(store.stream(id))``)."""
        if not keepable_id(aggregate_id):
            return
        while True:
            rows = self._fetch(
                f"reading stream {aggregate_id!r}",
                self._stream_page,
                aggregate_id,
                after,
                self._batch_size,
            )
            check_versions(aggregate_id, after, [r[4] for r in rows], [r[0] for r in rows])
            for row in rows:
                yield self._recorded(row)
            if len(rows) < self._batch_size:
                return
            after = rows[-1][4]

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes, in version order and in pages:
        all a fold needs, without decoding ids, dates and metadata.

        Each page is one query that hands back the page's payloads joined in version
        order, decoded in one call by the registered types' union decoder
        (``EventTypes.decode_joined``), with what proves the page whole. Its versions
        must continue the stream without a hole and each payload's tag must agree with
        its row's type name; a page short of that, or holding a type not registered or
        a schema version other than the first, is read again with the type names and
        decoded row by row, upcasting where needed, and damage is a CorruptEvent."""
        if not keepable_id(aggregate_id):
            return iter(())
        return ChainedBatches.of(self._event_pages(aggregate_id, after))

    def _event_pages(self, aggregate_id: str, after: int) -> Generator[list[Event], None, None]:
        doing = f"reading stream {aggregate_id!r}"
        while True:
            end = after + EVENTS_PAGE
            ((joined, count, last, tagged, more),) = self._fetch(
                doing, self._joined, _TAG, aggregate_id, end, aggregate_id, after, end
            )
            events = None
            damage: CorruptEvent | None = None
            if count and last == after + count and tagged == count:
                events = self.types.decode_joined(joined, count)
            elif not count and not more:
                return  # the stream's end
            if events is None:
                events, damage = self._row_by_row(doing, aggregate_id, after)
            # a fold that stops short of the damage (a subscription's, up to one event)
            # gets the events before it first
            yield events
            if damage is not None:
                raise damage
            if not more or not events:  # the end (or rows deleted as we read)
                return
            after += len(events)

    def _row_by_row(
        self, doing: str, aggregate_id: str, after: int
    ) -> tuple[list[Event], CorruptEvent | None]:
        """A page read again with its type names and decoded one row at a time (upcasting
        where needed): the events up to the first hole or unreadable row, and why."""
        rows = self._fetch(doing, self._payloads, aggregate_id, after, EVENTS_PAGE)
        damage: CorruptEvent | None = None
        try:
            check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        except CorruptEvent as hole:
            assert hole.version is not None
            rows, damage = rows[: hole.version - after - 1], hole
        events = []
        for position, version, event_type, schema_version, data in rows:
            try:
                events.append(
                    self.types.decode(
                        event_type,
                        data,
                        position=position,
                        aggregate_id=aggregate_id,
                        schema_version=schema_version,
                    )
                )
            except CorruptEvent as bad:
                bad.version = version
                return events, bad  # before any hole: the rows stop there
        return events, damage

    def version(self, aggregate_id: str) -> int:
        if not keepable_id(aggregate_id):
            return 0
        rows = self._fetch(f"reading the version of {aggregate_id!r}", self._version, aggregate_id)
        return int(rows[0][0])

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log after ``after``, fetched in batches (one short checkout each), so a slow
        consumer holds no connection and every batch starts where the last one ended."""
        if limit is not None and limit < 0:
            raise IncidentError(f"limit must be None or >= 0, got {limit}")
        return self._pages(after, limit)

    def _pages(self, after: int, limit: int | None) -> Iterator[Recorded[Any]]:
        remaining = limit
        while remaining is None or remaining > 0:
            size = self._batch_size if remaining is None else min(self._batch_size, remaining)
            rows = self._fetch("reading the log", self._page, after, size)
            check_positions(after, [r[0] for r in rows])
            for row in rows:
                yield self._recorded(row)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def initialize(self) -> list[str]:
        return self._db.initialize()

    def projections(self) -> PostgresProjectionStore:
        return self._projections

    def checkpoints(self) -> PostgresCheckpointStore:
        """Subscription checkpoints in this schema (beside the projections: one commit)."""
        from .postgres_checkpoints import PostgresCheckpointStore

        return PostgresCheckpointStore(self._db)

    def last_position(self) -> int:
        position: int = self._fetch("reading the last position", self._last_position)[0][0]
        return position

    def wait_for_append(self, after: int, timeout: float) -> bool:
        """Wait for an append's NOTIFY; the store's waiting threads share one LISTEN
        connection (see ``_Listener``)."""
        try:
            return self._listener.wait(timeout, lambda: self.last_position() > after)
        except psycopg.Error as error:
            raise StoreError(f"Postgres failed waiting for appends: {error}") from error

    def close(self) -> None:
        """Closes the pool, which this store's projections() share, and the LISTEN
        connection."""
        self._listener.close()
        self._db.close()


def _owed_row(owed: Owed) -> list[Any]:
    return [
        owed.handler,
        owed.position,
        owed.event_id,
        owed.aggregate_id,
        owed.event_type,
        owed.error,
        owed.attempts,
        owed.owed_at,
    ]


def _row(recorded: Recorded[Any], payload: str, metadata_text: str) -> tuple[Any, ...]:
    return (
        recorded.position,
        uuid.UUID(recorded.event_id),
        recorded.aggregate_id,
        recorded.aggregate,
        recorded.version,
        recorded.event_type,
        getattr(type(recorded.data), "schema_version", 1),
        recorded.event_date,
        payload,
        metadata_text,
    )


def _split_url(url: str) -> tuple[str, str | None]:
    """A libpq URL without incident's own query parameters, and the schema it named.

    >>> _split_url("postgresql+psycopg://u@h/db?schema=bank&sslmode=disable")
    ('postgresql://u@h/db?sslmode=disable', 'bank')
    >>> _split_url("postgresql://u@h/db?options=-c%20statement_timeout%3D5s")[0]
    'postgresql://u@h/db?options=-c%20statement_timeout%3D5s'
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((value for key, value in query if key == "schema"), None)
    # libpq decodes %20 but not +, so spaces (as in options) must stay %20
    kept = [(key, value) for key, value in query if key != "schema"]
    rest = urlencode(kept, quote_via=quote)
    return urlunsplit(("postgresql", parts.netloc, parts.path, rest, parts.fragment)), schema


def writes_into(database: _Database, projection_store: ProjectionStore) -> bool:
    """True for a Postgres projection store on the same server, database and schema (even
    with a pool of its own): a transaction on ``database`` can write its tables."""
    return (
        isinstance(projection_store, PostgresProjectionStore)
        and projection_store._db.conninfo == database.conninfo
        and projection_store._db.schema == database.schema
    )


def open_postgres(
    url: str,
    *,
    schema: str | None = None,
    pool_size: int = 10,
    create_tables: bool = True,
    timeout: float = 10.0,
    batch_size: int = 1000,
    types: EventTypes | None = None,
) -> PostgresEventStore:
    """``postgresql://user:password@host:port/dbname?schema=name``: an event store whose
    ``projections()`` share its pool. Nothing is created until first use (or ``initialize``)."""
    conninfo, url_schema = _split_url(url)
    if schema is not None and url_schema is not None and schema != url_schema:
        raise IncidentError(f"Two schemas for one store: {url_schema!r} in the URL, {schema!r}")
    schema = schema or url_schema or "public"
    if pool_size < 1 or batch_size < 1:
        raise IncidentError(f"pool_size and batch_size must be >= 1, got {pool_size}, {batch_size}")
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error as error:
        raise StoreError(f"Not a usable Postgres URL: {_first_line(error)}") from error
    db = _Database(
        conninfo, schema=schema, pool_size=pool_size, create_tables=create_tables, timeout=timeout
    )
    return PostgresEventStore(db, types=types, batch_size=batch_size)
