"""The SQLite store's error paths: a driver error at a chosen statement of a shared
commit, a leader interrupted around its COMMIT, a store closed while commits are
queued, a connection that cannot be opened or rolled back, the write lock's poll, and
the handler locks. Each test checks the callers' outcomes and that the file holds
exactly what they were told was written (incident.stores.sqlite, docs/writes.md).

A failure is injected by a connection (``FaultyConnection``, in sqlite_batches) that runs
the rules armed in ``faults``: raise at a statement, before or after running it, or roll
the whole transaction back first as SQLite does on a full disk. Batches are forced by
holding a first append inside its ``project`` until the others wait behind it; nothing
is timed.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from interrupts import Interrupted, signal_main, signal_main_when, sigusr1_raises, wait_until
from sqlite_batches import (
    Batch,
    Faults,
    Result,
    Rule,
    account,
    deposit,
    deposits_for,
    exactly,
    faulty_connections,
    ready,
    writing,
)

import incident
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.protocols import CommitCall, Committed, Outcome, Owed
from incident.stores.sqlite import SQLiteEventStore, open_sqlite
from incident.stores.sqlite.checkpoints import lock_path
from incident.stores.sqlite.sql import EVENT_ID_AT


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    """Every connection the stores open from here on is a FaultyConnection."""
    yield from faulty_connections(monkeypatch)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'edges.db'}"


# -- the log, and errors one each ------------------------------------------------------------


def log_of(url: str) -> list[str]:
    """The log's streams in position order, read by a store of its own (checked gapless)."""
    store = open_sqlite(url)
    try:
        events = list(store.read_all())
        assert [r.position for r in events] == list(range(1, len(events) + 1))
        return [r.aggregate_id for r in events]
    finally:
        store.close()


def store_errors(outcomes: dict[str, Result], *names: str) -> list[BaseException]:
    errors = [outcomes[name] for name in names]
    for name, error in zip(names, errors, strict=True):
        assert isinstance(error, incident.StoreError), (name, error)
    assert len({id(error) for error in errors}) == len(errors)  # one each, for its thread
    return errors


# -- a driver error in the middle of a shared commit ---------------------------------------


def test_a_bulk_write_that_loses_the_transaction_fails_every_caller(
    url: str, faults: Faults
) -> None:
    """SQLite rolls the whole transaction back (a full disk) while a batch's rows are
    written in bulk: the leader's append, written before, is gone too, so every caller
    gets a StoreError of its own, nothing is in the file, and the store goes on."""
    store = ready(url)

    def full_disk_next(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        error = sqlite3.OperationalError("database or disk is full (simulated)")
        faults.arm(Rule(writing("bank_account"), error, rollback=True))
        return account(recorded)

    outcomes = Batch(store).queue(deposits_for(a=full_disk_next, b=account))
    for error in store_errors(outcomes, "leader", "a", "b"):
        assert "disk is full" in str(error)
    assert log_of(url) == ["setup"]
    store.commit(deposit("after"), projection_store=store.projections(), project=account)
    assert log_of(url) == ["setup", "after"]
    assert store.projections().get(BankAccount, "a") is None


def test_a_savepoint_that_cannot_be_undone_fails_the_whole_batch(url: str, faults: Faults) -> None:
    """A batch's bulk write fails and its savepoint cannot be rolled back to: rather than
    commit the leader's append beside writes it cannot undo, the transaction is rolled
    back and every caller gets a StoreError; nothing is in the file."""
    store = ready(url)

    def failing_next(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        faults.arm(Rule(writing("bank_account"), sqlite3.IntegrityError("simulated")))
        faults.arm(Rule(exactly("ROLLBACK TO incident_append"), sqlite3.OperationalError("stuck")))
        return account(recorded)

    outcomes = Batch(store).queue(deposits_for(a=failing_next, b=account))
    store_errors(outcomes, "leader", "a", "b")
    assert log_of(url) == ["setup"]
    store.commit(deposit("after"), projection_store=store.projections(), project=account)
    assert log_of(url) == ["setup", "after"]


def test_a_rollback_that_fails_discards_the_connection(url: str, faults: Faults) -> None:
    """COMMIT fails, and so does ROLLBACK: the connection is closed (which rolls its
    transaction back), the caller gets a StoreError, nothing is in the file, and the
    next append opens a connection of its own."""
    store = ready(url)
    broken = store._db.write_conn()
    faults.arm(Rule(exactly("COMMIT"), sqlite3.OperationalError("disk I/O error (simulated)")))
    faults.arm(Rule(exactly("ROLLBACK"), sqlite3.OperationalError("rollback failed")))
    with pytest.raises(incident.StoreError, match="disk I/O error"):
        store.commit(deposit("lost"), projection_store=store.projections(), project=account)
    with pytest.raises(sqlite3.ProgrammingError):
        broken.execute("SELECT 1")  # closed
    assert log_of(url) == ["setup"]
    store.commit(deposit("after"), projection_store=store.projections(), project=account)
    assert store._db.write_conn() is not broken
    assert log_of(url) == ["setup", "after"]


def test_a_failing_commit_in_memory_is_a_store_error_and_writes_nothing(faults: Faults) -> None:
    """``sqlite://`` commits each append alone, on its one connection: a driver error
    there is a StoreError too, and the database goes on."""
    store = open_sqlite("sqlite://")
    store.append("setup", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    faults.arm(Rule(exactly("COMMIT"), sqlite3.OperationalError("disk I/O error (simulated)")))
    with pytest.raises(incident.StoreError, match="disk I/O error"):
        store.append("lost", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    assert [r.aggregate_id for r in store.read_all()] == ["setup"]
    store.append("after", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    assert [r.aggregate_id for r in store.read_all()] == ["setup", "after"]


# -- a leader interrupted around its COMMIT ----------------------------------------------------


def test_a_leader_interrupted_before_commit_hands_its_batch_on(url: str, faults: Faults) -> None:
    """The leader is interrupted as it commits, before COMMIT ran: its own append leaves
    with the interruption, written nowhere; the appends it had taken go back first in
    line, and the next leader writes them, once each."""
    store = ready(url)
    faults.arm(Rule(exactly("COMMIT"), Interrupted(), thread="leader"))
    outcomes = Batch(store).queue(deposits_for(a=account, b=account))
    assert isinstance(outcomes["leader"], Interrupted)
    assert isinstance(outcomes["a"], Committed) and isinstance(outcomes["b"], Committed)
    assert log_of(url) == ["setup", "a", "b"]
    assert outcomes["a"].recorded == store.get("a")
    assert store.group.queued == 0


def test_a_leader_interrupted_after_commit_wakes_its_batch_with_results(
    url: str, faults: Faults
) -> None:
    """The interruption comes once COMMIT has returned: the batch is in the log, read back
    to know it, so the others get their results and nothing is written twice."""
    store = ready(url)
    faults.arm(Rule(exactly("COMMIT"), Interrupted(), after=True, thread="leader"))
    outcomes = Batch(store).queue(deposits_for(a=account, b=account))
    assert isinstance(outcomes["leader"], Interrupted)
    assert isinstance(outcomes["a"], Committed) and isinstance(outcomes["b"], Committed)
    assert log_of(url) == ["setup", "leader", "a", "b"]
    assert outcomes["b"].recorded == store.get("b")
    store.commit(deposit("next"), projection_store=store.projections(), project=account)
    assert log_of(url)[-1] == "next" and store.group.queued == 0


def test_a_batch_whose_fate_cannot_be_read_is_not_written_again(url: str, faults: Faults) -> None:
    """Interrupted after COMMIT, the leader cannot read the log back to know whether its
    batch landed: the others get a StoreError each rather than a second write."""
    store = ready(url)
    faults.arm(Rule(exactly("COMMIT"), Interrupted(), after=True, thread="leader"))
    faults.arm(Rule(exactly(EVENT_ID_AT), sqlite3.OperationalError("disk I/O error (simulated)")))
    outcomes = Batch(store).queue(deposits_for(a=account, b=account))
    assert isinstance(outcomes["leader"], Interrupted)
    store_errors(outcomes, "a", "b")
    assert log_of(url) == ["setup", "leader", "a", "b"]  # each once


def test_commit_many_interrupted_while_it_waits_writes_nothing(url: str, faults: Faults) -> None:
    """A caller handing over several appends is interrupted while they wait behind a busy
    leader: none of them is written, and the queue is left empty."""
    store = ready(url)
    with sigusr1_raises(Interrupted):
        batch = Batch(store)
        killer = signal_main_when(lambda: store.group.queued == 2)
        calls = [CommitCall(deposit(n), store.projections(), account) for n in ("m1", "m2")]
        with pytest.raises(Interrupted):
            store.commit_many(calls)
        killer.join()
        assert store.group.queued == 0
        outcomes = batch.finish()
    assert isinstance(outcomes["leader"], Committed)
    assert log_of(url) == ["setup", "leader"]
    store.commit(deposit("next"), projection_store=store.projections(), project=account)
    assert log_of(url) == ["setup", "leader", "next"]


# -- a store closed while commits are queued -----------------------------------------------------


def test_commits_queued_when_the_store_closes_fail_each_with_its_own_error(url: str) -> None:
    """The store is closed while a leader writes and two appends wait behind it: the
    leader's transaction, open already, commits; the two, whose batch would begin after
    the close, get a StoreError each (not one error shared by two threads) and write
    nothing; later verbs raise StoreError."""
    store = ready(url)
    store.group.max_events = 3  # the leader's 3 events fill its batch: it takes no other
    batch = Batch(store, events=3)
    batch.enqueue(deposits_for(a=account, b=account))
    store.close()
    outcomes = batch.finish()
    assert isinstance(outcomes["leader"], Committed)
    for error in store_errors(outcomes, "a", "b"):
        assert "closed" in str(error)
    assert log_of(url) == ["setup", "leader", "leader", "leader"]
    with pytest.raises(incident.StoreError, match="closed"):
        store.commit(deposit("late"))
    assert store.group.queued == 0


# -- opening connections ---------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_a_store_error_and_left_as_it_was(
    tmp_path: Path, faults: Faults
) -> None:
    """Every verb on a file that is not SQLite's raises StoreError naming it; the
    connections opened to find out are closed, and the file is not touched."""
    path = tmp_path / "notes.db"
    content = b"not a database, just notes\n" * 200
    path.write_bytes(content)
    store = open_sqlite(f"sqlite:///{path}")
    with pytest.raises(incident.StoreError, match="not a database"):
        store.last_position()
    with pytest.raises(incident.StoreError, match="not a database"):
        store.append("a", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    assert faults.connections
    for conn in faults.connections:
        with pytest.raises(sqlite3.ProgrammingError):
            conn.execute("SELECT 1")  # closed
    assert path.read_bytes() == content
    store.close()


def test_switching_to_wal_waits_while_the_file_is_locked(url: str, faults: Faults) -> None:
    """Several processes opening a new file together: SQLite answers "locked" to the
    switch to WAL at once, and the store tries again until it gets through."""
    switch = faults.arm(
        Rule(
            exactly("PRAGMA journal_mode = WAL"),
            sqlite3.OperationalError("database is locked"),
            times=3,
        )
    )
    store = open_sqlite(url)
    store.append("a", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    assert switch.hits == 3
    assert log_of(url) == ["a"]
    store.close()


def test_switching_to_wal_gives_up_at_the_timeout(tmp_path: Path, faults: Faults) -> None:
    """A file locked for longer than the store's timeout: StoreError naming the lock,
    the connection closed, nothing created."""
    path = tmp_path / "locked.db"
    faults.arm(
        Rule(
            exactly("PRAGMA journal_mode = WAL"),
            sqlite3.OperationalError("database is locked"),
            times=10**9,
        )
    )
    store = open_sqlite(f"sqlite:///{path}", timeout=0.02)
    with pytest.raises(incident.StoreError, match=r"locked.*another connection holds the lock"):
        store.last_position()
    assert len(faults.connections) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        faults.connections[0].execute("SELECT 1")
    faults.rules.clear()
    check = sqlite3.connect(path)
    assert check.execute("SELECT name FROM sqlite_master").fetchall() == []
    check.close()
    store.close()


def test_a_store_closed_while_a_thread_connects_closes_the_new_connection(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is closed while a thread opens its connection: that connection is
    closed rather than kept, and the verb raises StoreError with nothing written."""
    store = open_sqlite(url)
    opened: list[sqlite3.Connection] = []
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = original(*args, **kwargs)
        opened.append(conn)
        store.close()  # another thread closes the store now
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(incident.StoreError, match="closed"):
        store.append("a", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    monkeypatch.undo()
    assert len(opened) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        opened[0].execute("SELECT 1")
    check = sqlite3.connect(url.removeprefix("sqlite:///"))
    assert check.execute("SELECT name FROM sqlite_master").fetchall() == []
    check.close()


# -- the write lock's poll -----------------------------------------------------------------------


def test_a_writer_tries_again_while_the_lock_is_busy(url: str, faults: Faults) -> None:
    store = ready(url)
    begin = faults.arm(
        Rule(exactly("BEGIN IMMEDIATE"), sqlite3.OperationalError("database is locked"), times=3)
    )
    store.commit(deposit("a"), projection_store=store.projections(), project=account)
    assert begin.hits == 3
    assert log_of(url) == ["setup", "a"]


def test_a_driver_error_other_than_the_lock_is_not_waited_out(url: str, faults: Faults) -> None:
    """BEGIN IMMEDIATE failing for another reason than the lock fails at once (one try,
    not a wait to the timeout), as a StoreError, with nothing written."""
    store = ready(url, timeout=5)
    faults.statements.clear()
    faults.arm(
        Rule(
            exactly("BEGIN IMMEDIATE"),
            sqlite3.OperationalError("disk I/O error (simulated)"),
            times=10**9,
        )
    )
    with pytest.raises(incident.StoreError, match="disk I/O error"):
        store.commit(deposit("a"), projection_store=store.projections(), project=account)
    assert faults.statements.count("BEGIN IMMEDIATE") == 1
    faults.rules.clear()
    assert log_of(url) == ["setup"]
    store.commit(deposit("b"), projection_store=store.projections(), project=account)
    assert log_of(url) == ["setup", "b"]


# -- handler locks -------------------------------------------------------------------------------


def test_handler_locks_of_an_in_memory_database_exclude_each_other() -> None:
    """``sqlite://`` lives in one process: its handler locks are thread locks, shared by
    every checkpoint store of that database, one per handler, and only of that database."""
    store, other = open_sqlite("sqlite://"), open_sqlite("sqlite://")
    first, second = store.checkpoints().lock("h"), store.checkpoints().lock("h")
    assert first.acquire(timeout=0) and first.acquire(timeout=0)  # held already: True
    assert not second.acquire(timeout=0.01)
    assert store.checkpoints().lock("g").acquire(timeout=0)  # another handler
    assert other.checkpoints().lock("h").acquire(timeout=0)  # another database
    first.release()
    first.release()  # not held: nothing
    assert not first.held()
    assert second.acquire(timeout=0) and second.held()
    second.release()


def test_a_handler_name_unfit_for_a_file_name_gets_a_hashed_lock_file(tmp_path: Path) -> None:
    path = tmp_path / "bank.db"
    store = open_sqlite(f"sqlite:///{path}")
    handler = "projections/bank accounts"
    lock_file = lock_path(str(path), handler)
    assert lock_file.startswith(f"{path}.") and lock_file.endswith(".lock")
    assert "/" not in lock_file.removeprefix(f"{path}.") and " " not in lock_file
    assert lock_file != lock_path(str(path), "projections/bank accounts 2")
    first, second = store.checkpoints().lock(handler), store.checkpoints().lock(handler)
    assert first.acquire(timeout=0)
    assert Path(lock_file).exists()
    assert not second.acquire(timeout=0.01)
    first.release()
    assert second.acquire(timeout=0)
    second.release()
    store.close()


def test_a_lock_file_that_cannot_be_opened_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "bank.db"
    store = open_sqlite(f"sqlite:///{path}")
    Path(lock_path(str(path), "h")).mkdir()  # where the lock file would go
    lock = store.checkpoints().lock("h")
    with pytest.raises(incident.StoreError, match="lock file"):
        lock.acquire(timeout=0)
    assert not lock.held()
    store.close()


# -- verbs on a file nothing has initialized yet --------------------------------------------------


OWED = Owed(
    handler="h",
    position=1,
    event_id="0b6c4f1e-7d1a-4c8e-9a53-2f0d6a1e9c44",
    aggregate_id="a",
    event_type="T",
    owed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
)

FIRST_VERBS: dict[str, Callable[[incident.EventStore], object]] = {
    "remember_rejection": lambda store: store.remember_rejection("k", "no_funds"),
    "outcome_for": lambda store: store.outcome_for("k"),
    "owe": lambda store: store.owe(OWED),
    "settle": lambda store: store.settle("h", 1),
    "owed": lambda store: store.owed(),
    "get": lambda store: store.get("a"),
    "events": lambda store: list(store.events("a")),
    "read_all": lambda store: list(store.read_all()),
    "last_position": lambda store: store.last_position(),
}


@pytest.mark.parametrize("verb", sorted(FIRST_VERBS))
def test_any_verb_works_first_on_a_store_nothing_has_initialized(
    event_store: incident.EventStore, verb: str
) -> None:
    """No verb needs ``initialize()`` first: the first one makes the schema (SQLite's
    ``remember_rejection`` raised "no such table")."""
    FIRST_VERBS[verb](event_store)
    event_store.remember_rejection("k", "no_funds")
    assert event_store.outcome_for("k") == Outcome([], "no_funds", None)
    event_store.owe(OWED)
    assert [o.position for o in event_store.owed("h")] == [1]
    event_store.settle("h", 1)
    assert event_store.owed() == []


def test_the_types_option_must_be_event_types(tmp_path: Path) -> None:
    with pytest.raises(incident.IncidentError, match=r"types must be an incident\.EventTypes"):
        open_sqlite(f"sqlite:///{tmp_path / 'x.db'}", types={"MoneyDeposited": MoneyDeposited})
    store = open_sqlite(f"sqlite:///{tmp_path / 'x.db'}")
    assert store.path == str(tmp_path / "x.db")
    store.close()


class FailingProjections:
    """A projection store in another database, which fails every write."""

    def project(self, projection: incident.Projection) -> incident.Projection:
        raise incident.StoreError("the other database is down")


def test_commit_many_with_projections_elsewhere_that_fail(url: str) -> None:
    """Projections for another database follow the commit: when writing them fails, that
    append's outcome is the error (as ``commit`` raises it), its events are committed,
    and the other appends are unaffected."""
    store = ready(url)
    elsewhere: Any = FailingProjections()
    outcomes = store.commit_many(
        [
            CommitCall(deposit("a"), store.projections(), account),
            CommitCall(deposit("b"), elsewhere, account),
            CommitCall(deposit("c"), store.projections(), account),
        ]
    )
    a, b, c = outcomes
    assert isinstance(a, Committed) and isinstance(c, Committed)
    assert isinstance(b, incident.StoreError) and "down" in str(b)
    assert log_of(url) == ["setup", "a", "b", "c"]
    assert store.projections().get(BankAccount, "c") is not None
    assert store.projections().get(BankAccount, "b") is None


def test_an_interruption_raised_by_a_followers_project_goes_to_the_leader(
    url: str, faults: Faults
) -> None:
    """A follower's ``project`` raises an exception that is not an Exception while the
    leader writes it: the batch is aborted, the leader's caller gets the interruption and
    the others go back in line. The follower, leading in its turn, runs its ``project``
    again and gets its interruption; the append behind it commits. Only that is written."""
    store = ready(url)

    def interrupts(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise Interrupted

    outcomes = Batch(store).queue(deposits_for(a=interrupts, b=account))
    assert isinstance(outcomes["leader"], Interrupted)
    assert isinstance(outcomes["a"], Interrupted)
    assert isinstance(outcomes["b"], Committed)
    assert log_of(url) == ["setup", "b"]
    assert store.group.queued == 0


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("UNIQUE constraint failed: events.aggregate_id, events.version", "conflict"),
        ("UNIQUE constraint failed: events.event_id", "driver"),
    ],
)
def test_a_unique_violation_on_a_streams_version_is_a_concurrency_error(
    url: str, faults: Faults, message: str, expected: str
) -> None:
    """Only a writer that skipped BEGIN IMMEDIATE could take a stream's next version
    under an append: for an append alone that is the conflict ConcurrencyError means;
    any other constraint on the events is a StoreError. Nothing is written either way."""
    store = ready(url)
    faults.arm(
        Rule(lambda sql: sql.startswith("INSERT INTO events"), sqlite3.IntegrityError(message))
    )
    with pytest.raises(incident.IncidentError) as raised:
        store.append("setup", [MoneyDeposited(amount=1)], expected_version=1)
    if expected == "conflict":
        assert isinstance(raised.value, incident.ConcurrencyError)
        assert raised.value.actual == 1
    else:
        assert isinstance(raised.value, incident.StoreError)
    assert log_of(url) == ["setup"]
    store.append("setup", [MoneyDeposited(amount=1)], expected_version=1)
    assert log_of(url) == ["setup", "setup"]


# -- projection rows that do not decode ----------------------------------------------------------


class Tagged(incident.Projection):
    aggregate_id: str
    tags: list[str]
    count: int


@pytest.mark.parametrize(
    ("column", "value"),
    [("tags", "{not json"), ("tags", '{"a": 1}'), ("count", "many"), ("count", None)],
)
def test_a_projection_row_edited_past_its_type_is_an_error_naming_it(
    url: str, column: str, value: object
) -> None:
    """A row changed by hand so that it no longer decodes as its type (bad JSON, a value
    of the wrong type, NULL where the field has no default) is an IncidentError naming
    the row and the type, from ``get`` and ``all``; the row is left as it is."""
    store = open_sqlite(url)
    projections = store.projections()
    projections.project(Tagged(aggregate_id="a", tags=["x"], count=1))
    table = store._db.table(Tagged).name
    with store._db.transaction() as conn:
        conn.execute(f'UPDATE "{table}" SET "{column}" = ?', (value,))
    pattern = rf"Row 'a' of table '{table}' does not decode as Tagged"
    with pytest.raises(incident.IncidentError, match=pattern):
        projections.get(Tagged, "a")
    with pytest.raises(incident.IncidentError, match=pattern):
        projections.all(Tagged)
    with store._db.guard:
        stored = store._db.conn().execute(f'SELECT "{column}" FROM "{table}"').fetchone()
    assert stored == (value,)
    store.close()


# -- a reader that stops early ---------------------------------------------------------------------


def test_a_partly_read_stream_does_not_hold_an_in_memory_database() -> None:
    """``sqlite://`` has one connection, shared under a lock: ``events()`` takes it for
    each query, not for as long as its caller keeps the iterator, so another thread
    appends and reads while a fold is paused; the fold then goes on to the stream's end."""
    store = open_sqlite("sqlite://")
    store.append("a", [MoneyDeposited(amount=n) for n in range(3)], expected_version=0)
    events = store.events("a")
    try:
        assert next(events) == MoneyDeposited(amount=0)
        seen: list[int] = []

        def other_thread() -> None:
            store.append("b", [MoneyDeposited(amount=9)], expected_version=0)
            seen.append(store.last_position())

        thread = threading.Thread(target=other_thread, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "the paused reader held the database"
        assert seen == [4]
        assert list(events) == [MoneyDeposited(amount=1), MoneyDeposited(amount=2)]
    finally:
        events.close()  # type: ignore[attr-defined]
    assert list(store.events("b")) == [MoneyDeposited(amount=9)]


def test_a_follower_gone_before_its_batch_aborts_is_not_handed_the_lead(
    url: str, faults: Faults
) -> None:
    """A follower interrupted once a leader has taken its append leaves it to its batch;
    when that batch then aborts (the leader interrupted before COMMIT), the append goes
    with it, unwritten, rather than back in line: handed the lead, a caller who is gone
    would never take it, and every append behind it would wait for ever."""
    store = ready(url)
    abandoned = threading.Event()

    def leaves(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        # the main thread's project, run by the leader: its caller is interrupted now
        signal_main()
        assert abandoned.wait(10)
        return account(recorded)

    faults.arm(Rule(exactly("COMMIT"), Interrupted(), thread="leader"))
    with sigusr1_raises(Interrupted):
        batch = Batch(store)

        def behind_main() -> None:
            wait_until(lambda: store.group.queued == 1)  # the main thread waits
            batch.start("behind", deposit("behind"), account)
            wait_until(lambda: store.group.queued == 2)
            batch.release.set()

        helper = threading.Thread(target=behind_main, daemon=True)
        helper.start()
        with pytest.raises(Interrupted):
            store.commit(deposit("main"), projection_store=store.projections(), project=leaves)
        abandoned.set()
        helper.join(10)
        outcomes = batch.finish()
    assert isinstance(outcomes["leader"], Interrupted)
    assert isinstance(outcomes["behind"], Committed)
    assert log_of(url) == ["setup", "behind"]
    assert store.group.queued == 0
    store.commit(deposit("next"), projection_store=store.projections(), project=account)
    assert log_of(url) == ["setup", "behind", "next"]


def test_a_leader_interrupted_after_the_store_closed_still_wakes_its_batch(
    url: str, faults: Faults
) -> None:
    """The store is closed while a leader writes, and the leader is then interrupted
    before COMMIT: the log cannot be read to know the batch's fate, so its followers get
    a StoreError each (rather than waiting for ever), and nothing is written."""
    store = ready(url)
    faults.arm(Rule(exactly("COMMIT"), Interrupted(), thread="leader"))
    batch = Batch(store)
    batch.enqueue(deposits_for(a=account, b=account))
    store.close()
    outcomes = batch.finish()
    assert isinstance(outcomes["leader"], Interrupted)
    store_errors(outcomes, "a", "b")
    assert log_of(url) == ["setup"]
    assert store.group.queued == 0


# -- reads that fail, URLs that are not SQLite's, dates -------------------------------------------

READS: dict[str, Callable[[SQLiteEventStore], object]] = {
    "get": lambda store: store.get("a"),
    "events": lambda store: list(store.events("a")),
    "stream": lambda store: list(store.stream("a")),
    "read_all": lambda store: list(store.read_all()),
    "version": lambda store: store.version("a"),
    "last_position": lambda store: store.last_position(),
    "owed": lambda store: store.owed(),
    "outcome_for": lambda store: store.outcome_for("k"),
}


@pytest.mark.parametrize("read", sorted(READS))
def test_a_read_the_driver_fails_is_a_store_error(url: str, faults: Faults, read: str) -> None:
    """Whatever its query, a read failing in the driver raises StoreError naming the file
    (the driver's error chained), and the next read works."""
    store = open_sqlite(url)
    store.append("a", [MoneyDeposited(amount=1)], expected_version=0, aggregate="bank")
    faults.arm(
        Rule(
            lambda sql: sql.startswith("SELECT") and "sqlite_master" not in sql,
            sqlite3.OperationalError("disk I/O error (simulated)"),
        )
    )
    with pytest.raises(incident.StoreError, match=r"SQLite failed on .*disk I/O error") as raised:
        READS[read](store)
    assert isinstance(raised.value.__cause__, sqlite3.OperationalError)
    READS[read](store)
    assert [r.aggregate_id for r in store.read_all()] == ["a"]
    store.close()


@pytest.mark.parametrize("url", ["sqlite://[::1", "sqlite:///bank\x00.db", "sqlite://host/x.db"])
def test_a_url_that_names_no_sqlite_file_is_refused(url: str) -> None:
    with pytest.raises(incident.IncidentError, match="Not an SQLite URL"):
        open_sqlite(url)


def test_dates_written_in_another_zone_are_stored_as_utc_text(url: str) -> None:
    """An owed follow-up's date given in another zone is stored as UTC text (which sorts
    like the instant) and read back as the same instant, in UTC."""
    store = open_sqlite(url)
    zone = dt.timezone(dt.timedelta(hours=2))
    owed = Owed(
        handler="h",
        position=1,
        event_id="0b6c4f1e-7d1a-4c8e-9a53-2f0d6a1e9c44",
        aggregate_id="a",
        event_type="T",
        owed_at=dt.datetime(2026, 1, 1, 1, 30, tzinfo=zone),
    )
    store.owe(owed)
    (back,) = store.owed()
    assert back.owed_at == owed.owed_at and back.owed_at.utcoffset() == dt.timedelta(0)
    with store._db.guard:
        (text,) = store._db.conn().execute("SELECT owed_at FROM incident_owed").fetchone()
    assert text == "2025-12-31T23:30:00.000000+00:00"
    store.close()
