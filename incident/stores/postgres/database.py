"""The database of a Postgres store: one connection pool and one schema, shared by an
event store and its projection and checkpoint stores. It hands out sessions (pooled,
checked, in UTC at READ COMMITTED), turns driver failures into StoreError saying what
failed and why, creates or migrates the schema once per process, and renews the pool in
a forked child."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from ..._forks import renew_in_forked_children
from ...errors import StoreError
from ..tables import TableOwners
from .append_job import InFlight
from .durability import Durability
from .inherited import opened
from .migrations import migrate
from .session import Connection, first_line, lock_key, may_hide_a_commit

# conninfo -> (when, why) of the last connect of a pool the server refused, and when a
# pool's connect last succeeded: the pool retries in the background, backing off, and
# only ever reports a timeout
# seconds after the server last refused the pool during which a checkout that times out
# is put down to the pool refilling, not to its size (on a loaded machine a pool brings
# its connections back one by one, each connected and configured)
REFILL = 5.0
_refused: dict[str, tuple[float, str]] = {}
_connected: dict[str, float] = {}


class WatchedConnection(psycopg.Connection[Any]):
    """The pools' connection class: a connect the server refuses (down, restarting,
    out of slots) is remembered, so a checkout that then times out says so instead of
    blaming a busy pool."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        try:
            connection = super().connect(conninfo, **kwargs)
        except psycopg.OperationalError as error:
            _refused[conninfo] = (time.monotonic(), first_line(error))
            raise
        _connected[conninfo] = time.monotonic()
        return opened(connection)


class Database:
    """One pool and one schema: what an event store and its projection store share."""

    def __init__(
        self, conninfo: str, *, schema: str, pool_size: int, create_tables: bool, timeout: float
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.create_tables = create_tables
        self.append_lock = lock_key(schema, "append")
        self.migrate_lock = lock_key(schema, "migrate")
        self._lock = threading.Lock()  # guards initialization
        self._pool_lock = threading.Lock()  # guards opening a pool after a fork
        self.append_turns = threading.Lock()  # this process's appends, while predicting
        self.in_flight = InFlight()
        self.pinned = threading.local()  # the connection of a thread's turn on a stream
        self.durability = Durability()  # how far the WAL is known flushed (durability.py)
        self._initialized = False
        self._closed = False
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
            connection_class=WatchedConnection,
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
        self.in_flight = InFlight()
        self.pinned = threading.local()  # a turn the forking thread held is the parent's
        self.durability = Durability()  # its condition may be held by a parent's thread
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
        except psycopg.Error as error:
            # a session ended mid-pipeline can surface as the driver's own confusion
            # ("cannot exit pipeline mode while busy") before it is marked broken
            lost = bool(used and may_hide_a_commit(used[0], error))
            raise self.failure(doing, error, broken=lost) from error

    def failure(self, doing: str, error: psycopg.Error, *, broken: bool) -> StoreError:
        """The StoreError a driver failure while ``doing`` becomes, saying what failed and
        why (a missing table: how to create it; a pool timeout: why no connection came);
        a session the server ended (``broken``) is remembered (:meth:`lost`). The async
        store's connections fail the same way and are told the same."""
        if isinstance(error, (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)):
            return StoreError(
                f"Postgres failed {doing}: {first_line(error)}. Create the tables with "
                f"`incident init URL`, or open the store with create_tables=True"
            )
        if isinstance(error, PoolTimeout):
            return StoreError(f"Postgres failed {doing}: {self._why_no_connection()}")
        if broken:
            self.lost(error)
            return StoreError(
                f"Postgres failed {doing}: the connection was lost ({first_line(error)})"
            )
        return StoreError(f"Postgres failed {doing}: {first_line(error)}")

    def lost(self, error: BaseException) -> None:
        """A session the server ended: remembered for the pool's next timeout to report,
        and the idle ones are checked now. A server that ends one (a restart, an admin's
        kill) has likely ended the others, and the pool's checkout waits a second or more
        after each dead one it finds, which would use up a caller's whole timeout."""
        self.last_lost = (time.monotonic(), first_line(error))
        with suppress(psycopg.Error):
            self.pool.check()

    def _why_no_connection(self) -> str:
        """The pool only says it timed out; one direct attempt, and what the pool's
        connections met lately, tell why. Only a pool that is really busy is told to grow."""
        try:
            psycopg.connect(self.conninfo, connect_timeout=5).close()
        except psycopg.Error as error:
            return f"the server refused a new connection: {first_line(error)}"
        timeout = float(self.pool.timeout)
        when, why = self.last_lost
        if time.monotonic() - when < timeout + 1:
            return (
                f"no pooled connection was usable for {timeout}s: the server kept ending "
                f"them (last: {why}), though it accepts new ones now"
            )
        when, why = _refused.get(self.conninfo, (-float("inf"), ""))
        if when > _connected.get(self.conninfo, -float("inf")):  # not reconnected since
            return (
                f"the pool could not connect for {timeout}s: the server refused it (last: "
                f"{why}); it accepts connections again now and the pool reconnects by itself"
            )
        if time.monotonic() - when < timeout + REFILL:  # its first connections are back
            return (
                f"no pooled connection came within {timeout}s: the pool is still "
                f"reconnecting after the server refused it (last: {why}); it accepts "
                "connections again now"
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
        """Create the schema and apply the migrations it lacks (see migrations.py)."""
        with self.connection("creating the tables") as conn, conn.transaction():
            # one migrator per schema at a time, across processes and machines
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [self.migrate_lock])
            done = migrate(conn, self.schema)
        self._initialized = True
        return done

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


def session_options(conninfo: str) -> str:
    """The ``options`` every session of the store starts with (see ``_in_utc``)."""
    return _in_utc(conninfo)


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
