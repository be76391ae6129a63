"""What a command handler checks and registers when it is built: which aggregate each
command type belongs to, that no two aggregates share a name, and its aggregates' event
types in the store's registry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..aggregate import Aggregate
from ..errors import RegistrationError
from ..event_types import EventTypes
from ..messages import Command

__all__ = ["register_event_types", "routes"]


def routes(aggregates: Iterable[Aggregate[Any]]) -> dict[type[Command], Aggregate[Any]]:
    """Command type -> the one aggregate that executes it; RegistrationError when two
    aggregates share a name or a command type."""
    found: dict[type[Command], Aggregate[Any]] = {}
    names: dict[str, Aggregate[Any]] = {}
    for aggregate in aggregates:
        if aggregate.name in names:
            raise RegistrationError(f"Two aggregates are named {aggregate.name!r}")
        names[aggregate.name] = aggregate
        for command_type in aggregate.command_types:
            other = found.get(command_type)
            if other is not None:
                raise RegistrationError(
                    f"{command_type.__name__} is handled by both {other.name} and "
                    f"{aggregate.name}; a command type must belong to one aggregate"
                )
            found[command_type] = aggregate
    return found


def register_event_types(types: EventTypes, aggregates: Iterable[Aggregate[Any]]) -> None:
    """Add the aggregates' event types and upcasters to a store's registry, all or none,
    each owned by its aggregate: two aggregates may share an Event class, but one stored
    name never stands for two classes, within this command handler or across the
    command handlers sharing the store (RegistrationError naming both, by the rule of
    :meth:`EventTypes.register <incident.codec.EventTypes.register>`)."""
    own = EventTypes()
    for aggregate in aggregates:
        own.register(*aggregate.event_types, owner=aggregate.name)
        for (name, version), upcaster in aggregate.upcasters.items():
            own.register_upcaster(name, version, upcaster, owner=aggregate.name)
    types.include(own)
