"""The values the event store contract round-trips: an event of every field kind, and
strategies of them and of plain JSON."""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import msgspec
from hypothesis import strategies as st

from ...messages import Event

__all__ = ["EVERYTHING", "JSON_VALUES", "LOOKALIKES", "TEXT", "Everything", "Nested"]


class Nested(msgspec.Struct):
    """A struct inside an event, with the kinds JSON spells as strings."""

    label: str
    at: dt.datetime
    amount: decimal.Decimal


class Everything(Event):
    """An event with a field of every kind a store must give back equal."""

    text: str
    number: int
    ratio: float
    flag: bool
    nothing: None
    items: list[Any]
    mapping: dict[str, Any]
    nested: Nested
    maybe: int | None
    loose: Any


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_FLOATS = st.floats(allow_nan=False, allow_infinity=False)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | _FLOATS | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
# offsets of whole minutes: ISO 8601 keeps no seconds, so others are refused (tested too)
_DATETIMES = st.datetimes(timezones=st.none() | st.timezones()).filter(
    lambda d: not (d.utcoffset() or dt.timedelta(0)) % dt.timedelta(minutes=1)
)
EVERYTHING = st.builds(
    Everything,
    text=TEXT,
    number=st.integers(),
    ratio=_FLOATS,
    flag=st.booleans(),
    nothing=st.none(),
    items=st.lists(JSON_VALUES, max_size=3),
    mapping=st.dictionaries(TEXT, JSON_VALUES, max_size=3),
    nested=st.builds(
        Nested,
        label=TEXT,
        at=_DATETIMES,
        amount=st.decimals(allow_nan=False, allow_infinity=False),
    ),
    maybe=st.none() | st.integers(-(2**63), 2**63 - 1),
    loose=JSON_VALUES,
)

# values that == takes for others (True for 1, 0.0 for -0.0, one instant at two offsets)
LOOKALIKES = Everything(
    text="",
    number=1,
    ratio=-0.0,
    flag=True,
    nothing=None,
    items=[True, 1, 1.0, -0.0, 2**70],
    mapping={"at": "2024-01-01T12:00:00+01:00"},
    nested=Nested(
        label="x",
        at=dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        amount=decimal.Decimal("1.10"),
    ),
    maybe=0,
    loose=False,
)
