"""Live tails (incident/stores/live.py): ``store.subscribe(after=N)`` yields the log after
N, then every new event as it commits, in order, never skipping or repeating one; woken
by the store (memory's condition, Postgres's NOTIFY, SQLite's in-process signal), with a
poll as the safety net for appends of other processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

import incident
from incident.examples import bank

WAIT = 60.0  # seconds a test waits for a reader before calling it stuck
NEVER = 3600.0  # a poll interval no test lives to see: only a wake-up can deliver


def deposit(amount: int) -> list[bank.MoneyDeposited]:
    return [bank.MoneyDeposited(amount=amount)]


class Tail:
    """A thread reading ``count`` events of a live tail, then stopping."""

    def __init__(self, live: Iterator[incident.Recorded[Any]], count: int) -> None:
        self.seen: list[incident.Recorded[Any]] = []
        self.failed: BaseException | None = None
        self._live, self._count = live, count
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for recorded in self._live:
                self.seen.append(recorded)
                if len(self.seen) == self._count:
                    return
        except BaseException as error:  # reported by finish()
            self.failed = error

    def finish(self) -> list[incident.Recorded[Any]]:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), f"stuck after {len(self.seen)} events"
        assert self.failed is None, self.failed
        return self.seen


def other_store(url: str, store: incident.EventStore) -> incident.EventStore:
    """A second store on the same log (memory: the same object, its log is its own)."""
    return store if url.startswith("memory:") else incident.open_event_store(url)


def test_a_tail_yields_the_log_after_the_position_then_each_new_event(
    event_store: incident.EventStore,
) -> None:
    for n in range(5):
        event_store.append("A", deposit(n), expected_version=n)
    tail = Tail(event_store.subscribe(after=2, batch_size=2), 6)
    for n in range(5, 8):
        event_store.append("A", deposit(n), expected_version=n)
    seen = tail.finish()
    assert [r.position for r in seen] == [3, 4, 5, 6, 7, 8]
    assert [r.data.amount for r in seen] == [2, 3, 4, 5, 6, 7]
    assert seen == list(event_store.read_all(after=2))


def test_an_append_in_this_process_wakes_a_waiting_tail_without_a_poll(
    store_url: str, event_store: incident.EventStore
) -> None:
    """The poll would come in an hour: only the store's wake-up can deliver in time,
    also for an append through a second store opened on the same database."""
    event_store.initialize()
    writer = other_store(store_url, event_store)
    try:
        tail = Tail(event_store.subscribe(poll_interval=NEVER), 3)
        for n in range(3):
            writer.append("A", deposit(n), expected_version=n)
        assert [r.position for r in tail.finish()] == [1, 2, 3]
    finally:
        if writer is not event_store:
            writer.close()


APPEND_ELSEWHERE = """
import sys, incident
from contextlib import closing
from incident.examples import bank
with closing(incident.open_event_store(sys.argv[1])) as store:
    for n in range(3):
        store.append("B", [bank.MoneyDeposited(amount=n)], expected_version=n)
"""


def test_appends_of_another_process_reach_the_tail(initialized_url: str) -> None:
    """No wake-up crosses from another process to an SQLite reader: the poll delivers
    (Postgres's NOTIFY does cross)."""
    with closing(incident.open_event_store(initialized_url)) as store:
        tail = Tail(store.subscribe(poll_interval=0.05), 3)
        subprocess.run(
            [sys.executable, "-c", APPEND_ELSEWHERE, initialized_url], check=True, timeout=WAIT
        )
        seen = tail.finish()
    assert [(r.aggregate_id, r.version) for r in seen] == [("B", 1), ("B", 2), ("B", 3)]


def test_a_tail_under_eight_writers_sees_every_event_once_in_order(
    store_url: str, event_store: incident.EventStore
) -> None:
    event_store.initialize()
    writers, each = 8, 25
    tail = Tail(event_store.subscribe(poll_interval=0.05, batch_size=7), writers * each)
    stores = [other_store(store_url, event_store) for _ in range(writers)]

    def write(n: int) -> None:
        for version in range(each):
            stores[n].append(f"w{n}", deposit(version), expected_version=version)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    seen = tail.finish()
    for store in stores:
        if store is not event_store:
            store.close()
    assert [r.position for r in seen] == list(range(1, writers * each + 1))
    assert seen == list(event_store.read_all())
    for n in range(writers):  # each stream in its own order
        assert [r.version for r in seen if r.aggregate_id == f"w{n}"] == list(range(1, each + 1))


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"after": -1}, "after must be a position"),
        ({"after": "3"}, "after must be a position"),
        ({"after": True}, "after must be a position"),
        ({"poll_interval": 0}, "poll_interval must be > 0"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ],
)
def test_bad_arguments_are_refused_when_subscribing(
    event_store: incident.EventStore, arguments: dict[str, Any], says: str
) -> None:
    """A tail refuses them as the reads do: InvalidArgument, a ValueError too."""
    with pytest.raises(incident.InvalidArgument, match=says):
        event_store.subscribe(**arguments)
    with pytest.raises(ValueError, match=says):
        event_store.subscribe(**arguments)
    if "after" in arguments:
        with pytest.raises(incident.InvalidArgument, match="after must be an int >= 0"):
            list(event_store.read_all(after=arguments["after"]))


def test_a_tail_stops_when_closed(event_store: incident.EventStore) -> None:
    event_store.append("A", deposit(1), expected_version=0)
    live = event_store.subscribe()
    assert next(live).position == 1
    live.close()
    with pytest.raises(StopIteration):
        next(live)
