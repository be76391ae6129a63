"""msgspec encoding of events, the registry that turns stored names back into types,
and validation of commands (msgspec constructors check neither types nor constraints)."""

import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, Union

import msgspec

from .errors import CorruptEvent, IncidentError, InvalidCommand, UnknownEventType
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


class EventTypes:
    """Resolves stored event type names to Event classes, with one reused decoder each.

    Types registered here (by a command handler, from its aggregates) win; any other
    name falls back to the Event subclasses defined in the process, the latest
    definition winning, so a notebook can redefine a class and keep reading.
    """

    def __init__(self, types: Iterable[type[Event]] = ()) -> None:
        self._types: dict[str, type[Event]] = {}
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        self._batch_decoder: msgspec.json.Decoder[list[Any]] | None = None
        self.register(*types)

    def register(self, *types: type[Event]) -> None:
        for event_type in types:
            name = event_type_name(event_type)
            self._types[name] = event_type
            self._decoders.pop(name, None)
            self._batch_decoder = None

    def resolve(self, name: str) -> type[Event] | None:
        found = self._types.get(name)
        if found is None:
            found = _defined_event_types().get(name)
        return found

    def names(self) -> set[str]:
        return set(self._types) | set(_defined_event_types())

    def decoder(self, name: str, *, position: int | None = None) -> msgspec.json.Decoder[Any]:
        decoder = self._decoders.get(name)
        if decoder is None:
            event_type = self.resolve(name)
            if event_type is None:
                raise UnknownEventType(name, self.names(), position)
            decoder = self._decoders[name] = msgspec.json.Decoder(event_type)
        return decoder

    def decode_batch(self, payloads: list[str]) -> list[Event] | None:
        """Decode many stored payloads in one call: one reused decoder of a JSON array of
        the tagged union of the registered types (each payload carries its tag). None when
        any payload is not one of them or is damaged: the caller then decodes row by row,
        which resolves other names and says exactly where the damage is.

        >>> class Opened(Event):
        ...     number: str
        >>> EventTypes([Opened]).decode_batch(['{"type":"Opened","number":"A1"}'])
        [Opened(number='A1')]
        >>> EventTypes([Opened]).decode_batch(['{"type":"Closed"}']) is None
        True
        """
        decoder = self._batch_decoder
        if decoder is None:
            if not self._types:
                return None
            union = Union[tuple(self._types.values())]  # type: ignore[valid-type]  # noqa: UP007
            try:
                decoder = msgspec.json.Decoder(list[union])  # type: ignore[valid-type]
            except TypeError:  # types that cannot share one union (different tag fields)
                return None
            self._batch_decoder = decoder
        try:
            events: list[Event] = decoder.decode("[" + ",".join(payloads) + "]")
        except (msgspec.DecodeError, msgspec.ValidationError, TypeError):
            return None
        # a damaged payload could merge with or split its neighbours: the count must hold
        return events if len(events) == len(payloads) else None

    def decode(
        self, name: str, data: bytes | str, *, position: int | None = None, aggregate_id: str = ""
    ) -> Event:
        """Decode one stored payload; a bad payload raises CorruptEvent naming where it is."""
        decoder = self.decoder(name, position=position)
        try:
            event: Event = decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise CorruptEvent(position, aggregate_id, str(error)) from error
        return event


def _subclasses(cls: type[Event]) -> Iterable[type[Event]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _defined_event_types() -> dict[str, type[Event]]:
    found: dict[str, type[Event]] = {}
    for sub in _subclasses(Event):
        tag = sub.__struct_config__.tag
        if isinstance(tag, str):
            found[tag] = sub  # later definitions win
    return found


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
    """Check a command against its own type: field types and ``msgspec.Meta`` constraints.

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
        msgspec.convert(msgspec.to_builtins(command), type(command))
    except msgspec.ValidationError as error:
        raise _invalid(type(command), error) from None
    return command


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
