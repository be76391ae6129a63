"""The error hierarchy: one base class, subclasses that say what went wrong and where.

Every error raised by incident is an :class:`IncidentError`. Bad command data is
also a :class:`ValueError`, so code that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "CheckpointConflict",
    "CommitUnknown",
    "ConcurrencyError",
    "CorruptEvent",
    "DuplicateCommand",
    "FollowUpFailed",
    "ForeignStream",
    "IncidentError",
    "InvalidArgument",
    "InvalidCommand",
    "RegistrationError",
    "Rejected",
    "RoutingError",
    "SnapshotMismatch",
    "StoreError",
    "UnknownEventType",
    "Unstorable",
]


class IncidentError(Exception):
    """Base class of every error raised by incident."""


class InvalidCommand(IncidentError, ValueError):
    """A command's data does not match its own type (wrong type, constraint, missing field).

    >>> str(InvalidCommand("DepositMoney", "amount", "Expected `int >= 1`, got `0`"))
    'Invalid DepositMoney: Expected `int >= 1`, got `0` - at `amount`'
    """

    def __init__(self, command_type: str, field: str | None, problem: str) -> None:
        self.command_type = command_type
        self.field = field
        self.problem = problem
        where = f" - at `{field}`" if field and f"`{field}`" not in problem else ""
        super().__init__(f"Invalid {command_type}: {problem}{where}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.command_type, self.field, self.problem))


class InvalidArgument(IncidentError, ValueError):
    """An argument to a store's verb that no store could act on (a negative position, a
    limit that is not a count, an id that is not a str), or an option a handler,
    subscription or store is built with that is not one (``retries=-1``, a misspelt
    store option): refused before anything is opened, read or written, alike on every
    store. Fix the call; retrying cannot help."""


class Unstorable(IncidentError, ValueError):
    """A value no store could keep and give back unchanged (see docs/storable.md): an
    event, metadata, an id or a read model. Nothing was written; retrying cannot help,
    the data must change. ``what`` is the value refused, ``field`` where in it, ``rule``
    the rule it breaks.

    >>> str(Unstorable("event Measured", "celsius", "nan is not a finite number"))
    'Cannot store event Measured: nan is not a finite number - at `celsius`; nothing was written'
    """

    def __init__(self, what: str, field: str | None, rule: str) -> None:
        self.what, self.field, self.rule = what, field, rule
        where = f" - at `{field}`" if field else ""
        super().__init__(f"Cannot store {what}: {rule}{where}; nothing was written")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.what, self.field, self.rule))


class Rejected(IncidentError):
    """A business rule said no. ``reason`` is a short snake_case string; ``command`` is
    the command that was rejected, once the command handler has raised it.

    >>> Rejected("no_enough_balance").reason
    'no_enough_balance'
    """

    command: Any = None

    def __init__(self, reason: str, detail: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(reason if detail is None else f"{reason}: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.detail))


class ConcurrencyError(IncidentError):
    """An append expected one stream version and found another; nothing was written."""

    def __init__(self, aggregate_id: str, expected: object, actual: int) -> None:
        self.aggregate_id = aggregate_id
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"Stream {aggregate_id!r} is at version {actual}, expected {expected}; "
            "nothing was written"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.aggregate_id, self.expected, self.actual))


class CheckpointConflict(IncidentError):
    """A subscription's checkpoint was not where it left it: another runner moved it.
    Nothing was written; the subscription stops rather than apply events twice."""

    def __init__(self, handler: str, expected: int, actual: int) -> None:
        self.handler, self.expected, self.actual = handler, expected, actual
        super().__init__(
            f"The checkpoint of {handler!r} is at {actual}, expected {expected}: another "
            "runner is processing this handler; nothing was written"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.handler, self.expected, self.actual))


class CorruptEvent(IncidentError):
    """A stored event could not be read as it was written: its payload does not decode,
    does not match its stored type, or the stream or log has a hole where it should be.
    Names where it lives (the position, and the version or type when known). Retrying
    does not help: the row must be repaired or the database restored."""

    def __init__(
        self,
        position: int | None,
        aggregate_id: str,
        problem: str,
        *,
        version: int | None = None,
        event_type: str | None = None,
    ) -> None:
        self.position = position
        self.aggregate_id = aggregate_id
        self.problem = problem
        self.version = version
        self.event_type = event_type
        at = f"at position {position} " if position is not None else ""
        of = f"of aggregate {aggregate_id!r}" if aggregate_id else "in the log"
        version_of = f" (version {version})" if version is not None else ""
        super().__init__(f"Corrupt event {at}{of}{version_of}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_corrupt,
            (self.position, self.aggregate_id, self.problem, self.version, self.event_type),
        )


def _rebuild_corrupt(
    position: int | None,
    aggregate_id: str,
    problem: str,
    version: int | None,
    event_type: str | None,
) -> CorruptEvent:
    return CorruptEvent(position, aggregate_id, problem, version=version, event_type=event_type)


class UnknownEventType(CorruptEvent, LookupError):
    """A stored event names a type that no registered Event class carries: damage, or a
    type only newer code knows (deploy it, or register the class). A CorruptEvent, so
    every reader treats it alike: not retried, skipped by a subscription whose handler
    does not listen to it, parked or stopped at by one whose handler does."""

    def __init__(
        self,
        event_type: str,
        registered: Iterable[str],
        position: int | None = None,
        aggregate_id: str = "",
    ) -> None:
        self.registered = sorted(registered)
        known = ", ".join(self.registered) or "none"
        problem = f"no Event class carries the type {event_type!r}; registered types: {known}"
        CorruptEvent.__init__(self, position, aggregate_id, problem, event_type=event_type)
        at = f" at position {position}" if position is not None else ""
        IncidentError.__init__(
            self, f"Unknown event type {event_type!r}{at}; registered types: {known}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.event_type, self.registered, self.position, self.aggregate_id))


class DuplicateCommand(IncidentError):
    """An append carried an idempotency key that was already used; nothing was written.
    ``recorded`` holds the events stored the first time (the command handler returns
    them), or ``rejected`` the reason the first time was rejected for."""

    def __init__(
        self,
        key: str,
        recorded: list[Any],
        rejected: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.key = key
        self.recorded = recorded
        self.rejected, self.detail = rejected, detail
        super().__init__(f"Idempotency key {key!r} was already used; nothing was written")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.recorded, self.rejected, self.detail))


class FollowUpFailed(IncidentError):
    """A command was stored, but a follow-up its inline event handlers owe failed.

    The follow-up stays owed (``owed``), recorded with its cause: dispatching the command
    again with the same idempotency key, or ``CommandHandler.complete_owed()`` (``incident
    retry URL --inline ...``), completes it, each command once. ``recorded`` holds the
    command's events; the follow-up's error is chained."""

    def __init__(self, recorded: list[Any], owed: list[Any], problem: str) -> None:
        self.recorded, self.owed, self.problem = recorded, owed, problem
        what = ", ".join(
            f"{work.handler} for #{work.position}" if hasattr(work, "handler") else str(work)
            for work in owed
        )
        super().__init__(
            f"The command was stored, but a follow-up failed ({problem}); still owed: "
            f"{what}. Dispatch it again with the same idempotency key, or call "
            "complete_owed(), to complete it"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.recorded, self.owed, self.problem))


class SnapshotMismatch(IncidentError):
    """A stored snapshot's state is not what folding its events gives (found when
    snapshots are verified): ``path`` is the first place they differ, with the value in
    the snapshot and the value the fold gives."""

    def __init__(self, snapshot: str, version: int, path: str, stored: Any, folded: Any) -> None:
        self.snapshot, self.version, self.path = snapshot, version, path
        self.stored, self.folded = stored, folded
        super().__init__(
            f"The snapshot {snapshot!r} at version {version} is not the state its events fold "
            f"to: at {path}, the snapshot has {stored!r} and the fold gives {folded!r}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.snapshot, self.version, self.path, self.stored, self.folded))


class StoreError(IncidentError):
    """The database driver failed; the original exception is chained as ``__cause__``."""


class CommitUnknown(StoreError):
    """The connection was lost while an append committed, and the store could not find
    out in time whether it did: the command may or may not have been stored. Look for
    ``event_ids`` in the log (or, under an idempotency key, ``outcome_for(key)``) before
    doing it again; with ``dispatch(..., metadata={"idempotency_key": ...})`` a retry is
    safe anyway, since a stored command is then returned instead of decided again."""

    def __init__(self, problem: str, aggregate_id: str, event_ids: list[str]) -> None:
        self.problem, self.aggregate_id, self.event_ids = problem, aggregate_id, event_ids
        super().__init__(
            f"{problem}: the command may or may not have been stored (look for event id "
            f"{event_ids[0] if event_ids else '?'} in stream {aggregate_id!r}). Retry only "
            'commands dispatched with metadata={"idempotency_key": ...}, which makes a '
            "retry safe"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problem, self.aggregate_id, self.event_ids))


class RegistrationError(IncidentError, TypeError):
    """A decorator was used wrongly: a duplicate, a missing annotation, a wrong type."""


class RoutingError(IncidentError, LookupError):
    """No aggregate handles this command, or no function handles this event."""


class ForeignStream(RoutingError):
    """A command or a read named an aggregate id whose stream belongs to another aggregate.
    Aggregate ids are one id space per event store, whatever the aggregate; nothing was
    written."""

    def __init__(self, aggregate_id: str, aggregate: str, owner: str) -> None:
        self.aggregate_id, self.aggregate, self.owner = aggregate_id, aggregate, owner
        super().__init__(
            f"Stream {aggregate_id!r} belongs to aggregate {owner!r}, not {aggregate!r}: "
            "aggregate ids are one id space per event store, whatever the aggregate; give "
            f"{aggregate} ids of their own (say {aggregate}-{aggregate_id})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.aggregate_id, self.aggregate, self.owner))
