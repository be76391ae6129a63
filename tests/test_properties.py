"""Properties of the Bank under random command sequences (hypothesis, memory store)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import incident
from incident.examples import bank
from incident.examples.bank import (
    AccountState,
    BankAccount,
    DepositMoney,
    OpenAccount,
    RequestTransfer,
    Transfer,
    WithdrawMoney,
    bank_account,
)

ACCOUNTS = ["A", "B", "C"]
TRANSFERS = ["T1", "T2", "T3"]  # apart from account ids: streams are keyed by aggregate id

accounts = st.sampled_from(ACCOUNTS)
# mostly valid amounts, sometimes zero or negative (refused as InvalidCommand)
amounts = st.integers(min_value=-2, max_value=60)

transfers = st.builds(
    RequestTransfer,
    aggregate_id=st.sampled_from(TRANSFERS),
    source_account_number=accounts,
    destination_account_number=st.sampled_from(["NEVER_OPENED", *ACCOUNTS]),
    amount=amounts,
)
commands = st.one_of(
    st.builds(OpenAccount, aggregate_id=accounts),
    st.builds(DepositMoney, aggregate_id=accounts, amount=amounts),
    st.builds(WithdrawMoney, aggregate_id=accounts, amount=amounts),
    transfers,
    transfers,  # twice: transfers are where money moves between streams
)


def opened(setup: list[tuple[str, int]]) -> list[incident.Command]:
    """Open each account and pay in its starting balance (so transfers can succeed)."""
    opening: list[incident.Command] = []
    for number, balance in setup:
        opening.append(OpenAccount(aggregate_id=number))
        if balance:
            opening.append(DepositMoney(aggregate_id=number, amount=balance))
    return opening


# a few accounts opened and funded up front, then anything at all
scenarios = st.builds(
    lambda setup, rest: opened(setup) + rest,
    st.lists(st.tuples(accounts, st.integers(0, 150)), max_size=3, unique_by=lambda t: t[0]),
    st.lists(commands, max_size=25),
)

PROPERTIES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Model:
    """What docs/bank.md says should happen, written independently of the library."""

    balances: dict[str, int] = field(default_factory=dict)  # opened accounts only
    transfers: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> status, version
    money_in: int = 0

    def expect(self, command: incident.Command) -> str | None:
        """Apply ``command``; return the Rejected reason or "invalid", None on success."""
        amount = getattr(command, "amount", 1)
        if amount <= 0:
            return "invalid"
        match command:
            case OpenAccount(aggregate_id=number):
                if number in self.balances:
                    return "account_already_opened"
                self.balances[number] = 0
            case DepositMoney(aggregate_id=number):
                if number not in self.balances:
                    return "account_not_found"
                self.balances[number] += amount
                self.money_in += amount
            case WithdrawMoney(aggregate_id=number):
                if number not in self.balances:
                    return "account_not_found"
                if self.balances[number] < amount:
                    return "no_enough_balance"
                self.balances[number] -= amount
                self.money_in -= amount
            case RequestTransfer(aggregate_id=tid, source_account_number=src):
                if tid in self.transfers:
                    return "transfer_already_initiated"
                dst = command.destination_account_number
                if self.balances.get(src, -1) < amount:
                    self.transfers[tid] = ("cancelled", 2)  # requested, cancelled
                elif dst not in self.balances:
                    self.transfers[tid] = ("cancelled", 4)  # ... initiated, reverted, cancelled
                else:
                    self.balances[src] -= amount
                    self.balances[dst] += amount
                    self.transfers[tid] = ("completed", 3)
        return None


def run(app: incident.CommandHandler, command: incident.Command) -> str | None:
    try:
        app.dispatch(command)
    except incident.InvalidCommand:
        return "invalid"
    except incident.Rejected as rejection:
        return rejection.reason
    return None


@PROPERTIES
@given(scenarios)
def test_random_commands_keep_balances_non_negative_and_money_conserved(
    sequence: list[incident.Command],
) -> None:
    """Every outcome matches the rules; no balance goes negative; transfers create or destroy
    no money (the sum of balances is deposits minus withdrawals); read models agree."""
    app = bank.build("memory://")
    model = Model()
    for command in sequence:
        expected = model.expect(command)
        assert run(app, command) == expected, command
        rows = {row.aggregate_id: row for row in app.projection_store.all(BankAccount)}
        assert {number: row.balance for number, row in rows.items()} == model.balances
        assert all(row.balance >= 0 for row in rows.values())
        assert sum(row.balance for row in rows.values()) == model.money_in
    for tid, (status, version) in model.transfers.items():
        row = app.projection_store.get(Transfer, tid)
        assert row is not None and (row.status, row.version) == (status, version)
    for number in ACCOUNTS:
        state = app.state("bank_account", number)
        assert state.balance == model.balances.get(number, 0)


@PROPERTIES
@given(scenarios)
def test_fold_equals_the_state_reached_step_by_step(sequence: list[incident.Command]) -> None:
    """Evolving each account's state one new event at a time, as commands run, ends where
    bank_account.fold over the whole stream ends (and history's last state agrees)."""
    app = bank.build("memory://")
    stepwise: dict[str, AccountState] = {}
    position = 0
    for command in sequence:
        run(app, command)
        for recorded in app.event_store.read_all(after=position):
            position = recorded.position
            if recorded.aggregate == "bank_account":
                before = stepwise.get(recorded.aggregate_id, bank_account.initial)
                stepwise[recorded.aggregate_id] = bank_account.evolve(before, recorded)
    for number in ACCOUNTS:
        stream = app.event_store.get(number)
        folded = bank_account.fold(stream)
        assert folded == stepwise.get(number, bank_account.initial)
        assert folded == app.state("bank_account", number)
        history = list(bank_account.history(stream))
        assert len(history) == len(stream)
        assert (history[-1] if history else bank_account.initial) == folded


@PROPERTIES
@given(scenarios, commands)
def test_a_rejected_or_invalid_command_stores_nothing(
    setup: list[incident.Command], command: incident.Command
) -> None:
    """Whatever came before, a command that fails (Rejected or InvalidCommand) leaves the
    log and every read model exactly as they were."""
    app = bank.build("memory://")
    for earlier in setup:
        run(app, earlier)

    def snapshot() -> tuple[Any, ...]:
        return (
            list(app.event_store.read_all()),
            sorted(app.projection_store.all(BankAccount), key=lambda row: row.aggregate_id),
            sorted(app.projection_store.all(Transfer), key=lambda row: row.aggregate_id),
        )

    before = snapshot()
    if run(app, command) is not None:
        assert snapshot() == before
    else:
        assert len(snapshot()[0]) > len(before[0])


@PROPERTIES
@given(scenarios, st.data())
def test_two_command_handlers_over_one_store_agree_with_the_rules(
    sequence: list[incident.Command], data: st.DataObject
) -> None:
    """Two handlers sharing one store, each with its own state cache (so each is often stale),
    still decide every command exactly as the rules say."""
    store = incident.open_event_store("memory://")
    handlers = [bank.build(store), bank.build(store)]
    model = Model()
    for command in sequence:
        app = handlers[data.draw(st.integers(0, 1), label="handler")]
        assert run(app, command) == model.expect(command), command
    for number in ACCOUNTS:
        for app in handlers:
            assert app.state("bank_account", number).balance == model.balances.get(number, 0)
    rows = handlers[0].projection_store.all(BankAccount)
    assert {row.aggregate_id: row.balance for row in rows} == model.balances
