"""msgspec encoding of events and validation of commands (msgspec constructors check
neither types nor constraints). The registry of stored event type names is
:class:`~incident.event_types.EventTypes`, importable from here too."""

import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from . import storable
from .errors import (
    IncidentError,
    InvalidCommand,
    Unstorable,
)
from .event_types import EventTypes
from .messages import Command

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
