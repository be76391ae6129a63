"""The bank_account aggregate: pure rules over an account's state."""

from msgspec import Struct
from msgspec.structs import replace

from incident import Aggregate, Rejected

from .messages import (
    AccountOpened,
    DepositMoney,
    MoneyDeposited,
    MoneyReceived,
    MoneySent,
    MoneySentReverted,
    MoneyWithdrawn,
    OpenAccount,
    ReceiveMoney,
    RevertMoneySent,
    SendMoney,
    WithdrawMoney,
)


class AccountState(Struct, frozen=True, kw_only=True):
    account_number: str | None = None
    balance: int = 0


bank_account = Aggregate("bank_account", initial=AccountState())


def _opened(state: AccountState) -> AccountState:
    if state.account_number is None:
        raise Rejected("account_not_found")
    return state


def _can_pay(state: AccountState, amount: int) -> None:
    if _opened(state).balance < amount:
        raise Rejected("no_enough_balance")


@bank_account.execute
def open_account(state: AccountState, cmd: OpenAccount) -> AccountOpened:
    if state.account_number is not None:
        raise Rejected("account_already_opened")
    return AccountOpened(account_number=cmd.aggregate_id)


@bank_account.execute
def deposit(state: AccountState, cmd: DepositMoney) -> MoneyDeposited:
    _opened(state)
    return MoneyDeposited(amount=cmd.amount)


@bank_account.execute
def withdraw(state: AccountState, cmd: WithdrawMoney) -> MoneyWithdrawn:
    _can_pay(state, cmd.amount)
    return MoneyWithdrawn(amount=cmd.amount)


@bank_account.execute
def send(state: AccountState, cmd: SendMoney) -> MoneySent:
    _can_pay(state, cmd.amount)
    return MoneySent(transfer_id=cmd.transfer_id, amount=cmd.amount)


@bank_account.execute
def receive(state: AccountState, cmd: ReceiveMoney) -> MoneyReceived:
    _opened(state)
    return MoneyReceived(transfer_id=cmd.transfer_id, amount=cmd.amount)


@bank_account.execute
def revert_sent(state: AccountState, cmd: RevertMoneySent) -> MoneySentReverted:
    _opened(state)
    return MoneySentReverted(transfer_id=cmd.transfer_id, amount=cmd.amount)


@bank_account.apply
def opened(state: AccountState, event: AccountOpened) -> AccountState:
    return replace(state, account_number=event.account_number, balance=0)


@bank_account.apply
def deposited(state: AccountState, event: MoneyDeposited) -> AccountState:
    return replace(state, balance=state.balance + event.amount)


@bank_account.apply
def withdrawn(state: AccountState, event: MoneyWithdrawn) -> AccountState:
    return replace(state, balance=state.balance - event.amount)


@bank_account.apply
def sent(state: AccountState, event: MoneySent) -> AccountState:
    return replace(state, balance=state.balance - event.amount)


@bank_account.apply
def received(state: AccountState, event: MoneyReceived) -> AccountState:
    return replace(state, balance=state.balance + event.amount)


@bank_account.apply
def sent_reverted(state: AccountState, event: MoneySentReverted) -> AccountState:
    return replace(state, balance=state.balance + event.amount)
