"""Memory stores: the playground and test backend, thread-safe, same semantics as the
durable stores (atomic appends, expected versions, gapless positions, version-guarded
upserts)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import msgspec

from ..codec import EventTypes
from ..errors import CheckpointConflict, DuplicateCommand, IncidentError, Unstorable
from ..messages import Event, Projection, Recorded
from ._common import (
    AppendVerbs,
    check_expected_version,
    checked_events,
    effects_of,
    event_json,
    metadata_json,
    newer_or_equal,
    projection_json,
    projection_key,
    stamp,
)
from .protocols import (
    AppendRequest,
    Committed,
    Outcome,
    Owed,
    Parked,
    ProjectFn,
    ProjectionStore,
)
from .tables import TableOwners, TableSpec

__all__ = [
    "MemoryCheckpointStore",
    "MemoryEventStore",
    "MemoryHandlerLock",
    "MemoryProjectionStore",
    "open_memory",
]

P = TypeVar("P", bound=Projection)


class MemoryProjectionStore:
    """Projections in a dict per table, guarded by one lock. Tables are named and owned
    as in the durable stores (:mod:`incident.stores.tables`), so what they refuse, memory
    refuses too."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owners = TableOwners()
        self._tables: dict[str, dict[str, Projection]] = {}
        self._decoders: dict[type[Projection], msgspec.json.Decoder[Any]] = {}

    def __repr__(self) -> str:
        return "MemoryProjectionStore()"

    def _spec(self, projection_type: type[Projection]) -> TableSpec:
        spec, _ = self._owners.claim(projection_type)
        return spec

    def _check(self, projection: Projection) -> tuple[TableSpec, str, Projection]:
        """The spec, the key and the row to keep: the projection read back from the JSON
        a durable store would write (aware datetime columns in UTC), so memory refuses
        and gives back what they do."""
        spec = self._spec(type(projection))
        key, data = projection_json(projection, spec)
        decoder = self._decoders.get(spec.type)
        if decoder is None:
            decoder = self._decoders[spec.type] = msgspec.json.Decoder(spec.type)
        try:
            row: Projection = decoder.decode(data)
        except msgspec.ValidationError as error:
            raise Unstorable(f"read model {type(projection).__name__}", None, str(error)) from None
        instants = {
            name: value.astimezone(dt.UTC)
            for name in spec.instant_columns
            if isinstance(value := getattr(row, name), dt.datetime) and value.tzinfo is not dt.UTC
        }
        return spec, key, msgspec.structs.replace(row, **instants) if instants else row

    @staticmethod
    def _read(spec: TableSpec, stored: Projection) -> Any:
        """A private copy of a stored row as the spec's type: a class redefined under
        the same name reads the rows its predecessor wrote, as from a durable table."""
        if type(stored) is spec.type:
            return msgspec.structs.replace(stored)
        try:
            return msgspec.convert(msgspec.to_builtins(stored), spec.type, strict=False)
        except msgspec.ValidationError as error:
            raise IncidentError(
                f"Row {projection_key(stored)!r} of table {spec.name!r} does not decode as "
                f"{spec.owner}: {error}"
            ) from error

    def _project(self, spec: TableSpec, key: str, row: Projection, projection: P) -> P:
        table = self._tables.setdefault(spec.name, {})
        stored = table.get(key)
        if spec.version is None or newer_or_equal(projection, stored):
            table[key] = row
            return projection
        assert stored is not None
        winner: P = self._read(spec, stored)
        return winner

    def project(self, projection: P) -> P:
        spec, key, row = self._check(projection)
        with self._lock:
            return self._project(spec, key, row, projection)

    def project_many(self, projections: Iterable[Projection]) -> None:
        checked = [(*self._check(p), p) for p in projections]
        with self._lock:
            for spec, key, row, projection in checked:
                self._project(spec, key, row, projection)

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        spec = self._spec(projection_type)
        table: dict[str, Projection] = {}
        for projection in projections:
            _, key, row = self._check(projection)
            table[key] = row
        with self._lock:
            self._tables[spec.name] = table
        return len(table)

    def get(self, projection_type: type[P], key: str) -> P | None:
        spec = self._spec(projection_type)
        with self._lock:
            stored = self._tables.get(spec.name, {}).get(key)
        found: P | None = None if stored is None else self._read(spec, stored)
        return found

    def all(self, projection_type: type[P]) -> list[P]:
        spec = self._spec(projection_type)
        with self._lock:
            rows = list(self._tables.get(spec.name, {}).values())
        return [self._read(spec, row) for row in rows]

    def close(self) -> None:
        pass


class MemoryEventStore(AppendVerbs):
    """An in-process event log. ``projections()`` gives a projection store that commits
    together with it (both are guarded by this store's lock)."""

    def __init__(self, *, types: EventTypes | None = None) -> None:
        self.types = types or EventTypes()
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
        aggregate_id, key = request.aggregate_id, request.idempotency_key
        # what is kept is what a durable store would read back: events and metadata
        # through their JSON, refused here as on every store
        checked = checked_events(aggregate_id, request.events)
        batch = [event_json(event)[1] for event in checked]
        metadata = request.metadata
        if metadata:
            metadata = msgspec.json.decode(metadata_json(metadata))
        with self._lock:
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
            if len(self._log) <= after:
                self._appended.wait(timeout)
            return len(self._log) > after

    def last_position(self) -> int:
        with self._lock:
            return len(self._log)

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return isinstance(projection_store, MemoryProjectionStore)

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        with self._lock:
            found = self._keys.get(idempotency_key)
        return None if found is None else found._replace(recorded=list(found.recorded))

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        with self._lock:
            found = self._keys.setdefault(idempotency_key, Outcome([], reason, detail))
        return found._replace(recorded=list(found.recorded))

    def owed(self, handler: str | None = None) -> list[Owed]:
        with self._lock:
            found = [o for o in self._owed.values() if handler in (None, o.handler)]
        return sorted(found, key=lambda o: (o.position, o.handler))

    def owe(self, owed: Owed) -> None:
        with self._lock:
            self._owed[owed.handler, owed.position] = owed

    def settle(self, handler: str, position: int) -> None:
        with self._lock:
            self._owed.pop((handler, position), None)

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        with self._lock:
            return list(self._streams.get(aggregate_id, [])[after:])

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes: what a fold needs."""
        return iter([recorded.data for recorded in self.get(aggregate_id, after=after)])

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream as an iterator (durable stores fetch it in batches)."""
        return iter(self.get(aggregate_id, after=after))

    def version(self, aggregate_id: str) -> int:
        with self._lock:
            return len(self._streams.get(aggregate_id, []))

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        with self._lock:
            end = len(self._log) if limit is None else min(len(self._log), after + limit)
            chunk = self._log[max(after, 0) : end]
        return iter(chunk)

    def initialize(self) -> list[str]:
        return []  # nothing to create: memory has no schema

    def projections(self) -> MemoryProjectionStore:
        if self._projections is None:
            self._projections = MemoryProjectionStore()
        return self._projections

    def checkpoints(self) -> MemoryCheckpointStore:
        """The checkpoint store beside this log (one per store, like ``projections()``)."""
        if self._checkpoints is None:
            self._checkpoints = MemoryCheckpointStore()
        return self._checkpoints

    def close(self) -> None:
        pass


class MemoryHandlerLock:
    """A per-handler lock shared by everything that uses one MemoryCheckpointStore."""

    def __init__(self, handler: str, lock: threading.Lock) -> None:
        self.handler = handler
        self._lock = lock
        self._held = False

    def __repr__(self) -> str:
        return f"MemoryHandlerLock({self.handler!r}, held={self._held})"

    def acquire(self, timeout: float | None = None) -> bool:
        if self._held:
            return True
        if timeout is None:
            self._held = self._lock.acquire()
        elif timeout <= 0:
            self._held = self._lock.acquire(blocking=False)
        else:
            self._held = self._lock.acquire(timeout=timeout)
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def held(self) -> bool:
        return self._held


class MemoryCheckpointStore:
    """Checkpoints, dead letters and handler locks in dicts, for one process."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._positions: dict[str, int] = {}
        self._parked: dict[tuple[str, int], Parked] = {}
        self._handler_locks: dict[str, threading.Lock] = {}

    def __repr__(self) -> str:
        return f"MemoryCheckpointStore({self._positions})"

    def load(self, handler: str) -> int:
        with self._lock:
            return self._positions.get(handler, 0)

    def save(
        self,
        handler: str,
        position: int,
        *,
        expected: int,
        projections: Sequence[Projection] = (),
        projection_store: ProjectionStore | None = None,
    ) -> None:
        with self._lock:
            actual = self._positions.get(handler, 0)
            if actual != expected:
                raise CheckpointConflict(handler, expected, actual)
            if projections and projection_store is not None:
                if isinstance(projection_store, MemoryProjectionStore):
                    projection_store.project_many(projections)
                else:
                    for projection in projections:
                        projection_store.project(projection)
            self._positions[handler] = position

    def reset(self, handler: str, position: int = 0) -> None:
        with self._lock:
            self._positions[handler] = position

    def checkpoints(self) -> dict[str, int]:
        with self._lock:
            return dict(self._positions)

    def park(self, parked: Parked) -> None:
        with self._lock:
            self._parked[parked.handler, parked.position] = parked

    def parked(self, handler: str | None = None) -> list[Parked]:
        with self._lock:
            found = [p for p in self._parked.values() if handler in (None, p.handler)]
        return sorted(found, key=lambda p: (p.handler, p.position))

    def unpark(self, handler: str, position: int) -> None:
        with self._lock:
            self._parked.pop((handler, position), None)

    def lock(self, handler: str) -> MemoryHandlerLock:
        with self._lock:
            shared = self._handler_locks.setdefault(handler, threading.Lock())
        return MemoryHandlerLock(handler, shared)

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return isinstance(projection_store, MemoryProjectionStore)

    def initialize(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


def open_memory(url: str, **options: Any) -> MemoryEventStore:
    """``memory://``: a fresh in-process store per call."""
    if url.rstrip("/") != "memory:" or options:
        raise IncidentError(f"memory:// takes no path or options, got {url!r} {options or ''}")
    return MemoryEventStore()
