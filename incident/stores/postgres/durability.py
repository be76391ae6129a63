"""When a Postgres append is durable, and what a reader may see: an append that others
wait behind commits without waiting for its WAL flush, so the schema's append lock is
held for the insert alone, and one flush that many appends share makes them durable
before any is acknowledged (an append alone commits synchronously); every read returns
only what is already flushed. See docs/postgres-writes.md.

WAL is written and flushed in order, so a flush that reaches a position covers every
commit record before it: one small synchronous commit, made after an append's commit,
makes that append durable, and the appends of every other thread that committed before
it too. Postgres itself shares the fsync between the flushes of different sessions."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from psycopg.pq import TransactionStatus

from .session import Connection, Query

# Run after a statement (in the same pipeline): where the WAL has been inserted up to,
# which is past the commit record of every transaction that statement could see, and
# where it has been flushed up to.
WAL_POSITIONS = "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
# A commit that waits for its flush. It must write WAL of its own: a transaction that
# only took a transaction id commits without waiting for the flush (as an asynchronous
# commit), whatever synchronous_commit says. A transactional logical message is the
# smallest such write (consumers of logical decoding see it, prefix "incident.flush",
# empty). It commits at the server's synchronous_commit level (the appends' commits are
# the only ones made with it off), and everything before the position it returns is
# flushed once it has committed.
FLUSH = "SELECT pg_logical_emit_message(true, 'incident.flush', '')::text"

# Sent after a numbered append's COMMIT in the same message: the flush when the append
# committed asynchronously (it waited for the lock: append_numbered set
# incident.unflushed, which the flush's message resets), else nothing to do (it
# committed synchronously, so the flush position is past it). A row of WAL_POSITIONS.
FLUSH_IF_WAITED = (
    "SELECT flushed, flushed FROM (SELECT CASE"
    " WHEN current_setting('incident.unflushed', true) = 'on'"
    " THEN pg_logical_emit_message(true, 'incident.flush',"
    " set_config('incident.unflushed', 'off', false))::text"
    " ELSE pg_current_wal_flush_lsn()::text END) AS flush(flushed)"
)

# Sent after an asynchronous COMMIT in the same message, when a flush is needed anyway
# (a batch's): the flush, as a row of WAL_POSITIONS that needs no more waiting.
FLUSH_NOW = f"SELECT flushed, flushed FROM ({FLUSH}) AS flush(flushed)"

# after a synchronous COMMIT, the server's flush position, which is past it: a row of
# WAL_POSITIONS that needs no flush
FLUSHED = "SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_flush_lsn()::text"

# an append commits with this, the first statement of its transaction
ASYNC_COMMIT = "SET LOCAL synchronous_commit = off"


def lsn(text: str) -> int:
    """A WAL position as Postgres prints it ('16/B374D848') as a number, for comparing.

    >>> lsn("16/B374D848") > lsn("16/B374D7FF") > lsn("0/0")
    True
    """
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class Durability:
    """The WAL position this process knows is flushed, and the flushes that move it.

    ``wait(position, conn)`` returns once the WAL is flushed past ``position``. One
    caller at a time runs a flush, on the connection it already holds (so waiting never
    needs a second one from the pool); those that arrive meanwhile wait for it, and are
    covered by it when their position is below what it reached, else one of them runs
    the next. However many threads commit at once, each waits for two flushes at most."""

    def __init__(self) -> None:
        self._flushed = 0  # known flushed up to here
        self._flushing = False
        self._changed = threading.Condition()

    def wait(self, position: int, conn: Connection) -> None:
        """Return once the WAL is flushed past ``position``; a driver error from the
        flush propagates (the caller cannot know whether what it wrote survives a crash)."""
        with self._changed:
            while self._flushed < position:
                if not self._flushing:
                    self._flushing = True
                    break
                self._changed.wait()
            else:
                return
        reached = 0
        try:
            # only a commit of its own flushes: inside a transaction it would not
            assert conn.info.transaction_status == TransactionStatus.IDLE
            row = conn.execute(FLUSH).fetchone()
            assert row is not None
            reached = lsn(row[0])
        finally:
            with self._changed:
                self._flushing = False
                self._flushed = max(self._flushed, reached)
                self._changed.notify_all()

    @property
    def flushed(self) -> int:
        """How far the WAL is known flushed, by this process's flushes or the server's."""
        return self._flushed

    def reached(self, flushed: int) -> None:
        """The WAL is known flushed up to ``flushed`` (read from the server, or returned
        by a flush the async store ran): waiting threads covered by it go on."""
        if flushed > self._flushed:
            with self._changed:
                if flushed > self._flushed:
                    self._flushed = flushed
                    self._changed.notify_all()

    def after(self, positions: tuple[Any, ...] | None, conn: Connection) -> None:
        """Given the row of WAL_POSITIONS read after a statement: return once what that
        statement could see (or, after a COMMIT, what it wrote) is flushed. The server's
        own flush position may be ahead of this process's flushes (another process's, the
        WAL writer's): then no flush is needed."""
        assert positions is not None
        inserted, flushed = lsn(positions[0]), lsn(positions[1])
        self.reached(flushed)
        self.wait(inserted, conn)


def durable_rows(
    conn: Connection, durability: Durability, query: Query, params: Sequence[Any]
) -> list[tuple[Any, ...]]:
    """The query's rows, returned once every commit it could see is flushed: a reader
    never acts on an event (or a read model row) that a crash of the server can take
    back. The WAL positions are read in the same round trip, after the query, so they
    are past the commit record of every transaction visible to it."""
    with conn.pipeline():
        rows = conn.execute(query, params)
        positions = conn.execute(WAL_POSITIONS)
    found = rows.fetchall()
    durability.after(positions.fetchone(), conn)
    return found
