"""Postgres checkpoints, dead letters and handler locks: see :mod:`.postgres.checkpoints`."""

from .postgres.checkpoints import PostgresCheckpointStore, PostgresHandlerLock

__all__ = ["PostgresCheckpointStore", "PostgresHandlerLock"]
