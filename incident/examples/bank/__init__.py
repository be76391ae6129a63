"""The Bank example (docs/bank.md): accounts, transfers, read models and the transfer process.

>>> bank = build()
>>> _ = bank.dispatch(OpenAccount(aggregate_id="ACC1"))
>>> _ = bank.dispatch(DepositMoney(aggregate_id="ACC1", amount=100))
>>> bank.projection_store.get(BankAccount, "ACC1").balance
100
"""

from incident import (
    AsyncCommandHandler,
    AsyncEventStore,
    AsyncProjectionStore,
    CommandHandler,
    EventStore,
    ProjectionStore,
)

from .account import AccountState, bank_account
from .messages import (
    AccountOpened,
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
)
from .process import money_transfer
from .projections import BankAccount, Transfer, bank_projections
from .transfer import TransferState, transfer

__all__ = [
    "AccountOpened",
    "AccountState",
    "BankAccount",
    "CancelTransfer",
    "CompleteTransfer",
    "DepositMoney",
    "InitiateTransfer",
    "MoneyDeposited",
    "MoneyReceived",
    "MoneySent",
    "MoneySentReverted",
    "MoneyWithdrawn",
    "OpenAccount",
    "ReceiveMoney",
    "RequestTransfer",
    "RevertMoneySent",
    "RevertTransfer",
    "SendMoney",
    "Transfer",
    "TransferCancelled",
    "TransferCompleted",
    "TransferInitiated",
    "TransferReverted",
    "TransferRequested",
    "TransferState",
    "WithdrawMoney",
    "bank_account",
    "bank_projections",
    "build",
    "build_async",
    "money_transfer",
    "transfer",
]


def build(
    event_store: EventStore | str = "memory://",
    projection_store: ProjectionStore | str | None = None,
    *,
    subscriptions: bool = False,
    **options: int | float,
) -> CommandHandler:
    """A CommandHandler running the Bank with its projections and transfer process inline,
    or, with ``subscriptions=True``, as durable subscriptions (``.subscriptions``) that
    catch up once started.

    ``projection_store=None`` puts the read models in the event store's database.
    """
    handlers = [bank_projections, money_transfer]
    return CommandHandler(
        event_store,
        projection_store,
        aggregates=[bank_account, transfer],
        event_handlers=[] if subscriptions else handlers,
        subscriptions=handlers if subscriptions else [],
        **options,  # type: ignore[arg-type]
    )


def build_async(
    event_store: AsyncEventStore | str = "memory://",
    projection_store: AsyncProjectionStore | str | None = None,
    **options: int | float,
) -> AsyncCommandHandler:
    """The Bank on an AsyncCommandHandler (docs/async.md): the same aggregates, with its
    projections and transfer process inline."""
    return AsyncCommandHandler(
        event_store,
        projection_store,
        aggregates=[bank_account, transfer],
        event_handlers=[bank_projections, money_transfer],
        **options,  # type: ignore[arg-type]
    )
