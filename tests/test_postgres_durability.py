"""The Postgres write path's durability (docs/writes.md): an append commits without
waiting for its WAL flush, so the schema's append lock is free sooner, and is
acknowledged only once a flush has covered it; every read returns only what is flushed.

These check the mechanism on the machine's server: the WAL positions the store reads
right after its commit (or a read) must be flushed by the time the call returns. The WAL
writer flushes on its own every 200 ms by default, so a store that forgot to flush would
pass now and then, but not every time. The crash test (test_postgres_crash.py) checks
the outcome end to end: nothing acknowledged or read is gone after a crash."""

from __future__ import annotations

import asyncio
import threading
from contextlib import closing
from typing import Any

import psycopg
import pytest
from conftest import Admin

import incident
from incident.examples import bank
from incident.stores.postgres import durability
from incident.stores.postgres.durability import Durability, lsn

pytestmark = pytest.mark.postgres


def flushed(admin: Admin) -> int:
    row = admin.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    return lsn(row[0])


class Spy:
    """Records the WAL positions each call to Durability.after was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inserted: list[int] = []
        original = Durability.after

        def after(self_: Durability, positions: tuple[Any, ...] | None, conn: Any) -> None:
            assert positions is not None
            original(self_, positions, conn)
            self.inserted.append(lsn(positions[0]))

        monkeypatch.setattr(Durability, "after", after)


def test_an_append_returns_once_its_commit_is_flushed(
    postgres_url: str, postgres_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    with closing(incident.open_event_store(postgres_url)) as store:
        store.append("a", [bank.MoneyDeposited(amount=1)], expected_version=0)  # tables made
        spy = Spy(monkeypatch)
        for version in range(1, 21):
            store.append("a", [bank.MoneyDeposited(amount=1)], expected_version=version)
            # what was inserted up to just after this append's commit is flushed now
            assert flushed(postgres_admin) >= spy.inserted[-1]
        assert len(spy.inserted) == 20


def test_a_read_returns_only_flushed_commits(
    postgres_url: str, postgres_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer's commit that is visible but not yet flushed (an asynchronous
    commit, as an append's) is flushed before a read returns it: no reader acts on an
    event, or a read model row, that a crash of the server can take back."""
    handler = bank.build(postgres_url)
    handler.dispatch(bank.OpenAccount(aggregate_id="acc"))
    reader = incident.open_event_store(postgres_url)
    reader.types.register(*bank.bank_account.event_types)
    projections = incident.open_projection_store(postgres_url)
    schema = postgres_url.rsplit("schema=", 1)[1]
    spy = Spy(monkeypatch)
    reads = {
        "read_all": lambda: list(reader.read_all()),
        "get": lambda: reader.get("acc"),
        "last_position": reader.last_position,
        "projection": lambda: projections.get(bank.BankAccount, "acc"),
    }
    with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as other:
        for name, read in reads.items():
            with other.transaction():
                other.execute("SET LOCAL synchronous_commit = off")
                other.execute(f'UPDATE "{schema}".events SET metadata = metadata')
            read()
            assert flushed(postgres_admin) >= spy.inserted[-1], name
    for opened in (reader, projections, handler):
        opened.close()


def test_appends_of_many_threads_are_all_flushed_when_acknowledged(
    postgres_url: str, postgres_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Threads share transactions and flushes (a batch's thread waits for its flush, the
    others for that thread); each commit is still covered: one wait for a flush per
    transaction, and none returns before the flush it waited for."""
    with closing(incident.open_event_store(postgres_url)) as store:
        store.append("warm", [bank.MoneyDeposited(amount=1)], expected_version=incident.ANY)
        batches = store.thread_batches
        before = (batches.batches, batches.batched)
        spy = Spy(monkeypatch)
        late: list[tuple[int, int]] = []

        def write(n: int) -> None:
            with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as admin:
                for _ in range(25):
                    deposit = [bank.MoneyDeposited(amount=1)]
                    store.append(f"t{n}", deposit, expected_version=incident.ANY)
                    # every flush waited for so far, this append's included, is real
                    mine = max(spy.inserted)
                    now = flushed(admin)
                    if now < mine:
                        late.append((now, mine))

        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not late
        shared = batches.batched - before[1]
        transactions = 200 - shared + (batches.batches - before[0])
        assert len(spy.inserted) == transactions  # one wait for a flush per transaction
        assert store.last_position() == 201


def test_the_flush_statement_really_flushes(postgres_url: str, postgres_admin: Admin) -> None:
    """A transaction that only takes an id commits without waiting for the flush, so the
    flush must write WAL of its own: after an asynchronous commit, the flush statement
    moves the server's flush position past it."""
    schema = postgres_url.rsplit("schema=", 1)[1]
    postgres_admin.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    postgres_admin.execute(f'CREATE TABLE "{schema}".probe (n int)')
    try:
        with postgres_admin.transaction():
            postgres_admin.execute(durability.ASYNC_COMMIT)
            postgres_admin.execute(f'INSERT INTO "{schema}".probe VALUES (1)')
        row = postgres_admin.execute(durability.WAL_POSITIONS).fetchone()
        assert row is not None
        gate = Durability()
        gate.wait(lsn(row[0]), postgres_admin)
        assert flushed(postgres_admin) >= lsn(row[0])
    finally:
        postgres_admin.execute(f'DROP TABLE "{schema}".probe')


def test_an_async_append_returns_once_its_commit_is_flushed(
    postgres_url: str, postgres_admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The async store keeps the guarantee: an awaited append (and a dispatch of the
    async handler) returns only once the WAL flush covers its commit."""

    async def main() -> None:
        async with incident.open_async_event_store(postgres_url) as store:
            deposit = [bank.MoneyDeposited(amount=1)]
            await store.append("a", deposit, expected_version=0)  # tables made
            spy = Spy(monkeypatch)
            for version in range(1, 21):
                await store.append("a", deposit, expected_version=version)
                assert flushed(postgres_admin) >= spy.inserted[-1]
            assert len(spy.inserted) == 20
            app = bank.build_async(store)
            await app.dispatch(bank.OpenAccount(aggregate_id="acc"))  # a read, then a commit
            assert len(spy.inserted) > 20 and flushed(postgres_admin) >= max(spy.inserted)

    asyncio.run(main())


def test_async_reads_return_only_flushed_commits(postgres_url: str, postgres_admin: Admin) -> None:
    """The async store's native reads are bounded by the flushed WAL like the sync ones:
    another writer's commit that is visible but not yet flushed is flushed before a read
    returns it."""
    schema = postgres_url.rsplit("schema=", 1)[1]

    async def main() -> None:
        async with incident.open_async_event_store(postgres_url) as store:
            store.types.register(*bank.bank_account.event_types)
            await store.append("acc", [bank.MoneyDeposited(amount=1)], expected_version=0)
            reads: dict[str, Any] = {
                "read_all": lambda: _drained(store.read_all()),
                "get": lambda: store.get("acc"),
                "stream": lambda: _drained(store.stream("acc")),
                "version": lambda: store.version("acc"),
                "last_position": store.last_position,
                "owed": store.owed,
                "projection": lambda: store.projections().get(bank.BankAccount, "acc"),
                "projections": lambda: store.projections().all(bank.BankAccount),
            }
            with psycopg.connect(postgres_url.split("?")[0], autocommit=True) as other:
                for name, read in reads.items():
                    with other.transaction():
                        other.execute("SET LOCAL synchronous_commit = off")
                        other.execute(f'UPDATE "{schema}".events SET metadata = metadata')
                    row = other.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
                    assert row is not None
                    await read()
                    assert flushed(postgres_admin) >= lsn(row[0]), name

    asyncio.run(main())


async def _drained(items: Any) -> list[Any]:
    return [item async for item in items]
