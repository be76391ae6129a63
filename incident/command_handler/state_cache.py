"""A bounded LRU of aggregate states, so a command reads only the events after the
version it last saw instead of replaying the whole stream.

Correctness never depends on it: appends still carry the expected version, so a stale
entry only costs a conflict and a retry, which reads the missing events.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ..options import check_count

__all__ = ["StateCache"]

Key = tuple[str, str]  # (aggregate name, aggregate id)


class StateCache:
    """(state, version) per aggregate, least recently used first out.

    >>> cache = StateCache(2)
    >>> cache.put(("account", "a"), "state-a", 3)
    >>> cache.get(("account", "a"))
    ('state-a', 3)
    >>> cache.put(("account", "b"), "b", 1); cache.put(("account", "c"), "c", 1)
    >>> cache.get(("account", "a")) is None  # evicted: the least recently used
    True
    """

    def __init__(self, size: int = 10_000) -> None:
        check_count("cache_size", size, 0)
        self.size = size
        self._entries: OrderedDict[Key, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> tuple[Any, int] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Key, state: Any, version: int) -> None:
        if self.size == 0:
            return
        with self._lock:
            known = self._entries.get(key)
            if known is not None and known[1] > version:
                return  # a racing thread already cached a newer state
            self._entries[key] = (state, version)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every state (benchmarks use it for a cold load)."""
        with self._lock:
            self._entries.clear()
