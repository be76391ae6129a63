"""The combiner that puts concurrent commits of one process's threads in one Postgres
transaction (incident/stores/postgres/thread_batches.py), on its own: ``one`` and
``many`` here are recording fakes that can be held, so which commits share a batch,
who is told what, and when the lead moves on are checked without a database. The
Postgres side is tests/test_postgres_thread_batches.py. Nothing here is timed: threads
are made to queue by holding a commit until the queue is seen to hold them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import incident
from incident.stores.postgres.thread_batches import ThreadBatches

WAIT = 10.0  # seconds any step may take before the test fails


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


class Fake:
    """``one`` and ``many`` that record their calls; an item named in ``hold`` is held
    (inside ``one``, or inside ``many`` after ``committed()``) until ``release``d. An
    item starting with "bad" is refused by ``many`` with its own error."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.hold: dict[str, threading.Event] = {}
        self.entered: set[str] = set()
        self.fail_many: BaseException | None = None
        self.batches: ThreadBatches[str, str] = ThreadBatches(
            self.one, self.many, lambda item, error: RuntimeError(f"{item}: {error!r}")
        )

    def held(self, item: str) -> threading.Event:
        self.hold[item] = threading.Event()
        return self.hold[item]

    def _wait(self, items: list[str]) -> None:
        for item in items:
            if item in self.hold:
                self.entered.add(item)
                assert self.hold[item].wait(WAIT)

    def one(self, item: str) -> str:
        self.calls.append(("one", [item]))
        self._wait([item])
        return f"{item} alone"

    def many(self, items: list[str], committed: Callable[[], None]) -> list[str | Exception]:
        self.calls.append(("many", list(items)))
        if self.fail_many is not None:
            raise self.fail_many
        committed()
        self._wait(items)
        return [ValueError(item) if item.startswith("bad") else f"{item} batched" for item in items]


@pytest.fixture
def fake() -> Iterator[Fake]:
    made = Fake()
    made.batches.depth = 1  # one commit in flight makes the others queue
    yield made
    for event in made.hold.values():
        event.set()


class Caller:
    """A thread committing one item; ``outcome`` is its result or its error."""

    def __init__(self, batches: ThreadBatches[str, str], item: str) -> None:
        self.outcome: Any = None
        self.thread = threading.Thread(target=self._run, args=(batches, item))
        self.thread.start()

    def _run(self, batches: ThreadBatches[str, str], item: str) -> None:
        try:
            self.outcome = batches.commit(item)
        except BaseException as error:
            self.outcome = error

    def result(self) -> Any:
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.outcome


def queue_behind(fake: Fake, first: str, items: list[str]) -> tuple[Caller, list[Caller]]:
    """``first`` commits alone and is held; ``items`` queue behind it, in order."""
    release = fake.held(first)
    leader = Caller(fake.batches, first)
    until(lambda: first in fake.entered)
    callers = []
    for n, item in enumerate(items, 1):
        callers.append(Caller(fake.batches, item))
        until(lambda n=n: len(fake.batches.queue) == n)
    release.set()
    return leader, callers


def test_a_lone_commit_is_written_by_one_on_its_own_thread(fake: Fake) -> None:
    assert fake.batches.commit("a") == "a alone"
    assert fake.calls == [("one", ["a"])]
    assert fake.batches.batches == 0


def test_commits_queued_behind_one_in_flight_share_one_batch_with_their_own_outcomes(
    fake: Fake,
) -> None:
    leader, callers = queue_behind(fake, "first", ["b", "bad-c", "d"])
    assert leader.result() == "first alone"
    b, bad, d = (caller.result() for caller in callers)
    assert (b, d) == ("b batched", "d batched")
    assert isinstance(bad, ValueError) and str(bad) == "bad-c"  # its own error, alone
    assert fake.calls == [("one", ["first"]), ("many", ["b", "bad-c", "d"])]
    assert (fake.batches.batches, fake.batches.batched) == (1, 3)


def test_a_batch_is_bounded_and_the_rest_goes_in_the_next(fake: Fake) -> None:
    fake.batches.max_batch = 2
    leader, callers = queue_behind(fake, "first", ["b", "c", "d", "e", "f"])
    assert leader.result() == "first alone"
    outcomes = [caller.result() for caller in callers]
    assert outcomes == [f"{x} batched" for x in "bcde"] + ["f alone"]  # left alone: one
    assert fake.calls[1:] == [("many", ["b", "c"]), ("many", ["d", "e"]), ("one", ["f"])]


def test_threads_queue_once_two_commits_are_in_flight(fake: Fake) -> None:
    """By default two commits go at once (one written while the other's flush is under
    way, as the server runs them); the third and later queue for a batch."""
    fake.batches.depth = 2
    releases = [fake.held("first"), fake.held("second")]
    first, second = Caller(fake.batches, "first"), Caller(fake.batches, "second")
    until(lambda: {"first", "second"} <= fake.entered)
    third = Caller(fake.batches, "third")
    until(lambda: len(fake.batches.queue) == 1)
    fourth = Caller(fake.batches, "fourth")
    until(lambda: len(fake.batches.queue) == 2)
    releases[0].set()
    assert first.result() == "first alone"
    assert (third.result(), fourth.result()) == ("third batched", "fourth batched")
    releases[1].set()
    assert second.result() == "second alone"
    assert fake.calls[2:] == [("many", ["third", "fourth"])]


def test_the_lead_moves_on_once_a_batch_has_committed_not_once_it_is_flushed(
    fake: Fake,
) -> None:
    """A batch held after ``committed()`` (its flush, say) does not keep the next commit
    from being written; its callers are answered only once it is over."""
    leader, (held, other) = queue_behind(fake, "first", ["held", "other"])
    release = fake.held("held")
    assert leader.result() == "first alone"
    until(lambda: "held" in fake.entered)
    late = Caller(fake.batches, "late")  # its place in flight is free: the batch committed
    assert late.result() == "late alone"
    assert held.thread.is_alive() and other.thread.is_alive()  # not answered yet
    release.set()
    assert (held.result(), other.result()) == ("held batched", "other batched")


def test_a_batch_that_fails_as_a_whole_tells_every_caller(fake: Fake) -> None:
    fake.fail_many = ConnectionError("the server went away")
    leader, callers = queue_behind(fake, "first", ["b", "c"])
    assert leader.result() == "first alone"
    assert all(caller.result() is fake.fail_many for caller in callers)
    fake.fail_many = None
    assert fake.batches.commit("after") == "after alone"  # the lead lapsed, nothing stuck


def test_a_store_error_failing_a_batch_is_raised_as_its_own_copy_in_each_thread(
    fake: Fake,
) -> None:
    """Each caller raises it on its own thread, and a raise writes the traceback into
    the exception: one object shared by all would carry the others' frames."""
    cause = ConnectionError("the server went away")
    failure = incident.StoreError("the store failed")
    failure.__cause__ = cause
    fake.fail_many = failure
    leader, callers = queue_behind(fake, "first", ["b", "c"])
    assert leader.result() == "first alone"
    errors = [caller.result() for caller in callers]
    assert all(type(e) is incident.StoreError and e.args == failure.args for e in errors)
    assert all(e.__cause__ is cause for e in errors)
    assert len({id(failure), *map(id, errors)}) == 3
    fake.fail_many = None


def test_an_interrupted_batch_tells_the_others_their_outcome_is_unknown(fake: Fake) -> None:
    """KeyboardInterrupt in the thread writing a batch: it leaves with it, the others
    are told (``interrupted``) rather than left waiting, and the combiner goes on."""
    fake.fail_many = KeyboardInterrupt()
    leader, (writer, other) = queue_behind(fake, "first", ["writer", "other"])
    assert leader.result() == "first alone"
    assert isinstance(writer.result(), KeyboardInterrupt)
    told = other.result()
    assert isinstance(told, RuntimeError) and str(told).startswith("other: KeyboardInterrupt")
    fake.fail_many = None
    assert fake.batches.commit("after") == "after alone"


def test_a_queued_caller_that_gives_up_leaves_the_queue_unwritten(fake: Fake) -> None:
    """A caller interrupted while it waits (``abandon``): not yet taken, its commit is
    never written, and the lead it was handed goes to the next in line."""
    release = fake.held("first")
    leader = Caller(fake.batches, "first")
    until(lambda: "first" in fake.entered)
    gone = Caller(fake.batches, "gone")
    until(lambda: len(fake.batches.queue) == 1)
    ticket = fake.batches.queue[0]
    fake.batches.abandon(ticket)  # what commit() does when its wait is interrupted
    after = Caller(fake.batches, "after")
    until(lambda: len(fake.batches.queue) == 1)
    release.set()
    assert leader.result() == "first alone" and after.result() == "after alone"
    ticket.wake.release()  # the abandoned caller's thread, still parked, is let go
    gone.result()
    assert all("gone" not in items for _, items in fake.calls)
