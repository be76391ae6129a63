"""LISTEN/NOTIFY for a Postgres event store: appends NOTIFY the schema's channel as they
commit, and a store's waiting threads (subscriptions tailing the log) LISTEN on one
connection instead of polling."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from ..._forks import renew_in_forked_children
from ...errors import StoreError
from .inherited import opened

#: the longest name Postgres keeps (NAMEDATALEN - 1 bytes): a longer schema is truncated,
#: a longer channel refused by pg_notify ("channel name too long")
MAX_NAME_BYTES = 63


def channel_for(schema: str) -> str:
    """The channel a schema's appends NOTIFY. ``incident_events:<schema>`` while it fits
    in a name; a longer schema's is named by its digest (32 hex digits), so every schema
    Postgres can hold has a channel of its own."""
    channel = f"incident_events:{schema}"
    if len(channel.encode()) <= MAX_NAME_BYTES:
        return channel  # unchanged: processes of earlier releases NOTIFY this one
    return f"incident_events:{hashlib.blake2b(schema.encode(), digest_size=16).hexdigest()}"


class Listener:
    """One LISTEN connection per store, shared by all its waiting threads, so a thread
    that waited once and ended leaves nothing open. One waiter at a time reads the
    connection; the others wait on a condition it signals when a notification comes,
    and one of them takes over the reading when the reader's own wait is over."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self._conninfo = conninfo
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False  # for good: a wait after close() must not open another
        self._inherited: list[psycopg.Connection[Any]] = []
        self._renew()
        renew_in_forked_children(self.forked)

    def _renew(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._reading = False
        self._wakes = 0  # notifications read (and reconnections): waiters compare it

    def forked(self) -> None:
        """The parent's session must not be read (its notifications are the parent's)
        nor closed (that would end it): kept aside, and the child listens afresh."""
        self._renew()
        if self._conn is not None:
            self._inherited.append(self._conn)
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        """Under the lock: the connection, opened and LISTENing. A new one may have
        missed notifications since the last one died: it counts as a wake-up."""
        if self._closed:
            raise StoreError("Postgres failed waiting for appends: the store is closed")
        if self._conn is None or self._conn.closed:
            self._conn = opened(psycopg.connect(self._conninfo, autocommit=True))
            self._conn.execute(self._listen)
            self._wakes += 1
        return self._conn

    def wait(self, timeout: float, arrived: Callable[[], bool]) -> bool:
        """Wait until ``arrived()`` after a notification, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._connection()
            seen = self._wakes
        # listening first, then looking: an append in between still wakes us
        if arrived():
            return True
        with self._lock:
            while self._wakes == seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if self._reading:
                    self._changed.wait(remaining)
                    continue
                conn = self._connection()
                if self._wakes != seen:
                    break
                self._reading, notified = True, False
                self._lock.release()
                try:
                    notified = any(True for _ in conn.notifies(timeout=remaining, stop_after=1))
                except psycopg.Error:
                    conn.close()  # the next waiter opens another
                    raise
                finally:
                    self._lock.acquire()
                    self._reading = False
                    self._wakes += notified
                    self._changed.notify_all()  # a wake-up, or someone else's turn to read
        return arrived()

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()
