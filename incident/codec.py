"""msgspec encoding of events, the registry that turns stored names back into types,
and validation of commands (msgspec constructors check neither types nor constraints)."""

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, Union

import msgspec

from . import messages, storable
from .errors import (
    CorruptEvent,
    IncidentError,
    InvalidCommand,
    RegistrationError,
    UnknownEventType,
    Unstorable,
)
from .messages import Command, Event, event_type_name

__all__ = [
    "EventTypes",
    "decode_command",
    "encode",
    "validate_command",
]

C = TypeVar("C", bound=Command)

_encoder = msgspec.json.Encoder()
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def encode(value: Any) -> bytes:
    """JSON bytes for an event, a projection or metadata (msgspec only; never pickle)."""
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as error:
        raise IncidentError(f"Cannot store {value!r} as JSON: {error}") from error


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class EventTypes:
    """Resolves stored event type names to Event classes, with one reused decoder each.

    Resolution is explicit first: a name registered here (by every command handler on
    the store, from its aggregates, see :meth:`include`) always reads as its registered
    class, and one name belongs to one class: a second class under it is refused with a
    RegistrationError naming both, whoever registers it. Only a name nobody registered
    falls back, as a last resort, to the Event subclasses defined in the process (the
    latest definition still reachable from its module winning), so a notebook or the CLI
    can read a log without registering anything; the fallback never shadows a
    registered name.
    """

    def __init__(self, types: Iterable[type[Event]] = ()) -> None:
        self._types: dict[str, type[Event]] = {}
        self._owners: dict[str, str | None] = {}  # who registered each name, if said
        self._decoders: dict[type[Event], msgspec.json.Decoder[Any]] = {}
        self._upcasters: dict[tuple[str, int], tuple[Upcaster, str | None]] = {}
        self._batch: msgspec.json.Decoder[list[Any]] | None = None
        self._batch_names: dict[type[Event], str] = {}
        self.register(*types)

    def register(self, *types: type[Event], owner: str | None = None) -> None:
        """Register event classes under their stored names, all or none. A name belongs
        to one class: another class stored under it is refused (RegistrationError naming
        both, and both owners when given: the aggregates that apply them). The one
        exception is the same class defined again (same module and qualified name: a
        notebook cell run twice) registered again by the same owner, which takes over.

        >>> class Opened(Event):
        ...     number: str
        >>> types = EventTypes()
        >>> types.register(Opened, owner="account")
        >>> class Other(Event, tag="Opened"):
        ...     pass
        >>> types.register(Other, owner="ledger")
        Traceback (most recent call last):
        ...
        incident.errors.RegistrationError: account and ledger both store an event as 'Opened' ...
        """
        claimed: dict[str, type[Event]] = {}
        for event_type in types:
            name = event_type_name(event_type)
            first = claimed.setdefault(name, event_type)
            if first is not event_type:  # two classes in one registration never take over
                raise _clash(name, first, owner, event_type, owner)
            self._check(name, event_type, owner)
        for name, event_type in claimed.items():
            self._types[name] = event_type
            self._owners[name] = owner or self._owners.get(name)
        if claimed:
            self._batch = None

    def register_upcaster(
        self, name: str, from_version: int, upcaster: Upcaster, *, owner: str | None = None
    ) -> None:
        """Use ``upcaster`` on payloads of ``name`` stored at schema version
        ``from_version``. One step has one upcaster: another function for it is refused
        (RegistrationError), unless it is the same function defined again by the same
        owner, as for event classes."""
        self._check_upcaster(name, from_version, upcaster, owner)
        self._upcasters[(name, from_version)] = (upcaster, owner)

    def include(self, other: "EventTypes") -> None:
        """Register everything ``other`` registers, with its owners, all or none: how a
        command handler adds its aggregates' types to the registry of a store that other
        command handlers may share (a name one of them registered is never overwritten
        by another's class)."""
        for name, event_type in other._types.items():
            self._check(name, event_type, other._owners.get(name))
        for (name, version), (upcaster, owner) in other._upcasters.items():
            self._check_upcaster(name, version, upcaster, owner)
        for name, event_type in other._types.items():
            self.register(event_type, owner=other._owners.get(name))
        for (name, version), (upcaster, owner) in other._upcasters.items():
            self._upcasters[(name, version)] = (upcaster, owner)

    def _check(self, name: str, event_type: type[Event], owner: str | None) -> None:
        known = self._types.get(name)
        if known is None or known is event_type:
            return
        known_owner = self._owners.get(name)
        if _place(known) == _place(event_type) and (
            owner is None or known_owner is None or owner == known_owner
        ):
            return  # defined again (a notebook cell run twice): it takes over
        raise _clash(name, known, known_owner, event_type, owner)

    def _check_upcaster(
        self, name: str, version: int, upcaster: Upcaster, owner: str | None
    ) -> None:
        known = self._upcasters.get((name, version))
        if known is None or known[0] is upcaster:
            return
        known_owner = known[1]
        if _place(known[0]) == _place(upcaster) and (
            owner is None or known_owner is None or owner == known_owner
        ):
            return
        raise RegistrationError(
            f"{_place(known[0])} ({known_owner or 'registered first'}) and {_place(upcaster)} "
            f"({owner or 'registered now'}) both upcast {name!r} from schema version "
            f"{version}; one store reads each stored payload one way: keep one of them"
        )

    def decode_batch(
        self, payloads: list[str | None], names: list[str] | None = None
    ) -> list[Event] | None:
        """Decode many stored payloads in one call: one reused decoder of a JSON array of
        the registered types' tagged union (each payload carries its tag). None when any
        payload is not one of them, is damaged or is None: the caller then decodes row by
        row by type name, which resolves unregistered names and says where the damage
        is. It never upcasts, so it is only used while every registered type is at its
        first schema version; a store passes None for a payload stored at another one.
        ``names``, the stored type names, must each agree with the tag its payload was
        decoded by: a payload of another type's shape is not read as that type.

        >>> class Opened(Event):
        ...     number: str
        >>> EventTypes([Opened]).decode_batch(['{"type":"Opened","number":"A1"}'])
        [Opened(number='A1')]
        >>> EventTypes([Opened]).decode_batch(['{"type":"Closed"}']) is None
        True
        >>> EventTypes([Opened]).decode_batch(['{"type":"Opened","number":"A1"}'], ["Closed"])
        """
        try:
            joined = ",".join(payloads)  # type: ignore[arg-type]  # a None raises TypeError
        except TypeError:  # a payload stored at another schema version
            return None
        events = self.decode_joined(joined, len(payloads))
        if (
            events is not None
            and names is not None
            and list(map(self._batch_names.__getitem__, map(type, events))) != names
        ):
            return None  # a tag that disagrees with its row's type: row by row names it
        return events

    def decode_joined(self, joined: str, count: int) -> list[Event] | None:
        """:meth:`decode_batch` of payloads already joined by commas (a store that joins
        them in SQL hands over one string instead of ``count``): the ``count`` events,
        or None when they are not exactly ``count`` events of the registered types.

        >>> class Opened(Event):
        ...     number: str
        >>> EventTypes([Opened]).decode_joined('{"type":"Opened","number":"A1"}', 1)
        [Opened(number='A1')]
        """
        decoder = self._batch
        if decoder is None:
            if not self._types or any(t.schema_version != 1 for t in self._types.values()):
                return None  # nothing to decode to, or payloads that may need upcasting
            union = Union[tuple(self._types.values())]  # type: ignore[valid-type]  # noqa: UP007
            try:
                decoder = msgspec.json.Decoder(list[union])  # type: ignore[valid-type]
            except TypeError:  # types that cannot share one union (different tag fields)
                return None
            self._batch = decoder
            self._batch_names = {cls: name for name, cls in self._types.items()}
        try:
            events: list[Event] = decoder.decode(f"[{joined}]")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        # a damaged payload could merge with or split its neighbours: the count must hold
        return events if len(events) == count else None

    def resolve(self, name: str) -> type[Event] | None:
        """The class for a stored name: the registered one; for a name nobody registered,
        the latest defined (the fallback); else None."""
        found = self._types.get(name)
        if found is None:
            found = _defined_event_type(name)
        return found

    def registered(self) -> dict[str, type[Event]]:
        """Stored name -> the class registered under it (a copy; no fallback names)."""
        return dict(self._types)

    def names(self) -> set[str]:
        """Every stored name this registry can resolve: the registered ones, and those the
        fallback to the classes defined in the process finds."""
        return set(self._types) | set(_candidates())

    def decoder(
        self, name: str, *, position: int | None = None, aggregate_id: str = ""
    ) -> msgspec.json.Decoder[Any]:
        """A reusable JSON decoder for a stored name; UnknownEventType if nothing resolves it."""
        event_type = self._types.get(name)
        if event_type is None:
            # not registered: resolve again every time, so a redefinition is picked up
            event_type = _defined_event_type(name)
            if event_type is None:
                raise UnknownEventType(name, self.names(), position, aggregate_id)
        decoder = self._decoders.get(event_type)
        if decoder is None:
            decoder = self._decoders[event_type] = msgspec.json.Decoder(event_type)
        return decoder

    def decode(
        self,
        name: str,
        data: bytes | str,
        *,
        position: int | None = None,
        aggregate_id: str = "",
        schema_version: int | None = None,
    ) -> Event:
        """Decode one stored payload, upcasting it first when it was stored at an older
        schema version; a bad payload raises CorruptEvent naming where it is."""
        decoder = self.decoder(name, position=position, aggregate_id=aggregate_id)
        try:
            if schema_version is not None:
                current = self._types.get(name) or self.resolve(name)
                if current is not None and schema_version != current.schema_version:
                    return self._upcast(name, data, schema_version, current, position, aggregate_id)
            event: Event = decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise CorruptEvent(position, aggregate_id, str(error), event_type=name) from error
        return event

    def _upcast(
        self,
        name: str,
        data: bytes | str,
        stored: int,
        event_type: type[Event],
        position: int | None,
        aggregate_id: str,
    ) -> Event:
        target = event_type.schema_version
        if stored > target:
            raise CorruptEvent(
                position,
                aggregate_id,
                f"{name} was stored at schema version {stored}, newer than this code's {target}",
            )
        payload = msgspec.json.decode(data)
        for version in range(stored, target):
            found = self._upcasters.get((name, version))
            if found is None:
                raise CorruptEvent(
                    position,
                    aggregate_id,
                    f"{name} is stored at schema version {version} and no upcaster brings it "
                    f"to {version + 1}; register one with @aggregate.upcast({name!r}, {version})",
                )
            upcaster = found[0]
            try:
                payload = upcaster(payload)
            except Exception as error:  # the stored payload is not what the upcaster expects
                raise CorruptEvent(
                    position,
                    aggregate_id,
                    f"{getattr(upcaster, '__qualname__', upcaster)} could not bring {name} from "
                    f"schema version {version} to {version + 1}: {error!r}",
                ) from error
        event: Event = msgspec.convert(payload, event_type)
        return event


def _place(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _clash(
    name: str,
    known: type[Event],
    known_owner: str | None,
    event_type: type[Event],
    owner: str | None,
) -> RegistrationError:
    """The error for two classes under one stored name, naming both (and their owners)."""
    if known_owner is not None and owner is not None:
        suggested = f"{owner.title().replace('_', '')}{event_type.__name__}"
        return RegistrationError(
            f"{known_owner} and {owner} both store an event as {name!r} ({_place(known)} and "
            f"{_place(event_type)}); a store could not tell them apart: give one a name of "
            f'its own, e.g. class {event_type.__name__}(incident.Event, tag="{suggested}")'
        )
    return RegistrationError(
        f"{_place(event_type)} and {_place(known)} would both be stored as {name!r}, and one "
        f"store cannot tell them apart; give one a name of its own: "
        f"class {event_type.__name__}(incident.Event, tag=...)"
    )


def _subclasses(cls: type[Event]) -> Iterable[type[Event]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_defined: tuple[int, dict[str, list[type[Event]]]] = (-1, {})


def _reachable(cls: type[Event]) -> bool:
    """Whether the class is still what its module exports under its name: false for a
    class a notebook cell has since redefined, or whose module has gone away."""
    module = sys.modules.get(cls.__module__)
    if module is None:
        return False
    if "<locals>" in cls.__qualname__:
        return True  # defined in a function: nothing to compare it with
    found: Any = module
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is cls


def _candidates() -> dict[str, list[type[Event]]]:
    """Stored name -> every Event subclass defined under it, oldest first (recomputed only
    after a new Event subclass has been defined)."""
    global _defined
    generation = messages._event_classes_defined
    if _defined[0] != generation:
        found: dict[str, list[type[Event]]] = {}
        for sub in _subclasses(Event):
            tag = sub.__struct_config__.tag
            if isinstance(tag, str):
                found.setdefault(tag, []).append(sub)
        _defined = (generation, found)
    return _defined[1]


def _defined_event_type(name: str) -> type[Event] | None:
    """The class to read a stored name as: the latest defined among those still reachable
    from their module, else the latest defined, else None."""
    candidates = _candidates().get(name)
    if not candidates:
        return None
    return next((c for c in reversed(candidates) if _reachable(c)), candidates[-1])


def _invalid(command_type: type[Any], error: msgspec.ValidationError) -> InvalidCommand:
    message = str(error)
    match = _PATH.search(message)
    field = match.group("path") if match else None
    problem = message[: match.start()] if match else message
    if missing := re.search(r"missing required field `([^`]+)`", message):
        field = ".".join(filter(None, [field, missing.group(1)]))
        problem = f"missing required field `{field}`"
    return InvalidCommand(command_type.__name__, field or None, problem)


def validate_command(command: C) -> C:
    """Check a command against its own type: field types and ``msgspec.Meta`` constraints,
    and that its data is storable (finite floats, str without NUL or lone surrogates,
    nesting at most ``storable.MAX_DEPTH`` deep: see docs/storable.md).

    >>> from typing import Annotated
    >>> class Deposit(Command):
    ...     aggregate_id: str
    ...     amount: Annotated[int, msgspec.Meta(gt=0)]
    >>> validate_command(Deposit(aggregate_id="a", amount=0))
    Traceback (most recent call last):
    ...
    incident.errors.InvalidCommand: Invalid Deposit: Expected `int` >= 1 - at `amount`
    """
    if not isinstance(command, Command):
        raise InvalidCommand(type(command).__name__, None, "not an incident.Command")
    try:
        converted = msgspec.convert(msgspec.to_builtins(command), type(command))
    except msgspec.ValidationError as error:
        raise _invalid(type(command), error) from None
    except (RecursionError, UnicodeEncodeError):
        converted = None  # too deep, or a lone surrogate in a key: the check below names it
    except (TypeError, msgspec.EncodeError) as error:  # a value msgspec cannot represent
        field = next(
            (
                name
                for name in command.__struct_fields__
                if not _representable(getattr(command, name))
            ),
            None,
        )
        raise InvalidCommand(type(command).__name__, field, str(error)) from None
    try:
        storable.checked_json(command, type(command).__name__)
    except Unstorable as error:
        raise InvalidCommand(type(command).__name__, error.field, error.rule) from None
    mismatch = _mismatch(command, converted, "") if converted != command else None
    if mismatch is not None:
        # a value that only passed because JSON spells it as a string (a str for a date,
        # a UUID or a Decimal) or as an array (a list for a tuple): the type is still wrong
        path, value, expected = mismatch
        problem = f"Expected `{type(expected).__name__}`, got `{type(value).__name__}`"
        raise InvalidCommand(type(command).__name__, path or None, problem)
    return command


# What a loosely declared field (Any, object, dict[str, Any]) converts back into: when the
# round trip lands on one of these, the declared type did not ask for anything richer.
_JSON_TYPES = (str, int, float, bool, type(None), list, dict)


def _mismatch(original: Any, converted: Any, path: str) -> tuple[str, Any, Any] | None:
    """The path to the first value that converting to its declared type turned into a richer
    type (a date from a str, a tuple from a list), with both values; None if there is none."""
    if type(original) is not type(converted):
        return None if type(converted) in _JSON_TYPES else (path, original, converted)
    pairs: Iterable[tuple[str, Any, Any]] = ()
    if isinstance(original, msgspec.Struct):
        pairs = (
            (f"{path}.{name}" if path else name, getattr(original, name), getattr(converted, name))
            for name in original.__struct_fields__
        )
    elif isinstance(original, list | tuple):
        pairs = (
            (f"{path}[{i}]", a, b)
            for i, (a, b) in enumerate(zip(original, converted, strict=False))
        )
    elif isinstance(original, dict):
        pairs = ((f"{path}[{k!r}]", original[k], converted[k]) for k in original if k in converted)
    for where, a, b in pairs:
        if a is not b and a != b and (found := _mismatch(a, b, where)) is not None:
            return found
    return None


def _representable(value: Any) -> bool:
    try:
        msgspec.to_builtins(value)
    except (TypeError, msgspec.EncodeError):
        return False
    return True


def decode_command(command_type: type[C], data: bytes | str | Mapping[str, Any]) -> C:
    """Build a command from outside data (JSON text or a dict), or raise InvalidCommand.

    >>> class Open(Command):
    ...     aggregate_id: str
    >>> decode_command(Open, '{"aggregate_id": "A1"}')
    Open(aggregate_id='A1')
    >>> decode_command(Open, {})
    Traceback (most recent call last):
    ...
    incident.errors.InvalidCommand: Invalid Open: missing required field `aggregate_id`
    """
    try:
        if isinstance(data, bytes | str):
            return msgspec.json.decode(data, type=command_type)
        return msgspec.convert(dict(data), command_type)
    except msgspec.ValidationError as error:
        raise _invalid(command_type, error) from None
    except msgspec.DecodeError as error:
        raise InvalidCommand(command_type.__name__, None, f"not valid JSON ({error})") from None
