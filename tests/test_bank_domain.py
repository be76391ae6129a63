"""The Bank's aggregates tested with incident.testing: a spec for every rule of docs/bank.md,
stateful machines, and properties. No store: the aggregates are pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import incident
from incident.examples.bank import (
    AccountOpened,
    AccountState,
    CancelTransfer,
    CompleteTransfer,
    DepositMoney,
    InitiateTransfer,
    MoneyDeposited,
    MoneyReceived,
    MoneySent,
    MoneySentReverted,
    MoneyWithdrawn,
    OpenAccount,
    ReceiveMoney,
    RequestTransfer,
    RevertMoneySent,
    RevertTransfer,
    SendMoney,
    TransferCancelled,
    TransferCompleted,
    TransferInitiated,
    TransferRequested,
    TransferReverted,
    WithdrawMoney,
    bank_account,
    transfer,
)
from incident.testing import Scenario, aggregate_machine, commands, events, invalid_commands
from incident.testing import given as history

PROPERTIES = settings(max_examples=60, deadline=None)

no_account = history(bank_account)
account = history(bank_account, AccountOpened(account_number="A1"))
funded = account.given(MoneyDeposited(amount=100))


# -- bank_account: open ----------------------------------------------------------------------


def test_open_uses_the_aggregate_id_as_the_account_number() -> None:
    state = no_account.when(OpenAccount(aggregate_id="A1")).then(AccountOpened(account_number="A1"))
    assert state == AccountState(account_number="A1", balance=0)


def test_open_twice_is_rejected() -> None:
    account.when(OpenAccount(aggregate_id="A1")).then_rejected("account_already_opened")


# -- bank_account: money in -----------------------------------------------------------------


def test_deposit_adds_to_the_balance() -> None:
    state = funded.when(DepositMoney(aggregate_id="A1", amount=5)).then(MoneyDeposited(amount=5))
    assert state.balance == 105


def test_receive_adds_to_the_balance() -> None:
    command = ReceiveMoney(aggregate_id="A1", transfer_id="T1", amount=5)
    state = funded.when(command).then(MoneyReceived(transfer_id="T1", amount=5))
    assert state.balance == 105


def test_revert_money_sent_gives_it_back() -> None:
    sent = funded.given(MoneySent(transfer_id="T1", amount=30))
    command = RevertMoneySent(aggregate_id="A1", transfer_id="T1", amount=30)
    state = sent.when(command).then(MoneySentReverted(transfer_id="T1", amount=30))
    assert state.balance == 100


@pytest.mark.parametrize(
    "command",
    [
        DepositMoney(aggregate_id="A1", amount=1),
        ReceiveMoney(aggregate_id="A1", transfer_id="T1", amount=1),
        RevertMoneySent(aggregate_id="A1", transfer_id="T1", amount=1),
        WithdrawMoney(aggregate_id="A1", amount=1),
        SendMoney(aggregate_id="A1", transfer_id="T1", amount=1),
    ],
    ids=type,
)
def test_money_commands_need_an_account(command: incident.Command) -> None:
    no_account.when(command).then_rejected("account_not_found")


# -- bank_account: money out ----------------------------------------------------------------


def test_withdraw_within_the_balance() -> None:
    state = funded.when(WithdrawMoney(aggregate_id="A1", amount=30)).then(MoneyWithdrawn(amount=30))
    assert state.balance == 70


def test_withdraw_the_whole_balance() -> None:
    state = funded.when(WithdrawMoney(aggregate_id="A1", amount=100)).then(
        MoneyWithdrawn(amount=100)
    )
    assert state.balance == 0


def test_withdraw_beyond_the_balance_is_rejected() -> None:
    funded.when(WithdrawMoney(aggregate_id="A1", amount=101)).then_rejected("no_enough_balance")


def test_send_within_the_balance() -> None:
    command = SendMoney(aggregate_id="A1", transfer_id="T1", amount=100)
    state = funded.when(command).then(MoneySent(transfer_id="T1", amount=100))
    assert state.balance == 0


def test_send_beyond_the_balance_is_rejected() -> None:
    command = SendMoney(aggregate_id="A1", transfer_id="T1", amount=101)
    funded.when(command).then_rejected("no_enough_balance")


# -- bank_account: bad input ------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0, -1])
def test_a_non_positive_amount_is_invalid(amount: int) -> None:
    funded.when(WithdrawMoney(aggregate_id="A1", amount=amount)).then_invalid("amount")


def test_a_wrong_type_is_invalid_even_where_a_rule_would_reject() -> None:
    """Validation comes before the rules: no account, and still 'invalid', not 'rejected'."""
    command = DepositMoney(aggregate_id="A1", amount="10")  # type: ignore[arg-type]
    no_account.when(command).then_invalid("amount")


def test_an_empty_account_number_is_invalid() -> None:
    no_account.when(OpenAccount(aggregate_id="")).then_invalid("aggregate_id")


# -- transfer ----------------------------------------------------------------------------------

REQUESTED = TransferRequested(
    source_account_number="A1", destination_account_number="A2", amount=10
)
STATUSES: dict[str, Scenario[Any]] = {
    "new": history(transfer),
    "requested": history(transfer, REQUESTED),
    "initiated": history(transfer, REQUESTED, TransferInitiated()),
    "completed": history(transfer, REQUESTED, TransferInitiated(), TransferCompleted()),
    "reverted": history(transfer, REQUESTED, TransferInitiated(), TransferReverted()),
    "cancelled": history(transfer, REQUESTED, TransferCancelled()),
}
MOVES: dict[str, tuple[incident.Command, incident.Event, set[str], str]] = {
    # command -> (command, its event, the statuses it is allowed from, the reason otherwise)
    "initiate": (
        InitiateTransfer(aggregate_id="T1"),
        TransferInitiated(),
        {"requested"},
        "transfer_status_invalid",
    ),
    "complete": (
        CompleteTransfer(aggregate_id="T1"),
        TransferCompleted(),
        {"initiated"},
        "transfer_status_invalid",
    ),
    "revert": (
        RevertTransfer(aggregate_id="T1"),
        TransferReverted(),
        {"initiated"},
        "transfer_invalid_status",
    ),
    "cancel": (
        CancelTransfer(aggregate_id="T1"),
        TransferCancelled(),
        {"requested", "reverted"},
        "transfer_invalid_status",
    ),
}


def test_request_a_transfer() -> None:
    command = RequestTransfer(
        aggregate_id="T1", source_account_number="A1", destination_account_number="A2", amount=10
    )
    state = STATUSES["new"].when(command).then(REQUESTED)
    assert (state.status, state.amount) == ("requested", 10)


@pytest.mark.parametrize("status", sorted(set(STATUSES) - {"new"}))
def test_request_an_existing_transfer_is_rejected(status: str) -> None:
    command = RequestTransfer(
        aggregate_id="T1", source_account_number="A1", destination_account_number="A2", amount=10
    )
    STATUSES[status].when(command).then_rejected("transfer_already_initiated")


@pytest.mark.parametrize("status", sorted(STATUSES))
@pytest.mark.parametrize("move", sorted(MOVES))
def test_transfer_status_moves(move: str, status: str) -> None:
    """Every move from every status: allowed, not found, or the reason docs/bank.md gives."""
    command, event, allowed, reason = MOVES[move]
    outcome = STATUSES[status].when(command)
    if status in allowed:
        outcome.then(event)
    elif status == "new":
        outcome.then_rejected("transfer_not_found")
    else:
        outcome.then_rejected(reason)


# -- stateful machines --------------------------------------------------------------------------

ACCOUNTS = st.sampled_from(["A1", "A2"])
SMALL = st.integers(min_value=1, max_value=60)  # small amounts meet the balance often


def never_negative(state: AccountState) -> bool:
    return state.balance >= 0


def only_opened_accounts_hold_money(state: AccountState) -> bool:
    return state.account_number is not None or state.balance == 0


BankAccountMachine = aggregate_machine(
    bank_account,
    commands(bank_account, aggregate_id=ACCOUNTS, amount=SMALL)
    | invalid_commands(bank_account, aggregate_id=ACCOUNTS),
    invariants=[never_negative, only_opened_accounts_hold_money],
    settings=settings(max_examples=40, stateful_step_count=30, deadline=None),
)
TestBankAccountMachine = BankAccountMachine.TestCase


def moves_forward(state: Any) -> bool:
    return state.status is None or state.amount > 0


TransferMachine = aggregate_machine(
    transfer,
    commands(transfer, aggregate_id=st.sampled_from(["T1", "T2"]), amount=SMALL),
    invariants={"a known transfer has an amount": moves_forward},
    settings=settings(max_examples=40, stateful_step_count=20, deadline=None),
)
TestTransferMachine = TransferMachine.TestCase


# -- properties ------------------------------------------------------------------------------

ACCOUNT_COMMANDS = commands(bank_account, aggregate_id="A1", amount=SMALL)


def run(commands: Sequence[incident.Command]) -> Scenario[AccountState]:
    """The history that dispatching ``commands`` in turn would record (refusals skipped)."""
    scenario = history(bank_account)
    for command in commands:
        scenario = scenario.given(*scenario.when(command).events)
    return scenario


@PROPERTIES
@given(
    st.lists(ACCOUNT_COMMANDS, max_size=12),
    ACCOUNT_COMMANDS | invalid_commands(bank_account, aggregate_id="A1"),
)
def test_a_refused_command_decides_nothing(
    earlier: list[incident.Command], command: incident.Command
) -> None:
    """An invalid or rejected command yields no events; an accepted one yields one."""
    outcome = run(earlier).when(command)
    if outcome.error is None:
        assert len(outcome.events) == 1
    else:
        assert outcome.events == ()
        assert isinstance(outcome.error, incident.InvalidCommand | incident.Rejected)


@PROPERTIES
@given(st.lists(ACCOUNT_COMMANDS, max_size=12), SMALL)
def test_a_withdrawal_is_rejected_exactly_when_it_exceeds_the_balance(
    earlier: list[incident.Command], amount: int
) -> None:
    scene = run([OpenAccount(aggregate_id="A1"), *earlier])
    outcome = scene.when(WithdrawMoney(aggregate_id="A1", amount=amount))
    if amount > scene.state.balance:
        outcome.then_rejected("no_enough_balance")
    else:
        assert outcome.then(MoneyWithdrawn(amount=amount)).balance == scene.state.balance - amount


@PROPERTIES
@given(st.lists(events(bank_account), max_size=15), st.integers(min_value=0, max_value=15))
def test_fold_equals_step_by_step(stream: list[incident.Event], cut: int) -> None:
    """Folding all events equals evolving one at a time, and folding in two parts."""
    state = bank_account.initial
    for event in stream:
        state = bank_account.evolve(state, event)
    assert bank_account.fold(stream) == state
    assert bank_account.fold(stream[cut:], bank_account.fold(stream[:cut])) == state
    if stream:
        assert list(bank_account.history(stream))[-1] == state


@PROPERTIES
@given(st.lists(events(bank_account, amount=SMALL), max_size=15))
def test_the_balance_is_money_in_minus_money_out(stream: list[incident.Event]) -> None:
    money_in = (MoneyDeposited, MoneyReceived, MoneySentReverted)
    money_out = (MoneyWithdrawn, MoneySent)
    balance = bank_account.fold(stream).balance
    opened_at = max((i for i, e in enumerate(stream) if isinstance(e, AccountOpened)), default=-1)
    after = stream[opened_at + 1 :]  # opening an account starts its balance at 0
    assert balance == sum(e.amount for e in after if isinstance(e, money_in)) - sum(
        e.amount for e in after if isinstance(e, money_out)
    )
