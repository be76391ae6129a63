"""Idempotent commands: one key, one set of events, however often and however racing."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import DURABLE_BACKENDS, on_backends
from workers import deposit_with_key_in_process, run_processes

import incident
from incident.examples import bank


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    handler = bank.build(store_url)
    handler.dispatch(bank.OpenAccount(aggregate_id="A"))
    yield handler
    handler.event_store.close()


def deposit(app: incident.CommandHandler, key: str) -> list[incident.Recorded[object]]:
    return app.dispatch(
        bank.DepositMoney(aggregate_id="A", amount=10), metadata={"idempotency_key": key}
    )


def test_the_same_key_twice_stores_once_and_returns_the_first_events(
    app: incident.CommandHandler,
) -> None:
    first = deposit(app, "pay-1")
    again = deposit(app, "pay-1")
    assert again == first
    assert app.state("bank_account", "A").balance == 10
    assert first[0].metadata["idempotency_key"] == "pay-1"
    deposit(app, "pay-2")
    assert app.state("bank_account", "A").balance == 20


def test_racing_duplicates_store_one_set_of_events(app: incident.CommandHandler) -> None:
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: deposit(app, "race"), range(6)))
    assert all(result == results[0] for result in results)
    assert app.event_store.version("A") == 2
    assert app.state("bank_account", "A").balance == 10


def test_a_rejected_command_stays_rejected_under_its_key(app: incident.CommandHandler) -> None:
    """A keyed command's rejection is remembered: dispatched again after the state has
    changed, it is rejected again for the first reason, and decides nothing anew."""
    withdraw = bank.WithdrawMoney(aggregate_id="A", amount=5)
    with pytest.raises(incident.Rejected) as first:
        app.dispatch(withdraw, metadata={"idempotency_key": "w-1"})
    deposit(app, "d-1")
    with pytest.raises(incident.Rejected) as again:
        app.dispatch(withdraw, metadata={"idempotency_key": "w-1"})
    assert again.value.reason == first.value.reason == "no_enough_balance"
    assert again.value.command == withdraw
    assert app.state("bank_account", "A").balance == 10
    app.dispatch(withdraw, metadata={"idempotency_key": "w-2"})  # a new key decides anew
    assert app.state("bank_account", "A").balance == 5


def test_follow_up_commands_do_not_inherit_the_key(app: incident.CommandHandler) -> None:
    """A transfer's follow-ups are new commands; only the root carries the key."""
    app.dispatch(bank.OpenAccount(aggregate_id="B"))
    deposit(app, "d-1")
    request = bank.RequestTransfer(
        aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=4
    )
    app.dispatch(request, metadata={"idempotency_key": "t-1"})
    app.dispatch(request, metadata={"idempotency_key": "t-1"})
    assert [r.event_type for r in app.event_store.get("T1")] == [
        "TransferRequested",
        "TransferInitiated",
        "TransferCompleted",
    ]
    keys = [r.metadata.get("idempotency_key") for r in app.event_store.read_all()]
    assert keys.count("t-1") == 1
    assert app.state("bank_account", "B").balance == 4


@pytest.mark.slow
@on_backends(DURABLE_BACKENDS)  # a memory store lives in one process
def test_racing_processes_with_one_key_store_one_set_of_events(store_url: str) -> None:
    """Four OS processes send the same keyed command at once: one set of events is stored
    and every process gets it back."""
    setup = bank.build(store_url)
    setup.dispatch(bank.OpenAccount(aggregate_id="A"))
    setup.event_store.close()

    outcomes = run_processes(deposit_with_key_in_process, store_url, "once", processes=4)

    assert all(isinstance(outcome, list) for outcome in outcomes), outcomes
    assert len({tuple(outcome) for outcome in outcomes}) == 1
    check = bank.build(store_url)
    assert check.event_store.version("A") == 2
    assert check.state("bank_account", "A").balance == 10
    check.event_store.close()


def test_a_key_no_store_can_keep_is_refused_alike_everywhere(store_url: str) -> None:
    """A key holding a NUL is refused with Unstorable, by the sync and the async
    handler, on every store, before any store is asked about it: nothing is written, and
    a store asked for its outcome has none."""
    import asyncio

    app = bank.build(store_url)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    with pytest.raises(incident.Unstorable) as caught:
        deposit(app, "k\x00")
    assert caught.value.what == "idempotency_key"
    assert app.event_store.outcome_for("k\x00") is None
    assert app.event_store.version("A") == 1
    app.close()

    async def main() -> None:
        async with bank.build_async(store_url) as async_app:
            await async_app.dispatch(bank.OpenAccount(aggregate_id="B"))
            with pytest.raises(incident.Unstorable):
                await async_app.dispatch(
                    bank.DepositMoney(aggregate_id="B", amount=1), {"idempotency_key": "\x00"}
                )
            assert await async_app.event_store.version("B") == 1

    asyncio.run(main())
