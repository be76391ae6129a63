"""Snapshots and the state cache: fewer events read, the same state, never a stale one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import incident
from incident.examples import bank
from incident.snapshots import Snapshot, code_key, take_snapshot


class CountingReads:
    """Wraps an event store and records the ``after`` of every stream read."""

    def __init__(self, store: incident.EventStore) -> None:
        self._store = store
        self.reads: list[int] = []

    def get(self, aggregate_id: str, *, after: int = 0) -> list[incident.Recorded[Any]]:
        self.reads.append(after)
        return self._store.get(aggregate_id, after=after)

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[incident.Event]:
        self.reads.append(after)  # the command handler folds bare events
        return self._store.events(aggregate_id, after=after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[incident.EventStore, incident.ProjectionStore]]:
    events, projections = incident.open_stores(store_url)
    yield events, projections
    events.close()


def deposits(app: incident.CommandHandler, count: int) -> None:
    for _ in range(count):
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=1))


def test_a_cold_start_reads_only_events_after_the_snapshot(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    events, projections = stores
    writer = bank.build(events, projections, snapshot_every=5)
    writer.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(writer, 11)  # versions 1..12: snapshots at 5 and 10
    snapshot = projections.get(Snapshot, "bank_account/A")
    assert snapshot is not None and snapshot.version == 10

    counting = CountingReads(events)
    reader = bank.build(counting, projections, snapshot_every=5)  # type: ignore[arg-type]
    assert reader.state("bank_account", "A").balance == 11
    assert counting.reads == [10]


def test_a_snapshot_from_other_code_is_ignored(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    events, projections = stores
    writer = bank.build(events, projections)
    writer.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(writer, 3)
    forged = take_snapshot(
        bank.bank_account, "A", bank.AccountState(account_number="A", balance=999), 4, "old-code"
    )
    assert forged is not None
    projections.project(forged)

    counting = CountingReads(events)
    reader = bank.build(counting, projections, snapshot_every=2)  # type: ignore[arg-type]
    assert reader.state("bank_account", "A").balance == 3
    assert counting.reads == [0]


def test_code_key_changes_when_an_apply_function_changes() -> None:
    before = code_key(bank.bank_account)
    other = incident.Aggregate("bank_account", initial=bank.AccountState())

    @other.apply
    def deposited(state: bank.AccountState, event: bank.MoneyDeposited) -> bank.AccountState:
        return state  # a different rule

    assert code_key(other) != before
    assert code_key(bank.bank_account) == before


def test_a_warm_cache_decides_without_reading(store_url: str) -> None:
    events = incident.open_event_store(store_url)
    counting = CountingReads(events)
    app = bank.build(counting, events.projections())  # type: ignore[arg-type]
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(app, 3)
    assert counting.reads == [0]  # only the first command, on an empty stream
    assert app.state("bank_account", "A").balance == 3  # state() always reads what is new
    assert counting.reads == [0, 4]
    events.close()


def test_a_cold_cache_reads_only_new_events(store_url: str) -> None:
    events = incident.open_event_store(store_url)
    counting = CountingReads(events)
    app = bank.build(counting, events.projections(), cache_size=0)  # type: ignore[arg-type]
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(app, 3)
    assert counting.reads == [0, 0, 0, 0]
    events.close()


def test_a_rejection_on_a_stale_cache_is_checked_against_the_store(store_url: str) -> None:
    """The cache says the balance is 0, another writer deposited: the withdrawal passes."""
    events = incident.open_event_store(store_url)
    first = bank.build(events)
    second = bank.build(events)
    first.dispatch(bank.OpenAccount(aggregate_id="A"))
    second.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
    [withdrawn] = first.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=10))
    assert withdrawn.version == 3
    with pytest.raises(incident.Rejected, match="no_enough_balance"):
        first.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=1))
    assert [r.event_type for r in events.get("A")] == [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
    ]
    events.close()


def test_a_stale_cache_is_caught_by_the_expected_version(store_url: str) -> None:
    """Another writer appends behind the cache's back: the next command still sees it."""
    events = incident.open_event_store(store_url)
    first = bank.build(events)
    second = bank.build(events)
    first.dispatch(bank.OpenAccount(aggregate_id="A"))
    first.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
    second.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=10))
    with pytest.raises(incident.Rejected, match="no_enough_balance"):
        first.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=10))
    assert first.state("bank_account", "A").balance == 0
    events.close()
