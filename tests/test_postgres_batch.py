"""Several appends in one Postgres transaction (incident/stores/postgres/batch.py), as
the async store hands over its tasks' concurrent commits: one transaction for the
batch, each append its own outcome, and whatever the server refuses or a lost
connection leaves unclear resolved append by append, never half-written."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from typing import Any

import psycopg
import pytest
from bounded_loop import run_bounded
from conftest import Admin, kill_backends
from sqlite_batches import account

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.postgres import PostgresEventStore
from incident.stores.postgres.asynchronous import AsyncPostgresEventStore
from incident.stores.protocols import AppendRequest, CommitCall, Committed

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresEventStore]:
    opened = incident.open_event_store(postgres_url)
    assert isinstance(opened, PostgresEventStore)
    opened.types.register(*bank.bank_account.event_types)
    opened.append("setup", [MoneyDeposited(amount=1)], expected_version=0)
    yield opened
    opened.close()


class CommitMany:
    """The batch as the sync store writes it (``commit_many``, as on a worker thread);
    as threads committing at once make it (``threads``: each call from a thread of its
    own, queued behind a commit in flight, postgres/thread_batches.py); or as the async
    store does, on an async connection (postgres/async_batch.py), whose ``appends`` then
    count what went in its transactions and what it left to the workers."""

    def __init__(self, store: PostgresEventStore, driver: str) -> None:
        self.store = store
        self.threads = driver == "threads"
        asynchronous = driver == "async"
        self.loop = asyncio.new_event_loop() if asynchronous else None
        self.appends = None
        if asynchronous:
            self.async_store = AsyncPostgresEventStore(store, workers=2)
            self.appends = self.async_store.appends
            store.projections().ensure_table(BankAccount)  # else the batch goes to the workers

    def __call__(self, calls: list[CommitCall]) -> list[Committed | Exception]:
        if self.threads:
            return self.in_threads(calls)
        if self.loop is None or self.appends is None:
            return self.store.commit_many(calls)
        return self.loop.run_until_complete(self.appends.commit_many(calls))

    def in_threads(self, calls: list[CommitCall]) -> list[Committed | Exception]:
        """Each call's ``commit`` from its own thread, queued in order while the store's
        thread batches are held as if a commit were in flight, then let go: the queued
        ones are one batch. A keyed call never queues: those go after, one by one."""
        store, batches = self.store, self.store.thread_batches
        outcomes: list[Any] = [None] * len(calls)

        def commit(at: int) -> None:
            request, projections, project = calls[at]
            try:
                outcomes[at] = store.commit(request, projection_store=projections, project=project)
            except Exception as error:
                outcomes[at] = error

        with batches.mutex:
            batches.in_flight = batches.depth  # as if commits were in flight: all queue
        threads = []
        for at, one in enumerate(calls):
            if one.request.idempotency_key is None:
                queued = len(batches.queue)
                thread = threading.Thread(target=commit, args=(at,))
                thread.start()
                threads.append(thread)
                deadline = time.monotonic() + 10
                while len(batches.queue) == queued and thread.is_alive():  # refused early
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
        with batches.mutex:
            batches.in_flight -= batches.depth - 1  # one place left: the queue's batch
            batches.hand_on()
        for thread in threads:
            thread.join(30)
        for at, one in enumerate(calls):
            if one.request.idempotency_key is not None:
                commit(at)
        return outcomes

    def counted(self) -> tuple[int, int] | None:
        """(transactions, appends handed to the workers) of the async driver."""
        return (
            None
            if self.appends is None
            else (
                self.appends.transactions,
                self.appends.handed_over,
            )
        )

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.async_store.close())
            self.loop.close()


@pytest.fixture(params=["sync", "threads", "async"])
def commit_many(request: pytest.FixtureRequest, store: PostgresEventStore) -> Iterator[CommitMany]:
    driver = CommitMany(store, request.param)
    try:
        yield driver
    finally:
        driver.close()


def deposit(aggregate_id: str, expected: object = 0, key: str | None = None) -> AppendRequest:
    return AppendRequest(
        aggregate_id=aggregate_id,
        events=[MoneyDeposited(amount=1), MoneyDeposited(amount=2)],
        expected_version=expected,
        aggregate="bank_account",
        idempotency_key=key,
    )


def call(store: PostgresEventStore, request: AppendRequest, project: Any = account) -> CommitCall:
    return CommitCall(request, store.projections(), project)


def transactions_of(admin: Admin, store: PostgresEventStore, streams: list[str]) -> dict[str, int]:
    """Each stream's rows by the transaction that wrote them (xmin)."""
    rows = admin.execute(
        f'SELECT aggregate_id, xmin::text::bigint FROM "{store._db.schema}".events'
        " WHERE aggregate_id = ANY(%s)",
        [streams],
    ).fetchall()
    return dict(rows)


def log(store: PostgresEventStore) -> list[tuple[int, str]]:
    return [(r.position, r.aggregate_id) for r in store.read_all()]


def test_a_batch_is_one_transaction_and_each_append_has_its_own_outcome(
    store: PostgresEventStore, postgres_admin: Admin, commit_many: CommitMany
) -> None:
    """A stale append, one whose project raises, one refused before the database (a NUL
    in its id) and one that moves a stream twice in the batch each get their own
    outcome; the others commit in one transaction, numbered gapless in order, with their
    projections; a keyed append goes by itself and still answers its key."""
    store.append("twice", [MoneyDeposited(amount=1)], expected_version=0)
    before = store.projections()

    def broken(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise ValueError("a bug in an inline handler")

    outcomes = commit_many(
        [
            call(store, deposit("first")),
            call(store, deposit("setup", expected=0)),  # setup is at version 1
            call(store, deposit("raises"), broken),
            call(store, deposit("bad\x00")),
            call(store, deposit("twice", expected=1)),
            call(store, deposit("twice", expected=1)),  # the batch moved it to 3
            call(store, deposit("keyed", key="k1")),
            call(store, deposit("last")),
        ]
    )
    first, stale, raises, bad, twice, twice_again, keyed, last = outcomes
    assert commit_many.counted() in (None, (1, 1))  # async: one transaction, the key aside
    assert isinstance(stale, incident.ConcurrencyError)
    assert isinstance(raises, ValueError)
    assert isinstance(bad, incident.Unstorable)
    assert isinstance(twice_again, incident.ConcurrencyError) and twice_again.actual == 3
    for committed in (first, twice, keyed, last):
        assert isinstance(committed, Committed)
        assert committed.recorded[-1].position > 0
    written = transactions_of(postgres_admin, store, ["first", "twice", "last", "keyed"])
    batch_xmins = {written["first"], written["last"]}
    assert len(batch_xmins) == 1 and written["keyed"] not in batch_xmins
    assert [p for p, _ in log(store)] == list(range(1, len(log(store)) + 1))
    assert [s for _, s in log(store)] == [
        "setup",
        "twice",
        "first",
        "first",
        "twice",
        "twice",
        "last",
        "last",
        "keyed",
        "keyed",
    ]
    assert store.get("raises") == [] and store.version("setup") == 1
    row = before.get(BankAccount, "last")
    assert row is not None and row.event_id == last.recorded[-1].event_id  # type: ignore[union-attr]
    assert store.outcome_for("k1") is not None


def test_a_row_the_server_refuses_sends_each_append_again_by_itself(
    store: PostgresEventStore, postgres_admin: Admin, commit_many: CommitMany
) -> None:
    """The server refusing one append's row aborts the whole transaction: nothing of the
    batch is written, and each append goes again alone, so only that one fails."""
    schema = store._db.schema
    postgres_admin.execute(
        f"""CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.aggregate_id = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF;
        RETURN NEW; END $$"""
    )
    postgres_admin.execute(
        f'CREATE TRIGGER refuse BEFORE INSERT ON "{schema}".events'
        f' FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()'
    )
    outcomes = commit_many(
        [call(store, deposit("a")), call(store, deposit("poison")), call(store, deposit("b"))]
    )
    assert isinstance(outcomes[0], Committed) and isinstance(outcomes[2], Committed)
    assert isinstance(outcomes[1], incident.StoreError) and "poisoned" in str(outcomes[1])
    assert commit_many.counted() in (None, (0, 3))  # async: refused, all to the workers
    assert [s for _, s in log(store)] == ["setup", "a", "a", "b", "b"]
    assert store.get("poison") == []


def test_a_connection_lost_in_a_batch_writes_each_append_once(
    store: PostgresEventStore, postgres_admin: Admin, commit_many: CommitMany
) -> None:
    """The batch's session is killed while the transaction is open (from inside an
    append's project): nothing of it committed, so the store finds none of its events
    and sends each append again by itself; every one is in the log exactly once."""
    killed: list[int] = []

    def kill_the_batch(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        if not killed:
            key = store._db.append_lock  # this schema's: other tests' sessions live on
            pids = postgres_admin.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
                [(key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF],
            ).fetchall()
            for (pid,) in pids:
                postgres_admin.execute("SELECT pg_terminate_backend(%s)", [pid])
                killed.append(pid)
        return account(recorded)

    outcomes = commit_many(
        [
            call(store, deposit("a")),
            call(store, deposit("b"), kill_the_batch),
            call(store, deposit("c")),
        ]
    )
    assert killed
    assert all(isinstance(outcome, Committed) for outcome in outcomes), outcomes
    assert commit_many.counted() in (None, (0, 3))  # async: lost, nothing written, again
    assert [s for _, s in log(store)] == ["setup", "a", "a", "b", "b", "c", "c"]
    ids = [r.event_id for r in store.read_all()]
    assert len(set(ids)) == len(ids)


def test_sixty_four_tasks_share_transactions(postgres_url: str) -> None:
    """Concurrent dispatches on the async handler reach Postgres in batches: fewer
    transactions than commands, and every command once in the log."""

    async def main() -> None:
        async with bank.build_async(postgres_url) as app:
            sync = app.event_store.sync
            assert isinstance(sync, PostgresEventStore)
            names = [f"T{n}" for n in range(64)]
            await asyncio.gather(*(app.dispatch(bank.OpenAccount(aggregate_id=n)) for n in names))
            batches = sync.batch_appends.transactions
            await asyncio.gather(
                *(app.dispatch(bank.DepositMoney(aggregate_id=n, amount=3)) for n in names)
            )
            assert sync.batch_appends.transactions > batches
            log = [r async for r in app.event_store.read_all()]
            assert [r.position for r in log] == list(range(1, 129))
            for name in names:
                row = await app.projection_store.get(BankAccount, name)
                assert row is not None and row.balance == 3

    asyncio.run(main())


def test_async_commits_run_on_the_loop_on_async_connections(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """The async store's appends go to Postgres from the loop, on its async connections:
    no worker thread writes them (the sync store's commit verbs fail here), and while
    one waits for the schema's append lock (held by another session), the loop's other
    tasks run. Concurrent dispatches share transactions."""

    async def main() -> None:
        async with bank.build_async(postgres_url) as app:
            store = app.event_store
            assert isinstance(store, AsyncPostgresEventStore)
            await app.dispatch(bank.OpenAccount(aggregate_id="A"))  # makes the tables
            handed_over = store.appends.handed_over  # that one: its projection's table

            def on_a_worker(*args: Any, **kwargs: Any) -> Any:
                raise AssertionError("a worker thread wrote an append")

            store.sync.commit = on_a_worker  # type: ignore[method-assign]
            store.sync.commit_many = on_a_worker  # type: ignore[method-assign]
            lock = store.postgres.database.append_lock
            postgres_admin.execute("SELECT pg_advisory_lock(%s)", [lock])
            try:
                waiting = asyncio.ensure_future(
                    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5))
                )
                ticks = 0
                for _ in range(20):  # the loop runs while the commit waits for the lock
                    await asyncio.sleep(0.01)
                    ticks += 1
                assert ticks == 20 and not waiting.done()
            finally:
                postgres_admin.execute("SELECT pg_advisory_unlock(%s)", [lock])
            recorded = await waiting
            assert [r.version for r in recorded] == [2]
            before = store.appends.transactions
            names = [f"C{n}" for n in range(32)]
            await asyncio.gather(*(app.dispatch(bank.OpenAccount(aggregate_id=n)) for n in names))
            assert 0 < store.appends.transactions - before < len(names)
            assert store.appends.handed_over == handed_over
            row = await app.projection_store.get(BankAccount, "A")
            assert row is not None and row.balance == 5

    asyncio.run(main())


@pytest.mark.slow
def test_async_deposits_under_a_backend_killer_are_stored_exactly_as_acknowledged(
    postgres_url: str, postgres_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread terminates the store's sessions (sync and async pools alike) at random
    moments while 16 tasks dispatch unkeyed deposits through the async append path
    (shared transactions, lone appends): every acknowledged deposit is in the log once,
    a plain StoreError stored nothing, a CommitUnknown either way, and the balance is
    what was stored. Commits in doubt are looked up by their events' ids."""
    name = f"async-storm-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}&application_name={name}"
    kills = [0]
    stop = threading.Event()
    killer = partial(kill_until, stop, postgres_admin.info.dsn, name, kills)
    acked: dict[int, list[str]] = {}
    failed: set[int] = set()
    unknown: dict[int, list[str]] = {}
    looked_up = count_look_ups(monkeypatch)

    async def main() -> tuple[list[Any], int]:
        store = incident.open_async_event_store(url, timeout=3)
        # the store given closes with the block (psycopg's pool tasks with it)
        async with store, bank.build_async(store) as app:
            await app.dispatch(bank.OpenAccount(aggregate_id="A"))
            amounts = iter(range(1, 801))
            deadline = time.monotonic() + 30

            async def task() -> None:
                for amount in amounts:
                    if time.monotonic() > deadline:
                        return
                    try:
                        recorded = await app.dispatch(
                            bank.DepositMoney(aggregate_id="A", amount=amount)
                        )
                    except incident.CommitUnknown as error:
                        unknown[amount] = error.event_ids
                    except incident.StoreError:
                        failed.add(amount)
                        await asyncio.sleep(0.01)
                    else:
                        acked[amount] = [r.event_id for r in recorded]

            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            try:
                await asyncio.gather(*(task() for _ in range(16)))
            finally:
                stop.set()
                thread.join(10)
            # terminations that landed late leave dead sessions in the pools: each fails
            # one call (a lost connection), then the store works again
            errors: list[str] = []
            while len(errors) < 25:
                try:
                    log = [r async for r in app.event_store.stream("A")]
                    state = await app.state("bank_account", "A")
                    return log, state.balance
                except incident.StoreError as error:
                    errors.append(str(error))
            raise AssertionError(f"the store did not work again: {errors}")

    log, balance = run_bounded(main(), 120)
    unknown_stored = storm_verdict(log, acked, failed, unknown)
    assert balance == sum(acked) + sum(unknown_stored)
    assert len(acked) > 50 and kills[0] > 0
    assert looked_up, "no append was in doubt: the kills never landed in one"
    print(
        f"\n{len(acked)} acknowledged, {len(failed)} StoreError, {len(unknown)} CommitUnknown"
        f" ({len(unknown_stored)} stored), {kills[0]} sessions killed; in doubt and looked"
        f" up: {looked_up.count(True)} found stored, {looked_up.count(False)} not"
    )


def kill_until(stop: threading.Event, dsn: str, name: str, kills: list[int]) -> None:
    """Terminate the sessions named ``name`` every 10-100 ms until ``stop``, counting."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        while not stop.wait(random.uniform(0.01, 0.1)):
            kills[0] += kill_backends(admin, name)


def count_look_ups(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each append left in doubt by a lost connection was found stored."""
    looked_up: list[bool] = []
    look_up = PostgresEventStore.look_up_sent

    def counted_look_up(self: PostgresEventStore, *args: Any) -> Any:
        found = look_up(self, *args)
        looked_up.append(found is not None)
        return found

    monkeypatch.setattr(PostgresEventStore, "look_up_sent", counted_look_up)
    return looked_up


def storm_verdict(
    log: list[Any], acked: dict[int, list[str]], failed: set[int], unknown: dict[int, list[str]]
) -> set[int]:
    """What a storm of killed sessions must leave (deposits by distinct amounts): each
    acknowledged deposit stored once, none refused with a plain StoreError stored, each
    CommitUnknown stored whole or not at all. Returns the amounts in doubt that were."""
    deposits = [r for r in log if isinstance(r.data, MoneyDeposited)]
    stored = [r.data.amount for r in deposits]
    assert len(stored) == len(set(stored)), "a deposit was stored twice"
    ids = {r.event_id for r in deposits}
    assert all(set(event_ids) <= ids for event_ids in acked.values()), "acknowledged, not stored"
    assert not failed & set(stored), "a deposit refused with a StoreError was stored"
    unknown_stored = {amount for amount in unknown if amount in stored}
    for event_ids in unknown.values():  # all of its events, or none
        assert set(event_ids) <= ids or not set(event_ids) & ids
    assert set(stored) == set(acked) | unknown_stored
    return unknown_stored


def test_threads_deposits_under_a_backend_killer_are_stored_exactly_as_acknowledged(
    postgres_url: str, postgres_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same storm on the sync path: 8 threads share a CommandHandler, so their
    commits go in thread batches (one transaction, the place handed on before the
    flush) while a thread terminates the store's sessions at random moments. Every
    acknowledged deposit is in the log once, a plain StoreError stored nothing, and
    each account's balance is what was stored for it."""
    name = f"thread-storm-{uuid.uuid4().hex[:8]}"
    store = incident.open_event_store(f"{postgres_url}&application_name={name}", timeout=3)
    app = bank.build(store)
    assert isinstance(store, PostgresEventStore)
    kills, stop = [0], threading.Event()
    acked: dict[int, list[str]] = {}
    failed: set[int] = set()
    unknown: dict[int, list[str]] = {}
    amounts = iter(range(1, 1201))
    deadline = time.monotonic() + 30
    looked_up = count_look_ups(monkeypatch)
    killer = partial(kill_until, stop, postgres_admin.info.dsn, name, kills)

    def writer(account: str) -> None:
        for amount in amounts:
            if time.monotonic() > deadline:
                return
            try:
                recorded = app.dispatch(bank.DepositMoney(aggregate_id=account, amount=amount))
            except incident.CommitUnknown as error:
                unknown[amount] = error.event_ids
            except incident.StoreError:
                failed.add(amount)
                time.sleep(0.01)
            else:
                acked[amount] = [r.event_id for r in recorded]

    accounts = [f"T{n}" for n in range(8)]
    for opened in accounts:
        app.dispatch(bank.OpenAccount(aggregate_id=opened))
    batched = store.thread_batches.batched
    threads = [threading.Thread(target=writer, args=(a,)) for a in accounts]
    killing = threading.Thread(target=killer, daemon=True)
    killing.start()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        stop.set()
        killing.join(10)
    log: list[Any] = []
    for _ in range(25):  # late terminations: each costs one call, then the store works
        try:
            log = list(store.read_all())
            balances = {a: app.state("bank_account", a).balance for a in accounts}
            break
        except incident.StoreError:
            continue
    else:
        raise AssertionError("the store did not work again")
    unknown_stored = storm_verdict(log, acked, failed, unknown)
    for each in accounts:
        mine = [r.data.amount for r in log if r.aggregate_id == each and r.version > 1]
        assert balances[each] == sum(mine)
    assert set(acked) | unknown_stored == {r.data.amount for r in log if r.version > 1}
    assert len(acked) > 50 and kills[0] > 0
    assert store.thread_batches.batched > batched, "no commits were batched"
    assert looked_up, "no append was in doubt: the kills never landed in one"
    print(
        f"\n{len(acked)} acknowledged, {len(failed)} StoreError, {len(unknown)} CommitUnknown"
        f" ({len(unknown_stored)} stored), {kills[0]} sessions killed,"
        f" {store.thread_batches.batched - batched} commits batched; in doubt and looked up:"
        f" {looked_up.count(True)} found stored, {looked_up.count(False)} not"
    )
    app.close()


def test_a_lone_keyed_commit_goes_on_the_loop_and_is_stored_once(postgres_url: str) -> None:
    """A keyed command alone is appended on the async connection (the server checks its
    key); sent again, with the same key, it answers the first outcome and stores
    nothing more. Keyed commands among others go to the sync path, one by one."""

    async def main() -> None:
        async with bank.build_async(postgres_url) as app:
            store = app.event_store
            assert isinstance(store, AsyncPostgresEventStore)
            await app.dispatch(bank.OpenAccount(aggregate_id="A"))  # makes the tables
            handed_over = store.appends.handed_over
            deposit = bank.DepositMoney(aggregate_id="A", amount=5)
            first = await app.dispatch(deposit, {"idempotency_key": "k1"})
            assert store.appends.handed_over == handed_over  # written from the loop
            again = await app.dispatch(deposit, {"idempotency_key": "k1"})
            assert [r.event_id for r in again] == [r.event_id for r in first]
            keyed = [bank.DepositMoney(aggregate_id=f"K{n}", amount=1) for n in range(8)]
            await asyncio.gather(
                *(app.dispatch(bank.OpenAccount(aggregate_id=f"K{n}")) for n in range(8))
            )
            await asyncio.gather(
                *(app.dispatch(c, {"idempotency_key": f"key-{n}"}) for n, c in enumerate(keyed))
            )
            log = [r async for r in store.read_all()]
            assert [r.position for r in log] == list(range(1, len(log) + 1))
            deposits = [r for r in log if isinstance(r.data, MoneyDeposited)]
            assert len(deposits) == 1 + len(keyed)
            assert sorted(r.metadata["idempotency_key"] for r in deposits) == sorted(
                ["k1", *(f"key-{n}" for n in range(8))]
            )
            row = await app.projection_store.get(BankAccount, "A")
            assert row is not None and row.balance == 5

    asyncio.run(main())
