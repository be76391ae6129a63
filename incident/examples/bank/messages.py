"""The Bank's commands and events (docs/bank.md)."""

from typing import Annotated

import msgspec

from incident import Command, Event

Amount = Annotated[int, msgspec.Meta(gt=0, description="an amount of money, > 0")]
Id = Annotated[str, msgspec.Meta(min_length=1)]


# -- bank_account commands -----------------------------------------------------


class OpenAccount(Command):
    aggregate_id: Id


class DepositMoney(Command):
    aggregate_id: Id
    amount: Amount


class WithdrawMoney(Command):
    aggregate_id: Id
    amount: Amount


class SendMoney(Command):
    aggregate_id: Id
    transfer_id: Id
    amount: Amount


class ReceiveMoney(Command):
    aggregate_id: Id
    transfer_id: Id
    amount: Amount


class RevertMoneySent(Command):
    aggregate_id: Id
    transfer_id: Id
    amount: Amount


# -- transfer commands -----------------------------------------------------------


class RequestTransfer(Command):
    aggregate_id: Id
    source_account_number: Id
    destination_account_number: Id
    amount: Amount


class InitiateTransfer(Command):
    aggregate_id: Id


class CompleteTransfer(Command):
    aggregate_id: Id


class RevertTransfer(Command):
    aggregate_id: Id
    reason: str | None = None  # why the destination refused the money


class CancelTransfer(Command):
    aggregate_id: Id
    reason: str | None = None  # why the transfer could not go on


# -- bank_account events -----------------------------------------------------------


class AccountOpened(Event):
    account_number: str


class MoneyDeposited(Event):
    amount: int


class MoneyWithdrawn(Event):
    amount: int


class MoneySent(Event):
    transfer_id: str
    amount: int


class MoneyReceived(Event):
    transfer_id: str
    amount: int


class MoneySentReverted(Event):
    transfer_id: str
    amount: int


# -- transfer events -----------------------------------------------------------------


class TransferRequested(Event):
    source_account_number: str
    destination_account_number: str
    amount: int


class TransferInitiated(Event):
    pass


class TransferCompleted(Event):
    pass


class TransferReverted(Event):
    reason: str | None = None  # a new field has a default: older events still decode


class TransferCancelled(Event):
    reason: str | None = None
