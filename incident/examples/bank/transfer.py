"""The transfer aggregate: requested -> initiated -> completed, or -> reverted -> cancelled."""

from typing import Literal

from msgspec import Struct
from msgspec.structs import replace

from incident import Aggregate, Rejected

from .messages import (
    CancelTransfer,
    CompleteTransfer,
    InitiateTransfer,
    RequestTransfer,
    RevertTransfer,
    TransferCancelled,
    TransferCompleted,
    TransferInitiated,
    TransferRequested,
    TransferReverted,
)

Status = Literal["requested", "initiated", "completed", "reverted", "cancelled"]


class TransferState(Struct, frozen=True, kw_only=True):
    status: Status | None = None
    source_account_number: str | None = None
    destination_account_number: str | None = None
    amount: int = 0
    reason: str | None = None  # why it was reverted or cancelled


transfer = Aggregate("transfer", initial=TransferState())


def _require(state: TransferState, allowed: set[str], invalid: str) -> None:
    if state.status is None:
        raise Rejected("transfer_not_found")
    if state.status not in allowed:
        raise Rejected(invalid, f"the transfer is {state.status}")


@transfer.execute
def request(state: TransferState, cmd: RequestTransfer) -> TransferRequested:
    if state.status is not None:
        raise Rejected("transfer_already_initiated")
    return TransferRequested(
        source_account_number=cmd.source_account_number,
        destination_account_number=cmd.destination_account_number,
        amount=cmd.amount,
    )


@transfer.execute
def initiate(state: TransferState, cmd: InitiateTransfer) -> TransferInitiated:
    _require(state, {"requested"}, "transfer_status_invalid")
    return TransferInitiated()


@transfer.execute
def complete(state: TransferState, cmd: CompleteTransfer) -> TransferCompleted:
    _require(state, {"initiated"}, "transfer_status_invalid")
    return TransferCompleted()


# The original library spells this reason two ways; incident keeps both (docs/bank.md).
@transfer.execute
def revert(state: TransferState, cmd: RevertTransfer) -> TransferReverted:
    _require(state, {"initiated"}, "transfer_invalid_status")
    return TransferReverted(reason=cmd.reason)


@transfer.execute
def cancel(state: TransferState, cmd: CancelTransfer) -> TransferCancelled:
    _require(state, {"requested", "reverted"}, "transfer_invalid_status")
    return TransferCancelled(reason=cmd.reason)


@transfer.apply
def requested(state: TransferState, event: TransferRequested) -> TransferState:
    return TransferState(
        status="requested",
        source_account_number=event.source_account_number,
        destination_account_number=event.destination_account_number,
        amount=event.amount,
    )


@transfer.apply
def initiated(state: TransferState, event: TransferInitiated) -> TransferState:
    return replace(state, status="initiated")


@transfer.apply
def completed(state: TransferState, event: TransferCompleted) -> TransferState:
    return replace(state, status="completed")


@transfer.apply
def reverted(state: TransferState, event: TransferReverted) -> TransferState:
    return replace(state, status="reverted", reason=event.reason)


@transfer.apply
def cancelled(state: TransferState, event: TransferCancelled) -> TransferState:
    return replace(state, status="cancelled", reason=event.reason or state.reason)
