"""Live tails for asyncio: ``async for recorded in store.subscribe(after=N)`` on an async
event store, the twin of :mod:`incident.stores.live`.

The log is read in pages on the store's workers, as ``read_all`` does; between reads a
task waits for a wake-up without holding a thread: one watcher thread per store waits in
the sync store's ``wait_for_append`` (memory's condition, Postgres's LISTEN/NOTIFY,
SQLite's in-process signal) on behalf of every task tailing it, and resolves their
futures on their loops when the log grows. A poll every ``poll_interval`` seconds is the
safety net, as in the sync tail: a tail that was not woken reads again anyway. So a
server with many tails (Server-Sent Events, say) has one waiting thread per store, not
one per client, and its workers stay free for commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, Protocol

from .._forks import renew_in_forked_children
from ..messages import Recorded
from .live import BATCH_SIZE, POLL_INTERVAL, checked_tail_arguments
from .protocols import EventStore

__all__ = ["AppendWatch", "follow_async", "watch_of"]

# how long the watcher waits before it looks at its list of waiting tasks again (a task
# that came with a lower position than the one it waits past is woken by then)
WATCH_SLICE = 0.2


class _AsyncLog(Protocol):
    sync: EventStore

    def read_all(
        self, after: int = 0, limit: int | None = None
    ) -> AsyncIterator[Recorded[Any]]: ...


Waiter = tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class AppendWatch:
    """Tasks waiting for the log of one store to grow past a position, and the thread
    that waits for all of them (started when the first task waits, gone when none does)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._renew()
        renew_in_forked_children(self._renew)

    def _renew(self) -> None:
        """No waiters and no thread (also in a forked child: the parent's watching
        thread, its lock and its loops' futures did not come along)."""
        self._lock = threading.Lock()
        self._waiting: list[Waiter] = []
        self._thread: threading.Thread | None = None

    async def wait(self, after: int, timeout: float) -> None:
        """Return once the log holds a position ``> after`` (or may: a failing store
        wakes its tasks so that their next read raises), or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter: Waiter = (after, loop, loop.create_future())
        with self._lock:
            self._waiting.append(waiter)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="incident-append-watch", daemon=True
                )
                self._thread.start()
        try:
            await asyncio.wait_for(waiter[2], timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _watch(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._thread = None
                    return
                lowest = min(after for after, _, _ in self._waiting)
            last = self._wait_past(lowest)
            with self._lock:
                # a waiter whose loop was closed under it waits for nothing any more
                woken = [
                    w for w in self._waiting if last is None or last > w[0] or w[1].is_closed()
                ]
                for waiter in woken:
                    self._waiting.remove(waiter)
            for _, loop, future in woken:
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    loop.call_soon_threadsafe(_resolve, future)

    def _wait_past(self, lowest: int) -> int | None:
        """The log's last position once it is past ``lowest`` or a slice has gone by;
        None when it cannot be known (a failing store, whose tasks' reads will say what
        failed, or a store of your own without ``wait_for_append``/``last_position``):
        then every task is woken to read for itself."""
        wait = getattr(self._store, "wait_for_append", None)
        last = getattr(self._store, "last_position", None)
        try:
            if callable(wait) and callable(last):
                wait(lowest, WATCH_SLICE)
                return int(last())
        except Exception:  # said by the tasks' own reads
            pass
        time.sleep(WATCH_SLICE)
        return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a wait that timed out has cancelled it
        future.set_result(None)


_watches: weakref.WeakKeyDictionary[Any, AppendWatch] = weakref.WeakKeyDictionary()
_finding = threading.Lock()


def _renew_finding() -> None:
    global _finding  # a parent's thread may have held it at the fork
    _finding = threading.Lock()


renew_in_forked_children(_renew_finding)


def watch_of(store: EventStore) -> AppendWatch:
    """The one watch of a sync store, shared by every async tail of it."""
    with _finding:
        watch = _watches.get(store)
        if watch is None:
            watch = _watches[store] = AppendWatch(store)
        return watch


def follow_async(
    store: _AsyncLog,
    after: int = 0,
    *,
    poll_interval: float = POLL_INTERVAL,
    batch_size: int = BATCH_SIZE,
) -> AsyncIterator[Recorded[Any]]:
    """Every event of an async store's log after ``after``, then each new one as it
    commits, in order, never skipping or repeating one; see the module's docstring.
    Bad arguments raise ValueError here, not at the first event."""
    checked_tail_arguments(after, poll_interval, batch_size)
    return _follow(store, after, poll_interval, batch_size)


async def _follow(
    store: _AsyncLog, position: int, poll_interval: float, batch_size: int
) -> AsyncIterator[Recorded[Any]]:
    watch = watch_of(store.sync)
    while True:
        read = 0
        async for recorded in store.read_all(after=position, limit=batch_size):
            position = recorded.position
            read += 1
            yield recorded
        if read < batch_size:
            await watch.wait(position, poll_interval)
