"""Opening stores from URLs. Each backend lives in its own package with the same verbs.

``memory://`` (a fresh in-process store), ``sqlite:///relative.db``,
``sqlite:////absolute/path.db``, ``sqlite://`` (in memory), ``postgresql://...``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from ..errors import IncidentError, InvalidArgument
from ..options import check_count
from .asynchronous import AsyncEventStore, AsyncProjectionStore
from .memory import MemoryCheckpointStore, MemoryEventStore, MemoryProjectionStore
from .protocols import (
    AppendNotifier,
    AppendRequest,
    CheckpointStore,
    CommitCall,
    CommitsMany,
    Committed,
    Effects,
    EventStore,
    HandlerLock,
    Outcome,
    Owed,
    Parked,
    ProjectFn,
    ProjectionStore,
    ReplaceableProjectionStore,
)

__all__ = [
    "ASYNC_WORKERS",
    "AppendNotifier",
    "AppendRequest",
    "CommitCall",
    "CommitsMany",
    "AsyncEventStore",
    "AsyncProjectionStore",
    "CheckpointStore",
    "Committed",
    "Effects",
    "EventStore",
    "HandlerLock",
    "MemoryCheckpointStore",
    "MemoryEventStore",
    "MemoryProjectionStore",
    "Outcome",
    "Owed",
    "Parked",
    "ProjectFn",
    "ProjectionStore",
    "ReplaceableProjectionStore",
    "checkpoint_store_for",
    "open_async_event_store",
    "open_async_projection_store",
    "open_event_store",
    "open_projection_store",
    "open_stores",
]

# scheme -> "module:function"; the function takes (url, **options) and returns an
# EventStore whose .projections() shares its database. Imported lazily so that the
# Postgres driver is only needed by those who use it.
_BACKENDS = {
    "memory": "incident.stores.memory:open_memory",
    "sqlite": "incident.stores.sqlite:open_sqlite",
    "postgresql": "incident.stores.postgres:open_postgres",
    "postgres": "incident.stores.postgres:open_postgres",
}


def _scheme(url: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise IncidentError(
            f"Not a store URL: {url!r}; expected memory://, sqlite:///path.db or postgresql://..."
        )
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def open_event_store(url: str, **options: Any) -> EventStore:
    """Open the event store a URL names.

    >>> open_event_store("memory://")
    MemoryEventStore(0 events)
    """
    scheme = _scheme(url)
    target = _BACKENDS.get(scheme)
    if target is None:
        known = ", ".join(sorted(f"{name}://" for name in _BACKENDS))
        raise IncidentError(f"No store for {url!r}; known schemes: {known}")
    module_name, function_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        extra = " (pip install 'incident[postgres]')" if scheme.startswith("postgres") else ""
        raise IncidentError(f"Cannot open {scheme}:// stores: {error}{extra}") from error
    opener = getattr(module, function_name)
    try:  # a misspelt option is the caller's mistake, not a TypeError from inside
        inspect.signature(opener).bind(url, **options)
    except TypeError as error:
        raise InvalidArgument(f"{scheme}:// stores do not take these options: {error}") from None
    store: EventStore = opener(url, **options)
    return store


def open_projection_store(url: str, **options: Any) -> ProjectionStore:
    """Open the projection store a URL names.

    >>> open_projection_store("memory://")
    MemoryProjectionStore()
    """
    return open_event_store(url, **options).projections()


def open_stores(url: str, **options: Any) -> tuple[EventStore, ProjectionStore]:
    """An event store and a projection store in the same database (one commit per command)."""
    events = open_event_store(url, **options)
    return events, events.projections()


#: how many worker threads an async store opened from a URL runs its sync store's verbs
#: on (the memory store needs none: its verbs never wait)
ASYNC_WORKERS = 16


def open_async_event_store(
    url: str, *, workers: int | None = None, **options: Any
) -> AsyncEventStore:
    """Open the async event store a URL names (the URLs of :func:`open_event_store`);
    ``workers`` threads run its verbs off the event loop (default 0 for ``memory://``,
    else ``ASYNC_WORKERS``). See :mod:`incident.stores.asynchronous`.

    >>> open_async_event_store("memory://")
    AsyncEventStore(MemoryEventStore(0 events), workers=0)
    """
    scheme = _scheme(url)
    if workers is None:
        workers = 0 if scheme == "memory" else ASYNC_WORKERS
    # before the store opens: nothing is created, no connection is left open
    check_count("workers", workers, 0)
    store = open_event_store(url, **options)
    if scheme.startswith("postgres"):  # reads on psycopg's async connections
        from .postgres.asynchronous import AsyncPostgresEventStore

        return AsyncPostgresEventStore(store, workers=workers)  # type: ignore[arg-type]
    return AsyncEventStore(store, workers=workers)


def open_async_projection_store(
    url: str, *, workers: int | None = None, **options: Any
) -> AsyncProjectionStore:
    """Open the async projection store a URL names (see :func:`open_async_event_store`).

    >>> open_async_projection_store("memory://")
    AsyncProjectionStore(MemoryProjectionStore())
    """
    return open_async_event_store(url, workers=workers, **options).projections()


def checkpoint_store_for(event_store: EventStore) -> CheckpointStore:
    """The checkpoint store in the same database as ``event_store`` (its ``checkpoints()``).

    >>> checkpoint_store_for(open_event_store("memory://"))
    MemoryCheckpointStore({})
    """
    checkpoints = getattr(event_store, "checkpoints", None)
    if not callable(checkpoints):
        raise IncidentError(
            f"{event_store!r} keeps no checkpoints; give the subscription a checkpoint store"
        )
    store: CheckpointStore = checkpoints()
    return store
