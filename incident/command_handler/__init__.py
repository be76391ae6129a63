"""CommandHandler: the write side's only I/O loop.

validate -> route -> state (cached, else loaded and folded) -> decide -> append (expected
version, bounded retries) -> inline event handlers (their projections commit with the
events when the stores share a database) -> dispatch the commands they returned ->
return the recorded events.

Its decisions are plans, in :mod:`.core` (shared with ``AsyncCommandHandler``, which
drives them on an event loop); this module drives them on the calling thread. Its
parts, in this package: routing and name checks in :mod:`.registration`, loading
states (the cache of :mod:`.state_cache`, snapshots) in :mod:`.state_loading`, the
inline handlers run inside the append in :mod:`.inline_handlers`, the turns colliding
threads take in :mod:`.turns`; carrying out the commands handlers return is in
:mod:`incident.follow_ups`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from ..aggregate import Aggregate
from ..event_handler import EventHandler
from ..messages import Command, Recorded
from ..plans import Blocking, Collided, Dispatch, OnStream, Op, drive
from ..stores import (
    CheckpointStore,
    CommitCall,
    EventStore,
    Owed,
    ProjectionStore,
    open_event_store,
    open_projection_store,
)
from ..subscriptions import Subscription, Subscriptions
from .core import HandlerCore, HandlerParts, Tuning, idempotency_key, open_pair
from .turns import Turns

__all__ = ["CommandHandler", "idempotency_key"]


class CommandHandler(HandlerParts):
    """Dispatches commands to aggregates and runs event handlers inline.

    ``event_store`` and ``projection_store`` may be store objects or URLs;
    ``projection_store=None`` means the same database as the event store, so a command's
    events and the projections its handlers return commit in one transaction.
    ``retries`` bounds how often a command is decided again after a version conflict;
    threads of this process that collide on an aggregate take turns at it from then on
    (``self.turns``, see :mod:`.turns`), and so do the writers of every process
    where the store offers turns (``PostgresEventStore.turn``), so they stop spending
    retries on each other.
    ``cache_size`` bounds the LRU of (state, version) per aggregate: a command to an
    aggregate in it is decided without reading the store, the append's expected version
    catching a stale entry (0 turns the cache off: every command reads its stream).
    ``snapshot_every=N`` stores the state every N events (with the events, in the
    projection store) so a cold start reads the latest snapshot and what follows it; a
    state type that would not read back as it is, is refused here (see
    docs/snapshots.md). ``verify_snapshots=True`` folds the stream behind every snapshot
    read and raises SnapshotMismatch where they differ (for tests and cautious deploys).

    ``event_handlers`` run inline, inside ``dispatch``; ``subscriptions`` run durably,
    each following the log from its checkpoint in ``checkpoint_store`` (by default the
    one beside the event store), once they are started: ``self.subscriptions`` is a
    :class:`~incident.Subscriptions` (``start()``, ``catch_up()``,
    ``wait_until_caught_up()``).
    """

    def __init__(
        self,
        event_store: EventStore | str = "memory://",
        projection_store: ProjectionStore | str | None = None,
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
        # what close() closes: the stores opened here from URLs, not those passed in
        self._opened: list[EventStore | ProjectionStore] = []
        openers = (open_event_store, open_projection_store)
        events, projections = open_pair(event_store, projection_store, openers, self._opened)
        try:
            self._core = core = HandlerCore(
                events,
                projections,
                aggregates,
                event_handlers,
                Tuning(retries, backoff, cache_size, snapshot_every, verify_snapshots),
                subscriptions,
            )
            self.event_store: EventStore = events
            self.projection_store: ProjectionStore = projections
            self.adopt(core, snapshot_every, verify_snapshots)
            self.turns = Turns()
            self._store_turn = getattr(events, "turn", None)  # Postgres: processes
            self.subscriptions = Subscriptions(
                Subscription(handler, self, checkpoints=checkpoint_store)
                for handler in subscriptions
            )
        except BaseException:  # refused: nothing opened here is left open
            self.close()
            raise

    def __repr__(self) -> str:
        names = ", ".join(aggregate.name for aggregate in self.aggregates)
        return f"CommandHandler([{names}], event_store={self.event_store!r})"

    def close(self) -> None:
        """Stop the subscriptions, then close the stores this handler opened from URLs
        (the event store closes the projection and checkpoint stores that share its
        database). Stores given as objects stay open: they are the caller's to close."""
        subscriptions = getattr(self, "subscriptions", None)
        if subscriptions is not None:
            subscriptions.stop()
        opened, self._opened = self._opened, []
        for store in opened:
            store.close()

    def __enter__(self) -> CommandHandler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------

    def state(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> Any:
        """The current state of one aggregate, folded from its stream."""
        return drive(self._core.state(aggregate, aggregate_id), self._perform)

    def verify_snapshot(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> int | None:
        """Check the stored snapshot of one aggregate against its events: the version it
        was taken at, once its state equals the fold of the stream up to there; None when
        there is no snapshot this code would read; SnapshotMismatch (the first field that
        differs, both values) when they disagree."""
        core = self._core
        return core.loader.verify_snapshot(core.aggregate(aggregate), aggregate_id)

    # -- writing -----------------------------------------------------------

    def dispatch(
        self, command: Command, metadata: Mapping[str, Any] | None = None
    ) -> list[Recorded[Any]]:
        """Validate, decide, append and react; returns this command's recorded events
        (``[]`` when the aggregate decided nothing). Raises InvalidCommand, Rejected,
        ConcurrencyError (after ``retries``), RoutingError, StoreError, or FollowUpFailed
        (the command was stored; a follow-up of its inline handlers is still owed).

        Under an idempotency key the outcome is remembered, a rejection too: dispatched
        again, the command returns the first run's events (completing any follow-up
        still owed for them) or raises the first run's rejection, never decides anew."""
        return drive(self._core.dispatch(command, metadata), self._perform)

    def _perform(self, op: Op) -> Any:
        """Do one op of a plan (:mod:`incident.plans`) on this thread."""
        if isinstance(op, Blocking):
            return op.work()
        if isinstance(op, CommitCall):
            return self.event_store.commit(
                op.request, projection_store=op.projection_store, project=op.project
            )
        if isinstance(op, OnStream):
            stream = op.stream
            if not self.turns.contended(stream):  # the usual case: no turn to take
                return drive(op.plan(op.first), self._perform)
            store_turn = self._store_turn
            with self.turns.turn(stream), store_turn(stream[1]) if store_turn else nullcontext():
                # on a contended stream other processes keep the cache stale, so it
                # reads what they wrote (in its turn) rather than waste the turn
                return drive(op.plan(False), self._perform)
        if isinstance(op, Dispatch):
            return self.dispatch(op.command, op.metadata)
        if isinstance(op, Collided):
            return self.turns.collided(op.stream)
        time.sleep(op.seconds)
        return None

    # -- follow-ups: see incident.follow_ups --------------------------------------

    def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> None:
        """Dispatch what ``handler``'s listeners returned for ``cause``, each command under
        its stable key (:meth:`incident.follow_ups.FollowUps.follow_up`)."""
        drive(self._core.follow_ups.follow_up(handler, cause, steps), self._perform)

    def complete_owed(self) -> list[Owed]:
        """Carry out every follow-up this command handler's inline handlers still owe
        (after a crash, an outage or a bug between a command's commit and its
        follow-ups), oldest first; returns what was completed. One that fails again
        stays owed, with its error, and the others go on. Safe to run anywhere, any
        number of times: every follow-up command is keyed, so none runs twice."""
        return drive(self._core.complete_owed(), self._perform)

    def react(
        self,
        reaction: Any,
        cause: Recorded[Any],
        root: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
    ) -> None:
        """Carry out a listener's command, Attempt, or tuple of them, caused by ``cause``
        (:meth:`incident.follow_ups.FollowUps.react`)."""
        drive(self._core.follow_ups.react(reaction, cause, root, key=key), self._perform)
