"""Read models: one BankAccount row per account, one Transfer row per transfer."""

import datetime as dt
from typing import Any

from incident import EventHandler, Projection, Recorded

from .account import AccountState
from .messages import (
    AccountOpened,
    MoneyDeposited,
    MoneyReceived,
    MoneySent,
    MoneySentReverted,
    MoneyWithdrawn,
    TransferCancelled,
    TransferCompleted,
    TransferInitiated,
    TransferRequested,
    TransferReverted,
)
from .transfer import TransferState


class BankAccount(Projection):
    aggregate_id: str
    account_number: str
    balance: int
    version: int
    event_id: str
    event_date: dt.datetime


class Transfer(Projection):
    aggregate_id: str
    source_account_number: str
    destination_account_number: str
    amount: int
    status: str
    version: int
    event_id: str
    event_date: dt.datetime
    reason: str | None = None  # why it was cancelled (or reverted), as the account said


bank_projections = EventHandler("bank_projections")


@bank_projections.listen(
    AccountOpened, MoneyDeposited, MoneyWithdrawn, MoneySent, MoneyReceived, MoneySentReverted
)
def account_row(recorded: Recorded[Any], state: AccountState) -> BankAccount:
    return BankAccount(
        aggregate_id=recorded.aggregate_id,
        account_number=state.account_number or recorded.aggregate_id,
        balance=state.balance,
        version=recorded.version,
        event_id=recorded.event_id,
        event_date=recorded.event_date,
    )


@bank_projections.listen(
    TransferRequested, TransferInitiated, TransferCompleted, TransferReverted, TransferCancelled
)
def transfer_row(recorded: Recorded[Any], state: TransferState) -> Transfer:
    return Transfer(
        aggregate_id=recorded.aggregate_id,
        source_account_number=state.source_account_number or "",
        destination_account_number=state.destination_account_number or "",
        amount=state.amount,
        status=state.status or "",
        version=recorded.version,
        event_id=recorded.event_id,
        event_date=recorded.event_date,
        reason=state.reason,
    )
