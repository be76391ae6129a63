"""What the two combining writers share: SQLite's group commit
(:mod:`incident.stores.sqlite.group_commit`) and the thread batches of a Postgres store
(:mod:`incident.stores.postgres.thread_batches`). Neither has a writer thread: a caller
who finds nothing in flight leads and writes on its own thread; one who finds a commit
in flight queues a ticket and sleeps on it, until it is woken with its outcome or handed
the lead, which it then takes with whatever queued behind it."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar

from .._forks import renew_in_forked_children
from ..errors import StoreError

__all__ = ["DONE", "LEADS", "QUEUED", "TAKEN", "Combiner", "Ticket", "for_each_caller"]

T = TypeVar("T")
R = TypeVar("R")

# where a caller's commit is; every change happens under Combiner.mutex
QUEUED = 0  # waiting in the queue
LEADS = 1  # first in the queue and handed the lead: it takes the next batch
TAKEN = 2  # in a batch a leader is writing
DONE = 3  # its outcome is final (the batch's transaction is over)


def for_each_caller(error: Exception) -> Exception:
    """The error that failed a whole batch, as one of its callers is to raise it: a
    StoreError (a store closed, a server gone) is copied, cause and all, since each
    caller raises it on its own thread or task and every raise writes its traceback into
    the exception; another error (a caller's own, or one no copy could rebuild) is
    passed on as it is."""
    if type(error) is not StoreError:
        return error
    copied = StoreError(*error.args)
    copied.__cause__ = error.__cause__
    return copied


class Ticket(Generic[T, R]):
    """One caller's commit (``size`` events), its place in the queue and, once its batch
    is over, its outcome. A caller that queues sleeps on ``wake`` (``sleeper()``: a lock
    taken at creation), released once: when its outcome is final, or when it is handed
    the lead. A caller that leads at once never makes one."""

    __slots__ = ("error", "item", "result", "size", "state", "wake")

    def __init__(self, item: T, size: int = 1) -> None:
        self.item = item
        self.size = size
        self.state = QUEUED
        self.wake: Any = None  # threading.Lock, for a caller that sleeps
        self.result: R | None = None
        self.error: BaseException | None = None

    def sleeper(self) -> Ticket[T, R]:
        self.wake = threading.Lock()
        self.wake.acquire()
        return self

    def outcome(self) -> R:
        error = self.error
        if error is not None:
            self.error = None  # no cycle through the traceback
            raise error
        return self.result  # type: ignore[return-value]  # set whenever error is not


class Combiner(Generic[T, R]):
    """The queue, the lead and their mutex; a subclass writes the batches."""

    def __init__(self) -> None:
        self.renew()
        renew_in_forked_children(self.renew)

    def renew(self) -> None:
        """A fresh queue (also in a forked child: a parent's thread may have been
        leading, and the child has no such thread to finish the batch or hand on)."""
        self.mutex = threading.Lock()
        self.queue: deque[Ticket[T, R]] = deque()

    def abandon(self, ticket: Ticket[T, R]) -> None:
        """A queued caller interrupted while it waited (KeyboardInterrupt, say): a commit
        not yet taken leaves the queue unwritten, and a lead it was handed goes on to the
        next caller. One already taken is written or not with its batch; no one is told."""
        with self.mutex:
            if ticket.state in (QUEUED, LEADS):
                self.queue.remove(ticket)
                if ticket.state == LEADS:
                    self.hand_on()
            ticket.state = DONE

    def hand_on(self) -> None:
        """Under the mutex: the lead passes to the first caller queued and not handed a
        lead already (one may be, where several commits can be in flight), or lapses."""
        for ticket in self.queue:
            if ticket.state == QUEUED:
                ticket.state = LEADS
                ticket.wake.release()
                return
        self.lapsed()

    def lapsed(self) -> None:
        """Under the mutex: the lead lapses, with nobody queued (what the subclass counts
        as in flight goes down)."""
        raise NotImplementedError
