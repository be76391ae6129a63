"""Subscriptions at their edges: bad arguments, threads that do not stop, timeouts that
must raise, errors of a run that must not outlive it, rows no store could keep, and the
parts (fan-out, state cache, checkpoint stores) where they fail."""

from __future__ import annotations

import importlib
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import RAW_BACKENDS, RawEvent, on_backends, postgres_server

import incident
import incident.ids
from incident.cli import main
from incident.examples import bank
from incident.examples.bank import AccountOpened, AccountState, MoneyDeposited
from incident.stores import checkpoint_store_for
from incident.stores.memory import MemoryCheckpointStore, MemoryProjectionStore
from incident.subscriptions import last_position
from incident.subscriptions.fan_out import FanOut
from incident.subscriptions.states import merge_projections

AGGREGATES = [bank.bank_account, bank.transfer]


class Row(incident.Projection):
    aggregate_id: str
    balance: int
    version: int


def balances(name: str = "balances", fail_on: set[str] | None = None) -> incident.EventHandler:
    """A handler writing each account's balance; it raises for the ids in ``fail_on``."""
    handler = incident.EventHandler(name)

    @handler.listen(AccountOpened, MoneyDeposited)
    def row(recorded: incident.Recorded[Any], state: AccountState) -> Row:
        if fail_on is not None and recorded.aggregate_id in fail_on:
            raise RuntimeError(f"cannot handle {recorded.aggregate_id}")
        return Row(
            aggregate_id=recorded.aggregate_id, balance=state.balance, version=recorded.version
        )

    return handler


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    application = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    yield application
    application.event_store.close()


def open_accounts(app: incident.CommandHandler, *numbers: str) -> None:
    for number in numbers:
        app.dispatch(bank.OpenAccount(aggregate_id=number))


def rows(app: incident.CommandHandler) -> dict[str, int]:
    return {row.aggregate_id: row.balance for row in app.projection_store.all(Row)}


# -- arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"batch_size": 0},
        {"batch_size": 2.5},
        {"retries": -1},
        {"backoff": -0.1},
        {"backoff": float("nan")},
        {"on_failure": "ignore"},
        {"concurrency": 0},
    ],
)
def test_a_subscription_refuses_bad_arguments_as_invalid_argument(
    app: incident.CommandHandler, options: dict[str, Any]
) -> None:
    """Bad options are refused when the subscription is made, as InvalidArgument (an
    IncidentError and a ValueError), before anything is read or written: a negative
    backoff would otherwise raise from a retry's sleep in the middle of a batch."""
    open_accounts(app, "A")
    with pytest.raises(incident.InvalidArgument) as refused:
        incident.Subscription(balances(), app, **options)
    assert isinstance(refused.value, ValueError)
    assert checkpoint_store_for(app.event_store).checkpoints() == {}
    assert rows(app) == {}


def test_two_subscriptions_may_not_share_a_name(app: incident.CommandHandler) -> None:
    with pytest.raises(incident.RegistrationError, match="Two subscriptions are named 'balances'"):
        incident.Subscriptions(
            [incident.Subscription(balances(), app), incident.Subscription(balances(), app)]
        )


# -- Subscriptions: start, stop, wait ----------------------------------------------------


def runner_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"incident-subscription-{name}"]


def test_start_twice_runs_one_thread_per_subscription(app: incident.CommandHandler) -> None:
    """A second start() while they run starts nothing more: one runner per subscription."""
    subscriptions = incident.Subscriptions([incident.Subscription(balances(), app, idle=0.01)])
    with subscriptions:
        subscriptions.start()
        assert len(runner_threads("balances")) == 1
        open_accounts(app, "A")
        subscriptions.wait_until_caught_up()
    assert runner_threads("balances") == []
    assert rows(app) == {"A": 0}


def test_waiting_for_a_position_returns_once_it_is_processed(app: incident.CommandHandler) -> None:
    """wait_until_caught_up(position) waits for that position, not for the end of the log;
    one not reached in time raises TimeoutError."""
    open_accounts(app, "A", "B")
    subscription = incident.Subscription(balances(), app, batch_size=1)
    subscriptions = incident.Subscriptions([subscription])
    subscription.step()
    subscriptions.wait_until_caught_up(1, timeout=0)  # the log goes on to 2
    with pytest.raises(TimeoutError, match="balances is at 1, not 2"):
        subscriptions.wait_until_caught_up(2, timeout=0.01)
    subscriptions.catch_up()
    subscriptions.wait_until_caught_up(2, timeout=0)


def test_waiting_times_out_when_the_log_keeps_moving(app: incident.CommandHandler) -> None:
    """Waiting for the end of the log waits again while the subscriptions' commands add
    to it, but only until the timeout: a log that keeps moving raises TimeoutError
    instead of keeping the caller waiting past it (or returning as if caught up)."""
    subscription = incident.Subscription(balances(), app)
    subscription.checkpoints.save("balances", 10**9, expected=0)  # far ahead of any end
    ends = itertools.count(1)
    # the end of the log, moving on at every look (for a while: a wait that ignores its
    # timeout ends too, and fails below instead of hanging)
    app.event_store.last_position = lambda: min(next(ends), 100_000)  # type: ignore[method-assign]
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            incident.Subscriptions([subscription]).wait_until_caught_up(timeout=0.05)
        except BaseException as error:
            outcome.append(error)
        else:
            outcome.append(None)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout=8)
    assert outcome and isinstance(outcome[0], TimeoutError)
    assert "the log moved on" in str(outcome[0])


def test_stop_that_times_out_raises_and_start_waits_for_the_threads_to_end(
    app: incident.CommandHandler,
) -> None:
    """stop() with a listener still running after ``timeout`` raises TimeoutError naming
    its thread instead of returning as if stopped; start() is refused until that thread
    ends (two runners of one object would share its lock), and the batch it was in is
    committed."""
    entered, release = threading.Event(), threading.Event()
    handler = incident.EventHandler("slow")

    @handler.listen(AccountOpened)
    def row(recorded: incident.Recorded[Any], state: AccountState) -> Row:
        entered.set()
        release.wait(timeout=8)
        return Row(aggregate_id=recorded.aggregate_id, balance=state.balance, version=1)

    subscriptions = incident.Subscriptions([incident.Subscription(handler, app, idle=0.01)])
    subscriptions.start()
    try:
        open_accounts(app, "A")
        assert entered.wait(timeout=8)
        with pytest.raises(TimeoutError, match="incident-subscription-slow still running"):
            subscriptions.stop(timeout=0.01)
        with pytest.raises(incident.IncidentError, match="still stopping"):
            subscriptions.start()
        assert len(runner_threads("slow")) == 1  # no second runner was started
    finally:
        release.set()
    for thread in runner_threads("slow"):
        thread.join(timeout=8)  # it ends on its own, after its batch: start() may go on
    assert subscriptions["slow"].position == 1
    subscriptions.start()
    subscriptions.stop()
    assert runner_threads("slow") == []
    assert rows(app) == {"A": 0}
    assert subscriptions["slow"].position == 1
    with subscriptions:  # startable again once stopped
        subscriptions.wait_until_caught_up()


def test_a_failed_run_is_reported_and_a_restart_forgets_it(app: incident.CommandHandler) -> None:
    """A runner that stops on an error records it and wait_until_caught_up raises it;
    restarted (stop, fix, start), the new run is not blamed for the old run's error."""
    broken = {"B"}
    subscription = incident.Subscription(
        balances(fail_on=broken), app, on_failure="stop", backoff=0, idle=0.01
    )
    subscriptions = incident.Subscriptions([subscription])
    open_accounts(app, "A", "B", "C")
    subscriptions.start()
    with pytest.raises(incident.SubscriptionFailed, match="position 2"):
        subscriptions.wait_until_caught_up(timeout=8)
    subscriptions.stop()
    assert isinstance(subscription.error, incident.SubscriptionFailed)
    assert subscription.position == 1 and rows(app) == {"A": 0}
    broken.clear()
    with subscriptions:
        subscriptions.wait_until_caught_up(timeout=8)
        assert subscription.error is None
    assert rows(app) == {"A": 0, "B": 0, "C": 0}


def test_subscriptions_list_the_parked_events_of_every_handler(
    app: incident.CommandHandler,
) -> None:
    first = incident.Subscription(balances("first", fail_on={"A"}), app, backoff=0)
    second = incident.Subscription(balances("second", fail_on={"B"}), app, backoff=0)
    subscriptions = incident.Subscriptions([first, second])
    open_accounts(app, "A", "B")
    assert subscriptions.catch_up() == 4
    assert sorted((p.handler, p.position) for p in subscriptions.parked()) == [
        ("first", 1),
        ("second", 2),
    ]


def test_the_last_position_of_a_store_that_does_not_know_it_is_read(
    app: incident.CommandHandler,
) -> None:
    """last_position() of an event store without last_position() reads the log to its
    end (from ``after``): 0 for an empty log."""

    class Plain:  # only read_all
        def __init__(self, store: incident.EventStore) -> None:
            self.read_all = store.read_all

    plain: Any = Plain(app.event_store)
    assert last_position(plain) == 0
    open_accounts(app, "A", "B", "C")
    assert last_position(plain) == 3
    assert last_position(plain, after=2) == 3
    assert last_position(plain, after=3) == 3


# -- what a listener returns ---------------------------------------------------------------


class Measured(incident.Projection):
    aggregate_id: str
    ratio: float


@pytest.mark.parametrize(
    "unstorable",
    [
        Measured(aggregate_id="B", ratio=float("nan")),
        Measured(aggregate_id="B\x00", ratio=1.0),
        Measured(aggregate_id="", ratio=1.0),
    ],
    ids=["nan", "nul-in-key", "empty-key"],
)
def test_a_row_no_store_can_keep_parks_its_event_and_the_rest_go_on(
    app: incident.CommandHandler, unstorable: Measured
) -> None:
    """A listener that returns a read model no store could keep (Unstorable, or a key
    that is no key) fails its event, which is retried and parked like any listener
    error; the other events are handled and the checkpoint moves past them. (It used to
    fail the batch's commit instead: the checkpoint never moved, and run() stopped.)"""
    handler = incident.EventHandler("measures")

    @handler.listen(AccountOpened)
    def measure(recorded: incident.Recorded[Any], state: AccountState) -> Measured:
        if recorded.aggregate_id == "B":
            return unstorable
        return Measured(aggregate_id=recorded.aggregate_id, ratio=1.0)

    open_accounts(app, "A", "B", "C")
    subscription = incident.Subscription(handler, app, backoff=0, retries=1)
    assert subscription.catch_up() == 3
    assert subscription.position == 3
    [parked] = subscription.parked()
    assert (parked.position, parked.aggregate_id, parked.attempts) == (2, "B", 2)
    assert "IncidentError" in parked.error or "Unstorable" in parked.error
    assert sorted(row.aggregate_id for row in app.projection_store.all(Measured)) == ["A", "C"]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_row_refused_at_the_batch_commit_is_handled_again_without_sending_twice(
    app: incident.CommandHandler, concurrency: int
) -> None:
    """Rows are checked once, when the batch commits; one refused there sends the batch
    round again with each event's rows checked as they come. The command an earlier
    event of the batch sent (and committed, with its checkpoint) is not sent again, and
    only the event whose row no store keeps is parked."""
    handler = incident.EventHandler("measures")

    @handler.listen(AccountOpened)
    def measure(recorded: incident.Recorded[Any], state: AccountState) -> Any:
        ratio = float("nan") if recorded.aggregate_id == "B" else 1.0
        row = Measured(aggregate_id=recorded.aggregate_id, ratio=ratio)
        if recorded.aggregate_id == "A":
            return [row, bank.DepositMoney(aggregate_id="A", amount=5)]
        return row

    open_accounts(app, "A", "B", "C")
    subscription = incident.Subscription(
        handler, app, backoff=0, retries=1, concurrency=concurrency
    )
    subscription.catch_up()
    [parked] = subscription.parked()
    assert (parked.position, parked.aggregate_id) == (2, "B")
    assert sorted(row.aggregate_id for row in app.projection_store.all(Measured)) == ["A", "C"]
    app.cache.clear()
    assert app.state("bank_account", "A").balance == 5  # deposited once
    deposits = [r for r in app.event_store.read_all() if r.event_type == "MoneyDeposited"]
    assert len(deposits) == 1


# -- the state cache ---------------------------------------------------------------------------


def test_states_are_right_when_the_cache_keeps_one_aggregate(app: incident.CommandHandler) -> None:
    """With ``cache_size`` 1, two streams in turn evict each other's state at every
    event; each listener still gets the state right after its event (folded again)."""
    seen: list[tuple[str, int]] = []
    handler = incident.EventHandler("seen")

    @handler.listen(MoneyDeposited)
    def deposited(recorded: incident.Recorded[Any], state: AccountState) -> None:
        seen.append((recorded.aggregate_id, state.balance))

    open_accounts(app, "A", "B")
    for amount in (1, 2, 4):
        for number in "AB":
            app.dispatch(bank.DepositMoney(aggregate_id=number, amount=amount))
    subscription = incident.Subscription(handler, app, cache_size=10)
    subscription.cache_size = 1
    assert subscription.cache_size == 1
    subscription.catch_up()
    assert seen == [("A", 1), ("B", 1), ("A", 3), ("B", 3), ("A", 7), ("B", 7)]


def test_events_of_an_aggregate_the_subscription_does_not_know_are_stepped_over(
    app: incident.CommandHandler,
) -> None:
    """A subscription whose application knows fewer aggregates than wrote the log steps
    over the events of the others it does not listen to (no state to keep for them)."""
    open_accounts(app, "A")
    app.dispatch(
        bank.RequestTransfer(
            aggregate_id="T",
            source_account_number="A",
            destination_account_number="B",
            amount=1,
        )
    )
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5))
    accounts_only = incident.CommandHandler(app.event_store, aggregates=[bank.bank_account])
    subscription = incident.Subscription(balances(), accounts_only)
    subscription.catch_up()
    assert subscription.position == last_position(app.event_store)
    assert rows(app) == {"A": 5}


def test_merging_a_batchs_projections_never_moves_a_row_backwards() -> None:
    """Of two rows with one key in a batch, the later in log order wins unless it is
    older by version, as the stores would keep it."""
    pending: dict[Any, incident.Projection] = {}
    merge_projections(pending, [Row(aggregate_id="A", balance=5, version=2)])
    merge_projections(pending, [Row(aggregate_id="A", balance=1, version=1)])
    assert pending[Row, "A"] == Row(aggregate_id="A", balance=5, version=2)
    merge_projections(pending, [Row(aggregate_id="A", balance=7, version=2)])
    assert pending[Row, "A"] == Row(aggregate_id="A", balance=7, version=2)

    class Loose(incident.Projection):  # a version that is not an int: the stores' rule
        aggregate_id: str
        version: int | None = None

    merge_projections(pending, [Loose(aggregate_id="A", version=3)])
    merge_projections(pending, [Loose(aggregate_id="A")])
    assert pending[Loose, "A"] == Loose(aggregate_id="A")


# -- fan-out ---------------------------------------------------------------------------------


def test_fan_out_on_one_thread_stops_at_an_error_that_halts() -> None:
    """Run in the calling thread, units after a halting error are not started; an error
    that does not halt lets the next units run. Errors come back by index."""
    done: list[int] = []

    def work(unit: int) -> None:
        if unit in (1, 3):
            raise KeyError(unit) if unit == 1 else RuntimeError(unit)
        done.append(unit)

    fan_out = FanOut(1, "edges")
    errors = fan_out.run([0, 1, 2, 3, 4], work, halts=lambda e: isinstance(e, RuntimeError))
    assert done == [0, 2]
    assert sorted(errors) == [1, 3]
    assert isinstance(errors[1], KeyError) and isinstance(errors[3], RuntimeError)


def test_closing_a_fan_out_ends_its_threads() -> None:
    fan_out = FanOut(2, "edges-close")
    assert fan_out.run([0, 1, 2], lambda unit: None) == {}
    assert any(t.name.startswith("incident-edges-close") for t in threading.enumerate())
    fan_out.close()
    assert not any(t.name.startswith("incident-edges-close") for t in threading.enumerate())
    assert fan_out.run([0, 1], lambda unit: None) == {}  # new threads for the next wave
    fan_out.close()


# -- checkpoint stores -----------------------------------------------------------------------


def test_memory_checkpoints_write_rows_to_a_projection_store_elsewhere(
    app: incident.CommandHandler,
) -> None:
    """Checkpoints in memory with the rows in another store: the rows are written there
    with every checkpoint, and a restart from the memory checkpoint writes nothing older."""
    checkpoints = MemoryCheckpointStore()
    open_accounts(app, "A")
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=3))
    subscription = incident.Subscription(balances(), app, checkpoints=checkpoints)
    subscription.catch_up()
    assert checkpoints.load("balances") == 2
    assert rows(app) == {"A": 3}
    assert checkpoint_store_for(app.event_store).checkpoints() == {}


# -- running ---------------------------------------------------------------------------------


class ReleaseFails(MemoryCheckpointStore):
    """Checkpoints whose handler lock fails as it is given up (a dropped connection)."""

    def lock(self, handler: str) -> Any:
        inner = super().lock(handler)

        class Lock:
            acquire, held = inner.acquire, inner.held

            def release(self) -> None:
                inner.release()
                raise incident.StoreError("the session went away while releasing")

        return Lock()


def test_a_run_whose_lock_fails_to_release_still_ends_its_workers() -> None:
    """run() ends by giving up the lock and letting the wave's worker threads go; a
    release that fails (StoreError, raised) still lets them go: no thread left behind."""
    app = incident.CommandHandler("memory://", aggregates=AGGREGATES)
    open_accounts(app, "A", "B", "C")
    subscription = incident.Subscription(
        balances("workers"), app, checkpoints=ReleaseFails(), concurrency=2
    )
    subscription.catch_up()  # a wave of three streams: the pool's threads started
    assert any(t.name.startswith("incident-workers_") for t in threading.enumerate())
    stop = threading.Event()
    stop.set()
    with pytest.raises(incident.StoreError, match="while releasing"):
        subscription.run(stop)
    assert not any(t.name.startswith("incident-workers_") for t in threading.enumerate())
    assert rows(app) == {"A": 0, "B": 0, "C": 0}


class Bare:
    """An application whose event store has neither wait_for_append nor last_position,
    as a third-party store may (AppendNotifier is optional): it is polled."""

    def __init__(self, app: incident.CommandHandler) -> None:
        self.app = app
        store = app.event_store

        class Store:
            read_all, events = store.read_all, store.events

        self.event_store: Any = Store()
        self.projection_store = app.projection_store
        self.aggregates = app.aggregates

    def follow_up(self, handler: str, cause: Any, steps: Any) -> None:
        self.app.follow_up(handler, cause, steps)


def test_a_store_that_cannot_notify_is_polled(app: incident.CommandHandler) -> None:
    """Run on threads over a store without wait_for_append, a subscription polls: what
    is appended while it runs is handled, and waiting for the end of the log works from
    the log itself (no last_position to ask)."""
    subscription = incident.Subscription(
        balances(), Bare(app), checkpoints=checkpoint_store_for(app.event_store), idle=0.01
    )
    with incident.Subscriptions([subscription]) as subscriptions:
        open_accounts(app, "A")
        subscriptions.wait_until_caught_up(timeout=8)
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=2))
        subscriptions.wait_until_caught_up(timeout=8)
    assert rows(app) == {"A": 2}
    assert subscription.position == 2


# -- retrying what cannot be read --------------------------------------------------------------


@on_backends(RAW_BACKENDS)
@pytest.mark.parametrize("damage", ["deleted", "other_shape"])
def test_retrying_a_damaged_event_keeps_it_parked_and_retries_the_other_streams(
    store_url: str, edit_raw_event: Any, damage: str
) -> None:
    """A parked event whose row cannot be read fails again when retried, like a listener
    that raises: it stays parked (one more attempt, the CorruptEvent as its error), its
    stream held behind it, and the other streams' parked events are still retried. (It
    used to end the whole retry at the damaged row with a CorruptEvent.)"""
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    open_accounts(app, "A")  # 1
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))  # 2
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=50))  # 3: damaged below
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=1))  # 4
    open_accounts(app, "B")  # 5: a listener bug, fixed before the retry
    app.event_store.close()
    edit_raw_event(3, None if damage == "deleted" else {"data": '{"type": "MoneyWithdrawn"}'})
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    try:
        broken = {"B"}
        subscription = incident.Subscription(balances(fail_on=broken), app, backoff=0)
        subscription.catch_up()
        before = {p.position: p for p in subscription.parked()}
        assert sorted(before) == [3, 4, 5]
        broken.clear()
        assert subscription.retry_parked() == [5]
        after = {p.position: p for p in subscription.parked()}
        assert sorted(after) == [3, 4]
        assert after[3].attempts == before[3].attempts + 1
        assert after[3].error.startswith("CorruptEvent")
        assert (after[3].aggregate_id, after[3].event_id) == (
            before[3].aggregate_id,
            before[3].event_id,
        )
        assert rows(app) == {"A": 100, "B": 0}  # A waits at its last readable event
        assert subscription.catch_up() == 0  # and the runner is not stopped by it
    finally:
        app.event_store.close()


def test_retrying_an_event_the_log_no_longer_has_keeps_it_parked(
    app: incident.CommandHandler,
) -> None:
    """A dead letter naming a position the log does not hold (a log restored from an
    older backup) fails again when retried, with a CorruptEvent saying so; nothing is
    handled in its place, and the stream's other events are not touched."""
    open_accounts(app, "A")
    subscription = incident.Subscription(balances(), app)
    subscription.catch_up()
    ghost = incident.Parked(
        handler="balances",
        position=99,
        event_id="e-99",
        aggregate_id="A",
        event_type="MoneyDeposited",
        error="RuntimeError: a bug",
        attempts=1,
        parked_at=incident.ids.utc_now(),
    )
    subscription.checkpoints.park(ghost)
    assert subscription.retry_parked() == []
    [parked] = subscription.parked()
    assert (parked.position, parked.event_id, parked.attempts) == (99, "e-99", 2)
    assert parked.error.startswith("CorruptEvent: Corrupt event at position 99")
    assert parked.error.endswith("position 99 is missing from the log")
    assert rows(app) == {"A": 0}


class Overtaken(MemoryCheckpointStore):
    """Checkpoints another runner moves to ``by`` just before this one's first save."""

    def __init__(self, by: int) -> None:
        super().__init__()
        self.by, self.overtaken = by, False

    def save(self, handler: str, position: int, *, expected: int, **rest: Any) -> None:
        if not self.overtaken:
            self.overtaken = True
            super().save(handler, self.by, expected=expected)
        super().save(handler, position, expected=expected, **rest)


def test_a_runner_overtaken_by_another_goes_on_from_where_the_other_got() -> None:
    """A running subscription whose save finds the checkpoint moved by someone else
    (CheckpointConflict) writes nothing of its batch, lets the lock go, and carries on
    from the other's checkpoint: the events the other handled are not handled again,
    and it does not stop."""
    app = incident.CommandHandler("memory://", aggregates=AGGREGATES)
    open_accounts(app, "A", "B", "C", "D", "E")
    checkpoints = Overtaken(by=3)
    subscription = incident.Subscription(balances(), app, checkpoints=checkpoints, idle=0.01)
    with incident.Subscriptions([subscription]) as subscriptions:
        subscriptions.wait_until_caught_up(timeout=8)
    assert checkpoints.overtaken and subscription.error is None
    assert subscription.position == 5
    assert rows(app) == {"D": 0, "E": 0}  # 1-3 were the other's to write


class Unreplaceable:
    """A projection store that cannot swap a table (no replace_all)."""

    def __init__(self, store: incident.ProjectionStore) -> None:
        self.get, self.all, self.project = store.get, store.all, store.project


def test_replay_into_a_store_that_cannot_swap_tables_is_refused_untouched(
    app: incident.CommandHandler,
) -> None:
    open_accounts(app, "A")
    reactor = Bare(app)
    reactor.projection_store = Unreplaceable(app.projection_store)  # type: ignore[assignment]
    reactor.event_store = app.event_store
    subscription = incident.Subscription(balances(), reactor)
    subscription.catch_up()
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=4))
    with pytest.raises(incident.IncidentError, match="cannot replace tables"):
        subscription.replay()
    assert subscription.checkpoints.load("balances") == 1
    assert rows(app) == {"A": 0}


def test_replay_while_this_subscription_runs_pauses_the_run(
    app: incident.CommandHandler,
) -> None:
    """replay() of a subscription whose own run() holds the handler's lock (in another
    thread) uses that lock instead of refusing: the run waits for the replay, then goes
    on from the rebuilt checkpoint."""
    open_accounts(app, "A", "B")
    subscription = incident.Subscription(balances(), app, idle=0.01)
    with incident.Subscriptions([subscription]) as subscriptions:
        subscriptions.wait_until_caught_up(timeout=8)
        app.projection_store.project(Row(aggregate_id="Z", balance=9, version=1))  # stray
        replayed = subscription.replay()
        assert (replayed.position, replayed.written) == (2, {"Row": 2})
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=3))
        subscriptions.wait_until_caught_up(timeout=8)
    assert rows(app) == {"A": 3, "B": 0}


def test_a_database_error_during_a_retry_leaves_the_dead_letters_as_they_were(
    app: incident.CommandHandler,
) -> None:
    """A StoreError while retrying is the database, not the event: it is raised, the
    entry keeps its attempts and error, and nothing is written for it."""
    failing: list[BaseException] = [RuntimeError("a bug")]
    handler = incident.EventHandler("balances")

    @handler.listen(AccountOpened)
    def row(recorded: incident.Recorded[Any], state: AccountState) -> Row:
        if failing and recorded.aggregate_id == "A":
            raise failing[0]
        return Row(aggregate_id=recorded.aggregate_id, balance=0, version=recorded.version)

    open_accounts(app, "A", "B")
    subscription = incident.Subscription(handler, app, backoff=0, retries=0)
    subscription.catch_up()
    [before] = subscription.parked()
    failing[0] = incident.StoreError("the database is down")
    with pytest.raises(incident.StoreError, match="the database is down"):
        subscription.retry_parked()
    assert subscription.parked() == [before]
    assert rows(app) == {"B": 0}
    failing.clear()
    assert subscription.retry_parked() == [1]
    assert rows(app) == {"A": 0, "B": 0}


class Unplaceable:
    """An event store whose log raises a CorruptEvent that names no position."""

    def __init__(self, store: incident.EventStore) -> None:
        self.events = store.events

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Any]:
        raise incident.CorruptEvent(None, "", "the log's index is damaged")
        yield  # a generator, as the stores' reads are


def test_damage_a_batch_cannot_place_is_raised_and_moves_nothing(
    app: incident.CommandHandler,
) -> None:
    """A CorruptEvent that names no position cannot be parked or stepped over: step()
    raises it, with the checkpoint and the dead letters untouched."""
    open_accounts(app, "A")
    reactor = Bare(app)
    reactor.event_store = Unplaceable(app.event_store)
    checkpoints = checkpoint_store_for(app.event_store)
    subscription = incident.Subscription(balances(), reactor, checkpoints=checkpoints)
    with pytest.raises(incident.CorruptEvent, match="index is damaged"):
        subscription.step()
    assert checkpoints.load("balances") == 0 and subscription.parked() == []
    assert rows(app) == {}


@on_backends(RAW_BACKENDS)
def test_an_event_of_an_aggregate_the_application_lacks_is_parked_with_why(
    store_url: str, write_raw_event: Any
) -> None:
    """A listened event recorded under an aggregate name the application does not have
    (written by other code, or a renamed aggregate) has no state to give the listener:
    RoutingError, naming the aggregate, parks it; the log goes on."""
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    try:
        open_accounts(app, "A")
        write_raw_event(
            RawEvent(
                position=2,
                aggregate_id="L",
                version=1,
                event_type="AccountOpened",
                data='{"type": "AccountOpened", "account_number": "L"}',
                aggregate="legacy_account",
            )
        )
        open_accounts(app, "B")
        subscription = incident.Subscription(balances(), app, backoff=0, retries=0)
        subscription.catch_up()
        assert subscription.position == 3
        [parked] = subscription.parked()
        assert (parked.position, parked.aggregate_id) == (2, "L")
        assert parked.error.startswith("RoutingError")
        assert "'legacy_account'" in parked.error
        assert rows(app) == {"A": 0, "B": 0}
    finally:
        app.event_store.close()


# -- the shell ------------------------------------------------------------------------------

HANDLERS_MODULE = """
from typing import Any

import incident
from incident.examples.bank import AccountOpened, MoneyDeposited, bank_account, transfer

broken = incident.EventHandler("broken")


@broken.listen(AccountOpened, MoneyDeposited)
def fails_for_b(recorded: Any, state: Any) -> list[Any]:
    if recorded.aggregate_id == "B":
        raise RuntimeError("still broken")
    return []
"""


@pytest.fixture
def handlers_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "edges_cli_handlers.py").write_text(HANDLERS_MODULE)
    (tmp_path / "edges_cli_lonely.py").write_text(
        "import incident\nlonely = incident.EventHandler('lonely')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "edges_cli_handlers"


def test_retry_from_the_shell_lists_what_stays_parked(tmp_path: Path, handlers_module: str) -> None:
    """`incident retry` names each entry still parked afterwards, failed or held."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    app = incident.CommandHandler(url, aggregates=AGGREGATES)
    try:
        open_accounts(app, "A", "B")
        app.dispatch(bank.DepositMoney(aggregate_id="B", amount=1))
        module = importlib.import_module(handlers_module)
        incident.Subscription(module.broken, app, backoff=0, retries=0).catch_up()
        result = CliRunner().invoke(main, ["retry", url, "--handler", f"{handlers_module}:broken"])
        assert result.exit_code == 0, result.output
        assert "0 of 2 parked events handled" in result.output
        assert "still parked (failed): #2 AccountOpened: RuntimeError: still broken" in (
            result.output
        )
        assert "still parked (held): #3 MoneyDeposited: held behind #2" in result.output
    finally:
        app.event_store.close()


def test_replay_from_the_shell_counts_the_commands_it_did_not_send_again(
    tmp_path: Path,
) -> None:
    """Replaying a process manager rebuilds without dispatching again what it had
    dispatched, and says how many commands it left alone."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    app = bank.build(url, subscriptions=True)
    try:
        open_accounts(app, "A", "B")
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
        app.dispatch(
            bank.RequestTransfer(
                aggregate_id="T",
                source_account_number="A",
                destination_account_number="B",
                amount=4,
            )
        )
        app.subscriptions.catch_up()
        head = last_position(app.event_store)
        result = CliRunner().invoke(
            main, ["replay", url, "--handler", "incident.examples.bank:money_transfer"]
        )
        assert result.exit_code == 0, result.output
        assert "commands for events it had already handled were not dispatched" in result.output
        assert last_position(app.event_store) == head  # nothing was sent twice
    finally:
        app.event_store.close()


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        ("edges_cli_handlers:missing", "Cannot load 'edges_cli_handlers:missing'"),
        ("edges_cli_lonely:lonely", "No Aggregate in edges_cli_lonely; name them with"),
    ],
)
def test_the_shell_refuses_a_handler_it_cannot_load_or_give_states(
    tmp_path: Path, handlers_module: str, handler: str, says: str
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    result = CliRunner().invoke(main, ["replay", url, "--handler", handler])
    assert result.exit_code == 1, result.output
    assert says in result.output
    assert not (tmp_path / "cli.db").exists()  # refused before any store was opened


@on_backends(RAW_BACKENDS)
def test_a_damaged_event_read_again_after_a_reset_is_not_parked_twice(
    store_url: str, edit_raw_event: Any
) -> None:
    """Set back to the start (reset) and restarted, a subscription reads its parked damaged event
    again: it stays the one entry it was (same attempts, same error), its stream still
    held, and the rest is handled again without moving any row backwards."""
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    open_accounts(app, "A")
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5))  # 2: damaged below
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=1))  # 3: held behind it
    open_accounts(app, "B")
    app.event_store.close()
    edit_raw_event(2, {"data": '{"type": "MoneyWithdrawn"}'})
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    try:
        subscription = incident.Subscription(balances(), app, backoff=0)
        subscription.catch_up()
        before = subscription.parked()
        assert [(p.position, p.attempts) for p in before] == [(2, 1), (3, 0)]
        subscription.checkpoints.reset("balances", 0)
        subscription = incident.Subscription(balances(), app, backoff=0)  # restarted
        assert subscription.catch_up() == 4
        assert subscription.parked() == before
        assert subscription.position == 4
        assert rows(app) == {"A": 0, "B": 0}
    finally:
        app.event_store.close()


@on_backends(["postgres"])
def test_a_postgres_handler_lock_that_cannot_connect_raises_store_error(store_url: str) -> None:
    """A lock attempt whose connection cannot be opened is a StoreError naming the
    handler (run() waits for the database on it), and holds nothing."""
    from incident.stores.postgres.checkpoints import PostgresHandlerLock

    lock = PostgresHandlerLock("balances", "postgresql://postgres@127.0.0.1:1/test", key=7)
    with pytest.raises(incident.StoreError, match="Postgres failed locking balances"):
        lock.acquire(timeout=0)
    assert not lock.held()
    lock.release()  # nothing to close: a no-op


@on_backends(["memory", "postgres", "sqlite"])
def test_a_conflicting_save_writes_no_rows_into_another_database(
    event_store: incident.EventStore,
) -> None:
    """Checkpoints in one database, rows in another: a save whose checkpoint someone
    else moved (CheckpointConflict) writes none of its rows there either. Rows written
    first would let a runner that lost its checkpoint put older rows over the winner's
    (a read model without a version has nothing else to stop them)."""
    checkpoints = checkpoint_store_for(event_store)
    elsewhere = MemoryProjectionStore()
    checkpoints.save("balances", 5, expected=0)  # the winner's
    stale = Row(aggregate_id="A", balance=1, version=2)
    with pytest.raises(incident.CheckpointConflict):
        checkpoints.save("balances", 3, expected=0, projections=[stale], projection_store=elsewhere)
    assert elsewhere.all(Row) == [] and checkpoints.load("balances") == 5
    checkpoints.save("balances", 6, expected=5, projections=[stale], projection_store=elsewhere)
    assert elsewhere.all(Row) == [stale]


def test_two_first_saves_of_one_postgres_checkpoint_do_not_both_win(
    postgres_url: str, postgres_admin: Any
) -> None:
    """A handler's first checkpoint has no row to lock. A save expecting 0 while another
    first save is still committing (the row inserted, not yet visible) must see the
    other's position once it commits and raise CheckpointConflict, not overwrite it."""
    import psycopg

    schema = postgres_url.rpartition("schema=")[2]
    store = incident.open_event_store(postgres_url)
    checkpoints = checkpoint_store_for(store)
    checkpoints.initialize()
    outcome: list[BaseException | None] = []

    def save() -> None:
        try:
            checkpoints.save("balances", 3, expected=0)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    other = psycopg.connect(postgres_server())  # the other runner, mid-commit
    try:
        other.execute(
            f'INSERT INTO "{schema}".incident_checkpoints (handler, position, updated_at)'
            " VALUES ('balances', 5, now())"
        )
        saver = threading.Thread(target=save, daemon=True)
        saver.start()
        for _ in range(800):  # until the save waits for the other's row (or is done)
            waiting = postgres_admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND pid <> pg_backend_pid() AND query LIKE %s",
                [f'%"{schema}"%incident_checkpoints%'],
            ).fetchone()[0]
            if waiting or outcome:
                break
            threading.Event().wait(0.01)
        other.commit()
        saver.join(timeout=8)
    finally:
        other.close()
    try:
        assert outcome and isinstance(outcome[0], incident.CheckpointConflict), outcome
        assert checkpoints.load("balances") == 5
    finally:
        store.close()


@on_backends(RAW_BACKENDS)
def test_healing_a_stream_up_to_a_damaged_event_does_not_stop_the_runner(
    store_url: str, edit_raw_event: Any
) -> None:
    """A's #2 fails, #3 is held behind it, #4 cannot be read. Once #2 is skipped, the
    runner's next step heals the stream: #3 is handled, #4 stays parked (one more
    attempt), and the step goes on with the log instead of raising the CorruptEvent."""
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    open_accounts(app, "A")  # 1
    for amount in (1, 2, 4):  # 2: fails, 3: held, 4: damaged below
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=amount))
    app.event_store.close()
    edit_raw_event(4, {"data": '{"type": "MoneyWithdrawn"}'})
    app = incident.CommandHandler(store_url, aggregates=AGGREGATES)
    try:
        handler = incident.EventHandler("balances")

        @handler.listen(AccountOpened, MoneyDeposited)
        def row(recorded: incident.Recorded[Any], state: AccountState) -> Row:
            if recorded.position == 2:
                raise RuntimeError("a bug at #2")
            return Row(
                aggregate_id=recorded.aggregate_id, balance=state.balance, version=recorded.version
            )

        subscription = incident.Subscription(handler, app, backoff=0, retries=0)
        subscription.catch_up()
        assert [(p.position, p.attempts) for p in subscription.parked()] == [(2, 1), (3, 0), (4, 1)]
        subscription.skip_parked(2)
        open_accounts(app, "B")  # 5: more log for the next step
        assert subscription.step() == 1
        assert [(p.position, p.attempts) for p in subscription.parked()] == [(4, 2)]
        assert rows(app) == {"A": 3, "B": 0}
    finally:
        app.event_store.close()


def test_catch_up_until_a_position_stops_there(app: incident.CommandHandler) -> None:
    """catch_up(until) processes batches until the checkpoint reaches ``until`` (the
    batch that crosses it is finished), not to the end of the log."""
    open_accounts(app, "A", "B", "C", "D")
    subscription = incident.Subscription(balances(), app, batch_size=2)
    assert subscription.catch_up(until=1) == 2
    assert subscription.position == 2 and rows(app) == {"A": 0, "B": 0}
    assert subscription.catch_up(until=2) == 0
    assert subscription.catch_up() == 2 and subscription.position == 4
