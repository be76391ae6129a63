"""Subscriptions: event handlers run durably from a checkpoint, on every store backend."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

import incident
from incident.examples import bank
from incident.examples.bank import (
    AccountState,
    BankAccount,
    DepositMoney,
    MoneyDeposited,
    OpenAccount,
    RequestTransfer,
    Transfer,
    WithdrawMoney,
)


def run_scenario(app: incident.CommandHandler, settle: Callable[[], None] = lambda: None) -> None:
    """Accounts, deposits, withdrawals and every kind of transfer outcome; ``settle`` runs
    after each command (transfers depend on balances that earlier transfers change)."""
    for number, balance in (("A", 100), ("B", 50), ("C", 0)):
        app.dispatch(OpenAccount(aggregate_id=number))
        if balance:
            app.dispatch(DepositMoney(aggregate_id=number, amount=balance))
    app.dispatch(WithdrawMoney(aggregate_id="A", amount=10))
    transfers = [
        ("T-ok", "A", "B", 30),  # completes
        ("T-poor", "C", "A", 5),  # cancelled: C cannot pay
        ("T-nosrc", "Z", "A", 5),  # cancelled: no source
        ("T-nodst", "B", "Z", 20),  # reverted, then cancelled: no destination
        ("T-ok2", "B", "C", 40),
    ]
    for transfer_id, source, destination, amount in transfers:
        app.dispatch(
            RequestTransfer(
                aggregate_id=transfer_id,
                source_account_number=source,
                destination_account_number=destination,
                amount=amount,
            )
        )
        settle()


def read_models(app: incident.CommandHandler) -> tuple[dict[str, int], dict[str, str]]:
    balances = {row.aggregate_id: row.balance for row in app.projection_store.all(BankAccount)}
    statuses = {row.aggregate_id: row.status for row in app.projection_store.all(Transfer)}
    return balances, statuses


@pytest.fixture
def durable(store_url: str) -> Iterator[incident.CommandHandler]:
    app = bank.build(store_url, subscriptions=True)
    yield app
    app.subscriptions.stop()
    app.event_store.close()


# A handler whose listener can be told to fail, and which records what it saw.
class Seen(incident.Projection):
    aggregate_id: str
    balance: int
    version: int


def recording_handler(
    fail_on: set[int] | None = None, seen: list[tuple[int, int, str]] | None = None
) -> incident.EventHandler:
    handler = incident.EventHandler("recorder")

    @handler.listen(bank.AccountOpened, MoneyDeposited)
    def record(recorded: incident.Recorded[Any], state: AccountState) -> Seen:
        if fail_on is not None and recorded.position in fail_on:
            raise RuntimeError(f"cannot handle #{recorded.position}")
        if seen is not None:
            seen.append((recorded.position, state.balance, threading.current_thread().name))
        return Seen(
            aggregate_id=recorded.aggregate_id, balance=state.balance, version=recorded.version
        )

    return handler


def writer(
    store_url: str, handler: incident.EventHandler, **options: Any
) -> incident.CommandHandler:
    return incident.CommandHandler(
        store_url,
        aggregates=[bank.bank_account, bank.transfer],
        subscriptions=[handler],
        **options,
    )


def test_bank_with_subscriptions_reaches_the_same_read_models_as_inline(
    store_url: str, durable: incident.CommandHandler, tmp_path: Any
) -> None:
    """The Bank with its handlers as subscriptions ends with the balances and transfer
    statuses it has when they run inline."""
    inline = bank.build("memory://")
    run_scenario(inline)
    with durable.subscriptions:
        run_scenario(durable, lambda: durable.subscriptions.wait_until_caught_up(timeout=30))
    assert read_models(durable) == read_models(inline)
    balances, statuses = read_models(durable)
    assert statuses == {
        "T-ok": "completed",
        "T-poor": "cancelled",
        "T-nosrc": "cancelled",
        "T-nodst": "cancelled",
        "T-ok2": "completed",
    }
    assert sum(balances.values()) == 100 + 50 - 10


def test_catch_up_runs_the_subscriptions_in_the_calling_thread(
    durable: incident.CommandHandler,
) -> None:
    """Nothing is projected until the subscriptions run; catch_up drains them, including
    the events that the transfer process dispatches along the way."""
    run_scenario(durable)
    assert durable.projection_store.all(BankAccount) == []
    read = durable.subscriptions.catch_up()
    assert read > 0
    head = incident.subscriptions.last_position(durable.event_store)
    assert {s.position for s in durable.subscriptions.values()} == {head}
    assert read_models(durable)[1]["T-nodst"] == "cancelled"


def test_listeners_get_the_state_after_each_event_even_from_a_mid_log_checkpoint(
    store_url: str,
) -> None:
    """The state a listener receives is the aggregate's right after that event, also when
    the subscription starts from a checkpoint with nothing cached."""
    seen: list[tuple[int, int, str]] = []
    app = writer(store_url, recording_handler(seen=seen))
    app.dispatch(OpenAccount(aggregate_id="A"))
    app.dispatch(DepositMoney(aggregate_id="A", amount=5))
    app.subscriptions.catch_up()
    app.dispatch(DepositMoney(aggregate_id="A", amount=7))
    restarted = writer(app.event_store, recording_handler(seen=seen))  # type: ignore[arg-type]
    restarted.subscriptions.catch_up()
    assert [(position, balance) for position, balance, _ in seen] == [(1, 0), (2, 5), (3, 12)]


def test_a_restarted_subscription_resumes_from_its_checkpoint(store_url: str) -> None:
    """A new subscription for the same handler handles only the events after the
    checkpoint the previous one saved."""
    seen: list[tuple[int, int, str]] = []
    first = writer(store_url, recording_handler(seen=seen))
    first.dispatch(OpenAccount(aggregate_id="A"))
    first.subscriptions.catch_up()
    first.dispatch(DepositMoney(aggregate_id="A", amount=1))
    first.dispatch(DepositMoney(aggregate_id="A", amount=2))
    again = writer(first.event_store, recording_handler(seen=seen))  # type: ignore[arg-type]
    assert again.subscriptions["recorder"].position == 1
    again.subscriptions.catch_up()
    assert [position for position, _, _ in seen] == [1, 2, 3]
    row = again.projection_store.get(Seen, "A")
    assert row is not None and (row.balance, row.version) == (3, 3)


def test_a_failing_event_is_parked_and_the_rest_are_processed(store_url: str) -> None:
    """A listener that keeps failing on one event is retried, then that event is parked
    with its error; its stream's later events are held behind it and the events of
    other streams are still handled."""
    fail_on = {2}
    app = writer(store_url, recording_handler(fail_on=fail_on))
    subscription = app.subscriptions["recorder"]
    subscription.backoff = 0.0
    for number in ("A", "B"):
        app.dispatch(OpenAccount(aggregate_id=number))
    app.dispatch(DepositMoney(aggregate_id="B", amount=9))
    app.dispatch(DepositMoney(aggregate_id="A", amount=4))
    app.subscriptions.catch_up()

    parked, held = subscription.parked()
    assert (parked.position, parked.aggregate_id, parked.event_type) == (2, "B", "AccountOpened")
    assert parked.attempts == subscription.retries + 1
    assert "cannot handle #2" in parked.error
    assert (held.position, held.attempts, held.held) == (3, 0, True)
    assert held.error == f"held behind #2 ({parked.error})"
    assert subscription.position == 4
    assert app.projection_store.get(Seen, "B") is None  # its deposit waits behind it
    row = app.projection_store.get(Seen, "A")
    assert row is not None and row.balance == 4  # another stream goes on

    fail_on.clear()  # the bug is fixed: retrying empties the dead-letter store, in order
    assert subscription.retry_parked() == [2, 3]
    assert subscription.parked() == []
    row = app.projection_store.get(Seen, "B")
    assert row is not None and row.balance == 9


def test_a_subscription_told_to_stop_stops_at_the_failing_event(store_url: str) -> None:
    """With on_failure="stop", the events before the failing one are checkpointed and
    the subscription raises SubscriptionFailed naming the position."""
    app = incident.CommandHandler(store_url, aggregates=[bank.bank_account, bank.transfer])
    subscription = incident.Subscription(
        recording_handler(fail_on={3}), app, on_failure="stop", retries=1, backoff=0.0
    )
    app.dispatch(OpenAccount(aggregate_id="A"))
    app.dispatch(DepositMoney(aggregate_id="A", amount=1))
    app.dispatch(DepositMoney(aggregate_id="A", amount=2))
    with pytest.raises(incident.SubscriptionFailed, match="position 3"):
        subscription.catch_up()
    assert subscription.position == 2
    assert subscription.checkpoints.load("recorder") == 2
    assert subscription.parked() == []


def test_one_runner_per_handler(store_url: str) -> None:
    """Two runners of one handler: only the one holding the lock handles events; when it
    stops, the other takes over from the checkpoint."""
    seen: list[tuple[int, int, str]] = []
    app = writer(store_url, recording_handler(seen=seen))
    other = writer(app.event_store, recording_handler(seen=seen))  # type: ignore[arg-type]
    app.dispatch(OpenAccount(aggregate_id="A"))
    with app.subscriptions:
        app.subscriptions.wait_until_caught_up()
        other.subscriptions.start()
        for amount in range(1, 6):
            app.dispatch(DepositMoney(aggregate_id="A", amount=amount))
        app.subscriptions.wait_until_caught_up()
        first_runner = {name for _, _, name in seen}
    # the first runner stopped: the second one holds the lock now and continues
    app.dispatch(DepositMoney(aggregate_id="A", amount=100))
    other.subscriptions.wait_until_caught_up()
    other.subscriptions.stop()
    assert [position for position, _, _ in seen] == list(range(1, 8))
    assert len(first_runner) == 1
    assert seen[-1][1] == 115


def test_waiting_for_a_subscription_that_does_not_run_times_out(
    durable: incident.CommandHandler,
) -> None:
    durable.dispatch(OpenAccount(aggregate_id="A"))
    with pytest.raises(TimeoutError, match="bank_projections is at 0, not 1"):
        durable.subscriptions["bank_projections"].wait_until_caught_up(1, timeout=0.01)


def test_a_handler_runs_either_inline_or_as_a_subscription() -> None:
    with pytest.raises(incident.RegistrationError, match="both inline and as a subscription"):
        incident.CommandHandler(
            aggregates=[bank.bank_account, bank.transfer],
            event_handlers=[bank.bank_projections],
            subscriptions=[bank.bank_projections],
        )


def test_a_subscription_needs_the_aggregates_of_its_events() -> None:
    with pytest.raises(incident.RegistrationError, match="TransferRequested"):
        incident.CommandHandler(aggregates=[bank.bank_account], subscriptions=[bank.money_transfer])


def test_replay_rebuilds_projections_from_the_start(store_url: str) -> None:
    """A replay swaps in read models rebuilt from the log, fixing rows that went wrong,
    dropping rows no event supports, moving the checkpoint to the end and emptying the
    dead letters."""
    app = bank.build(store_url)  # inline: the read models exist already
    run_scenario(app)
    expected = read_models(app)
    store = app.projection_store
    row = store.get(BankAccount, "A")
    assert row is not None
    store.project(msgspec.structs.replace(row, balance=-1, version=row.version + 10))
    store.project(msgspec.structs.replace(row, aggregate_id="GHOST"))
    replayer = incident.Subscription(bank.bank_projections, app)
    first = next(iter(app.event_store.read_all()))
    replayer.checkpoints.park(
        incident.Parked(
            handler="bank_projections",
            position=1,
            event_id=first.event_id,
            aggregate_id=first.aggregate_id,
            event_type=first.event_type,
            error="RuntimeError: a bug since fixed",
            attempts=4,
            parked_at=first.event_date,
        )
    )
    seen: list[int] = []
    done = replayer.replay(seen.append)
    head = incident.subscriptions.last_position(app.event_store)
    assert (done.position, sum(seen), replayer.checkpoints.load("bank_projections")) == (
        head,
        head,
        head,
    )
    assert done.written == {"BankAccount": 3, "Transfer": 5}
    assert read_models(app) == expected
    assert replayer.parked() == []  # handled this time


def test_replay_does_not_dispatch_commands_again(store_url: str) -> None:
    """Replaying a process handler that had handled everything sends no command twice."""
    app = bank.build(store_url, subscriptions=True)
    run_scenario(app, app.subscriptions.catch_up)
    events = incident.subscriptions.last_position(app.event_store)
    done = app.subscriptions["money_transfer"].replay()
    # five requests, three initiations, one reversion (which returns two commands)
    assert done.skipped_commands == 5 + 3 + 2
    assert incident.subscriptions.last_position(app.event_store) == events


def test_a_process_handling_events_again_sends_nothing_twice(store_url: str) -> None:
    """After a crash a subscription handles events again; the commands it dispatches are
    keyed by event, listener and content, so a transfer does not move money twice, and a
    command rejected the first time is rejected again (docs/processes.md)."""
    app = bank.build(store_url, subscriptions=True)
    opening = [OpenAccount(aggregate_id="A"), OpenAccount(aggregate_id="B")]
    for command in [*opening, DepositMoney(aggregate_id="A", amount=100)]:
        app.dispatch(command)
    for transfer_id, destination in (("T1", "B"), ("T2", "nowhere"), ("T3", "B")):
        app.dispatch(
            RequestTransfer(
                aggregate_id=transfer_id,
                source_account_number="A",
                destination_account_number=destination,
                amount=30,
            )
        )
        app.subscriptions.catch_up()
    before = read_models(app)
    head = incident.subscriptions.last_position(app.event_store)
    app.subscriptions["money_transfer"].checkpoints.reset("money_transfer", 0)
    again = incident.CommandHandler(
        app.event_store,
        aggregates=[bank.bank_account, bank.transfer],
        subscriptions=[bank.money_transfer],
    )
    again.subscriptions.catch_up()
    assert incident.subscriptions.last_position(app.event_store) == head
    assert (
        read_models(app)
        == before
        == ({"A": 40, "B": 60}, {"T1": "completed", "T2": "cancelled", "T3": "completed"})
    )


def test_a_database_failure_is_not_blamed_on_the_event(store_url: str) -> None:
    """A StoreError while handling an event (the database went away) parks nothing and
    moves no checkpoint: the subscription raises, and handles the event once it is back."""
    down = [True]
    handler = incident.EventHandler("fragile")

    @handler.listen(bank.AccountOpened)
    def opened(recorded: incident.Recorded[Any], state: AccountState) -> Seen:
        if down[0]:
            raise incident.StoreError("the database is down")
        return Seen(aggregate_id=recorded.aggregate_id, balance=0, version=recorded.version)

    app = writer(store_url, handler)
    app.dispatch(OpenAccount(aggregate_id="A"))
    subscription = app.subscriptions["fragile"]
    with pytest.raises(incident.StoreError):
        subscription.catch_up()
    assert (subscription.position, subscription.parked()) == (0, [])
    down[0] = False
    subscription.catch_up()
    assert subscription.position == 1
    assert app.projection_store.get(Seen, "A") is not None


class Marked(incident.Projection):
    aggregate_id: str
    by: str


def marking_handler(by: str) -> incident.EventHandler:
    handler = incident.EventHandler("marker")

    @handler.listen(bank.AccountOpened)
    def mark(recorded: incident.Recorded[Any], state: AccountState) -> Marked:
        return Marked(aggregate_id=recorded.aggregate_id, by=by)

    return handler


def test_a_batch_and_its_checkpoint_commit_together(store_url: str) -> None:
    """A runner whose checkpoint was moved under it writes none of its batch's
    projections: they commit with the checkpoint or not at all."""
    app = incident.CommandHandler(store_url, aggregates=[bank.bank_account, bank.transfer])
    first = incident.Subscription(marking_handler("first"), app)
    stale = incident.Subscription(marking_handler("stale"), app)
    assert stale.position == 0  # read before the first one moves on
    app.dispatch(OpenAccount(aggregate_id="A"))
    first.catch_up()
    app.dispatch(OpenAccount(aggregate_id="B"))
    with pytest.raises(incident.CheckpointConflict):
        stale.catch_up()
    assert [row.by for row in app.projection_store.all(Marked)] == ["first"]
    first.catch_up()
    assert {row.aggregate_id: row.by for row in app.projection_store.all(Marked)} == {
        "A": "first",
        "B": "first",
    }


def test_projections_in_another_database_catch_up_too(store_url: str) -> None:
    """With the read models in another database the projections are written before the
    checkpoint (at least once, version-guarded); the outcome is the same."""
    inline = bank.build("memory://")
    run_scenario(inline)
    elsewhere = incident.open_projection_store("memory://")
    app = bank.build(store_url, elsewhere, subscriptions=True)
    run_scenario(app, app.subscriptions.catch_up)
    assert read_models(app) == read_models(inline)
    assert app.projection_store is elsewhere


class RecordingReactor:
    """The least an application must offer a subscription: stores, aggregates, and a
    follow_up that here only records what it was asked to carry out."""

    def __init__(self, event_store: incident.EventStore) -> None:
        self.event_store = event_store
        self.projection_store = event_store.projections()
        self.aggregates = (bank.bank_account,)
        self.asked: list[tuple[str, int, list[tuple[str, list[Any]]]]] = []

    def follow_up(self, handler: str, cause: incident.Recorded[Any], steps: Any) -> None:
        self.asked.append((handler, cause.position, [(n, list(c)) for n, c in steps]))


def test_a_subscription_runs_in_any_reactor_not_only_a_command_handler() -> None:
    """Subscription(handler, app) asks of ``app`` only what incident.Reactor names: a
    plain object with the stores, the aggregates and follow_up will do."""
    app = incident.CommandHandler(aggregates=[bank.bank_account])
    app.dispatch(OpenAccount(aggregate_id="A"))
    app.dispatch(DepositMoney(aggregate_id="A", amount=5))
    handler = incident.EventHandler("refunds")

    @handler.listen(MoneyDeposited)
    def refund(recorded: incident.Recorded[Any], state: AccountState) -> Any:
        seen = Seen(aggregate_id="A", balance=state.balance, version=recorded.version)
        return [seen, WithdrawMoney(aggregate_id="A", amount=recorded.data.amount)]

    reactor = RecordingReactor(app.event_store)
    reactor_typed: incident.Reactor = reactor  # it satisfies the protocol
    subscription = incident.Subscription(handler, reactor_typed)
    assert subscription.catch_up() == 2
    assert reactor.projection_store.get(Seen, "A") == Seen(aggregate_id="A", balance=5, version=2)
    [(name, position, [(listener, commands)])] = reactor.asked
    assert (name, position, listener.rsplit(".", 1)[-1]) == ("refunds", 2, "refund")
    assert commands == [WithdrawMoney(aggregate_id="A", amount=5)]


def test_subscriptions_do_not_import_the_write_side() -> None:
    """The subscription modules depend on stores, aggregates and the Reactor protocol;
    the command handler depends on them, never the reverse (no import cycle)."""
    import ast
    import pathlib

    package = pathlib.Path(incident.__file__).parent / "subscriptions"
    modules = sorted(package.glob("*.py"))
    assert len(modules) > 3, modules
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = node.module.lstrip(".").split(".")
                assert "command_handler" not in imported, f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert not any("command_handler" in a.name for a in node.names), path.name


def test_replay_dispatches_what_parked_events_owe(store_url: str) -> None:
    """A listener fails on one account's opening, which is parked (and later events of
    that stream held behind it); the bug is fixed and the handler replayed: the parked
    event was never handled, so its command is dispatched now, not counted as done, and
    the dead letters are empty only once nothing is owed."""

    class Welcomed(incident.Projection):
        aggregate_id: str

    welcome = incident.EventHandler("welcome")
    broken = {"B"}

    @welcome.listen(bank.AccountOpened)
    def opened(recorded: incident.Recorded[Any], state: Any) -> list[Any]:
        if recorded.aggregate_id in broken:
            raise RuntimeError("a bug, fixed below")
        return [
            Welcomed(aggregate_id=recorded.aggregate_id),
            DepositMoney(aggregate_id=recorded.aggregate_id, amount=5),
        ]

    app = incident.CommandHandler(store_url, aggregates=[bank.bank_account, bank.transfer])
    for account in "ABC":
        app.dispatch(OpenAccount(aggregate_id=account))
    subscription = incident.Subscription(welcome, app, backoff=0)
    subscription.catch_up()
    assert [p.aggregate_id for p in subscription.parked()] == ["B"]
    broken.clear()
    done = subscription.replay()
    assert done.skipped_commands == 2  # A's and C's bonuses, dispatched the first time
    assert subscription.parked() == []
    assert {n: app.state("bank_account", n).balance for n in "ABC"} == {"A": 5, "B": 5, "C": 5}
    assert app.projection_store.get(Welcomed, "B") == Welcomed(aggregate_id="B")
    again = subscription.replay()  # nothing owed any more: nothing dispatched twice
    assert again.skipped_commands == 3
    assert {n: app.state("bank_account", n).balance for n in "ABC"} == {"A": 5, "B": 5, "C": 5}
    app.close()
