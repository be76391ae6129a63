"""Typed usage of the public API: mypy --strict must accept this file as written.

Public types are tested like behaviour; a signature change that breaks users breaks this.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

import incident


class Deposit(incident.Command):
    aggregate_id: str
    amount: Annotated[int, msgspec.Meta(gt=0)]


class Deposited(incident.Event):
    amount: int


class Balance(incident.Projection):
    aggregate_id: str
    balance: int
    version: int


class State(msgspec.Struct, frozen=True):
    balance: int = 0


account: incident.Aggregate[State] = incident.Aggregate("typed_account", initial=State())


@account.execute
def deposit(state: State, cmd: Deposit) -> Deposited:
    return Deposited(amount=cmd.amount)


@account.apply
def deposited(state: State, event: Deposited) -> State:
    return msgspec.structs.replace(state, balance=state.balance + event.amount)


balances = incident.EventHandler("typed_balances")


@balances.listen(Deposited)
def balance_row(recorded: incident.Recorded[Deposited], state: State) -> Balance:
    return Balance(
        aggregate_id=recorded.aggregate_id, balance=state.balance, version=recorded.version
    )


def use() -> int:
    handler = incident.CommandHandler(
        "memory://", aggregates=[account], event_handlers=[balances], retries=3
    )
    recorded: list[incident.Recorded[Any]] = handler.dispatch(
        Deposit(aggregate_id="a", amount=1), metadata={"user": "ann"}
    )
    state: State = account.fold(r.data for r in recorded)
    row: Balance | None = handler.projection_store.get(Balance, "a")
    rows: list[Balance] = handler.projection_store.all(Balance)
    store: incident.EventStore = incident.open_event_store("memory://")
    store.append("b", [Deposited(amount=2)], expected_version=incident.ANY)
    try:
        handler.dispatch(incident.decode_command(Deposit, {"aggregate_id": "a", "amount": 0}))
    except incident.InvalidCommand as error:
        field: str | None = error.field
        del field
    except incident.Rejected as rejection:
        reason: str = rejection.reason
        del reason
    return state.balance + (row.balance if row else 0) + len(rows)


def use_subscriptions() -> int:
    """The same handler run durably: started, waited for, its dead letters listed."""
    durable = incident.CommandHandler("memory://", aggregates=[account], subscriptions=[balances])
    durable.dispatch(Deposit(aggregate_id="a", amount=2))
    subscriptions: incident.Subscriptions = durable.subscriptions
    with subscriptions:
        subscriptions.wait_until_caught_up(timeout=10.0)
    subscription: incident.Subscription = subscriptions["typed_balances"]
    parked: list[incident.Parked] = subscription.parked()
    read: int = subscription.catch_up()
    checkpoints: incident.CheckpointStore = subscription.checkpoints
    reactor: incident.Reactor = durable  # a command handler is what subscriptions run in
    incident.Subscription(balances, reactor, checkpoints=checkpoints)
    in_waves = incident.Subscription(
        balances, reactor, concurrency=8, sequence_by=lambda recorded: recorded.aggregate_id
    )
    in_waves.concurrency = 4
    concurrency: int = in_waves.concurrency
    assert concurrency == 4
    row = durable.projection_store.get(Balance, "a")
    return checkpoints.load("typed_balances") + read + len(parked) + (row.balance if row else 0)


def target(command: incident.Command) -> str:
    """Every command names its target: ``aggregate_id`` is a str on the base type."""
    return command.aggregate_id
