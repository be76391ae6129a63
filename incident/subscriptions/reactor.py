"""Reactor: what a subscription needs of the application it runs in.

A subscription reads the log from the application's event store, folds the states its
listeners receive with the application's aggregates, writes their projections to the
application's projection store and hands the commands they return back to the
application to carry out. A :class:`~incident.CommandHandler` is one; naming only this
much keeps subscriptions free of the write side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..aggregate import Aggregate
from ..messages import Recorded
from ..stores import EventStore, ProjectionStore

__all__ = ["Reactor"]


class Reactor(Protocol):
    """The stores and aggregates a subscription works with, and the carrying out of the
    commands its listeners return."""

    @property
    def event_store(self) -> EventStore: ...

    @property
    def projection_store(self) -> ProjectionStore: ...

    @property
    def aggregates(self) -> Sequence[Aggregate[Any]]: ...

    def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> None:
        """Dispatch what ``handler``'s listeners returned for ``cause`` (``(listener name,
        commands and attempts)`` pairs), each command idempotently under a key made of
        the handler, the cause, the listener and the command."""
        ...
