"""The async Postgres event store: its reads and its appends on psycopg's async
connections (``psycopg_pool.AsyncConnectionPool``).

Reads (``get``, ``stream``, ``events``, ``read_all``, ``version``, ``last_position``,
``owed``; the projection store's ``get`` and ``all``) run the sync store's own
statements (:class:`.sql.EventStatements`, the projection tables' selects) and map rows
with its own mapping (``envelopes_of``, ``owed_from_row``, a table's ``decode``), on a
pool of async connections configured like the sync pool's (READ COMMITTED, UTC). Each returns only
what the flushed WAL covers, as the sync reads do (docs/postgres-writes.md): the WAL
positions are read in the same pipeline as the query, and when the flush is behind,
one small synchronous commit (``durability.FLUSH``) is run on the async connection,
one task at a time; the position known flushed is the sync store's own
(``Durability``), so a flush by either side covers both.

Appends (``commit``) go in batches, the commits the loop's tasks make at once in one
transaction on an async connection, with the sync store's batch plan and SQL
(:mod:`.async_batch`); the rarer ones (under an idempotency key among others or already
used, a projection table not yet made, a batch the server refused or lost) and the
idempotency and owed-work verbs run the sync store's code on worker threads. Either way
an append is acknowledged only once the WAL flush covers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..._forks import renew_in_forked_children
from ...errors import StoreError
from ...messages import Projection, Recorded
from .._common import check_versions, owed_from_row
from ..arguments import check_after, readable_id
from ..async_commits import CommitBatches
from ..asynchronous import CLOSED, AsyncEventStore, AsyncProjectionStore, Workers
from ..protocols import Owed
from .async_batch import AsyncBatchAppends
from .database import session_options
from .durability import FLUSH, WAL_POSITIONS, lsn
from .events import PostgresEventStore
from .inherited import opened
from .projections import PostgresProjectionStore
from .session import AsyncConnection, Query

__all__ = ["AsyncPostgresEventStore", "AsyncPostgresProjectionStore"]

P = TypeVar("P", bound=Projection)


async def _configure(conn: AsyncConnection) -> None:
    """What the sync pool's ``configure`` sets: READ COMMITTED, and UTC when the
    connection start did not already give it."""
    opened(conn)  # severed in a forked child (incident.stores.postgres.inherited)
    await conn.set_isolation_level(psycopg.IsolationLevel.READ_COMMITTED)
    if conn.info.parameter_status("TimeZone") != "UTC":
        await conn.execute("SET TimeZone TO 'UTC'")


class AsyncPostgresEventStore(AsyncEventStore):
    """An :class:`~incident.AsyncEventStore` whose reads are native async (see the
    module's docstring), with as many async connections at most as the sync store's
    pool (``pool_size``) and the same ``timeout`` for one. Its async pool belongs to the
    event loop of its first read: use the store on one loop (one ``asyncio.run``)."""

    def __init__(self, store: PostgresEventStore, *, workers: int) -> None:
        super().__init__(store, workers=workers)
        self.postgres = store
        db = store.database
        self._db = db
        self._sql = store.statements
        self._ready = False
        self._closed = False
        self._inherited: list[AsyncConnectionPool] = []  # a parent's, never touched
        self._new_pool()
        renew_in_forked_children(self.forked)
        #: appends on the async connections, the loop's concurrent ones in one transaction
        self.appends = AsyncBatchAppends(self)
        self.batches = CommitBatches(self.appends.commit_many)

    def _new_pool(self) -> None:
        """A pool not opened yet: it opens on the loop of the first read or append."""
        db = self._db
        self._pool = AsyncConnectionPool(
            db.conninfo,
            min_size=1,
            max_size=db.pool.max_size,
            kwargs={"autocommit": True, "options": session_options(db.conninfo)},
            configure=_configure,
            timeout=db.pool.timeout,
            open=False,
            name=f"incident-async:{db.schema}",
        )
        self._opened = False
        self._flushing: asyncio.Lock | None = None  # made on the loop that first flushes

    def forked(self) -> None:
        """In a child process after fork(): the pool's connections are the parent's
        sessions and its tasks the parent's loop's. Keep it referenced and unused
        (closing it would end the parent's sessions) and open a new one on the child's
        first use, as the sync store does with its pool."""
        if self._opened:
            self._inherited.append(self._pool)
        self._new_pool()

    def __repr__(self) -> str:
        return f"AsyncPostgresEventStore({self._db.describe()})"

    async def close(self) -> None:
        self._closed = True  # before any await: no task opens the pool from now on
        try:
            if self._opened and not self._pool.closed:
                await self._pool.close()
        finally:
            await super().close()

    # -- the session ----------------------------------------------------------

    async def ready(self) -> None:
        """The tables created or migrated (by the sync store's code, on a worker)."""
        if not self._ready:
            await self.run(self._db.ready)
            self._ready = True

    @asynccontextmanager
    async def connection(self, doing: str) -> AsyncIterator[AsyncConnection]:
        """A pooled async connection; driver failures become the StoreError the sync
        store raises for them (``Database.failure``)."""
        await self.ready()
        if not self._opened:
            if self._closed:  # close() found no pool to close: none may open now
                raise StoreError(CLOSED)
            self._opened = True
            await self._pool.open()
        used: list[AsyncConnection] = []
        try:
            async with self._pool.connection() as conn:
                used.append(conn)
                yield conn
        except psycopg.Error as error:
            broken = bool(used and used[0].broken)
            # off the loop: explaining a pool timeout tries a connection of its own
            failure = await asyncio.to_thread(self._db.failure, doing, error, broken=broken)
            raise failure from error

    async def _fetch(self, doing: str, query: Query, *params: Any) -> list[tuple[Any, ...]]:
        """The query's rows, once every commit it could see is flushed (the sync reads'
        ``durable_rows``, awaited)."""
        async with self.connection(doing) as conn:
            async with conn.pipeline():
                rows = await conn.execute(query, params)
                positions = await conn.execute(WAL_POSITIONS)
            found = await rows.fetchall()
            wal = await positions.fetchone()
            assert wal is not None
            await self.flushed_past(lsn(wal[0]), lsn(wal[1]), conn)
        return found

    async def flushed_past(self, inserted: int, flushed: int, conn: AsyncConnection) -> None:
        """Return once the WAL is flushed past ``inserted``: at once when the server (or
        anyone's flush) is there already, else after a flush of this loop's, one at a
        time; tasks that waited for it are covered when it reached past them."""
        durability = self._db.durability
        durability.reached(flushed)
        if durability.flushed >= inserted:
            return
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            if durability.flushed >= inserted:
                return
            row = await (await conn.execute(FLUSH)).fetchone()
            assert row is not None
            durability.reached(lsn(row[0]))

    def projections(self) -> AsyncPostgresProjectionStore:
        """The projection store in this store's schema, reading on the same async pool."""
        return AsyncPostgresProjectionStore(self.postgres.projections(), self.workers, self)

    # -- reads ------------------------------------------------------------------

    async def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream's events with ``version > after``, in version order."""
        after = check_after(after)
        if not readable_id(aggregate_id):
            return []  # no stream can have it
        doing = f"reading stream {aggregate_id!r}"
        rows = await self._fetch(doing, self._sql.stream, aggregate_id, after)
        check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        return self.postgres.envelopes_of(rows)

    async def stream_page(
        self, aggregate_id: str, after: int, size: int
    ) -> Sequence[Recorded[Any]]:
        after = check_after(after)
        if not readable_id(aggregate_id):
            return []
        doing = f"reading stream {aggregate_id!r}"
        rows = await self._fetch(doing, self._sql.stream_page, aggregate_id, after, size)
        check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        return self.postgres.envelopes_of(rows)

    async def log_page(self, after: int, size: int) -> Sequence[Recorded[Any]]:
        rows = await self._fetch("reading the log", self._sql.page, after, size)
        return self.postgres.envelopes_of(rows)

    async def version(self, aggregate_id: str) -> int:
        if not readable_id(aggregate_id):
            return 0
        doing = f"reading the version of {aggregate_id!r}"
        rows = await self._fetch(doing, self._sql.version, aggregate_id)
        return int(rows[0][0])

    async def last_position(self) -> int:
        rows = await self._fetch("reading the last position", self._sql.last_position)
        return int(rows[0][0])

    async def owed(self, handler: str | None = None) -> list[Owed]:
        if handler is None:
            rows = await self._fetch("reading owed work", self._sql.owed)
        else:
            doing = f"reading the work {handler} owes"
            rows = await self._fetch(doing, self._sql.owed_by, handler)
        return [owed_from_row(row) for row in rows]


class AsyncPostgresProjectionStore(AsyncProjectionStore):
    """Read models of a Postgres schema: ``get`` and ``all`` on the event store's async
    pool, with the sync store's statements and decoding, bounded by the flushed WAL;
    ``project`` (an upsert) and a table's creation on first use on the workers."""

    def __init__(
        self, store: PostgresProjectionStore, workers: Workers, events: AsyncPostgresEventStore
    ) -> None:
        super().__init__(store, workers)
        self.postgres, self._events = store, events

    async def _rows(self, projection_type: type[P], one: bool, *params: Any) -> list[P]:
        if not self.postgres.known([projection_type]):  # its table made, or checked, once
            await self.workers.run(partial(self.postgres.ensure_table, projection_type))
        name, select_one, select_all, decode = self.postgres.queries(projection_type)
        query = select_one if one else select_all
        rows = await self._events._fetch(f"reading {name}", query, *params)
        return [decode(text) for (text,) in rows]

    async def get(self, projection_type: type[P], key: str) -> P | None:
        """The stored projection of that type and key, or None."""
        if not readable_id(key):
            return None  # no row can have it
        rows = await self._rows(projection_type, True, key)
        return rows[0] if rows else None

    async def all(self, projection_type: type[P]) -> list[P]:
        """Every stored projection of that type, in key order."""
        return await self._rows(projection_type, False)

    async def close(self) -> None:
        """Close the event store (its async pool, the shared database, the workers)."""
        await self._events.close()
