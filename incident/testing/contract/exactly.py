"""What "comes back equal" means in the contract: ``==`` and more, since ``==`` takes
``1`` for ``True``, ``10.0`` for ``10``, ``0.0`` for ``-0.0``, ``Decimal("1.0")`` for
``Decimal("1.00")`` and an instant at one offset for the same instant at another, and a
store keeps each of these as written (docs/storable.md)."""

from __future__ import annotations

import datetime as dt
import decimal
import math
from typing import Any

import msgspec

__all__ = ["same_value"]

# docs/storable.md, "Known limit": Postgres reads a whole float written with an exponent
# (1e16 and up) back, in an Any field or in metadata, as the equal int
_EXPONENT_FROM = 1e16


def same_value(expected: Any, got: Any) -> bool:
    """Whether ``got`` is ``expected`` as a store must give it back: of the same type
    throughout (bool, int and float apart), floats with their sign, datetimes and times
    with their UTC offset, decimals with their digits; containers and structs alike."""
    if isinstance(expected, float) and type(got) is int:
        return abs(expected) >= _EXPONENT_FROM and expected == got
    if type(expected) is not type(got):
        return False
    if isinstance(expected, msgspec.Struct):
        return all(
            same_value(getattr(expected, name), getattr(got, name))
            for name in expected.__struct_fields__
        )
    if isinstance(expected, list | tuple):
        return len(expected) == len(got) and all(map(same_value, expected, got))
    if isinstance(expected, dict):
        return expected.keys() == got.keys() and all(
            same_value(value, got[key]) for key, value in expected.items()
        )
    if isinstance(expected, float):
        return expected == got and math.copysign(1.0, expected) == math.copysign(1.0, got)
    if isinstance(expected, dt.datetime | dt.time):
        return bool(expected == got and expected.utcoffset() == got.utcoffset())
    if isinstance(expected, decimal.Decimal):
        return str(expected) == str(got)
    return bool(expected == got)
