"""The event log in memory: what every durable store does (atomic appends, expected
versions, gapless positions), through the same JSON, in one process."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec

from ...codec import EventTypes
from ...errors import DuplicateCommand, IncidentError, InvalidArgument
from ...messages import Event, Recorded
from .._common import (
    AppendVerbs,
    effects_of,
    event_json,
    metadata_json,
    stamp,
)
from ..arguments import (
    check_after,
    check_expected_version,
    check_key,
    check_limit,
    check_owed,
    check_rejection,
    checked_request,
    readable_id,
    readable_key,
)
from ..live import Live
from ..protocols import (
    AppendRequest,
    Committed,
    Outcome,
    Owed,
    ProjectFn,
    ProjectionStore,
)
from .checkpoints import MemoryCheckpointStore
from .opened import Opened
from .projections import MemoryProjectionStore

__all__ = ["MemoryEventStore", "open_memory"]


class MemoryEventStore(AppendVerbs, Live):
    """An in-process event log. ``projections()`` gives a projection store that commits
    together with it (both are guarded by this store's lock). Closed, it refuses every
    verb with StoreError, as do its projections() and checkpoints(), as a durable store's
    do (closing its projection store closes it too: they share one ``opened``)."""

    def __init__(self, *, types: EventTypes | None = None) -> None:
        self.types = types or EventTypes()
        self.opened = Opened()
        self._lock = threading.RLock()
        self._appended = threading.Condition(self._lock)
        self._log: list[Recorded[Any]] = []
        self._streams: dict[str, list[Recorded[Any]]] = {}
        self._projections: MemoryProjectionStore | None = None
        self._checkpoints: MemoryCheckpointStore | None = None
        self._keys: dict[str, Outcome] = {}  # idempotency key -> what it came to
        self._owed: dict[tuple[str, int], Owed] = {}  # (handler, position) -> owed work

    def __repr__(self) -> str:
        return f"MemoryEventStore({len(self._log)} events)"

    def commit(
        self,
        request: AppendRequest,
        *,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> Committed:
        self.opened.check()
        aggregate_id, key = request.aggregate_id, request.idempotency_key
        # what is kept is what a durable store would read back: events and metadata
        # through their JSON, refused here as on every store
        checked = checked_request(request)
        batch = [event_json(event)[1] for event in checked]
        metadata = request.metadata
        if metadata:
            metadata = msgspec.json.decode(metadata_json(metadata))
        with self._lock:
            self.opened.check()  # again: a close() may have come in the meantime
            if key is not None and key in self._keys:
                raise DuplicateCommand(key, *self._keys[key])
            stream = self._streams.get(aggregate_id, [])
            check_expected_version(aggregate_id, request.expected_version, len(stream))
            if not batch:
                return Committed([])
            recorded = stamp(
                aggregate_id,
                request.aggregate,
                batch,
                first_position=len(self._log) + 1,
                first_version=len(stream) + 1,
                metadata=metadata,
            )
            effects = effects_of(project, recorded)
            if projection_store is not None and not self.shares_database_with(projection_store):
                # another database: the events commit first, the projections right after
                self._commit(aggregate_id, recorded, key, effects.owed)
                for projection in effects.projections:
                    projection_store.project(projection)
                return Committed(recorded, effects)
            if isinstance(projection_store, MemoryProjectionStore):
                # checks all before writing any
                projection_store.project_many(effects.projections)
            self._commit(aggregate_id, recorded, key, effects.owed)
            return Committed(recorded, effects)

    def _commit(
        self,
        aggregate_id: str,
        recorded: list[Recorded[Any]],
        idempotency_key: str | None,
        owed: Sequence[Owed],
    ) -> None:
        if idempotency_key is not None:
            self._keys[idempotency_key] = Outcome(recorded)
        for work in owed:
            self._owed[work.handler, work.position] = work
        self._log.extend(recorded)
        self._streams.setdefault(aggregate_id, []).extend(recorded)
        self._appended.notify_all()

    def wait_for_append(self, after: int, timeout: float) -> bool:
        with self._appended:
            self.opened.check()
            if len(self._log) <= after:
                self._appended.wait(timeout)
            self.opened.check()  # close() wakes the waiters to say so
            return len(self._log) > after

    def last_position(self) -> int:
        self.opened.check()
        with self._lock:
            return len(self._log)

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return isinstance(projection_store, MemoryProjectionStore)

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        self.opened.check()
        if not readable_key(idempotency_key):
            return None
        with self._lock:
            found = self._keys.get(idempotency_key)
        return None if found is None else found._replace(recorded=list(found.recorded))

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        self.opened.check()
        check_key(idempotency_key)
        check_rejection(reason, detail)
        with self._lock:
            found = self._keys.setdefault(idempotency_key, Outcome([], reason, detail))
        return found._replace(recorded=list(found.recorded))

    def owed(self, handler: str | None = None) -> list[Owed]:
        self.opened.check()
        with self._lock:
            found = [o for o in self._owed.values() if handler in (None, o.handler)]
        return sorted(found, key=lambda o: (o.position, o.handler))

    def owe(self, owed: Owed) -> None:
        self.opened.check()
        check_owed(owed)
        with self._lock:
            self._owed[owed.handler, owed.position] = owed

    def settle(self, handler: str, position: int) -> None:
        self.opened.check()
        with self._lock:
            self._owed.pop((handler, position), None)

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        self.opened.check()
        start = check_after(after)
        if not readable_id(aggregate_id):
            return []
        with self._lock:
            return list(self._streams.get(aggregate_id, [])[start:])

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes: what a fold needs."""
        return iter([recorded.data for recorded in self.get(aggregate_id, after=after)])

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream as an iterator (durable stores fetch it in batches)."""
        return iter(self.get(aggregate_id, after=after))

    def version(self, aggregate_id: str) -> int:
        self.opened.check()
        if not readable_id(aggregate_id):
            return 0
        with self._lock:
            return len(self._streams.get(aggregate_id, []))

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        start = check_after(after)
        check_limit(limit)
        self.opened.check()
        with self._lock:
            end = len(self._log) if limit is None else min(len(self._log), start + limit)
            chunk = self._log[start:end]
        return iter(chunk)

    def initialize(self) -> list[str]:
        self.opened.check()
        return []  # nothing to create: memory has no schema

    def projections(self) -> MemoryProjectionStore:
        if self._projections is None:
            self._projections = MemoryProjectionStore(opened=self.opened)
        return self._projections

    def checkpoints(self) -> MemoryCheckpointStore:
        """The checkpoint store beside this log (one per store, like ``projections()``)."""
        if self._checkpoints is None:
            self._checkpoints = MemoryCheckpointStore(opened=self.opened)
        return self._checkpoints

    def close(self) -> None:
        """Closes its projection and checkpoint stores too; closing again does nothing."""
        with self._appended:
            self.opened.close()
            self._appended.notify_all()  # a waiting tail wakes to StoreError


def open_memory(url: str, **options: Any) -> MemoryEventStore:
    """``memory://``: a fresh in-process store per call."""
    if url.rstrip("/") != "memory:" or options:
        # an option is the caller's mistake (InvalidArgument); a path, a URL that names nothing
        error = InvalidArgument if options or "?" in url else IncidentError
        raise error(f"memory:// takes no path or options, got {url!r} {options or ''}")
    return MemoryEventStore()
