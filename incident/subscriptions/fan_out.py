"""Fan-out: the units of a wave run on a pool of threads, and the wave waits for all.

The work of a subscription is mostly waiting: for the commits of the commands its
listeners dispatch. Run one after the other, each command pays its own commit; run side
by side, they arrive at the store together and share commits (Postgres acknowledges
many appends with one WAL flush, SQLite's group commit gives many one fsync). The
threads exist for that waiting; the listeners themselves are pure and quick.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

from .._forks import renew_in_forked_children
from ..messages import Projection, Recorded
from ..options import check_count
from .dead_letters import SubscriptionFailed
from .waves import Item, Unit, done_prefix

__all__ = ["FanOut"]

U = TypeVar("U")


class FanOut:
    """Runs ``work(unit)`` for every unit on up to ``concurrency`` threads (started on
    first use, kept between waves). Once a unit raises an error that ``halts`` (by
    default any), units that have not started yet are not started (``work`` is not
    called for them); those running finish. :meth:`run` returns the units' errors by
    index, after every started unit has ended: a wave never leaves a worker behind it.
    """

    def __init__(self, concurrency: int, name: str) -> None:
        check_count("concurrency", concurrency, 1)
        self.concurrency, self.name = concurrency, name
        self._pool: ThreadPoolExecutor | None = None
        self._opening = threading.Lock()
        renew_in_forked_children(self._forked)

    def run(
        self,
        units: Sequence[U],
        work: Callable[[U], None],
        halts: Callable[[BaseException], bool] = lambda error: True,
    ) -> dict[int, BaseException]:
        errors: dict[int, BaseException] = {}
        if len(units) <= 1 or self.concurrency == 1:
            for index, unit in enumerate(units):  # no thread to hop to: run it here
                try:
                    work(unit)
                except BaseException as error:  # handed back, by index
                    errors[index] = error
                    if halts(error):
                        break
            return errors
        failed = threading.Event()

        def one(index: int, unit: U) -> None:
            if failed.is_set():
                return
            try:
                work(unit)
            except BaseException as error:  # handed back, by index
                errors[index] = error
                if halts(error):
                    failed.set()

        pool = self._executor()
        wait([pool.submit(one, index, unit) for index, unit in enumerate(units)])
        return errors

    def wave(
        self,
        batch: list[Item],
        units: list[Unit],
        handle: Callable[[Item], list[Projection]],
        handles: Callable[[Recorded[Any]], bool],
    ) -> tuple[int, list[list[Projection]], BaseException | None]:
        """Handle a batch's units side by side, each in log order (``handle``: one
        item's projections). Returns how many items from the start are done, their
        projections in log order, and the first error in log order, if any.

        A unit with nothing ``handles`` wants (states to follow, no listener to wait
        for) runs here, in the calling thread. A listener that stopped the subscription
        (SubscriptionFailed) stops only its unit: the others go on to their ends, so
        everything before the failure is done, as one by one; any other error (the
        database) halts the wave, since the next unit would meet it too.
        """
        outcomes: list[list[Projection] | None] = [None] * len(batch)

        def work(unit: Unit) -> None:
            for index in unit:
                outcomes[index] = handle(batch[index])

        def busy(unit: Unit) -> bool:
            items = (batch[i] for i in unit)
            return any(not isinstance(item, Recorded) or handles(item) for item in items)

        for unit in units:
            if not busy(unit):
                work(unit)
        units = [unit for unit in units if busy(unit)]
        errors = self.run(units, work, halts=lambda e: not isinstance(e, SubscriptionFailed))
        done = done_prefix([outcome is not None for outcome in outcomes])
        prefix = [outcome or [] for outcome in outcomes[:done]]
        # each failed unit stopped at its first item without an outcome
        failed_at = {
            next(i for i in units[u] if outcomes[i] is None): error for u, error in errors.items()
        }
        return done, prefix, failed_at[min(failed_at)] if failed_at else None

    def _executor(self) -> ThreadPoolExecutor:
        with self._opening:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, f"incident-{self.name}")
            return self._pool

    def _forked(self) -> None:
        # a pool's threads do not cross a fork: the child starts its own when it needs them
        self._pool, self._opening = None, threading.Lock()

    def close(self) -> None:
        """Let the threads go (the next wave starts new ones)."""
        with self._opening:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
