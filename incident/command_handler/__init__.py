"""CommandHandler: the write side's only I/O loop.

validate -> route -> state (cached, else loaded and folded) -> decide -> append (expected
version, bounded retries) -> inline event handlers (their projections commit with the
events when the stores share a database) -> dispatch the commands they returned ->
return the recorded events.

Its parts, in this package: routing and name checks in :mod:`.registration`, loading
states (the cache of :mod:`.state_cache`, snapshots) in :mod:`.state_loading`, the
inline handlers run inside the append in :mod:`.inline_handlers`, the turns colliding
threads take in :mod:`.turns`; carrying out the commands handlers return is in
:mod:`incident.follow_ups`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from ..aggregate import Aggregate
from ..codec import validate_command
from ..errors import (
    ConcurrencyError,
    DuplicateCommand,
    InvalidCommand,
    RegistrationError,
    Rejected,
    RoutingError,
)
from ..event_handler import EventHandler
from ..follow_ups import IDEMPOTENCY_KEY, FollowUp, FollowUps
from ..ids import new_uuid
from ..messages import Command, Recorded
from ..stores import (
    AppendRequest,
    CheckpointStore,
    EventStore,
    Outcome,
    Owed,
    ProjectionStore,
    open_event_store,
    open_projection_store,
)
from ..subscriptions import Subscription, Subscriptions
from .inline_handlers import InlineHandlers
from .registration import register_event_types, routes
from .state_cache import StateCache
from .state_loading import StateLoader
from .turns import Turns

__all__ = ["CommandHandler"]

log = logging.getLogger("incident")


class CommandHandler:
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
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        # what close() closes: the stores opened here from URLs, not those passed in
        self._opened: list[EventStore | ProjectionStore] = []
        if isinstance(event_store, str):
            event_store = open_event_store(event_store)
            self._opened.append(event_store)
        self.event_store: EventStore = event_store
        if projection_store is None:
            projection_store = self.event_store.projections()
        elif isinstance(projection_store, str):
            projection_store = open_projection_store(projection_store)
            self._opened.append(projection_store)
        self.projection_store: ProjectionStore = projection_store
        self.aggregates = tuple(aggregates)
        self.event_handlers = tuple(event_handlers)
        self.retries = retries
        self.backoff = backoff
        self.cache = StateCache(cache_size)
        self.turns = Turns()
        self.snapshot_every = snapshot_every
        self.verify_snapshots = verify_snapshots
        self._loader = StateLoader(
            self.event_store,
            self.projection_store,
            self.cache,
            self.aggregates,
            snapshot_every=snapshot_every,
            verify_snapshots=verify_snapshots,
        )
        self._load = self._loader.load  # bound once: the command path calls it often
        self._routes = routes(self.aggregates)
        self._by_name = {aggregate.name: aggregate for aggregate in self.aggregates}
        register_event_types(self.event_store.types, self.aggregates)
        both = {h.name for h in self.event_handlers} & {h.name for h in subscriptions}
        if both:
            raise RegistrationError(
                f"{', '.join(sorted(both))} cannot run both inline and as a subscription"
            )
        self._inline = InlineHandlers(
            self.event_handlers,
            route=self.aggregate_for,
            snapshot=None if snapshot_every is None else self._loader.snapshot,
        )
        self._follow_ups = FollowUps(
            dispatch=self.dispatch,
            event_store=self.event_store,
            handlers=self.event_handlers,
            aggregate=self._aggregate,
            check=self._inline.check_reaction,
        )
        self.subscriptions = Subscriptions(
            Subscription(handler, self, checkpoints=checkpoint_store) for handler in subscriptions
        )

    def __repr__(self) -> str:
        names = ", ".join(aggregate.name for aggregate in self.aggregates)
        return f"CommandHandler([{names}], event_store={self.event_store!r})"

    def close(self) -> None:
        """Stop the subscriptions, then close the stores this handler opened from URLs
        (the event store closes the projection and checkpoint stores that share its
        database). Stores given as objects stay open: they are the caller's to close."""
        self.subscriptions.stop()
        opened, self._opened = self._opened, []
        for store in opened:
            store.close()

    def __enter__(self) -> CommandHandler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------

    def aggregate_for(self, command: Command) -> Aggregate[Any]:
        aggregate = self._routes.get(type(command))
        if aggregate is None:
            handled = ", ".join(sorted(t.__name__ for t in self._routes)) or "nothing"
            raise RoutingError(
                f"No aggregate handles {type(command).__name__}; this command handler "
                f"routes: {handled}"
            )
        return aggregate

    def _aggregate(self, aggregate: Aggregate[Any] | str) -> Aggregate[Any]:
        if isinstance(aggregate, Aggregate):
            return aggregate
        found = self._by_name.get(aggregate)
        if found is None:
            raise RoutingError(
                f"No aggregate named {aggregate!r}; known: {', '.join(sorted(self._by_name))}"
            )
        return found

    def state(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> Any:
        """The current state of one aggregate, folded from its stream."""
        return self._load(self._aggregate(aggregate), aggregate_id)[0]

    def verify_snapshot(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> int | None:
        """Check the stored snapshot of one aggregate against its events: the version it
        was taken at, once its state equals the fold of the stream up to there; None when
        there is no snapshot this code would read; SnapshotMismatch (the first field that
        differs, both values) when they disagree."""
        return self._loader.verify_snapshot(self._aggregate(aggregate), aggregate_id)

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
        validate_command(command)
        aggregate = self.aggregate_for(command)
        meta = dict(metadata or {})
        meta.setdefault("correlation_id", new_uuid())
        meta.setdefault("causation_id", None)
        key = idempotency_key(command, meta)
        if key is not None:
            meta[IDEMPOTENCY_KEY] = key
            earlier = self.event_store.outcome_for(key)
            if earlier is not None:
                return self._replay_outcome(command, earlier)
        try:
            recorded, follow_ups = self._decide_and_append(aggregate, command, meta, key)
        except Rejected as rejection:
            rejection.command = command
            if key is None:
                raise
            # remembered, so a replay of the key takes this branch again whatever the
            # state by then; a racing twin that succeeded first wins instead
            stored = self.event_store.remember_rejection(key, rejection.reason, rejection.detail)
            if stored.rejected is None:
                return self._replay_outcome(command, stored)
            raise
        self._follow_ups.carry_out(recorded, follow_ups)
        return recorded

    def _replay_outcome(self, command: Command, outcome: Outcome) -> list[Recorded[Any]]:
        if outcome.rejected is not None:
            rejection = Rejected(outcome.rejected, outcome.detail)
            rejection.command = command
            raise rejection
        self._follow_ups.complete_owed_for(outcome.recorded)  # what the first run left undone
        return outcome.recorded

    def _decide_and_append(
        self,
        aggregate: Aggregate[Any],
        command: Command,
        metadata: dict[str, Any],
        key: str | None = None,
    ) -> tuple[list[Recorded[Any]], list[FollowUp]]:
        aggregate_id = command.aggregate_id
        stream = (aggregate.name, aggregate_id)
        for attempt in range(self.retries + 1):
            try:
                if not self.turns.contended(stream):  # the usual case: no turn to take
                    # the first attempt trusts the cache: the append's expected version
                    # catches a stale state, and the retry reads what was missed
                    return self._attempt(aggregate, command, metadata, key, attempt == 0)
                store_turn = getattr(self.event_store, "turn", None)  # Postgres: processes
                with (
                    self.turns.turn(stream),
                    store_turn(aggregate_id) if store_turn else nullcontext(),
                ):
                    # on a contended stream other processes keep the cache stale, so it
                    # reads what they wrote (in its turn) rather than waste the turn
                    return self._attempt(aggregate, command, metadata, key, False)
            except ConcurrencyError:
                # from now on this process's threads take turns at this aggregate; the
                # jittered, growing pause spreads out the writers of other processes
                self.turns.collided(stream)
                if attempt == self.retries:
                    raise
                time.sleep(random.uniform(0, min(0.05, self.backoff * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self,
        aggregate: Aggregate[Any],
        command: Command,
        metadata: dict[str, Any],
        key: str | None,
        trust_cache: bool,
    ) -> tuple[list[Recorded[Any]], list[FollowUp]]:
        """Decide once and append with the version decided on (ConcurrencyError when
        another writer got there first)."""
        aggregate_id = command.aggregate_id
        state, version, events = self._decide(aggregate, command, trust_cache=trust_cache)
        if not events:
            return [], []
        request = AppendRequest(
            aggregate_id=aggregate_id,
            events=events,
            expected_version=version,
            aggregate=aggregate.name,
            metadata=metadata,
            idempotency_key=key,
        )
        project = self._inline.projector(aggregate, aggregate_id, state)
        try:
            committed = self.event_store.commit(
                request, projection_store=self.projection_store, project=project
            )
        except DuplicateCommand as duplicate:  # a racing twin committed first
            if duplicate.rejected is not None:
                raise Rejected(duplicate.rejected, duplicate.detail) from None
            return duplicate.recorded, []  # the twin carries out what it owes
        recorded = committed.recorded
        # cached only now that the events are committed; project() ran inside the
        # transaction and its result is the state it reached: no second fold
        reached, follow_ups = committed.effects.result
        self.cache.put((aggregate.name, aggregate_id), reached, recorded[-1].version)
        return recorded, follow_ups

    def _decide(
        self, aggregate: Aggregate[Any], command: Command, *, trust_cache: bool
    ) -> tuple[Any, int, list[Any]]:
        """(state, version, events decided). On a cached state the store is not read; a
        rejection or an empty decision there may come from a stale state, so it stands
        only once the events after the cached version have been read and folded."""
        aggregate_id = command.aggregate_id
        cached = self.cache.get((aggregate.name, aggregate_id)) if trust_cache else None
        if cached is not None:
            state, version = cached
            try:
                events = aggregate.decide(state, command)
            except Rejected:
                events = []
            if events:
                return state, version, events
        state, version = self._load(aggregate, aggregate_id)
        return state, version, aggregate.decide(state, command)

    # -- follow-ups: see incident.follow_ups --------------------------------------

    def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> None:
        """Dispatch what ``handler``'s listeners returned for ``cause``, each command under
        its stable key (:meth:`incident.follow_ups.FollowUps.follow_up`)."""
        self._follow_ups.follow_up(handler, cause, steps)

    def complete_owed(self) -> list[Owed]:
        """Carry out every follow-up this command handler's inline handlers still owe
        (after a crash, an outage or a bug between a command's commit and its
        follow-ups), oldest first; returns what was completed. One that fails again
        stays owed, with its error, and the others go on. Safe to run anywhere, any
        number of times: every follow-up command is keyed, so none runs twice."""
        return self._follow_ups.complete_owed()

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
        self._follow_ups.react(reaction, cause, root, key=key)


def idempotency_key(command: Command, metadata: Mapping[str, Any]) -> str | None:
    """The command's idempotency key: its ``idempotency_key`` field, else the metadata's."""
    key = getattr(command, IDEMPOTENCY_KEY, None) or metadata.get(IDEMPOTENCY_KEY)
    if key is not None and not isinstance(key, str):
        raise InvalidCommand(type(command).__name__, IDEMPOTENCY_KEY, "must be a str")
    return key or None
