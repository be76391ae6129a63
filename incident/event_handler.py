"""EventHandler: a registry of pure listeners, and the values they may return.

A listener is ``fn(recorded, state) -> None | Projection | Command | Attempt | Iterable``,
where ``state`` is the aggregate's state right after the event. Listeners only describe
what should happen; the command handler (or a subscription) carries it out.
"""

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, TypeVar

import msgspec

from .errors import RegistrationError
from .messages import Command, Event, Projection, Recorded

__all__ = ["Attempt", "EventHandler", "Reaction"]

F = TypeVar("F", bound=Callable[..., Any])


class Attempt(msgspec.Struct, frozen=True):
    """Dispatch ``command``; then dispatch ``on_success`` or, if it was rejected, ``on_rejected``.

    Both branches are reactions themselves (commands, attempts, or tuples of them,
    dispatched in order), so a whole process reads as one value:

    >>> class Send(Command):
    ...     aggregate_id: str
    >>> class Cancel(Command):
    ...     aggregate_id: str
    >>> Attempt(Send(aggregate_id="A"), on_rejected=Cancel(aggregate_id="T"))
    Attempt(command=Send(aggregate_id='A'), on_success=(), on_rejected=Cancel(aggregate_id='T'))
    """

    command: Command
    on_success: "Reaction" = ()
    on_rejected: "Reaction" = ()


Reaction: TypeAlias = "Command | Attempt | tuple[Command | Attempt, ...]"
Output: TypeAlias = Projection | Command | Attempt
Listener: TypeAlias = Callable[[Recorded[Any], Any], Any]


def flatten(returned: object, source: str = "listener") -> list[Output]:
    """Normalise what a listener returned into a flat list of outputs, in order."""
    if isinstance(returned, Projection | Command):  # the usual answers, checked first
        return [returned]
    if returned is None:
        return []
    if isinstance(returned, Attempt):
        _check_reaction(returned, source)
        return [returned]
    if isinstance(returned, Iterable) and not isinstance(returned, str | bytes | dict):
        return [out for item in returned for out in flatten(item, source)]
    raise RegistrationError(
        f"{source} returned {returned!r}; a listener returns None, a Projection, "
        "a Command, an Attempt, or an iterable of them"
    )


def _check_reaction(reaction: object, source: str) -> None:
    """Refuse a malformed Attempt where the listener returns it (inside the transaction),
    rather than after the command that caused it has committed."""
    if isinstance(reaction, Command):
        return
    if isinstance(reaction, Attempt) and isinstance(reaction.command, Command):
        _check_reaction(reaction.on_success, source)
        _check_reaction(reaction.on_rejected, source)
        return
    if isinstance(reaction, tuple):
        for step in reaction:
            _check_reaction(step, source)
        return
    what = reaction.command if isinstance(reaction, Attempt) else reaction
    raise RegistrationError(
        f"{source} returned an Attempt containing {what!r}; an Attempt holds a Command, "
        "and its branches are a Command, an Attempt, or a tuple of them (() for nothing)"
    )


class EventHandler:
    """A named set of listeners, registered per event type.

    >>> class Opened(Event):
    ...     number: str
    >>> class Account(Projection):
    ...     aggregate_id: str
    >>> accounts = EventHandler("accounts")
    >>> @accounts.listen(Opened)
    ... def opened(recorded, state):
    ...     return Account(aggregate_id=recorded.aggregate_id)
    >>> accounts.event_types
    (<class 'incident.event_handler.Opened'>,)
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: dict[type[Event], list[Listener]] = {}

    def __repr__(self) -> str:
        return f"EventHandler({self.name!r})"

    def listen(self, *event_types: type[Event]) -> Callable[[F], F]:
        """Register a listener for one or more event types (several listeners may share one)."""
        if not event_types:
            raise RegistrationError(f"{self.name}.listen() needs at least one event type")
        for event_type in event_types:
            if not (isinstance(event_type, type) and issubclass(event_type, Event)):
                raise RegistrationError(
                    f"{self.name}.listen({event_type!r}): not an incident.Event subclass"
                )
            if event_type is Event:
                raise RegistrationError(
                    f"{self.name}.listen(Event): listeners are matched by exact event type, "
                    "so one for incident.Event itself would never run; name the event types"
                )

        def register(listener: F) -> F:
            for event_type in event_types:
                listeners = self._listeners.setdefault(event_type, [])
                if listener in listeners:
                    raise RegistrationError(
                        f"{self.name}: {listener.__qualname__} already listens to "
                        f"{event_type.__name__}"
                    )
                listeners.append(listener)
            return listener

        return register

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        """The event types some listener here listens to, in registration order."""
        return tuple(self._listeners)

    def handles(self, event: Event) -> bool:
        """Whether a listener is registered for this event's exact type."""
        return type(event) in self._listeners

    def handle(self, recorded: Recorded[Any], state: Any) -> list[Output]:
        """Everything the listeners for this event return, flattened, in registration order."""
        outputs: list[Output] = []
        for listener in self._listeners.get(type(recorded.data), ()):
            outputs.extend(flatten(listener(recorded, state), listener.__qualname__))
        return outputs
