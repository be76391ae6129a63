"""Subscription: one event handler run durably over the global log (overview in
:mod:`incident.subscriptions`). Its parts live beside it: the listeners' states in
:mod:`.states`, parking and retrying in :mod:`.dead_letters`, batches cut into waves in
:mod:`.waves` and run by :mod:`.fan_out`, rebuilding in :mod:`.replay`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import CheckpointConflict, CorruptEvent, IncidentError, InvalidArgument, StoreError
from ..event_handler import EventHandler
from ..follow_ups import split_outputs
from ..messages import Projection, Recorded, event_type_name
from ..options import check_count, check_seconds
from ..stores import CheckpointStore, Parked, ReplaceableProjectionStore, checkpoint_store_for
from .dead_letters import DeadLetters, OnFailure, SubscriptionFailed, read_batch
from .fan_out import FanOut
from .reactor import Reactor
from .replay import Replayed, replay_into
from .states import Pending, RowRules, RowsRefused, StreamStates, aggregates_for, merge_projections
from .waves import Item, SequenceBy, split

__all__ = ["Subscription"]

log = logging.getLogger("incident.subscriptions")


class Subscription:
    """Runs one EventHandler over the global log, durably.

    ``command_handler`` (a :class:`~incident.CommandHandler`, or any
    :class:`~incident.subscriptions.reactor.Reactor`) supplies the stores, the aggregates
    (to compute the state each listener receives) and the carrying out of returned
    commands. ``checkpoints`` defaults to the checkpoint store beside the event store."""

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
        concurrency: int = 1,
        sequence_by: SequenceBy | None = None,
    ) -> None:
        check_count("batch_size", batch_size, 1)
        check_count("retries", retries, 0)
        check_count("cache_size", cache_size, 0)
        # a retry's sleep, or a wait, would raise in the middle of a batch
        check_seconds("backoff", backoff)
        check_seconds("idle", idle, positive=True)
        check_seconds("outage_backoff", outage_backoff)
        if on_failure not in ("park", "stop"):
            raise InvalidArgument(f"on_failure must be 'park' or 'stop', got {on_failure!r}")
        self.handler = handler
        self.name = handler.name
        self.command_handler = command_handler
        self.event_store = command_handler.event_store
        self.projection_store = command_handler.projection_store
        self.checkpoints = checkpoints or checkpoint_store_for(self.event_store)
        self.batch_size, self.retries, self.backoff = batch_size, retries, backoff
        self.on_failure: OnFailure = on_failure
        self.idle, self.outage_backoff = idle, outage_backoff
        self._fan_out = FanOut(concurrency, self.name)
        self.sequence_by = sequence_by
        self._outage_pause = backoff  # the wait after the next StoreError, while running
        aggregates = aggregates_for(handler, command_handler.aggregates)
        self._states = StreamStates(self.name, self.event_store, aggregates, cache_size)
        self._dead_letters = DeadLetters(
            self.name,
            checkpoints=self.checkpoints,
            event_store=self.event_store,
            projection_store=self.projection_store,
            handle=self._handle,
            listened={event_type_name(t) for t in handler.event_types},
            on_failure=on_failure,
        )
        self._position: int | None = None
        self._rows = RowRules()
        self._progress = threading.Condition()
        self._lock = self.checkpoints.lock(self.name)  # across processes: one runner
        # within this object: the states, _position and the dead letters are shared by
        # whichever thread calls step(), retry_parked(), skip_parked() or replay()
        self._guard = threading.RLock()
        self.error: BaseException | None = None  # why run() ended, if it failed

    def __repr__(self) -> str:
        return f"Subscription({self.name!r}, position={self.position})"

    @property
    def cache_size(self) -> int:
        """How many aggregates' states are kept between their events."""
        return self._states.size

    @cache_size.setter
    def cache_size(self, size: int) -> None:
        self._states.size = size

    @property
    def concurrency(self) -> int:
        """How many units of a batch are handled at once (see docs/subscriptions.md)."""
        return self._fan_out.concurrency

    @concurrency.setter
    def concurrency(self, concurrency: int) -> None:
        fan_out = FanOut(concurrency, self.name)  # refuses a bad value before anything
        with self._guard:  # not in the middle of a wave
            self._fan_out.close()
            self._fan_out = fan_out

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
        does), only this object's: a ``run()`` of this object in another thread is
        interleaved batch by batch. If a runner elsewhere moves the checkpoint meanwhile,
        the save's compare-and-set raises CheckpointConflict and writes nothing."""
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
        self._dead_letters.load()
        batch = read_batch(self.event_store, self.position, self.batch_size)
        handle = self._wave if self._fan_out.concurrency > 1 else self._one_by_one
        try:
            with self._rows.at_commit():
                handle(batch)
        except RowsRefused:  # handled again, each row checked as it comes: see RowRules
            self._states.clear()
            handle(read_batch(self.event_store, self.position, self.batch_size))
        return len(batch)

    def _one_by_one(self, batch: list[Item]) -> None:
        pending: Pending = {}
        done = self.position
        for item in batch:
            try:
                projections, dispatched = self._item(item)
            except SubscriptionFailed:
                self._commit(done, pending)
                raise
            merge_projections(pending, projections)
            done = item.position or done  # read_batch only keeps damage it can place
            if dispatched:  # commands went out: checkpoint now, so a crash re-sends less
                self._commit(done, pending)
                pending = {}
        self._commit(done, pending)

    def _wave(self, batch: list[Item]) -> None:
        """The batch as one wave (:mod:`.fan_out`); the checkpoint past its done prefix,
        with their projections merged in log order; then the first failure, if any."""
        handles = self.handler.handles
        units = split(batch, self.sequence_by, lambda recorded: handles(recorded.data))
        done, outcomes, error = self._fan_out.wave(
            batch, units, lambda item: self._item(item)[0], lambda r: handles(r.data)
        )
        pending: Pending = {}
        for projections in outcomes:
            merge_projections(pending, projections)
        last = batch[done - 1].position if done else None
        self._commit(last or self.position, pending)
        if error is not None:
            raise error

    def _item(self, item: Item) -> tuple[list[Projection], bool]:
        """One entry of a batch: its listeners' projections and whether they dispatched,
        or nothing for an event this handler skips, has parked already or holds behind
        its stream's parked one. Raises SubscriptionFailed or StoreError."""
        dead_letters = self._dead_letters
        if isinstance(item, CorruptEvent):
            dead_letters.damaged(item)
            return [], False
        if not self.handler.handles(item.data) or item.position in (
            dead_letters.positions  # parked already (its checkpoint set back: reset)
        ):
            self._states.follow(item)
            return [], False
        head = dead_letters.blocked.get(item.aggregate_id)
        if head is not None and head.position < item.position:
            self._states.follow(item)  # keep a cached state current: no listener saw it
            dead_letters.hold(item, head)
            return [], False
        # retried with backoff, then parked (or SubscriptionFailed)
        return dead_letters.attempt(item, self.retries, self.backoff)

    def _handle(self, recorded: Recorded[Any]) -> tuple[list[Projection], bool]:
        projections: list[Projection] = []
        steps = split_outputs(
            self.handler.outputs(recorded, self._states.at(recorded)), projections
        )
        self._rows.check(projections)  # a row no store keeps fails its event, not the batch
        if steps:
            # keyed by handler, event, listener and the command itself: handled again, it
            # sends nothing twice, and takes the branch the first run took
            self.command_handler.follow_up(self.name, recorded, steps)
        return projections, bool(steps)

    def _commit(self, position: int, pending: Pending) -> None:
        parked = self._dead_letters.unsaved(position)
        if position == self.position and not pending and not parked:
            return
        try:
            self.checkpoints.save(
                self.name,
                position,
                expected=self.position,
                projections=list(pending.values()),
                projection_store=self.projection_store,
                parked=parked,
            )
        except CheckpointConflict:
            self._position = None  # reload: whoever moved it knows better
            self._states.clear()
            raise
        self._moved_to(position)

    def _moved_to(self, position: int) -> None:
        with self._progress:
            self._position = position
            self._progress.notify_all()

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
            try:
                self._lock.release()  # a standby stops trying: what it tried with is closed
            finally:
                self._fan_out.close()  # even when the release failed: no worker left behind

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
        projection type's table for the rebuilt one, move the checkpoint to the end and
        empty the dead letters: in one transaction when the read models share the
        checkpoints' database (see :func:`.replay.replay_into` for the other case).

        Commands the listeners return are dispatched only for events past the old
        checkpoint or parked (never handled): a replay rebuilds, it does not re-run.
        Holds the handler's lock, so nothing else runs it meanwhile; a listener error
        aborts the replay with nothing replaced. ``progress`` gets the number of events
        read after each batch; the rebuilt rows wait in memory for the swap.
        """
        target = self.projection_store
        if not isinstance(target, ReplaceableProjectionStore):
            raise IncidentError(f"{target!r} cannot replace tables, so it cannot be replayed into")
        with self._guard, self._replaying(), self._dead_letters.turn():
            self._position = self.checkpoints.load(self.name)
            done = replay_into(
                self.handler,
                self.command_handler,
                self.checkpoints,
                self._states,
                already=self._position,
                batch_size=self.batch_size,
                progress=progress,
            )
            self._moved_to(done.position)
            return done

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

    # -- dead letters: see incident.subscriptions.dead_letters --------------------------------

    def parked(self) -> list[Parked]:
        return self._dead_letters.parked()

    def retry_parked(self, position: int | None = None) -> list[int]:
        """Handle parked events again, stream by stream in position order: all of them,
        or those of ``position``'s stream up to it (earlier ones first), taking turns
        with retries elsewhere. One that fails again stays parked (one more attempt, its
        new error), the rest of its stream held. Those that succeed leave the dead
        letters, their projections written. Returns the positions that succeeded."""
        with self._guard:
            return self._dead_letters.retry(position)

    def skip_parked(self, position: int) -> Parked:
        """Drop one parked event from the dead letters without handling it, so that the
        events held behind it can be retried (``retry_parked``, or the runner's next
        step). Returns the dropped entry; IncidentError if nothing is parked there."""
        with self._guard:
            return self._dead_letters.skip(position)
