"""Group commit on SQLite: concurrent appends share one transaction and one fsync, and
each keeps its own outcome (incident.stores.sqlite.group_commit, docs/writes.md).

A batch is forced (sqlite_batches.Batch) by holding a first append inside its
``project`` while the others queue behind it, so that its writer takes them into its
transaction; the connections count their COMMITs, so these tests fail if grouping
silently stops happening. Nothing here is timed.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from interrupts import Interrupted, signal_main_when, sigusr1_raises, wait_until
from sqlite_batches import (
    Batch,
    Faults,
    Rule,
    account,
    deposit,
    exactly,
    faulty_connections,
    in_threads,
    log,
    ready,
)

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount, DepositMoney, MoneyDeposited, WithdrawMoney
from incident.stores.protocols import AppendRequest, CommitCall, Committed
from incident.stores.sqlite import SQLiteEventStore, open_sqlite


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    """Every connection the stores open from here on is a FaultyConnection, which
    records the thread of each COMMIT, so that a test sees how many were shared."""
    yield from faulty_connections(monkeypatch)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'group.db'}"


# -- one batch, several outcomes ---------------------------------------------------------


def test_each_append_of_a_shared_commit_gets_its_own_outcome(url: str, faults: Faults) -> None:
    """The appends queued behind a busy leader share its COMMIT; an append whose project
    raises, whose expected version is stale or whose key was used gets its own error and
    writes nothing, and the others of the batch commit, gapless, in queue order."""
    store = ready(url)
    store.commit(deposit("keyed", key="k1"), projection_store=store.projections(), project=account)
    faults.commits.clear()
    transactions = store.group.transactions

    def broken(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise ValueError("a bug in an inline handler")

    outcomes = Batch(store).queue(
        {
            "first": (deposit("first"), account),
            "raises": (deposit("raises"), broken),
            "stale": (deposit("setup", expected=0), account),  # setup is at version 1
            "duplicate": (deposit("dup", key="k1"), account),
            "last": (deposit("last"), account),
        }
    )
    assert faults.commits == ["leader"]  # one, for the leader's append and the batch
    assert store.group.transactions - transactions == 1
    assert isinstance(outcomes["raises"], ValueError)
    assert isinstance(outcomes["stale"], incident.ConcurrencyError)
    assert isinstance(outcomes["duplicate"], incident.DuplicateCommand)
    assert [p for p, _ in log(store)] == list(range(1, 6))
    assert log(store)[2:] == [(3, "leader"), (4, "first"), (5, "last")]
    for name in ("first", "last"):
        committed = outcomes[name]
        assert isinstance(committed, Committed)
        assert committed.recorded == store.get(name)
        row = store.projections().get(BankAccount, name)
        assert row is not None and row.event_id == committed.recorded[0].event_id
    for name in ("raises", "dup"):
        assert store.get(name) == []
        assert store.projections().get(BankAccount, name) is None
    assert store.version("setup") == 1


def test_a_projection_table_undone_with_its_savepoint_is_made_again(
    url: str, faults: Faults
) -> None:
    """An append that created a projection table and then failed takes the table with it;
    the next append of the same batch that needs the table creates it again."""

    class Fresh(incident.Projection):
        aggregate_id: str

    class Misfit(incident.Projection):
        aggregate_id: str

    store = ready(url)
    with store._db.transaction() as conn:
        conn.execute("CREATE TABLE misfit (aggregate_id TEXT)")  # no key: refuses upserts
    outcomes = Batch(store).queue(
        {
            "fails": (
                deposit("a"),
                lambda recorded: [Fresh(aggregate_id="a"), Misfit(aggregate_id="a")],
            ),
            "needs": (deposit("b"), lambda recorded: [Fresh(aggregate_id="b")]),
        }
    )
    assert isinstance(outcomes["fails"], incident.IncidentError)
    assert isinstance(outcomes["needs"], Committed)
    assert store.projections().all(Fresh) == [Fresh(aggregate_id="b")]
    assert faults.commits[-1] == "leader"  # the batch's writer, which wrote "needs" too


def test_a_failing_commit_fails_every_caller_of_the_batch(url: str, faults: Faults) -> None:
    """When the batch's COMMIT fails, nothing of it was written and each caller, its
    leader's too, gets a StoreError of its own; the store goes on, with gapless
    positions."""
    store = ready(url)
    faults.commits.clear()
    # the batch's COMMIT, the leader's append in it
    faults.arm(Rule(exactly("COMMIT"), sqlite3.OperationalError("disk I/O error (simulated)")))
    outcomes = Batch(store).queue({name: (deposit(name), account) for name in ("a", "b", "c")})
    assert faults.commits == ["leader"]
    errors = [outcomes[name] for name in ("leader", "a", "b", "c")]
    assert all(isinstance(e, incident.StoreError) for e in errors)
    assert len({id(e) for e in errors}) == 4  # one each: each raises it on its own thread
    assert "disk I/O error" in str(errors[0])
    assert log(store) == [(1, "setup")]
    assert store.projections().get(BankAccount, "a") is None
    store.commit(deposit("after"), projection_store=store.projections(), project=account)
    assert log(store)[-1] == (2, "after")


def test_a_transaction_sqlite_rolls_back_fails_the_whole_batch(url: str, faults: Faults) -> None:
    """A full disk makes SQLite roll the whole transaction back in the middle of a batch:
    the appends written before it are gone too, so every caller gets the error."""

    class Doomed(incident.Projection):
        aggregate_id: str

    store = ready(url)
    full_disk = faults.arm(
        Rule(
            lambda sql: '"doomed"' in sql,
            sqlite3.OperationalError("database or disk is full (simulated)"),
            times=10**9,
            rollback=True,
        )
    )
    outcomes = Batch(store).queue(
        {
            "before": (deposit("before"), account),
            "full": (deposit("full"), lambda recorded: [Doomed(aggregate_id="full")]),
            "after": (deposit("after"), account),
        }
    )
    full_disk.times = 0
    for name in ("leader", "before", "full", "after"):
        assert isinstance(outcomes[name], incident.StoreError), name
        assert "disk is full" in str(outcomes[name])
    assert log(store) == [(1, "setup")]
    store.commit(deposit("later"), projection_store=store.projections(), project=account)
    assert log(store)[-1] == (2, "later")


def test_a_lone_writer_commits_on_its_own_thread_without_a_savepoint(url: str) -> None:
    """No concurrency, no change: the caller's own connection runs BEGIN IMMEDIATE, the
    append and COMMIT, with no savepoint and no other thread."""
    store = ready(url)
    statements: list[str] = []
    conn = store._db.write_conn()
    conn.set_trace_callback(statements.append)
    store.commit(deposit("alone"), projection_store=store.projections(), project=account)
    conn.set_trace_callback(None)
    assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
    assert not any("SAVEPOINT" in s for s in statements)


def test_an_in_memory_database_commits_alone() -> None:
    """``sqlite://`` has one connection and no fsync to share: appends do not queue."""
    store = open_sqlite("sqlite://")
    store.commit(deposit("a"), projection_store=store.projections(), project=account)
    assert store.group.transactions == 0
    assert [r.aggregate_id for r in store.read_all()] == ["a"]


# -- a follower interrupted while it waits -----------------------------------------------


def test_an_interrupted_follower_writes_nothing_and_the_queue_goes_on(url: str) -> None:
    """A follower interrupted (here by a signal, as Ctrl-C would) before a leader took its
    append leaves the queue: nothing of it is written, the lead passes on, and the
    appends queued behind it commit."""
    store = ready(url)
    with sigusr1_raises(Interrupted):
        batch = Batch(store)
        killer = signal_main_when(lambda: store.group.queued == 1)
        with pytest.raises(Interrupted):
            store.commit(deposit("main"), projection_store=store.projections(), project=account)
        killer.join()
        outcomes = batch.queue({"behind": (deposit("behind"), account)})
    assert isinstance(outcomes["leader"], Committed)
    assert isinstance(outcomes["behind"], Committed)
    assert log(store) == [(1, "setup"), (2, "leader"), (3, "behind")]
    store.commit(deposit("next"), projection_store=store.projections(), project=account)
    assert store.group.queued == 0 and log(store)[-1] == (4, "next")


# -- many threads, one handler ---------------------------------------------------------------


def test_eight_threads_sharing_a_handler_lose_nothing_and_write_no_conflict(url: str) -> None:
    """8 threads dispatch deposits and withdrawals to shared accounts and their own, with
    stale appends and reused idempotency keys mixed in: every acknowledged command is in
    the log exactly once, positions run 1..n, no conflicting append wrote anything, and
    the balances are what the acknowledged commands imply. Commits were shared."""
    app = bank.build(url, retries=100)
    store = app.event_store
    assert isinstance(store, SQLiteEventStore)
    shared = ["S0", "S1", "S2"]
    for name in shared:
        app.dispatch(bank.OpenAccount(aggregate_id=name))
    acknowledged: list[tuple[str, int, list[str]]] = []  # (account, +/- amount, event ids)
    conflicts: list[str] = []
    keyed: dict[str, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        rng = random.Random(worker)
        own = f"own-{worker}"
        app.dispatch(bank.OpenAccount(aggregate_id=own))
        start.wait()
        for n in range(60):
            target = rng.choice([*shared, own])
            roll = rng.random()
            if roll < 0.1:  # stale: the stream is past version 0 for every account
                try:
                    store.append(
                        target,
                        [MoneyDeposited(amount=777_777)],
                        expected_version=store.version(target) - 1,
                        aggregate="bank_account",
                    )
                except incident.ConcurrencyError:
                    with lock:
                        conflicts.append(target)
                continue
            # every fifth command is keyed, and sent by two threads at once (this
            # one and its twin): one run is stored, and both see its events
            key = f"k-{worker // 2}-{n}" if n % 5 == 0 else None
            pick = random.Random(key) if key else rng
            if key:
                target = pick.choice(shared)
            amount = pick.randint(1, 9)
            withdraw = pick.random() < 0.3
            command: Any = (
                WithdrawMoney(aggregate_id=target, amount=amount)
                if withdraw
                else DepositMoney(aggregate_id=target, amount=amount)
            )
            try:
                recorded = app.dispatch(command, {"idempotency_key": key} if key else None)
            except incident.Rejected:
                continue  # insufficient funds: nothing written
            ids = [r.event_id for r in recorded]
            with lock:
                if key is not None and key in keyed:
                    assert keyed[key] == ids  # the twin's run, replayed
                    continue
                if key is not None:
                    keyed[key] = ids
                acknowledged.append((target, -amount if withdraw else amount, ids))

    events = in_threads(work, 8, store)
    counts = Counter(r.event_id for r in events)
    assert all(count == 1 for count in counts.values())
    for _, _, ids in acknowledged:
        assert all(counts[event_id] == 1 for event_id in ids)
    assert conflicts and not any(
        isinstance(r.data, MoneyDeposited) and r.data.amount == 777_777 for r in events
    )
    balances: Counter[str] = Counter()
    for target, amount, _ in acknowledged:
        balances[target] += amount
    for name in [*shared, *(f"own-{w}" for w in range(8))]:
        row = app.projection_store.get(BankAccount, name)
        assert row is not None and row.balance == balances[name], name
        app.cache.clear()
        assert app.state(bank.bank_account, name).balance == balances[name]
    opened = len(shared) + 8
    assert len(events) == opened + sum(len(ids) for _, _, ids in acknowledged)
    assert store.group.appends > store.group.transactions  # commits were shared


# -- several appends from one caller (what the async stores hand over) ------------------


def calls(*requests: tuple[AppendRequest, Any], store: SQLiteEventStore) -> list[CommitCall]:
    return [CommitCall(request, store.projections(), project) for request, project in requests]


def test_commit_many_shares_one_commit_and_gives_each_append_its_own_outcome(
    url: str, faults: Faults
) -> None:
    """One caller's appends go in one transaction: a stale one, one whose project raises,
    one with a used key and one with an event that cannot be stored each get their own
    error and write nothing; the others commit in order, gapless, with one COMMIT."""
    store = ready(url)
    store.commit(deposit("keyed", key="k1"), projection_store=store.projections(), project=account)
    faults.commits.clear()

    def broken(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise ValueError("a bug in an inline handler")

    unstorable = AppendRequest(
        aggregate_id="bad\x00", events=[MoneyDeposited(amount=1)], expected_version=0
    )
    outcomes = store.commit_many(
        calls(
            (deposit("first"), account),
            (deposit("setup", expected=0), account),
            (deposit("raises"), broken),
            (deposit("dup", key="k1"), account),
            (unstorable, account),
            (deposit("last"), account),
            store=store,
        )
    )
    assert len(faults.commits) == 1
    first, stale, raises, duplicate, bad, last = outcomes
    assert isinstance(stale, incident.ConcurrencyError)
    assert isinstance(raises, ValueError)
    assert isinstance(duplicate, incident.DuplicateCommand)
    assert isinstance(bad, incident.Unstorable)
    assert isinstance(first, Committed) and isinstance(last, Committed)
    assert log(store)[2:] == [(3, "first"), (4, "last")]
    assert first.recorded == store.get("first") and last.recorded == store.get("last")
    for name in ("raises", "dup", "bad\x00"):
        assert store.get(name) == []
    row = store.projections().get(BankAccount, "last")
    assert row is not None and row.event_id == last.recorded[0].event_id


def test_commit_many_behind_a_busy_leader_joins_its_batch(url: str, faults: Faults) -> None:
    """Appends handed over while another thread's batch is being written queue like
    callers of their own and go into that batch: one COMMIT for all of them."""
    store = ready(url)
    faults.commits.clear()
    batch = Batch(store)
    handed: list[Committed | Exception] = []
    many = threading.Thread(
        target=lambda: handed.extend(
            store.commit_many(calls(*[(deposit(f"m{n}"), account) for n in range(3)], store=store))
        )
    )
    many.start()
    wait_until(lambda: store.group.queued == 3)
    outcomes = batch.queue({})
    many.join(10)
    assert isinstance(outcomes["leader"], Committed)
    assert all(isinstance(outcome, Committed) for outcome in handed)
    assert faults.commits == ["leader"]
    assert [name for _, name in log(store)[1:]] == ["leader", "m0", "m1", "m2"]


def test_commit_many_beyond_the_batch_bound_takes_several_commits_in_order(
    url: str, faults: Faults
) -> None:
    store = ready(url)
    store.group.max_requests = 4
    faults.commits.clear()
    outcomes = store.commit_many(
        calls(*[(deposit(f"n{n}"), account) for n in range(10)], store=store)
    )
    assert all(isinstance(outcome, Committed) for outcome in outcomes)
    assert len(faults.commits) == 3  # 4 + 4 + 2
    assert [name for _, name in log(store)[1:]] == [f"n{n}" for n in range(10)]
    assert store.group.queued == 0


def test_commit_many_in_memory_commits_each_alone() -> None:
    store = open_sqlite("sqlite://")
    outcomes = store.commit_many(
        calls(
            (deposit("a"), account), (deposit("a"), account), (deposit("b"), account), store=store
        )
    )
    assert isinstance(outcomes[1], incident.ConcurrencyError)  # "a" is at version 1 by then
    assert [r.aggregate_id for r in store.read_all()] == ["a", "b"]
