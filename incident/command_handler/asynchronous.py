"""AsyncCommandHandler: the command handler for asyncio applications.

It runs the same plans as :class:`~incident.CommandHandler` (:mod:`.core`: validate,
route, decide, retry, commit, follow-ups), on the event loop: a plan's store work goes
to the async store's worker threads and is awaited, its follow-up dispatches are
awaited dispatches of this handler, its backoff is ``asyncio.sleep``. So the aggregates,
the inline event handlers, Attempts, idempotency, owed follow-ups, snapshots and errors
are the sync handler's, by construction, and the domain code is the same.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from ..aggregate import Aggregate
from ..event_handler import EventHandler
from ..messages import Command, Recorded
from ..plans import Blocking, Collided, Dispatch, OnStream, Op, Plan, advance
from ..stores import (
    AsyncEventStore,
    AsyncProjectionStore,
    CheckpointStore,
    CommitCall,
    Owed,
    open_async_event_store,
    open_async_projection_store,
)
from .async_subscriptions import AsyncSubscriptions, LoopReactor
from .core import HandlerCore, HandlerParts, Tuning, open_pair

__all__ = ["AsyncCommandHandler", "TaskTurns"]

Key = tuple[str, str]  # (aggregate name, aggregate id)
T = TypeVar("T")


class TaskTurns:
    """Tasks that collided on a stream take turns at it from then on (an asyncio lock
    per stream), so they stop spending retries on each other; the asyncio twin of
    :class:`~incident.command_handler.turns.Turns`. The ``size`` streams collided on
    last are remembered."""

    def __init__(self, size: int = 10_000) -> None:
        self._locks: OrderedDict[Key, asyncio.Lock] = OrderedDict()
        self._size = size

    def contended(self, stream: Key) -> bool:
        """Whether tasks have collided on ``stream`` (so its commands take turns)."""
        return stream in self._locks

    def collided(self, stream: Key) -> None:
        """Tasks collided on ``stream``: its commands take turns from now on."""
        if stream in self._locks:
            self._locks.move_to_end(stream)
            return
        self._locks[stream] = asyncio.Lock()
        while len(self._locks) > self._size:
            # the oldest idle one (there is one: the lock just made): forgetting a held
            # lock would let two tasks in at once
            idle = next(k for k, lock in self._locks.items() if not lock.locked())
            del self._locks[idle]

    def turn(self, stream: Key) -> asyncio.Lock:
        """The stream's lock (the stream must have collided)."""
        self._locks.move_to_end(stream)
        return self._locks[stream]


class AsyncCommandHandler(HandlerParts):
    """Dispatches commands to aggregates, with ``await``: the constructor of
    :class:`~incident.CommandHandler` (stores as async store objects or URLs,
    ``aggregates``, ``event_handlers``, ``retries``, ``backoff``, ``cache_size``,
    ``snapshot_every``, ``verify_snapshots``), and ``await dispatch(command,
    metadata=None)``, ``await state(aggregate, aggregate_id)``, ``await
    complete_owed()``, ``async with`` / ``await close()``.

    Tasks that collide on an aggregate take turns at it (:class:`TaskTurns`); the
    turns Postgres offers writers of several processes (``PostgresEventStore.turn``)
    are not taken here, so across processes the expected version and the retries
    alone decide. Durable subscriptions (``subscriptions=``, their checkpoints in
    ``checkpoint_store``, a sync checkpoint store, by default the one beside the event
    store) are ``self.subscriptions``: ``await start()``, ``await catch_up()``, ...
    (:class:`~incident.command_handler.async_subscriptions.AsyncSubscriptions`).
    """

    def __init__(
        self,
        event_store: AsyncEventStore | str = "memory://",
        projection_store: AsyncProjectionStore | str | None = None,
        *,
        aggregates: Sequence[Aggregate[Any]] = (),
        event_handlers: Sequence[EventHandler] = (),
        subscriptions: Sequence[EventHandler] = (),
        checkpoint_store: CheckpointStore | None = None,
        retries: int = 10,
        backoff: float = 0.002,
        cache_size: int = 10_000,
        snapshot_every: int | None = None,
        verify_snapshots: bool = False,
    ) -> None:
        if not isinstance(event_store, (AsyncEventStore, str)):
            raise TypeError(
                f"AsyncCommandHandler needs an async event store or a URL, got "
                f"{event_store!r}; open one with incident.open_async_event_store(url)"
            )
        # what close() closes: the stores opened here from URLs, not those passed in
        self._opened: list[AsyncEventStore | AsyncProjectionStore] = []
        events, projections = open_pair(
            event_store,
            projection_store,
            (open_async_event_store, open_async_projection_store),
            self._opened,
        )
        self.event_store: AsyncEventStore = events
        self.projection_store: AsyncProjectionStore = projections
        try:
            self._core = core = HandlerCore(
                events.sync,
                projections.sync,
                aggregates,
                event_handlers,
                Tuning(retries, backoff, cache_size, snapshot_every, verify_snapshots),
                subscriptions,
            )
            self.adopt(core, snapshot_every, verify_snapshots)
            self.turns = TaskTurns()
            reactor = LoopReactor(self, events.sync, projections.sync)
            #: the durable subscriptions, each an asyncio task once ``await start()``ed
            self.subscriptions = AsyncSubscriptions(reactor, subscriptions, checkpoint_store)
        except BaseException:
            for store in self._opened:  # no loop to await on here: closed directly
                store.sync.close()
                store.workers.shutdown()
            raise
        # store work runs on the event store's workers, else the projection store's
        # (a memory event store beside a SQLite projection store)
        workers = events.workers
        self._workers = workers if workers.count else projections.workers

    def __repr__(self) -> str:
        names = ", ".join(aggregate.name for aggregate in self.aggregates)
        return f"AsyncCommandHandler([{names}], event_store={self.event_store!r})"

    async def close(self) -> None:
        """Stop the subscriptions, then close the stores this handler opened from URLs;
        stores given as objects stay open (they are the caller's to close)."""
        await self.subscriptions.stop()
        opened, self._opened = self._opened, []
        for store in opened:
            await store.close()

    async def __aenter__(self) -> AsyncCommandHandler:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def state(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> Any:
        """The current state of one aggregate, folded from its stream."""
        return await self._run(self._core.state(aggregate, aggregate_id))

    async def dispatch(
        self, command: Command, metadata: Mapping[str, Any] | None = None
    ) -> list[Recorded[Any]]:
        """``CommandHandler.dispatch``, awaited: validate, decide, append and react;
        returns this command's recorded events, raises what it raises."""
        return await self._run(self._core.dispatch(command, metadata))

    async def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> None:
        """Dispatch what a subscription's listeners returned for ``cause``, each command
        under its stable key (``CommandHandler.follow_up``)."""
        await self._run(self._core.follow_ups.follow_up(handler, cause, steps))

    async def complete_owed(self) -> list[Owed]:
        """Carry out every follow-up the inline handlers still owe
        (``CommandHandler.complete_owed``)."""
        return await self._run(self._core.complete_owed())

    async def _run(self, plan: Plan[T]) -> T:
        """Drive a plan on the loop: the async twin of :func:`incident.plans.drive`."""
        value: Any = None
        error: BaseException | None = None
        while True:
            done, out = advance(plan, value, error)
            if done:
                result: T = out
                return result
            try:
                value, error = await self._perform(out), None
            except Exception as failed:  # the plan decides what an error means
                value, error = None, failed

    async def _perform(self, op: Op) -> Any:
        if isinstance(op, Blocking):
            return await self._workers.run(op.work)
        if isinstance(op, CommitCall):
            batches = self.event_store.batches
            if batches is not None:  # with the loop's other commits (async_commits)
                return await batches.commit(op)
            commit = partial(
                self._core.event_store.commit,
                op.request,
                projection_store=op.projection_store,
                project=op.project,
            )
            return await self._workers.run(commit)
        if isinstance(op, OnStream):
            if not self.turns.contended(op.stream):
                return await self._run(op.plan(op.first))
            async with self.turns.turn(op.stream):
                return await self._run(op.plan(False))
        if isinstance(op, Dispatch):
            return await self.dispatch(op.command, op.metadata)
        if isinstance(op, Collided):
            return self.turns.collided(op.stream)
        await asyncio.sleep(op.seconds)
        return None
