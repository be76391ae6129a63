"""Memory stores: the playground and test backend, thread-safe, with the durable stores'
semantics (atomic appends, expected versions, gapless positions, version-guarded
upserts), and the same verbs, one module per store as for SQLite and Postgres."""

from .checkpoints import MemoryCheckpointStore, MemoryHandlerLock
from .events import MemoryEventStore, open_memory
from .projections import MemoryProjectionStore

__all__ = [
    "MemoryCheckpointStore",
    "MemoryEventStore",
    "MemoryHandlerLock",
    "MemoryProjectionStore",
    "open_memory",
]
