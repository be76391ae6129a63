"""Damage is always detected: rows damaged behind the store's back (garbage JSON, another
type's payload, an edited event_type, a deleted row) give a CorruptEvent from every read
path, never a wrong state; a subscription parks, skips or stops on them."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import RAW_BACKENDS, on_backends

import incident
from incident.examples import bank
from incident.examples.bank import (
    AccountOpened,
    AccountState,
    DepositMoney,
    MoneyDeposited,
    MoneyWithdrawn,
    OpenAccount,
    WithdrawMoney,
)

Edit = Callable[[int, dict[str, object] | None], None]

# what is done to position 3 (A's second deposit, version 3)
DAMAGES: dict[str, dict[str, object] | None] = {
    "garbage": {"data": '{"type": "MoneyDeposited", "amount": '},
    "other_shape": {"data": '{"type": "MoneyWithdrawn", "amount": 50}'},
    "event_type": {"event_type": "MoneyWithdrawn"},
    "deleted": None,
}
# Postgres's json column refuses garbage on write: that damage is SQLite's alone
CASES = [
    (backend, damage)
    for backend in RAW_BACKENDS
    for damage in DAMAGES
    if damage != "garbage" or backend == "sqlite"
]


def new_app(url: str | incident.EventStore) -> incident.CommandHandler:
    return incident.CommandHandler(url, aggregates=[bank.bank_account, bank.transfer])


@pytest.fixture
def damaged(store_url: str, edit_raw_event: Edit, damage: str) -> Iterator[str]:
    """A's stream: opened, +100, +50, -10 (balance 140) at positions 1-4, B's after it at
    5-6; position 3 then damaged. Yields the store URL."""
    app = new_app(store_url)
    app.dispatch(OpenAccount(aggregate_id="A"))
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    app.dispatch(DepositMoney(aggregate_id="A", amount=50))
    app.dispatch(WithdrawMoney(aggregate_id="A", amount=10))
    app.dispatch(OpenAccount(aggregate_id="B"))
    app.dispatch(DepositMoney(aggregate_id="B", amount=5))
    app.event_store.close()
    edit_raw_event(3, DAMAGES[damage])
    yield store_url


@pytest.mark.parametrize(("store_url", "damage"), CASES, indirect=["store_url"])
def test_every_read_path_raises_corrupt_event(damaged: str, damage: str) -> None:
    """Loading, deciding a new command, get, stream, events and read_all all raise a
    CorruptEvent naming stream A and the damaged version or position; none returns a
    state or a log with the damage folded in or stepped over."""
    app = new_app(damaged)
    store = app.event_store
    try:
        reads: dict[str, Callable[[], object]] = {
            "load": lambda: app.state("bank_account", "A"),
            "command": lambda: app.dispatch(WithdrawMoney(aggregate_id="A", amount=120)),
            "get": lambda: store.get("A"),
            "stream": lambda: list(store.stream("A")),
            "events": lambda: list(store.events("A")),
            "read_all": lambda: list(store.read_all()),
        }
        for name, read in reads.items():
            with pytest.raises(incident.CorruptEvent) as caught:
                read()
            error = caught.value
            if name == "read_all" and damage == "deleted":
                assert (error.position, error.aggregate_id) == (3, ""), name
                assert "position 3 is missing" in str(error)
            else:
                assert error.aggregate_id == "A", name
                assert 3 in (error.position, error.version), (name, str(error))
        assert store.version("A") == 4 or damage == "deleted"
        # the other stream is intact and reads as before
        assert app.state("bank_account", "B").balance == 5
    finally:
        store.close()


def listener(*types: type[incident.Event]) -> tuple[incident.EventHandler, list[int]]:
    handler = incident.EventHandler("balances")
    seen: list[int] = []

    @handler.listen(*types)
    def note(recorded: incident.Recorded[Any], state: AccountState) -> list[Any]:
        seen.append(recorded.position)
        return []

    return handler, seen


@pytest.mark.parametrize(("store_url", "damage"), CASES, indirect=["store_url"])
def test_a_listening_subscription_parks_the_damaged_event_and_holds_its_stream(
    damaged: str, damage: str
) -> None:
    """A handler that listens to deposits parks the unreadable event at once (no retries)
    with the CorruptEvent as its error; A's later event waits behind it, unhandled, and
    B's events are handled: nothing stops."""
    app = new_app(damaged)
    try:
        handler, seen = listener(AccountOpened, MoneyDeposited, MoneyWithdrawn)
        subscription = incident.Subscription(handler, app, retries=5, backoff=10.0)
        subscription.catch_up()
        assert subscription.position == 6
        assert seen == [1, 2, 5, 6]
        parked = {p.position: p for p in subscription.parked()}
        assert sorted(parked) == [3, 4]
        assert parked[3].error.startswith("CorruptEvent") and parked[3].attempts == 1
        # a deleted row is gone with its type; the next event's state cannot be folded
        assert parked[4].aggregate_id == "A"
        if damage != "deleted":
            assert parked[3].aggregate_id == "A" and parked[4].held
    finally:
        app.event_store.close()


@pytest.mark.parametrize(
    ("store_url", "damage"), [c for c in CASES if c[1] != "deleted"], indirect=["store_url"]
)
def test_a_subscription_that_does_not_listen_skips_the_damaged_event(
    damaged: str, damage: str
) -> None:
    """A handler that does not listen to the damaged row's stored type goes past it
    without decoding it: nothing parked, every event it listens to handled."""
    app = new_app(damaged)
    try:
        stored_type = "MoneyWithdrawn" if damage == "event_type" else "MoneyDeposited"
        other = AccountOpened if stored_type == "MoneyDeposited" else MoneyDeposited
        handler, seen = listener(other)
        subscription = incident.Subscription(handler, app)
        subscription.catch_up()
        assert subscription.position == 6
        assert subscription.parked() == []
        assert seen == ([1, 5] if other is AccountOpened else [2, 6])
    finally:
        app.event_store.close()


@pytest.mark.parametrize(("store_url", "damage"), CASES, indirect=["store_url"])
def test_a_subscription_told_to_stop_stops_at_the_damaged_event(damaged: str) -> None:
    """With on_failure="stop" a listening handler stops at position 3 with
    SubscriptionFailed caused by the CorruptEvent; what came before is checkpointed."""
    app = new_app(damaged)
    try:
        handler, seen = listener(AccountOpened, MoneyDeposited, MoneyWithdrawn)
        subscription = incident.Subscription(handler, app, on_failure="stop")
        with pytest.raises(incident.SubscriptionFailed) as caught:
            subscription.catch_up()
        assert caught.value.position == 3
        assert isinstance(caught.value.__cause__, incident.CorruptEvent)
        assert subscription.position == 2
        assert seen == [1, 2]
    finally:
        app.event_store.close()


def test_corrupt_event_keeps_where_it_is_across_processes() -> None:
    """A CorruptEvent pickles with its position, stream, version and stored type, and
    its message names them."""
    error = incident.CorruptEvent(
        7, "A", "version 3 is missing", version=3, event_type="MoneyDeposited"
    )
    again = pickle.loads(pickle.dumps(error))
    assert (again.position, again.aggregate_id, again.version, again.event_type) == (
        7,
        "A",
        3,
        "MoneyDeposited",
    )
    assert str(again) == (
        "Corrupt event at position 7 of aggregate 'A' (version 3): version 3 is missing"
    )


@on_backends(RAW_BACKENDS)
def test_a_valid_payload_written_by_other_code_still_reads(
    store_url: str, edit_raw_event: Edit
) -> None:
    """The fast path's check that a payload opens with its own type's tag is only a hint:
    a payload of the right type with its fields in another order and spacing is read
    (row by row), not reported."""
    app = new_app(store_url)
    try:
        app.dispatch(OpenAccount(aggregate_id="A"))
        app.dispatch(DepositMoney(aggregate_id="A", amount=100))
        edit_raw_event(2, {"data": '{ "amount": 70, "type": "MoneyDeposited" }'})
        cold = new_app(app.event_store)  # a cold load reads the stream again
        assert cold.state("bank_account", "A").balance == 70
    finally:
        app.event_store.close()
