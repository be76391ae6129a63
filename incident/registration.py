"""What a command handler checks when it is built: which aggregate each command type
belongs to, and that no two aggregates share a name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .aggregate import Aggregate
from .errors import RegistrationError
from .messages import Command, event_type_name

__all__ = ["refuse_shared_names", "routes"]


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


def refuse_shared_names(aggregates: Iterable[Aggregate[Any]]) -> None:
    """Stored event type names are one name space per store: two aggregates may share an
    Event class, but not store two different classes under one name."""
    seen: dict[str, tuple[Aggregate[Any], type[Any]]] = {}
    for aggregate in aggregates:
        for event_type in aggregate.event_types:
            name = event_type_name(event_type)
            other = seen.setdefault(name, (aggregate, event_type))
            if other[1] is not event_type:
                first, second = (f"{t.__module__}.{t.__qualname__}" for t in (other[1], event_type))
                raise RegistrationError(
                    f"{other[0].name} and {aggregate.name} both store an event as {name!r} "
                    f"({first} and {second}); a store could not tell them apart: give one a "
                    f"name of its own, e.g. class {event_type.__name__}(incident.Event, "
                    f'tag="{aggregate.name.title().replace("_", "")}{event_type.__name__}")'
                )
