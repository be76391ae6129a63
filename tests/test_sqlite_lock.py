"""Waiting for SQLite's write lock (incident/stores/sqlite/database.py): a writer polls
for it every millisecond itself instead of sleeping in SQLite's busy handler (whose
sleeps grow to 100 ms, so the writers that have waited longest try least often and a
subscriber among busy writer processes falls behind); it waits up to the store's
``timeout``, then fails with a typed error and nothing written."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

import incident
from incident.examples import bank
from incident.stores.sqlite import SQLiteEventStore


def deposit() -> list[bank.MoneyDeposited]:
    return [bank.MoneyDeposited(amount=1)]


def test_a_writer_waits_for_a_lock_another_connection_holds_then_appends(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lock.db'}"
    with closing(incident.open_event_store(url)) as store:
        store.append("A", deposit(), expected_version=0)
        other = sqlite3.connect(tmp_path / "lock.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer, as SQLite sees it
        appended = threading.Event()
        writer = threading.Thread(
            target=lambda: (store.append("A", deposit(), expected_version=1), appended.set())
        )
        writer.start()
        assert not appended.wait(0.3), "appended while another connection held the lock"
        other.execute("COMMIT")
        writer.join(30)
        assert appended.is_set()
        assert [r.version for r in store.read_all()] == [1, 2]
        other.close()


def test_a_lock_held_past_the_timeout_is_a_clear_error_and_writes_nothing(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'lock.db'}?timeout=0.2"
    with closing(incident.open_event_store(url)) as store:
        store.append("A", deposit(), expected_version=0)
        other = sqlite3.connect(tmp_path / "lock.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(incident.StoreError, match=r"locked.*writers wait up to 0.2 s"):
            store.append("A", deposit(), expected_version=1)
        other.execute("ROLLBACK")
        other.close()
        assert store.version("A") == 1
        store.append("A", deposit(), expected_version=1)  # and the store works on
        assert store.version("A") == 2


def test_writes_poll_for_the_lock_and_reads_keep_sqlites_busy_handler(tmp_path: Path) -> None:
    """The mechanism: a thread's writing connection has no busy handler (the store polls),
    its reading one waits in SQLite's (a read meets a lock only in rare moments, such as
    another process recovering the WAL after a crash)."""
    store = incident.open_event_store(f"sqlite:///{tmp_path / 'lock.db'}?timeout=7")
    assert isinstance(store, SQLiteEventStore)
    try:
        store.append("A", deposit(), expected_version=0)
        database = store._db
        assert database.write_conn() is not database.conn()
        assert database.write_conn().execute("PRAGMA busy_timeout").fetchone() == (0,)
        assert database.conn().execute("PRAGMA busy_timeout").fetchone() == (7000,)
    finally:
        store.close()


def test_lock_poll_zero_leaves_the_wait_to_sqlites_busy_handler(tmp_path: Path) -> None:
    store = incident.open_event_store(f"sqlite:///{tmp_path / 'lock.db'}?timeout=7&lock_poll=0")
    assert isinstance(store, SQLiteEventStore)
    try:
        store.append("A", deposit(), expected_version=0)
        assert store._db.write_conn().execute("PRAGMA busy_timeout").fetchone() == (7000,)
    finally:
        store.close()


@pytest.mark.parametrize("poll", ["-1", "2", "soon"])
def test_a_bad_lock_poll_is_refused(tmp_path: Path, poll: str) -> None:
    with pytest.raises(incident.IncidentError, match="lock_poll"):
        incident.open_event_store(f"sqlite:///{tmp_path / 'lock.db'}?lock_poll={poll}")
    assert not (tmp_path / "lock.db").exists()
