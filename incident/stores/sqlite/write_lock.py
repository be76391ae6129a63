"""Waiting for SQLite's one write lock, held by another connection of any process.

SQLite's own busy handler sleeps between tries, 1 ms at first and up to 100 ms once a
writer has waited a while, so under steady contention the writers that have waited
longest try least often and keep losing the lock to those that have just arrived: a
subscriber among busy writer processes falls behind, and a writer can time out. Writes
therefore run on a connection without a busy handler, and try again at a fixed short
interval: every waiting writer as often as every other.
"""

from __future__ import annotations

import sqlite3
import time

__all__ = ["LOCK_POLL", "begin_immediate"]

LOCK_POLL = 0.001  # seconds between tries at the write lock while another writer holds it


def begin_immediate(conn: sqlite3.Connection, timeout: float, poll: float) -> None:
    """BEGIN IMMEDIATE, trying again every ``poll`` seconds while another connection (of
    any process) holds the write lock, for ``timeout`` seconds at most. Every waiting
    writer tries as often as every other, however long it has waited: they take turns,
    where SQLite's own busy handler makes the longest waiters try least often. Each try
    costs some CPU, so 8 processes writing flat out commit about a quarter less than with
    the busy handler (``poll=0``: the connection's busy handler waits instead)."""
    if not poll:
        conn.execute("BEGIN IMMEDIATE")
        return
    deadline: float | None = None
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error):
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + timeout
            elif now > deadline:
                raise
        time.sleep(poll)
