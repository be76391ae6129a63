"""The command handler's decisions, once, as plans (:mod:`incident.plans`): validate,
route, read the idempotency key's outcome, decide (on the cached state, else on the
loaded one), build the append request, retry after a conflict, interpret the commit
(or the racing twin's), and carry out the follow-ups. ``CommandHandler`` drives these
plans on the calling thread, ``AsyncCommandHandler`` on an event loop: they differ only
in how they wait for the stores."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple, Protocol, TypeVar

from .. import storable
from ..aggregate import Aggregate
from ..codec import validate_command
from ..errors import (
    ConcurrencyError,
    DuplicateCommand,
    InvalidCommand,
    RegistrationError,
    Rejected,
    RoutingError,
    Unstorable,
)
from ..event_handler import EventHandler
from ..follow_ups import IDEMPOTENCY_KEY, FollowUp, FollowUps
from ..ids import new_uuid
from ..messages import Command, Recorded
from ..options import check_count, check_seconds
from ..plans import Blocking, Collided, OnStream, Pause, Plan
from ..stores import AppendRequest, CommitCall, EventStore, Outcome, Owed, ProjectionStore
from .inline_handlers import InlineHandlers
from .registration import register_event_types, routes
from .state_cache import StateCache
from .state_loading import StateLoader

__all__ = ["HandlerCore", "HandlerParts", "Tuning", "idempotency_key", "open_pair"]


class OpensProjections(Protocol):
    def projections(self) -> Any: ...


E = TypeVar("E", bound=OpensProjections)
S = TypeVar("S")


class Tuning(NamedTuple):
    """A command handler's retry, cache and snapshot options (``CommandHandler``'s)."""

    retries: int
    backoff: float
    cache_size: int
    snapshot_every: int | None
    verify_snapshots: bool


class HandlerCore:
    """Everything a command handler decides, over sync stores, as plans; the options are
    ``CommandHandler``'s (see its docstring)."""

    def __init__(
        self,
        event_store: EventStore,
        projection_store: ProjectionStore,
        aggregates: Sequence[Aggregate[Any]],
        event_handlers: Sequence[EventHandler],
        tuning: Tuning,
        subscriptions: Sequence[EventHandler] = (),
    ) -> None:
        retries, backoff, cache_size, snapshot_every, verify_snapshots = tuning
        check_count("retries", retries, 0)
        check_seconds("backoff", backoff)  # a conflict's retry sleeps for it
        self.event_store, self.projection_store = event_store, projection_store
        self.aggregates = tuple(aggregates)
        self.event_handlers = tuple(event_handlers)
        self.retries, self.backoff = retries, backoff
        self.cache = StateCache(cache_size)
        self.loader = StateLoader(
            event_store,
            projection_store,
            self.cache,
            self.aggregates,
            snapshot_every=snapshot_every,
            verify_snapshots=verify_snapshots,
        )
        self._load = self.loader.load  # bound once: the command path calls it often
        self._routes = routes(self.aggregates)
        self._by_name = {aggregate.name: aggregate for aggregate in self.aggregates}
        register_event_types(event_store.types, self.aggregates)
        both = {h.name for h in self.event_handlers} & {h.name for h in subscriptions}
        if both:
            raise RegistrationError(
                f"{', '.join(sorted(both))} cannot run both inline and as a subscription"
            )
        self.inline = InlineHandlers(
            self.event_handlers,
            route=self.aggregate_for,
            snapshot=None if snapshot_every is None else self.loader.snapshot,
        )
        self.follow_ups = FollowUps(
            event_store=event_store,
            handlers=self.event_handlers,
            aggregate=self.aggregate,
            check=self.inline.check_reaction,
        )

    # -- routing -----------------------------------------------------------

    def aggregate_for(self, command: Command) -> Aggregate[Any]:
        aggregate = self._routes.get(type(command))
        if aggregate is None:
            handled = ", ".join(sorted(t.__name__ for t in self._routes)) or "nothing"
            raise RoutingError(
                f"No aggregate handles {type(command).__name__}; this command handler "
                f"routes: {handled}"
            )
        return aggregate

    def aggregate(self, aggregate: Aggregate[Any] | str) -> Aggregate[Any]:
        if isinstance(aggregate, Aggregate):
            return aggregate
        found = self._by_name.get(aggregate)
        if found is None:
            raise RoutingError(
                f"No aggregate named {aggregate!r}; known: {', '.join(sorted(self._by_name))}"
            )
        return found

    # -- plans ---------------------------------------------------------------

    def state(self, aggregate: Aggregate[Any] | str, aggregate_id: str) -> Plan[Any]:
        """The current state of one aggregate, folded from its stream."""
        found = self.aggregate(aggregate)
        state, _ = yield Blocking(partial(self._load, found, aggregate_id))
        return state

    def dispatch(
        self, command: Command, metadata: Mapping[str, Any] | None = None
    ) -> Plan[list[Recorded[Any]]]:
        """``CommandHandler.dispatch``, as a plan."""
        validate_command(command)
        aggregate = self.aggregate_for(command)
        storable.check_metadata(metadata)
        meta = dict(metadata or {})
        meta.setdefault("correlation_id", new_uuid())
        meta.setdefault("causation_id", None)
        key = idempotency_key(command, meta)
        if key is not None:
            meta[IDEMPOTENCY_KEY] = key
            earlier = yield Blocking(partial(self.event_store.outcome_for, key))
            if earlier is not None:
                return (yield from self._replay_outcome(command, earlier))
        try:
            recorded, follow_ups = yield from self._decide_and_append(aggregate, command, meta, key)
        except Rejected as rejection:
            rejection.command = command
            if key is None:
                raise
            # remembered, so a replay of the key takes this branch again whatever the
            # state by then; a racing twin that succeeded first wins instead
            remember = self.event_store.remember_rejection
            # kept as every store keeps text: a NUL or a lone surrogate escaped
            detail = None if rejection.detail is None else storable.kept_text(str(rejection.detail))
            reason = storable.kept_text(str(rejection.reason))
            stored = yield Blocking(partial(remember, key, reason, detail))
            if stored.rejected is None:
                return (yield from self._replay_outcome(command, stored))
            raise
        yield from self.follow_ups.carry_out(recorded, follow_ups)
        return recorded

    def _replay_outcome(self, command: Command, outcome: Outcome) -> Plan[list[Recorded[Any]]]:
        if outcome.rejected is not None:
            rejection = Rejected(outcome.rejected, outcome.detail)
            rejection.command = command
            raise rejection
        # what the first run left undone
        yield from self.follow_ups.complete_owed_for(outcome.recorded)
        return outcome.recorded

    def _decide_and_append(
        self,
        aggregate: Aggregate[Any],
        command: Command,
        metadata: dict[str, Any],
        key: str | None,
    ) -> Plan[tuple[list[Recorded[Any]], list[FollowUp]]]:
        stream = (aggregate.name, command.aggregate_id)
        attempt_on = partial(self._attempt, aggregate, command, metadata, key)
        for attempt in range(self.retries + 1):
            try:
                # the first attempt trusts the cache (unless the stream is contended):
                # the append's expected version catches a stale state, and the retry
                # reads what was missed
                done: tuple[list[Recorded[Any]], list[FollowUp]]
                done = yield OnStream(stream, attempt == 0, attempt_on)
                return done
            except ConcurrencyError:
                # from now on this stream's writers take turns; the jittered, growing
                # pause spreads out the writers of other processes
                yield Collided(stream)
                if attempt == self.retries:
                    raise
                yield Pause(random.uniform(0, min(0.05, self.backoff * 2**attempt)))
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self,
        aggregate: Aggregate[Any],
        command: Command,
        metadata: dict[str, Any],
        key: str | None,
        trust_cache: bool,
    ) -> Plan[tuple[list[Recorded[Any]], list[FollowUp]]]:
        """Decide once and append with the version decided on (ConcurrencyError when
        another writer got there first)."""
        aggregate_id = command.aggregate_id
        state, version, events = yield from self._decide(aggregate, command, trust_cache)
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
        project = self.inline.projector(aggregate, aggregate_id, state)
        try:
            committed = yield CommitCall(request, self.projection_store, project)
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
        self, aggregate: Aggregate[Any], command: Command, trust_cache: bool
    ) -> Plan[tuple[Any, int, list[Any]]]:
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
        state, version = yield Blocking(partial(self._load, aggregate, aggregate_id))
        return state, version, aggregate.decide(state, command)

    # -- follow-ups: see incident.follow_ups -----------------------------------

    def complete_owed(self) -> Plan[list[Owed]]:
        return self.follow_ups.complete_owed()


class HandlerParts:
    """What a command handler shows of its core: its aggregates, event handlers, retry
    and cache settings, and its routing."""

    def adopt(self, core: HandlerCore, snapshot_every: int | None, verify: bool) -> None:
        """Show ``core``'s parts as this handler's attributes."""
        self.aggregates, self.event_handlers = core.aggregates, core.event_handlers
        self.retries, self.backoff, self.cache = core.retries, core.backoff, core.cache
        self.snapshot_every, self.verify_snapshots = snapshot_every, verify
        self.aggregate_for = core.aggregate_for


def open_pair(
    event_store: E | str,
    projection_store: S | str | None,
    openers: tuple[Callable[[str], E], Callable[[str], S]],
    opened: list[Any],
) -> tuple[E, S]:
    """The event and projection stores a handler was given, those given as URLs opened
    by ``openers`` (and added to ``opened``: the handler closes them); no projection
    store means the event store's own, in its database."""
    if isinstance(event_store, str):
        event_store = openers[0](event_store)
        opened.append(event_store)
    found: S
    if projection_store is None:
        found = event_store.projections()
    elif isinstance(projection_store, str):
        found = openers[1](projection_store)
        opened.append(found)
    else:
        found = projection_store
    return event_store, found


def idempotency_key(command: Command, metadata: Mapping[str, Any]) -> str | None:
    """The command's idempotency key: its ``idempotency_key`` field, else the metadata's."""
    key = getattr(command, IDEMPOTENCY_KEY, None) or metadata.get(IDEMPOTENCY_KEY)
    if key is not None and not isinstance(key, str):
        raise InvalidCommand(type(command).__name__, IDEMPOTENCY_KEY, "must be a str")
    # refused alike on every store, before any of them is asked about it
    if key and (problem := storable.problem_in(key)) is not None:
        raise Unstorable(IDEMPOTENCY_KEY, None, problem[1])
    return key or None
