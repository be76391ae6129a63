"""The edges of the async stores and handler: a task cancelled while its commit is in a
batch, a batch that fails (or whose writer is cancelled), a store closed under waiting
commits, work queued on workers that stop, a live tail let go early (or left on a
closed loop), sync views of tails, subscriptions that fail or outlive their loop, and
the verbs the other suites do not call."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

import incident
from incident.command_handler.async_subscriptions import LoopReactor
from incident.command_handler.asynchronous import TaskTurns
from incident.examples import bank
from incident.stores import AppendRequest, CommitCall, Committed, Owed
from incident.stores.async_commits import CommitBatches
from incident.stores.asynchronous import AsyncEventStore, Workers
from incident.testing.asynchronous import EventLoopThread
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
def test_a_transfer_cancelled_while_its_commit_is_in_a_batch_is_written_whole(
    store_url: str,
) -> None:
    """Cancelled once its commit was handed over, a dispatch that starts a process is
    written with its read model and its owed follow-up in the one transaction (its task
    carries out none of it); ``complete_owed`` then moves the money, exactly once."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            app = bank.build_async(store)
            for account in ("S", "D"):
                await app.dispatch(bank.OpenAccount(aggregate_id=account))
            await app.dispatch(bank.DepositMoney(aggregate_id="S", amount=50))
            held = HeldBatches(store)
            transfer = bank.RequestTransfer(
                aggregate_id="T",
                source_account_number="S",
                destination_account_number="D",
                amount=20,
            )
            task = asyncio.ensure_future(app.dispatch(transfer))
            await asyncio.wait_for(held.entered.wait(), WAIT)
            task.cancel()
            held.release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: held.batches.batches == 1)
            assert [o.aggregate_id for o in await store.owed()] == ["T"]
            assert await store.version("S") == 2  # nothing of the process ran yet
            await app.complete_owed()
            await app.complete_owed()  # nothing is owed any more: nothing moves twice
            assert await store.owed() == []
            projections = store.projections()
            balances = [(await projections.get(bank.BankAccount, n)) for n in ("S", "D")]
            assert [b.balance for b in balances if b is not None] == [30, 20]

    asyncio.run(main())


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


# -- workers that stop ------------------------------------------------------------------


def test_work_queued_when_the_workers_stop_gets_store_error() -> None:
    """shutdown() lets the work under way finish, fails the work still queued with
    StoreError (a task cancelled itself stays cancelled) and any asked for later."""

    async def main() -> None:
        workers = Workers(1)
        started, release = threading.Event(), threading.Event()

        def held() -> str:
            started.set()
            assert release.wait(WAIT)
            return "done"

        running = asyncio.ensure_future(workers.run(held))
        await asyncio.wait_for(asyncio.to_thread(started.wait, WAIT), WAIT)
        queued = asyncio.ensure_future(workers.run(lambda: "never"))
        cancelled = asyncio.ensure_future(workers.run_batch(lambda: "never"))
        await asyncio.sleep(0)  # both are handed to their pools
        cancelled.cancel()
        workers.shutdown()
        release.set()
        assert await asyncio.wait_for(running, WAIT) == "done"
        with pytest.raises(incident.StoreError):
            await asyncio.wait_for(queued, WAIT)
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        for later in (workers.run, workers.run_batch):
            with pytest.raises(incident.StoreError):
                await later(lambda: "never")

    asyncio.run(main())


def test_workers_stopped_as_work_is_handed_to_them_say_store_error() -> None:
    """Workers stopped (by another thread) between the check and the hand-over: the
    pool's own refusal becomes the StoreError of a closed store."""

    async def main() -> None:
        workers = Workers(1)
        pool = workers._pool
        assert pool is not None
        submit = pool.submit

        def stopped_first(*args: Any, **kwargs: Any) -> Any:
            workers.shutdown()  # as another thread's close() would, at this moment
            return submit(*args, **kwargs)

        pool.submit = stopped_first  # type: ignore[method-assign]
        with pytest.raises(incident.StoreError, match="closed"):
            await workers.run(lambda: "never")

    asyncio.run(main())


def test_workers_of_none_run_the_work_on_the_loop_until_they_stop() -> None:
    async def main() -> None:
        workers = Workers(0)
        here = threading.current_thread()
        assert await workers.run(threading.current_thread) is here
        assert await workers.run_batch(threading.current_thread) is here
        workers.shutdown()
        for later in (workers.run, workers.run_batch):
            with pytest.raises(incident.StoreError):
                await later(threading.current_thread)

    asyncio.run(main())


# -- verbs the other suites leave out ---------------------------------------------------


def test_owed_work_is_kept_listed_by_handler_and_settled(store_url: str) -> None:
    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            recorded = await store.append("A", deposit(1) + deposit(2), expected_version=0)
            now = dt.datetime.now(dt.UTC)
            for handler, r in [
                ("mail", recorded[1]),
                ("mail", recorded[0]),
                ("audit", recorded[0]),
            ]:
                await store.owe(
                    Owed(
                        handler=handler,
                        position=r.position,
                        event_id=r.event_id,
                        aggregate_id=r.aggregate_id,
                        event_type=r.event_type,
                        owed_at=now,
                    )
                )
            assert [(o.handler, o.position) for o in await store.owed()] == [
                ("audit", 1),
                ("mail", 1),
                ("mail", 2),
            ]
            assert [o.position for o in await store.owed("mail")] == [1, 2]
            await store.settle("mail", 1)
            await store.settle("mail", 7)  # owed nothing there: nothing changes
            assert [(o.handler, o.position) for o in await store.owed()] == [
                ("audit", 1),
                ("mail", 2),
            ]
            assert await store.owed("nobody") == []

    asyncio.run(main())


def test_an_async_store_shares_its_database_with_its_own_projections_only(
    store_url: str, tmp_path: Path
) -> None:
    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            own = store.projections()
            assert store.shares_database_with(own)
            assert store.shares_database_with(own.sync)
            other = f"sqlite:///{tmp_path}/other.db" if store_url == "memory://" else "memory://"
            elsewhere = incident.open_async_projection_store(other)
            assert not store.shares_database_with(elsewhere)
            await elsewhere.close()

    asyncio.run(main())


def test_an_async_projection_store_closes_once_and_then_says_store_error(
    store_url: str,
) -> None:
    row = bank.BankAccount(
        aggregate_id="A",
        account_number="A",
        balance=3,
        version=1,
        event_id="e1",
        event_date=dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
    )

    async def main() -> None:
        async with incident.open_async_projection_store(store_url) as projections:
            await projections.project(row)
            assert await projections.get(bank.BankAccount, "A") == row
            assert await projections.all(bank.BankAccount) == [row]
        for verb in (
            projections.project(row),
            projections.get(bank.BankAccount, "A"),
            projections.all(bank.BankAccount),
        ):
            with pytest.raises(incident.StoreError):
                await verb
        await projections.close()  # again: nothing to do

    asyncio.run(main())
    if store_url != "memory://":
        store = incident.open_projection_store(store_url)
        assert store.get(bank.BankAccount, "A") == row
        store.close()


class Without:
    """A store of one's own lacking some verbs beyond EventStore's (``stream``, the
    ``wait_for_append`` that wakes tails): the memory store with those hidden."""

    def __init__(self, store: incident.EventStore, *hidden: str) -> None:
        self._store, self._hidden = store, hidden

    def __getattr__(self, name: str) -> Any:
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._store, name)


def test_a_store_without_stream_is_streamed_a_page_at_a_time_from_get() -> None:
    async def main() -> None:
        sync = incident.open_event_store("memory://")
        store = AsyncEventStore(Without(sync, "stream"), workers=0, page_size=2)  # type: ignore[arg-type]
        await store.append(
            "A", [bank.MoneyDeposited(amount=n) for n in range(1, 6)], expected_version=0
        )
        assert [r.version async for r in store.stream("A", after=1)] == [2, 3, 4, 5]
        assert [e.amount async for e in store.events("A")] == [1, 2, 3, 4, 5]
        assert [r.version for r in await store.stream_page("A", 1, 2)] == [2, 3]
        await store.close()

    asyncio.run(main())


# -- live tails let go --------------------------------------------------------------------


def watchers() -> int:
    """How many threads wait for appends on behalf of async tails (one per store)."""
    return sum(t.name == "incident-append-watch" for t in threading.enumerate())


async def no_watchers_but(count: int) -> None:
    await until(lambda: watchers() == count)


def test_an_async_tail_let_go_early_releases_what_it_held(store_url: str) -> None:
    """A tail cancelled while it waits for an append leaves the store's watch (whose
    thread ends once no tail waits), and one closed between events ends there; other
    tails of the store carry on."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            await store.append("A", deposit(1), expected_version=0)
            await no_watchers_but(0)
            waiting = asyncio.ensure_future(anext(store.subscribe(after=1, poll_interval=60)))
            await no_watchers_but(1)  # it waits, and the watch's thread with it
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await no_watchers_but(0)

            closed_early = store.subscribe(after=0, poll_interval=60)
            assert (await anext(closed_early)).position == 1
            await closed_early.aclose()
            with pytest.raises(StopAsyncIteration):
                await anext(closed_early)
            assert watchers() == 0

            still = asyncio.ensure_future(anext(store.subscribe(after=1, poll_interval=60)))
            await no_watchers_but(1)
            await store.append("A", deposit(2), expected_version=1)
            assert (await asyncio.wait_for(still, WAIT)).position == 2
            await no_watchers_but(0)

    asyncio.run(main())


def test_a_tail_left_on_a_closed_loop_does_not_keep_other_tails_from_waking(
    tmp_path: Path,
) -> None:
    """A tail whose event loop was closed under it, still waiting: an append wakes the
    other tails of the store all the same (with a poll too long to save them)."""
    store = incident.open_async_event_store(f"sqlite:///{tmp_path}/left.db")
    abandoned = asyncio.new_event_loop()

    async def start_waiting() -> asyncio.Future[Any]:
        waiting = asyncio.ensure_future(anext(store.subscribe(after=0, poll_interval=60)))
        await no_watchers_but(1)
        return waiting

    left = abandoned.run_until_complete(start_waiting())
    abandoned.close()  # its tail still waits in the store's watch

    async def main() -> None:
        tail = asyncio.ensure_future(anext(store.subscribe(after=0, poll_interval=60)))
        await store.append("A", deposit(1), expected_version=0)
        assert (await asyncio.wait_for(tail, WAIT)).position == 1
        await store.append("A", deposit(2), expected_version=1)
        second = await asyncio.wait_for(anext(store.subscribe(after=1, poll_interval=60)), WAIT)
        assert second.position == 2
        await store.close()

    asyncio.run(main())
    assert not left.done()


def test_a_tail_left_on_a_closed_loop_does_not_keep_the_watch_running() -> None:
    """A tail whose event loop was closed under it waits for nothing any more: the
    store's watch lets it go, and its thread ends, though the log never grows."""
    store = incident.open_async_event_store("memory://")
    abandoned = asyncio.new_event_loop()

    async def start_waiting() -> asyncio.Future[Any]:
        waiting = asyncio.ensure_future(anext(store.subscribe(after=0, poll_interval=60)))
        await no_watchers_but(1)
        return waiting

    abandoned.run_until_complete(start_waiting())
    abandoned.close()
    asyncio.run(no_watchers_but(0))


# -- the handler ----------------------------------------------------------------------------


def test_an_async_handler_refuses_a_handler_both_inline_and_as_a_subscription() -> None:
    """As the sync handler does: an event handler runs inline or durably, not both."""
    for make in (incident.CommandHandler, incident.AsyncCommandHandler):
        with pytest.raises(incident.RegistrationError, match="both inline and as a subscription"):
            make(  # type: ignore[operator]
                "memory://",
                aggregates=[bank.bank_account, bank.transfer],
                event_handlers=[bank.bank_projections],
                subscriptions=[bank.bank_projections],
            )


def test_task_turns_forget_only_streams_no_task_is_taking_turns_at() -> None:
    """Past ``size`` streams, the oldest idle one is forgotten, never one whose turn a
    task holds (that would let a second task in beside it)."""

    async def main() -> None:
        turns = TaskTurns(size=1)
        a, b = ("bank_account", "A"), ("bank_account", "B")
        turns.collided(a)
        async with turns.turn(a):
            turns.collided(b)  # a is held: b, the only idle one, goes
            assert turns.contended(a) and not turns.contended(b)
        turns.collided(b)  # a is idle now, and older
        assert turns.contended(b) and not turns.contended(a)
        turns.collided(b)  # known: nothing is forgotten
        assert turns.contended(b)

    asyncio.run(main())


def test_starting_subscriptions_twice_or_none_at_all_starts_nothing_more(tmp_path: Path) -> None:
    def runners() -> int:
        return sum(t.name.startswith("incident-sub") for t in threading.enumerate())

    async def main() -> None:
        url = f"sqlite:///{tmp_path}/subs.db"
        async with bank.build_async(url) as plain:
            assert len(plain.subscriptions) == 0
            await plain.subscriptions.start()
            assert runners() == 0
        app = incident.AsyncCommandHandler(
            url,
            aggregates=[bank.bank_account, bank.transfer],
            subscriptions=[bank.bank_projections],
        )
        async with app:
            assert len(app.subscriptions) == 1
            await app.subscriptions.start()
            await app.subscriptions.start()
            await app.dispatch(bank.OpenAccount(aggregate_id="S1"))
            await app.subscriptions.wait_until_caught_up(timeout=WAIT)
            assert runners() == 1
        await until(lambda: runners() == 0)

    asyncio.run(main())


# -- sync views of async stores -------------------------------------------------------------


def test_a_sync_view_of_an_async_tail_follows_the_log_as_a_sync_tail_does(store_url: str) -> None:
    """A suite written against the sync API runs unchanged on a view: its live tail
    yields the log and then each new event, rather than waiting for an end that never
    comes, and closing it lets the tail go."""
    seen: list[int] = []
    with EventLoopThread() as loop:
        store = loop.view(incident.open_async_event_store(store_url))
        store.append("A", deposit(1), expected_version=0)
        live = store.subscribe(after=0, poll_interval=0.05)

        def follow() -> None:
            for recorded in live:
                seen.append(recorded.position)
                if len(seen) == 2:
                    return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        store.append("A", deposit(2), expected_version=1)
        reader.join(WAIT)
        assert seen == [1, 2]
        live.close()
        with pytest.raises(StopIteration):
            next(live)
        assert [r.position for r in store.read_all(after=1)] == [2]
        store.close()


def test_a_commit_under_a_used_idempotency_key_writes_nothing_and_says_what_it_came_to(
    store_url: str,
) -> None:
    """On its own (the async Postgres store's one-round-trip paths, which the server
    refuses for a used key) or among others: DuplicateCommand with the first outcome."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:

            def keyed(stream: str, version: int) -> AppendRequest:
                return AppendRequest(
                    aggregate_id=stream,
                    events=deposit(version + 1),
                    expected_version=version,
                    idempotency_key="once",
                )

            first = await store.commit(keyed("A", 0))
            with pytest.raises(incident.DuplicateCommand) as alone:
                await store.commit(keyed("A", 1))
            together = await asyncio.gather(
                store.commit(keyed("B", 0)),
                store.commit(
                    AppendRequest(aggregate_id="C", events=deposit(3), expected_version=0)
                ),
                return_exceptions=True,
            )
            assert isinstance(together[0], incident.DuplicateCommand)
            assert isinstance(together[1], Committed)
            for duplicate in (alone.value, together[0]):
                assert [r.event_id for r in duplicate.recorded] == [  # type: ignore[union-attr]
                    r.event_id for r in first.recorded
                ]
            assert [r.aggregate_id async for r in store.read_all()] == ["A", "C"]
            assert await store.version("A") == 1

    asyncio.run(main())


def test_a_subscription_task_that_fails_says_why_as_the_sync_ones_do(tmp_path: Path) -> None:
    """A started subscription whose loop ends with an error keeps it where
    ``wait_until_caught_up`` raises it at once (no waiting for the timeout)."""

    async def main() -> None:
        app = incident.AsyncCommandHandler(
            f"sqlite:///{tmp_path}/failing.db",
            aggregates=[bank.bank_account, bank.transfer],
            subscriptions=[bank.bank_projections],
        )
        async with app:
            subscription = app.subscriptions["bank_projections"]

            def broken() -> int:
                raise RuntimeError("the subscription's own code failed (simulated)")

            subscription.step = broken  # type: ignore[method-assign]
            await app.dispatch(bank.OpenAccount(aggregate_id="F1"))
            await app.subscriptions.start()
            with pytest.raises(RuntimeError, match="simulated"):
                await app.subscriptions.wait_until_caught_up(timeout=WAIT)
            assert isinstance(subscription.error, RuntimeError)

    asyncio.run(main())


def test_an_async_handler_refused_closes_the_stores_it_opened(postgres_url: str) -> None:
    """Refused in its constructor (two subscriptions of one name), the handler leaves
    none of the stores it opened from the URL open: no pool, no session."""
    schema = postgres_url.rsplit("schema=", 1)[1]

    def pool_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith(f"incident:{schema}")]

    with pytest.raises(incident.RegistrationError, match="Two subscriptions"):
        incident.AsyncCommandHandler(
            postgres_url,
            aggregates=[bank.bank_account, bank.transfer],
            subscriptions=[bank.bank_projections, bank.bank_projections],
        )
    asyncio.run(until(lambda: not pool_threads()))


def test_a_tail_of_a_store_without_a_wake_up_is_woken_by_the_watch_all_the_same() -> None:
    """With no ``wait_for_append`` to wait in, the watch wakes its tails every slice
    to read for themselves, so an append reaches them well before their own poll."""

    async def main() -> None:
        sync = incident.open_event_store("memory://")
        store = AsyncEventStore(Without(sync, "wait_for_append"), workers=0)  # type: ignore[arg-type]
        tail = asyncio.ensure_future(anext(store.subscribe(after=0, poll_interval=3600)))
        await no_watchers_but(1)  # it waits
        await store.append("A", deposit(1), expected_version=0)
        assert (await asyncio.wait_for(tail, WAIT)).position == 1
        await no_watchers_but(0)
        await store.close()

    asyncio.run(main())


# An application whose event loop ends with its subscriptions still started (no close())
LOOP_ENDS_UNDER_SUBSCRIPTIONS = r"""
import asyncio, sys
import incident
from incident.examples import bank

async def main():
    app = incident.AsyncCommandHandler(
        sys.argv[1],
        aggregates=[bank.bank_account, bank.transfer],
        subscriptions=[bank.bank_projections, bank.money_transfer],
    )
    await app.subscriptions.start()
    for account in ("S", "D"):
        await app.dispatch(bank.OpenAccount(aggregate_id=account))
    await app.dispatch(bank.DepositMoney(aggregate_id="S", amount=50))
    await app.dispatch(
        bank.RequestTransfer(
            aggregate_id="T", source_account_number="S", destination_account_number="D", amount=20
        )
    )

asyncio.run(main())
"""


def test_subscriptions_left_running_when_the_loop_ends_neither_hang_nor_park(
    tmp_path: Path,
) -> None:
    """The loop ends (``asyncio.run`` returns) with the subscriptions started: the
    process still exits, and the events whose follow-ups found no loop are not parked
    (the loop's end is no fault of theirs): a handler run later carries them out."""
    url = f"sqlite:///{tmp_path}/left-running.db"
    done = subprocess.run(
        [sys.executable, "-c", LOOP_ENDS_UNDER_SUBSCRIPTIONS, url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "parked" not in done.stderr, done.stderr[-2000:]
    with bank.build(url, subscriptions=True) as app:
        app.subscriptions.catch_up()
        assert app.subscriptions.parked() == []
        transfer = app.projection_store.get(bank.Transfer, "T")
        assert transfer is not None and transfer.status == "completed"
        balances = [app.projection_store.get(bank.BankAccount, n) for n in ("S", "D")]
        assert [b.balance for b in balances if b is not None] == [30, 20]


class WaitsForever:
    """An application whose follow-ups never end (``LoopReactor`` needs no more)."""

    aggregates: tuple[Any, ...] = ()

    def __init__(self) -> None:
        self.started = threading.Event()

    async def follow_up(self, handler: str, cause: Any, steps: Any) -> None:
        self.started.set()
        await asyncio.Event().wait()


def cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


async def left_over() -> None:
    """The running loop's other tasks, let end (a cancelled one's cancellation run)."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.gather(*others, return_exceptions=True)


def test_a_follow_up_whose_loop_ends_is_a_store_error_not_a_hang() -> None:
    """A subscription's follow-up on a loop that is not running, that stops while it
    waits, or that cancels it as it ends: a StoreError (waited out like an outage),
    never a wait for ever on the subscription's thread."""
    app = WaitsForever()
    store = incident.open_event_store("memory://")
    reactor = LoopReactor(app, store, store.projections())

    def follow_up() -> BaseException | None:
        try:
            reactor.follow_up("h", None, [])  # type: ignore[arg-type]
        except BaseException as error:
            return error
        return None

    idle = asyncio.new_event_loop()
    reactor.loop = idle
    assert isinstance(follow_up(), incident.StoreError)
    idle.close()

    for ending in ("stop", "cancel"):
        loop = asyncio.new_event_loop()
        running = threading.Thread(target=loop.run_forever, daemon=True)
        running.start()
        reactor.loop, app.started = loop, threading.Event()
        outcome: list[BaseException | None] = []
        waiting = threading.Thread(target=lambda out=outcome: out.append(follow_up()), daemon=True)
        waiting.start()
        assert app.started.wait(WAIT)
        if ending == "cancel":  # as asyncio.run does with the tasks left at its end
            loop.call_soon_threadsafe(cancel_all, loop)
            waiting.join(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        running.join(WAIT)
        waiting.join(WAIT)
        assert len(outcome) == 1 and isinstance(outcome[0], incident.StoreError), outcome
        assert "has ended" in str(outcome[0])
        loop.run_until_complete(left_over())
        loop.close()
    store.close()


def test_a_store_error_failing_a_whole_batch_is_each_tasks_own_copy() -> None:
    """Each task raises it, and a raise writes the traceback into the exception: one
    object shared by every task of the batch would carry all their frames."""
    cause = ConnectionError("the server went away")
    seen: list[int] = []

    async def commit_many(calls: Sequence[Any]) -> list[Any]:
        seen.append(len(calls))
        failure = incident.StoreError("the store failed")
        failure.__cause__ = cause
        raise failure

    async def main() -> list[BaseException | Any]:
        batches = CommitBatches(commit_many)
        calls = [cast(Any, name) for name in ("a", "b", "c")]
        return await asyncio.gather(*map(batches.commit, calls), return_exceptions=True)

    errors = asyncio.run(main())
    assert seen == [3]
    assert all(type(e) is incident.StoreError and e.__cause__ is cause for e in errors)
    assert len({id(e) for e in errors}) == 3
