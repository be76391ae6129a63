"""Whether the memory stores of one log (the event store, its ``projections()`` and
``checkpoints()``) are still open: like a durable store's database, they close together,
and each verb of a closed one raises StoreError."""

from __future__ import annotations

from ...errors import StoreError

__all__ = ["CLOSED", "Opened"]

CLOSED = "This memory store is closed"


class Opened:
    """Shared by the stores of one log; ``close()`` closes them all."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False

    def check(self) -> None:
        if self.closed:
            raise StoreError(CLOSED)

    def close(self) -> None:
        self.closed = True
