"""Dead letters: the events a subscription could not handle, and the streams they hold.

A listener that keeps failing on an event parks it (or stops the subscription, with
``on_failure="stop"``: :class:`SubscriptionFailed`). Parking holds the stream: the
handler's later events of that aggregate are parked behind it as *held* (attempts 0),
unhandled, so a retry applies them in log order and a read model never moves backwards.

A row the store cannot read (CorruptEvent) is read past (:func:`read_batch`), then
skipped when the handler does not listen to its stored type, else parked at once: it
does not heal by waiting.

Retries may run in another process than the runner, so two rules keep them from writing
an older row over a newer one. A batch's dead letters are written with its checkpoint,
in the transaction that writes the rows the batch made (:meth:`DeadLetters.unsaved`): a
retry elsewhere never sees an entry whose stream's earlier rows are still to come, and a
runner whose checkpoint loses to another's (CheckpointConflict) leaves none. And
retries, skips, replays and the runner's healing take turns (one lock per handler,
across processes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

import msgspec

from ..errors import CorruptEvent, IncidentError, StoreError
from ..fp import groupby
from ..ids import utc_now
from ..messages import Projection, Recorded
from ..storable import error_text
from ..stores import CheckpointStore, EventStore, Parked, ProjectionStore
from ..stores._common import closing_iterator

__all__ = [
    "DeadLetters",
    "OnFailure",
    "SubscriptionFailed",
    "by_stream",
    "parked_entry",
    "read_batch",
]

log = logging.getLogger("incident.subscriptions")

OnFailure = Literal["park", "stop"]
# The subscription's handling of one event: its projections, and whether it dispatched.
Handle = Callable[[Recorded[Any]], tuple[list[Projection], bool]]


class SubscriptionFailed(IncidentError):
    """A listener kept failing on one event and the subscription was told to stop there.
    Everything before that event is checkpointed; the cause is chained."""

    def __init__(self, handler: str, position: int, error: BaseException) -> None:
        self.handler, self.position = handler, position
        super().__init__(
            f"{handler} stopped at position {position}: {type(error).__name__}: {error}"
        )


class DeadLetters:
    """One handler's parked events: parking, holding streams behind them, retrying.

    ``blocked`` maps each parked stream (aggregate id) to its first parked event, which
    the handler's later events of that stream are held behind; ``positions`` are the
    parked positions. Both are loaded afresh by :meth:`load` for every batch. ``handle``
    handles one event as the subscription does (used by the retries).

    In a wave (:mod:`.fan_out`) several workers park and hold at once, each for streams
    no other worker has: they add entries under their own keys, never the same one.
    """

    def __init__(
        self,
        name: str,
        *,
        checkpoints: CheckpointStore,
        event_store: EventStore,
        projection_store: ProjectionStore,
        handle: Handle,
        listened: set[str],
        on_failure: OnFailure,
    ) -> None:
        self.name, self.checkpoints = name, checkpoints
        self.event_store, self.projection_store = event_store, projection_store
        self.handle, self.listened, self.on_failure = handle, listened, on_failure
        self.blocked: dict[str, Parked] = {}
        self.positions: set[int] = set()
        # the batch's dead letters, written with its checkpoint (see ``unsaved``)
        self._unsaved: list[Parked] = []
        self._turn = checkpoints.lock(f"{name}.retry")  # see the module's docstring

    def parked(self) -> list[Parked]:
        return self.checkpoints.parked(self.name)

    def load(self) -> None:
        """Read the handler's dead letters once for the batch (not once per event), and
        heal streams whose first parked event is a held one.

        A held event waits for the failure ahead of it. If another process retried or
        skipped that failure while this one was parking events behind it (from a list
        it had read before), a held event can be left first with nothing failed ahead:
        nobody would ever retry it, and it would hold its stream forever. Nothing is
        wrong with it, so it is retried here, as ``retry`` would; unless a retry is
        running elsewhere (it may be handling that very stream): then next batch."""
        parked = self.parked()
        if any(stream[0].held for stream in by_stream(parked).values()):
            with self._taking_turns(wait=False) as turn:
                if turn:  # listed again in turn: the list before may be stale already
                    parked = self._heal(self.parked())
        self.blocked, self.positions, self._unsaved = {}, set(), []
        for stream in by_stream(parked).values():
            self.blocked[stream[0].aggregate_id] = stream[0]
            self.positions.update(p.position for p in stream)

    def _heal(self, parked: list[Parked]) -> list[Parked]:
        """Retry the streams led by a held event; what is still parked afterwards."""
        left: list[Parked] = []
        for stream in by_stream(parked).values():
            if stream[0].held:
                _, stream = self.retry_stream(stream)
            left += stream
        return left

    def turn(self) -> AbstractContextManager[bool]:
        """Hold the handler's retry turn, waiting for a retry running elsewhere to end
        (a replay: a retry after its swap would write its rows over the replayed ones)."""
        return self._taking_turns(wait=True)

    @contextmanager
    def _taking_turns(self, *, wait: bool) -> Iterator[bool]:
        """Hold the handler's retry turn (waiting for it, or not): True if taken."""
        taken = self._turn.acquire(timeout=0)
        if not taken and wait:
            log.info("%s: waiting for a retry running elsewhere to end", self.name)
            taken = self._turn.acquire(timeout=None)
        try:
            yield taken
        finally:
            self._turn.release()  # not taken: closes what the attempt opened

    # -- parking ---------------------------------------------------------------

    def attempt(
        self, recorded: Recorded[Any], retries: int, backoff: float
    ) -> tuple[list[Projection], bool]:
        """``handle(recorded)``, tried again ``retries`` times with exponential backoff
        when a listener raises, then parked (:meth:`failed`): nothing, then. A
        StoreError is the database, not this event: it is raised, nothing is parked."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return self.handle(recorded)
            except StoreError:
                raise  # run() waits for the database
            except Exception as error:
                # a damaged row does not heal by waiting: park (or stop) at once
                if attempts <= retries and not isinstance(error, CorruptEvent):
                    log.warning(
                        "%s failed on #%s (%s), try %s of %s: %s",
                        self.name,
                        recorded.position,
                        recorded.event_type,
                        attempts,
                        retries + 1,
                        error_text(error),  # a log line any handler can write
                    )
                    time.sleep(backoff * 2 ** (attempts - 1))
                    continue
                self.failed(recorded, error, attempts)
                return [], False

    def damaged(self, damage: CorruptEvent) -> None:
        """An event the store cannot read: skipped when this handler does not listen to
        its stored type, else parked (holding its stream) or SubscriptionFailed."""
        assert damage.position is not None  # read_batch only keeps those it can place
        if damage.position in self.positions:
            return  # parked already (read again after its checkpoint was set back)
        if damage.event_type is not None and damage.event_type not in self.listened:
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
            error=error_text(damage),
            attempts=1,
            parked_at=utc_now(),
        )
        self._unsaved.append(parked)
        self.blocked.setdefault(damage.aggregate_id, parked)
        self.positions.add(damage.position)

    def failed(self, recorded: Recorded[Any], error: Exception, attempts: int) -> None:
        """A listener that failed on ``recorded`` ``attempts`` times: SubscriptionFailed
        with ``on_failure="stop"``, else the event is parked and its stream held."""
        if self.on_failure == "stop":
            raise SubscriptionFailed(self.name, recorded.position, error) from error
        log.error(
            "%s parked #%s after %s tries: %s; its stream %r is held behind it",
            self.name,
            recorded.position,
            attempts,
            text := error_text(error),
            recorded.aggregate_id,
        )
        parked = parked_entry(self.name, recorded, text, attempts)
        self._unsaved.append(parked)
        # the stream's later events wait behind it: retried in order, they write the
        # read model in log order, never an older row over a newer one
        self.blocked[recorded.aggregate_id] = parked
        self.positions.add(recorded.position)

    def hold(self, recorded: Recorded[Any], head: Parked) -> None:
        """Park an event behind the parked one of its stream without handling it."""
        self._unsaved.append(parked_entry(self.name, recorded, _held_behind(head), 0))
        self.positions.add(recorded.position)

    def unsaved(self, upto: int) -> list[Parked]:
        """The dead letters the batch made up to ``upto``, to write with its checkpoint
        there: a runner whose checkpoint loses to another's (CheckpointConflict) leaves
        none behind for events the other handled. Later ones are dropped: the events
        they name come round again after the checkpoint and are parked again."""
        entries, self._unsaved = self._unsaved, []
        return [entry for entry in entries if entry.position <= upto]

    # -- retrying --------------------------------------------------------------

    def retry(self, position: int | None = None) -> list[int]:
        """Handle parked events again, stream by stream in position order: all of them,
        or those of ``position``'s stream up to and including it. Returns the positions
        that succeeded (see ``Subscription.retry_parked``)."""
        with self._taking_turns(wait=True):
            streams = by_stream(self.parked())
            if position is not None:
                streams = {
                    stream_id: stream
                    for stream_id, stream in streams.items()
                    if any(p.position == position for p in stream)
                }
            succeeded: list[int] = []
            for stream in streams.values():
                succeeded += self.retry_stream(stream, upto=position)[0]
        return sorted(succeeded)

    def skip(self, position: int) -> Parked:
        """Drop one parked event without handling it; IncidentError if none is there."""
        with self._taking_turns(wait=True):
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

    def retry_stream(
        self, stream: list[Parked], upto: int | None = None
    ) -> tuple[list[int], list[Parked]]:
        """Retry one stream's parked events in position order (up to ``upto``), stopping
        at the first that fails again. Returns the positions that succeeded and the
        stream's entries still parked, first the one that failed."""
        succeeded: list[int] = []
        for index, parked in enumerate(stream):
            if upto is not None and parked.position > upto:
                return succeeded, stream[index:]
            try:
                projections, _ = self.handle(read_one(self.event_store, parked.position))
            except StoreError:
                raise  # the database, not this event: it stays as it was
            except Exception as error:  # a listener's, or a row that cannot be read
                failed = msgspec.structs.replace(
                    parked,
                    error=error_text(error),
                    attempts=parked.attempts + 1,
                    parked_at=utc_now(),
                )
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


def read_batch(
    event_store: EventStore, after: int, size: int
) -> list[Recorded[Any] | CorruptEvent]:
    """Up to ``size`` events of the log after ``after``, where a row the store cannot
    read is replaced by the CorruptEvent naming it: the reading goes on after it instead
    of ending there."""
    batch: list[Recorded[Any] | CorruptEvent] = []
    damaged: dict[int, CorruptEvent] = {}
    while len(batch) < size:
        if after + 1 in damaged:
            batch.append(damaged.pop(after + 1))
            after += 1
            continue
        limit = size - len(batch)
        if damaged:  # the rows before it in its page were never handed out: read them
            limit = min(limit, min(damaged) - after - 1)
        read = 0
        try:
            for recorded in event_store.read_all(after=after, limit=limit):
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


def read_one(event_store: EventStore, position: int) -> Recorded[Any]:
    """The event at ``position``; CorruptEvent when the log has no row there."""
    with closing_iterator(event_store.read_all(after=position - 1, limit=1)) as read:
        recorded = next(read, None)
    if recorded is None or recorded.position != position:
        raise CorruptEvent(position, "", f"position {position} is missing from the log")
    return recorded


def parked_entry(handler: str, recorded: Recorded[Any], error: str, attempts: int) -> Parked:
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


def _held_behind(head: Parked) -> str:
    """The error text of an event held behind ``head`` (attempts 0 says it is held)."""
    return f"held behind #{head.position} ({head.error})"


def by_stream(parked: Iterable[Parked]) -> dict[str, list[Parked]]:
    """Dead letters per aggregate id, each stream's in position order."""
    return groupby(lambda p: p.aggregate_id, sorted(parked, key=lambda p: p.position))
