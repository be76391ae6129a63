"""Async stores: the verbs of the sync stores as coroutines, for asyncio applications.

An async store holds the sync store of the same URL (``.sync``) and runs each of its
verbs off the event loop, on worker threads of its own (``workers`` of them), awaiting
the result as an asyncio future; the memory store, whose verbs never wait for anything
but its lock, runs them directly on the loop. The SQL, the row mapping, the migrations
and every guarantee are the sync store's, because they are the sync store's code:

- **SQLite.** Concurrent appends from the loop's tasks reach the store's group commit
  (:mod:`incident.stores.sqlite.group_commit`) from several worker threads at once, so
  they share one transaction and one fsync, exactly as the appends of threads do. This
  is why these stores do not use aiosqlite: aiosqlite runs one connection on one thread
  per connection object, so concurrent appends would either queue behind each other's
  fsync on one connection or open connections that fight for SQLite's write lock; the
  group commit, which is what makes SQLite appends scale, needs concurrent callers on
  threads, and that is what the workers are.
- **Postgres.** Its reads and its appends run natively on psycopg's async connections
  (:class:`incident.stores.postgres.asynchronous.AsyncPostgresEventStore`), with the
  sync store's statements (the appends as plans that both sides run), bounded by the
  flushed WAL like the sync reads, and an append acknowledged only once the WAL flush
  covers it (docs/postgres-writes.md); the rarer appends run the sync store's commit on
  the workers.

Reads that stream (``read_all``, ``stream``) are async iterators that fetch pages of
``page_size`` on the workers, so a long log never blocks the loop for long and never
sits in memory whole.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from .._forks import renew_in_forked_children
from ..errors import StoreError
from ..messages import Event, Projection, Recorded
from ..options import check_count
from ._common import closing_iterator
from .arguments import check_after, check_limit
from .async_commits import CommitBatches
from .async_live import follow_async
from .live import BATCH_SIZE, POLL_INTERVAL
from .protocols import (
    AppendRequest,
    CommitCall,
    CommitsMany,
    Committed,
    EventStore,
    Outcome,
    Owed,
    ProjectFn,
    ProjectionStore,
)

__all__ = ["PAGE_SIZE", "AsyncEventStore", "AsyncProjectionStore", "Workers"]

T = TypeVar("T")
P = TypeVar("P", bound=Projection)

#: how many events one page of ``read_all`` and ``stream`` fetches on a worker
PAGE_SIZE = 500
CLOSED = "This async store is closed (its worker threads have stopped)"


class Workers:
    """Where an async store's blocking work runs: ``count`` threads of its own, or (0)
    directly on the event loop, for stores that never block (memory)."""

    def __init__(self, count: int) -> None:
        check_count("workers", count, 0)
        self.count = count
        self.closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._batch_thread: ThreadPoolExecutor | None = None  # made on first use
        self._renew()
        renew_in_forked_children(self._renew)

    def _renew(self) -> None:
        """Fresh pools (also in a forked child, which has none of the parent's threads:
        an executor carried over would count them as idle and never run the work)."""
        self._pool = (
            ThreadPoolExecutor(self.count, thread_name_prefix="incident-store")
            if self.count
            else None
        )
        self._batch_thread = None

    async def run(self, work: Callable[[], T]) -> T:
        """``work()``'s result, computed on a worker (or here, with no workers)."""
        if self._pool is None:
            if self.closed:  # as with workers: not even a verb the store would answer
                raise StoreError(CLOSED)
            return work()
        return await self._on(self._pool, work)

    async def _on(self, pool: ThreadPoolExecutor, work: Callable[[], T]) -> T:
        """Work handed to ``pool``; StoreError once the store is closed, for work asked
        for after ``shutdown()`` and for work it cancelled before it started."""
        if self.closed:
            raise StoreError(CLOSED)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, work)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            if self.closed:
                raise StoreError(CLOSED) from None
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.closed and task is not None and not task.cancelling():
                raise StoreError(CLOSED) from None  # not this task's cancellation
            raise

    async def run_batch(self, work: Callable[[], T]) -> T:
        """``work()``'s result, computed on the one thread kept for batches of commits
        (or here, with no workers). Batches follow each other, so one thread serves
        them; the pool would hand each to whichever worker its queue woke, and on a
        virtual machine every such cross-CPU wake, and the GIL handoffs between the
        workers that follow it, cost as much as a small commit (docs/async.md)."""
        if self._pool is None:
            if self.closed:
                raise StoreError(CLOSED)
            return work()
        if self._batch_thread is None and not self.closed:
            self._batch_thread = ThreadPoolExecutor(1, thread_name_prefix="incident-commits")
        return await self._on(self._batch_thread or self._pool, work)

    def shutdown(self) -> None:
        """Stop the threads once their work is done; work not started is cancelled (its
        task gets StoreError), and so is any asked for later."""
        self.closed = True
        for pool in (self._pool, self._batch_thread):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


class AsyncEventStore:
    """An event store's verbs as coroutines (see the module's docstring): ``append``,
    ``commit``, ``get``, ``read_all`` and ``stream`` (async iterators), ``version``,
    ``last_position``, the idempotency and owed-work verbs, ``projections()``;
    ``async with`` closes it. ``.sync`` is the sync store it runs."""

    def __init__(self, store: EventStore, *, workers: int, page_size: int = PAGE_SIZE) -> None:
        check_count("page_size", page_size, 1)
        self.sync = store
        self.types = store.types
        self.workers = Workers(workers)
        self.page_size = page_size
        # a store that shares commits gets the loop's concurrent commits a batch at a
        # time, on one worker (see incident.stores.async_commits)
        self.batches: CommitBatches | None = None
        if workers and isinstance(store, CommitsMany) and store.shares_commits:
            self.batches = CommitBatches(partial(self._commit_many_on_workers, store))

    def __repr__(self) -> str:
        return f"AsyncEventStore({self.sync!r}, workers={self.workers.count})"

    async def _commit_many_on_workers(
        self, store: CommitsMany, calls: Sequence[CommitCall]
    ) -> list[Committed | Exception]:
        return await self.workers.run_batch(partial(store.commit_many, calls))

    async def run(self, work: Callable[[], T]) -> T:
        """Run blocking work on the store (a function of no arguments) off the loop."""
        return await self.workers.run(work)

    async def __aenter__(self) -> AsyncEventStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the sync store (and the projection stores sharing its database), then
        stop the workers; closing again does nothing."""
        if self.workers.closed:
            return
        try:
            await self.run(self.sync.close)
        finally:
            self.workers.shutdown()

    # -- writing -----------------------------------------------------------

    async def append(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        *,
        expected_version: object,
        aggregate: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Recorded[Any]]:
        """Append atomically if the stream is at ``expected_version``; otherwise raise
        ConcurrencyError and write nothing."""
        events = list(events)  # consumed here, not on a worker
        append = partial(
            self.sync.append,
            aggregate_id,
            events,
            expected_version=expected_version,
            aggregate=aggregate,
            metadata=metadata,
        )
        return await self.run(append)

    async def commit(
        self,
        request: AppendRequest,
        *,
        projection_store: AsyncProjectionStore | ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> Committed:
        """The sync store's one append verb (``EventStore.commit``)."""
        target = sync_projection_store(projection_store)
        if self.batches is not None:
            return await self.batches.commit(CommitCall(request, target, project))
        commit = partial(self.sync.commit, request, projection_store=target, project=project)
        return await self.run(commit)

    async def outcome_for(self, idempotency_key: str) -> Outcome | None:
        """What an earlier command with this idempotency key came to, or None."""
        return await self.run(partial(self.sync.outcome_for, idempotency_key))

    async def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        """Record that the command keyed so was rejected, unless the key already has an
        outcome; returns the outcome now stored."""
        return await self.run(
            partial(self.sync.remember_rejection, idempotency_key, reason, detail)
        )

    async def owed(self, handler: str | None = None) -> list[Owed]:
        """Follow-up work still owed, in position order, of one inline handler or all."""
        return await self.run(partial(self.sync.owed, handler))

    async def owe(self, owed: Owed) -> None:
        """Keep (or update) a record of owed work."""
        await self.run(partial(self.sync.owe, owed))

    async def settle(self, handler: str, position: int) -> None:
        """The work ``handler`` owed for the event at ``position`` is done."""
        await self.run(partial(self.sync.settle, handler, position))

    async def initialize(self) -> list[str]:
        """Create or migrate the tables, idempotently; returns what was done."""
        return await self.run(self.sync.initialize)

    # -- reading -----------------------------------------------------------

    async def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream's events with ``version > after``, in version order."""
        return await self.run(partial(self.sync.get, aggregate_id, after=after))

    async def stream(self, aggregate_id: str, *, after: int = 0) -> AsyncIterator[Recorded[Any]]:
        """The stream's events with ``version > after``, fetched a page at a time."""
        size = self.page_size
        while True:
            page = await self.stream_page(aggregate_id, after, size)
            for recorded in page:
                yield recorded
            if len(page) < size:
                return
            after = page[-1].version

    async def events(self, aggregate_id: str, *, after: int = 0) -> AsyncIterator[Event]:
        """The stream's events without their envelopes, fetched a page at a time."""
        async for recorded in self.stream(aggregate_id, after=after):
            yield recorded.data

    def read_all(self, after: int = 0, limit: int | None = None) -> AsyncIterator[Recorded[Any]]:
        """The global log from ``position > after``, in position order, a page at a time
        (a bad ``limit`` is refused here, at the call)."""
        after = check_after(after)
        check_limit(limit)
        return self._read_all(after, limit)

    async def _read_all(self, after: int, left: int | None) -> AsyncIterator[Recorded[Any]]:
        while left is None or left > 0:
            size = self.page_size if left is None else min(left, self.page_size)
            page = await self.log_page(after, size)
            for recorded in page:
                yield recorded
            if len(page) < size:
                return
            after = page[-1].position
            if left is not None:
                left -= len(page)

    async def stream_page(
        self, aggregate_id: str, after: int, size: int
    ) -> Sequence[Recorded[Any]]:
        """Up to ``size`` of the stream's events after version ``after`` (what ``stream``
        fetches at a time)."""
        return await self.run(partial(_stream_page, self.sync, aggregate_id, after, size))

    async def log_page(self, after: int, size: int) -> Sequence[Recorded[Any]]:
        """Up to ``size`` events of the log after position ``after`` (what ``read_all``
        fetches at a time)."""
        return await self.run(partial(_log_page, self.sync, after, size))

    async def version(self, aggregate_id: str) -> int:
        """The stream's current version (0 when it has no events)."""
        return await self.run(partial(self.sync.version, aggregate_id))

    async def last_position(self) -> int:
        """The position of the last event in the log (0 when it is empty)."""
        last: Callable[[], int] = getattr(self.sync, "last_position")  # noqa: B009
        return await self.run(last)

    def subscribe(
        self,
        after: int = 0,
        *,
        poll_interval: float = POLL_INTERVAL,
        batch_size: int = BATCH_SIZE,
    ) -> AsyncIterator[Recorded[Any]]:
        """The log after position ``after``, then each event as it commits, in order,
        never skipping one (``async for recorded in store.subscribe(after=N)``); waiting
        holds no worker (see :mod:`incident.stores.async_live`)."""
        return follow_async(self, after, poll_interval=poll_interval, batch_size=batch_size)

    def shares_database_with(
        self, projection_store: AsyncProjectionStore | ProjectionStore
    ) -> bool:
        """Whether ``projection_store`` is in this store's database (one commit for both)."""
        if isinstance(projection_store, AsyncProjectionStore):
            projection_store = projection_store.sync
        return self.sync.shares_database_with(projection_store)

    def projections(self) -> AsyncProjectionStore:
        """A projection store in the same database (and on the same workers)."""
        return AsyncProjectionStore(self.sync.projections(), self.workers)


class AsyncProjectionStore:
    """A projection store's verbs (``project``, ``get``, ``all``) as coroutines; one from
    ``AsyncEventStore.projections()`` shares that store's workers and database."""

    def __init__(self, store: ProjectionStore, workers: Workers) -> None:
        self.sync, self.workers = store, workers

    def __repr__(self) -> str:
        return f"AsyncProjectionStore({self.sync!r})"

    async def project(self, projection: P) -> P:
        """Upsert; never replaces a stored projection of a higher ``version``."""
        return await self.workers.run(partial(self.sync.project, projection))

    async def get(self, projection_type: type[P], key: str) -> P | None:
        """The stored projection of that type and key, or None."""
        return await self.workers.run(partial(self.sync.get, projection_type, key))

    async def all(self, projection_type: type[P]) -> list[P]:
        """Every stored projection of that type."""
        return await self.workers.run(partial(self.sync.all, projection_type))

    async def close(self) -> None:
        """Close the sync store (and the event store sharing its database), then stop
        the workers; closing again does nothing."""
        if self.workers.closed:
            return
        try:
            await self.workers.run(self.sync.close)
        finally:
            self.workers.shutdown()

    async def __aenter__(self) -> AsyncProjectionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def sync_projection_store(
    store: AsyncProjectionStore | ProjectionStore | None,
) -> ProjectionStore | None:
    """The sync store behind an async one (a sync one as it is)."""
    return store.sync if isinstance(store, AsyncProjectionStore) else store


def _stream_page(
    store: EventStore, aggregate_id: str, after: int, size: int
) -> Sequence[Recorded[Any]]:
    stream = getattr(store, "stream", None)
    if stream is None:
        return store.get(aggregate_id, after=after)[:size]
    with closing_iterator(stream(aggregate_id, after=after)) as records:
        return list(itertools.islice(records, size))


def _log_page(store: EventStore, after: int, size: int) -> list[Recorded[Any]]:
    return list(store.read_all(after=after, limit=size))
