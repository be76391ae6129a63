"""Testing helpers for aggregates: given/when/then specs, hypothesis strategies derived
from the message types, and a stateful machine that runs random commands.

Everything here is pure, like the aggregates it tests: no store, no clock.

Specs read like the rules they check:

>>> from incident.examples.bank import (
...     AccountOpened, DepositMoney, MoneyDeposited, WithdrawMoney, bank_account)
>>> opened = given(bank_account, AccountOpened(account_number="A1"))
>>> opened.when(DepositMoney(aggregate_id="A1", amount=10)).then(MoneyDeposited(amount=10))
AccountState(account_number='A1', balance=10)
>>> opened.when(WithdrawMoney(aggregate_id="A1", amount=1)).then_rejected("no_enough_balance")
Rejected('no_enough_balance')
>>> opened.when(DepositMoney(aggregate_id="A1", amount=0)).then_invalid("amount")
InvalidCommand('Invalid DepositMoney: Expected `int` >= 1 - at `amount`')

Strategies generate commands that pass :func:`incident.validate_command` (or, from
:func:`invalid_commands`, that fail it), and :func:`aggregate_machine` turns an
aggregate into a hypothesis ``RuleBasedStateMachine``.

Stores have a test suite of their own, :mod:`incident.testing.contract`, which a store
of yours runs by subclassing; it needs pytest, so it is imported on its own, never from
here.

See Also: :class:`Scenario`, :func:`commands`, :func:`events`, :func:`invalid_commands`,
:func:`aggregate_machine`, :func:`diff_events`.
"""

from .machine import aggregate_machine
from .specs import Outcome, Scenario, ScenarioFailed, diff_events, given
from .strategies import commands, events, invalid_commands

__all__ = [
    "Outcome",
    "Scenario",
    "ScenarioFailed",
    "aggregate_machine",
    "commands",
    "diff_events",
    "events",
    "given",
    "invalid_commands",
]
