"""Subscriptions: event handlers run durably, following the global log from a checkpoint.

Inline handlers run inside ``dispatch``; a subscription runs one handler on its own:

    read_all(after=checkpoint) in batches
      -> the aggregate's state after each event (a fold, cached per aggregate)
      -> the listeners (pure) -> projections buffered, commands dispatched
      -> checkpoint saved with the buffered projections (one transaction when they share
         a database, else projections first: upserts are version-guarded, so replaying
         them after a crash changes nothing)

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

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

import msgspec

from ._fp import partition_all
from .aggregate import Aggregate
from .errors import (
    CheckpointConflict,
    CorruptEvent,
    IncidentError,
    RegistrationError,
    RoutingError,
    StoreError,
)
from .event_handler import EventHandler
from .follow_ups import split_outputs
from .messages import Projection, Recorded, event_type_name
from .reactor import Reactor
from .stores import (
    CheckpointStore,
    EventStore,
    Parked,
    ReplaceableProjectionStore,
    checkpoint_store_for,
)
from .stores._common import closing_iterator, newer_or_equal, projection_key, utc_now

__all__ = ["Replayed", "Subscription", "SubscriptionFailed", "Subscriptions", "last_position"]

log = logging.getLogger("incident.subscriptions")

OnFailure = Literal["park", "stop"]
Pending = dict[tuple[type[Projection], str], Projection]


class SubscriptionFailed(IncidentError):
    """A listener kept failing on one event and the subscription was told to stop there.
    Everything before that event is checkpointed; the cause is chained."""

    def __init__(self, handler: str, position: int, error: BaseException) -> None:
        self.handler, self.position = handler, position
        super().__init__(
            f"{handler} stopped at position {position}: {type(error).__name__}: {error}"
        )


def last_position(event_store: EventStore, after: int = 0) -> int:
    """The position of the last event in the log (0 when it is empty)."""
    known = getattr(event_store, "last_position", None)
    if callable(known):
        return int(known())
    position = after
    for recorded in event_store.read_all(after=after):
        position = recorded.position
    return position


class Subscription:
    """Runs one EventHandler over the global log, durably.

    ``command_handler`` (a :class:`~incident.CommandHandler`, or any
    :class:`~incident.reactor.Reactor`) supplies the stores, the aggregates (to compute
    the state each listener receives) and the carrying out of returned commands.
    ``checkpoints`` defaults to the checkpoint store beside the event store.
    """

    def __init__(
        self,
        handler: EventHandler,
        command_handler: Reactor,
        *,
        checkpoints: CheckpointStore | None = None,
        batch_size: int = 5000,
        retries: int = 3,
        backoff: float = 0.05,
        on_failure: OnFailure = "park",
        cache_size: int = 10_000,
        idle: float = 0.25,
        outage_backoff: float = 5.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_failure not in ("park", "stop"):
            raise ValueError(f"on_failure must be 'park' or 'stop', got {on_failure!r}")
        self.handler = handler
        self.name = handler.name
        self.command_handler = command_handler
        self.event_store = command_handler.event_store
        self.projection_store = command_handler.projection_store
        self.checkpoints = checkpoints or checkpoint_store_for(self.event_store)
        self.batch_size, self.retries, self.backoff = batch_size, retries, backoff
        self.on_failure: OnFailure = on_failure
        self.idle, self.outage_backoff = idle, outage_backoff
        self._outage_pause = backoff  # the wait after the next StoreError, while running
        self._aggregates = _aggregates_for(handler, command_handler.aggregates)
        self._listened = {event_type_name(t) for t in handler.event_types}
        # (state, version) per aggregate, least recently used first: a dict keeps insertion
        # order; only used under self._guard
        self._states: dict[tuple[str, str], tuple[Any, int]] = {}
        self.cache_size = cache_size
        self._position: int | None = None
        self._progress = threading.Condition()
        self._lock = self.checkpoints.lock(self.name)  # across processes: one runner
        # within this object: the state cache, _position and the parked streams are shared
        # by whichever thread calls step(), retry_parked(), skip_parked() or replay()
        self._guard = threading.RLock()
        # per parked stream (aggregate id), the first of its parked events: what the
        # handler's later events of that stream are held behind; loaded by each step()
        self._blocked: dict[str, Parked] = {}
        self._parked_positions: set[int] = set()
        self.error: BaseException | None = None  # why run() ended, if it failed

    def __repr__(self) -> str:
        return f"Subscription({self.name!r}, position={self.position})"

    @property
    def position(self) -> int:
        """The last position this subscription has processed and checkpointed."""
        if self._position is None:
            self._position = self.checkpoints.load(self.name)
        return self._position

    # -- processing ----------------------------------------------------------

    def catch_up(self, until: int | None = None) -> int:
        """Process batches until the end of the log (or ``until``); returns how many
        events were read. Runs in the calling thread and takes no handler lock (``run``
        does), only this object's: a ``run()`` of this same object in another thread is
        simply interleaved batch by batch. If a runner elsewhere moves the checkpoint
        meanwhile, the save's compare-and-set raises CheckpointConflict and writes
        nothing."""
        total = 0
        while until is None or self.position < until:
            read = self.step()
            if not read:
                break
            total += read
        return total

    def step(self) -> int:
        """Process one batch and checkpoint it; returns how many events were read."""
        with self._guard:
            return self._step()

    def _step(self) -> int:
        self._load_parked()
        batch = self._read_batch()
        pending: Pending = {}
        done = self.position
        for recorded in batch:
            if isinstance(recorded, CorruptEvent):
                try:
                    self._damaged(recorded)
                except SubscriptionFailed:
                    self._commit(done, pending)
                    raise
                done = recorded.position or done
                continue
            if not self.handler.handles(recorded.data):
                self._follow(recorded)
                done = recorded.position
                continue
            if recorded.position in self._parked_positions:
                # parked already (handled again after a crash): it stays where it is
                self._follow(recorded)
                done = recorded.position
                continue
            head = self._blocked.get(recorded.aggregate_id)
            if head is not None and head.position < recorded.position:
                self._hold(recorded, head)
                done = recorded.position
                continue
            try:
                projections, dispatched = self._process(recorded)
            except SubscriptionFailed:
                self._commit(done, pending)
                raise
            _merge(pending, projections)
            done = recorded.position
            if dispatched:  # commands went out: checkpoint now, so a crash re-sends less
                self._commit(done, pending)
                pending = {}
        self._commit(done, pending)
        return len(batch)

    def _read_batch(self) -> list[Recorded[Any] | CorruptEvent]:
        """The next batch of the log, where a row the store cannot read is replaced by the
        CorruptEvent naming it: the reading goes on after it instead of ending there."""
        batch: list[Recorded[Any] | CorruptEvent] = []
        after = self.position
        damaged: dict[int, CorruptEvent] = {}
        while len(batch) < self.batch_size:
            if after + 1 in damaged:
                batch.append(damaged.pop(after + 1))
                after += 1
                continue
            limit = self.batch_size - len(batch)
            if damaged:  # the rows before it in its page were never handed out: read them
                limit = min(limit, min(damaged) - after - 1)
            read = 0
            try:
                for recorded in self.event_store.read_all(after=after, limit=limit):
                    batch.append(recorded)
                    after = recorded.position
                    read += 1
            except CorruptEvent as damage:
                where = damage.position
                if where is None or where <= after or where in damaged:
                    raise  # not a row of the log this batch can step over
                damaged[where] = damage
                continue
            if read < limit and after + 1 not in damaged:
                break  # the end of the log
        return batch

    def _damaged(self, damage: CorruptEvent) -> None:
        """An event the store cannot read: skipped when this handler does not listen to
        its stored type, else parked (holding its stream) or SubscriptionFailed."""
        assert damage.position is not None  # _read_batch only keeps those it can place
        if damage.position in self._parked_positions:
            return  # parked already (handled again after a crash)
        if damage.event_type is not None and damage.event_type not in self._listened:
            log.warning("%s skipped unreadable #%s: %s", self.name, damage.position, damage)
            return
        if self.on_failure == "stop":
            raise SubscriptionFailed(self.name, damage.position, damage) from damage
        log.error("%s parked unreadable #%s: %s", self.name, damage.position, damage)
        parked = Parked(
            handler=self.name,
            position=damage.position,
            event_id="",  # the row could not be read: its id is not known
            aggregate_id=damage.aggregate_id,
            event_type=damage.event_type or "",
            error=_failure(damage),
            attempts=1,
            parked_at=utc_now(),
        )
        self.checkpoints.park(parked)
        self._blocked.setdefault(damage.aggregate_id, parked)
        self._parked_positions.add(damage.position)

    def _load_parked(self) -> None:
        """Read the handler's dead letters once for the batch (not once per event), and
        heal streams whose first parked event is a held one.

        A held event waits for the failure ahead of it. If another process retried or
        skipped that failure while this one was parking events behind it (from a list
        it had read before), a held event can be left first with nothing failed ahead:
        nobody would ever retry it, and it would hold its stream forever. Nothing is
        wrong with it, so it is retried here, as ``retry_parked`` would."""
        self._blocked, self._parked_positions = {}, set()
        for stream in _by_stream(self.parked()).values():
            if stream[0].held:
                _, stream = self._retry_stream(stream)
            if stream:
                self._blocked[stream[0].aggregate_id] = stream[0]
                self._parked_positions.update(p.position for p in stream)

    def _hold(self, recorded: Recorded[Any], head: Parked) -> None:
        """Park an event behind the parked one of its stream without handling it."""
        self._follow(recorded)  # keep a cached state current: no listener saw it
        self.checkpoints.park(_parked(self.name, recorded, _held_behind(head), 0))
        self._parked_positions.add(recorded.position)

    def _process(self, recorded: Recorded[Any]) -> tuple[list[Projection], bool]:
        """The listeners' projections for one event, after dispatching their commands;
        retried with backoff, then parked (or SubscriptionFailed)."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._handle(recorded)
            except StoreError:
                raise  # the database, not this event: run() waits for it, nothing is parked
            except Exception as error:
                # a damaged row does not heal by waiting: park (or stop) at once
                if attempts <= self.retries and not isinstance(error, CorruptEvent):
                    log.warning(
                        "%s failed on #%s (%s), try %s of %s: %s",
                        self.name,
                        recorded.position,
                        recorded.event_type,
                        attempts,
                        self.retries + 1,
                        error,
                    )
                    time.sleep(self.backoff * 2 ** (attempts - 1))
                    continue
                if self.on_failure == "stop":
                    raise SubscriptionFailed(self.name, recorded.position, error) from error
                log.error(
                    "%s parked #%s after %s tries: %s; its stream %r is held behind it",
                    self.name,
                    recorded.position,
                    attempts,
                    error,
                    recorded.aggregate_id,
                )
                parked = _parked(self.name, recorded, _failure(error), attempts)
                self.checkpoints.park(parked)
                # the stream's later events wait behind it: retried in order, they write
                # the read model in log order, never an older row over a newer one
                self._blocked[recorded.aggregate_id] = parked
                self._parked_positions.add(recorded.position)
                return [], False

    def _handle(self, recorded: Recorded[Any]) -> tuple[list[Projection], bool]:
        projections: list[Projection] = []
        dispatched = False
        steps = split_outputs(self.handler.outputs(recorded, self._state_at(recorded)), projections)
        for projection in projections:
            key = getattr(projection, "aggregate_id", None)
            if type(key) is not str or not key:
                projection_key(projection)  # raises: a row that cannot be stored fails
        if steps:
            # keyed by handler, event, listener and the command itself: handled again, it
            # sends nothing twice, and takes the branch the first run took
            self.command_handler.follow_up(self.name, recorded, steps)
            dispatched = True
        return projections, dispatched

    def _commit(self, position: int, pending: Pending) -> None:
        if position == self.position and not pending:
            return
        try:
            self.checkpoints.save(
                self.name,
                position,
                expected=self.position,
                projections=list(pending.values()),
                projection_store=self.projection_store,
            )
        except CheckpointConflict:
            self._position = None  # reload: whoever moved it knows better
            self._states.clear()
            raise
        with self._progress:
            self._position = position
            self._progress.notify_all()

    # -- aggregate state -------------------------------------------------------

    def _state_at(self, recorded: Recorded[Any]) -> Any:
        """The aggregate's state right after ``recorded``: the cached state evolved by one
        event, or a fold of the stream up to it when the cache has no usable entry."""
        aggregate = self._aggregates.get(recorded.aggregate)
        if aggregate is None:
            raise RoutingError(
                f"{self.name} handles {recorded.event_type} of aggregate "
                f"{recorded.aggregate!r}, which is not among this subscription's aggregates"
            )
        key = (aggregate.name, recorded.aggregate_id)
        cached = self._states.pop(key, None)
        if cached is not None and cached[1] >= recorded.version:
            cached = None  # handled again (a retry or a reset): start over
        base, version = cached or (aggregate.initial, 0)
        if version < recorded.version - 1:  # not cached, or evicted: read what is missing
            # the bare events (the store's fast path), and only up to this one
            read = self.event_store.events(recorded.aggregate_id, after=version)
            with closing_iterator(read) as newer:
                base = aggregate.fold(itertools.islice(newer, recorded.version - 1 - version), base)
        state = aggregate.evolve(base, recorded)
        self._remember(key, state, recorded.version)
        return state

    def _remember(self, key: tuple[str, str], state: Any, version: int) -> None:
        self._states[key] = (state, version)  # popped first: now the most recently used
        if len(self._states) > self.cache_size:
            del self._states[next(iter(self._states))]

    def _follow(self, recorded: Recorded[Any]) -> None:
        """Keep a cached state current through an event no listener wants (cheap: no I/O;
        an aggregate that is not cached is folded from its stream when it is needed)."""
        aggregate = self._aggregates.get(recorded.aggregate)
        if aggregate is None:
            return
        key = (aggregate.name, recorded.aggregate_id)
        cached = self._states.pop(key, None)
        if cached is not None and cached[1] == recorded.version - 1:
            self._remember(key, aggregate.evolve(cached[0], recorded), recorded.version)

    # -- running -------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Take the handler's lock (waiting while another runner holds it), then follow
        the log until ``stop`` is set: wake-ups from the store where it can notify,
        polling with backoff otherwise. A database that goes away (StoreError) is waited
        for, with backoff up to ``outage_backoff`` seconds, and the lock taken again;
        a listener error is not a StoreError: it is retried, then parked."""
        stop = stop or threading.Event()
        self._outage_pause = self.backoff
        lock_failed = False  # the last StoreError came from a lock attempt
        try:
            while not stop.is_set():
                locking = True
                try:
                    taken = self._lock.acquire(timeout=self.idle)
                    locking = False
                    if lock_failed:  # what failed works again; a failing read still waits
                        self._outage_pause, lock_failed = self.backoff, False
                    if not taken:
                        continue
                    try:
                        with self._guard:
                            self._position = None  # whoever held it before may have moved it
                            self._states.clear()
                        self._follow_log(stop)
                    finally:
                        self._lock.release()
                    stop.wait(self.idle)  # lost it: let a runner that kept its session go first
                except StoreError as error:
                    lock_failed = locking
                    pause = self._outage_pause
                    log.warning("%s: %s; trying again in %.2fs", self.name, error, pause)
                    stop.wait(pause)
                    self._outage_pause = min(max(pause, 0.01) * 2, self.outage_backoff)
        finally:
            self._lock.release()  # a standby stops trying: what it tried with is closed

    def _follow_log(self, stop: threading.Event) -> None:
        pause = 0.001
        while not stop.is_set():
            if not self._lock.held():
                log.warning("%s lost its lock; waiting to take it again", self.name)
                return
            try:
                read = self.step()
            except CheckpointConflict as conflict:
                log.warning("%s", conflict)
                return
            # a step that worked ends an outage: the next one is waited for from the start
            self._outage_pause = self.backoff
            if read:
                pause = 0.001
                continue
            wait_for_append = getattr(self.event_store, "wait_for_append", None)
            if callable(wait_for_append):
                wait_for_append(self.position, min(self.idle, 0.1))
            else:
                stop.wait(pause)
                pause = min(pause * 2, self.idle)

    def wait_until_caught_up(self, position: int, timeout: float = 10.0) -> None:
        """Block until this subscription has processed ``position`` (wherever it runs:
        the checkpoint store is read too). Raises TimeoutError, or the runner's error."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while True:
                if self.error is not None:
                    raise self.error
                stored = self.checkpoints.load(self.name)
                if max(stored, self._position or 0) >= position:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name} is at {stored}, not {position}, after {timeout}s"
                    )
                self._progress.wait(min(remaining, 0.05))

    # -- replay --------------------------------------------------------------

    def replay(self, progress: Callable[[int], object] | None = None) -> Replayed:
        """Rebuild this handler's projections from the start of the log, then swap each
        projection type's table for the rebuilt one and move the checkpoint to the end.

        Commands the listeners return for events the subscription had already handled
        are not dispatched again (a replay rebuilds read models, it does not re-run a
        process); for events past the old checkpoint they are, as running would have.
        Takes the handler's lock, so nothing else runs this handler meanwhile; a
        listener error aborts the replay with nothing replaced, and success empties the
        handler's dead letters. ``progress`` is called with the number of events read
        after each batch. The rebuilt rows are held in memory until the swap.
        """
        target = self.projection_store
        if not isinstance(target, ReplaceableProjectionStore):
            raise IncidentError(f"{target!r} cannot replace tables, so it cannot be replayed into")
        with self._guard, self._replaying():
            already = self._position = self.checkpoints.load(self.name)
            self._states.clear()
            rebuilt: Pending = {}
            position, skipped = 0, 0
            for batch in partition_all(self.batch_size, self.event_store.read_all()):
                for recorded in batch:
                    if not self.handler.handles(recorded.data):
                        self._follow(recorded)
                        continue
                    projections: list[Projection] = []
                    outputs = self.handler.outputs(recorded, self._state_at(recorded))
                    steps = split_outputs(outputs, projections)
                    for projection in projections:
                        projection_key(projection)
                    _merge(rebuilt, projections)
                    if recorded.position > already:
                        if steps:
                            self.command_handler.follow_up(self.name, recorded, steps)
                    else:
                        skipped += sum(len(commands) for _, commands in steps)
                position = batch[-1].position
                if progress is not None:
                    progress(len(batch))
            tables: dict[type[Projection], list[Projection]] = {}
            for (projection_type, _), projection in rebuilt.items():
                tables.setdefault(projection_type, []).append(projection)
            written = {t.__name__: target.replace_all(t, rows) for t, rows in tables.items()}
            self.checkpoints.reset(self.name, position)
            for parked in self.parked():  # every event was handled this time
                if parked.position <= position:
                    self.checkpoints.unpark(self.name, parked.position)
            with self._progress:
                self._position = position
                self._progress.notify_all()
            return Replayed(self.name, position, written, skipped)

    @contextlib.contextmanager
    def _replaying(self) -> Iterator[None]:
        """Hold the handler's lock for a replay. This object's own run() in another thread
        may hold it already: the guard pauses that run meanwhile, and it keeps its lock."""
        if self._lock.held():
            yield
            return
        if not self._lock.acquire(timeout=0):
            self._lock.release()  # not held: closes what the attempt opened
            raise IncidentError(f"{self.name} is running elsewhere; stop it before replaying")
        try:
            yield
        finally:
            self._lock.release()

    # -- dead letters --------------------------------------------------------

    def parked(self) -> list[Parked]:
        return self.checkpoints.parked(self.name)

    def retry_parked(self, position: int | None = None) -> list[int]:
        """Handle parked events again, stream by stream in position order: all of them,
        or those of ``position``'s stream up to and including it (the earlier ones go
        first). One that fails again stays parked (one more attempt, its new error) and
        the rest of its stream stays held behind it, untried. Those that succeed leave
        the dead-letter store and their projections are written. Returns the positions
        that succeeded."""
        with self._guard:
            streams = _by_stream(self.parked())
            if position is not None:
                streams = {
                    stream_id: stream
                    for stream_id, stream in streams.items()
                    if any(p.position == position for p in stream)
                }
            succeeded: list[int] = []
            for stream in streams.values():
                succeeded += self._retry_stream(stream, upto=position)[0]
            return sorted(succeeded)

    def skip_parked(self, position: int) -> Parked:
        """Drop one parked event from the dead letters without handling it, so that the
        events held behind it can be retried (``retry_parked``, or the runner's next
        step). Returns the dropped entry; raises IncidentError if nothing is parked
        there."""
        with self._guard:
            found = next((p for p in self.parked() if p.position == position), None)
            if found is None:
                raise IncidentError(f"{self.name}: #{position} is not parked, nothing to skip")
            self.checkpoints.unpark(self.name, position)
            log.warning(
                "%s skipped #%s (%s of %r) without handling it; it was parked with %s",
                self.name,
                position,
                found.event_type,
                found.aggregate_id,
                found.error,
            )
            return found

    def _retry_stream(
        self, stream: list[Parked], upto: int | None = None
    ) -> tuple[list[int], list[Parked]]:
        """Retry one stream's parked events in position order (up to ``upto``), stopping
        at the first that fails again. Returns the positions that succeeded and the
        stream's entries still parked, first the one that failed."""
        succeeded: list[int] = []
        for index, parked in enumerate(stream):
            if upto is not None and parked.position > upto:
                return succeeded, stream[index:]
            recorded = next(iter(self.event_store.read_all(after=parked.position - 1, limit=1)))
            try:
                projections, _ = self._handle(recorded)
            except StoreError:
                raise  # the database, not this event: it stays as it was
            except Exception as error:
                failed = _parked(self.name, recorded, _failure(error), parked.attempts + 1)
                self.checkpoints.park(failed)
                return succeeded, [failed, *self._hold_again(stream[index + 1 :], failed)]
            for projection in projections:
                self.projection_store.project(projection)
            self.checkpoints.unpark(self.name, parked.position)
            succeeded.append(parked.position)
        return succeeded, []

    def _hold_again(self, rest: list[Parked], failed: Parked) -> list[Parked]:
        """The held entries behind a newly failed one, re-marked to name it (only when
        they named an earlier one: a failure that repeats rewrites nothing)."""
        marked = []
        for parked in rest:
            if parked.held and not parked.error.startswith(f"held behind #{failed.position} "):
                parked = msgspec.structs.replace(parked, error=_held_behind(failed))
                self.checkpoints.park(parked)
            marked.append(parked)
        return marked


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
        """Run every subscription on its own daemon thread until ``stop()``."""
        if self._threads:
            return
        self._stop.clear()
        for subscription in self._by_name.values():
            thread = threading.Thread(
                target=_run_recording_errors,
                args=(subscription, self._stop),
                name=f"incident-subscription-{subscription.name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

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

    def parked(self) -> list[Parked]:
        return [parked for s in self._by_name.values() for parked in s.parked()]


class Replayed(NamedTuple):
    """What a replay did: the position it ended at, the rows written per projection type,
    and how many commands it did not dispatch again."""

    handler: str
    position: int
    written: dict[str, int]
    skipped_commands: int


def _run_recording_errors(subscription: Subscription, stop: threading.Event) -> None:
    try:
        subscription.run(stop)
    except BaseException as error:
        subscription.error = error
        log.exception("subscription %s stopped", subscription.name)


def _merge(pending: Pending, projections: list[Projection]) -> None:
    """Keep one projection per key, by the rule the stores apply: never move backwards."""
    for projection in projections:
        # the key was checked when the listener returned it (_handle, replay)
        key = (type(projection), projection.aggregate_id)  # type: ignore[attr-defined]
        stored = pending.get(key)
        if stored is None:
            pending[key] = projection
            continue
        new, old = getattr(projection, "version", None), getattr(stored, "version", None)
        if type(new) is int and type(old) is int:  # the common case, without a call
            if new >= old:
                pending[key] = projection
        elif newer_or_equal(projection, stored):
            pending[key] = projection


def _parked(handler: str, recorded: Recorded[Any], error: str, attempts: int) -> Parked:
    return Parked(
        handler=handler,
        position=recorded.position,
        event_id=recorded.event_id,
        aggregate_id=recorded.aggregate_id,
        event_type=recorded.event_type,
        error=error,
        attempts=attempts,
        parked_at=utc_now(),
    )


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _held_behind(head: Parked) -> str:
    """The error text of an event held behind ``head`` (attempts 0 says it is held)."""
    return f"held behind #{head.position} ({head.error})"


def _by_stream(parked: Iterable[Parked]) -> dict[str, list[Parked]]:
    """Dead letters per aggregate id, each stream's in position order."""
    streams: dict[str, list[Parked]] = {}
    for entry in sorted(parked, key=lambda p: p.position):
        streams.setdefault(entry.aggregate_id, []).append(entry)
    return streams


def _aggregates_for(
    handler: EventHandler, aggregates: Iterable[Aggregate[Any]]
) -> dict[str, Aggregate[Any]]:
    """The aggregates by name, refusing a handler that listens to an event none of them
    produces (its listeners could never be given a state)."""
    by_name = {aggregate.name: aggregate for aggregate in aggregates}
    produced = {t for aggregate in by_name.values() for t in aggregate.event_types}
    orphans = [t.__name__ for t in handler.event_types if t not in produced]
    if orphans:
        raise RegistrationError(
            f"{handler.name} listens to {', '.join(orphans)}, which no aggregate of this "
            f"command handler applies ({', '.join(sorted(by_name)) or 'none'})"
        )
    return by_name
