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
import incident.stores.postgres.reads
import incident.stores.sqlite.reading
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
    # a name no class carries (damage, or a type only newer code knows)
    "unknown_type": {"event_type": "Nonexistent"},
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
        if damage == "unknown_type":
            # no handler can listen to a type no class carries: the row is skipped, and
            # A's next event, whose state cannot be folded past it, parks at once
            assert sorted(parked) == [4]
            assert parked[4].error.startswith("UnknownEventType") and parked[4].attempts == 1
            return
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
        stored_type = {"event_type": "MoneyWithdrawn", "unknown_type": "Nonexistent"}.get(
            damage, "MoneyDeposited"
        )
        other = AccountOpened if stored_type != "MoneyWithdrawn" else MoneyDeposited
        handler, seen = listener(other)
        subscription = incident.Subscription(handler, app)
        subscription.catch_up()
        assert subscription.position == 6
        assert subscription.parked() == []
        assert seen == ([1, 5] if other is AccountOpened else [2, 6])
    finally:
        app.event_store.close()


@pytest.mark.parametrize(("store_url", "damage"), CASES, indirect=["store_url"])
def test_a_subscription_told_to_stop_stops_at_the_damaged_event(damaged: str, damage: str) -> None:
    """With on_failure="stop" a listening handler stops at position 3 with
    SubscriptionFailed caused by the CorruptEvent; what came before is checkpointed. A
    type no class carries is skipped, so it stops at 4, whose state cannot be folded."""
    app = new_app(damaged)
    try:
        handler, seen = listener(AccountOpened, MoneyDeposited, MoneyWithdrawn)
        subscription = incident.Subscription(handler, app, on_failure="stop")
        with pytest.raises(incident.SubscriptionFailed) as caught:
            subscription.catch_up()
        stopped_at = 4 if damage == "unknown_type" else 3
        assert caught.value.position == stopped_at
        assert isinstance(caught.value.__cause__, incident.CorruptEvent)
        assert subscription.position == stopped_at - 1
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


@on_backends(RAW_BACKENDS)
def test_a_hole_wider_than_a_fold_batch_is_found(
    store_url: str, edit_raw_event: Edit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold reads a stream a batch of versions at a time: seven deleted versions with
    batches of two leave whole batches empty, which must read as a hole, not as the
    stream's end (a balance of 2 instead of 12)."""
    monkeypatch.setattr(incident.stores.sqlite.reading, "EVENTS_BATCH", 2)
    monkeypatch.setattr(incident.stores.postgres.reads, "EVENTS_PAGE", 2)
    app = new_app(store_url)
    app.dispatch(OpenAccount(aggregate_id="A"))
    for _ in range(11):
        app.dispatch(DepositMoney(aggregate_id="A", amount=1))
    app.event_store.close()
    for position in range(4, 11):  # versions 4-10
        edit_raw_event(position, None)
    app = new_app(store_url)
    try:
        for read in (
            lambda: app.state("bank_account", "A"),
            lambda: list(app.event_store.events("A")),
        ):
            with pytest.raises(incident.CorruptEvent) as caught:
                read()
            assert caught.value.version == 4, str(caught.value)
    finally:
        app.event_store.close()
