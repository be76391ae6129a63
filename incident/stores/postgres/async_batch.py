"""The async Postgres store's appends, on its async connections: the commits its tasks
make at the same time (gathered by :class:`incident.stores.async_commits.CommitBatches`)
go to Postgres as one transaction, the batch of :mod:`.batch`, whose plan of statements
this module runs on a ``psycopg.AsyncConnection``, so a commit crosses no thread: the
loop sends the statements and awaits the replies and the shared flush.

The plan, its checks, its rows and its SQL are the sync store's (``BatchAppends.plan``);
what this adds is the driver, and the choice of what goes elsewhere, where
the sync store's own path runs it. An append alone (nothing else gathered) takes one
round trip, as a sync one does: the predicted append (:mod:`.predicted`, also a plan)
while this process is the only one writing, else the numbered one (:mod:`.numbered`:
one message, numbered by the database, its flush included).

What goes to the workers:

- an append under an idempotency key, unless it is alone (the predicted and the
  numbered append check the key in the server; a key already used, whose earlier
  outcome is read under the lock, and a keyed append among others go to the sync
  path), one with no events, and one whose projections go to another store;
- a batch that needs a projection table this process has not seen yet (the sync path
  creates it inside the append's transaction);
- a batch the server refused (a row it cannot store): nothing of it was written, and
  each append goes again by itself, so the one at fault fails alone;
- a batch whose connection died: it is looked up by its events' ids (``resolve_lost``)
  and what is not in the log goes again. (One whose flush failed after its COMMIT is
  looked up too, and never goes again.)

An append is acknowledged only once the WAL flush covers its commit, as on the sync
path: the COMMIT is asynchronous (the schema's lock is let go before the flush) and the
flush is shared with every task and thread of the process (``Durability``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from ...errors import ConcurrencyError, StoreError
from ..protocols import CommitCall, Committed
from .append_job import AppendJob, Committing
from .batch import Outcomes
from .durability import FLUSH_IF_WAITED, FLUSHED, WAL_POSITIONS, lsn
from .events import PostgresEventStore
from .plans import Plan, Tables, next_step
from .session import (
    BEGIN,
    OUT_OF_STEP,
    PREPARED_NAMES,
    AsyncConnection,
    learned_prepared,
    may_hide_a_commit,
    message_text,
    to_prepare,
    was_prepared,
)

__all__ = ["AsyncBatchAppends"]

T = TypeVar("T")


class AsyncSide(Protocol):
    """What the batches need of the async store (:mod:`.asynchronous`)."""

    postgres: PostgresEventStore

    async def ready(self) -> None: ...

    def connection(self, doing: str) -> AbstractAsyncContextManager[AsyncConnection]: ...

    async def flushed_past(self, inserted: int, flushed: int, conn: AsyncConnection) -> None: ...

    async def run(self, work: Callable[[], T]) -> T: ...


class NeedsTables(Exception):
    """A projection table this process has not seen: the batch goes to the sync path."""


class AsyncBatchAppends:
    """``commit_many`` for an :class:`~.asynchronous.AsyncPostgresEventStore`, on its
    async connections (see the module)."""

    def __init__(self, store: AsyncSide) -> None:
        self._store = store
        self._sync = store.postgres
        self._batches = store.postgres.batch_appends
        #: transactions this driver committed, and appends it left to the workers
        self.transactions = 0
        self.handed_over = 0

    async def commit_many(self, calls: Sequence[CommitCall]) -> list[Committed | Exception]:
        """Each call's outcome, in order: the ones it can take in one transaction on an
        async connection, the rest on the workers (see the module)."""
        await self._store.ready()
        prepared, outcomes = self._sync.prepare_many(calls, self._takes)
        if len(prepared) == 1:
            ((at, job),) = prepared.items()
            if await self._append_alone(at, job, outcomes):
                prepared = {}
        # a key's earlier outcome is read under the lock on the sync path: never batched
        batch = {at: job for at, job in prepared.items() if job.request.idempotency_key is None}
        if batch:
            await self._append(batch, outcomes)
        rest = [at for at in range(len(calls)) if at not in outcomes]
        if rest:  # on the workers, by the sync store's own path
            self.handed_over += len(rest)
            done = await self._store.run(
                partial(self._sync.commit_many, [calls[at] for at in rest])
            )
            outcomes.update(zip(rest, done, strict=True))
        return [outcomes[at] for at in range(len(calls))]

    def _takes(self, call: CommitCall) -> bool:
        """Whether the call may go on the async connections: it has events, and its
        projections (if any) go into this database. (A keyed one goes there only alone.)"""
        store = call.projection_store
        return bool(call.request.events) and (
            store is None or self._sync.shares_database_with(store)
        )

    async def _append_alone(self, at: int, job: AppendJob, outcomes: Outcomes) -> bool:
        """An append by itself in one round trip: on the predicted path when it is this
        process's only append and the guess holds (:mod:`.predicted`, prepared
        statements, its commit synchronous), else numbered by the database in one
        message (:mod:`.numbered`, its flush included unless it waited for the lock).
        False (nothing written) when it can go neither way: then the batch's way."""
        doing = f"appending {len(job.events)} event(s) to {job.request.aggregate_id!r}"
        db, predictor = self._sync.database, self._sync.predictor
        used: list[AsyncConnection] = []
        committed = False  # the COMMIT went through: only its flush is awaited
        try:
            with db.in_flight.one() as alone:
                async with self._store.connection(doing) as conn:
                    used.append(conn)
                    committing = None
                    # the turn a thread of this process may hold: never waited for here
                    if alone and predictor.predicting and db.append_turns.acquire(False):
                        try:
                            committing = await self._predicted(conn, job)
                        finally:
                            db.append_turns.release()
                    committing = committing or await self._numbered(conn, job)
                    if committing is None:
                        return False
                    written, positions = committing
                    assert positions is not None
                    committed = True
                    await self._store.flushed_past(lsn(positions[0]), lsn(positions[1]), conn)
        except NeedsTables:
            job.sent.clear()
            return False
        except ConcurrencyError as error:
            outcomes[at] = error
            return True
        except StoreError as error:
            # stored, its flush failed: looked up (the lookup waits for a flush), never
            # sent again; or its COMMIT's reply may be what was lost
            if not (committed or (used and may_hide_a_commit(used[0], error.__cause__))):
                outcomes[at] = error  # the server's answer: its own error, as on the sync path
                return True
            look_up = partial(self._sync.look_up_sent, job, doing, error)
            try:
                found = await self._store.run(look_up)
            except StoreError as unknown:  # CommitUnknown: not knowable in time
                outcomes[at] = unknown
                return True
            if found is None:
                job.sent.clear()
                return False  # nothing was stored: it goes again
            written = found
        recorded, effects, fresh = written
        self._sync.projections().remember(fresh)
        outcomes[at] = Committed(recorded, effects)
        return True

    async def _predicted(self, conn: AsyncConnection, job: AppendJob) -> Committing | None:
        plan = self._sync.predicted.plan(job, synchronous=True)
        if plan is None:
            return None
        try:
            written, row = await self._transaction(conn, plan, FLUSHED)
        except psycopg.Error as error:
            if self._sync.predicted.declined(job, error):  # or its ConcurrencyError
                job.sent.clear()
                return None
            raise
        self._sync.predictor.committed(written[0][-1].position)
        return written, row

    async def _numbered(self, conn: AsyncConnection, job: AppendJob) -> Committing | None:
        statements = self._sync.numbered.message(job, self._sync.channel)
        if statements is None:
            return None
        try:
            results = await _one_message_transaction(conn, statements)
        except psycopg.Error as error:
            if self._sync.numbered.declined(job, error):  # or its ConcurrencyError
                job.sent.clear()
                return None
            raise
        return self._sync.numbered.committed(job, results)

    async def _append(self, prepared: dict[int, AppendJob], outcomes: Outcomes) -> None:
        """The prepared appends in one transaction; what it could not write is left out
        of ``outcomes`` (it goes to the workers)."""
        jobs = list(prepared.items())
        doing = f"appending the events of {len(jobs)} command(s) in one transaction"
        used: list[AsyncConnection] = []
        committed = False  # the COMMIT went through: only its flush is awaited
        try:
            with self._sync.database.in_flight.one():
                async with self._store.connection(doing) as conn:
                    used.append(conn)
                    plan = self._batches.plan(jobs, outcomes)
                    written, row = await self._transaction(conn, plan, WAL_POSITIONS)
                    committed = True
                    await self._store.flushed_past(lsn(row[0]), lsn(row[1]), conn)
        except NeedsTables:
            return  # rolled back: the whole batch goes to the sync path
        except StoreError as error:
            # stored, its flush failed: looked up, never sent again; or its COMMIT's
            # reply may be what was lost
            if not (committed or (used and may_hide_a_commit(used[0], error.__cause__))):
                return  # the server said no: nothing was written, one by one
            # the appends whose rows went out: their COMMIT may have been sent, so they
            # are looked up by their ids before anything goes again
            sent = [(at, job) for at, job in jobs if job.sent]
            resolved = partial(self._batches.resolve_lost, sent, outcomes, doing, error)
            outcomes.update(await self._store.run(resolved))
            return
        self.transactions += 1
        self._batches.settle(written, outcomes)

    async def _transaction(
        self, conn: AsyncConnection, plan: Plan[T], then: str
    ) -> tuple[T, tuple[Any, ...]]:
        """BEGIN, the plan's statements, COMMIT and ``then`` (a row of WAL positions) in
        one pipeline, as ``one_sync_transaction`` does on a sync connection; a failure
        rolls back. The plan's result, and ``then``'s row."""
        failed: psycopg.Error | None = None
        try:
            async with conn.pipeline():
                try:
                    await conn.execute(BEGIN)
                    result = await self._run(conn, plan)
                    await conn.execute("COMMIT")
                    positions = await conn.execute(then)
                except psycopg.Error as error:
                    failed = error  # the pipeline's sync then says it was aborted
        except BaseException:
            await _roll_back(conn)
            if failed is not None:
                raise failed from None
            raise
        if failed is not None:
            await _roll_back(conn)
            raise failed
        row: tuple[Any, ...] | None = await positions.fetchone()
        assert row is not None
        return result, row

    async def _run(self, conn: AsyncConnection, plan: Plan[T]) -> T:
        """The plan's statements on the async connection (``plans.run``, awaited); a
        projection table not known to exist stops it (NeedsTables)."""
        reply: Any = None
        while True:
            step, result = next_step(plan, reply)
            if step is None:
                return result  # type: ignore[return-value]  # a plan's end: its value
            if isinstance(step, Tables):
                if not self._sync.projections().known(step.types):
                    raise NeedsTables
                reply = []  # no table made here
            elif step.rows:
                reply = await (await conn.execute(step.query, step.params)).fetchall()
            else:
                await conn.execute(step.query, step.params)
                reply = None


async def _one_message_transaction(
    conn: AsyncConnection, statements: Sequence[tuple[str, Sequence[Any]]]
) -> list[list[tuple[Any, ...]] | None]:
    """``prepared_message_transaction`` of :mod:`.session` with FLUSH_IF_WAITED, awaited."""
    for attempt in range(2):
        try:
            missing, calls = to_prepare(conn, statements)
            for statement in missing:  # once per session and statement, outside a transaction
                await conn.execute(statement.prepare)
                was_prepared(conn, statement)
            cursor = psycopg.AsyncClientCursor(conn)
            try:
                await cursor.execute(message_text(cursor, calls, FLUSH_IF_WAITED))
                results: list[list[tuple[Any, ...]] | None] = []
                while True:
                    results.append(await cursor.fetchall() if cursor.description else None)
                    if not cursor.nextset():
                        break
            except BaseException:
                await _roll_back(conn)
                raise
            return results[1:-2] + results[-1:]  # neither BEGIN's nor COMMIT's
        except OUT_OF_STEP:
            if attempt:
                raise
            await _roll_back(conn)
            learned_prepared(conn, await (await conn.execute(PREPARED_NAMES)).fetchall())
    raise AssertionError("unreachable")  # pragma: no cover


async def _roll_back(conn: AsyncConnection) -> None:
    """``roll_back`` of :mod:`.session`, awaited (psycopg's rollback also forgets the
    statements it prepared in a failed pipeline)."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):  # a broken connection: the pool drops it
            await conn.rollback()
