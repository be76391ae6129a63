"""Refusing, when the command handler is built, a state type that would not come back
from a snapshot as it went in, with what to declare instead."""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import msgspec.inspect

from ..aggregate import Aggregate
from ..errors import RegistrationError
from .state import first_difference, round_trip

__all__ = ["check_snapshottable"]


def check_snapshottable(aggregate: Aggregate[Any]) -> None:
    """RegistrationError, saying what to declare, when the aggregate's state would not
    come back from a snapshot as it went in: a type msgspec cannot decode, a type that
    leaves something open (a bare dict, list, tuple or set, Any, object), or an initial
    state that changes on the way (encoded, decoded as ``state_type``, compared)."""
    name, state_type, initial = aggregate.name, aggregate.state_type, aggregate.initial
    declare = f"declare Aggregate({name!r}, initial=..., state_type=...)"
    try:
        info = msgspec.inspect.type_info(state_type)
    except (TypeError, ValueError) as error:
        raise RegistrationError(
            f"{name}: snapshots cannot decode the state type {state_type!r} ({error}); "
            f"{declare} with a type msgspec supports"
        ) from error
    open_at = _open_part(info, "state")
    if open_at is not None:
        where, cls = open_at
        if cls is not None:
            raise RegistrationError(
                f"{name}: snapshots cannot encode and decode {_type_text(cls)} (at {where}): "
                "msgspec does not know it; make the state a msgspec Struct, a dataclass or "
                "builtins, or leave snapshot_every unset"
            )
        raise RegistrationError(
            f"{name}: snapshots read the state back as {_type_text(state_type)}, which leaves "
            f"{where} open (a bare dict, list, tuple or set, Any or object comes back as "
            f"plain JSON: str keys, lists); {_advice(initial, where)}"
        )
    try:
        _, decoded = round_trip(initial, state_type)
    except (TypeError, msgspec.EncodeError) as error:
        raise RegistrationError(
            f"{name}: snapshots cannot encode the initial state {initial!r} ({error}); make "
            "the state a msgspec Struct, a dataclass or builtins, or leave snapshot_every unset"
        ) from error
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise RegistrationError(
            f"{name}: the initial state {initial!r} does not read back as "
            f"{_type_text(state_type)} ({error}); declare the state_type it has"
        ) from error
    difference = first_difference(decoded, initial)
    if difference is not None:
        path, back, before = difference
        raise RegistrationError(
            f"{name}: the initial state does not survive a snapshot: at {path}, {before!r} "
            f"reads back as {back!r}; declare the state_type it has (state_type=...), or "
            "an initial state of the declared type"
        )


_WITH_FIELDS = (
    msgspec.inspect.StructType
    | msgspec.inspect.DataclassType
    | msgspec.inspect.TypedDictType
    | msgspec.inspect.NamedTupleType
)


def _open_part(
    info: Any, path: str, seen: set[int] | None = None
) -> tuple[str, type | None] | None:
    """Where a type leaves the decoded value's type to JSON, with the class msgspec does
    not know if that is why (else None: Any, a bare container)."""
    seen = set() if seen is None else seen
    if id(info) in seen:
        return None
    seen.add(id(info))
    if isinstance(info, msgspec.inspect.AnyType):
        return path, None
    if isinstance(info, msgspec.inspect.CustomType):
        return path, info.cls
    children: list[tuple[str, Any]] = []
    if isinstance(info, msgspec.inspect.DictType):
        children = [(f"{path}'s keys", info.key_type), (f"{path}'s values", info.value_type)]
    elif isinstance(
        info,
        msgspec.inspect.ListType
        | msgspec.inspect.SetType
        | msgspec.inspect.FrozenSetType
        | msgspec.inspect.VarTupleType,
    ):
        children = [(f"{path}'s items", info.item_type)]
    elif isinstance(info, msgspec.inspect.TupleType):
        children = [(f"{path}[{i}]", item) for i, item in enumerate(info.item_types)]
    elif isinstance(info, msgspec.inspect.UnionType):
        children = [(path, member) for member in info.types]
    elif isinstance(info, msgspec.inspect.Metadata):  # Annotated[T, msgspec.Meta(...)]
        children = [(path, info.type)]
    elif isinstance(info, _WITH_FIELDS):
        children = [(f"{path}.{field.name}", field.type) for field in info.fields]
    for where, child in children:
        found = _open_part(child, where, seen)
        if found is not None:
            return found
    return None


def _type_text(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__qualname__
    return repr(hint).replace("typing.", "").replace("decimal.", "").replace("datetime.", "")


def _advice(initial: Any, where: str) -> str:
    """What to declare: for a builtin container, spelled from the initial state when it
    holds a sample of each part, else with placeholders and an example; for a class of
    the user's (whose own field is open), that field's type."""
    if type(initial) not in (dict, list, tuple, set, frozenset):
        return (
            f"give {where} a type that says what it holds (no Any, object or bare dict, "
            "list, tuple or set)"
        )
    spelled = _spell(initial)
    if "?" not in spelled:
        return f"declare state_type={spelled}"
    if isinstance(initial, dict):
        return "declare state_type=dict[K, V] with the key and value types, e.g. dict[int, Decimal]"
    return "declare the item type, e.g. state_type=list[int] or tuple[str, ...]"


def _spell(value: Any) -> str:
    """The type of a sample value, containers with their contents' types ("?" where a
    container is empty)."""
    if isinstance(value, dict):
        if not value:
            return "dict[?, ?]"
        key, item = next(iter(value.items()))
        return f"dict[{_spell(key)}, {_spell(item)}]"
    if isinstance(value, tuple) and type(value) is tuple:
        return f"tuple[{', '.join(_spell(item) for item in value)}]" if value else "tuple[?]"
    if isinstance(value, list | set | frozenset):
        inside = _spell(next(iter(value))) if value else "?"
        return f"{type(value).__name__}[{inside}]"
    try:
        known = msgspec.inspect.type_info(type(value))
    except (TypeError, ValueError):
        return "?"
    unknown = msgspec.inspect.AnyType | msgspec.inspect.CustomType
    return "?" if isinstance(known, unknown) else type(value).__qualname__
