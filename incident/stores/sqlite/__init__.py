"""SQLite stores: the embedded default, safe for several threads and several processes.

``sqlite:///relative.db``, ``sqlite:////absolute/path.db``, or ``sqlite://`` for a
private in-memory database (one connection shared by the threads of this process).

How it stays correct:

- Every write opens with ``BEGIN IMMEDIATE``, which takes SQLite's single write lock at
  once; a racing writer waits for it (the busy timeout, 30 s by default) and then finds
  the stream moved on, so it gets a clean ConcurrencyError, never "database is locked".
  ``UNIQUE (aggregate_id, version)`` backs the check up inside the database.
- Positions are assigned inside that lock, so they are gapless and in commit order.
- When the projection store is the same file, a command's events and the projections its
  inline handlers return are written in the same transaction: one commit, one fsync.
- Each thread gets its own connection, so readers never wait for each other (WAL).
- Threads appending at the same time share one transaction and one fsync (group
  commit), each append in its own savepoint, acknowledged once the commit returned.

Durability: the file is in WAL mode with ``synchronous=FULL`` by default, so a command
that returned is on disk even if the machine loses power right after. ``synchronous=
"NORMAL"`` (``open_event_store(url, synchronous="NORMAL")`` or ``?synchronous=normal``
in the URL) skips the fsync at each commit and syncs at checkpoints instead: commits get
cheaper and the database can never be corrupted, but a power cut (not a
crash of the process) may lose the last transactions that had returned. See
``docs/sqlite.md``.

The package, one concern a module, each importing only those listed before it:

- ``url``: the file a URL names
- ``sql``: the statements on incident's tables, as text
- ``migrations``: the layout and the steps that bring older files to it
- ``projection_tables``: how a Projection type becomes a table
- ``database``: connections, write transactions, driver errors (shared by the stores)
- ``group_commit``: concurrent appends sharing one transaction
- ``projections``: the projection store
- ``checkpoints``: subscription checkpoints, parked events, handler locks
- ``reading``: streams, the log and the fold's batches
- ``events``: the event store (appends, keys, owed follow-ups) and ``open_sqlite``
"""

from .checkpoints import SQLiteCheckpointStore, SQLiteHandlerLock, lock_path
from .events import SQLiteEventStore, open_sqlite
from .projections import SQLiteProjectionStore
from .url import MEMORY, sqlite_path

__all__ = [
    "SQLiteEventStore",
    "SQLiteProjectionStore",
    "SQLiteCheckpointStore",
    "SQLiteHandlerLock",
    "open_sqlite",
    "sqlite_path",
    "lock_path",
    "MEMORY",
]
