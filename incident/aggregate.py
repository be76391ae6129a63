"""Aggregate: a registry of pure ``execute`` and ``apply`` functions.

``decide(state, command) -> events`` and ``evolve(state, event) -> state`` are the whole
domain contract; ``fold`` is ``functools.reduce`` over ``evolve``. Nothing here does I/O,
reads the clock or draws randomness: ids, dates and positions come from the store.
"""

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar, get_type_hints, overload

from .errors import RegistrationError, Rejected, RoutingError
from .fp import accumulate
from .messages import Command, Event, Recorded, event_type_name
from .storable import problem_in, shown

__all__ = ["Aggregate"]

S = TypeVar("S")
M = TypeVar("M")
F = TypeVar("F", bound=Callable[..., Any])
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
U = TypeVar("U", bound=Upcaster)
T = TypeVar("T", bound=Callable[[Any], bool])


def _parameters(function: Callable[..., Any], role: str) -> list[inspect.Parameter]:
    """The (state, message) parameters of a decorated function, or RegistrationError."""
    name = getattr(function, "__qualname__", repr(function))
    params = list(inspect.signature(function).parameters.values())
    if len(params) != 2:
        raise RegistrationError(
            f"{role} function {name} must take two parameters (state, message), "
            f"it takes {len(params)}"
        )
    return params


def message_type(function: Callable[..., Any], base: type[M], role: str) -> type[M]:
    """The type annotated on a decorated function's second parameter."""
    name = getattr(function, "__qualname__", repr(function))
    params = _parameters(function, role)
    try:
        hints = get_type_hints(function)
    except Exception as error:  # an annotation naming something not importable
        raise RegistrationError(
            f"Cannot read the annotations of {name}: {error}. String annotations (as under "
            "`from __future__ import annotations`) resolve in the module's globals only: define "
            f"the types at module level, or use the explicit form @aggregate.{role}(MessageType)"
        ) from error
    annotated = hints.get(params[1].name)
    if annotated is None:
        raise RegistrationError(
            f"{role} function {name} has no annotation on its parameter {params[1].name!r}; "
            f"annotate it with a {base.__name__} subclass or use the explicit form "
            f"@aggregate.{role}(MessageType)"
        )
    if not (isinstance(annotated, type) and issubclass(annotated, base)):
        raise RegistrationError(
            f"{role} function {name} is annotated with {annotated!r}, "
            f"which is not an incident.{base.__name__} subclass"
        )
    return annotated


class Aggregate(Generic[S]):
    """A named registry of a state's pure decision and evolution functions.

    >>> import msgspec
    >>> class Add(Command):
    ...     aggregate_id: str
    ...     n: int
    >>> class Added(Event):
    ...     n: int
    >>> counter = Aggregate("counter", initial=0)
    >>> @counter.execute
    ... def add(total: int, cmd: Add) -> Added:
    ...     return Added(n=cmd.n)
    >>> @counter.apply
    ... def added(total: int, event: Added) -> int:
    ...     return total + event.n
    >>> counter.decide(0, Add(aggregate_id="c", n=2))
    [Added(n=2)]
    >>> counter.fold([Added(n=2), Added(n=3)])
    5
    >>> list(counter.history([Added(n=2), Added(n=3)]))
    [2, 5]
    """

    def __init__(
        self, name: str, *, initial: S, state_type: Any = None, snapshot_version: int = 1
    ) -> None:
        """``state_type`` is the type snapshots encode and decode the state as (by default
        ``type(initial)``; declare it when that says too little, e.g. ``dict[int,
        Decimal]`` for ``initial={}``). ``snapshot_version`` is part of the snapshot key:
        bump it when the meaning of the state changes in a way the code does not show, and
        every older snapshot is ignored (see docs/snapshots.md).

        ``name`` is stored with every event of the aggregate's streams, so it is refused
        here, not at the first dispatch, unless a non-empty str every store keeps (no
        NUL, no lone surrogate: docs/storable.md)."""
        if not isinstance(name, str) or not name:
            raise RegistrationError(
                f"An Aggregate's name must be a non-empty str, got {shown(name)}"
            )
        if (problem := problem_in(name)) is not None:
            raise RegistrationError(
                f"Aggregate name {problem[1]}: it is stored with every event of its streams"
            )
        if initial is None:
            # None is what an apply function that forgot its return gives: keeping it
            # out of every state is what lets a fold catch that at once
            raise RegistrationError(
                f"Aggregate {name!r}: initial=None is not a state; start from a value "
                "(a Struct with defaults, 0, (), a dataclass...)"
            )
        if isinstance(snapshot_version, bool) or not isinstance(snapshot_version, int):
            raise RegistrationError(f"{name}: snapshot_version must be an int")
        self.name = name
        self.initial = initial
        self.state_type: Any = type(initial) if state_type is None else state_type
        self.snapshot_version = snapshot_version
        self._executors: dict[type[Command], Callable[[S, Any], Any]] = {}
        self._appliers: dict[type[Event], Callable[[S, Any], S]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        self._terminal: Callable[[S], bool] | None = None

    def __repr__(self) -> str:
        return f"Aggregate({self.name!r})"

    # -- registration -------------------------------------------------------

    @overload
    def execute(self, target: type[Command]) -> Callable[[F], F]: ...
    @overload
    def execute(self, target: F) -> F: ...
    def execute(self, target: Any) -> Any:
        """Register ``fn(state, command) -> event | [events] | ()`` for the annotated command."""
        return self._register(target, Command, "execute", self._executors)

    @overload
    def apply(self, target: type[Event]) -> Callable[[F], F]: ...
    @overload
    def apply(self, target: F) -> F: ...
    def apply(self, target: Any) -> Any:
        """Register ``fn(state, event) -> state`` for the annotated event type."""
        return self._register(target, Event, "apply", self._appliers)

    def _register(self, target: Any, base: type[Any], role: str, registry: dict[Any, Any]) -> Any:
        def add(function: F, message: type[Any]) -> F:
            _parameters(function, role)
            existing = registry.get(message)
            if existing is not None:
                raise RegistrationError(
                    f"{self.name}: {message.__name__} is already handled by "
                    f"{existing.__qualname__}; cannot also register {function.__qualname__}"
                )
            registry[message] = function
            return function

        if isinstance(target, type):
            if not issubclass(target, base):
                raise RegistrationError(
                    f"@{self.name}.{role}({target.__name__}): "
                    f"not an incident.{base.__name__} subclass"
                )
            self._check_message(target, base, role)
            return lambda function: add(function, target)
        if not callable(target):
            raise RegistrationError(f"@{self.name}.{role} needs a function or a message type")
        message = message_type(target, base, role)
        self._check_message(message, base, role)
        return add(target, message)

    def _check_message(self, message: type[Any], base: type[Any], role: str) -> None:
        if message is base:
            raise RegistrationError(
                f"@{self.name}.{role}: messages are routed by their exact type, so a function "
                f"for incident.{base.__name__} itself would never run; name a subclass"
            )
        if base is Command and "aggregate_id" not in message.__struct_fields__:
            raise RegistrationError(
                f"@{self.name}.{role}: {message.__name__} has no aggregate_id field, so it "
                "cannot name the stream it targets; add `aggregate_id: str`"
            )

    def upcast(self, event_type: str | type[Event], from_version: int) -> Callable[[U], U]:
        """Register ``fn(payload: dict) -> dict`` that turns a stored payload of schema
        version ``from_version`` into the shape of ``from_version + 1``. Chains apply in
        order on read, so version 1 data reaches version 3 through two upcasters."""
        name = event_type if isinstance(event_type, str) else event_type_name(event_type)
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise RegistrationError(f"{self.name}.upcast: from_version must be an int >= 1")

        def register(function: U) -> U:
            existing = self._upcasters.get((name, from_version))
            if existing is not None:
                raise RegistrationError(
                    f"{self.name}: {name} v{from_version} is already upcast by "
                    f"{existing.__qualname__}; cannot also register {function.__qualname__}"
                )
            self._upcasters[(name, from_version)] = function
            return function

        return register

    def terminal(self, predicate: T) -> T:
        """Register ``fn(state) -> bool``; once true, every command is rejected with
        ``aggregate_terminated`` (the stream is closed for good)."""
        if self._terminal is not None:
            raise RegistrationError(
                f"{self.name} already has the terminal predicate {self._terminal.__qualname__}"
            )
        self._terminal = predicate
        return predicate

    # -- introspection ------------------------------------------------------

    @property
    def command_types(self) -> tuple[type[Command], ...]:
        """The command types this aggregate executes, in registration order."""
        return tuple(self._executors)

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        """The event types this aggregate applies, in registration order."""
        return tuple(self._appliers)

    @property
    def appliers(self) -> dict[type[Event], Callable[[S, Any], S]]:
        """Event type -> its apply function (a copy)."""
        return dict(self._appliers)

    @property
    def upcasters(self) -> dict[tuple[str, int], Upcaster]:
        """(stored type name, from schema version) -> upcaster."""
        return dict(self._upcasters)

    def registered_functions(self) -> dict[str, str]:
        """Message name -> function qualname, for every registration (stable order):
        what a notebook shows to say what the aggregate handles."""
        pairs = [*self._executors.items(), *self._appliers.items()]
        return {message.__name__: function.__qualname__ for message, function in pairs}

    # -- the pure domain contract -------------------------------------------

    def decide(self, state: S, command: Command) -> list[Event]:
        """Run the registered execute function; raises ``Rejected`` when a rule says no."""
        executor = self._executors.get(type(command))
        if executor is None:
            raise RoutingError(
                f"{self.name} has no execute function for {type(command).__name__}; "
                f"it handles: {_names(self._executors)}"
            )
        if self._terminal is not None and self._terminal(state):
            raise Rejected(
                "aggregate_terminated",
                f"{self.name} {command.aggregate_id} has reached a terminal state and takes no "
                "commands",
            )
        decided = executor(state, command)
        if decided is None:
            raise RegistrationError(
                f"{executor.__qualname__} returned None; return an event, a list of events, "
                "or () to decide nothing"
            )
        if not isinstance(decided, Event | Iterable):
            raise RegistrationError(
                f"{executor.__qualname__} returned {decided!r}; return an event, a list of "
                "events, or () to decide nothing"
            )
        events = [decided] if isinstance(decided, Event) else list(decided)
        for event in events:
            if not isinstance(event, Event):
                raise RegistrationError(
                    f"{executor.__qualname__} returned {event!r}, which is not an incident.Event"
                )
            if type(event) not in self._appliers:
                raise RoutingError(
                    f"{executor.__qualname__} decided {type(event).__name__}, but {self.name} "
                    f"has no apply function for it; it applies: {_names(self._appliers)}"
                )
        return events

    def evolve(self, state: S, event: Event | Recorded[Event]) -> S:
        """Apply one event (or a Recorded envelope) to a state."""
        data = event.data if isinstance(event, Recorded) else event
        applier = self._appliers.get(type(data))
        if applier is None:
            raise RoutingError(
                f"{self.name} has no apply function for {type(data).__name__}; "
                f"it applies: {_names(self._appliers)}"
            )
        evolved = applier(state, data)
        if evolved is None:
            raise _returned_none(applier, data)
        return evolved

    def fold(self, events: Iterable[Event | Recorded[Event]], state: S | None = None) -> S:
        """The state after all ``events``, from ``state`` or the initial state: the
        ``functools.reduce`` of :meth:`evolve` over them."""
        return self.fold_count(events, self.initial if state is None else state)[0]

    def fold_count(self, events: Iterable[Event | Recorded[Event]], state: S) -> tuple[S, int]:
        """``(fold(events, state), how many events there were)``, for a caller that reads
        a stream once and needs its new version too.

        The same as reducing with :meth:`evolve`, written as a loop over local names:
        loading an aggregate spends its time here, one call per event, so it makes one
        call per event (the apply function) instead of two.
        """
        # keyed by any type: an envelope's type is simply not there
        applier_for: Callable[[type], Callable[[S, Any], S] | None] = self._appliers.get
        count = 0
        for count, event in enumerate(events, 1):  # the count is returned
            applier = applier_for(type(event))
            if applier is None:  # an envelope, or a type nobody applies
                data = event.data if isinstance(event, Recorded) else event
                applier = applier_for(type(data))
                if applier is None:
                    return self.evolve(state, data), count  # raises, naming what it applies
                event = data
            state = applier(state, event)
            if state is None:  # a forgotten return, caught at one comparison per event
                raise _returned_none(applier, event)
        return state, count

    def history(self, events: Iterable[Event | Recorded[Event]]) -> Iterator[S]:
        """One state per event: the state right after each of them."""
        states = accumulate(self.evolve, events, self.initial)
        next(states)  # the initial state comes before any event
        return states

    def handles(self, command: Command) -> bool:
        """Whether an execute function is registered for this command's exact type."""
        return type(command) in self._executors


def _returned_none(applier: Callable[..., Any], event: object) -> RegistrationError:
    return RegistrationError(
        f"{applier.__qualname__} returned None applying {type(event).__name__}; an apply "
        "function returns the new state (did it forget its return?)"
    )


def _names(registry: dict[Any, Any]) -> str:
    names = sorted(message.__name__ for message in registry)
    return ", ".join(names) if names else "nothing yet"
