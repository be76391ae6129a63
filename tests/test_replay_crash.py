"""A replay killed at any instant (docs/subscriptions.md, "A replay that is killed").

Afterwards the read models are the old ones with the old checkpoint and the old dead
letters, or the replayed ones with the new checkpoint and no dead letters; with the read
models in another database than the checkpoints, possibly the old ones behind the new
checkpoint, over which the runner never writes an older row and which the next replay
rebuilds. Each window is stood in for by an exception raised at that instant (``Killed``),
and once by a real SIGKILL of a replaying process; then a fresh runner retries the dead
letters and catches up, and the rows it writes must never be older than those before.

The log (``parked_and_behind``): A opened (#1), B opened (#2), a deposit on A the listener
fails on (#3, parked) and one held behind it (#4), a deposit on B (#5), the runner's
checkpoint at 5; then a deposit on A (#6) it has not read, and the listener fixed.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import pytest
from conftest import on_backends
from replay_balances import FAILING, HOOKS, Balance, app_for, balances

import incident
import incident.stores.postgres.projections as postgres_projections
import incident.stores.sqlite.checkpoints as sqlite_checkpoints
from incident.examples import bank
from incident.stores import CheckpointStore, ProjectionStore, checkpoint_store_for

P = TypeVar("P", bound=incident.Projection)


class Killed(Exception):
    """Raised where the process dies, at that instant."""


class State(NamedTuple):
    checkpoint: int
    parked: list[int]
    rows: dict[str, tuple[int, int]]  # account -> (balance, position of its event)


OLD = State(5, [3, 4], {"A": (0, 1), "B": (5, 5)})
NEW = State(6, [], {"A": (1111, 6), "B": (5, 5)})
# read models elsewhere, killed between the checkpoint's commit and the table swap
OLD_BEHIND_NEW = State(6, [], OLD.rows)


def state(subscription: incident.Subscription) -> State:
    rows = subscription.projection_store.all(Balance)
    return State(
        subscription.checkpoints.load(balances.name),
        [parked.position for parked in subscription.parked()],
        {row.aggregate_id: (row.balance, row.position) for row in rows},
    )


def subscription(reactor: Any, **options: Any) -> incident.Subscription:
    return incident.Subscription(balances, reactor, retries=0, backoff=0, **options)


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    """The log of OLD, in a command handler on ``store_url``."""
    app = app_for(store_url)
    FAILING.add(3)
    try:
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
        app.dispatch(bank.OpenAccount(aggregate_id="B"))
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=11))
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
        app.dispatch(bank.DepositMoney(aggregate_id="B", amount=5))
        runner = subscription(app)
        runner.catch_up()
    finally:
        FAILING.clear()
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=1000))
    assert state(runner) == OLD
    yield app
    HOOKS.clear()
    app.close()


@contextmanager
def fresh(app: incident.CommandHandler, url: str) -> Iterator[incident.Subscription]:
    """A runner started after the kill: a new process's stores on a durable backend (the
    same dicts in memory, where nothing outlives a real kill)."""
    if url == "memory://":
        yield subscription(app)
        return
    other = app_for(url)
    try:
        lock = checkpoint_store_for(other.event_store).lock(balances.name)
        assert lock.acquire(timeout=30), "the killed replay's lock was never released"
        lock.release()
        yield subscription(other)
    finally:
        other.close()


def recovers(app: incident.CommandHandler, url: str, *, after_run: State) -> None:
    """What follows a kill: a fresh runner retries every dead letter and catches up
    without writing any account's row older than the one before (an unversioned row
    moving backwards), leaving ``after_run``; the next replay leaves NEW."""
    with fresh(app, url) as runner:
        seen = [state(runner)]
        runner.retry_parked()
        seen.append(state(runner))
        runner.catch_up()
        seen.append(state(runner))
        for account in ("A", "B"):
            positions = [each.rows[account][1] for each in seen]
            assert positions == sorted(positions), f"{account}'s row moved backwards: {seen}"
        assert seen[-1] == after_run
        runner.replay()
        assert state(runner) == NEW
        assert runner.retry_parked() == []


class KilledAt:
    """A checkpoint store whose process dies at the ``index``-th call (from 0) of a verb
    that writes, just before it runs or just after it returns."""

    WRITES = frozenset({"save", "reset", "park", "unpark"})

    def __init__(self, store: CheckpointStore, index: int, *, after: bool) -> None:
        self.store, self.index, self.after = store, index, after
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        verb = getattr(self.store, name)
        if name not in self.WRITES:
            return verb

        def dying(*args: Any, **kwargs: Any) -> Any:
            here = len(self.calls) == self.index
            self.calls.append(name)
            if here and not self.after:
                raise Killed(f"before {name}")
            done = verb(*args, **kwargs)
            if here and self.after:
                raise Killed(f"after {name}")
            return done

        return dying


def test_a_replay_killed_while_rebuilding_changes_nothing(
    app: incident.CommandHandler, store_url: str
) -> None:
    """Killed after reading a batch: nothing was written, the old read models, checkpoint
    and dead letters stay; the runner and the next replay go on from them."""

    def killed(read: int) -> None:
        raise Killed("after the first batch")

    with pytest.raises(Killed):
        subscription(app, batch_size=2).replay(killed)
    assert state(subscription(app)) == OLD
    recovers(app, store_url, after_run=NEW)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_a_replay_killed_around_any_write_of_its_checkpoint_store(
    app: incident.CommandHandler, store_url: str, index: int, after: bool
) -> None:
    """Killed just before or after any write of the checkpoint store (the tables, the
    checkpoint and the dead letters are one ``reset``): the old state or the new one,
    never the rebuilt tables beside stale dead letters, whose retry would write their
    older rows over the replayed ones."""
    dying = KilledAt(checkpoint_store_for(app.event_store), index, after=after)
    replaying = subscription(app, checkpoints=cast(CheckpointStore, dying))
    if index == 0:
        with pytest.raises(Killed):
            replaying.replay()
    else:
        replaying.replay()
    assert dying.calls == ["reset"]  # the replay's one write
    assert state(subscription(app)) == (NEW if after or index else OLD)
    recovers(app, store_url, after_run=NEW)


@on_backends(["sqlite", "postgres"])
def test_a_replay_killed_inside_its_reset_rolls_all_of_it_back(
    app: incident.CommandHandler, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in the reset's transaction, the tables swapped and the dead letters and
    checkpoint not yet written: nothing of it commits. (In memory the swap, the
    checkpoint and the dead letters change under one lock, with nothing in between
    that can fail, and nothing outlives a real kill.)"""

    def swapped(*args: Any) -> None:
        real(*args)
        raise Killed("tables swapped")

    if store_url.startswith("sqlite"):
        real = sqlite_checkpoints.swap_tables
        monkeypatch.setattr(sqlite_checkpoints, "swap_tables", swapped)
    else:
        real = postgres_projections.PostgresProjectionStore.swap
        monkeypatch.setattr(postgres_projections.PostgresProjectionStore, "swap", swapped)
    with pytest.raises(Killed):
        subscription(app).replay()
    monkeypatch.undo()
    assert state(subscription(app)) == OLD
    recovers(app, store_url, after_run=NEW)


def test_a_killed_replay_s_commands_take_effect_once(store_url: str) -> None:
    """The commands a replay dispatches for events past the checkpoint (here a transfer
    the process never handled) are keyed: killed before its reset, the replay leaves the
    checkpoint where it was, and the runner that handles those events again, then the
    next replay, move the money once."""
    app = incident.CommandHandler(
        store_url,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections],  # the accounts' rows inline
    )
    try:
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
        app.dispatch(bank.OpenAccount(aggregate_id="B"))
        app.dispatch(
            bank.RequestTransfer(
                aggregate_id="T1",
                source_account_number="A",
                destination_account_number="B",
                amount=30,
            )
        )
        dying = KilledAt(checkpoint_store_for(app.event_store), 0, after=False)
        with pytest.raises(Killed):
            incident.Subscription(
                bank.money_transfer, app, checkpoints=cast(CheckpointStore, dying)
            ).replay()
        debited = app.projection_store.get(bank.BankAccount, "A")
        assert debited is not None and debited.balance == 70  # dispatched, then killed
        process = incident.Subscription(bank.money_transfer, app)
        assert process.position == 0
        process.catch_up()
        process.replay()
        process.catch_up()
        balances = [app.projection_store.get(bank.BankAccount, key) for key in "AB"]
        assert [row.balance if row else None for row in balances] == [70, 30]
        assert app.state("transfer", "T1").status == "completed"
    finally:
        app.close()


class Opened(incident.Projection):
    aggregate_id: str
    generation: int


class Ratio(incident.Projection):
    aggregate_id: str
    value: float


two_tables = incident.EventHandler("two_tables")
GENERATION = {"now": 1, "ratio": 1.0}


@two_tables.listen(bank.AccountOpened)
def opened(recorded: incident.Recorded[Any], state: Any) -> list[incident.Projection]:
    return [
        Opened(aggregate_id=recorded.aggregate_id, generation=int(GENERATION["now"])),
        Ratio(aggregate_id=recorded.aggregate_id, value=GENERATION["ratio"]),
    ]


def test_a_replay_with_a_row_no_store_keeps_replaces_no_table(store_url: str) -> None:
    """A rebuilt row that cannot be stored (a NaN), in the second of two tables, fails
    the replay before anything is written: the first table keeps its rows too."""
    app = incident.CommandHandler(store_url, aggregates=[bank.bank_account, bank.transfer])
    try:
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
        runner = incident.Subscription(two_tables, app)
        runner.catch_up()
        GENERATION.update(now=2, ratio=float("nan"))
        try:
            with pytest.raises(incident.IncidentError):
                incident.Subscription(two_tables, app).replay()
        finally:
            GENERATION.update(now=1, ratio=1.0)
        assert app.projection_store.all(Opened) == [Opened(aggregate_id="A", generation=1)]
        assert app.projection_store.all(Ratio) == [Ratio(aggregate_id="A", value=1.0)]
        assert runner.checkpoints.load(two_tables.name) == 1
    finally:
        app.close()


class Elsewhere:
    """The command handler, with its read models seen as another database's (a store
    that is not the checkpoints' kind) whose ``replace_all`` may die."""

    def __init__(self, app: incident.CommandHandler, *, after: bool | None) -> None:
        self.app, self.after = app, after
        self.projection_store = Tables(app.projection_store, after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)


class Tables:
    """A projection store passed through, whose first ``replace_all`` dies before it
    runs (``after`` False) or after (True), or not at all (None)."""

    def __init__(self, store: ProjectionStore, after: bool | None) -> None:
        self.store, self.after = store, after

    def replace_all(self, projection_type: type[P], projections: Any) -> int:
        if self.after is False:
            raise Killed("before the swap")
        written = cast(Any, self.store).replace_all(projection_type, projections)
        if self.after:
            raise Killed("after the swap")
        return cast(int, written)

    def project(self, projection: P) -> P:
        return self.store.project(projection)

    def get(self, projection_type: type[P], key: str) -> P | None:
        return self.store.get(projection_type, key)

    def all(self, projection_type: type[P]) -> list[P]:
        return self.store.all(projection_type)

    def close(self) -> None:
        self.store.close()


@pytest.mark.parametrize(
    ("after", "left"),
    [(None, NEW), (False, OLD_BEHIND_NEW), (True, NEW)],
    ids=["not-killed", "before-swap", "after-swap"],
)
def test_read_models_elsewhere_are_swapped_after_the_checkpoint(
    app: incident.CommandHandler, store_url: str, after: bool | None, left: State
) -> None:
    """With the read models in another database, the checkpoint and the dead letters
    commit first: killed before the tables are swapped, the old rows stay behind the
    new checkpoint with nothing to retry. The runner then writes only rows of later
    events, never an older one over a newer, and the next replay rebuilds the rest."""
    replaying = subscription(Elsewhere(app, after=after))
    assert not replaying.checkpoints.shares_database_with(replaying.projection_store)
    try:
        replaying.replay()
    except Killed:
        assert after is not None
    assert state(subscription(app)) == left
    recovers(app, store_url, after_run=left)


def test_a_replay_waits_for_a_retry_running_elsewhere(
    app: incident.CommandHandler, store_url: str
) -> None:
    """A retry (of another runner object, as another process's would be) handling a
    parked event when the replay starts: the replay waits for it to end, so the
    retried rows land in the tables the replay replaces, never over the replayed ones
    (which the retry's #3 and #4 would take back to #4's balance)."""
    in_retry, go_on, waiting = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_the_retry(position: int) -> None:
        if threading.current_thread().name == "retrier" and position == 3:
            in_retry.set()
            assert go_on.wait(10)

    class Waiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for a retry running elsewhere" in record.getMessage():
                waiting.set()

    def running(name: str, work: Any) -> threading.Thread:
        def target() -> None:
            try:
                work()
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    HOOKS.append(hold_the_retry)
    logger, seen = logging.getLogger("incident.subscriptions"), Waiting(logging.INFO)
    level, _ = logger.level, logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    try:
        with fresh(app, store_url) as other:
            retrier = running("retrier", other.retry_parked)
            assert in_retry.wait(10)
            replayer = running("replayer", subscription(app).replay)
            # bounded: until the replay waits for its turn, or (wrongly) has done without
            for _ in range(1000):
                if waiting.wait(0.01) or not replayer.is_alive():
                    break
            go_on.set()
            for thread in (retrier, replayer):
                thread.join(10)
                assert not thread.is_alive()
    finally:
        go_on.set()
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert errors == []
    assert state(subscription(app)) == NEW
    assert waiting.is_set(), "the replay did not wait for the retry"


# -- a real kill ------------------------------------------------------------------------


def killed_replay(url: str, step: str) -> None:
    """Start ``replay_balances.py URL STEP``, wait (bounded) for it to reach ``step``, and
    SIGKILL it there."""
    tests = Path(__file__).parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen(
        [sys.executable, str(tests / "replay_balances.py"), url, step],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
        text=True,
    )
    try:
        assert child.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=60), f"the replay never reached {step}"
        assert child.stdout.readline() == f"at {step}\n"
    finally:
        child.kill()
        child.wait(timeout=30)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


@on_backends(["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("step", "left"), [("rebuilding", OLD), ("swapped", OLD), ("committed", NEW)]
)
def test_a_replaying_process_killed_leaves_the_old_state_or_the_new(
    app: incident.CommandHandler, store_url: str, step: str, left: State
) -> None:
    """SIGKILLed while it rebuilds, inside its reset's transaction (the tables swapped,
    nothing committed), or once the reset has committed: the old state, the old, the
    new; the next runner and replay go on from it."""
    killed_replay(store_url, step)
    with fresh(app, store_url) as after:
        assert state(after) == left
    recovers(app, store_url, after_run=NEW)
