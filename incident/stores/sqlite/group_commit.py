"""Group commit: concurrent appends to one SQLite file share one transaction, so one
fsync makes a whole batch of commands durable.

A combining writer, no writer thread. A caller whose append finds no batch in flight
becomes the *leader* and writes on its own thread, with its own connection; one that
finds a batch in flight queues and waits. When the leader's transaction is over, it
wakes the callers of its batch with their own outcomes and hands the lead to the first
caller still queued, which takes everything queued since (up to a bound) as the next
batch. So while one batch waits for its fsync the next one gathers, and a writer alone
runs exactly as it would without any of this: on its own thread, in a transaction of
its own, without a savepoint.

Inside a batch of several, the appends are written in bulk
(:mod:`incident.stores.sqlite.batch`): each is checked in turn (its key, its expected
version, its ``project``), one that fails gets its error alone and writes nothing, and
the rows of the others go in with a statement per table, inside a savepoint. Should one
of those writes fail, the savepoint undoes them and the batch is written again one
append at a time, each in its own ``SAVEPOINT``, so the append whose rows cannot be
stored fails alone and the others go on. Then one ``COMMIT``; only once it has returned
is anyone woken, so an acknowledged append is durable. When ``BEGIN`` or ``COMMIT``
fails, or SQLite rolls the whole transaction back itself (a full disk, an I/O error),
nothing of the batch was written and every caller of the batch gets the error.
``docs/writes.md`` says why ordering and gapless positions hold.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from ..combining import DONE, QUEUED, TAKEN, Combiner, Ticket, for_each_caller
from .database import Database

__all__ = ["MAX_BATCH_EVENTS", "MAX_BATCH_REQUESTS", "GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")

#: bounds on one batch (its first append is taken whatever its size): a batch holds the
#: write lock, and its callers' acknowledgements, for as long as it takes to write it
MAX_BATCH_REQUESTS = 64
MAX_BATCH_EVENTS = 4096


class GroupCommit(Combiner[T, R]):
    """Commits the appends of concurrent callers on one database together (see the
    module). ``write(conn, items)`` writes appends inside the open transaction and
    returns each one's outcome (its result, or the error that kept it out, with nothing
    of it written), or None, having written nothing, when a batch of several must be
    written one by one; if it raises, its writes are undone (for a batch of several,
    which then goes one by one, each in a savepoint). ``R`` is never an exception. ``landed(conn,
    outcomes)`` says whether the appends that were written are in the log now: it settles
    the one case where a batch's fate is not known from the call itself (its leader
    interrupted around ``COMMIT``).

    ``transactions`` and ``appends`` count what has been committed through it, so a
    test or a benchmark can tell how many appends shared each commit."""

    def __init__(
        self,
        db: Database,
        write: Callable[[sqlite3.Connection, list[T]], list[R | Exception] | None],
        landed: Callable[[sqlite3.Connection, list[R]], bool],
        *,
        max_requests: int = MAX_BATCH_REQUESTS,
        max_events: int = MAX_BATCH_EVENTS,
        shared: bool = True,
    ) -> None:
        self._db = db
        self.shared = shared
        self._write = write
        self._landed = landed
        self.max_requests = max_requests
        self.max_events = max_events
        self.transactions = 0
        self.appends = 0
        super().__init__()

    def renew(self) -> None:
        super().renew()
        self.busy = False  # a leader is writing, or has been handed the lead

    def lapsed(self) -> None:
        self.busy = False

    @property
    def queued(self) -> int:
        """How many appends wait for a leader to take them (a batch in flight excluded)."""
        with self.mutex:
            return sum(1 for ticket in self.queue if ticket.state != TAKEN)

    def commit(self, item: T, size: int = 1) -> R:
        """Write ``item`` (``size`` events) in the next commit and return its outcome
        once that commit is durable, or raise its own error (or the batch's). Unless
        commits are ``shared``, each append commits by itself on its caller's thread,
        outside the queue and its counts."""
        if not self.shared:
            return self._transaction_of_one(item)
        ticket: Ticket[T, R] = Ticket(item, size)
        with self.mutex:
            alone = not self.busy
            self.busy = True
            if alone:
                # no batch in flight, so the queue is empty: this caller leads at once,
                # on its own thread, and its append is written without a savepoint
                ticket.state = TAKEN
            else:
                ticket.sleeper()
                self.queue.append(ticket)
        if alone:
            self._write_batch(ticket, [ticket])
            return ticket.outcome()
        try:
            ticket.wake.acquire()
        except BaseException:
            self.abandon(ticket)
            raise
        if ticket.state != DONE:
            self._lead(ticket)
        return ticket.outcome()

    def commit_many(self, items: list[tuple[T, int]]) -> list[R | Exception]:
        """Several appends (item, size) of one caller, as if each came from a caller of
        its own, and so in as few commits as the bounds allow: each one's outcome, in
        order, or the error that kept it out. This is how the async stores hand over
        what their tasks append at the same time: one thread, not one per append."""
        if not self.shared:
            outcomes: list[R | Exception] = []
            for item, _ in items:
                try:
                    outcomes.append(self._transaction_of_one(item))
                except Exception as error:
                    outcomes.append(error)
            return outcomes
        tickets: list[Ticket[T, R]] = [Ticket(item, size) for item, size in items]
        for ticket in tickets:
            ticket.sleeper()
        with self.mutex:
            idle = not self.busy
            fits = len(tickets) == 1 or (
                len(tickets) <= self.max_requests
                and sum(ticket.size for ticket in tickets) <= self.max_events
            )
            alone = idle and fits
            self.busy = True
            if alone:  # no batch in flight: these are the batch
                for ticket in tickets:
                    ticket.state = TAKEN
            else:
                self.queue.extend(tickets)
                if idle:  # too many for one batch: the first leads at once
                    self.hand_on()
        try:
            if alone:
                self._write_batch(tickets[0], list(tickets))  # a batch grows as written
            else:
                # each is written by the leader of its batch, or leads one (the first
                # of this caller's still queued when the lead comes to it)
                for ticket in tickets:
                    ticket.wake.acquire()
                    if ticket.state != DONE:
                        self._lead(ticket)
        except BaseException:
            for ticket in tickets:  # none left queued for a caller who is gone
                if ticket.state != DONE:
                    self.abandon(ticket)
            raise
        outcomes = []
        for ticket in tickets:
            try:
                outcomes.append(ticket.outcome())
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def _transaction_of_one(self, item: T) -> R:
        """One append in a transaction of its own: no savepoint, and its error undoes
        the transaction."""
        db = self._db
        try:
            with db.transaction() as conn:
                return self._one(conn, item)
        except sqlite3.Error as error:
            raise db.store_error(error) from error

    def _lead(self, ticket: Ticket[T, R]) -> None:
        with self.mutex:
            # the lead goes to the first caller queued, so this caller's append is first
            batch: list[Ticket[T, R]] = []
            self._take(batch)
        assert batch[0] is ticket
        self._write_batch(ticket, batch)

    def _take(self, batch: list[Ticket[T, R]]) -> list[Ticket[T, R]]:
        """Under the mutex, move queued appends into the batch, in queue order, within its
        bounds (its first append whatever its size); returns those taken."""
        events = sum(taken.size for taken in batch)
        start = len(batch)
        while self.queue and len(batch) < self.max_requests:
            events += self.queue[0].size
            if events > self.max_events and batch:
                break
            taken = self.queue.popleft()
            taken.state = TAKEN
            batch.append(taken)
        return batch[start:]

    def _write_batch(self, ticket: Ticket[T, R], batch: list[Ticket[T, R]]) -> None:
        """Write the batch ``ticket`` leads (it grows while it is written: see ``_run``),
        then wake the others with their outcomes and hand the lead on."""
        try:
            self._run(batch)
        finally:
            with self.mutex:
                if ticket.state != DONE:
                    # interrupted (KeyboardInterrupt, say) before every outcome was
                    # known: if the batch is not in the log, the others go back, first
                    # in line, for the next leader; this caller's own append leaves
                    # with its interruption, and so does one whose caller has gone
                    # (abandoned, DONE): handed the lead, it would never take it
                    if not self._in_log(batch):
                        waiting = [other for other in batch[1:] if other.state == TAKEN]
                        for other in reversed(waiting):
                            other.state = QUEUED
                            other.result = other.error = None
                            self.queue.appendleft(other)
                        del batch[1:]
                    for done in batch:
                        done.state = DONE
                self.hand_on()
            if len(batch) > 1:
                for done in batch[1:]:
                    done.wake.release()

    def _in_log(self, batch: list[Ticket[T, R]]) -> bool:
        """After an interruption: whether the batch committed (the interruption came
        once COMMIT had returned), read back from the log; the transaction is over
        either way, so the batch is in the log whole or not at all."""
        written = [t.result for t in batch if t.error is None and t.result is not None]
        if not written:
            return False
        try:
            with self._db.guard:
                return self._landed(self._db.conn(), written)
        except Exception as error:  # a driver error, the store closed meanwhile
            # the log cannot say: the others get an error rather than a second write
            # (and are woken: an error escaping here would leave them waiting for ever)
            for ticket in batch[1:]:
                ticket.error = self._own(error)
            return True

    def _run(self, batch: list[Ticket[T, R]]) -> None:
        """One transaction for the batch, every ticket ending with its outcome. A first
        part of one append (a writer alone) is written as it is: its error undoes the
        transaction, which holds nothing else. Then, before COMMIT, whatever queued
        while the part was written joins the batch, as the next part, until nothing
        more has come or the batch is full. A part of several goes in bulk, or, when
        that cannot be done, each append in a savepoint of its own, and so does a part
        of one after the first."""
        db = self._db
        try:
            with db.transaction() as conn:
                if len(batch) == 1:
                    batch[0].result = self._one(conn, batch[0].item)
                else:
                    self._write_part(conn, batch[:])
                while self.queue:  # read without the mutex: one missed waits its turn
                    with self.mutex:
                        part = self._take(batch)
                    if not part:
                        break
                    self._write_part(conn, part)
        except Exception as error:
            # BEGIN or COMMIT failed, the first append alone failed, or the transaction
            # is gone: nothing was written
            for ticket in batch:
                ticket.result = None
                ticket.error = self._own(error)
        else:
            self.transactions += 1
        for ticket in batch:
            ticket.state = DONE
            if ticket.error is None:
                self.appends += 1

    def _write_part(self, conn: sqlite3.Connection, part: list[Ticket[T, R]]) -> None:
        outcomes = self._bulk(conn, [t.item for t in part]) if len(part) > 1 else None
        if outcomes is None:
            for ticket in part:
                self._in_savepoint(conn, ticket)
            return
        for ticket, outcome in zip(part, outcomes, strict=True):
            if isinstance(outcome, Exception):
                ticket.error = self._own(outcome)
            else:
                ticket.result = outcome

    def _bulk(self, conn: sqlite3.Connection, items: list[T]) -> list[R | Exception] | None:
        """The whole batch in one go, inside a savepoint: the outcomes, or None with
        nothing written when the batch must go one append at a time (a write failed, so
        some append's rows cannot be stored, and only its own savepoint can tell which)."""
        savepoint = self._db.savepoint(conn)
        try:
            with savepoint:
                return self._write(conn, items)
        except Exception:
            if not (savepoint.closed and conn.in_transaction):
                raise  # the transaction is gone or must not commit
            return None

    def _in_savepoint(self, conn: sqlite3.Connection, ticket: Ticket[T, R]) -> None:
        """One append of the batch in its own savepoint: its error undoes it alone."""
        savepoint = self._db.savepoint(conn)
        try:
            with savepoint:
                ticket.result = self._one(conn, ticket.item)
        except Exception as error:
            if not (savepoint.closed and conn.in_transaction):
                raise  # the transaction is gone or must not commit
            ticket.result = None
            ticket.error = self._own(error)

    def _one(self, conn: sqlite3.Connection, item: T) -> R:
        """One append written by itself: its outcome, or its error raised."""
        outcomes = self._write(conn, [item])
        assert outcomes is not None  # only a batch of several is sent one by one
        outcome = outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _own(self, error: Exception) -> Exception:
        """The error as its caller sees it, a new one for each caller (each raises it on
        its own thread): a driver error becomes a StoreError naming the file, and a
        StoreError that failed a whole batch (a store closed) is copied."""
        if not isinstance(error, sqlite3.Error):
            return for_each_caller(error)
        translated = self._db.store_error(error)
        translated.__cause__ = error
        return translated
