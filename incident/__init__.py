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
from .errors import (
    ConcurrencyError,
    CorruptEvent,
    DuplicateCommand,
    IncidentError,
    InvalidCommand,
    RegistrationError,
    Rejected,
    RoutingError,
    StoreError,
    UnknownEventType,
)
from .event_handler import Attempt, EventHandler
from .messages import ANY, Command, Event, Projection, Recorded, event_type_name
from .stores import (
    EventStore,
    ProjectionStore,
    open_event_store,
    open_projection_store,
    open_stores,
)

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "Aggregate",
    "Attempt",
    "Command",
    "CommandHandler",
    "ConcurrencyError",
    "CorruptEvent",
    "DuplicateCommand",
    "Event",
    "EventHandler",
    "EventStore",
    "EventTypes",
    "IncidentError",
    "InvalidCommand",
    "Projection",
    "ProjectionStore",
    "Recorded",
    "RegistrationError",
    "Rejected",
    "RoutingError",
    "StoreError",
    "UnknownEventType",
    "__version__",
    "decode_command",
    "errors",
    "event_type_name",
    "open_event_store",
    "open_projection_store",
    "open_stores",
    "validate_command",
]
