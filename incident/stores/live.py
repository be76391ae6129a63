"""Following the log live: ``store.subscribe(after=N)`` yields every event after position
N, then each new one as it commits, in order, forever (until the caller stops).

It is ``read_all`` in a loop: the log's positions are gapless and in commit order on
every store (Postgres numbers appends under one lock, SQLite has one writer at a time),
so reading on from the last position seen can neither skip nor repeat an event. Between
reads it waits for a wake-up: the store's own (memory: a condition; Postgres:
LISTEN/NOTIFY; SQLite: a signal the appends of this process give), and, as the safety
net for a wake-up that never comes (an append of another process to an SQLite file, a
lost notification), a poll every ``poll_interval`` seconds.

>>> import incident
>>> from incident.examples import bank
>>> store = incident.open_event_store("memory://")
>>> _ = store.append("A", [bank.MoneyDeposited(amount=5)], expected_version=0)
>>> live = store.subscribe(after=0)
>>> next(live).data
MoneyDeposited(amount=5)
>>> _ = store.append("A", [bank.MoneyDeposited(amount=7)], expected_version=1)
>>> next(live).position
2
>>> live.close()
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .._forks import renew_in_forked_children
from ..errors import InvalidArgument
from ..messages import Recorded
from ..options import check_count

__all__ = ["AppendSignal", "Live", "checked_tail_arguments", "follow", "signal_for"]

POLL_INTERVAL = 1.0  # seconds between reads when no wake-up comes
BATCH_SIZE = 500  # events read per query while catching up


class _Log(Protocol):
    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]: ...

    def wait_for_append(self, after: int, timeout: float) -> bool: ...


def follow(
    store: _Log,
    after: int = 0,
    *,
    poll_interval: float = POLL_INTERVAL,
    batch_size: int = BATCH_SIZE,
) -> Iterator[Recorded[Any]]:
    """Every event of ``store``'s log after position ``after``, then every new one as
    it commits; see the module's docstring. Stop it with ``close()`` or by leaving the
    loop; a store that fails (closed, unreachable) raises out of it."""
    checked_tail_arguments(after, poll_interval, batch_size)
    return _follow(store, after, poll_interval, batch_size)


def checked_tail_arguments(after: Any, poll_interval: Any, batch_size: Any) -> None:
    """InvalidArgument (a ValueError) for a tail's bad arguments, sync or async, before
    it starts."""
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InvalidArgument(f"after must be a position (an int >= 0), got {after!r}")
    # an endless one would overflow the first wait: a wake-up that never came, never read
    if not isinstance(poll_interval, int | float) or not 0 < poll_interval < math.inf:
        raise InvalidArgument(
            f"poll_interval must be > 0 seconds and finite, got {poll_interval!r}"
        )
    check_count("batch_size", batch_size, 1)


def _follow(
    store: _Log, position: int, poll_interval: float, batch_size: int
) -> Iterator[Recorded[Any]]:
    while True:
        read = 0
        for recorded in store.read_all(after=position, limit=batch_size):
            position = recorded.position
            read += 1
            yield recorded
        if read < batch_size:  # caught up: wait for the next append, or the poll
            store.wait_for_append(position, poll_interval)


class Live:
    """``subscribe`` for an event store class to inherit (it has ``read_all`` and
    ``wait_for_append``)."""

    def subscribe(
        self: _Log,
        after: int = 0,
        *,
        poll_interval: float = POLL_INTERVAL,
        batch_size: int = BATCH_SIZE,
    ) -> Iterator[Recorded[Any]]:
        """The log after position ``after``, then each event as it commits, in order,
        never skipping one: a live tail (``for recorded in store.subscribe(after=N)``).
        It runs until the caller stops it; checkpoints, parking and retries are the
        durable :class:`~incident.Subscription`'s."""
        return follow(self, after, poll_interval=poll_interval, batch_size=batch_size)


class AppendSignal:
    """Wakes this process's waiting readers when an append commits (where the store has
    no wake-up of its own). ``appended()`` after each commit; ``wait(timeout, arrived)``
    returns once ``arrived()`` is true or ``timeout`` passes (checked again after each
    signal, so a signal that came before the wait began is not missed)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._count = 0
        renew_in_forked_children(self._renew)

    def _renew(self) -> None:
        """A forked child's own condition: a parent's thread may have held this one."""
        self._changed = threading.Condition()

    def appended(self) -> None:
        with self._changed:
            self._count += 1
            self._changed.notify_all()

    def wait(self, timeout: float, arrived: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._count
            if arrived():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                # a signal between the read and here changed the count: read again
                if self._count == seen:
                    self._changed.wait(left)


_signals: weakref.WeakValueDictionary[str, AppendSignal] = weakref.WeakValueDictionary()
_finding = threading.Lock()


def signal_for(name: str) -> AppendSignal:
    """The one signal of this process for the database ``name`` (an SQLite file's real
    path), so stores opened on the same file apart still wake each other's readers."""
    with _finding:
        signal = _signals.get(name)
        if signal is None:
            signal = _signals[name] = AppendSignal()
        return signal
