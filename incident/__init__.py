"""incident: Event Sourcing and CQRS with pure, decorated functions.

Aggregates are registries of pure ``execute(state, command)`` and ``apply(state, event)``
functions; state is a fold over events; stores are small protocol objects for memory,
SQLite and Postgres.
"""

from __future__ import annotations

from . import errors
from .aggregate import Aggregate
from .codec import EventTypes, decode_command, validate_command
from .command_handler import CommandHandler
from .command_handler.asynchronous import AsyncCommandHandler
from .errors import (
    CheckpointConflict,
    CommitUnknown,
    ConcurrencyError,
    CorruptEvent,
    DuplicateCommand,
    FollowUpFailed,
    ForeignStream,
    IncidentError,
    InvalidArgument,
    InvalidCommand,
    RegistrationError,
    Rejected,
    RoutingError,
    SnapshotMismatch,
    StoreError,
    UnknownEventType,
    Unstorable,
)
from .event_handler import Attempt, EventHandler
from .messages import ANY, Command, Event, Projection, Recorded, event_type_name
from .stores import (
    AsyncEventStore,
    AsyncProjectionStore,
    CheckpointStore,
    EventStore,
    Outcome,
    Owed,
    Parked,
    ProjectionStore,
    open_async_event_store,
    open_async_projection_store,
    open_event_store,
    open_projection_store,
    open_stores,
)
from .subscriptions import Subscription, SubscriptionFailed, Subscriptions
from .subscriptions.reactor import Reactor

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "Aggregate",
    "AsyncCommandHandler",
    "AsyncEventStore",
    "AsyncProjectionStore",
    "Attempt",
    "CheckpointConflict",
    "CheckpointStore",
    "Command",
    "CommandHandler",
    "CommitUnknown",
    "ConcurrencyError",
    "CorruptEvent",
    "DuplicateCommand",
    "Event",
    "EventHandler",
    "EventStore",
    "EventTypes",
    "FollowUpFailed",
    "ForeignStream",
    "IncidentError",
    "InvalidArgument",
    "InvalidCommand",
    "Outcome",
    "Owed",
    "Parked",
    "Projection",
    "ProjectionStore",
    "Reactor",
    "Recorded",
    "RegistrationError",
    "Rejected",
    "RoutingError",
    "SnapshotMismatch",
    "StoreError",
    "Subscription",
    "SubscriptionFailed",
    "Subscriptions",
    "UnknownEventType",
    "Unstorable",
    "__version__",
    "decode_command",
    "errors",
    "event_type_name",
    "open_async_event_store",
    "open_async_projection_store",
    "open_event_store",
    "open_projection_store",
    "open_stores",
    "validate_command",
]
