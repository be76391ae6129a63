"""AsyncCommandHandler and the async stores, natively on an event loop: concurrency on
every backend, the same log as the sync handler, and what the async API refuses."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from typing import Any

import pytest
from conftest import DURABLE_BACKENDS, STORE_BACKENDS, on_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import incident
from incident.command_handler.asynchronous import TaskTurns
from incident.examples import bank
from incident.examples.bank import (
    BankAccount,
    DepositMoney,
    MoneyDeposited,
    OpenAccount,
    RequestTransfer,
    WithdrawMoney,
)

ACCOUNTS = [f"ACC{n}" for n in range(8)]


class Note(incident.Projection):
    aggregate_id: str
    text: str


def test_sixty_four_tasks_with_conflicts_lose_nothing(store_url: str) -> None:
    """64 tasks dispatch deposits and withdrawals to 8 accounts at once (so they collide
    and retry), while stale appends, which must conflict, and withdrawals beyond the
    balance, which must be rejected, are mixed in: every accepted command is in the log
    once, refused ones wrote nothing, positions run 1..N without a gap, and the read
    models add up to the log."""

    async def main() -> None:
        async with bank.build_async(store_url) as app:
            for number in ACCOUNTS:
                await app.dispatch(OpenAccount(aggregate_id=number))
            accepted: Counter[str] = Counter()
            refused = Counter[str]()

            async def worker(seed: int) -> None:
                rng = random.Random(seed)
                for _ in range(6):
                    number = rng.choice(ACCOUNTS)
                    roll = rng.random()
                    if roll < 0.2:  # stale: the stream is past version 1 by now, or soon
                        try:
                            await app.event_store.append(
                                number, [MoneyDeposited(amount=1000)], expected_version=0
                            )
                        except incident.ConcurrencyError:
                            refused["conflict"] += 1
                            continue
                        raise AssertionError("a stale append was accepted")
                    if roll < 0.3:
                        command: Any = WithdrawMoney(aggregate_id=number, amount=10**9)
                    else:
                        command = DepositMoney(aggregate_id=number, amount=rng.randint(1, 9))
                    try:
                        recorded = await app.dispatch(command)
                    except incident.Rejected as rejection:
                        refused[rejection.reason] += 1
                        continue
                    assert len(recorded) == 1
                    accepted[number] += recorded[0].data.amount

            await asyncio.gather(*(worker(seed) for seed in range(64)))
            log = [r async for r in app.event_store.read_all()]
            assert [r.position for r in log] == list(range(1, len(log) + 1))
            assert await app.event_store.last_position() == len(log)
            deposits = [r for r in log if isinstance(r.data, MoneyDeposited)]
            assert all(r.data.amount < 1000 for r in deposits)  # no stale append got in
            assert len(log) == len(ACCOUNTS) + len(deposits)  # rejected ones wrote nothing
            assert refused["conflict"] > 0 and refused["no_enough_balance"] > 0
            for number in ACCOUNTS:
                versions = [r.version for r in log if r.aggregate_id == number]
                assert versions == list(range(1, len(versions) + 1))
                row = await app.projection_store.get(BankAccount, number)
                assert row is not None and row.balance == accepted[number]
                assert (await app.state("bank_account", number)).balance == accepted[number]

    asyncio.run(main())


ids = st.sampled_from(["A", "B", "C"])
amounts = st.integers(min_value=1, max_value=30)
bank_commands = st.lists(
    st.one_of(
        st.builds(OpenAccount, aggregate_id=ids),
        st.builds(DepositMoney, aggregate_id=ids, amount=amounts),
        st.builds(WithdrawMoney, aggregate_id=ids, amount=amounts),
        st.builds(
            RequestTransfer,
            aggregate_id=st.sampled_from(["T1", "T2", "T3"]),
            source_account_number=ids,
            destination_account_number=st.sampled_from(["A", "B", "C", "D"]),
            amount=amounts,
        ),
    ),
    max_size=25,
)


def outcomes_of(app: incident.CommandHandler, commands: list[Any]) -> list[Any]:
    """Each command's outcome on the sync handler: its events' versions, or the reason
    it was rejected for."""
    outcomes: list[Any] = []
    for command in commands:
        try:
            outcomes.append([r.version for r in app.dispatch(command)])
        except incident.Rejected as rejection:
            outcomes.append(rejection.reason)
    return outcomes


async def async_outcomes_of(app: incident.AsyncCommandHandler, commands: list[Any]) -> list[Any]:
    """:func:`outcomes_of` on the async handler."""
    outcomes: list[Any] = []
    for command in commands:
        try:
            outcomes.append([r.version for r in await app.dispatch(command)])
        except incident.Rejected as rejection:
            outcomes.append(rejection.reason)
    return outcomes


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bank_commands)
def test_the_sync_and_the_async_handler_write_the_same_log(commands: list[Any]) -> None:
    """For any sequence of Bank commands (transfers and their process included), the
    async handler returns the same outcomes and writes the same log, event for event,
    as the sync handler."""
    sync = bank.build()
    outcomes = outcomes_of(sync, commands)
    log = [(r.position, r.aggregate_id, r.version, r.data) for r in sync.event_store.read_all()]
    expected = [outcomes, log]

    async def main() -> list[Any]:
        async with bank.build_async() as app:
            seen = await async_outcomes_of(app, commands)
            log = [
                (r.position, r.aggregate_id, r.version, r.data)
                async for r in app.event_store.read_all()
            ]
            return [seen, log]

    assert asyncio.run(main()) == expected


def mixed_commands(seed: int, count: int) -> list[Any]:
    """Opens, deposits, withdrawals (some beyond the balance: rejected) and transfers
    (their process moves money between two accounts, or cancels), in a seeded order."""
    rng = random.Random(seed)
    accounts = ["A", "B", "C", "D"]
    commands: list[Any] = [OpenAccount(aggregate_id=a) for a in accounts]
    for n in range(count):
        account = rng.choice(accounts)
        kind = rng.randrange(4)
        if kind == 0:
            commands.append(DepositMoney(aggregate_id=account, amount=rng.randint(1, 30)))
        elif kind == 1:
            commands.append(WithdrawMoney(aggregate_id=account, amount=rng.randint(1, 40)))
        else:
            commands.append(
                RequestTransfer(
                    aggregate_id=f"T{n}",
                    source_account_number=account,
                    destination_account_number=rng.choice(accounts),
                    amount=rng.randint(1, 25),
                )
            )
    return commands


@on_backends(DURABLE_BACKENDS)
def test_the_sync_and_the_async_handler_write_the_same_log_on_every_store(
    store_url: str, tmp_path: Any, request: pytest.FixtureRequest
) -> None:
    """On SQLite and Postgres, where the async handler's commits take the async store's
    own paths (batches, on Postgres the async connections), the same commands give the
    same outcomes, the same log and the same read models as on the sync handler."""
    backend = request.node.callspec.params["store_url"]
    (tmp_path / "async").mkdir()
    async_url = STORE_BACKENDS[backend](tmp_path / "async", request)
    commands = mixed_commands(seed=19, count=120)

    def entries(log: list[incident.Recorded[Any]]) -> list[Any]:
        return [(r.position, r.aggregate_id, r.version, r.data) for r in log]

    with bank.build(store_url) as sync:
        outcomes = outcomes_of(sync, commands)
        expected_log = entries(list(sync.event_store.read_all()))
        expected_rows = [sync.projection_store.get(BankAccount, a) for a in "ABCD"]
    assert any(isinstance(o, str) for o in outcomes) and len(expected_log) > len(commands)

    async def main() -> tuple[list[Any], list[Any], list[Any]]:
        async with bank.build_async(async_url) as app:
            seen = await async_outcomes_of(app, commands)
            log = entries([r async for r in app.event_store.read_all()])
            rows = [await app.projection_store.get(BankAccount, a) for a in "ABCD"]
            return seen, log, rows

    seen, log, rows = asyncio.run(main())
    assert seen == outcomes
    assert log == expected_log
    # the same balances and versions (the rows' event ids and dates are each run's own)
    assert [(r.balance, r.version) for r in rows if r] == [
        (r.balance, r.version) for r in expected_rows if r
    ]
    assert all(rows)


def test_a_sync_store_is_refused_with_the_way_to_open_an_async_one() -> None:
    with pytest.raises(TypeError, match="open_async_event_store"):
        incident.AsyncCommandHandler(incident.open_event_store("memory://"))  # type: ignore[arg-type]


def test_idempotent_commands_and_their_rejections_replay(store_url: str) -> None:
    """Under an idempotency key the async handler returns the first run's events, or
    raises the first run's rejection, and writes nothing more."""

    async def main() -> None:
        async with bank.build_async(store_url) as app:
            await app.dispatch(OpenAccount(aggregate_id="A"))
            key = {"idempotency_key": "deposit-1"}
            first = await app.dispatch(DepositMoney(aggregate_id="A", amount=5), key)
            again = await app.dispatch(DepositMoney(aggregate_id="A", amount=5), key)
            assert [r.event_id for r in again] == [r.event_id for r in first]
            refused = {"idempotency_key": "withdraw-1"}
            for _ in range(2):
                with pytest.raises(incident.Rejected, match="no_enough_balance"):
                    await app.dispatch(WithdrawMoney(aggregate_id="A", amount=50), refused)
            await app.dispatch(DepositMoney(aggregate_id="A", amount=100))
            with pytest.raises(incident.Rejected, match="no_enough_balance"):  # remembered
                await app.dispatch(WithdrawMoney(aggregate_id="A", amount=50), refused)
            assert await app.event_store.version("A") == 3

    asyncio.run(main())


def test_read_all_and_stream_page_through_the_log(store_url: str) -> None:
    """The async iterators fetch pages: across page boundaries nothing is skipped or
    repeated, and a limit holds across pages."""

    async def main() -> None:
        store = incident.open_async_event_store(store_url)
        store.page_size = 3
        async with store:
            events = [MoneyDeposited(amount=n) for n in range(1, 11)]
            await store.append("A", events[:7], expected_version=0)
            await store.append("B", events[7:], expected_version=0)
            assert [r.position async for r in store.read_all()] == list(range(1, 11))
            assert [r.position async for r in store.read_all(after=2, limit=7)] == list(
                range(3, 10)
            )
            assert [r.version async for r in store.stream("A", after=1)] == list(range(2, 8))
            assert [e.amount async for e in store.events("A")] == list(range(1, 8))

    asyncio.run(main())


def test_snapshots_are_taken_and_read_back(store_url: str) -> None:
    """``snapshot_every`` works on the async handler as on the sync one: a fresh handler
    starts from the snapshot and reaches the same state."""

    async def main() -> None:
        store = incident.open_async_event_store(store_url)
        async with store:
            app = bank.build_async(store, snapshot_every=2)
            await app.dispatch(OpenAccount(aggregate_id="A"))
            for amount in (1, 2, 3):
                await app.dispatch(DepositMoney(aggregate_id="A", amount=amount))
            fresh = bank.build_async(store, snapshot_every=2)
            assert (await fresh.state("bank_account", "A")).balance == 6
            snapshots = await store.projections().all(incident.snapshots.Snapshot)
            assert [s.version for s in snapshots] == [4]

    asyncio.run(main())


def test_concurrent_sqlite_appends_share_commits(tmp_path: Any) -> None:
    """Tasks' appends reach the SQLite store's group commit from several workers at
    once, so they share transactions (one fsync for several commands)."""

    async def main() -> None:
        async with bank.build_async(f"sqlite:///{tmp_path}/shared.db") as app:
            for number in ACCOUNTS:
                await app.dispatch(OpenAccount(aggregate_id=number))

            async def deposit(number: str) -> None:
                for _ in range(10):
                    await app.dispatch(DepositMoney(aggregate_id=number, amount=1))

            group = app.event_store.sync.group  # type: ignore[attr-defined]
            before = group.appends, group.transactions
            await asyncio.gather(*(deposit(number) for number in ACCOUNTS for _ in range(4)))
            appends, transactions = group.appends - before[0], group.transactions - before[1]
            assert appends == len(ACCOUNTS) * 4 * 10
            assert transactions < appends  # commits were shared

    asyncio.run(main())


def test_tasks_that_collide_take_turns() -> None:
    """Once tasks have collided on a stream, the next ones take its turn (a lock), and a
    stream nobody collided on takes none."""

    async def main() -> None:
        turns = TaskTurns(size=2)
        stream = ("bank_account", "A")
        assert not turns.contended(stream)
        turns.collided(stream)
        assert turns.contended(stream)
        order: list[str] = []

        async def take(name: str) -> None:
            async with turns.turn(stream):
                order.append(f"{name} in")
                await asyncio.sleep(0)
                order.append(f"{name} out")

        await asyncio.gather(take("first"), take("second"))
        assert order == ["first in", "first out", "second in", "second out"]
        for n in range(3):  # the oldest idle streams are forgotten beyond the size
            turns.collided(("bank_account", f"B{n}"))
        assert not turns.contended(stream)

    asyncio.run(main())


@on_backends(["sqlite"])
def test_a_dispatch_leaves_the_loop_free_while_it_commits(store_url: str) -> None:
    """On SQLite the commit runs on a worker thread: while it is in flight, other tasks
    of the loop run. Here the commit waits for a task to let it go; a commit on the
    loop's own thread would wait forever (and fail after 10 s). (Postgres commits on the
    loop's async connections: test_postgres_batch.py.)"""

    async def main() -> None:
        store = incident.open_async_event_store(store_url)
        release = threading.Event()
        commit = store.sync.commit

        def held_commit(*args: Any, **kwargs: Any) -> Any:
            if not release.wait(10):
                raise AssertionError("the loop was blocked while a commit was in flight")
            return commit(*args, **kwargs)

        commit_many = getattr(store.sync, "commit_many", None)
        held: list[str] = []

        def held_commit_many(*args: Any, **kwargs: Any) -> Any:
            held.append("commit_many")
            if not release.wait(10):
                raise AssertionError("the loop was blocked while a commit was in flight")
            return commit_many(*args, **kwargs)  # type: ignore[misc]

        async with store:
            app = bank.build_async(store)
            store.sync.commit = held_commit  # type: ignore[method-assign]
            if store.batches is not None:  # SQLite: commits go over in batches
                store.sync.commit_many = held_commit_many  # type: ignore[attr-defined]

            async def let_go() -> None:
                await asyncio.sleep(0)
                release.set()

            recorded, _ = await asyncio.gather(
                app.dispatch(OpenAccount(aggregate_id="A")), let_go()
            )
            assert [r.version for r in recorded] == [1]
            assert held == (["commit_many"] if store.batches is not None else [])

    asyncio.run(main())


def test_bad_options_and_urls_are_refused() -> None:
    with pytest.raises(incident.IncidentError, match="Not a store URL"):
        incident.open_async_event_store("bank.db")
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        incident.open_async_event_store("memory://", workers=-1)
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        incident.AsyncEventStore(incident.open_event_store("memory://"), workers=0, page_size=0)
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        bank.build_async("memory://", retries=-1)
    for retries in (1.5, True, "3"):
        with pytest.raises(incident.InvalidArgument, match="retries must be an int >= 0"):
            incident.CommandHandler("memory://", retries=retries)  # type: ignore[arg-type]


@on_backends(["postgres"])
def test_postgres_reads_run_on_async_connections(store_url: str) -> None:
    """The async Postgres store reads on psycopg's async connections, not on its
    workers: with the workers refusing work, its reads (events and read models) still
    answer; its writes, the sync store's append path, need them."""

    async def main() -> None:
        store = incident.open_async_event_store(store_url)
        async with store:
            await store.append("a", [MoneyDeposited(amount=1)], expected_version=0)
            await store.version("a")  # the tables are made (by the sync store's code)
            notes = store.projections()
            await notes.project(Note(aggregate_id="n1", text="hello"))  # on a worker

            async def refuse(work: Any) -> Any:
                raise AssertionError("a read went to the worker threads")

            run = store.workers.run
            store.workers.run = refuse  # type: ignore[method-assign]
            assert [r.version for r in await store.get("a")] == [1]
            assert [r.position async for r in store.read_all()] == [1]
            assert [e.amount async for e in store.events("a")] == [1]
            assert (await store.version("a"), await store.last_position()) == (1, 1)
            assert await store.owed() == []
            assert await notes.get(Note, "n1") == Note(aggregate_id="n1", text="hello")
            assert await notes.all(Note) == [Note(aggregate_id="n1", text="hello")]
            with pytest.raises(AssertionError, match="worker threads"):
                await store.append("a", [MoneyDeposited(amount=2)], expected_version=1)
            store.workers.run = run  # type: ignore[method-assign]

    asyncio.run(main())


def test_close_closes_only_the_stores_it_opened(tmp_path: Any) -> None:
    async def main() -> None:
        store = incident.open_async_event_store(f"sqlite:///{tmp_path}/given.db")
        async with bank.build_async(store) as app:
            await app.dispatch(OpenAccount(aggregate_id="A"))
        assert await store.version("A") == 1  # still open: the caller's to close
        await store.close()

    asyncio.run(main())


def test_sqlite_batches_of_commits_run_on_one_thread(tmp_path: Any) -> None:
    """Every batch of the loop's commits runs on the one thread kept for them, never on
    the pool's workers (which would take turns at the GIL), and the thread stops when
    the store closes."""

    async def main() -> None:
        store = incident.open_async_event_store(f"sqlite:///{tmp_path}/one-thread.db")
        commit_many = store.sync.commit_many  # type: ignore[attr-defined]
        threads: list[threading.Thread] = []

        def recorded(calls: Any) -> Any:
            threads.append(threading.current_thread())
            return commit_many(calls)

        store.sync.commit_many = recorded  # type: ignore[attr-defined]
        async with store:
            app = bank.build_async(store)
            for round_ in range(3):
                await asyncio.gather(
                    *(app.dispatch(OpenAccount(aggregate_id=f"{n}-{round_}")) for n in ACCOUNTS)
                )
                await app.dispatch(DepositMoney(aggregate_id=f"{ACCOUNTS[0]}-{round_}", amount=1))
        assert len(threads) >= 6 and len(set(threads)) == 1
        assert threads[0].name.startswith("incident-commits")
        threads[0].join(timeout=10)
        assert not threads[0].is_alive()

    asyncio.run(main())


def test_sqlite_commits_go_to_the_store_in_batches(tmp_path: Any) -> None:
    """The loop's concurrent commits reach SQLite a batch at a time (``commit_many`` on
    one worker); a task cancelled before its commit was handed over writes nothing,
    and a batch the store fails as a whole fails each of its tasks with that error."""

    async def main() -> None:
        store = incident.open_async_event_store(f"sqlite:///{tmp_path}/batches.db")
        async with store:
            batches = store.batches
            assert batches is not None
            app = bank.build_async(store)
            await asyncio.gather(*(app.dispatch(OpenAccount(aggregate_id=n)) for n in ACCOUNTS))
            assert batches.commits == len(ACCOUNTS) and batches.batches < len(ACCOUNTS)

            # hold a first batch on its worker; a second commit gathers behind it
            commit_many = store.sync.commit_many  # type: ignore[attr-defined]
            entered, release = threading.Event(), threading.Event()

            def held(calls: Any) -> Any:
                entered.set()
                assert release.wait(10)
                return commit_many(calls)

            store.sync.commit_many = held  # type: ignore[attr-defined]
            first = asyncio.ensure_future(app.dispatch(DepositMoney(aggregate_id="ACC0", amount=1)))
            while not entered.is_set():
                await asyncio.sleep(0.001)
            second = asyncio.ensure_future(
                app.dispatch(DepositMoney(aggregate_id="ACC1", amount=5))
            )
            await asyncio.sleep(0.01)  # the second has gathered
            second.cancel()
            release.set()
            assert [r.data.amount for r in await first] == [1]
            with pytest.raises(asyncio.CancelledError):
                await second
            assert [r.aggregate_id async for r in store.read_all(after=len(ACCOUNTS))] == ["ACC0"]

            def broken(calls: Any) -> Any:
                raise incident.StoreError("the disk is gone (simulated)")

            store.sync.commit_many = broken  # type: ignore[attr-defined]
            failed = await asyncio.gather(
                *(app.dispatch(DepositMoney(aggregate_id=n, amount=1)) for n in ACCOUNTS),
                return_exceptions=True,
            )
            assert all(isinstance(f, incident.StoreError) for f in failed)
            assert await store.last_position() == len(ACCOUNTS) + 1

    asyncio.run(main())


def _async_use_after_fork(app: incident.AsyncCommandHandler, results: Any) -> None:
    """In a forked child: dispatch, read the read model, and tail the log live past an
    event dispatched once the tail waits, all on the child's own loop."""

    async def main() -> tuple[int, list[str]]:
        await app.dispatch(OpenAccount(aggregate_id="child"))
        seen: list[str] = []

        async def tail() -> None:
            async for recorded in app.event_store.subscribe(after=0):
                seen.append(recorded.aggregate_id)
                if recorded.data == MoneyDeposited(amount=7):
                    return

        tailing = asyncio.ensure_future(tail())
        await asyncio.sleep(0.2)  # the tail has read the log and waits
        await app.dispatch(DepositMoney(aggregate_id="child", amount=7))
        await asyncio.wait_for(tailing, 20)
        row = await app.projection_store.get(BankAccount, "child")
        assert row is not None
        return row.balance, seen

    try:
        results.put(("ok", *asyncio.run(main())))
    except BaseException as error:
        results.put((repr(error), None, []))


@on_backends(DURABLE_BACKENDS)
def test_an_async_handler_used_before_fork_works_in_the_child(store_url: str) -> None:
    """gunicorn --preload and multiprocessing fork a process whose async stores have
    run already: the child gets worker threads, a connection pool and a live watch of
    its own (the parent's threads did not come along, its connections are the parent's
    sessions) instead of waiting for ever on them; the parent's log is intact."""
    import multiprocessing

    app = bank.build_async(store_url)

    async def parent() -> None:
        await app.dispatch(OpenAccount(aggregate_id="parent"))
        await app.dispatch(DepositMoney(aggregate_id="parent", amount=1))
        seen = [r.aggregate_id async for r in app.event_store.read_all()]
        assert seen == ["parent", "parent"]

    asyncio.run(parent())
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=_async_use_after_fork, args=(app, results))
    child.start()
    try:
        outcome, balance, seen = results.get(timeout=60)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert (outcome, balance) == ("ok", 7)
    assert seen == ["parent", "parent", "child", "child"]
    store = incident.open_event_store(store_url)
    try:
        log = [(r.aggregate_id, r.position) for r in store.read_all()]
    finally:
        store.close()
    assert log == [("parent", 1), ("parent", 2), ("child", 3), ("child", 4)]
