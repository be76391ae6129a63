"""Durable subscriptions of an AsyncCommandHandler: the same :class:`~incident.Subscription`
(checkpoints, parking, retries, one runner per handler across processes), each run by
an asyncio task.

A subscription's work is the sync store's reads, its handler and its checkpoint commit,
so the task runs its loop on a thread of its own (``Subscription.run``), and the
commands the handler returns are dispatched by the async handler on its event loop
(:class:`LoopReactor`), with the same keys, so none runs twice. ``await start()``,
``await stop()``, ``await catch_up()`` and ``await wait_until_caught_up()`` mirror
:class:`~incident.Subscriptions`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from ..aggregate import Aggregate
from ..errors import StoreError
from ..event_handler import EventHandler
from ..messages import Recorded
from ..stores import CheckpointStore, EventStore, ProjectionStore
from ..subscriptions import Subscription, Subscriptions

__all__ = ["AsyncSubscriptions", "LoopReactor"]

log = logging.getLogger("incident.subscriptions")  # the sync runners' logger

LOOP_ENDED = (
    "The event loop of this AsyncCommandHandler has ended, so a follow-up cannot be "
    "dispatched: stop its subscriptions (or close it) before its loop ends"
)
LOOP_CHECK = 0.5  # seconds between looks at whether the loop still runs, while waiting


class _AsyncApp(Protocol):
    @property
    def aggregates(self) -> Sequence[Aggregate[Any]]: ...

    def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> Awaitable[None]: ...


class LoopReactor:
    """What a subscription needs of the application (:class:`~incident.Reactor`): the
    sync stores under the async handler's, and its follow-ups carried out by the async
    handler on its loop, from the subscription's thread."""

    def __init__(self, app: _AsyncApp, event_store: EventStore, projections: ProjectionStore):
        self._app = app
        self.event_store = event_store
        self.projection_store = projections
        self.loop: asyncio.AbstractEventLoop | None = None  # set when they start

    @property
    def aggregates(self) -> Sequence[Aggregate[Any]]:
        return self._app.aggregates

    def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> None:
        loop = self.loop
        if loop is None:
            raise RuntimeError("the subscriptions of an AsyncCommandHandler run from its loop")
        # a loop that has ended is no fault of the event's: a StoreError, which the
        # subscription waits out (as for its database) rather than park the event
        if not loop.is_running():
            raise StoreError(LOOP_ENDED)
        step = _awaited(self._app.follow_up(handler, cause, steps))
        try:
            done = asyncio.run_coroutine_threadsafe(step, loop)
        except RuntimeError:  # closed since
            step.close()
            raise StoreError(LOOP_ENDED) from None
        while not concurrent.futures.wait([done], timeout=LOOP_CHECK).done:
            if not loop.is_running():  # stopped without running it
                done.cancel()
                raise StoreError(LOOP_ENDED)
        try:
            done.result()
        except concurrent.futures.CancelledError:  # by the loop, as it ended
            raise StoreError(LOOP_ENDED) from None


async def _awaited(step: Awaitable[None]) -> None:
    await step


def _run_recording_errors(
    subscription: Subscription,
    stop: threading.Event,
    loop: asyncio.AbstractEventLoop,
    done: asyncio.Future[None],
) -> None:
    """A subscription's loop, then ``done`` resolved on ``loop``; an error that ends it
    is kept as ``subscription.error`` (which ``wait_until_caught_up`` raises) and
    logged, as ``Subscriptions.start`` does."""
    try:
        subscription.run(stop)
    except BaseException as error:
        subscription.error = error
        log.exception("subscription %s stopped", subscription.name)
    finally:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(_resolve, done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class AsyncSubscriptions:
    """The durable subscriptions of an AsyncCommandHandler, by handler name
    (``subscriptions["name"]`` is its :class:`~incident.Subscription`)."""

    def __init__(
        self,
        reactor: LoopReactor,
        handlers: Sequence[EventHandler],
        checkpoints: CheckpointStore | None = None,
    ) -> None:
        self._reactor = reactor
        self.sync = Subscriptions(
            Subscription(handler, reactor, checkpoints=checkpoints) for handler in handlers
        )
        self._stop = threading.Event()
        self._tasks: list[asyncio.Future[None]] = []  # each done when its thread ends

    def __getitem__(self, name: str) -> Subscription:
        return self.sync[name]

    def __len__(self) -> int:
        return len(self.sync)

    def __repr__(self) -> str:
        return f"AsyncSubscriptions({sorted(self.sync)})"

    async def start(self) -> None:
        """Run every subscription as a task of this loop until ``stop()`` (its loop on a
        thread of its own: a subscription waits for the store between batches)."""
        if self._tasks or not len(self.sync):
            return
        loop = self._bind()
        self._stop.clear()
        for name in self.sync:
            # a daemon thread, as Subscriptions runs: a loop that ends with them still
            # started (no stop()) does not keep the process from exiting
            done: asyncio.Future[None] = loop.create_future()
            thread = threading.Thread(
                target=_run_recording_errors,
                args=(self.sync[name], self._stop, loop, done),
                name=f"incident-sub-{name}",
                daemon=True,
            )
            thread.start()
            self._tasks.append(done)

    async def stop(self) -> None:
        """Stop the tasks, each after the batch it is in."""
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def catch_up(self) -> int:
        """Run every subscription until none has anything left; returns how many events
        were read (``Subscriptions.catch_up``, off the loop)."""
        read: int = await self._off_loop(self.sync.catch_up)
        return read

    async def wait_until_caught_up(
        self, position: int | None = None, timeout: float = 10.0
    ) -> None:
        """Return once every started subscription has processed ``position`` (by default
        the end of the log, and what the subscriptions' own commands added to it)."""
        await self._off_loop(lambda: self.sync.wait_until_caught_up(position, timeout))

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        self._reactor.loop = loop
        return loop

    async def _off_loop(self, work: Callable[[], Any]) -> Any:
        self._bind()
        return await asyncio.to_thread(work)
