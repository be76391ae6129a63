"""Concurrent commits of one process's threads in one Postgres transaction.

A combining writer, as on SQLite (:mod:`incident.stores.sqlite.group_commit`), without a
writer thread. Up to ``depth`` (two) commits of a store go at once, each on its own
thread, by the path a commit always took (predicted, numbered, or locked:
:mod:`.events`): one can be written while the other's flush is under way, so a single
writer, and two, pay one mutex for this. A thread that finds that many in flight queues
and sleeps. When a commit in flight is over, its place goes to the first thread queued,
which takes everything queued since (up to ``max_batch``) and commits it as one batch
(:mod:`.batch`: one lock, two round trips, one flush), or by the usual path when it is
alone. A batch gives its place on as soon as its transaction has committed, before its
flush, and wakes each of the others with its own outcome only once that flush has
covered it. So eight threads put several commands in each transaction instead of
queueing one by one for the schema's append lock.

Two kinds of append do not queue (:meth:`.events.PostgresEventStore.commit`): those
under an idempotency key (a batch writes them one by one anyway), and those of a thread
in a turn on a stream, which holds a pooled connection already (queued, it would keep
it while a batch's writer waited for one). They commit on their own thread, beside the
batches, and the append lock orders them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from ..combining import DONE, QUEUED, TAKEN, Combiner, Ticket, for_each_caller

__all__ = ["MAX_BATCH", "ThreadBatches"]

T = TypeVar("T")
R = TypeVar("R")

#: commits in one batch at most: a batch holds its callers' acknowledgements until all
#: of it is written
MAX_BATCH = 64


class ThreadBatches(Combiner[T, R]):
    """``commit(item)`` through ``one(item)`` while fewer than ``depth`` commits are in
    flight, else queued for a batch that ``many(items, committed)`` writes (each item's
    outcome, in order, or the error that kept it out), calling ``committed()`` once its
    transaction has committed and before it waits for the flush: its place in flight is
    handed on then. A queued commit taken alone goes through ``one``.
    ``interrupted(item, error)`` is what a caller of a batch is told when the thread
    writing it was interrupted (KeyboardInterrupt) before the outcome was known.
    ``batches`` and ``batched`` count the batches written by ``many`` and their commits."""

    #: commits in flight before threads queue: one written while another one's flush
    #: is under way
    depth = 2

    def __init__(
        self,
        one: Callable[[T], R],
        many: Callable[[list[T], Callable[[], None]], list[R | Exception]],
        interrupted: Callable[[T, BaseException], Exception],
    ) -> None:
        self._one, self._many, self._interrupted = one, many, interrupted
        self.max_batch = MAX_BATCH
        self.batches = 0
        self.batched = 0
        super().__init__()

    def commit(self, item: T) -> R:
        with self.mutex:
            direct = self.in_flight < self.depth  # then nobody is queued either
            if direct:
                self.in_flight += 1
            else:
                ticket: Ticket[T, R] = Ticket(item).sleeper()
                self.queue.append(ticket)
        if direct:
            try:
                return self._one(item)
            finally:
                with self.mutex:
                    self.hand_on()  # its place in flight goes to the first queued
        try:
            ticket.wake.acquire()
        except BaseException:
            self.abandon(ticket)
            raise
        if ticket.state == DONE:
            return ticket.outcome()
        with self.mutex:  # handed a place in flight: take the next batch, this one first
            batch = self._take(ticket)
        if len(batch) > 1:
            self._lead(batch)
            return ticket.outcome()
        try:  # alone after all: its own way, as a direct commit
            return self._one(item)
        finally:
            with self.mutex:
                ticket.state = DONE
                self.hand_on()

    def _take(self, ticket: Ticket[T, R]) -> list[Ticket[T, R]]:
        """Under the mutex: the batch ``ticket`` leads, in queue order after it, leaving
        out a caller handed a lead of its own."""
        batch, rest = [ticket], deque[Ticket[T, R]]()
        ticket.state = TAKEN
        for other in self.queue:
            if other is ticket:
                continue
            if other.state == QUEUED and len(batch) < self.max_batch:
                other.state = TAKEN
                batch.append(other)
            else:
                rest.append(other)
        self.queue = rest
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
            outcomes = [for_each_caller(error) for _ in batch]
        except BaseException as error:  # interrupted: the others cannot know what landed
            for other in batch[1:]:
                other.error = self._interrupted(other.item, error)
            raise
        with self.mutex:  # two batches can end at once
            self.batches += 1
            self.batched += len(batch)
        for ticket, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                ticket.error = outcome
            else:
                ticket.result = outcome

    def renew(self) -> None:
        super().renew()
        self.in_flight = 0  # commits under way, direct or batches, at most ``depth``

    def lapsed(self) -> None:
        self.in_flight -= 1
