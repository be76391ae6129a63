"""Subscriptions with ``concurrency``: a batch handled as a wave of units side by side,
on every store. Each stream (and each ``sequence_by`` key) keeps its log order, effects
happen once, the checkpoint never passes an event whose unit did not get that far, and
parking holds streams as it does one by one."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest

import incident
from incident.examples import bank
from incident.examples.bank import AccountState, MoneyDeposited
from incident.subscriptions import Subscription, SubscriptionFailed

WAIT = 30  # seconds a barrier waits before the test fails instead of hanging


class Row(incident.Projection):
    aggregate_id: str
    balance: int


class Trace:
    """What the listeners did, in the order they did it: ``("start" | "end", stream,
    version)``, and on which threads."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, int]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def note(self, step: str, recorded: incident.Recorded[Any]) -> None:
        with self._lock:
            self.steps.append((step, recorded.aggregate_id, recorded.version))
            self.threads.add(threading.current_thread().name)

    def assert_in_order(self, group: Callable[[str, int], Hashable]) -> None:
        """Within each group, every event ended before the next began, in log order."""
        by_group: dict[Hashable, list[tuple[str, str, int]]] = defaultdict(list)
        for step, stream, version in self.steps:
            by_group[group(stream, version)].append((step, stream, version))
        for key, steps in by_group.items():
            assert [s[0] for s in steps] == ["start", "end"] * (len(steps) // 2), (key, steps)
            assert steps[::2] == [("start", *s[1:]) for s in steps[1::2]], (key, steps)


def tracing_handler(
    trace: Trace, meet: Callable[[incident.Recorded[Any]], None] = lambda r: None
) -> incident.EventHandler:
    handler = incident.EventHandler("tracer")

    @handler.listen(bank.AccountOpened, MoneyDeposited)
    def balance(recorded: incident.Recorded[Any], state: AccountState) -> Row:
        trace.note("start", recorded)
        meet(recorded)
        trace.note("end", recorded)
        return Row(aggregate_id=recorded.aggregate_id, balance=state.balance)

    return handler


def application(store_url: str, inline: list[incident.EventHandler] | None = None) -> Any:
    return incident.CommandHandler(
        store_url, aggregates=[bank.bank_account, bank.transfer], event_handlers=inline or []
    )


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    handler = application(store_url)
    yield handler
    handler.close()


def open_with_deposits(app: incident.CommandHandler, amounts: dict[str, list[int]]) -> None:
    """Open the accounts, then their deposits interleaved round-robin in the log."""
    for number in amounts:
        app.dispatch(bank.OpenAccount(aggregate_id=number))
    rounds = max(len(a) for a in amounts.values())
    for index in range(rounds):
        for number, deposits in amounts.items():
            if index < len(deposits):
                app.dispatch(bank.DepositMoney(aggregate_id=number, amount=deposits[index]))


def waits_for(
    waiter: tuple[str, int], awaited: tuple[str, int]
) -> Callable[[incident.Recorded[Any]], None]:
    """The listener of ``waiter`` (stream, version) waits until that of ``awaited`` has
    run: only possible if they run at the same time, and meanwhile the other workers
    are free to take (wrongly) the waiter's later events."""
    arrived = threading.Event()

    def meet(recorded: incident.Recorded[Any]) -> None:
        if (recorded.aggregate_id, recorded.version) == awaited:
            arrived.set()
        if (recorded.aggregate_id, recorded.version) == waiter:
            assert arrived.wait(WAIT), f"{waiter} waited for {awaited} in vain"

    return meet


def test_each_stream_keeps_its_order_while_streams_run_side_by_side(
    app: incident.CommandHandler,
) -> None:
    """S0's first event waits for S1's last (so they must run at once, or the
    subscription stops); meanwhile every stream's events are handled one after the
    other in version order, and the rows are a sequential run's."""
    open_with_deposits(app, {"S0": [1, 2, 3, 4], "S1": [5, 6, 7], "S2": [8, 9]})
    trace = Trace()
    handler = tracing_handler(trace, waits_for(("S0", 1), ("S1", 4)))
    subscription = Subscription(handler, app, concurrency=4, on_failure="stop")
    subscription.catch_up()
    trace.assert_in_order(lambda stream, version: stream)
    assert len(trace.threads) > 1
    assert Counter(stream for step, stream, _ in trace.steps if step == "end") == {
        "S0": 5,
        "S1": 4,
        "S2": 3,
    }
    rows = {r.aggregate_id: r.balance for r in app.projection_store.all(Row)}
    assert rows == {"S0": 10, "S1": 18, "S2": 17}
    assert subscription.position == incident.subscriptions.last_position(app.event_store)


def test_sequence_by_keeps_events_with_one_key_in_log_order(
    app: incident.CommandHandler,
) -> None:
    """With ``sequence_by`` (here: the parity of a deposit), deposits of different
    streams that share a key are handled in log order, one at a time; the two keys run
    side by side (the first even deposit waits for the last odd one)."""
    open_with_deposits(app, {"E0": [2, 4, 6], "E1": [8, 10], "O0": [1, 3], "O1": [5, 7, 9]})
    parity = {n: n[0] for n in ("E0", "E1", "O0", "O1")}
    trace = Trace()
    handler = incident.EventHandler("parity")

    meet = waits_for(("E0", 2), ("O1", 4))

    @handler.listen(MoneyDeposited)
    def deposit(recorded: incident.Recorded[Any], state: AccountState) -> Row:
        trace.note("start", recorded)
        meet(recorded)
        trace.note("end", recorded)
        return Row(aggregate_id=recorded.aggregate_id, balance=state.balance)

    subscription = Subscription(
        handler,
        app,
        concurrency=4,
        on_failure="stop",
        sequence_by=lambda recorded: recorded.data.amount % 2,
    )
    subscription.catch_up()
    trace.assert_in_order(lambda stream, version: parity[stream])
    ends = [(stream, version) for step, stream, version in trace.steps if step == "end"]
    log = [(r.aggregate_id, r.version) for r in app.event_store.read_all() if r.version > 1]
    for key in "EO":  # one key's deposits: exactly in log order
        assert [e for e in ends if e[0][0] == key] == [e for e in log if e[0][0] == key]
    assert len(trace.threads) > 1


TRANSFERS = [  # id, source, destination, amount: every source can pay all of its own
    *((f"T{n}", "ABCD"[n % 4], "ABCD"[(n + 1 + n // 4 % 3) % 4], 1 + n % 7) for n in range(36)),
    ("T-nosrc", "GHOST", "A", 5),  # cancelled
    ("T-nodst", "B", "GHOST", 5),  # reverted, then cancelled
]


def transfer_app(url: str) -> incident.CommandHandler:
    app = application(url, inline=[bank.bank_projections])
    for number in "ABCD":
        app.dispatch(bank.OpenAccount(aggregate_id=number))
        app.dispatch(bank.DepositMoney(aggregate_id=number, amount=1000))
    for transfer_id, source, destination, amount in TRANSFERS:
        app.dispatch(
            bank.RequestTransfer(
                aggregate_id=transfer_id,
                source_account_number=source,
                destination_account_number=destination,
                amount=amount,
            )
        )
    return app


def stories(app: incident.CommandHandler) -> dict[str, list[str]]:
    """Each transfer's events, and each account movement, by transfer."""
    told = {t[0]: [r.event_type for r in app.event_store.get(t[0])] for t in TRANSFERS}
    for number in "ABCD":
        for recorded in app.event_store.get(number):
            transfer_id = getattr(recorded.data, "transfer_id", None)
            if transfer_id is not None:
                told[transfer_id].append(f"{number}:{recorded.event_type}")
    return told


def test_the_transfer_process_moves_money_once_and_again_nothing_when_redelivered(
    store_url: str,
) -> None:
    """The transfer process in waves of 8 (commands of different transfers hitting one
    account at once) ends every transfer as one-by-one does, each account movement once;
    handled again from position 0, as after a crash mid-wave, it appends nothing."""
    expected = transfer_app("memory://")
    Subscription(bank.money_transfer, expected).catch_up()

    app = transfer_app(store_url)
    try:
        first = Subscription(bank.money_transfer, app, concurrency=8)
        first.catch_up()
        assert first.parked() == []
        assert stories(app) == stories(expected)
        balances = {n: app.state("bank_account", n).balance for n in "ABCD"}
        assert balances == {n: expected.state("bank_account", n).balance for n in "ABCD"}
        assert sum(balances.values()) == 4000

        head = incident.subscriptions.last_position(app.event_store)
        first.checkpoints.reset(first.name, 0)
        again = Subscription(bank.money_transfer, app, concurrency=8)
        assert again.catch_up() == head
        assert incident.subscriptions.last_position(app.event_store) == head
        assert stories(app) == stories(expected)
    finally:
        app.close()
        expected.close()


@pytest.mark.parametrize("failing", [1, 6], ids=["first-event", "later-event"])
def test_the_checkpoint_stops_before_an_event_whose_unit_did_not_get_there(
    app: incident.CommandHandler, failing: int
) -> None:
    """Stream A's unit meets a database error at ``failing`` only after stream B's unit
    has finished all of its later events: the checkpoint moves to just before
    ``failing`` (B's work past it is not checkpointed, nor are its rows written), and the
    next step handles the rest."""
    app.dispatch(bank.OpenAccount(aggregate_id="A"))  # 1
    app.dispatch(bank.OpenAccount(aggregate_id="B"))  # 2
    for amount in (1, 2, 3):
        app.dispatch(bank.DepositMoney(aggregate_id="B", amount=amount))  # 3, 4, 5
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=7))  # 6
    b_done = threading.Event()
    outage = [True]
    trace = Trace()

    def meet(recorded: incident.Recorded[Any]) -> None:
        if recorded.aggregate_id == "B" and recorded.version == 4:
            b_done.set()
        if recorded.position == failing and outage[0]:
            assert b_done.wait(WAIT)
            outage[0] = False
            raise incident.StoreError("the database went away")

    subscription = Subscription(tracing_handler(trace, meet), app, concurrency=2)
    with pytest.raises(incident.StoreError):
        subscription.step()
    assert subscription.checkpoints.load("tracer") == failing - 1
    rows = {r.aggregate_id: r.balance for r in app.projection_store.all(Row)}
    assert rows == ({} if failing == 1 else {"A": 0, "B": 6})
    assert subscription.step() == 6 - (failing - 1)
    assert subscription.position == 6
    rows = {r.aggregate_id: r.balance for r in app.projection_store.all(Row)}
    assert rows == {"A": 7, "B": 6}


def test_parking_in_waves_holds_the_stream_as_one_by_one_does(store_url: str) -> None:
    """A listener failing on one event of A parks it and holds A's later events behind
    it, unhandled; the other streams go on; the dead letters, and the rows after a
    retry, are those of a one-by-one run."""

    def run(url: str, concurrency: int) -> tuple[list[tuple[int, bool]], dict[str, int]]:
        app = application(url)
        try:
            open_with_deposits(app, {"A": [1, 2, 3], "B": [4, 5], "C": [6]})
            failing = {7}  # A's second deposit
            handler = incident.EventHandler("balances")

            @handler.listen(bank.AccountOpened, MoneyDeposited)
            def balance(recorded: incident.Recorded[Any], state: AccountState) -> Row:
                if recorded.position in failing:
                    raise RuntimeError("a bug")
                return Row(aggregate_id=recorded.aggregate_id, balance=state.balance)

            subscription = Subscription(handler, app, concurrency=concurrency, backoff=0)
            subscription.catch_up()
            parked = [(p.position, p.held) for p in subscription.parked()]
            rows = {r.aggregate_id: r.balance for r in app.projection_store.all(Row)}
            assert rows["A"] == 1  # waits at the deposit before the failure
            failing.clear()
            assert subscription.retry_parked() == [p for p, _ in parked]
            rows = {r.aggregate_id: r.balance for r in app.projection_store.all(Row)}
            return parked, rows
        finally:
            app.close()

    parked, rows = run(store_url, concurrency=4)
    assert parked == [(7, False), (9, True)]
    assert (parked, rows) == run("memory://", concurrency=1)
    assert rows == {"A": 6, "B": 9, "C": 6}


def test_stop_in_a_wave_checkpoints_everything_before_the_failure(
    app: incident.CommandHandler,
) -> None:
    """With ``on_failure="stop"``, the first failing event in log order is the one named,
    and every event before it, of every stream, is checkpointed with its rows."""
    open_with_deposits(app, {"A": [1, 2], "B": [3, 4], "C": [5, 6]})
    trace = Trace()

    def meet(recorded: incident.Recorded[Any]) -> None:
        if recorded.position in (6, 8):  # C's first deposit, B's second
            raise RuntimeError(f"cannot handle #{recorded.position}")

    subscription = Subscription(
        tracing_handler(trace, meet), app, concurrency=3, on_failure="stop", retries=0
    )
    with pytest.raises(SubscriptionFailed) as failed:
        subscription.catch_up()
    assert failed.value.position == 6
    assert subscription.checkpoints.load("tracer") == 5
    rows = {r.aggregate_id: r.balance for r in app.projection_store.all(Row)}
    assert rows == {"A": 1, "B": 3, "C": 0}


@pytest.mark.parametrize("concurrency", [0, -1, 2.0, "4", True])
def test_a_bad_concurrency_is_refused_before_anything_runs(
    app: incident.CommandHandler, concurrency: Any
) -> None:
    """``concurrency`` must be an int of at least 1; anything else is a ValueError at
    construction (or assignment), and the store is untouched."""
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    with pytest.raises(ValueError, match="concurrency must be an int >= 1"):
        Subscription(bank.bank_projections, app, concurrency=concurrency)
    subscription = Subscription(bank.bank_projections, app)
    with pytest.raises(ValueError, match="concurrency must be an int >= 1"):
        subscription.concurrency = concurrency
    assert subscription.concurrency == 1
    assert subscription.checkpoints.load(subscription.name) == 0
    assert app.projection_store.all(bank.BankAccount) == []
