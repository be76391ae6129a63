"""Parking holds the stream: a parked event keeps its stream's later events behind it, so
retrying and skipping never move a read model backwards; and one Subscription is safe to
use from several threads at once. On every store backend."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import STORE_BACKENDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import incident
from incident.examples import bank
from incident.examples.bank import (
    AccountOpened,
    AccountState,
    DepositMoney,
    MoneyDeposited,
    OpenAccount,
    WithdrawMoney,
)
from incident.stores.memory import MemoryCheckpointStore


class Balance(incident.Projection):
    """A read model with no ``version`` field: the store cannot tell an older row from a
    newer one, so only the order in which rows are written keeps it right."""

    aggregate_id: str
    balance: int
    at: int  # the stream version the row was made from (not named version: no guard)


class Listener:
    """A handler of openings and deposits (not withdrawals) that can be told to fail, by
    position or by stream, and records which positions it was called for."""

    def __init__(self, name: str = "balances") -> None:
        self.broken_positions: set[int] = set()
        self.broken_streams: set[str] = set()
        self.calls: list[int] = []
        self.handler = incident.EventHandler(name)

        @self.handler.listen(AccountOpened, MoneyDeposited)
        def balance(recorded: incident.Recorded[Any], state: AccountState) -> Balance:
            self.calls.append(recorded.position)
            if (
                recorded.position in self.broken_positions
                or recorded.aggregate_id in self.broken_streams
            ):
                raise RuntimeError(f"cannot handle #{recorded.position}")
            return Balance(
                aggregate_id=recorded.aggregate_id, balance=state.balance, at=recorded.version
            )


def new_app(url: str | incident.EventStore) -> incident.CommandHandler:
    return incident.CommandHandler(url, aggregates=[bank.bank_account, bank.transfer])


def subscribe(app: incident.CommandHandler, listener: Listener, **options: Any) -> Any:
    options = {"retries": 0, "backoff": 0.0, **options}
    return incident.Subscription(listener.handler, app, **options)


def rows(app: incident.CommandHandler) -> dict[str, tuple[int, int]]:
    return {r.aggregate_id: (r.balance, r.at) for r in app.projection_store.all(Balance)}


def replayed(app: incident.CommandHandler) -> dict[str, tuple[int, int]]:
    """The read model a full replay of the log gives, built aside (its own projection and
    checkpoint stores) by a listener that never fails."""
    aside = incident.CommandHandler(
        app.event_store,
        incident.open_projection_store("memory://"),
        aggregates=[bank.bank_account, bank.transfer],
    )
    subscription = incident.Subscription(
        Listener().handler, aside, checkpoints=MemoryCheckpointStore()
    )
    subscription.replay()
    return rows(aside)


def states(subscription: incident.Subscription) -> list[tuple[int, str, str]]:
    """The dead letters as (position, stream, "failed" or "held")."""
    return [
        (p.position, p.aggregate_id, "held" if p.held else "failed") for p in subscription.parked()
    ]


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    app = new_app(store_url)
    yield app
    app.event_store.close()


def deposits(app: incident.CommandHandler, *moves: tuple[str, int]) -> None:
    for number, amount in moves:
        app.dispatch(DepositMoney(aggregate_id=number, amount=amount))


def open_accounts(app: incident.CommandHandler, *numbers: str) -> None:
    for number in numbers:
        app.dispatch(OpenAccount(aggregate_id=number))


def held_behind_a_failure(app: incident.CommandHandler) -> tuple[Listener, Any]:
    """A caught-up subscription of stream A: opened (#1), a deposit of 11 whose
    listener failed (#2, parked) and one of 100 held behind it (#3)."""
    listener = Listener()
    subscription = subscribe(app, listener)
    open_accounts(app, "A")
    listener.broken_positions = {2}
    deposits(app, ("A", 11), ("A", 100))
    subscription.catch_up()
    return listener, subscription


def test_retrying_a_parked_event_never_moves_a_read_model_backwards(
    app: incident.CommandHandler,
) -> None:
    """A failed event's later events of the same stream wait behind it, so retrying it
    writes the rows in log order and the unversioned row ends at the newest state."""
    listener = Listener()
    subscription = subscribe(app, listener)
    open_accounts(app, "A", "B")  # 1, 2
    listener.broken_positions = {3}
    deposits(app, ("A", 11), ("A", 100), ("B", 5))  # 3, 4, 5
    subscription.catch_up()

    assert states(subscription) == [(3, "A", "failed"), (4, "A", "held")]
    assert rows(app) == {"A": (0, 1), "B": (5, 2)}  # A waits at its opening
    listener.broken_positions.clear()
    assert subscription.retry_parked() == [3, 4]
    assert rows(app) == {"A": (111, 3), "B": (5, 2)} == replayed(app)
    assert subscription.parked() == []


def test_held_events_are_parked_in_order_and_their_listeners_not_called(
    app: incident.CommandHandler,
) -> None:
    """Behind a failed event its stream's later handled events are parked as held
    (attempts 0, naming the failure); other streams and unhandled events go on."""
    listener = Listener()
    subscription = subscribe(app, listener)
    open_accounts(app, "A", "B")  # 1, 2
    listener.broken_positions = {3}
    deposits(app, ("A", 1))  # 3
    app.dispatch(WithdrawMoney(aggregate_id="A", amount=1))  # 4: not listened to
    deposits(app, ("A", 2), ("B", 3), ("A", 4))  # 5, 6, 7
    subscription.catch_up()

    assert states(subscription) == [(3, "A", "failed"), (5, "A", "held"), (7, "A", "held")]
    failed, *held = subscription.parked()
    assert (failed.attempts, failed.error) == (1, "RuntimeError: cannot handle #3")
    for entry in held:
        assert entry.attempts == 0
        assert entry.error == "held behind #3 (RuntimeError: cannot handle #3)"
    assert listener.calls == [1, 2, 3, 6]  # nothing held was handled
    assert subscription.position == 7
    assert rows(app) == {"A": (0, 1), "B": (3, 2)}


def test_a_retry_that_fails_again_keeps_the_rest_of_the_stream_held(
    app: incident.CommandHandler,
) -> None:
    """A retried event that fails again stays parked (one more attempt, its new error)
    and the events behind it are not tried; a held one that fails becomes the failure
    the rest are held behind."""
    listener = Listener()
    subscription = subscribe(app, listener)
    open_accounts(app, "A", "B")  # 1, 2
    listener.broken_positions = {3}
    deposits(app, ("A", 1), ("A", 2), ("B", 3), ("A", 4))  # 3, 4, 5, 6
    subscription.catch_up()
    listener.calls.clear()

    assert subscription.retry_parked() == []
    assert listener.calls == [3]
    [head, *_] = subscription.parked()
    assert (head.position, head.attempts) == (3, 2)

    listener.broken_positions = {4}
    assert subscription.retry_parked() == [3]
    assert states(subscription) == [(4, "A", "failed"), (6, "A", "held")]
    failed, held = subscription.parked()
    assert (failed.attempts, failed.error) == (1, "RuntimeError: cannot handle #4")
    assert held.error == "held behind #4 (RuntimeError: cannot handle #4)"
    assert rows(app)["A"] == (1, 2)

    listener.broken_positions.clear()
    assert subscription.retry_parked() == [4, 6]
    assert rows(app) == replayed(app)


def test_retrying_one_position_first_retries_the_earlier_ones_of_its_stream(
    app: incident.CommandHandler,
) -> None:
    """retry_parked(position) handles its stream's parked events up to it, in order, and
    leaves the later ones and other streams parked."""
    listener = Listener()
    subscription = subscribe(app, listener)
    open_accounts(app, "A", "B")  # 1, 2
    listener.broken_positions = {3, 5}
    deposits(app, ("A", 1), ("A", 2), ("B", 3), ("A", 4))  # 3, 4, 5, 6
    subscription.catch_up()
    assert states(subscription) == [
        (3, "A", "failed"),
        (4, "A", "held"),
        (5, "B", "failed"),
        (6, "A", "held"),
    ]
    listener.broken_positions.clear()
    listener.calls.clear()

    assert subscription.retry_parked(4) == [3, 4]
    assert listener.calls == [3, 4]
    assert states(subscription) == [(5, "B", "failed"), (6, "A", "held")]
    assert rows(app)["A"] == (3, 3)
    assert subscription.retry_parked() == [5, 6]
    assert rows(app) == replayed(app)


def test_skipping_a_parked_event_lets_the_ones_behind_it_be_retried(
    app: incident.CommandHandler, caplog: pytest.LogCaptureFixture
) -> None:
    """skip_parked drops one dead letter without handling it (and says so in the log);
    the events held behind it are then retried."""
    listener, subscription = held_behind_a_failure(app)
    listener.calls.clear()

    with caplog.at_level(logging.WARNING, logger="incident.subscriptions"):
        subscription.skip_parked(2)
    assert "skipped #2" in caplog.text
    assert listener.calls == []  # not handled
    assert states(subscription) == [(3, "A", "held")]
    assert subscription.retry_parked() == [3]
    # the row is made from the state, which includes the skipped deposit
    assert rows(app) == {"A": (111, 3)} == replayed(app)


def test_skipping_refuses_a_position_that_is_not_parked(app: incident.CommandHandler) -> None:
    """skip_parked of a position with no dead letter raises IncidentError and drops nothing."""
    listener = Listener()
    subscription = subscribe(app, listener)
    open_accounts(app, "A")
    listener.broken_positions = {2}
    deposits(app, ("A", 1))
    subscription.catch_up()
    with pytest.raises(incident.IncidentError, match="#1 is not parked"):
        subscription.skip_parked(1)
    assert states(subscription) == [(2, "A", "failed")]


def test_a_held_stream_with_nothing_failed_ahead_is_retried_at_the_next_step(
    app: incident.CommandHandler,
) -> None:
    """If the failure a stream was held behind is gone (another process retried or
    dropped it while this one parked), the runner retries the held events itself."""
    listener, subscription = held_behind_a_failure(app)
    listener.broken_positions.clear()
    # the race's outcome: #2 left the dead letters, #3 is still held behind it
    other = subscribe(new_app(app.event_store), Listener())
    assert other.retry_parked(2) == [2]
    assert states(subscription) == [(3, "A", "held")]

    assert subscription.catch_up() == 0  # nothing new in the log, but a step ran
    assert subscription.parked() == []
    assert rows(app) == {"A": (111, 3)} == replayed(app)


class CountingCheckpoints:
    """A checkpoint store that counts how often the dead letters are listed."""

    def __init__(self, inner: incident.CheckpointStore) -> None:
        self.inner = inner
        self.listings = 0

    def parked(self, handler: str | None = None) -> list[incident.Parked]:
        self.listings += 1
        return self.inner.parked(handler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_dead_letters_are_listed_once_per_batch(app: incident.CommandHandler) -> None:
    """A step reads the handler's parked events once, however many events of a parked
    stream its batch holds."""
    listener = Listener()
    checkpoints = CountingCheckpoints(incident.stores.checkpoint_store_for(app.event_store))
    subscription = subscribe(app, listener, checkpoints=checkpoints, batch_size=100)
    open_accounts(app, "A", "B")
    listener.broken_positions = {3}
    deposits(app, *[("A", 1), ("B", 1)] * 10)
    assert subscription.step() == 22
    assert checkpoints.listings == 1
    assert len(subscription.parked()) == 10  # one failed, nine held


# -- the property: any sequence of parking, retrying and skipping ends at a replay ---------

STREAMS = ["A", "B", "C"]
streams = st.sampled_from(STREAMS)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("deposit"), streams, st.integers(1, 50)),
        st.tuples(st.just("withdraw"), streams),
        st.tuples(st.just("break"), streams),
        st.tuples(st.just("fix"), streams),
        st.tuples(st.just("catch_up")),
        st.tuples(st.just("retry")),
        st.tuples(st.just("retry_one"), st.integers(0, 20)),
        st.tuples(st.just("skip"), st.integers(0, 20)),
    ),
    max_size=30,
)


@dataclass
class Scenario:
    app: incident.CommandHandler
    listener: Listener = field(default_factory=Listener)
    balances: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STREAMS, 0))
    seen: dict[str, int] = field(default_factory=dict)  # the newest row version per stream

    def __post_init__(self) -> None:
        self.subscription = subscribe(self.app, self.listener)

    def do(self, operation: tuple[Any, ...]) -> None:
        kind, *args = operation
        parked = [p.position for p in self.subscription.parked()]
        if kind == "deposit":
            self.app.dispatch(DepositMoney(aggregate_id=args[0], amount=args[1]))
            self.balances[args[0]] += args[1]
        elif kind == "withdraw" and self.balances[args[0]] > 0:
            self.app.dispatch(WithdrawMoney(aggregate_id=args[0], amount=1))
            self.balances[args[0]] -= 1
        elif kind == "break":
            self.listener.broken_streams.add(args[0])
        elif kind == "fix":
            self.listener.broken_streams.discard(args[0])
        elif kind == "catch_up":
            self.subscription.catch_up()
        elif kind == "retry":
            self.subscription.retry_parked()
        elif kind == "retry_one" and parked:
            self.subscription.retry_parked(parked[args[0] % len(parked)])
        elif kind == "skip" and parked:
            self.subscription.skip_parked(parked[args[0] % len(parked)])
        self.check_never_backwards()

    def check_never_backwards(self) -> None:
        for number, (_, at) in rows(self.app).items():
            assert at >= self.seen.get(number, 0), f"{number} went back to version {at}"
            self.seen[number] = at


def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database on the current test's backend (one per hypothesis example)."""
    backend = request.node.callspec.params["store_url"]
    place = tmp_path / uuid.uuid4().hex
    place.mkdir()
    return STORE_BACKENDS[backend](place, request)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=operations)
def test_any_parking_retrying_and_skipping_ends_at_what_a_replay_gives(
    store_url: str, request: pytest.FixtureRequest, tmp_path: Path, operations: list[Any]
) -> None:
    """Under any sequence of failures, appends, catch-ups, retries and skips no row moves
    backwards, and once the listener works again the read model equals a full replay."""
    app = new_app(fresh_url(request, tmp_path))
    try:
        scenario = Scenario(app)
        open_accounts(app, *STREAMS)
        for operation in operations:
            scenario.do(operation)
        # the bug is fixed; every stream gets one more event (the row of a stream whose
        # last event was skipped is made again, from the state that includes it)
        scenario.listener.broken_streams.clear()
        for number in STREAMS:
            scenario.do(("deposit", number, 1))
        scenario.do(("catch_up",))
        scenario.do(("retry",))
        assert scenario.subscription.parked() == []
        assert rows(app) == replayed(app)
    finally:
        app.event_store.close()


# -- one subscription, several threads ---------------------------------------------------


def test_one_subscription_can_be_run_and_caught_up_from_several_threads(
    app: incident.CommandHandler, caplog: pytest.LogCaptureFixture
) -> None:
    """run() in one thread while two others call catch_up() during appends: every event is
    handled once, no CheckpointConflict, and the read model equals a replay."""
    listener = Listener()
    subscription = subscribe(app, listener, batch_size=3)
    open_accounts(app, *STREAMS)
    stop, appending = threading.Event(), threading.Event()
    appending.set()
    errors: list[BaseException] = []

    def catch_up() -> None:
        try:
            while appending.is_set():
                subscription.catch_up()
        except BaseException as error:
            errors.append(error)

    runner = threading.Thread(target=subscription.run, args=(stop,))
    catchers = [threading.Thread(target=catch_up) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="incident.subscriptions"):
        runner.start()
        for thread in catchers:
            thread.start()
        for amount in range(1, 61):
            deposits(app, (STREAMS[amount % 3], amount))
            if amount % 10 == 0:
                subscription.catch_up()  # and the main thread too
        appending.clear()
        for thread in catchers:
            thread.join(30)
        subscription.catch_up()
        stop.set()
        runner.join(30)

    assert errors == []
    assert "another runner" not in caplog.text  # no CheckpointConflict in run() either
    head = incident.subscriptions.last_position(app.event_store)
    assert sorted(listener.calls) == listener.calls == list(range(1, head + 1))
    assert rows(app) == replayed(app)
