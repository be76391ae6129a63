"""Subscriber processes on the durable stores: killed, restarted, and racing each other."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from audit_handler import Handled, app, audit

import incident
from incident.examples import bank
from incident.stores import MemoryCheckpointStore, MemoryProjectionStore
from incident.stores.sqlite import sqlite_path

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.slow


class Subscriber:
    """An ``incident subscribe`` process running the audit handler, killed by the test."""

    def __init__(
        self, url: str, batch_size: int = 100, delay: float = 0.0, concurrency: int = 1
    ) -> None:
        path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path, "INCIDENT_TEST_LISTENER_DELAY": str(delay)}
        aggregates = ["incident.examples.bank:bank_account", "incident.examples.bank:transfer"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "incident", "subscribe", url, "--handler", "audit_handler:audit"]
            + [arg for aggregate in aggregates for arg in ("--aggregate", aggregate)]
            + ["--batch-size", str(batch_size), "--concurrency", str(concurrency)],
            env=env,
            stdout=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def append_deposits(store: incident.EventStore, rng: random.Random, count: int) -> None:
    """``count`` events on ten accounts, a few per append, as many writers would."""
    written = 0
    while written < count:
        number = f"ACC{rng.randrange(10)}"
        version = store.version(number)
        events: list[incident.Event] = (
            [] if version else [bank.AccountOpened(account_number=number)]
        )
        events += [
            bank.MoneyDeposited(amount=rng.randrange(1, 100)) for _ in range(rng.randrange(1, 6))
        ]
        store.append(number, events, expected_version=version, aggregate="bank_account")
        written += len(events)


def wait_for_checkpoint(checkpoints: incident.CheckpointStore, position: int) -> None:
    deadline = time.monotonic() + 60
    while checkpoints.load("audit") < position:
        assert time.monotonic() < deadline, f"audit stuck at {checkpoints.load('audit')}"
        time.sleep(0.02)


def count_rewrites_of_handled(url: str, writer: incident.CommandHandler) -> Callable[[], int]:
    """Install a trigger counting every UPDATE of a ``Handled`` row. Each event has its
    own row, so an event whose effects were committed twice shows up as an update."""
    writer.projection_store.project(Handled(aggregate_id="0", pid=0))  # creates the table
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.executescript(
                "CREATE TABLE handled_rewrites (n INTEGER);"
                "CREATE TRIGGER handled_rewritten AFTER UPDATE ON handled"
                " BEGIN INSERT INTO handled_rewrites VALUES (1); END;"
            )

        def count() -> int:
            with closing(sqlite3.connect(path)) as conn:
                return int(conn.execute("SELECT count(*) FROM handled_rewrites").fetchone()[0])

        return count
    schema = parse_qs(urlsplit(url).query)["schema"][0]
    server = url.split("?")[0]
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{schema}".handled_rewrites (n int)')
        conn.execute(
            f'CREATE FUNCTION "{schema}".handled_rewritten() RETURNS trigger LANGUAGE plpgsql'
            f' AS $$ BEGIN INSERT INTO "{schema}".handled_rewrites VALUES (1); RETURN NEW; END $$'
        )
        conn.execute(
            f'CREATE TRIGGER handled_rewritten AFTER UPDATE ON "{schema}".handled'
            f' FOR EACH ROW EXECUTE FUNCTION "{schema}".handled_rewritten()'
        )

    def count_postgres() -> int:
        with psycopg.connect(server) as conn:
            row = conn.execute(f'SELECT count(*) FROM "{schema}".handled_rewrites').fetchone()
            return int(row[0]) if row else 0

    return count_postgres


def full_replay(store: incident.EventStore) -> MemoryProjectionStore:
    """The read models a single uninterrupted run over the whole log produces."""
    expected = MemoryProjectionStore()
    writer = incident.CommandHandler(store, expected, aggregates=[bank.bank_account, bank.transfer])
    incident.Subscription(audit, writer, checkpoints=MemoryCheckpointStore()).catch_up()
    return expected


@pytest.mark.parametrize("concurrency", [1, 8], ids=["one-by-one", "in-waves"])
def test_a_subscriber_killed_again_and_again_ends_equal_to_a_full_replay(
    initialized_url: str, concurrency: int
) -> None:
    """SIGKILLed at random moments ten times while thousands of events arrive, then
    restarted: no event is skipped or applied twice, and the read models equal an
    uninterrupted run; also when it handles its batches in waves (``incident subscribe
    --concurrency 8``), killed in the middle of one."""
    rng = random.Random(7)
    writer = app(initialized_url)
    store = writer.event_store
    checkpoints = incident.stores.checkpoint_store_for(store)
    rewrites = count_rewrites_of_handled(initialized_url, writer)
    for _ in range(10):
        # a slowed-down subscriber (about a millisecond per event) killed at a random
        # moment while a burst of events arrives: mostly in the middle of a batch
        subscriber = Subscriber(
            initialized_url,
            batch_size=rng.choice([7, 50, 200]),
            delay=0.001,
            concurrency=concurrency,
        )
        append_deposits(store, rng, 300)
        time.sleep(rng.uniform(0.1, 0.8))
        subscriber.kill()
    subscriber = Subscriber(initialized_url, concurrency=concurrency)
    head = incident.subscriptions.last_position(store)
    assert head >= 3000
    try:
        wait_for_checkpoint(checkpoints, head)
    finally:
        subscriber.kill()

    projections = writer.projection_store
    handled = {int(row.aggregate_id) for row in projections.all(Handled)}
    assert handled == set(range(head + 1))  # nothing skipped (0 is the test's own row)
    assert rewrites() == 0  # nothing committed twice
    expected = full_replay(store)
    assert sorted(projections.all(bank.BankAccount), key=lambda r: r.aggregate_id) == sorted(
        expected.all(bank.BankAccount), key=lambda r: r.aggregate_id
    )
    store.close()


def test_two_subscribers_one_works_and_the_other_takes_over(initialized_url: str) -> None:
    """Two processes run the same handler: only the lock holder handles events; when it
    is killed, the other continues from the checkpoint."""
    rng = random.Random(11)
    writer = app(initialized_url)
    store = writer.event_store
    checkpoints = incident.stores.checkpoint_store_for(store)
    first, second = Subscriber(initialized_url), Subscriber(initialized_url)
    try:
        append_deposits(store, rng, 500)
        head = incident.subscriptions.last_position(store)
        wait_for_checkpoint(checkpoints, head)
        workers = {row.pid for row in writer.projection_store.all(Handled)}
        assert len(workers) == 1
        [working] = workers
        idle = second if working == first.process.pid else first
        (first if idle is second else second).kill()

        append_deposits(store, rng, 500)
        later = incident.subscriptions.last_position(store)
        wait_for_checkpoint(checkpoints, later)
        rows = writer.projection_store.all(Handled)
        assert {row.pid for row in rows if int(row.aggregate_id) > head} == {idle.process.pid}
        assert {int(row.aggregate_id) for row in rows} == set(range(1, later + 1))
    finally:
        first.kill()
        second.kill()
        store.close()
