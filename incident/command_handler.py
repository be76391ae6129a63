"""CommandHandler: the write side's only I/O loop.

validate -> route -> state (cached, else loaded and folded) -> decide -> append (expected
version, bounded retries) -> inline event handlers (their projections commit with the
events when the stores share a database) -> dispatch the commands they returned ->
return the recorded events.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

from .aggregate import Aggregate
from .codec import validate_command
from .errors import (
    ConcurrencyError,
    DuplicateCommand,
    ForeignStream,
    InvalidCommand,
    RegistrationError,
    Rejected,
    RoutingError,
)
from .event_handler import Attempt, EventHandler
from .follow_ups import IDEMPOTENCY_KEY, FollowUp, FollowUps, owed_by, split_outputs
from .messages import Command, Projection, Recorded, event_type_name
from .snapshots import (
    Snapshot,
    check_snapshottable,
    code_key,
    load_snapshot,
    snapshot_key,
    take_snapshot,
    verify_snapshot,
)
from .state_cache import StateCache
from .stores import (
    CheckpointStore,
    Effects,
    EventStore,
    Outcome,
    Owed,
    ProjectFn,
    ProjectionStore,
    open_event_store,
    open_projection_store,
)
from .stores._common import closing_iterator, new_uuid
from .subscriptions import Subscription, Subscriptions
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
    (``self.turns``, see :mod:`incident.turns`), and so do the writers of every process
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
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1 or None, got {snapshot_every}")
        self.snapshot_every = snapshot_every
        self.verify_snapshots = verify_snapshots
        self._codes: dict[str, str] = {}
        if snapshot_every is not None:
            for aggregate in self.aggregates:
                check_snapshottable(aggregate)
                self._codes[aggregate.name] = code_key(aggregate)
        self._routes = _routes(self.aggregates)
        _refuse_shared_names(self.aggregates)
        self._by_name = {aggregate.name: aggregate for aggregate in self.aggregates}
        for aggregate in self.aggregates:
            self.event_store.types.register(*aggregate.event_types)
            for (name, version), upcaster in aggregate.upcasters.items():
                self.event_store.types.register_upcaster(name, version, upcaster)
        both = {h.name for h in self.event_handlers} & {h.name for h in subscriptions}
        if both:
            raise RegistrationError(
                f"{', '.join(sorted(both))} cannot run both inline and as a subscription"
            )
        self._follow_ups = FollowUps(
            dispatch=self.dispatch,
            event_store=self.event_store,
            handlers=self.event_handlers,
            aggregate=self._aggregate,
            check=self._check_reaction,
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

    def _from_snapshot(
        self, aggregate: Aggregate[Any], aggregate_id: str
    ) -> tuple[Any, int] | None:
        if self.snapshot_every is None:
            return None
        stored = self.projection_store.get(Snapshot, snapshot_key(aggregate, aggregate_id))
        loaded = load_snapshot(aggregate, stored, self._codes[aggregate.name])
        if loaded is not None and self.verify_snapshots:
            with closing_iterator(self.event_store.events(aggregate_id)) as events:
                verify_snapshot(aggregate, aggregate_id, loaded, events)
        return loaded

    def verify_snapshot(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> int | None:
        """Check the stored snapshot of one aggregate against its events: the version it
        was taken at, once its state equals the fold of the stream up to there; None when
        there is no snapshot this code would read; SnapshotMismatch (the first field that
        differs, both values) when they disagree."""
        aggregate = self._aggregate(aggregate)
        code = self._codes.get(aggregate.name) or code_key(aggregate)
        stored = self.projection_store.get(Snapshot, snapshot_key(aggregate, aggregate_id))
        loaded = load_snapshot(aggregate, stored, code)
        if loaded is None:
            return None
        with closing_iterator(self.event_store.events(aggregate_id)) as events:
            verify_snapshot(aggregate, aggregate_id, loaded, events)
        return loaded[1]

    def _load(self, aggregate: Aggregate[Any], aggregate_id: str) -> tuple[Any, int]:
        """(state, version): from the cache plus the events after it, else the whole stream."""
        key = (aggregate.name, aggregate_id)
        state, version = (
            self.cache.get(key)
            or self._from_snapshot(aggregate, aggregate_id)
            or (aggregate.initial, 0)
        )
        # the events alone (no envelopes), streamed; versions have no gaps
        try:
            with closing_iterator(self.event_store.events(aggregate_id, after=version)) as newer:
                state, count = aggregate.fold_count(newer, state)
        except RoutingError:
            self._refuse_foreign_stream(aggregate, aggregate_id)
            raise
        if count:
            version += count
            self.cache.put(key, state, version)
        return state, version

    def _refuse_foreign_stream(self, aggregate: Aggregate[Any], aggregate_id: str) -> None:
        """A fold that met an event this aggregate does not apply: when the stream is
        another aggregate's, say so (the usual cause) instead of naming the event."""
        first = next(iter(self.event_store.get(aggregate_id)), None)
        if first is not None and first.aggregate and first.aggregate != aggregate.name:
            raise ForeignStream(aggregate_id, aggregate.name, first.aggregate)

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
        aggregate_id: str = command.aggregate_id  # type: ignore[attr-defined]
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
        aggregate_id: str = command.aggregate_id  # type: ignore[attr-defined]
        state, version, events = self._decide(aggregate, command, trust_cache=trust_cache)
        if not events:
            return [], []
        follow_ups: list[FollowUp] = []
        after: list[Any] = []  # the state after the new events, as project() saw it
        project = self._projector(aggregate, aggregate_id, state, follow_ups, after)
        try:
            recorded = self.event_store.append_and_project(
                aggregate_id,
                events,
                expected_version=version,
                aggregate=aggregate.name,
                metadata=metadata,
                projection_store=self.projection_store,
                project=project,
                idempotency_key=key,
            )
        except DuplicateCommand as duplicate:  # a racing twin committed first
            if duplicate.rejected is not None:
                raise Rejected(duplicate.rejected, duplicate.detail) from None
            return duplicate.recorded, []  # the twin carries out what it owes
        # cached only now that the events are committed; stores call project() inside
        # the transaction, so the state it reached is not folded a second time
        reached = after[0] if after else aggregate.fold(recorded, state)
        self.cache.put((aggregate.name, aggregate_id), reached, recorded[-1].version)
        return recorded, follow_ups

    def _decide(
        self, aggregate: Aggregate[Any], command: Command, *, trust_cache: bool
    ) -> tuple[Any, int, list[Any]]:
        """(state, version, events decided). On a cached state the store is not read; a
        rejection or an empty decision there may come from a stale state, so it stands
        only once the events after the cached version have been read and folded."""
        aggregate_id: str = command.aggregate_id  # type: ignore[attr-defined]
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

    def _projector(
        self,
        aggregate: Aggregate[Any],
        aggregate_id: str,
        state: Any,
        follow_ups: list[FollowUp],
        after: list[Any],
    ) -> ProjectFn:
        """What runs inside the append's transaction: the inline handlers, pure. It
        returns the projections to commit with the events and, for every handler that
        returned commands for an event, a record that it owes them (committed with the
        events too); it collects those commands in ``follow_ups`` and leaves the state
        after the events in ``after``."""

        def project(recorded: list[Recorded[Any]]) -> Effects:
            follow_ups.clear()  # the store may call this more than once
            after.clear()
            projections: list[Projection] = []
            current = state
            for record in recorded:
                current = aggregate.evolve(current, record)
                for handler in self.event_handlers:
                    outputs = handler.outputs(record, current)
                    if not outputs:
                        continue
                    steps = split_outputs(outputs, projections)
                    if steps:
                        for _, commands in steps:
                            for output in commands:
                                self._check_reaction(output)
                        follow_ups.append((owed_by(handler.name, record), record, steps))
                every = self.snapshot_every
                if every is not None and record.version % every == 0:
                    code = self._codes[aggregate.name]
                    snapshot = take_snapshot(aggregate, aggregate_id, current, record.version, code)
                    if snapshot is not None:
                        projections.append(snapshot)
            after.append(current)
            return Effects(projections, [owed for owed, _, _ in follow_ups])

        return project

    def _check_reaction(self, reaction: Any) -> None:
        """Validate and route a listener's commands (every branch) inside the transaction,
        so a listener bug stores nothing rather than failing after its cause committed."""
        if isinstance(reaction, tuple):
            for step in reaction:
                self._check_reaction(step)
        elif isinstance(reaction, Attempt):
            self._check_reaction(reaction.command)
            self._check_reaction(reaction.on_success)
            if not callable(reaction.on_rejected):  # checked once it has answered
                self._check_reaction(reaction.on_rejected)
        else:
            self.aggregate_for(validate_command(reaction))

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


def _refuse_shared_names(aggregates: Iterable[Aggregate[Any]]) -> None:
    """Stored event type names are one name space per store: two aggregates may share an
    Event class, but not store two different classes under one name."""
    seen: dict[str, tuple[Aggregate[Any], type[Any]]] = {}
    for aggregate in aggregates:
        for event_type in aggregate.event_types:
            name = event_type_name(event_type)
            other = seen.setdefault(name, (aggregate, event_type))
            if other[1] is not event_type:
                first, second = (f"{t.__module__}.{t.__qualname__}" for t in (other[1], event_type))
                raise RegistrationError(
                    f"{other[0].name} and {aggregate.name} both store an event as {name!r} "
                    f"({first} and {second}); a store could not tell them apart: give one a "
                    f"name of its own, e.g. class {event_type.__name__}(incident.Event, "
                    f'tag="{aggregate.name.title().replace("_", "")}{event_type.__name__}")'
                )


def _routes(aggregates: Iterable[Aggregate[Any]]) -> dict[type[Command], Aggregate[Any]]:
    routes: dict[type[Command], Aggregate[Any]] = {}
    names: dict[str, Aggregate[Any]] = {}
    for aggregate in aggregates:
        if aggregate.name in names:
            raise RegistrationError(f"Two aggregates are named {aggregate.name!r}")
        names[aggregate.name] = aggregate
        for command_type in aggregate.command_types:
            other = routes.get(command_type)
            if other is not None:
                raise RegistrationError(
                    f"{command_type.__name__} is handled by both {other.name} and "
                    f"{aggregate.name}; a command type must belong to one aggregate"
                )
            routes[command_type] = aggregate
    return routes
