"""Turns: threads of one process that keep colliding on an aggregate wait for each other.

A command is decided on the aggregate's state and appended with the version it was
decided on; when another writer got there first, the append fails with a conflict and
the command is decided again. Between threads of one process that is a waste, and
under load a risk: threads that decide on the same state at once collide again and
again, and a command can run out of retries.

So once threads of this process have collided on an aggregate, its commands take turns
here: one decides and appends while the others wait, then the next decides on the state
the first left. An aggregate nobody collides on costs one dict lookup. Correctness never
depends on turns: the append's expected version still decides. A store that can make
other processes wait too (Postgres: ``PostgresEventStore.turn``, a lock per stream in
the server) is asked for its turn inside this one, so a process queues there with one
thread at most per aggregate.

>>> turns = Turns()
>>> with turns.turn(("account", "A")):  # nobody has collided: nothing is taken
...     pass
>>> turns.collided(("account", "A"))
>>> with turns.turn(("account", "A")):  # from now on, commands to A take turns
...     turns.waiting(("account", "A"))
1
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .._forks import renew_in_forked_children

__all__ = ["Turns"]

Key = tuple[str, str]  # (aggregate name, aggregate id)

_NO_TURN: AbstractContextManager[None] = nullcontext()


class _Turn:
    """One aggregate's lock and how many threads hold it or wait for it."""

    __slots__ = ("count", "lock")

    def __init__(self) -> None:
        self.lock = threading.RLock()  # a listener that dispatches to its own aggregate
        self.count = 0


class Turns:
    """The aggregates this process's threads have collided on (the ``remember`` most
    recent) and the turns taken on them."""

    def __init__(self, remember: int = 1024) -> None:
        self.remember = remember
        self._reset()
        renew_in_forked_children(self._reset)  # a parent's thread may hold a turn

    def _reset(self) -> None:
        self._guard = threading.Lock()
        self._contended: OrderedDict[Key, None] = OrderedDict()
        self._turns: dict[Key, _Turn] = {}

    def collided(self, key: Key) -> None:
        """Threads collided on ``key``: its commands take turns from now on."""
        with self._guard:
            self._contended[key] = None
            self._contended.move_to_end(key)
            while len(self._contended) > self.remember:
                self._contended.popitem(last=False)

    def contended(self, key: Key) -> bool:
        """Whether threads of this process have collided on ``key`` (recently)."""
        return key in self._contended

    def turn(self, key: Key) -> AbstractContextManager[Any]:
        """``with turns.turn(key):`` waits for the other threads of this process working
        on ``key``, if they have collided on it before; otherwise it takes nothing."""
        if key not in self._contended:  # one lookup: the usual case
            return _NO_TURN
        return _Taken(self, key)

    def waiting(self, key: Key) -> int:
        """How many threads hold or wait for the turn on ``key`` (for tests and logs)."""
        with self._guard:
            taken = self._turns.get(key)
            return taken.count if taken is not None else 0

    def _take(self, key: Key) -> _Turn:
        with self._guard:
            taken = self._turns.get(key)
            if taken is None:
                taken = self._turns[key] = _Turn()
            taken.count += 1
        taken.lock.acquire()
        return taken

    def _give_back(self, key: Key, taken: _Turn) -> None:
        taken.lock.release()
        with self._guard:
            taken.count -= 1
            if taken.count == 0 and self._turns.get(key) is taken:
                del self._turns[key]  # nobody waits: forget it, so the table stays small


class _Taken:
    """The turn on one aggregate, held for a ``with`` block."""

    __slots__ = ("_key", "_taken", "_turns")

    def __init__(self, turns: Turns, key: Key) -> None:
        self._turns = turns
        self._key = key

    def __enter__(self) -> None:
        self._taken = self._turns._take(self._key)

    def __exit__(self, *_: object) -> None:
        self._turns._give_back(self._key, self._taken)
