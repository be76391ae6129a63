"""Loading an aggregate's state for the command handler: from its cache, else from its
latest snapshot, then the events after either, folded (see docs/snapshots.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..aggregate import Aggregate
from ..errors import ForeignStream, RoutingError
from ..options import check_count
from ..snapshots import (
    Snapshot,
    check_snapshottable,
    code_key,
    load_snapshot,
    snapshot_key,
    take_snapshot,
    verify_snapshot,
)
from ..stores import EventStore, ProjectionStore
from ..stores._common import closing_iterator
from .state_cache import StateCache

__all__ = ["StateLoader"]


class StateLoader:
    """(state, version) of one aggregate: the cached entry, else the snapshot (with
    ``snapshot_every`` set), else the initial state, and the events after it.

    With ``snapshot_every`` it refuses, when built, a state type that would not read back
    from a snapshot as it is, and takes a snapshot every N versions (:meth:`snapshot`);
    ``verify_snapshots=True`` folds the stream behind every snapshot it reads and raises
    SnapshotMismatch where they differ.
    """

    def __init__(
        self,
        event_store: EventStore,
        projection_store: ProjectionStore,
        cache: StateCache,
        aggregates: Sequence[Aggregate[Any]],
        *,
        snapshot_every: int | None,
        verify_snapshots: bool,
    ) -> None:
        check_count("snapshot_every", snapshot_every, 1, none_too=True)
        self.event_store, self.projection_store, self.cache = event_store, projection_store, cache
        self.snapshot_every, self.verify_snapshots = snapshot_every, verify_snapshots
        # the code key of each aggregate snapshotted: computed once, it walks the code
        self.codes: dict[str, str] = {}
        if snapshot_every is not None:
            for aggregate in aggregates:
                check_snapshottable(aggregate)
                self.codes[aggregate.name] = code_key(aggregate)

    def load(self, aggregate: Aggregate[Any], aggregate_id: str) -> tuple[Any, int]:
        """(state, version): from the cache plus the events after it, else the whole stream."""
        key = (aggregate.name, aggregate_id)
        cached = self.cache.get(key)
        state, version = (
            cached or self._from_snapshot(aggregate, aggregate_id) or (aggregate.initial, 0)
        )
        # the events alone (no envelopes), streamed; versions have no gaps
        try:
            with closing_iterator(self.event_store.events(aggregate_id, after=version)) as newer:
                state, count = aggregate.fold_count(newer, state)
        except RoutingError:
            self._refuse_foreign_stream(aggregate, aggregate_id)
            raise
        version += count
        if count or (cached is None and version):  # a snapshot at the head is cached too
            self.cache.put(key, state, version)
        return state, version

    def snapshot(
        self, aggregate: Aggregate[Any], aggregate_id: str, state: Any, version: int
    ) -> Snapshot | None:
        """The snapshot to store with the event that reached ``version``: one every
        ``snapshot_every`` versions, None otherwise (or when the state would not read
        back as it is)."""
        every = self.snapshot_every
        if every is None or version % every:
            return None
        return take_snapshot(aggregate, aggregate_id, state, version, self.codes[aggregate.name])

    def verify_snapshot(self, aggregate: Aggregate[Any], aggregate_id: str) -> int | None:
        """The version the stored snapshot was taken at, once its state equals the fold
        of the stream up to there; None when there is no snapshot this code would read;
        SnapshotMismatch when they disagree."""
        code = self.codes.get(aggregate.name) or code_key(aggregate)
        stored = self.projection_store.get(Snapshot, snapshot_key(aggregate, aggregate_id))
        loaded = load_snapshot(aggregate, stored, code)
        if loaded is None:
            return None
        with closing_iterator(self.event_store.events(aggregate_id)) as events:
            verify_snapshot(aggregate, aggregate_id, loaded, events)
        return loaded[1]

    def _from_snapshot(
        self, aggregate: Aggregate[Any], aggregate_id: str
    ) -> tuple[Any, int] | None:
        if self.snapshot_every is None:
            return None
        stored = self.projection_store.get(Snapshot, snapshot_key(aggregate, aggregate_id))
        loaded = load_snapshot(aggregate, stored, self.codes[aggregate.name])
        if loaded is not None and self.verify_snapshots:
            with closing_iterator(self.event_store.events(aggregate_id)) as events:
                verify_snapshot(aggregate, aggregate_id, loaded, events)
        return loaded

    def _refuse_foreign_stream(self, aggregate: Aggregate[Any], aggregate_id: str) -> None:
        """A fold that met an event this aggregate does not apply: when the stream is
        another aggregate's, say so (the usual cause) instead of naming the event."""
        first = next(iter(self.event_store.get(aggregate_id)), None)
        if first is not None and first.aggregate and first.aggregate != aggregate.name:
            raise ForeignStream(aggregate_id, aggregate.name, first.aggregate)
