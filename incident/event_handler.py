"""EventHandler: a registry of pure listeners, and the values they may return.

A listener is ``fn(recorded, state) -> None | Projection | Command | Attempt | Iterable``,
where ``state`` is the aggregate's state right after the event. Listeners only describe
what should happen; the command handler (or a subscription) carries it out.
"""

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeAlias, TypeVar

import msgspec

from .codec import encode
from .errors import RegistrationError, Rejected
from .messages import Command, Event, Projection, Recorded

__all__ = ["Attempt", "EventHandler", "Reaction", "command_key", "keyed_steps"]

F = TypeVar("F", bound=Callable[..., Any])


class Attempt(msgspec.Struct, frozen=True):
    """Dispatch ``command``; then dispatch ``on_success`` or, if it was rejected, ``on_rejected``.

    Both branches are reactions themselves (commands, attempts, or tuples of them,
    dispatched in order), so a whole process reads as one value. ``on_rejected`` may
    also be a function of the :class:`~incident.Rejected` error (its ``reason``,
    ``detail`` and the ``command`` that was rejected) returning the reaction, so a
    compensation can record why:

    >>> class Send(Command):
    ...     aggregate_id: str
    >>> class Cancel(Command):
    ...     aggregate_id: str
    >>> Attempt(Send(aggregate_id="A"), on_rejected=Cancel(aggregate_id="T"))
    Attempt(command=Send(aggregate_id='A'), on_success=(), on_rejected=Cancel(aggregate_id='T'))
    """

    command: Command
    on_success: "Reaction" = ()
    on_rejected: "Reaction | Callable[[Rejected], Reaction]" = ()


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
        if not callable(reaction.on_rejected):  # a function is checked once it answers
            _check_reaction(reaction.on_rejected, source)
        return
    if isinstance(reaction, tuple):
        for step in reaction:
            _check_reaction(step, source)
        return
    what = reaction.command if isinstance(reaction, Attempt) else reaction
    raise RegistrationError(
        f"{source} returned an Attempt containing {what!r}; an Attempt holds a Command, "
        "and its branches are a Command, an Attempt, or a tuple of them (() for nothing); "
        "on_rejected may also be a function of the rejection returning one of those"
    )


def command_key(command: Command) -> str:
    """A digest of a command's type and content: the same command, the same digest, in
    every process and every release (a follow-up's identity, see :func:`keyed_steps`).

    >>> class Send(Command):
    ...     aggregate_id: str
    >>> command_key(Send(aggregate_id="A")) == command_key(Send(aggregate_id="A"))
    True
    >>> command_key(Send(aggregate_id="A")) == command_key(Send(aggregate_id="B"))
    False
    """
    body = f"{type(command).__name__}:".encode() + encode(command)
    return hashlib.sha256(body).hexdigest()[:20]


def keyed_steps(prefix: str | None, reaction: object) -> list[tuple[str | None, Command | Attempt]]:
    """The commands and attempts of a reaction, in order, each with its idempotency key:
    ``prefix/<digest of the command>``, and ``#2``, ``#3``... for a repeat of the same
    command. The key depends on what a command is, never on where it stands among a
    listener's outputs, so reordering them in a deploy changes no key.

    >>> class Send(Command):
    ...     aggregate_id: str
    >>> a, b = Send(aggregate_id="A"), Send(aggregate_id="B")
    >>> dict((step.aggregate_id, key) for key, step in keyed_steps("p", (a, b))) == dict(
    ...     (step.aggregate_id, key) for key, step in keyed_steps("p", (b, a)))
    True
    >>> [key[-2:] for key, _ in keyed_steps("p", (a, a))][1]
    '#2'
    """
    keyed: list[tuple[str | None, Command | Attempt]] = []
    seen: dict[str, int] = {}
    # a tuple inside the reaction is keyed as if it were flat: a command repeated there
    # must count as a repeat, not take the key (and so the outcome) of the first one
    for step in _steps(reaction):
        command = step.command if isinstance(step, Attempt) else step
        if not isinstance(command, Command):
            raise RegistrationError(f"A listener asked to dispatch {command!r}, not a Command")
        if prefix is None:
            keyed.append((None, step))
            continue
        digest = command_key(command)
        seen[digest] = seen.get(digest, 0) + 1
        repeat = "" if seen[digest] == 1 else f"#{seen[digest]}"
        keyed.append((f"{prefix}/{digest}{repeat}", step))
    return keyed


def _steps(reaction: object) -> Iterator[Any]:
    """The steps of a reaction in order, tuples inside it opened."""
    if isinstance(reaction, tuple | list):
        for step in reaction:
            yield from _steps(step)
    else:
        yield reaction


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

    def outputs(self, recorded: Recorded[Any], state: Any) -> list[tuple[str, list[Output]]]:
        """What each listener for this event returns, flattened, with the listener's name
        (its ``__qualname__``: part of the keys of the commands it returns)."""
        listeners = self._listeners.get(type(recorded.data))
        if not listeners:
            return []
        return [
            (listener.__qualname__, flatten(listener(recorded, state), listener.__qualname__))
            for listener in listeners
        ]
