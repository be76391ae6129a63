"""Run sync tests against async stores and handlers: one event loop on a thread of its
own, and sync views whose methods wait for the async object's coroutines on it.

So the store contract (:mod:`incident.testing.contract`) and any suite written against
the sync API run unchanged on ``AsyncEventStore``, ``AsyncProjectionStore`` and
``AsyncCommandHandler``, including from several threads at once (their calls become
concurrent tasks on the one loop)::

    with EventLoopThread() as loop:
        store = loop.view(incident.open_async_event_store("memory://"))
        store.append("a", [event], expected_version=0)   # awaited on the loop
        list(store.read_all())                           # the async iterator, drained

A view's method returns what the coroutine returns; an async iterator comes back as a
sync iterator whose items are awaited on the loop one at a time (so a view's live tail,
``subscribe``, follows the log as a sync one does); an async store or handler comes
back as a view of it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

from ..command_handler.asynchronous import AsyncCommandHandler
from ..stores import AsyncEventStore, AsyncProjectionStore

__all__ = ["EventLoopThread", "Pulled", "SyncView"]

T = TypeVar("T")

_VIEWED = (AsyncEventStore, AsyncProjectionStore, AsyncCommandHandler)


class EventLoopThread:
    """An asyncio event loop running on a daemon thread until :meth:`close`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="incident-event-loop", daemon=True
        )
        self._thread.start()

    def run(self, awaitable: Awaitable[T]) -> T:
        """Wait, on the calling thread, for ``awaitable`` run on the loop; its result, or
        its exception raised here."""
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self.loop).result()

    def view(self, target: Any) -> SyncView:
        """A sync view of an async store or handler, driven on this loop."""
        return SyncView(target, self)

    def close(self) -> None:
        """Close the async iterators left open on the loop (a tail not read to its end),
        then stop the loop and close it."""
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> EventLoopThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncView:
    """The async object's attributes, its coroutine methods made sync (see the module's
    docstring). ``.target`` is the async object itself."""

    def __init__(self, target: Any, loop: EventLoopThread) -> None:
        self.target, self._loop = target, loop

    def __repr__(self) -> str:
        return f"SyncView({self.target!r})"

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.target, name)
        if not callable(value) or isinstance(value, type):
            return self._outward(value)

        def call(*args: Any, **kwargs: Any) -> Any:
            inward = [_inward(arg) for arg in args]
            named = {key: _inward(arg) for key, arg in kwargs.items()}
            return self._outward(value(*inward, **named))

        call.__name__ = name
        call.__doc__ = value.__doc__
        return call

    def _outward(self, value: Any) -> Any:
        if isinstance(value, Coroutine):
            value = self._loop.run(value)
        elif isinstance(value, AsyncIterator):
            value = Pulled(value, self._loop)
        if isinstance(value, _VIEWED):
            return SyncView(value, self._loop)
        return value


def _inward(value: Any) -> Any:
    return value.target if isinstance(value, SyncView) else value


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


class Pulled(Iterator[T]):
    """An async iterator as a sync one: each item awaited on the loop when it is asked
    for, as a sync store streams its reads, so a live tail follows the log rather than
    waiting for an end; ``close()`` closes the async iterator there."""

    def __init__(self, items: AsyncIterator[T], loop: EventLoopThread) -> None:
        self._items, self._loop = items, loop

    def __iter__(self) -> Pulled[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._loop.run(anext(self._items))
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        aclose = getattr(self._items, "aclose", None)
        if aclose is not None:
            self._loop.run(aclose())
