"""The Bank example (docs/bank.md), run unchanged on every store backend."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import incident
from incident.examples import bank
from incident.examples.bank import (
    BankAccount,
    DepositMoney,
    OpenAccount,
    RequestTransfer,
    Transfer,
    WithdrawMoney,
)
from incident.testing.asynchronous import EventLoopThread


@pytest.fixture(params=["sync", "async"])
def app(request: pytest.FixtureRequest, store_url: str) -> Iterator[incident.CommandHandler]:
    """The Bank on a CommandHandler, and on an AsyncCommandHandler driven through one
    event loop (every test below runs on both, on every store)."""
    if request.param == "sync":
        handler = bank.build(store_url)
        yield handler
        handler.event_store.close()
        return
    with EventLoopThread() as loop:
        view: Any = loop.view(bank.build_async(store_url))
        yield view
        view.event_store.close()


def account(app: incident.CommandHandler, number: str) -> BankAccount:
    row = app.projection_store.get(BankAccount, number)
    assert row is not None, f"no BankAccount projection for {number}"
    return row


def transfer_row(app: incident.CommandHandler, transfer_id: str) -> Transfer:
    row = app.projection_store.get(Transfer, transfer_id)
    assert row is not None, f"no Transfer projection for {transfer_id}"
    return row


def open_with(app: incident.CommandHandler, number: str, balance: int = 0) -> None:
    app.dispatch(OpenAccount(aggregate_id=number))
    if balance:
        app.dispatch(DepositMoney(aggregate_id=number, amount=balance))


def types_of(app: incident.CommandHandler, aggregate_id: str) -> list[str]:
    return [r.event_type for r in app.event_store.get(aggregate_id)]


def test_open_account(app: incident.CommandHandler) -> None:
    recorded = app.dispatch(OpenAccount(aggregate_id="ACC1"))
    assert [r.data for r in recorded] == [bank.AccountOpened(account_number="ACC1")]
    row = account(app, "ACC1")
    assert (row.account_number, row.balance, row.version) == ("ACC1", 0, 1)
    assert row.event_id == recorded[0].event_id


def test_open_account_twice_is_rejected(app: incident.CommandHandler) -> None:
    app.dispatch(OpenAccount(aggregate_id="ACC1"))
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(OpenAccount(aggregate_id="ACC1"))
    assert caught.value.reason == "account_already_opened"
    assert app.event_store.version("ACC1") == 1


def test_deposit_and_withdraw(app: incident.CommandHandler) -> None:
    open_with(app, "ACC1", 100)
    app.dispatch(WithdrawMoney(aggregate_id="ACC1", amount=30))
    assert account(app, "ACC1").balance == 70
    assert account(app, "ACC1").version == 3
    assert app.state("bank_account", "ACC1").balance == 70


def test_withdraw_beyond_balance_is_rejected(app: incident.CommandHandler) -> None:
    open_with(app, "ACC1", 10)
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(WithdrawMoney(aggregate_id="ACC1", amount=11))
    assert caught.value.reason == "no_enough_balance"
    assert account(app, "ACC1").balance == 10
    assert app.event_store.version("ACC1") == 2


@pytest.mark.parametrize(
    "command",
    [DepositMoney(aggregate_id="NOPE", amount=1), WithdrawMoney(aggregate_id="NOPE", amount=1)],
)
def test_commands_to_a_missing_account_are_rejected(
    app: incident.CommandHandler, command: incident.Command
) -> None:
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(command)
    assert caught.value.reason == "account_not_found"
    assert list(app.event_store.read_all()) == []


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (DepositMoney(aggregate_id="ACC1", amount="100"), "amount"),  # type: ignore[arg-type]
        (DepositMoney(aggregate_id="ACC1", amount=0), "amount"),
        (WithdrawMoney(aggregate_id="ACC1", amount=-5), "amount"),
        (OpenAccount(aggregate_id=7), "aggregate_id"),  # type: ignore[arg-type]
    ],
)
def test_invalid_commands_are_refused_before_anything_runs(
    app: incident.CommandHandler, command: incident.Command, field: str
) -> None:
    open_with(app, "ACC1", 50)
    before = list(app.event_store.read_all())
    with pytest.raises(incident.InvalidCommand) as caught:
        app.dispatch(command)
    assert caught.value.field == field
    assert isinstance(caught.value, ValueError)
    assert list(app.event_store.read_all()) == before
    assert account(app, "ACC1").balance == 50


def test_commands_from_outside_data_missing_a_field(app: incident.CommandHandler) -> None:
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.decode_command(DepositMoney, {"aggregate_id": "ACC1"})
    assert caught.value.field == "amount"
    with pytest.raises(incident.InvalidCommand):
        incident.decode_command(DepositMoney, '{"aggregate_id": "ACC1", "amount": "7"}')
    assert list(app.event_store.read_all()) == []


def test_transfer_that_completes(app: incident.CommandHandler) -> None:
    open_with(app, "A", 100)
    open_with(app, "B")
    app.dispatch(
        RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=40
        )
    )
    assert types_of(app, "T1") == ["TransferRequested", "TransferInitiated", "TransferCompleted"]
    assert transfer_row(app, "T1").status == "completed"
    assert transfer_row(app, "T1").version == 3
    assert (account(app, "A").balance, account(app, "B").balance) == (60, 40)


def test_transfer_cancelled_for_lack_of_funds(app: incident.CommandHandler) -> None:
    open_with(app, "A", 10)
    open_with(app, "B")
    app.dispatch(
        RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=40
        )
    )
    assert types_of(app, "T1") == ["TransferRequested", "TransferCancelled"]
    assert transfer_row(app, "T1").status == "cancelled"
    assert (account(app, "A").balance, account(app, "B").balance) == (10, 0)


def test_transfer_cancelled_for_a_missing_source(app: incident.CommandHandler) -> None:
    open_with(app, "B")
    app.dispatch(
        RequestTransfer(
            aggregate_id="T1",
            source_account_number="GHOST",
            destination_account_number="B",
            amount=5,
        )
    )
    assert types_of(app, "T1") == ["TransferRequested", "TransferCancelled"]
    assert app.event_store.version("GHOST") == 0


def test_transfer_reverted_for_a_missing_destination(app: incident.CommandHandler) -> None:
    open_with(app, "A", 100)
    app.dispatch(
        RequestTransfer(
            aggregate_id="T1",
            source_account_number="A",
            destination_account_number="GHOST",
            amount=30,
        )
    )
    assert types_of(app, "T1") == [
        "TransferRequested",
        "TransferInitiated",
        "TransferReverted",
        "TransferCancelled",
    ]
    assert transfer_row(app, "T1").status == "cancelled"
    assert types_of(app, "A")[-2:] == ["MoneySent", "MoneySentReverted"]
    assert account(app, "A").balance == 100


def test_requesting_a_transfer_twice_is_rejected(app: incident.CommandHandler) -> None:
    open_with(app, "A", 100)
    open_with(app, "B")
    request = RequestTransfer(
        aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=1
    )
    app.dispatch(request)
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(request)
    assert caught.value.reason == "transfer_already_initiated"
    assert account(app, "A").balance == 99


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (bank.InitiateTransfer(aggregate_id="NONE"), "transfer_not_found"),
        (bank.CompleteTransfer(aggregate_id="T1"), "transfer_status_invalid"),
        (bank.RevertTransfer(aggregate_id="T1"), "transfer_invalid_status"),
        (bank.CancelTransfer(aggregate_id="T1"), "transfer_invalid_status"),
        (bank.InitiateTransfer(aggregate_id="T1"), "transfer_status_invalid"),
    ],
)
def test_transfer_status_rules(
    app: incident.CommandHandler, command: incident.Command, reason: str
) -> None:
    open_with(app, "A", 100)
    open_with(app, "B")
    app.dispatch(
        RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=1
        )
    )
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(command)
    assert caught.value.reason == reason


def test_every_event_of_a_transfer_shares_its_correlation_id(app: incident.CommandHandler) -> None:
    open_with(app, "A", 100)
    open_with(app, "B")
    root = app.dispatch(
        RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=5
        )
    )
    correlation = root[0].metadata["correlation_id"]
    story = [
        r for r in app.event_store.read_all() if r.metadata.get("correlation_id") == correlation
    ]
    assert [r.event_type for r in story] == [
        "TransferRequested",
        "MoneySent",
        "TransferInitiated",
        "MoneyReceived",
        "TransferCompleted",
    ]
    by_id = {r.event_id: r for r in story}
    assert story[0].metadata["causation_id"] is None
    for event in story[1:]:
        assert event.metadata["causation_id"] in by_id
        assert by_id[event.metadata["causation_id"]].position < event.position


def test_concurrent_withdrawals(app: incident.CommandHandler) -> None:
    """Five racing withdrawals of 24 from 100: exactly four succeed, balance 4."""
    open_with(app, "ACC1", 100)

    def withdraw(_: int) -> str:
        try:
            app.dispatch(WithdrawMoney(aggregate_id="ACC1", amount=24))
        except incident.Rejected as rejected:
            return rejected.reason
        return "ok"

    with ThreadPoolExecutor(5) as pool:
        outcomes = sorted(pool.map(withdraw, range(5)))
    assert outcomes == ["no_enough_balance", "ok", "ok", "ok", "ok"]
    assert account(app, "ACC1").balance == 4
    assert [r.version for r in app.event_store.get("ACC1")] == [1, 2, 3, 4, 5, 6]


def test_threads_hammering_one_account_never_run_out_of_retries(store_url: str) -> None:
    """Six threads depositing into one account at once, with three retries each: after
    their first collision the threads take turns (incident.command_handler.turns), so every command
    commits and no money is lost."""
    app = bank.build(store_url, retries=3)
    open_with(app, "ACC1")

    def deposit(_: int) -> None:
        for _ in range(40):
            app.dispatch(DepositMoney(aggregate_id="ACC1", amount=1))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(deposit, range(6)))
    assert account(app, "ACC1").balance == 240
    assert [r.version for r in app.event_store.get("ACC1")] == list(range(1, 242))
    app.event_store.close()


def test_concurrent_transfers(app: incident.CommandHandler) -> None:
    """Five racing transfers of 24 from 100: four complete, one is cancelled, no money lost."""
    open_with(app, "A", 100)
    open_with(app, "B")

    def request(i: int) -> None:
        app.dispatch(
            RequestTransfer(
                aggregate_id=f"T{i}",
                source_account_number="A",
                destination_account_number="B",
                amount=24,
            )
        )

    with ThreadPoolExecutor(5) as pool:
        list(pool.map(request, range(5)))
    statuses = sorted(transfer_row(app, f"T{i}").status for i in range(5))
    assert statuses == ["cancelled", "completed", "completed", "completed", "completed"]
    assert (account(app, "A").balance, account(app, "B").balance) == (4, 96)
    assert app.state("bank_account", "A").balance == 4
    assert [r.version for r in app.event_store.get("A")] == list(range(1, 7))
