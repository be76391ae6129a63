"""Who closes what: a command handler closes the stores it opened, a checkpoint store
leaves the database it shares with its event store open, and a closed store (on every
backend) refuses every verb with StoreError."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import DURABLE_BACKENDS, on_backends

import incident
from incident.examples import bank
from incident.testing.contract.checkpoint_store import parked_event


def test_close_closes_the_stores_the_handler_opened_from_urls(store_url: str) -> None:
    """A command handler made from URLs closes its event and projection stores."""
    app = incident.CommandHandler(store_url, store_url, aggregates=[bank.bank_account])
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.close()
    with pytest.raises(incident.StoreError):
        app.event_store.version("A")
    with pytest.raises(incident.StoreError):
        app.projection_store.get(bank.BankAccount, "A")
    app.close()  # closing twice is harmless


@on_backends(DURABLE_BACKENDS)
def test_stores_given_as_objects_stay_the_callers(store_url: str) -> None:
    """close() leaves open the stores it was given: their owner closes them."""
    store = incident.open_event_store(store_url)
    with incident.CommandHandler(store, aggregates=[bank.bank_account]) as app:
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
    assert store.version("A") == 1
    store.close()


@on_backends(DURABLE_BACKENDS)
def test_a_command_handler_is_a_context_manager(store_url: str) -> None:
    """`with CommandHandler(url) as app` closes what it opened on the way out, and stops
    its subscriptions first."""
    with bank.build(store_url, subscriptions=True) as app:
        before = set(threading.enumerate())
        app.subscriptions.start()
        running = set(threading.enumerate()) - before
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
        app.subscriptions.wait_until_caught_up()
        assert running
    assert not any(thread.is_alive() for thread in running)
    with pytest.raises(incident.StoreError):
        app.event_store.version("A")


def every_verb(store: incident.EventStore) -> dict[str, Callable[[], object]]:
    """Each verb of an event store, its projections() and its checkpoints(), as a call."""
    projections = store.projections()
    checkpoints = incident.stores.checkpoint_store_for(store)
    owed = incident.stores.Owed(
        handler="h",
        position=1,
        event_id="00000000-0000-4000-8000-000000000001",  # a UUID, as every store needs
        aggregate_id="A",
        event_type="AccountOpened",
        owed_at=dt.datetime.now(dt.UTC),
    )
    parked = parked_event("h", 1)
    opened = bank.AccountOpened(account_number="B")
    account = bank.BankAccount(
        aggregate_id="A",
        account_number="A",
        balance=0,
        version=1,
        event_id="e",
        event_date=dt.datetime.now(dt.UTC),
    )
    return {
        "append": lambda: store.append("B", [opened], expected_version=0),
        "commit_many": lambda: _raised(
            store.commit_many(  # type: ignore[attr-defined]
                [
                    incident.stores.CommitCall(
                        incident.stores.AppendRequest(
                            aggregate_id="C", events=[opened], expected_version=0
                        )
                    )
                ]
            )[0]
        ),
        "get": lambda: store.get("A"),
        "events": lambda: list(store.events("A")),
        "version": lambda: store.version("A"),
        "read_all": lambda: list(store.read_all()),
        "subscribe": lambda: next(store.subscribe(after=0)),
        "last_position": lambda: store.last_position(),  # type: ignore[attr-defined]
        "wait_for_append": lambda: store.wait_for_append(0, 0.1),  # type: ignore[attr-defined]
        "outcome_for": lambda: store.outcome_for("key"),
        "remember_rejection": lambda: store.remember_rejection("key", "no"),
        "owed": lambda: store.owed(),
        "owe": lambda: store.owe(owed),
        "settle": lambda: store.settle("h", 1),
        "initialize": lambda: store.initialize(),
        "project": lambda: projections.project(account),
        "projections.get": lambda: projections.get(bank.BankAccount, "A"),
        "projections.all": lambda: projections.all(bank.BankAccount),
        "load": lambda: checkpoints.load("h"),
        "save": lambda: checkpoints.save("h", 1, expected=0),
        "reset": lambda: checkpoints.reset("h"),
        "checkpoints": lambda: checkpoints.checkpoints(),
        "park": lambda: checkpoints.park(parked),
        "parked": lambda: checkpoints.parked(),
        "unpark": lambda: checkpoints.unpark("h", 1),
        "checkpoints.initialize": lambda: checkpoints.initialize(),
    }


@pytest.mark.parametrize("closing", ["event store", "projection store"])
def test_a_closed_store_refuses_every_verb_with_store_error(store_url: str, closing: str) -> None:
    """Closing an event store, or its projection store (they share one database), makes
    every verb of both and of its checkpoint store raise StoreError, on every backend
    (memory's used to go on working); closing again does nothing."""
    store = incident.open_event_store(store_url)
    store.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
    verbs = every_verb(store)
    (store if closing == "event store" else store.projections()).close()
    answered = {}
    for name, call in verbs.items():
        with contextlib.suppress(incident.StoreError):
            answered[name] = call()
    assert answered == {}
    store.close()
    store.projections().close()


def test_closing_a_memory_store_wakes_its_waiting_tail() -> None:
    """A tail waiting for the next append when its memory store closes raises StoreError
    at once, not after its poll."""
    store = incident.open_event_store("memory://")
    tail = store.subscribe(after=0, poll_interval=60)
    raised: list[BaseException] = []
    waiting = threading.Thread(target=lambda: raised.extend(_next_error(tail)), daemon=True)
    waiting.start()
    time.sleep(0.2)
    store.close()
    waiting.join(10)
    assert not waiting.is_alive()
    assert [type(error) for error in raised] == [incident.StoreError]


def _raised(outcome: object) -> object:
    """A commit_many outcome as a call's: the error it holds is raised."""
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _next_error(tail: Iterator[object]) -> list[BaseException]:
    try:
        next(tail)
    except Exception as error:
        return [error]
    return []


def test_closing_a_checkpoint_store_leaves_its_event_store_usable(store_url: str) -> None:
    """A checkpoint store from event_store.checkpoints() shares the event store's
    database; closing it (as a subscription finishing may) does not close that."""
    store = incident.open_event_store(store_url)
    checkpoints = incident.stores.checkpoint_store_for(store)
    checkpoints.save("reports", 0, expected=0)
    checkpoints.close()
    store.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
    assert [r.event_type for r in store.read_all()] == ["AccountOpened"]
    again = incident.stores.checkpoint_store_for(store)
    assert again.checkpoints() == {"reports": 0}
    store.close()


# A handler closed while its writers are still dispatching, in a process of its own: a
# connection closed under a running statement would crash that process, not fail a test
CLOSED_UNDER_WRITERS = r"""
import asyncio, signal, sys, threading, time
signal.alarm(60)
import incident
from incident.examples import bank

url, flavour, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
with bank.build(url) as setup:
    for n in range(64):
        setup.dispatch(bank.OpenAccount(aggregate_id=f"A{n}"))
acknowledged = []

if flavour == "threads":
    app = bank.build(url)

    def work(n):
        for _ in range(200):
            try:
                recorded = app.dispatch(bank.DepositMoney(aggregate_id=f"A{n}", amount=1))
                acknowledged.extend(r.event_id for r in recorded)
            except incident.StoreError:
                return

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(delay)
    app.close()
    for thread in threads:
        thread.join(30)
else:
    async def main():
        app = bank.build_async(url)

        async def work(n):
            for _ in range(50):
                try:
                    recorded = await app.dispatch(bank.DepositMoney(aggregate_id=f"A{n}", amount=1))
                    acknowledged.extend(r.event_id for r in recorded)
                except incident.StoreError:
                    return

        tasks = [asyncio.ensure_future(work(n)) for n in range(64)]
        await asyncio.sleep(delay)
        await app.close()
        await asyncio.gather(*tasks)

    asyncio.run(main())

store = incident.open_event_store(url)
logged = {r.event_id for r in store.read_all()}
store.close()
assert set(acknowledged) <= logged, "an acknowledged command is not in the log"
print("acknowledged", len(acknowledged))
"""


@pytest.mark.parametrize("flavour", ["threads", "tasks"])
def test_closing_a_sqlite_handler_while_it_dispatches_neither_crashes_nor_loses(
    tmp_path: Any, flavour: str
) -> None:
    """close() while 16 threads (or 64 tasks) still dispatch: the commands under way
    end with their outcome or a StoreError, the process carries on, and every command
    acknowledged is in the log. A connection another thread is running a statement on
    is closed by that thread at its next use, never under the statement."""
    for attempt, delay in enumerate([0.001, 0.005, 0.02, 0.05] * 2):
        url = f"sqlite:///{tmp_path}/closing-{attempt}.db"
        done = subprocess.run(
            [sys.executable, "-c", CLOSED_UNDER_WRITERS, url, flavour, str(delay)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, (attempt, done.returncode, done.stderr[-2000:])
        assert done.stdout.startswith("acknowledged")


def test_a_closed_async_store_says_store_error_and_closes_twice(store_url: str) -> None:
    """After close() every verb of an async store and handler raises StoreError (a
    tail waiting at the time too), as the sync ones do, and closing again does nothing."""

    async def main() -> None:
        app = bank.build_async(store_url)
        await app.dispatch(bank.OpenAccount(aggregate_id="A"))

        async def tail() -> None:
            async for _ in app.event_store.subscribe(after=1):
                pass

        waiting = asyncio.ensure_future(tail())
        await asyncio.sleep(0.2)
        await app.close()
        with pytest.raises(incident.StoreError):
            await asyncio.wait_for(waiting, 10)
        with pytest.raises(incident.StoreError):
            await app.dispatch(bank.DepositMoney(aggregate_id="A", amount=1))
        with pytest.raises(incident.StoreError):
            await app.event_store.version("A")
        with pytest.raises(incident.StoreError):
            await app.projection_store.get(bank.BankAccount, "A")
        await app.close()
        await app.event_store.close()

    asyncio.run(main())


@on_backends(["postgres"])
def test_closing_before_the_first_dispatch_connects_leaves_no_pool_open(store_url: str) -> None:
    """close() while the first dispatches have not opened the async pool yet: none of
    them opens it afterwards (each gets StoreError), so no session is left behind."""

    async def main() -> None:
        app = bank.build_async(store_url)
        tasks = [
            asyncio.ensure_future(app.dispatch(bank.OpenAccount(aggregate_id=f"A{n}")))
            for n in range(32)
        ]
        await asyncio.sleep(0)
        await app.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, (list, incident.StoreError)) for o in outcomes), outcomes
        pool = app.event_store._pool  # type: ignore[attr-defined]
        assert pool.closed

    asyncio.run(main())
