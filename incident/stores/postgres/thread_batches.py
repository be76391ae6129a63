"""Concurrent commits of one process's threads in one Postgres transaction.

A combining writer, as on SQLite (:mod:`incident.stores.sqlite.group_commit`), without a
writer thread. A thread whose commit finds none of this store's commits in flight
commits alone, on its own thread, by the path it always took (predicted, numbered, or
locked: :mod:`.events`), so a single writer pays one mutex for this. A thread that finds
one in flight queues and sleeps. When a commit is over, the lead goes to the first
thread queued, which takes everything queued since (up to ``max_batch``) and commits it
as one batch (:mod:`.batch`: one lock, two round trips, one flush), or alone when it is
the only one; then it wakes each of the others with its own outcome, only once that
outcome is durable, and hands the lead on. So while one commit waits for its fsync the
next batch gathers, and eight threads put several commands in each transaction instead
of queueing one by one for the schema's append lock.

Two kinds of append do not queue (:meth:`.events.PostgresEventStore.commit`): those
under an idempotency key (a batch writes them one by one anyway), and those of a thread
in a turn on a stream, which holds a pooled connection already (queued, it would keep
it while a batch's writer waited for one). They commit on their own thread, beside the
batches, and the append lock orders them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..combining import DONE, TAKEN, Combiner, Ticket

__all__ = ["MAX_BATCH", "ThreadBatches"]

T = TypeVar("T")
R = TypeVar("R")

#: commits in one batch at most: a batch holds its callers' acknowledgements until all
#: of it is written
MAX_BATCH = 64


class ThreadBatches(Combiner[T, R]):
    """``commit(item)`` through ``one(item)`` when no other commit is in flight, else in
    a batch that ``many(items, committed)`` writes (each item's outcome, in order, or the
    error that kept it out), calling ``committed()`` once its transaction has committed
    and before it waits for the flush: the lead is handed on then, so the next batch is
    written while this one's flush is under way. While threads have queued in the last
    ``CONTENDED`` seconds, a commit that finds none in flight goes through ``many`` too
    (a lone commit by ``one`` would hold the schema's lock through its fsync).
    ``interrupted(item, error)`` is what a caller of a batch is told when the thread
    writing it was interrupted (KeyboardInterrupt) before the outcome was known.
    ``batches`` and ``batched`` count the batches written by ``many`` and their commits."""

    CONTENDED = 0.1

    def __init__(
        self,
        one: Callable[[T], R],
        many: Callable[[list[T], Callable[[], None]], list[R | Exception]],
        interrupted: Callable[[T, BaseException], Exception],
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._one, self._many, self._interrupted = one, many, interrupted
        self.max_batch = max_batch
        self.batches = 0
        self.batched = 0
        super().__init__()

    def commit(self, item: T) -> R:
        ticket: Ticket[T, R] = Ticket(item)
        with self.mutex:
            alone = not self.busy
            self.busy = True
            if alone:
                ticket.state = TAKEN
                contended = time.monotonic() - self.queued_at < self.CONTENDED
            else:
                self.queue.append(ticket.sleeper())
        if alone and not contended:
            try:
                return self._one(item)
            finally:
                with self.mutex:
                    self.hand_on()
        if not alone:
            try:
                ticket.wake.acquire()
            except BaseException:
                self.abandon(ticket)
                raise
            if ticket.state == DONE:
                return ticket.outcome()
            with self.mutex:  # handed the lead: take the next batch, this one first
                batch = self._take()
            assert batch[0] is ticket
        else:
            batch = [ticket]
        self._lead(batch)
        return ticket.outcome()

    def _take(self) -> list[Ticket[T, R]]:
        batch: list[Ticket[T, R]] = []
        while self.queue and len(batch) < self.max_batch:
            taken = self.queue.popleft()
            taken.state = TAKEN
            batch.append(taken)
        return batch

    def _lead(self, batch: list[Ticket[T, R]]) -> None:
        """Write the batch; hand the lead on once it has committed (or failed), and wake
        the others once their outcomes are final."""
        handed = False

        def hand_on() -> None:
            nonlocal handed
            if not handed:
                handed = True
                with self.mutex:
                    self.hand_on()

        try:
            self._write(batch, hand_on)
        finally:
            hand_on()
            with self.mutex:
                for done in batch:
                    done.state = DONE
            for other in batch[1:]:
                other.wake.release()

    def _write(self, batch: list[Ticket[T, R]], committed: Callable[[], None]) -> None:
        try:
            outcomes: list[Any] = self._many([t.item for t in batch], committed)
        except Exception as error:  # the batch's own failure: each caller is told
            outcomes = [error] * len(batch)
        except BaseException as error:  # interrupted: the others cannot know what landed
            for other in batch[1:]:
                other.error = self._interrupted(other.item, error)
            raise
        self.batches += 1
        self.batched += len(batch)
        for ticket, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                ticket.error = outcome
            else:
                ticket.result = outcome

    def renew(self) -> None:
        super().renew()
        self.queued_at = -1.0  # when a lead last passed to a queued thread

    def handed_on(self) -> None:
        self.queued_at = time.monotonic()
