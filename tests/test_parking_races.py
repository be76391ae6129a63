"""Dead letters handled from two places at once: a retry in one process while the
runner (or another retry) works in another must not write an older row over a newer
one. Each Subscription object here stands for a process of its own (they share the
stores, not the per-object lock). On every store backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from test_parking import (
    Balance,
    deposits,
    new_app,
    open_accounts,
    replayed,
    rows,
    states,
    subscribe,
)
from test_parking import Listener as Plain

import incident
from incident.examples.bank import AccountOpened, AccountState, MoneyDeposited


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    app = new_app(store_url)
    yield app
    app.event_store.close()


class Gated:
    """A listener of the ``balances`` handler that, on ``gated`` positions, stops until
    the test opens the gate (``reached`` says it is there), and fails on ``broken`` ones."""

    def __init__(self, broken: set[int] | None = None, gated: set[int] | None = None) -> None:
        self.broken, self.gated = broken or set(), gated or set()
        self.reached, self.opened = threading.Event(), threading.Event()
        self.handler = incident.EventHandler("balances")

        @self.handler.listen(AccountOpened, MoneyDeposited)
        def balance(recorded: incident.Recorded[Any], state: AccountState) -> Balance:
            if recorded.position in self.gated:
                self.reached.set()
                assert self.opened.wait(30), "the test never opened the gate"
            if recorded.position in self.broken:
                raise RuntimeError(f"cannot handle #{recorded.position}")
            return Balance(
                aggregate_id=recorded.aggregate_id, balance=state.balance, at=recorded.version
            )


def in_thread(work: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``work()`` in a thread; its result (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(work())
        except BaseException as error:
            out.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def other(app: incident.CommandHandler, listener: Any) -> Any:
    """The same handler as seen from another process: its own objects, the same stores."""
    return subscribe(new_app(app.event_store), listener)


def test_a_retry_elsewhere_leaves_what_the_runners_open_batch_parked(
    app: incident.CommandHandler,
) -> None:
    """The runner gives up on #4 of stream A while its batch, holding A's row made from
    #3, is not committed yet. A retry elsewhere then must not handle #4: the batch would
    commit the older row over the retried one. #4 is parked with the batch's rows."""
    runner_listener = Gated(broken={4}, gated={5})
    runner = subscribe(app, runner_listener)
    open_accounts(app, "A", "B")  # 1, 2
    deposits(app, ("A", 11), ("A", 100), ("B", 5))  # 3, 4, 5
    thread, _ = in_thread(runner.catch_up)
    assert runner_listener.reached.wait(30)  # #4 is parked, the batch is open at #5

    retrier = other(app, Plain())
    assert states(retrier) == []  # not written yet: the runner still owes #3's row
    assert retrier.retry_parked() == []

    runner_listener.opened.set()
    thread.join(30)
    assert rows(app) == {"A": (11, 2), "B": (5, 2)}  # the batch's rows, none over newer ones
    assert states(retrier) == [(4, "A", "failed")]
    assert retrier.retry_parked() == [4]
    assert rows(app) == {"A": (111, 3), "B": (5, 2)} == replayed(app)


def parked_stream(app: incident.CommandHandler) -> None:
    """Stream A opened (#1), #2 failed, #3 and #4 held behind it."""
    runner = subscribe(app, Gated(broken={2}))
    open_accounts(app, "A")
    deposits(app, ("A", 1), ("A", 10), ("A", 100))
    runner.catch_up()
    assert states(runner) == [(2, "A", "failed"), (3, "A", "held"), (4, "A", "held")]


def retry_inside_3(app: incident.CommandHandler) -> tuple[Gated, threading.Thread, list[Any]]:
    """Stream A parked (see ``parked_stream``) and, elsewhere, a retry up to #3 that has
    taken #2 off the dead letters and stopped inside #3's listener, at its gate."""
    parked_stream(app)
    listener = Gated(gated={3})
    retrier = other(app, listener)
    thread, done = in_thread(lambda: retrier.retry_parked(3))
    assert listener.reached.wait(30)
    return listener, thread, done


def test_two_retries_of_one_stream_take_turns(app: incident.CommandHandler) -> None:
    """A retry up to #3 stops inside #3's listener; a second retry started elsewhere
    meanwhile waits for the first to end instead of handling #3 and #4 itself (after
    which the first would write #3's row over #4's)."""
    first_listener, first_thread, first_done = retry_inside_3(app)

    second = other(app, Plain())
    second_thread, second_done = in_thread(second.retry_parked)
    second_thread.join(1.0)  # it would be done by now, had it not waited its turn
    first_listener.opened.set()
    first_thread.join(30)
    second_thread.join(30)

    assert (first_done, second_done) == ([[2, 3]], [[4]])
    assert rows(app) == {"A": (111, 4)} == replayed(app)


def test_the_runner_leaves_a_stream_a_retry_is_working_on(
    app: incident.CommandHandler,
) -> None:
    """While a retry elsewhere is inside #3 (it took #2 off the dead letters, so held #3
    now leads its stream), the runner's step does not heal the stream itself; it heals
    what the retry left once the retry is done."""
    retry_listener, thread, done = retry_inside_3(app)

    runner = other(app, Plain())
    assert runner.step() == 0  # nothing new; the stream is the retry's
    assert states(runner) == [(3, "A", "held"), (4, "A", "held")]
    retry_listener.opened.set()
    thread.join(30)
    assert done == [[2, 3]]
    assert rows(app) == {"A": (11, 3)}

    runner.step()  # #4, held with nothing failed ahead, is healed now
    assert runner.parked() == []
    assert rows(app) == {"A": (111, 4)} == replayed(app)


def test_a_runner_that_loses_the_checkpoint_leaves_no_dead_letters(
    app: incident.CommandHandler,
) -> None:
    """Runner one (an old build) fails on #2 while runner two, elsewhere, handles the
    whole log and moves the checkpoint. The first runner's batch then ends in
    CheckpointConflict, and its dead letters go with it (they are written with the
    checkpoint): no stale entry holds stream A behind an event that was handled."""
    old = Gated(broken={2}, gated={2})
    old_build = subscribe(app, old, batch_size=2)  # its batch: #1 and #2
    new_build = other(app, Plain())
    open_accounts(app, "A")
    deposits(app, ("A", 10), ("A", 100))  # 2, 3
    thread, outcome = in_thread(old_build.step)
    assert old.reached.wait(30)  # in #2's listener, its batch open
    assert new_build.catch_up() == 3
    old.opened.set()
    thread.join(30)
    assert [type(error) for error in outcome] == [incident.CheckpointConflict]

    assert new_build.parked() == []
    deposits(app, ("A", 1000))  # 4
    new_build.catch_up()
    assert new_build.parked() == []
    assert rows(app) == {"A": (1110, 4)} == replayed(app)
