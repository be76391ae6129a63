"""A name users' code imports: the checkpoint store of :mod:`incident.stores.sqlite.checkpoints`."""

from .sqlite.checkpoints import SQLiteCheckpointStore, SQLiteHandlerLock, lock_path

__all__ = ["SQLiteCheckpointStore", "SQLiteHandlerLock", "lock_path"]
