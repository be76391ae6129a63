"""Processes run exactly once: outcomes under a key are remembered (rejections too), a
follow-up's key does not depend on where it stands among a listener's outputs, owed
follow-ups of inline handlers survive a failure and are completed once, and a
compensation sees why the command it compensates was rejected. Every case runs on
memory, SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import incident
from incident.examples import bank
from incident.examples.bank import (
    AccountState,
    BankAccount,
    DepositMoney,
    OpenAccount,
    RequestTransfer,
    Transfer,
)


def transfer(transfer_id: str, source: str, destination: str, amount: int) -> RequestTransfer:
    return RequestTransfer(
        aggregate_id=transfer_id,
        source_account_number=source,
        destination_account_number=destination,
        amount=amount,
    )


def stream_types(app: incident.CommandHandler, aggregate_id: str) -> list[str]:
    return [r.event_type for r in app.event_store.get(aggregate_id)]


def balance(app: incident.CommandHandler, account: str) -> int:
    state: AccountState = app.state("bank_account", account)
    return state.balance


@pytest.fixture
def store(store_url: str) -> Iterator[incident.EventStore]:
    opened = incident.open_event_store(store_url)
    yield opened
    opened.close()


def redelivered(app: incident.CommandHandler, handler: incident.EventHandler) -> None:
    """What a crash before the checkpoint does: a new runner (a new command handler on the
    same store) handles the whole log again."""
    app.subscriptions[handler.name].checkpoints.reset(handler.name, 0)
    again = incident.CommandHandler(
        app.event_store,
        app.projection_store,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections],
        subscriptions=[handler],
    )
    again.subscriptions.catch_up()


# -- 1. a rejection is an outcome ---------------------------------------------------------


def test_a_redelivered_attempt_takes_the_branch_its_first_run_took(
    store: incident.EventStore,
) -> None:
    """SendMoney was rejected (no funds) and the transfer cancelled; money arrives; the
    event is handled again: SendMoney stays rejected, so no money leaves for a transfer
    that is already cancelled."""
    app = incident.CommandHandler(
        store,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections],
        subscriptions=[bank.money_transfer],
    )
    for account in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=account))
    app.dispatch(transfer("T1", "A", "B", 50))
    app.subscriptions.catch_up()
    assert stream_types(app, "T1") == ["TransferRequested", "TransferCancelled"]
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))

    redelivered(app, bank.money_transfer)

    assert stream_types(app, "T1") == ["TransferRequested", "TransferCancelled"]
    assert stream_types(app, "A") == ["AccountOpened", "MoneyDeposited"]
    assert (balance(app, "A"), balance(app, "B")) == (100, 0)


def test_a_keyed_rejection_is_durable_and_a_racing_success_wins_over_it(
    store: incident.EventStore,
) -> None:
    """remember_rejection keeps the first outcome of a key: a rejection recorded after
    the key stored events returns those events, and a stored rejection stays."""
    app = bank.build(store)
    app.dispatch(OpenAccount(aggregate_id="A"))
    stored = app.dispatch(
        DepositMoney(aggregate_id="A", amount=5), metadata={"idempotency_key": "k-1"}
    )
    assert store.remember_rejection("k-1", "late_twin") == incident.Outcome(stored)
    first = store.remember_rejection("k-2", "no_enough_balance", "only 5")
    assert first == incident.Outcome([], "no_enough_balance", "only 5")
    assert store.remember_rejection("k-2", "other") == first
    assert store.outcome_for("k-2") == first
    with pytest.raises(incident.Rejected) as rejected:
        app.dispatch(DepositMoney(aggregate_id="A", amount=5), {"idempotency_key": "k-2"})
    assert (rejected.value.reason, rejected.value.detail) == ("no_enough_balance", "only 5")
    assert balance(app, "A") == 5


# -- 2. keys do not depend on the order of outputs ----------------------------------------


class Greeted(incident.Projection):
    aggregate_id: str
    greetings: int


def greeter(order: str) -> incident.EventHandler:
    """The same handler and listener before and after a deploy that reorders its outputs."""
    handler = incident.EventHandler("greeter")

    @handler.listen(bank.AccountOpened)
    def on_opened(recorded: incident.Recorded[Any], state: AccountState) -> list[Any]:
        row = Greeted(aggregate_id=recorded.aggregate_id, greetings=1)
        gift = DepositMoney(aggregate_id=recorded.aggregate_id, amount=1)
        bonus = DepositMoney(aggregate_id=recorded.aggregate_id, amount=2)
        return [row, gift, bonus] if order == "before" else [bonus, gift, row]

    return handler


def test_reordering_a_listeners_outputs_changes_no_key(store: incident.EventStore) -> None:
    """A deploy that reorders what a listener returns, then a redelivery: each command
    the listener returns still finds its first outcome, so nothing is dispatched twice."""
    app = incident.CommandHandler(
        store, aggregates=[bank.bank_account], subscriptions=[greeter("before")]
    )
    app.dispatch(OpenAccount(aggregate_id="A"))
    app.subscriptions.catch_up()
    assert balance(app, "A") == 3

    after_deploy = greeter("after")
    again = incident.CommandHandler(
        store, aggregates=[bank.bank_account], subscriptions=[after_deploy]
    )
    again.subscriptions["greeter"].checkpoints.reset("greeter", 0)
    again.subscriptions.catch_up()

    assert balance(again, "A") == 3
    assert stream_types(again, "A") == ["AccountOpened", "MoneyDeposited", "MoneyDeposited"]


def test_the_same_command_twice_from_one_listener_runs_twice_once_each(
    store: incident.EventStore,
) -> None:
    """A listener that returns one command twice means it twice: the repeat gets a key of
    its own (``#2``), and a redelivery runs neither again."""
    handler = incident.EventHandler("doubler")

    @handler.listen(bank.AccountOpened)
    def on_opened(recorded: incident.Recorded[Any], state: AccountState) -> list[Any]:
        gift = DepositMoney(aggregate_id=recorded.aggregate_id, amount=1)
        return [gift, gift]

    app = incident.CommandHandler(store, aggregates=[bank.bank_account], subscriptions=[handler])
    app.dispatch(OpenAccount(aggregate_id="A"))
    app.subscriptions.catch_up()
    app.subscriptions["doubler"].checkpoints.reset("doubler", 0)
    incident.CommandHandler(
        store, aggregates=[bank.bank_account], subscriptions=[handler]
    ).subscriptions.catch_up()
    assert balance(app, "A") == 2


# -- 3. owed follow-ups of inline handlers ------------------------------------------------


class Outage:
    """An inline handler that fails while ``broken`` for the event types given: a bug or
    an outage between a command's commit and its follow-ups."""

    def __init__(self, *event_types: type[incident.Event]) -> None:
        self.broken = True
        self.handler = incident.EventHandler("outage")

        @self.handler.listen(*event_types)
        def fail(recorded: incident.Recorded[Any], state: Any) -> None:
            if self.broken:
                raise RuntimeError(f"down while handling {recorded.event_type}")


def inline_bank(store: incident.EventStore, outage: Outage) -> incident.CommandHandler:
    return incident.CommandHandler(
        store,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections, bank.money_transfer, outage.handler],
    )


def test_a_failed_follow_up_stays_owed_and_a_retry_of_the_root_completes_it(
    store: incident.EventStore,
) -> None:
    """SendMoney fails after RequestTransfer committed: the caller is told the command was
    stored and what is owed; the same command again, with the same key, completes the
    transfer instead of returning the stored events and stopping there."""
    outage = Outage(bank.MoneySent)
    app = inline_bank(store, outage)
    for account in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=account))
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    request = transfer("T1", "A", "B", 30)

    with pytest.raises(incident.FollowUpFailed) as failed:
        app.dispatch(request, metadata={"idempotency_key": "t-1"})
    assert [r.event_type for r in failed.value.recorded] == ["TransferRequested"]
    owed = store.owed()
    assert [(o.handler, o.event_type, o.attempts) for o in owed] == [
        ("money_transfer", "TransferRequested", 1)
    ]
    assert owed[0].error is not None and "down while handling MoneySent" in owed[0].error
    assert stream_types(app, "A") == ["AccountOpened", "MoneyDeposited"]  # rolled back

    outage.broken = False
    again = app.dispatch(request, metadata={"idempotency_key": "t-1"})

    assert again == failed.value.recorded
    assert stream_types(app, "T1") == [
        "TransferRequested",
        "TransferInitiated",
        "TransferCompleted",
    ]
    assert (balance(app, "A"), balance(app, "B")) == (70, 30)
    assert store.owed() == []
    row = app.projection_store.get(Transfer, "T1")
    assert row is not None and row.status == "completed"


def test_owed_work_is_completed_after_a_restart_and_nothing_runs_twice(
    store: incident.EventStore,
) -> None:
    """The destination's money arrived but completing the transfer failed; after a
    restart, complete_owed() finishes the transfer and ReceiveMoney is not run again."""
    outage = Outage(bank.TransferCompleted)
    app = inline_bank(store, outage)
    for account in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=account))
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    with pytest.raises(incident.FollowUpFailed):
        app.dispatch(transfer("T1", "A", "B", 30))  # no key: only complete_owed helps
    assert stream_types(app, "B") == ["AccountOpened", "MoneyReceived"]
    assert sorted(o.event_type for o in store.owed()) == [
        "TransferInitiated",
        "TransferRequested",
    ]

    outage.broken = False
    restarted = inline_bank(store, outage)
    completed = restarted.complete_owed()

    assert {o.event_type for o in completed} >= {"TransferRequested"}
    assert store.owed() == []
    assert stream_types(restarted, "B") == ["AccountOpened", "MoneyReceived"]
    assert stream_types(restarted, "T1")[-1] == "TransferCompleted"
    assert (balance(restarted, "A"), balance(restarted, "B")) == (70, 30)
    assert restarted.complete_owed() == []  # done is done


def test_owed_work_is_written_with_its_cause_in_one_transaction(
    store: incident.EventStore,
) -> None:
    """The owed record commits with the event that causes it: a listener bug inside the
    transaction stores neither, and a clean commit stores both before any follow-up."""
    seen: list[list[incident.Owed]] = []
    watcher = incident.EventHandler("watcher")

    @watcher.listen(bank.MoneySent)
    def look(recorded: incident.Recorded[Any], state: Any) -> None:
        seen.append(store.owed())  # runs inside SendMoney's append: the root has committed

    app = incident.CommandHandler(
        store,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections, bank.money_transfer, watcher],
    )
    for account in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=account))
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    app.dispatch(transfer("T1", "A", "B", 30))
    assert [[o.event_type for o in owed] for owed in seen] == [["TransferRequested"]]
    assert store.owed() == []


def test_a_handler_of_another_application_is_left_alone(store: incident.EventStore) -> None:
    """complete_owed() completes only the work of its own inline handlers."""
    outage = Outage(bank.MoneySent)
    app = inline_bank(store, outage)
    for account in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=account))
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    with pytest.raises(incident.FollowUpFailed):
        app.dispatch(transfer("T1", "A", "B", 30))
    other = incident.CommandHandler(store, aggregates=[bank.bank_account, bank.transfer])
    assert other.complete_owed() == []
    assert [o.handler for o in store.owed()] == ["money_transfer"]


# -- 5. compensation knows why ------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "reason", "events"),
    [
        ("nobody", "B", "account_not_found", ["TransferRequested", "TransferCancelled"]),
        ("A", "B", "no_enough_balance", ["TransferRequested", "TransferCancelled"]),
        (
            "A",
            "nobody",
            "account_not_found",
            ["TransferRequested", "TransferInitiated", "TransferReverted", "TransferCancelled"],
        ),
    ],
)
def test_a_cancelled_transfer_records_the_reason_the_account_gave(
    store: incident.EventStore, source: str, destination: str, reason: str, events: list[str]
) -> None:
    """The compensation is a function of the rejection: the cancellation stores the
    account's own reason, in the event and in the read model."""
    app = bank.build(store)
    for account in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=account))
    amount = 500 if reason == "no_enough_balance" else 10
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    app.dispatch(transfer("T1", source, destination, amount))
    recorded = app.event_store.get("T1")
    assert [r.event_type for r in recorded] == events
    assert recorded[-1].data == bank.TransferCancelled(reason=reason)
    row = app.projection_store.get(Transfer, "T1")
    assert row is not None and (row.status, row.reason) == ("cancelled", reason)
    accounts = app.projection_store.all(BankAccount)
    assert sum(a.balance for a in accounts) == 100


def test_on_rejected_as_a_function_gets_the_rejection_and_its_command(
    store: incident.EventStore,
) -> None:
    """on_rejected may be a function of the Rejected error: its reason, its detail, and the
    command that was rejected; the plain form keeps working beside it."""
    got: list[incident.Rejected] = []
    handler = incident.EventHandler("probe")

    @handler.listen(bank.AccountOpened)
    def on_opened(recorded: incident.Recorded[Any], state: AccountState) -> Any:
        withdraw = bank.WithdrawMoney(aggregate_id=recorded.aggregate_id, amount=5)

        def compensate(rejection: incident.Rejected) -> DepositMoney:
            got.append(rejection)
            return DepositMoney(aggregate_id=recorded.aggregate_id, amount=1)

        plain = incident.Attempt(
            withdraw, on_rejected=DepositMoney(aggregate_id=recorded.aggregate_id, amount=2)
        )
        return incident.Attempt(withdraw, on_rejected=compensate), plain

    app = incident.CommandHandler(store, aggregates=[bank.bank_account], event_handlers=[handler])
    app.dispatch(OpenAccount(aggregate_id="A"))
    assert [(r.reason, r.command) for r in got] == [
        ("no_enough_balance", bank.WithdrawMoney(aggregate_id="A", amount=5))
    ]
    assert balance(app, "A") == 3


def test_a_compensation_function_that_returns_nonsense_fails_clearly(
    store: incident.EventStore,
) -> None:
    """What the function returns is checked like any listener output."""
    handler = incident.EventHandler("broken")

    @handler.listen(bank.AccountOpened)
    def on_opened(recorded: incident.Recorded[Any], state: AccountState) -> Any:
        withdraw = bank.WithdrawMoney(aggregate_id=recorded.aggregate_id, amount=5)
        return incident.Attempt(withdraw, on_rejected=lambda rejection: "refund please")

    app = incident.CommandHandler(store, aggregates=[bank.bank_account], event_handlers=[handler])
    with pytest.raises(incident.FollowUpFailed, match="refund please"):
        app.dispatch(OpenAccount(aggregate_id="A"))
    assert [o.handler for o in store.owed()] == ["broken"]
