"""Subscriptions on Postgres: the handler lock lives and dies with a database session."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import STORE_BACKENDS

import incident
from incident.examples import bank

if "postgres" not in STORE_BACKENDS:
    pytest.skip("no Postgres backend in this build", allow_module_level=True)

import psycopg

from incident.stores.postgres.session import lock_key


class Seen(incident.Projection):
    aggregate_id: str
    thread: int
    version: int


def recorder(seen: list[tuple[int, int]]) -> incident.EventHandler:
    handler = incident.EventHandler("recorder")

    @handler.listen(bank.AccountOpened, bank.MoneyDeposited)
    def record(recorded: incident.Recorded[Any], state: bank.AccountState) -> Seen:
        seen.append((recorded.position, threading.get_ident()))
        return Seen(
            aggregate_id=recorded.aggregate_id,
            thread=threading.get_ident(),
            version=recorded.version,
        )

    return handler


def app(url: str, handler: incident.EventHandler) -> incident.CommandHandler:
    return incident.CommandHandler(
        url, aggregates=[bank.bank_account, bank.transfer], subscriptions=[handler]
    )


def test_a_runner_whose_session_dies_loses_the_lock(
    postgres_url: str, postgres_admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the session holding the handler's advisory lock (as when the
    holder's machine drops off the network): the runner notices and stops, the lock is
    free for whichever runner takes it first, and no event is handled twice."""
    seen: list[tuple[int, int]] = []
    first, second = app(postgres_url, recorder(seen)), app(postgres_url, recorder(seen))
    schema = parse_qs(urlsplit(postgres_url).query)["schema"][0]
    key = lock_key(schema, "handler recorder") & 0xFFFF_FFFF_FFFF_FFFF  # as pg_locks shows it
    first.dispatch(bank.OpenAccount(aggregate_id="A"))
    try:
        first.subscriptions.start()
        first.subscriptions.wait_until_caught_up()
        second.subscriptions.start()
        holders = postgres_admin.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
            [key >> 32, key & 0xFFFF_FFFF],
        ).fetchall()
        assert len(holders) == 1, f"the handler's lock is held by {holders}"
        postgres_admin.execute("SELECT pg_terminate_backend(%s)", [holders[0][0]])
        first.dispatch(bank.DepositMoney(aggregate_id="A", amount=5))
        second.subscriptions.wait_until_caught_up(timeout=30)
    finally:
        first.subscriptions.stop()
        second.subscriptions.stop()
    assert [position for position, _ in seen] == [1, 2]  # each event once, in order
    assert "recorder lost its lock" in caplog.text


def test_an_append_wakes_a_waiting_subscriber(postgres_url: str) -> None:
    """A subscriber waiting for new events is woken by the append's NOTIFY, not by the
    end of its wait (which here is a minute)."""
    waiter = incident.open_event_store(postgres_url)
    writer = incident.open_event_store(postgres_url)
    writer.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
    woke: list[bool] = []
    ready = threading.Event()

    def wait() -> None:
        waiter.wait_for_append(1, 0.01)  # type: ignore[attr-defined] - now LISTENing
        ready.set()
        woke.append(waiter.wait_for_append(1, 60.0))  # type: ignore[attr-defined]

    listening = threading.Thread(target=wait)
    listening.start()
    ready.wait(30)
    writer.append("A", [bank.MoneyDeposited(amount=1)], expected_version=1)
    listening.join(30)
    assert woke == [True]
    waiter.close()
    writer.close()


def listening(admin: psycopg.Connection[Any], url: str) -> int:
    """How many backends LISTEN for the appends of the store at ``url``."""
    schema = parse_qs(urlsplit(url).query)["schema"][0]
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query = %s",
        [f'LISTEN "incident_events:{schema}"'],
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_threads_that_waited_once_leave_one_listen_connection(
    postgres_url: str, postgres_admin: psycopg.Connection[Any]
) -> None:
    """Twenty short-lived threads each wait for an append once, at the same time: once
    they have ended the store keeps one LISTEN connection, not one per thread that ever
    waited, and that connection still wakes every waiter when an append commits."""
    waiter = incident.open_event_store(postgres_url)
    writer = incident.open_event_store(postgres_url)
    writer.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
    threads = [
        threading.Thread(target=waiter.wait_for_append, args=(1, 0.05))  # type: ignore[attr-defined]
        for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert listening(postgres_admin, postgres_url) == 1
    woke: list[bool] = []

    def wait() -> None:
        woke.append(waiter.wait_for_append(1, 60.0))  # type: ignore[attr-defined]

    sleepers = [threading.Thread(target=wait) for _ in range(3)]
    for sleeper in sleepers:
        sleeper.start()
    writer.append("A", [bank.MoneyDeposited(amount=1)], expected_version=1)
    for sleeper in sleepers:
        sleeper.join(30)
    assert woke == [True, True, True]
    assert listening(postgres_admin, postgres_url) == 1
    waiter.close()
    writer.close()


def counting_connects(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Patch psycopg.connect to record every connection opened through it (handler
    locks and listeners; the pool opens its own another way)."""
    opened: list[object] = []
    connect = psycopg.connect

    def counted(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return connect(*args, **kwargs)

    monkeypatch.setattr(psycopg, "connect", counted)
    return opened


def test_a_standby_polls_on_one_connection_and_takes_over_on_it(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby polling for a lock another runner holds asks on one connection,
    however many attempts it makes, and becomes the holder on that connection once
    the lock is released."""
    store = incident.open_event_store(postgres_url)
    checkpoints = store.checkpoints()  # type: ignore[attr-defined]
    holder, standby = checkpoints.lock("recorder"), checkpoints.lock("recorder")
    assert holder.acquire(timeout=0)
    opened = counting_connects(monkeypatch)
    assert not standby.acquire(timeout=1.0)  # a few attempts at most every 0.25s
    assert not standby.acquire(timeout=0.5)
    assert not standby.held()
    holder.release()
    assert standby.acquire(timeout=30)
    assert standby.held()
    assert len(opened) == 1
    standby.release()
    assert holder.acquire(timeout=30)  # released by closing the session
    holder.release()
    store.close()


def test_a_standby_whose_connection_died_opens_another(
    postgres_url: str, postgres_admin: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends the session a standby polls on (a restart, a kill): its next
    attempt opens a new connection instead of failing, and it still takes over."""
    store = incident.open_event_store(postgres_url)
    checkpoints = store.checkpoints()  # type: ignore[attr-defined]
    holder, standby = checkpoints.lock("recorder"), checkpoints.lock("recorder")
    assert holder.acquire(timeout=0)
    opened = counting_connects(monkeypatch)
    assert not standby.acquire(timeout=0)
    postgres_admin.execute("SELECT pg_terminate_backend(%s)", [standby._conn.info.backend_pid])
    assert not standby.acquire(timeout=0)
    holder.release()
    assert standby.acquire(timeout=30)
    assert len(opened) == 2
    standby.release()
    store.close()


def test_a_stopped_standby_closes_the_connection_it_polled_on(postgres_url: str) -> None:
    """A runner that never got the lock and is stopped leaves no connection open."""
    seen: list[tuple[int, int]] = []
    first, second = app(postgres_url, recorder(seen)), app(postgres_url, recorder(seen))
    first.dispatch(bank.OpenAccount(aggregate_id="A"))
    try:
        first.subscriptions.start()
        first.subscriptions.wait_until_caught_up()
        second.subscriptions.start()
        standby = second.subscriptions["recorder"]._lock
        for _ in range(3000):  # its first attempt opens the connection it keeps
            if standby._conn is not None:  # type: ignore[attr-defined]
                break
            threading.Event().wait(0.01)
        assert standby._conn is not None  # type: ignore[attr-defined]
    finally:
        second.subscriptions.stop()
        first.subscriptions.stop()
    assert standby._conn is None  # type: ignore[attr-defined]
    first.event_store.close()
    second.event_store.close()


def test_a_replay_refused_while_the_handler_runs_elsewhere_leaves_no_connection(
    postgres_url: str,
) -> None:
    """Replaying a handler another runner holds is refused, and the connection its one
    attempt at the lock opened is closed with the refusal."""
    seen: list[tuple[int, int]] = []
    running, replaying = app(postgres_url, recorder(seen)), app(postgres_url, recorder(seen))
    running.dispatch(bank.OpenAccount(aggregate_id="A"))
    subscription = replaying.subscriptions["recorder"]
    try:
        running.subscriptions.start()
        running.subscriptions.wait_until_caught_up()
        with pytest.raises(incident.IncidentError, match="running elsewhere"):
            subscription.replay()
    finally:
        running.subscriptions.stop()
    assert subscription._lock._conn is None  # type: ignore[attr-defined]
    running.event_store.close()
    replaying.event_store.close()
