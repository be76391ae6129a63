"""A state as a snapshot holds it: encoded as JSON, decoded as the aggregate's
``state_type``, and compared with the state it was made from, types included."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import msgspec

__all__ = ["MISSING", "first_difference", "round_trip", "state_decoder"]


@functools.lru_cache(maxsize=256)
def state_decoder(state_type: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(state_type)


def round_trip(state: Any, state_type: Any) -> tuple[str, Any]:
    """The state as JSON and as it reads back (raises what msgspec raises)."""
    encoded = msgspec.json.encode(state)
    return encoded.decode(), state_decoder(state_type).decode(encoded)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def first_difference(left: Any, right: Any, path: str = "state") -> tuple[str, Any, Any] | None:
    """The first place where two states differ, types included (``1`` is not ``1.0``
    nor ``'1'``, a tuple is not a list): ``(path, left value, right value)``, or None."""
    if type(left) is not type(right):
        return path, left, right
    pairs: Iterator[tuple[str, Any, Any]]
    if isinstance(left, msgspec.Struct):
        pairs = (
            (f"{path}.{name}", getattr(left, name, MISSING), getattr(right, name, MISSING))
            for name in left.__struct_fields__
        )
    elif isinstance(left, dict):
        keys = [*left, *(key for key in right if key not in left)]
        pairs = (  # a key on one side only is a difference too
            (f"{path}[{key!r}]", left.get(key, MISSING), right.get(key, MISSING)) for key in keys
        )
    elif isinstance(left, list | tuple):
        if len(left) != len(right):
            return path, left, right
        pairs = ((f"{path}[{i}]", a, b) for i, (a, b) in enumerate(zip(left, right, strict=True)))
    elif isinstance(left, set | frozenset):
        if left != right or any(
            type(a) is not type(b)
            for a, b in zip(sorted(left, key=repr), sorted(right, key=repr), strict=True)
        ):
            return path, left, right
        return None
    elif hasattr(left, "__dataclass_fields__"):
        pairs = (
            (f"{path}.{name}", getattr(left, name, MISSING), getattr(right, name, MISSING))
            for name in left.__dataclass_fields__
        )
    else:
        return None if left == right else (path, left, right)
    for where, a, b in pairs:
        found = first_difference(a, b, where)
        if found is not None:
            return found
    return None
