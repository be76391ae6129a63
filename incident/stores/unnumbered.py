"""Envelopes whose positions are not known yet, and whether an append's inline work
looked at them.

A store that lets the database number an append (the Postgres store under many writer
processes: the position is only known once the append lock is granted, and waiting for
it in the client would hold the lock across a round trip) must first know that nothing
it sends depends on the positions. So the inline handlers run once on envelopes whose
positions are placeholders: any use of one (arithmetic, comparison, hashing, formatting,
``int()``) marks the run as position-dependent and raises, and the store then appends
the ordinary way, numbering in the client. A placeholder merely copied into a row is
found when the row is encoded (msgspec does not know the type); one copied into owed
work is what the store expects, and the database adds the position."""

from __future__ import annotations

from typing import Any

import msgspec

from ..messages import Recorded


class PositionNotKnownYet(TypeError):
    """Raised by a placeholder position when inline work uses it."""


class Placeholders:
    """The placeholders of one append; ``used`` once any of them was looked at."""

    def __init__(self) -> None:
        self.used = False

    def stand_in(self, recorded: list[Recorded[Any]]) -> list[Recorded[Any]]:
        """The envelopes with placeholder positions (1 for the first, and so on)."""
        return [
            msgspec.structs.replace(record, position=Unnumbered(offset, self))
            for offset, record in enumerate(recorded, 1)
        ]


class Unnumbered:
    """A position the database has not given yet: ``offset`` is its place in the append
    (1 for the first event). Using it in any way marks its append's placeholders used."""

    __slots__ = ("_of", "offset")

    def __init__(self, offset: int, placeholders: Placeholders) -> None:
        self.offset = offset
        self._of = placeholders

    def __repr__(self) -> str:
        self._of.used = True
        return f"<position {self.offset} of an append, not known yet>"


def _refuse(name: str) -> Any:
    def used(self: Unnumbered, *args: Any) -> Any:
        self._of.used = True
        raise PositionNotKnownYet(f"the position is not known yet ({name})")

    used.__name__ = name
    return used


# every way Python code can look at a number
_NUMBER_METHODS = (
    "__index__ __int__ __float__ __complex__ __bool__ __hash__ __str__ __format__ __round__"
    " __trunc__ __floor__ __ceil__ __abs__ __neg__ __pos__ __invert__"
    " __eq__ __ne__ __lt__ __le__ __gt__ __ge__"
    " __add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__"
    " __floordiv__ __rfloordiv__ __mod__ __rmod__ __divmod__ __rdivmod__ __pow__ __rpow__"
    " __lshift__ __rlshift__ __rshift__ __rrshift__ __and__ __rand__ __or__ __ror__"
    " __xor__ __rxor__"
)
for _name in _NUMBER_METHODS.split():
    setattr(Unnumbered, _name, _refuse(_name))
