"""Ids and times stamped on what incident writes: random UUIDs made cheaply in bulk, and
the current time in UTC."""

from __future__ import annotations

import collections
import datetime as dt
import os

from ._forks import renew_in_forked_children

__all__ = ["new_uuid", "utc_now"]


def utc_now() -> dt.datetime:
    """Now, as an aware datetime in UTC."""
    return dt.datetime.now(dt.UTC)


# Random UUIDs made 128 at a time: one os.urandom call per 128 ids instead of one each
# (every command makes two). deque.popleft is atomic, so threads never share an id, and
# a forked child drops what its parent had drawn, so processes never share one either.
_UUIDS_PER_DRAW = 128
_drawn_uuids: collections.deque[str] = collections.deque()
renew_in_forked_children(_drawn_uuids.clear)
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def _draw_uuids() -> None:
    digits = os.urandom(16 * _UUIDS_PER_DRAW).hex()
    _drawn_uuids.extend(
        # the version nibble set to 4 and the variant's two bits to 10 (RFC 4122)
        f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"
        for h in (digits[i : i + 32] for i in range(0, len(digits), 32))
    )


def new_uuid() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` spells it, from the
    operating system's random source like ``uuid.uuid4()``, without a UUID object."""
    while True:  # other threads may take every id drawn here before this one does
        try:
            return _drawn_uuids.popleft()
        except IndexError:
            _draw_uuids()  # two threads may both draw: the spare ids wait for next calls
