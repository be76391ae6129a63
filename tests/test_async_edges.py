"""The edges of the async stores and handler: a task cancelled while its commit is in a
batch, a batch that fails, a store closed under waiting commits, work queued on workers
that stop, a live tail let go early, and the verbs the other suites do not call."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import incident
from incident.command_handler.asynchronous import TaskTurns
from incident.examples import bank
from incident.stores import AppendRequest, CommitCall, Committed, Owed
from incident.stores.async_commits import CommitBatches
from incident.stores.asynchronous import AsyncEventStore, Workers
from tests.conftest import on_backends

BATCHED = ["postgres", "sqlite"]  # the stores whose commits go in batches
WAIT = 10.0  # seconds any bounded wait may take on a loaded machine


def deposit(amount: int) -> list[bank.MoneyDeposited]:
    return [bank.MoneyDeposited(amount=amount)]


class HeldBatches:
    """Stands in for a store's ``batches``: each batch waits for ``release`` before it
    goes to the store's own batches (all its commits at once, so as one batch there);
    with ``fail``, the first batch fails as a whole with it instead."""

    def __init__(self, store: AsyncEventStore, fail: Exception | None = None) -> None:
        assert store.batches is not None
        self.own, self.fail = store.batches, fail
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.batches = CommitBatches(self._commit_many)
        store.batches = self.batches

    async def _commit_many(self, calls: Sequence[CommitCall]) -> list[Committed | Exception]:
        self.entered.set()
        await self.release.wait()
        fail, self.fail = self.fail, None  # the first batch only
        if fail is not None:
            raise fail
        outcomes = await asyncio.gather(
            *(self.own.commit(call) for call in calls), return_exceptions=True
        )
        assert all(isinstance(o, Committed | Exception) for o in outcomes), outcomes
        return list(outcomes)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds; fail after WAIT seconds."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


def logged(url: str) -> list[tuple[str, int, Any]]:
    """The log as a store opened anew reads it: (stream, version, event)."""
    store = incident.open_event_store(url)
    try:
        return [(r.aggregate_id, r.version, r.data) for r in store.read_all()]
    finally:
        store.close()


# -- cancellation and commit batches ---------------------------------------------------


@on_backends(BATCHED)
def test_a_task_cancelled_while_its_commit_is_in_a_batch_is_still_written(store_url: str) -> None:
    """Cancelled once its commit was handed over, a dispatch's command is written all
    the same (the task cannot take it back), the next dispatch on the aggregate sees
    it, and a retry under the same idempotency key returns it instead of writing it
    twice; a dispatch cancelled while its commit only gathered writes nothing."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            app = bank.build_async(store)
            await app.dispatch(bank.OpenAccount(aggregate_id="A"))
            held = HeldBatches(store)
            keyed = {"idempotency_key": "deposit-5"}
            in_batch = asyncio.ensure_future(
                app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5), keyed)
            )
            await asyncio.wait_for(held.entered.wait(), WAIT)
            gathering = asyncio.ensure_future(
                app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
            )
            await until(lambda: held.batches.gathered() == 1)  # behind the held batch
            in_batch.cancel()
            gathering.cancel()
            held.release.set()
            for task in (in_batch, gathering):
                with pytest.raises(asyncio.CancelledError):
                    await task
            # this one goes in a batch after the held one, so that one is over by then
            after = await app.dispatch(bank.DepositMoney(aggregate_id="A", amount=7))
            assert [r.version for r in after] == [3]
            assert (await app.state("bank_account", "A")).balance == 12
            again = await app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5), keyed)
            assert [(r.version, r.data.amount) for r in again] == [(2, 5)]
            assert await store.version("A") == 3

    asyncio.run(main())
    amounts = [getattr(e, "amount", None) for _, _, e in logged(store_url)]
    assert amounts == [None, 5, 7]


@on_backends(BATCHED)
def test_a_batch_that_fails_as_a_whole_fails_its_callers_not_a_cancelled_one(
    store_url: str,
) -> None:
    """When the store fails a whole batch, each task in it gets that error, a task
    cancelled meanwhile stays cancelled, and the commits gathered behind still go."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            held = HeldBatches(store, fail=incident.StoreError("the disk is gone (simulated)"))
            batches = held.batches
            first = [
                asyncio.ensure_future(
                    store.commit(
                        AppendRequest(aggregate_id=f"S{n}", events=deposit(n), expected_version=0)
                    )
                )
                for n in range(3)
            ]
            await asyncio.wait_for(held.entered.wait(), WAIT)
            behind = asyncio.ensure_future(
                store.commit(AppendRequest(aggregate_id="B", events=deposit(9), expected_version=0))
            )
            await until(lambda: batches.gathered() == 1)
            first[1].cancel()
            held.release.set()
            outcomes = await asyncio.gather(*first, return_exceptions=True)
            assert isinstance(outcomes[0], incident.StoreError)
            assert isinstance(outcomes[1], asyncio.CancelledError)
            assert isinstance(outcomes[2], incident.StoreError)
            committed = await asyncio.wait_for(behind, WAIT)
            assert [(r.aggregate_id, r.version) for r in committed.recorded] == [("B", 1)]

    asyncio.run(main())
    assert [(stream, version) for stream, version, _ in logged(store_url)] == [("B", 1)]


class Boom(Exception):
    """A read model's code that fails."""


def failing_projection(recorded: list[incident.Recorded[Any]]) -> list[Any]:
    raise Boom("the read model's code failed")


def test_each_commit_of_a_batch_gets_its_own_outcome(store_url: str) -> None:
    """Commits that share a batch each get their own outcome: a stale expected version,
    metadata no store can keep and a ``project`` that raises fail only their own task,
    with nothing of theirs written, and the others are written."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            await store.append("B", deposit(1), expected_version=0)
            before = (store.batches.batches, store.batches.commits) if store.batches else None
            calls = [
                CommitCall(AppendRequest(aggregate_id="A", events=deposit(2), expected_version=0)),
                CommitCall(AppendRequest(aggregate_id="B", events=deposit(3), expected_version=0)),
                CommitCall(
                    AppendRequest(
                        aggregate_id="C",
                        events=deposit(4),
                        expected_version=0,
                        metadata={"ratio": float("nan")},
                    )
                ),
                CommitCall(
                    AppendRequest(aggregate_id="D", events=deposit(5), expected_version=0),
                    project=failing_projection,
                ),
                CommitCall(AppendRequest(aggregate_id="E", events=deposit(6), expected_version=0)),
            ]
            outcomes = await asyncio.gather(
                *(store.commit(c.request, project=c.project) for c in calls),
                return_exceptions=True,
            )
            if store.batches is not None and before is not None:  # all five in one batch
                assert store.batches.batches == before[0] + 1
                assert store.batches.commits == before[1] + len(calls)
            a, b, c, d, e = outcomes
            assert isinstance(a, Committed) and [r.version for r in a.recorded] == [1]
            assert isinstance(b, incident.ConcurrencyError) and b.actual == 1
            assert isinstance(c, incident.Unstorable)
            assert isinstance(d, Boom)
            assert isinstance(e, Committed) and [r.aggregate_id for r in e.recorded] == ["E"]
            assert [r.aggregate_id async for r in store.read_all()] == ["B", "A", "E"]
            assert [await store.version(n) for n in "ABCDE"] == [1, 1, 0, 0, 1]

    asyncio.run(main())


@on_backends(BATCHED)
def test_commits_waiting_for_a_batch_when_the_store_closes_get_store_error(
    store_url: str,
) -> None:
    """close() does not wait for the commits still waiting to be written, and they do
    not hang: each, in the batch or gathered behind it, ends with StoreError, and
    nothing of them is in the log."""

    async def main() -> None:
        store = incident.open_async_event_store(store_url)
        app = bank.build_async(store)
        await app.dispatch(bank.OpenAccount(aggregate_id="A"))
        held = HeldBatches(store)
        in_batch = [
            asyncio.ensure_future(app.dispatch(bank.DepositMoney(aggregate_id="A", amount=n)))
            for n in (1, 2)
        ]
        await asyncio.wait_for(held.entered.wait(), WAIT)
        behind = asyncio.ensure_future(app.dispatch(bank.OpenAccount(aggregate_id="B")))
        await until(lambda: held.batches.gathered() == 1)
        await asyncio.wait_for(store.close(), WAIT)
        held.release.set()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*in_batch, behind, return_exceptions=True), WAIT
        )
        assert all(isinstance(o, incident.StoreError) for o in outcomes), outcomes
        with pytest.raises(incident.StoreError):
            await app.dispatch(bank.OpenAccount(aggregate_id="C"))

    asyncio.run(main())
    assert [(stream, version) for stream, version, _ in logged(store_url)] == [("A", 1)]


@on_backends(BATCHED)
def test_a_cancelled_batch_writer_fails_its_commits_with_store_errors(store_url: str) -> None:
    """The task writing a lane's batches cancelled (not the tasks that commit): those
    whose commit was handed over learn that it may or may not be written
    (CommitUnknown), those still gathering that it was not (StoreError), none is left
    waiting, and the next commit is written by a new writer."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            held = HeldBatches(store)
            in_batch = asyncio.ensure_future(
                store.commit(AppendRequest(aggregate_id="A", events=deposit(1), expected_version=0))
            )
            await asyncio.wait_for(held.entered.wait(), WAIT)
            behind = asyncio.ensure_future(
                store.commit(AppendRequest(aggregate_id="B", events=deposit(2), expected_version=0))
            )
            await until(lambda: held.batches.gathered() == 1)
            (writer,) = [
                t
                for t in asyncio.all_tasks()
                if t.get_coro().__qualname__ == "CommitBatches._write"
            ]
            writer.cancel()
            unknown, not_written = await asyncio.wait_for(
                asyncio.gather(in_batch, behind, return_exceptions=True), WAIT
            )
            assert isinstance(unknown, incident.CommitUnknown), unknown
            assert unknown.aggregate_id == "A"
            assert isinstance(not_written, incident.StoreError), not_written
            assert not isinstance(not_written, incident.CommitUnknown)
            assert "nothing" in str(not_written)
            assert held.batches.gathered() == 0
            held.release.set()
            again = await store.commit(
                AppendRequest(aggregate_id="B", events=deposit(3), expected_version=0)
            )
            assert [r.aggregate_id for r in again.recorded] == ["B"]

    asyncio.run(main())
    assert [(stream, version) for stream, version, _ in logged(store_url)] == [("B", 1)]
