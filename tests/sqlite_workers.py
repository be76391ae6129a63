"""Work for the OS processes of test_sqlite.py. Spawned children import this small module
rather than the test module, so they start without loading pytest."""

from __future__ import annotations

from typing import Any

import incident
from incident.examples import bank
from incident.examples.bank import DepositMoney, MoneyDeposited, WithdrawMoney
from incident.stores.sqlite import SQLiteEventStore


def withdraw_in_process(url: str, start: Any, results: Any) -> None:
    handler = bank.build(url)
    start.wait()
    try:
        handler.dispatch(WithdrawMoney(aggregate_id="ACC1", amount=24))
    except incident.Rejected as rejected:
        results.put(rejected.reason)
    except Exception as error:  # reported to the test rather than lost in a child
        results.put(f"{type(error).__name__}: {error}")
    else:
        results.put("ok")


def deposit_in_process(url: str, count: int, start: Any, results: Any) -> None:
    handler = bank.build(url)
    start.wait()
    done = 0
    try:
        while done < count:
            try:
                handler.dispatch(DepositMoney(aggregate_id="ACC1", amount=1))
            except incident.ConcurrencyError:
                continue  # retries ran out and nothing was written: send it again
            done += 1
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")
        return
    results.put(done)


def initialize_in_process(url: str, start: Any, results: Any) -> None:
    store = incident.open_event_store(url)
    start.wait()
    try:
        results.put(store.initialize())
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")


def append_after_fork(store: SQLiteEventStore, results: Any) -> None:
    try:
        store.append("forked", [MoneyDeposited(amount=1)], expected_version=0)
        results.put([r.aggregate_id for r in store.read_all()])
    except Exception as error:
        results.put(f"{type(error).__name__}: {error}")
