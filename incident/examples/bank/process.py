"""The money-transfer process: moves money between two accounts by issuing commands.

Each step is an Attempt; a compensation is a function of the rejection, so the transfer
records the reason the account gave (``account_not_found``, ``no_enough_balance``).
"""

from typing import Any

from incident import Attempt, EventHandler, Recorded

from .messages import (
    CancelTransfer,
    CompleteTransfer,
    InitiateTransfer,
    ReceiveMoney,
    RevertMoneySent,
    RevertTransfer,
    SendMoney,
    TransferInitiated,
    TransferRequested,
    TransferReverted,
)
from .transfer import TransferState

money_transfer = EventHandler("money_transfer")


@money_transfer.listen(TransferRequested)
def take_from_source(recorded: Recorded[TransferRequested], state: TransferState) -> Attempt:
    transfer_id, event = recorded.aggregate_id, recorded.data
    return Attempt(
        SendMoney(
            aggregate_id=event.source_account_number,
            transfer_id=transfer_id,
            amount=event.amount,
        ),
        on_success=InitiateTransfer(aggregate_id=transfer_id),
        on_rejected=lambda rejection: CancelTransfer(
            aggregate_id=transfer_id, reason=rejection.reason
        ),
    )


@money_transfer.listen(TransferInitiated)
def give_to_destination(recorded: Recorded[Any], state: TransferState) -> Attempt:
    transfer_id = recorded.aggregate_id
    return Attempt(
        ReceiveMoney(
            aggregate_id=state.destination_account_number or "",
            transfer_id=transfer_id,
            amount=state.amount,
        ),
        on_success=CompleteTransfer(aggregate_id=transfer_id),
        on_rejected=lambda rejection: RevertTransfer(
            aggregate_id=transfer_id, reason=rejection.reason
        ),
    )


@money_transfer.listen(TransferReverted)
def give_back_to_source(
    recorded: Recorded[Any], state: TransferState
) -> tuple[RevertMoneySent, CancelTransfer]:
    transfer_id = recorded.aggregate_id
    return (
        RevertMoneySent(
            aggregate_id=state.source_account_number or "",
            transfer_id=transfer_id,
            amount=state.amount,
        ),
        CancelTransfer(aggregate_id=transfer_id, reason=state.reason),
    )
