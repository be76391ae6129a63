"""Appends the connection died in: resolved by looking the events up, never guessed."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
import pytest
from conftest import Admin, kill_backends

import incident
from incident.examples import bank
from incident.examples.bank import MoneyDeposited
from incident.stores.postgres import PostgresEventStore
from incident.stores.postgres import events as postgres_events
from incident.stores.postgres import numbered as postgres_numbered

pytestmark = pytest.mark.postgres


def open_store(url: str, **options: Any) -> PostgresEventStore:
    store = incident.open_event_store(url, **options)
    assert isinstance(store, PostgresEventStore)
    store.types.register(*bank.bank_account.event_types)
    return store


def reply_lost_after_commit(monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[int]:
    """Appends commit, then their connection dies before the reply is read: the
    window a server kill during COMMIT opens. Returns the count of commits hidden."""
    original = postgres_events.one_sync_transaction
    hidden: list[int] = []

    @contextmanager
    def commit_then_lose(conn: Any, **options: Any) -> Iterator[Any]:
        with original(conn, **options) as afterwards:
            yield afterwards
        if len(hidden) < times:
            hidden.append(1)
            conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    def sent_then_lost(conn: Any, *args: Any, **options: Any) -> Any:
        results = original_message(conn, *args, **options)
        if len(hidden) < times:
            hidden.append(1)
            conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return results

    original_message = postgres_numbered.prepared_message_transaction
    monkeypatch.setattr(postgres_events, "one_sync_transaction", commit_then_lose)
    # appends the database numbers send their transaction as one message
    monkeypatch.setattr(postgres_numbered, "prepared_message_transaction", sent_then_lost)
    return hidden


def test_a_commit_whose_reply_was_lost_is_found_and_returned(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection dies after COMMIT: the append returns the events as stored, once,
    and the next append follows them."""
    store = open_store(postgres_url)
    store.append("a", [MoneyDeposited(amount=1)], expected_version=0)
    hidden = reply_lost_after_commit(monkeypatch)
    recorded = store.append("a", [MoneyDeposited(amount=2)], expected_version=1)
    assert hidden == [1]
    assert [(r.position, r.version, r.data) for r in recorded] == [(2, 2, MoneyDeposited(amount=2))]
    assert [r.event_id for r in store.get("a")][1:] == [recorded[0].event_id]
    assert store.append("a", [MoneyDeposited(amount=3)], expected_version=2)[0].position == 3
    store.close()


def test_a_dispatch_whose_commit_reply_was_lost_moves_the_money_once(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the command handler, with no idempotency key: the deposit is returned
    and stored once, and the balance counts it once."""
    app = bank.build(postgres_url)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    reply_lost_after_commit(monkeypatch)
    recorded = app.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
    assert [r.data for r in recorded] == [MoneyDeposited(amount=10)]
    assert app.state("bank_account", "A").balance == 10
    assert [r.version for r in app.event_store.get("A")] == [1, 2]
    app.event_store.close()


def test_a_commit_that_cannot_be_looked_up_is_commit_unknown(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No connection to look the events up with within the pool's timeout: CommitUnknown,
    a StoreError that says it may have been stored and points to idempotency keys."""
    store = open_store(postgres_url, timeout=0.3)
    store.initialize()
    hidden = reply_lost_after_commit(monkeypatch)
    checkout = store._db.pool.connection

    @contextmanager
    def none_after_the_loss(timeout: float | None = None) -> Iterator[Any]:
        if hidden:
            raise psycopg_pool.PoolTimeout("couldn't get a connection")
        with checkout(timeout) as conn:
            yield conn

    monkeypatch.setattr(store._db.pool, "connection", none_after_the_loss)
    started = time.monotonic()
    with pytest.raises(incident.CommitUnknown, match="may or may not have been stored") as caught:
        store.append("a", [MoneyDeposited(amount=1)], expected_version=0)
    assert time.monotonic() - started < 5
    assert "idempotency_key" in str(caught.value)
    assert isinstance(caught.value, incident.StoreError)
    monkeypatch.undo()
    stored = store.get("a")
    assert [r.event_id for r in stored] == caught.value.event_ids  # it had committed
    store.close()


def test_an_append_killed_before_commit_is_tried_again_and_stored_once(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """pg_terminate_backend after the INSERT is sent, before COMMIT: the lookup finds
    nothing, so the same append is tried again on a new connection and stored once."""
    name = f"kill-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={name}")
    store.append("other", [MoneyDeposited(amount=5)], expected_version=0)
    killed: list[int] = []

    def project(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        deadline = time.monotonic() + 10
        while (
            not killed
            and not postgres_admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                " AND query LIKE 'INSERT INTO%%'",
                [name],
            ).fetchall()
        ):
            assert time.monotonic() < deadline
        if not killed:
            killed.append(kill_backends(postgres_admin, name))
        return []

    recorded = store.append_and_project(
        "acc",
        [MoneyDeposited(amount=1)],
        expected_version=0,
        aggregate=None,
        metadata=None,
        projection_store=store.projections(),
        project=project,
    )
    assert killed and killed[0] >= 1
    assert [(r.position, r.event_id) for r in store.get("acc")] == [(2, recorded[0].event_id)]
    store.close()


@pytest.mark.slow
def test_deposits_under_a_backend_killer_are_stored_exactly_as_acknowledged(
    postgres_url: str, postgres_admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread terminates the store's backends at random moments while 240 deposits
    (more, until a kill has landed in one) without idempotency keys are dispatched:
    every acknowledged deposit is in the log once, every plain StoreError stored
    nothing, and the balance is what was stored."""
    caplog.set_level(logging.INFO, logger="incident.stores.postgres")
    name = f"storm-{uuid.uuid4().hex[:8]}"
    app = bank.build(open_store(f"{postgres_url}&application_name={name}", timeout=3))
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    stop = threading.Event()
    kills = [0]

    def killer() -> None:
        with psycopg.connect(postgres_admin.info.dsn, autocommit=True) as admin:
            while not stop.wait(random.uniform(0.01, 0.15)):
                kills[0] += kill_backends(admin, name)

    acked: dict[int, list[str]] = {}
    failed: list[int] = []
    errors: dict[int, str] = {}  # what each plain StoreError said
    unknown: dict[int, list[str]] = {}
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30

    def interrupted() -> bool:
        return any(
            "not the commit" in m or "nothing was stored" in m
            for m in (r.getMessage() for r in caplog.records)
        )

    try:
        amount = 0
        # 240 deposits, and more (within the deadline) until a kill has landed in one
        while time.monotonic() < deadline and (amount < 240 or not interrupted()):
            amount += 1
            try:
                recorded = app.dispatch(bank.DepositMoney(aggregate_id="A", amount=amount))
            except incident.CommitUnknown as error:
                unknown[amount] = error.event_ids
            except incident.StoreError as error:
                failed.append(amount)
                errors[amount] = str(error).split(": ", 1)[-1]
            else:
                acked[amount] = [r.event_id for r in recorded]
    finally:
        stop.set()
        thread.join(10)
    log = [r for r in app.event_store.get("A") if isinstance(r.data, MoneyDeposited)]
    stored = [r.data.amount for r in log]
    assert len(stored) == len(set(stored)), "a deposit was stored twice"
    ids = {r.event_id for r in log}
    assert all(set(event_ids) <= ids for event_ids in acked.values())
    assert not set(failed) & set(stored), [errors[a] for a in set(failed) & set(stored)]
    unknown_stored = [amount for amount in unknown if amount in stored]
    assert set(stored) == set(acked) | set(unknown_stored)
    assert app.state("bank_account", "A").balance == sum(acked) + sum(unknown_stored)
    messages = [r.getMessage() for r in caplog.records]
    found = sum("not the commit" in m for m in messages)
    absent = sum("nothing was stored" in m for m in messages)
    print(
        f"\n{len(acked) + len(failed) + len(unknown)} deposits, {kills[0]} backends killed:"
        f" {len(acked)} acknowledged, {len(failed)} StoreError, {len(unknown)} CommitUnknown"
        f" ({len(unknown_stored)} stored); interrupted appends resolved as committed:"
        f" {found}, as not committed: {absent}; errors: {sorted(set(errors.values()))}"
    )
    assert len(acked) > 20
    assert found + absent > 0, "no append was interrupted"
    app.event_store.close()


QUIET = """
import logging, sys
import incident
if sys.argv[1] == "logging":
    logging.basicConfig(level=logging.WARNING, format="app log: %(name)s %(message)s")
store = incident.open_event_store("postgresql://nobody@127.0.0.1:1/none", timeout=1)
try:
    store.version("a")
except incident.StoreError:
    print("StoreError")
store.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("configured", [False, True], ids=["library", "app-logging"])
def test_failed_reconnections_print_nothing_unless_the_app_logs(configured: bool) -> None:
    """A store whose server is unreachable raises StoreError and leaves stderr alone;
    an application that configured logging still receives the pool's warnings."""
    ran = subprocess.run(
        [sys.executable, "-c", QUIET, "logging" if configured else "library"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.strip() == "StoreError", ran.stderr
    if configured:
        assert "app log: psycopg.pool" in ran.stderr
    else:
        assert ran.stderr == ""


def test_an_unreachable_server_is_not_blamed_on_the_pool_size() -> None:
    """Nothing listening: the StoreError says the server refused, not that the pool is
    too small."""
    store = open_store("postgresql://nobody@127.0.0.1:1/none", timeout=0.3)
    with pytest.raises(incident.StoreError, match="refused a new connection") as caught:
        store.version("a")
    assert "pool_size" not in str(caught.value)
    store.close()


@pytest.mark.slow
def test_a_server_ending_every_connection_is_not_blamed_on_the_pool_size(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """While every session of the store is terminated as soon as it shows up, calls
    that time out say the server kept ending connections; none advises a bigger pool."""
    name = f"ended-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={name}", pool_size=1, timeout=0.3)
    store.initialize()
    stop = threading.Event()

    def killer() -> None:
        with psycopg.connect(postgres_admin.info.dsn, autocommit=True) as admin:
            while not stop.wait(0.002):
                kill_backends(admin, name)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    said: list[str] = []
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                store.version("a")
            except incident.StoreError as error:
                said.append(str(error))
    finally:
        stop.set()
        thread.join(10)
    assert said
    assert not [m for m in said if "pool_size" in m], said
    ending = ("kept ending them", "terminat", "closed", "connection was lost")
    assert all(any(word in m for word in ending) for m in said), said
    # a termination sent just before the killer stopped may land on a pooled session
    # still: that one call says the connection was lost, the next ones work again
    kill_backends(postgres_admin, name, wait=2)
    for attempt in range(3):
        try:
            assert store.version("a") == 0
            break
        except incident.StoreError as error:
            assert "connection was lost" in str(error) and attempt < 2, error
    store.close()
