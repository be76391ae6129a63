"""What a subscription keeps in memory while it reads the log: the state of each
aggregate after its last event (so a listener's state costs one ``evolve``, not a fold),
and the projections its listeners returned that are not committed yet."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..aggregate import Aggregate
from ..errors import IncidentError, InvalidArgument, RegistrationError, RoutingError, Unstorable
from ..event_handler import EventHandler
from ..messages import Projection, Recorded
from ..stores import EventStore
from ..stores._common import closing_iterator
from ..stores.read_model_rows import check_projections, newer_or_equal

__all__ = [
    "Pending",
    "RowRules",
    "RowsRefused",
    "StreamStates",
    "aggregates_for",
    "merge_projections",
]

# The projections to commit with the next checkpoint, one per (type, key).
Pending = dict[tuple[type[Projection], str], Projection]


class StreamStates:
    """(state, version) per aggregate, least recently used first, at most ``size``.

    The subscription that owns it uses it under its own lock; the workers of a wave
    (:mod:`.waves`) use it at once, each for streams no other worker has, so only the
    LRU itself (whose eviction touches any stream) is locked, never a fold.
    """

    def __init__(
        self, name: str, event_store: EventStore, aggregates: dict[str, Aggregate[Any]], size: int
    ) -> None:
        self.name, self.event_store, self.aggregates, self.size = (
            name,
            event_store,
            aggregates,
            size,
        )
        # a dict keeps insertion order: popped and put back, an entry moves to the end
        self._states: dict[tuple[str, str], tuple[Any, int]] = {}
        self._lru = threading.Lock()

    def clear(self) -> None:
        """Forget every state (another runner may have moved on meanwhile)."""
        with self._lru:
            self._states.clear()

    def at(self, recorded: Recorded[Any]) -> Any:
        """The aggregate's state right after ``recorded``: the cached state evolved by one
        event, or a fold of the stream up to it when the cache has no usable entry."""
        aggregate = self.aggregates.get(recorded.aggregate)
        if aggregate is None:
            raise RoutingError(
                f"{self.name} handles {recorded.event_type} of aggregate "
                f"{recorded.aggregate!r}, which is not among this subscription's aggregates"
            )
        key = (aggregate.name, recorded.aggregate_id)
        with self._lru:
            cached = self._states.pop(key, None)
        if cached is not None and cached[1] >= recorded.version:
            cached = None  # handled again (a retry or a reset): start over
        base, version = cached or (aggregate.initial, 0)
        if version < recorded.version - 1:  # not cached, or evicted: read what is missing
            # the bare events (the store's fast path), and only up to this one
            read = self.event_store.events(recorded.aggregate_id, after=version)
            with closing_iterator(read) as newer:
                base = aggregate.fold(itertools.islice(newer, recorded.version - 1 - version), base)
        state = aggregate.evolve(base, recorded)
        self._remember(key, state, recorded.version)
        return state

    def follow(self, recorded: Recorded[Any]) -> None:
        """Keep a cached state current through an event no listener wants (cheap: no I/O;
        an aggregate that is not cached is folded from its stream when it is needed)."""
        aggregate = self.aggregates.get(recorded.aggregate)
        if aggregate is None:
            return
        key = (aggregate.name, recorded.aggregate_id)
        with self._lru:
            cached = self._states.pop(key, None)
        if cached is not None and cached[1] == recorded.version - 1:
            self._remember(key, aggregate.evolve(cached[0], recorded), recorded.version)

    def _remember(self, key: tuple[str, str], state: Any, version: int) -> None:
        with self._lru:
            self._states[key] = (state, version)  # popped first: now the most recently used
            if len(self._states) > self.size:
                del self._states[next(iter(self._states))]


def aggregates_for(
    handler: EventHandler, aggregates: Iterable[Aggregate[Any]]
) -> dict[str, Aggregate[Any]]:
    """The aggregates by name, refusing a handler that listens to an event none of them
    produces (its listeners could never be given a state)."""
    by_name = {aggregate.name: aggregate for aggregate in aggregates}
    produced = {t for aggregate in by_name.values() for t in aggregate.event_types}
    orphans = [t.__name__ for t in handler.event_types if t not in produced]
    if orphans:
        raise RegistrationError(
            f"{handler.name} listens to {', '.join(orphans)}, which no aggregate of this "
            f"command handler applies ({', '.join(sorted(by_name)) or 'none'})"
        )
    return by_name


class RowsRefused(Exception):
    """A batch's commit refused one of its read models (see :class:`RowRules`)."""


class RowRules:
    """Where a listener's read model is checked as every store checks it before it is
    kept (Unstorable, or IncidentError for a type no table can hold). Checked when the
    listener returns it (``each``), a refused row fails its own event, to be retried and
    parked. A batch is first handled with ``each`` off (:meth:`at_commit`): the store
    then checks each row once, at the commit, rather than every event's (many events
    fold into one row); should it refuse one, nothing was written, :meth:`at_commit`
    raises RowsRefused and the subscription handles the batch again with ``each`` on,
    so the row fails its event instead of the batch every time it is read again."""

    def __init__(self) -> None:
        self.each = True

    def check(self, projections: list[Projection]) -> None:
        if self.each:
            check_projections(projections)  # as an append checks its own

    @contextmanager
    def at_commit(self) -> Iterator[None]:
        self.each = False
        try:
            yield
        except (Unstorable, InvalidArgument) as error:
            raise RowsRefused from error
        except IncidentError as error:
            if type(error) is not IncidentError:  # a table's rule is a plain one
                raise
            raise RowsRefused from error
        finally:
            self.each = True


def merge_projections(pending: Pending, projections: list[Projection]) -> None:
    """Keep one projection per key, by the rule the stores apply: never move backwards."""
    for projection in projections:
        # the key was checked when the listener returned it
        key = (type(projection), projection.aggregate_id)  # type: ignore[attr-defined]
        stored = pending.get(key)
        if stored is None:
            pending[key] = projection
            continue
        new, old = getattr(projection, "version", None), getattr(stored, "version", None)
        if type(new) is int and type(old) is int:  # the common case, without a call
            if new >= old:
                pending[key] = projection
        elif newer_or_equal(projection, stored):
            pending[key] = projection
