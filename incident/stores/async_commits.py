"""Commits from many tasks, handed to a store that shares commits a batch at a time.

Without this, each task's commit would take a worker thread of its own into the
store's group commit: one thread hop there and one back per command, and a crowd of
threads contending for the GIL. Here the commits the loop's tasks ask for while one
batch is being written wait on the loop; when the batch is over, everything that
gathered goes to one worker as the next batch (``EventStore.commit_many``: one
transaction and one fsync when it fits the group commit's bounds), and each task is
woken with its own outcome. So one thread hop each way per batch, the shape of the
group commit itself: while a batch waits for its fsync, the next one gathers. The
async Postgres store writes its batches on the loop itself, on async connections
(:mod:`incident.stores.postgres.async_batch`): no thread hop at all.

Each command stays its own: its version check, its all-or-nothing write and its
error are its own (:mod:`incident.stores.sqlite.group_commit`), and a task is told
only once the commit holding its append is durable. Should the task that writes the
batches be cancelled (the committing tasks were not), each task whose commit it had
handed over gets CommitUnknown, and each still gathering a StoreError (nothing of it
was written): none is left waiting, and none is told it was cancelled.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence

from ..errors import CommitUnknown, StoreError
from .combining import for_each_caller
from .protocols import CommitCall, Committed

__all__ = ["MAX_BATCH", "CommitBatches", "CommitMany"]

#: commits handed over at a time (the group commit's own bound on one batch)
MAX_BATCH = 64


CANCELLED = "The task writing this event loop's batches of commits was cancelled"

#: writes one batch: each call's outcome, in order
CommitMany = Callable[[Sequence[CommitCall]], Awaitable[list[Committed | Exception]]]


class _Lane:
    """One event loop's commits: those gathering, and whether a batch is out."""

    __slots__ = ("gathering", "writer")

    def __init__(self) -> None:
        self.gathering: list[tuple[CommitCall, asyncio.Future[Committed]]] = []
        self.writer: asyncio.Task[None] | None = None  # held: the loop keeps weak refs


class CommitBatches:
    """Batches the commits of an event loop's tasks for ``commit_many`` (see the
    module): a store's, run on a worker, or an async store's own."""

    def __init__(self, commit_many: CommitMany, max_batch: int = MAX_BATCH) -> None:
        self._commit_many = commit_many
        self.max_batch = max_batch
        # a store may serve several loops in turn (asyncio.run twice): one lane each
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = (
            weakref.WeakKeyDictionary()
        )
        #: how many batches were handed over, and how many commits they held
        self.batches = 0
        self.commits = 0

    def gathered(self) -> int:
        """How many commits of the running loop wait for the next batch."""
        lane = self._lanes.get(asyncio.get_running_loop())
        return 0 if lane is None else len(lane.gathering)

    async def commit(self, call: CommitCall) -> Committed:
        """``call``'s commit, written with whatever else the loop's tasks commit now."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None:
            lane = self._lanes[loop] = _Lane()
        done: asyncio.Future[Committed] = loop.create_future()
        lane.gathering.append((call, done))
        if lane.writer is None:
            lane.writer = loop.create_task(self._write(lane))
        # a task cancelled once its commit is handed over leaves it in the batch: like
        # a commit on a worker thread, it is written or not whatever the task does now
        return await done

    async def _write(self, lane: _Lane) -> None:
        """Hand over what has gathered, batch after batch, until nothing is left."""
        try:
            while lane.gathering:
                batch = lane.gathering[: self.max_batch]
                del lane.gathering[: self.max_batch]
                # a task cancelled before its commit was handed over: never written
                batch = [(call, done) for call, done in batch if not done.done()]
                if not batch:
                    continue
                calls = [call for call, _ in batch]
                try:
                    outcomes = await self._commit_many(calls)
                except Exception as error:  # the store failed as a whole
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(for_each_caller(error))
                    continue
                except BaseException:  # this task cancelled: the batch's fate is not known
                    for call, done in batch:
                        if not done.done():
                            done.set_exception(
                                CommitUnknown(CANCELLED, call.request.aggregate_id, [])
                            )
                    raise
                self.batches += 1
                self.commits += len(batch)
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if isinstance(outcome, Exception):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
        finally:
            lane.writer = None
            for _, done in lane.gathering:  # only when this task itself was cancelled
                if not done.done():
                    done.set_exception(
                        StoreError(f"{CANCELLED}; nothing of this commit was written")
                    )
            lane.gathering.clear()
