"""Subscriptions: event handlers run durably, following the global log from a checkpoint.

Inline handlers run inside ``dispatch``; a subscription runs one handler on its own:

    read_all(after=checkpoint) in batches
      -> the aggregate's state after each event (a fold, cached per aggregate)
      -> the listeners (pure) -> projections buffered, commands dispatched
      -> checkpoint saved with the buffered projections (one transaction when they share
         a database, else projections first once the checkpoint is checked: upserts
         are version-guarded, so replaying them after a crash changes nothing)

A listener that raises is retried with backoff; after ``retries`` the event is parked in
the dead-letter store and the subscription goes on (or stops, with ``on_failure="stop"``).
Parking holds the stream: the handler's later events of that aggregate are parked behind
it, as *held* (attempts 0), unhandled, so a retry applies them in log order and a read
model never moves backwards. Events of other aggregates go on.

An event the store cannot read (CorruptEvent: a damaged payload, a payload under another
type's name, a row missing from its stream or from the log) stops nothing by itself. A
handler that does not listen to its stored type skips it (it needs no payload); one
that does, or that cannot tell (a position missing from the log has no type), parks it at
once (no retries: the row will not heal), holding its stream, or stops there with
``on_failure="stop"``. So does an event whose aggregate's state cannot be folded because
an earlier event of its stream is damaged.

The parts, in this package: :class:`~.subscription.Subscription` runs one handler,
with the states of :mod:`.states`, the parking and retrying of :mod:`.dead_letters` and
the rebuilding of :mod:`.replay`; it asks of the application only what
:class:`~.reactor.Reactor` names. This module runs several on threads
(:class:`Subscriptions`) and keeps every public name importable from here.

One Subscription object may be used from several threads: ``step``, ``retry_parked``,
``skip_parked`` and ``replay`` take a per-object lock, so they run one at a time.

After a crash, the events since the last checkpoint are handled again. Projections do not
mind (version-guarded upserts). Commands carry an idempotency key made of the handler,
the event, the listener and the command itself (never its place among the outputs), so
dispatching one again returns the first run's outcome, its events or its rejection,
instead of deciding anew; and the checkpoint is saved right after every event that
dispatched something, so little is handled twice at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

from ..errors import IncidentError, RegistrationError
from ..stores import EventStore, Parked
from .dead_letters import SubscriptionFailed
from .replay import Replayed
from .subscription import Subscription

__all__ = ["Replayed", "Subscription", "SubscriptionFailed", "Subscriptions", "last_position"]

log = logging.getLogger("incident.subscriptions")


def last_position(event_store: EventStore, after: int = 0) -> int:
    """The position of the last event in the log (0 when it is empty)."""
    known = getattr(event_store, "last_position", None)
    if callable(known):
        return int(known())
    position = after
    for recorded in event_store.read_all(after=after):
        position = recorded.position
    return position


class Subscriptions(Mapping[str, Subscription]):
    """A set of subscriptions, by handler name, run on background threads.

    >>> subscriptions = Subscriptions([])
    >>> with subscriptions:  # start(), then stop() on the way out
    ...     subscriptions.wait_until_caught_up()
    """

    def __init__(self, subscriptions: Iterable[Subscription] = ()) -> None:
        self._by_name: dict[str, Subscription] = {}
        for subscription in subscriptions:
            if subscription.name in self._by_name:
                raise RegistrationError(f"Two subscriptions are named {subscription.name!r}")
            self._by_name[subscription.name] = subscription
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __getitem__(self, name: str) -> Subscription:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"Subscriptions({list(self._by_name.values())})"

    def __enter__(self) -> Subscriptions:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Run every subscription on its own daemon thread until ``stop()`` (nothing more
        while they run). Refused (IncidentError) while a ``stop()`` that timed out still
        has threads ending: a second runner of one Subscription object would share its
        lock, and the first to end would give it up under the other."""
        if self._stop.is_set():  # stopped: only threads of a stop() that timed out are left
            self._threads = [thread for thread in self._threads if thread.is_alive()]
            if self._threads:
                still = ", ".join(t.name for t in self._threads)
                raise IncidentError(f"Cannot start: {still} still stopping; stop() again first")
        if self._threads:
            return
        self._stop.clear()
        for subscription in self._by_name.values():
            subscription.error = None  # a run that failed before is over; this one is new
            thread = threading.Thread(
                target=_run_recording_errors,
                args=(subscription, self._stop),
                name=f"incident-subscription-{subscription.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Ask every thread to stop after its batch and wait for them, ``timeout`` seconds
        in all (None: as long as it takes). TimeoutError names those still running; they
        stop after their batch, and ``stop()`` again waits for them."""
        self._stop.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [thread for thread in self._threads if thread.is_alive()]
        if self._threads:
            still = ", ".join(thread.name for thread in self._threads)
            raise TimeoutError(f"{still} still running after {timeout}s")

    def catch_up(self) -> int:
        """Run every subscription in this thread until none has anything left (commands
        one dispatches may give another more to do); returns how many events were read."""
        total = 0
        while True:
            read = sum(subscription.catch_up() for subscription in self._by_name.values())
            if not read:
                return total
            total += read

    def wait_until_caught_up(self, position: int | None = None, timeout: float = 10.0) -> None:
        """Block until every subscription has processed ``position``; by default the end
        of the log, waited for again until commands the subscriptions dispatch stop
        adding events (read-your-writes for tests and request handlers)."""
        deadline = time.monotonic() + timeout
        settled = position is not None
        target = position or 0
        while True:
            if not settled:
                target = max((last_position(s.event_store) for s in self.values()), default=0)
            for subscription in self._by_name.values():
                subscription.wait_until_caught_up(target, max(0.0, deadline - time.monotonic()))
            if settled:
                return
            again = max((last_position(s.event_store) for s in self.values()), default=0)
            if again == target:
                return
            if time.monotonic() >= deadline:  # their commands keep the log moving
                raise TimeoutError(
                    f"the log moved on from {target} to {again} while the subscriptions "
                    f"caught up, for {timeout}s"
                )

    def parked(self) -> list[Parked]:
        return [parked for s in self._by_name.values() for parked in s.parked()]


def _run_recording_errors(subscription: Subscription, stop: threading.Event) -> None:
    try:
        subscription.run(stop)
    except BaseException as error:
        subscription.error = error
        log.exception("subscription %s stopped", subscription.name)
