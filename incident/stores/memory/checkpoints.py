"""Subscription checkpoints, dead letters and handler locks in memory, for one process."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeVar

from ...errors import CheckpointConflict
from ...messages import Projection
from .._common import write_elsewhere
from ..arguments import check_checkpoint, check_parked
from ..protocols import (
    Parked,
    ProjectionStore,
)
from ..replacing import Tables, checked_tables, replace_elsewhere
from .opened import Opened
from .projections import MemoryProjectionStore

__all__ = ["MemoryCheckpointStore", "MemoryHandlerLock"]

P = TypeVar("P", bound=Projection)


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
    """Checkpoints, dead letters and handler locks in dicts, for one process. One from an
    event store's ``checkpoints()`` shares its ``opened``: it refuses once that is closed."""

    def __init__(self, *, opened: Opened | None = None) -> None:
        self.opened = opened or Opened()
        self._lock = threading.RLock()
        self._positions: dict[str, int] = {}
        self._parked: dict[tuple[str, int], Parked] = {}
        self._handler_locks: dict[str, threading.Lock] = {}

    def __repr__(self) -> str:
        return f"MemoryCheckpointStore({self._positions})"

    def load(self, handler: str) -> int:
        check_checkpoint(handler)
        self.opened.check()
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
        parked: Sequence[Parked] = (),
    ) -> None:
        check_checkpoint(handler, position=position, expected=expected)
        for entry in parked:
            check_parked(entry)
        self.opened.check()
        with self._lock:
            actual = self._positions.get(handler, 0)
            if actual != expected:
                raise CheckpointConflict(handler, expected, actual)
            if projections and projection_store is not None:
                if isinstance(projection_store, MemoryProjectionStore):
                    projection_store.project_many(projections)
                else:
                    write_elsewhere(projection_store, projections)
            for entry in parked:  # after the rows: a row refused leaves none of them
                self._parked[entry.handler, entry.position] = entry
            self._positions[handler] = position

    def reset(
        self,
        handler: str,
        position: int = 0,
        *,
        drop_parked: bool = False,
        tables: Tables | None = None,
        projection_store: ProjectionStore | None = None,
    ) -> None:
        check_checkpoint(handler, position=position)
        self.opened.check()
        shared = isinstance(projection_store, MemoryProjectionStore)
        kept = checked_tables(tables, projection_store, shared)
        swap = None
        if kept and isinstance(projection_store, MemoryProjectionStore):
            swap = projection_store.checked_tables(kept)  # every row checked first
        with self._lock:  # readers see the old tables and checkpoint, or the new ones
            if swap is not None:
                assert isinstance(projection_store, MemoryProjectionStore)
                projection_store.install(swap)
            self._positions[handler] = position
            if drop_parked:
                for key in [key for key in self._parked if key[0] == handler]:
                    del self._parked[key]
        if not shared:
            replace_elsewhere(kept, projection_store)

    def checkpoints(self) -> dict[str, int]:
        self.opened.check()
        with self._lock:
            return dict(self._positions)

    def park(self, parked: Parked) -> None:
        check_parked(parked)
        self.opened.check()
        with self._lock:
            self._parked[parked.handler, parked.position] = parked

    def parked(self, handler: str | None = None) -> list[Parked]:
        self.opened.check()
        with self._lock:
            found = [p for p in self._parked.values() if handler in (None, p.handler)]
        return sorted(found, key=lambda p: (p.handler, p.position))

    def unpark(self, handler: str, position: int) -> None:
        self.opened.check()
        with self._lock:
            self._parked.pop((handler, position), None)

    def lock(self, handler: str) -> MemoryHandlerLock:
        with self._lock:
            shared = self._handler_locks.setdefault(handler, threading.Lock())
        return MemoryHandlerLock(handler, shared)

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return isinstance(projection_store, MemoryProjectionStore)

    def initialize(self) -> list[str]:
        self.opened.check()
        return []

    def close(self) -> None:
        """Nothing to release: the dicts are the event store's, which closes them (a
        subscription closing its checkpoints must leave the event store usable)."""
