"""A shared commit written in bulk (incident.stores.sqlite.batch, docs/writes.md): the
rows of a batch's appends go in with a statement per table, and each append still keeps
its own key, version check and all-or-nothing outcome; when a bulk write fails the batch
is written again one append at a time, so only the append whose rows fail fails.

Batches are forced by sqlite_batches.Batch (a first append held inside its
``project`` while the others queue, so they join its transaction); the connections
record the INSERTs into the events table, so these tests fail if the bulk path silently
stops being taken. Nothing here is timed.
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlite_batches import Batch, account, deposit, in_threads, log, ready, recording

import incident
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.protocols import AppendRequest, Committed, Effects, Owed
from incident.stores.sqlite import SQLiteEventStore


class Inserts:
    """How many statements inserting into the events table each thread ran, and how many
    rows each carried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statements: list[tuple[str, int]] = []  # (thread, rows)

    def note(self, sql: str, rows: int) -> None:
        if sql.startswith("INSERT INTO events "):
            with self.lock:
                self.statements.append((threading.current_thread().name, rows))


INSERTS = Inserts()


class RecordingConnection(sqlite3.Connection):
    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        INSERTS.note(sql, 1)
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        rows = list(parameters)
        INSERTS.note(sql, len(rows))
        return super().executemany(sql, rows)


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A file of its own for each test."""
    return f"sqlite:///{tmp_path / 'batch.db'}"


@pytest.fixture
def inserts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Inserts]:
    """Every connection the stores open from here on records its INSERTs."""
    yield from recording(monkeypatch, RecordingConnection, INSERTS)


def deposits(aggregate_id: str, count: int, expected: object) -> AppendRequest:
    return AppendRequest(
        aggregate_id=aggregate_id,
        events=[MoneyDeposited(amount=n) for n in range(1, count + 1)],
        expected_version=expected,
        aggregate="bank_account",
    )


def batch_inserts(inserts: Inserts) -> list[int]:
    """The rows of each events INSERT the batch's leader ran after its own append's."""
    return [rows for thread, rows in inserts.statements if thread == "leader"][1:]


def test_a_shared_commit_inserts_its_events_in_one_statement(url: str, inserts: Inserts) -> None:
    """A batch mixing a multi-event append, a keyed one and a stale one: one INSERT
    carries the events of the appends that passed, in queue order and gapless; the stale
    one gets its own error and writes nothing; every committed append's projection is
    there. An append with a bad expected version never joins a batch: it is refused
    before, as every store refuses it."""
    store = ready(url)
    with pytest.raises(incident.IncidentError, match="expected_version"):
        store.commit(deposit("bad", expected="one"), projection_store=store.projections())
    store.commit(deposit("old"), projection_store=store.projections(), project=account)
    outcomes = Batch(store).queue(
        {
            "first": (deposits("multi", 3, 0), account),
            "stale": (deposit("old", expected=0), account),  # old is at version 1
            "keyed": (deposit("keyed", key="k1"), account),
            "last": (deposits("last", 2, 0), account),
        }
    )
    assert batch_inserts(inserts) == [3 + 1 + 2]  # one statement, six rows
    assert isinstance(outcomes["stale"], incident.ConcurrencyError)
    assert [p for p, _ in log(store)] == list(range(1, 10))
    multi, keyed, last = (
        [(4, "multi"), (5, "multi"), (6, "multi")],
        [(7, "keyed")],
        [(8, "last"), (9, "last")],
    )
    assert log(store)[3:] == multi + keyed + last
    assert [r.version for r in store.get("multi")] == [1, 2, 3]
    assert store.version("old") == 1 and store.get("bad") == []
    for name, stream in (("first", "multi"), ("keyed", "keyed"), ("last", "last")):
        committed = outcomes[name]
        assert isinstance(committed, Committed)
        assert committed.recorded == store.get(stream)
        row = store.projections().get(BankAccount, stream)
        assert row is not None and row.version == committed.recorded[-1].version
    earlier = store.outcome_for("k1")
    assert earlier is not None and earlier.recorded == store.get("keyed")


def test_idempotency_keys_inside_one_shared_commit(url: str, inserts: Inserts) -> None:
    """A key used before the batch is DuplicateCommand with its stored events; a key used
    by an earlier append of the same batch is DuplicateCommand with that append's
    events; a key whose first append failed is still free for the next one."""
    store = ready(url)
    used = store.commit(deposit("used", key="old"), projection_store=store.projections())
    outcomes = Batch(store).queue(
        {
            "again": (deposit("x", key="old"), account),
            "stale": (deposit("setup", expected=0, key="new"), account),  # fails: key free
            "takes": (deposit("y", key="new"), account),
            "twin": (deposit("z", key="new"), account),
        }
    )
    assert batch_inserts(inserts) == [1]
    again, twin, takes = outcomes["again"], outcomes["twin"], outcomes["takes"]
    assert isinstance(again, incident.DuplicateCommand) and again.recorded == used.recorded
    assert isinstance(outcomes["stale"], incident.ConcurrencyError)
    assert isinstance(takes, Committed) and takes.recorded == store.get("y")
    assert isinstance(twin, incident.DuplicateCommand) and twin.recorded == takes.recorded
    assert store.get("x") == [] and store.get("z") == []
    stored = store.outcome_for("new")
    assert stored is not None and stored.recorded == takes.recorded


def test_one_stream_twice_in_a_batch_is_checked_in_order(url: str, inserts: Inserts) -> None:
    """Two appends to one stream in one batch are checked one after the other: the second
    one's expected version is the version the first reached; a third still expecting the
    old version conflicts."""
    store = ready(url)
    outcomes = Batch(store).queue(
        {
            "one": (deposits("s", 2, 0), account),
            "two": (deposit("s", expected=2), account),
            "old": (deposit("s", expected=2), account),
        }
    )
    assert batch_inserts(inserts) == [3]
    assert isinstance(outcomes["two"], Committed)
    assert isinstance(outcomes["old"], incident.ConcurrencyError)
    assert [r.version for r in store.get("s")] == [1, 2, 3]
    row = store.projections().get(BankAccount, "s")
    assert row is not None and row.version == 3


def test_owed_follow_ups_of_a_shared_commit_commit_with_their_events(
    url: str, inserts: Inserts
) -> None:
    """What the appends of a batch owe is written with their events; an append whose
    project raises owes nothing."""
    store = ready(url)

    def owing(recorded: list[incident.Recorded[Any]]) -> Effects:
        owed = [
            Owed(
                handler="audit",
                position=r.position,
                event_id=r.event_id,
                aggregate_id=r.aggregate_id,
                event_type=r.event_type,
                owed_at=dt.datetime.now(dt.UTC),
            )
            for r in recorded
        ]
        return Effects(account(recorded), owed)

    def broken(recorded: list[incident.Recorded[Any]]) -> Effects:
        raise ValueError("a bug in an inline handler")

    outcomes = Batch(store).queue(
        {"a": (deposits("a", 2, 0), owing), "b": (deposit("b"), broken), "c": (deposit("c"), owing)}
    )
    assert batch_inserts(inserts) == [3]
    assert isinstance(outcomes["b"], ValueError)
    owed = store.owed("audit")
    assert [(o.aggregate_id, o.position) for o in owed] == [("a", 3), ("a", 4), ("c", 5)]
    assert [o.event_id for o in owed] == [r.event_id for r in store.get("a") + store.get("c")]


class Picky(incident.Projection):
    aggregate_id: str
    amount: int


def picky(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
    last = recorded[-1]
    return [Picky(aggregate_id=last.aggregate_id, amount=last.data.amount)]


def test_rows_that_fail_to_write_fail_their_append_alone(url: str, inserts: Inserts) -> None:
    """A projection row the database refuses (here a CHECK in the user's table) fails the
    bulk write; the batch is then written one append at a time in the same transaction,
    so that append alone gets the error and writes nothing, and the others commit,
    gapless, in queue order."""
    store = ready(url)
    with store._db.transaction() as conn:
        conn.execute(
            "CREATE TABLE picky (aggregate_id TEXT PRIMARY KEY, amount INTEGER CHECK (amount > 0))"
        )
    store.commit(deposit("ok"), projection_store=store.projections(), project=picky)
    transactions = store.group.transactions
    outcomes = Batch(store).queue(
        {
            "one": (deposit("one"), picky),
            "refused": (
                AppendRequest(
                    aggregate_id="refused",
                    events=[MoneyDeposited(amount=-5)],
                    expected_version=0,
                    aggregate="bank_account",
                ),
                picky,
            ),
            "two": (deposits("two", 2, 0), picky),
        }
    )
    # the bulk attempt (all three appends), then one at a time
    assert batch_inserts(inserts) == [4, 1, 1, 2]
    assert isinstance(outcomes["refused"], incident.StoreError)
    assert "CHECK constraint failed" in str(outcomes["refused"])
    assert isinstance(outcomes["one"], Committed) and isinstance(outcomes["two"], Committed)
    assert log(store)[3:] == [(4, "one"), (5, "two"), (6, "two")]
    assert store.get("refused") == []
    rows = {p.aggregate_id: p.amount for p in store.projections().all(Picky)}
    assert rows == {"ok": 1, "one": 1, "two": 2}
    assert store.group.transactions == transactions + 1  # the leader's, holding the batch


def test_multi_event_appends_from_eight_threads_stay_whole_and_gapless(url: str) -> None:
    """8 threads append 1 to 4 events at a time, to streams of their own (exact expected
    versions) and to shared ones (ANY): the log runs 1..n without a hole, each append's
    events sit at consecutive positions in their stream's order, each stream's versions
    run 1..k, and commits were shared and written in bulk."""
    store = ready(url)
    assert isinstance(store, SQLiteEventStore)
    appended: list[list[incident.Recorded[Any]]] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        rng = random.Random(worker)
        own, version = f"own-{worker}", 0
        start.wait()
        for _ in range(40):
            count = rng.randint(1, 4)
            shared = rng.random() < 0.5
            request = deposits(
                f"shared-{rng.randint(0, 2)}" if shared else own,
                count,
                incident.ANY if shared else version,
            )
            committed = store.commit(request, projection_store=store.projections(), project=account)
            if not shared:
                version += count
            with lock:
                appended.append(committed.recorded)

    events = in_threads(work, 8, store)
    assert len(events) == 1 + sum(len(r) for r in appended)
    by_position = {r.position: r for r in events}
    for recorded in appended:
        first = recorded[0]
        assert [r.position for r in recorded] == list(
            range(first.position, first.position + len(recorded))
        )
        assert [r.version for r in recorded] == list(
            range(first.version, first.version + len(recorded))
        )
        assert all(by_position[r.position].event_id == r.event_id for r in recorded)
    for stream in {r.aggregate_id for r in events}:
        assert [r.version for r in store.get(stream)] == list(range(1, store.version(stream) + 1))
        row = store.projections().get(BankAccount, stream)
        assert row is not None and row.version == store.version(stream)
    assert store.group.appends > store.group.transactions  # commits were shared
