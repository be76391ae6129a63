"""Postgres stores: the server backend, for many processes on many machines sharing one
database. psycopg 3 with a psycopg_pool connection pool; the same verbs as the memory stores.

``postgresql://user@host:5432/db?schema=bank`` opens the event store of schema ``bank``
(default ``public``); its ``projections()`` share the pool, so a command's events and its
projections commit in one transaction. Options: ``schema``, ``pool_size`` (default 10),
``create_tables`` (default True: create or migrate missing tables on first use; turn it off
for roles that may not run DDL, and run ``incident init URL`` with one that may),
``timeout`` (seconds to wait for a pooled connection) and ``batch_size`` (rows per
round trip when ``read_all`` streams the log).

Tables, in the store's schema: ``incident_migrations`` (what ran), ``events`` (payloads
and metadata as ``json``, stored as written), ``idempotency_keys``, ``incident_owed``, and
one table per Projection type (its ``table_name``, else the snake_case of the class name:
see :mod:`incident.stores.tables`); and the function ``begin_append``
(a one-round-trip append). Stores are thread-safe, and a store opened before ``fork()``
opens a pool of its own in the child.

The modules, from the bottom up: :mod:`.session` (what runs on one connection),
:mod:`.sql` (the event store's statements), :mod:`.migrations` (the schema's
migrations), :mod:`.database` (the pool and the schema a store's parts share),
:mod:`.projections`, :mod:`.checkpoints`, :mod:`.notify` (LISTEN for appends),
:mod:`.prediction` (one round trip per append), :mod:`.reads` and :mod:`.events` (the
event store), and :mod:`.url` (what a URL opens).
"""

from __future__ import annotations

from .checkpoints import PostgresCheckpointStore, PostgresHandlerLock
from .events import PostgresEventStore
from .projections import PostgresProjectionStore
from .url import open_postgres, split_url

__all__ = [
    "PostgresCheckpointStore",
    "PostgresEventStore",
    "PostgresHandlerLock",
    "PostgresProjectionStore",
    "open_postgres",
    "split_url",
]
