"""Faults of the async Postgres store's appends (postgres/async_batch.py,
postgres/asynchronous.py), as a caller of ``AsyncEventStore.commit`` sees them: a
session the server ends in the middle of a lone append or of a batch of the loop's
commits (its own pg_terminate_backend, from a trigger on the events table for chosen
streams, as test_postgres_edges.py does for the sync store, so it lands
deterministically), a session ended after its COMMIT, a flush the server refuses after
the COMMIT, a lost session whose outcome cannot be looked up in time, a message the
server keeps refusing as out of step with the session's prepared statements, a keyed
command retried as first sent, and a store renewed as in a forked child.

Each caller gets its own typed outcome (StoreError when nothing was stored,
CommitUnknown only when the store could not find out), nothing is half written, the
log stays gapless, and the same store object works afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing, contextmanager
from functools import partial
from typing import Any, TypeVar

import msgspec
import psycopg
import pytest
from conftest import Admin
from psycopg import sql
from sqlite_batches import account
from test_postgres_edges import trigger

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.postgres import batch as batch_module
from incident.stores.postgres.asynchronous import AsyncPostgresEventStore
from incident.stores.protocols import AppendRequest, CommitCall, Committed

pytestmark = pytest.mark.postgres

T = TypeVar("T")

WAIT = 10.0  # seconds any test's awaits may take at most


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(WAIT):
            return await main()

    return asyncio.run(bounded())


def open_store(url: str, **options: Any) -> AsyncPostgresEventStore:
    store = incident.open_async_event_store(url, workers=2, **options)
    assert isinstance(store, AsyncPostgresEventStore)
    store.types.register(*bank.bank_account.event_types)
    return store


def deposit(aggregate_id: str, expected: object = 0) -> AppendRequest:
    """Two events: an append partly written would show as one of them alone."""
    return AppendRequest(
        aggregate_id=aggregate_id,
        events=[MoneyDeposited(amount=1), MoneyDeposited(amount=2)],
        expected_version=expected,
        aggregate="bank_account",
    )


async def outcomes_of(store: AsyncPostgresEventStore, requests: list[AppendRequest]) -> list[Any]:
    """The requests committed by concurrent tasks (one batch of the loop's commits), each
    task's Committed or its exception."""
    batches = store.batches.batches
    done = await asyncio.gather(*(store.commit(r) for r in requests), return_exceptions=True)
    assert store.batches.batches == batches + 1  # all of them in one batch
    return done


async def log(store: AsyncPostgresEventStore) -> list[tuple[int, str, int, str]]:
    """The whole log: (position, stream, version, event id); checked gapless."""
    rows = [(r.position, r.aggregate_id, r.version, r.event_id) async for r in store.read_all()]
    assert [p for p, _, _, _ in rows] == list(range(1, len(rows) + 1))
    return rows


def streams(rows: list[tuple[int, str, int, str]]) -> list[str]:
    return [s for _, s, _, _ in rows]


def ids(outcome: object) -> list[str]:
    assert isinstance(outcome, Committed), outcome
    return [r.event_id for r in outcome.recorded]


def kill_at(admin: Admin, schema: str, streams: list[str], times: int) -> None:
    """An insert of an event of one of ``streams`` ends its own session (as
    test_postgres_edges.kill_own_session) the first ``times`` times."""
    counter = sql.Identifier(schema, "fault_kills")
    admin.execute(sql.SQL("CREATE SEQUENCE {}").format(counter))
    body = sql.SQL(  # nested: the counter moves only for those streams' rows
        "IF NEW.aggregate_id = ANY({}) THEN IF nextval({}) <= {} THEN"
        " PERFORM pg_terminate_backend(pg_backend_pid()); END IF; END IF;"
    ).format(sql.Literal(streams), sql.Literal(counter.as_string(admin)), sql.Literal(times))
    trigger(admin, schema, "events", body.as_string(admin))


@contextmanager
def no_lookup(store: AsyncPostgresEventStore) -> Iterator[None]:
    """The sync pool's only connection (the store is opened with pool_size=1) held for
    the block: a lost append's lookup, which runs on it, finds no connection in time."""
    with store.postgres.database.pool.connection():
        yield


#: what ``warm`` leaves in the log for the predicted path
PRELUDE = ["before", "before", "setup", "setup"]


async def warm(store: AsyncPostgresEventStore, path: str) -> None:
    """The store ready, and its next lone append going the way ``path`` says: numbered
    by the database (no guess yet of the last position: a numbered append makes none)
    or predicted (after a batch of its own, which leaves the log's last position)."""
    await store.initialize()
    if path == "predicted":
        assert all(ids(o) for o in await outcomes_of(store, [deposit(s) for s in PRELUDE[::2]]))
    else:
        assert await store.version("before") == 0  # ready, the async pool open
    assert store.postgres.predictor.guess() == (None if path == "numbered" else 4)


PATHS = ["numbered", "predicted"]


# -- a session ended before the COMMIT ------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_lone_commit_whose_session_dies_is_sent_again_and_stored_once(
    postgres_url: str, postgres_admin: Admin, path: str
) -> None:
    """The session dies in the lone append's INSERT: the lookup finds none of its ids,
    so it goes again and the caller gets Committed, stored once."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, path)
            known = streams(await log(store))
            kill_at(postgres_admin, store.postgres.database.schema, ["acc"], 1)
            committed = await store.commit(deposit("acc"))
            rows = await log(store)
            assert streams(rows) == [*known, "acc", "acc"]
            assert [e for _, _, _, e in rows[len(known) :]] == ids(committed)
            again = await store.commit(deposit("acc", expected=2))
            assert [r.version for r in again.recorded] == [3, 4]

    run(main)


@pytest.mark.parametrize("path", PATHS)
def test_a_lone_commit_lost_and_not_looked_up_in_time_is_commit_unknown(
    postgres_url: str, postgres_admin: Admin, path: str
) -> None:
    """The session dies in the lone append's INSERT and no connection comes for the
    lookup within the pool's timeout: the caller gets CommitUnknown naming its own
    events' ids (the store cannot say), not a bare error, and a commit in the same
    batch refused before the database keeps its own error. Nothing was in fact stored,
    and once connections come again the same store takes the retry, stored once."""

    async def main() -> None:
        async with open_store(postgres_url, pool_size=1, timeout=1) as store:
            await warm(store, path)
            known = streams(await log(store))
            kill_at(postgres_admin, store.postgres.database.schema, ["acc"], 1)
            request = deposit("acc")
            with no_lookup(store):  # the append is the batch's only one that is sent
                unknown, refused = await outcomes_of(store, [request, deposit("bad\x00")])
            assert isinstance(unknown, incident.CommitUnknown), unknown
            assert unknown.aggregate_id == "acc" and len(unknown.event_ids) == 2
            assert isinstance(refused, incident.Unstorable), refused
            assert streams(await log(store)) == known
            committed = await store.commit(request)  # the caller's retry
            assert streams(await log(store)) == [*known, "acc", "acc"]
            assert [r.version for r in committed.recorded] == [1, 2]

    run(main)


def test_a_batch_whose_session_dies_at_one_append_stores_each_once(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """The batch's transaction dies at its second append's INSERT (the first one's rows
    already sent): none of it is in the log, so each append goes again on the workers,
    each stored once and whole, in order; a stale append gets its ConcurrencyError."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, "predicted")
            kill_at(postgres_admin, store.postgres.database.schema, ["b"], 1)
            a, b, stale, c = await outcomes_of(
                store, [deposit("a"), deposit("b"), deposit("before"), deposit("c")]
            )
            assert isinstance(stale, incident.ConcurrencyError) and stale.actual == 2
            # the three stored go again on the workers; the stale one too when the session
            # died before the batch reached its check (seen on a busy machine)
            assert store.appends.transactions == 1 and store.appends.handed_over in (3, 4)
            rows = await log(store)
            assert streams(rows) == [*PRELUDE, "a", "a", "b", "b", "c", "c"]
            assert [e for _, _, _, e in rows[4:]] == ids(a) + ids(b) + ids(c)
            d, e = await outcomes_of(store, [deposit("d"), deposit("a", expected=2)])
            assert ids(d) and ids(e) and store.appends.transactions == 2

    run(main)


def test_a_batch_with_an_append_whose_session_always_dies_fails_only_that_one(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """Every try of one append ends its session (in the batch, then on the workers in
    a batch and alone, twice): its caller gets a StoreError that says nothing was
    stored (looked up), not CommitUnknown; the others in the batch are stored once."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, "predicted")
            kill_at(postgres_admin, store.postgres.database.schema, ["poison"], 1_000)
            a, poisoned, c = await outcomes_of(
                store, [deposit("a"), deposit("poison"), deposit("c")]
            )
            assert isinstance(poisoned, incident.StoreError), poisoned
            assert not isinstance(poisoned, incident.CommitUnknown)
            assert "nothing was stored" in str(poisoned)
            rows = await log(store)
            assert streams(rows) == [*PRELUDE, "a", "a", "c", "c"]
            assert [e for _, _, _, e in rows[4:]] == ids(a) + ids(c)
            assert ids(await store.commit(deposit("fine")))

    run(main)


def test_a_batch_lost_and_not_looked_up_in_time_tells_each_caller_commit_unknown(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """The batch's session dies and no connection comes for the lookup: each append
    whose rows went out gets a CommitUnknown of its own (its stream, its events' ids);
    one refused before anything was sent gets its own ConcurrencyError. Nothing was
    stored, and the same store takes the retries, each once."""

    async def main() -> None:
        async with open_store(postgres_url, pool_size=1, timeout=1) as store:
            await warm(store, "predicted")
            kill_at(postgres_admin, store.postgres.database.schema, ["b"], 1)
            requests = [deposit("a"), deposit("before"), deposit("b")]
            with no_lookup(store):
                a, stale, b = await outcomes_of(store, requests)
            assert isinstance(stale, incident.ConcurrencyError) and stale.actual == 2
            unknown = [
                (o, s) for o, s in ((a, "a"), (b, "b")) if isinstance(o, incident.CommitUnknown)
            ]
            assert unknown and unknown[0][1] == "a", (a, b)  # a's rows always went out
            for outcome, stream in unknown:
                assert outcome.aggregate_id == stream and len(outcome.event_ids) == 2
            if len(unknown) == 2:
                assert not set(a.event_ids) & set(b.event_ids)  # type: ignore[union-attr]
            else:
                # the session died before b's rows were all sent (a busy machine): no
                # COMMIT went, so b is sent again on the workers, where the held pool
                # refuses it before anything is sent: a StoreError, truthfully
                assert type(b) is incident.StoreError and "busy" in str(b), b
            assert streams(await log(store)) == PRELUDE
            retried = await outcomes_of(store, [requests[0], requests[2]])
            rows = await log(store)
            assert streams(rows) == [*PRELUDE, "a", "a", "b", "b"]
            assert [e for _, _, _, e in rows[4:]] == ids(retried[0]) + ids(retried[1])

    run(main)


# -- a session ended after the COMMIT -------------------------------------------------


def die_after_commit(store: AsyncPostgresEventStore) -> list[int]:
    """The store's next wait for a flush past an append ends the session instead (its
    own pg_terminate_backend, on the append's connection, after its COMMIT): the append
    is in the log, its acknowledgement lost. Returns the backends so ended."""
    real, ended = store.flushed_past, []

    async def dying(inserted: int, flushed: int, conn: psycopg.AsyncConnection[Any]) -> None:
        if ended:
            return await real(inserted, flushed, conn)
        ended.append(conn.info.backend_pid)
        await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        await conn.execute("SELECT 1")  # had the reply come before the session ended

    store.flushed_past = dying  # type: ignore[method-assign]
    return ended


@pytest.mark.parametrize("path", [*PATHS, "batch"])
def test_a_commit_whose_session_dies_after_its_commit_is_committed_once(
    postgres_url: str, path: str
) -> None:
    """The session dies after the COMMIT went through (lone append, either way, or a
    batch): the lookup finds the events, so each caller gets Committed with the ids
    stored, and nothing is sent again (no second copy)."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, "numbered" if path == "numbered" else "predicted")
            known = streams(await log(store))
            ended = die_after_commit(store)
            names = ["a", "b"] if path == "batch" else ["a"]
            if path == "batch":
                outcomes = await outcomes_of(store, [deposit(n) for n in names])
            else:
                outcomes = [await store.commit(deposit("a"))]
            assert len(ended) == 1
            rows = await log(store)
            assert streams(rows) == known + [n for n in names for _ in range(2)]
            assert [e for _, _, _, e in rows[len(known) :]] == [e for o in outcomes for e in ids(o)]
            assert ids(await store.commit(deposit("a", expected=2)))

    run(main)


def test_a_commit_lost_after_its_commit_and_not_looked_up_is_commit_unknown(
    postgres_url: str,
) -> None:
    """After the COMMIT, the session dies and the lookup gets no connection: the caller
    gets CommitUnknown naming the ids, which are in the log (the outcome was not known,
    not negative); a retry at the same expected version is then a ConcurrencyError."""

    async def main() -> None:
        async with open_store(postgres_url, pool_size=1, timeout=1) as store:
            await warm(store, "predicted")
            die_after_commit(store)
            with no_lookup(store), pytest.raises(incident.CommitUnknown) as caught:
                await store.commit(deposit("a"))
            rows = await log(store)
            assert [e for _, s, _, e in rows if s == "a"] == caught.value.event_ids
            with pytest.raises(incident.ConcurrencyError):
                await store.commit(deposit("a"))
            assert ids(await store.commit(deposit("a", expected=2)))

    run(main)


# -- a message the server keeps refusing as out of step --------------------------------


def test_a_message_refused_twice_as_out_of_step_is_a_store_error(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """The numbered append's one message is refused as naming a prepared statement the
    session lacks (SQLSTATE 26000, here from a trigger), again after the store learned
    the session's statements: not a third try, but the caller's StoreError with the
    server's word, nothing stored; the connection's statements stay in step, so the
    next append on it goes through."""

    async def main() -> None:
        async with open_store(postgres_url, pool_size=1) as store:
            await warm(store, "numbered")
            schema = store.postgres.database.schema
            trigger(
                postgres_admin,
                schema,
                "events",
                "IF NEW.aggregate_id = 'stuck' THEN RAISE EXCEPTION 'no such statement'"
                " USING ERRCODE = '26000'; END IF;",
            )
            with pytest.raises(incident.StoreError, match="no such statement") as caught:
                await store.commit(deposit("stuck"))
            assert not isinstance(caught.value, incident.CommitUnknown)
            assert isinstance(caught.value.__cause__, psycopg.errors.InvalidSqlStatementName)
            assert await log(store) == []
            assert store.postgres.predictor.guess() is None  # the next goes numbered too
            assert [r.position for r in (await store.commit(deposit("fine"))).recorded] == [1, 2]

    run(main)


# -- a store renewed as in a forked child ------------------------------------------------


def test_a_store_renewed_as_in_a_forked_child_opens_a_pool_of_its_own(
    postgres_url: str,
) -> None:
    """``forked`` (what a child process runs after fork()) keeps the used pool, whose
    sessions would be the parent's, referenced and untouched, and the store's next
    append opens a new one; renewing a store whose pool never opened keeps nothing."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            assert store.postgres.database.schema in repr(store)
            store.forked()  # nothing opened yet: nothing to keep
            assert store._inherited == []
            await store.commit(deposit("a"))
            used = store._pool
            store.forked()
            assert store._inherited == [used] and store._pool is not used
            assert not used.closed  # the parent's: never closed by the child
            assert ids(await store.commit(deposit("b")))
            assert not store._pool.closed and streams(await log(store)) == ["a"] * 2 + ["b"] * 2
            await used.close()  # this test's own process: no parent to leave it to

    run(main)


# -- append: the sync store's path, on the workers -------------------------------------


@pytest.mark.parametrize("times", [1, 2])
def test_an_append_whose_session_dies_is_stored_once_or_said_not_stored(
    postgres_url: str, postgres_admin: Admin, times: int
) -> None:
    """``append`` runs the sync store's append on a worker: a session ended once in its
    INSERT is tried again and stored once; ended on both tries, the caller gets the
    StoreError that says nothing was stored, not CommitUnknown. Either way the store
    appends again afterwards."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, "numbered")
            kill_at(postgres_admin, store.postgres.database.schema, ["acc"], times)
            events = [MoneyDeposited(amount=1), MoneyDeposited(amount=2)]
            if times == 1:
                recorded = await store.append("acc", events, expected_version=0)
                assert [(e, "acc") for e in (r.event_id for r in recorded)] == [
                    (e, s) for _, s, _, e in await log(store)
                ]
            else:
                with pytest.raises(incident.StoreError, match="nothing was stored") as caught:
                    await store.append("acc", events, expected_version=0)
                assert not isinstance(caught.value, incident.CommitUnknown)
                assert await log(store) == []
                await store.append("acc", events, expected_version=0)
            again = await store.append("acc", events, expected_version=2)
            assert [r.position for r in again] == [3, 4]

    run(main)


# -- under an idempotency key ----------------------------------------------------------


def keyed(aggregate_id: str, key: str) -> AppendRequest:
    return msgspec.structs.replace(deposit(aggregate_id), idempotency_key=key)


@pytest.mark.parametrize("when", ["before commit", "after commit"])
def test_a_keyed_commit_whose_session_dies_is_stored_once_under_its_key(
    postgres_url: str, postgres_admin: Admin, when: str
) -> None:
    """A lone commit under an idempotency key whose session dies before its COMMIT
    (sent again, on the sync path) or after it (found by its ids): Committed, stored
    once, and the key answers a retry with the events stored (DuplicateCommand), in a
    batch with an unkeyed commit that keeps its own outcome."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, "numbered")
            if when == "before commit":
                kill_at(postgres_admin, store.postgres.database.schema, ["acc"], 1)
            else:
                die_after_commit(store)
            committed = await store.commit(keyed("acc", "k1"))
            outcome = await store.outcome_for("k1")
            assert outcome is not None
            retry, other = await outcomes_of(store, [keyed("acc", "k1"), deposit("other")])
            assert isinstance(retry, incident.DuplicateCommand), retry
            assert [r.event_id for r in retry.recorded] == ids(committed)
            rows = await log(store)
            assert streams(rows) == ["acc", "acc", "other", "other"]
            assert [e for _, _, _, e in rows] == ids(committed) + ids(other)

    run(main)


def test_a_keyed_retry_at_its_first_expected_version_is_duplicate_command(
    store_url: str,
) -> None:
    """A command retried as it was sent (same key, same expected version, the stream
    since moved by it) is DuplicateCommand carrying what the key stored, on every store:
    the key is looked at before the version, so the caller learns it was stored, not
    that it conflicted (Postgres's server-side appends check the version first)."""
    with closing(incident.open_event_store(store_url)) as store:
        store.types.register(*bank.bank_account.event_types)
        first = store.commit(keyed("acc", "k1"))
        for _ in range(2):
            with pytest.raises(incident.DuplicateCommand) as caught:
                store.commit(keyed("acc", "k1"))
            assert caught.value.recorded == first.recorded
        with pytest.raises(incident.ConcurrencyError):  # another key: a conflict
            store.commit(keyed("acc", "k2"))
        assert [r.event_id for r in store.read_all()] == ids(first)


@pytest.mark.parametrize("path", PATHS)
def test_an_async_keyed_retry_at_its_first_expected_version_is_duplicate_command(
    postgres_url: str, path: str
) -> None:
    """The same on the async store's lone append, numbered or predicted."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, path)
            known = await log(store)
            first = await store.commit(keyed("acc", "k1"))
            with pytest.raises(incident.DuplicateCommand) as caught:
                await store.commit(keyed("acc", "k1"))
            assert caught.value.recorded == first.recorded
            assert [e for _, _, _, e in await log(store)] == [e for *_, e in known] + ids(first)

    run(main)


# -- the server refuses the flush after the COMMIT --------------------------------------


def cancel_flush(store: AsyncPostgresEventStore) -> list[int]:
    """The store's next wait for a flush past an append is cancelled by the server
    instead (its own pg_cancel_backend: QueryCanceled, as a statement_timeout gives),
    after the append's COMMIT, on a session that lives on."""
    real, cancelled = store.flushed_past, []

    async def refused(inserted: int, flushed: int, conn: psycopg.AsyncConnection[Any]) -> None:
        if cancelled:
            return await real(inserted, flushed, conn)
        cancelled.append(conn.info.backend_pid)
        await conn.execute("SELECT pg_cancel_backend(pg_backend_pid()), pg_sleep(5)")

    store.flushed_past = refused  # type: ignore[method-assign]
    return cancelled


@pytest.mark.parametrize("path", [*PATHS, "batch"])
def test_a_commit_whose_flush_the_server_refuses_is_not_sent_again(
    postgres_url: str, path: str
) -> None:
    """The COMMIT went through and the wait for its flush fails with the server's own
    error (the session intact): the appends are in the log, so none may be told a
    StoreError (nothing stored) nor be sent again (an ANY append, which goes the
    batch's way even alone, was stored twice): each is looked up, and Committed."""

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await warm(store, "numbered" if path == "numbered" else "predicted")
            known = streams(await log(store))
            cancelled = cancel_flush(store)
            names = ["a", "b"] if path == "batch" else ["a"]
            expected = incident.ANY if path == "batch" else 0  # ANY: never numbered
            requests = [deposit(n, expected=expected) for n in names]
            if path == "batch":
                outcomes = await outcomes_of(store, requests)
            else:
                outcomes = await asyncio.gather(store.commit(requests[0]), return_exceptions=True)
            assert len(cancelled) == 1
            rows = await log(store)
            assert streams(rows) == known + [n for n in names for _ in range(2)], outcomes
            assert [e for o in outcomes for e in ids(o)] == [e for *_, e in rows[len(known) :]]
            assert ids(await store.commit(deposit("a", expected=2)))

    run(main)


@pytest.mark.parametrize("driver", ["sync", "handed over"])
def test_a_batch_whose_flush_the_server_refuses_on_the_workers_is_not_sent_again(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """The sync store's batch (``commit_many``, to which the async store hands a batch
    needing a projection table it has not seen) sends its flush after the COMMIT in the
    same pipeline: refused by the server there, the batch is in the log, so each append
    is looked up, Committed, and never sent again (ANY appends would be stored twice)."""
    refused = "SELECT pg_cancel_backend(pg_backend_pid())::text, pg_sleep(5)::text"
    requests = [deposit(n, expected=incident.ANY) for n in "ab"]

    async def main() -> None:
        async with open_store(postgres_url) as store:
            await store.initialize()
            projections = store.projections()
            monkeypatch.setattr(batch_module, "FLUSH_NOW", refused)
            if driver == "sync":
                calls = [CommitCall(r, store.postgres.projections(), account) for r in requests]
                outcomes: list[Any] = await store.run(partial(store.postgres.commit_many, calls))
            else:
                outcomes = await asyncio.gather(
                    *(
                        store.commit(r, projection_store=projections, project=account)
                        for r in requests
                    ),
                    return_exceptions=True,
                )
                assert store.appends.handed_over == 2
            monkeypatch.undo()
            rows = await log(store)
            assert streams(rows) == ["a", "a", "b", "b"], outcomes
            assert [e for o in outcomes for e in ids(o)] == [e for *_, e in rows]
            assert [p.aggregate_id for p in await projections.all(BankAccount)] == ["a", "b"]

    run(main)
