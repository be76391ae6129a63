"""CommandHandler: routing, validation, retries, inline handlers, metadata, follow-ups."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import msgspec
import pytest

import incident
from incident.stores import AppendRequest, Committed
from incident.stores.memory import MemoryEventStore

Positive = Annotated[int, msgspec.Meta(gt=0)]

# -- a small wallet domain -------------------------------------------------------------


class Open(incident.Command):
    aggregate_id: str


class Deposit(incident.Command):
    aggregate_id: str
    amount: Positive


class Withdraw(incident.Command):
    aggregate_id: str
    amount: Positive


class Touch(incident.Command):
    """Decides nothing."""

    aggregate_id: str


class Unrouted(incident.Command):
    aggregate_id: str


class Opened(incident.Event):
    pass


class Deposited(incident.Event):
    amount: int


class Withdrawn(incident.Event):
    amount: int


class Wallet(msgspec.Struct, frozen=True):
    opened: bool = False
    balance: int = 0


class WalletRow(incident.Projection):
    aggregate_id: str
    balance: int
    version: int


def wallet_aggregate(seen: list[tuple[str, Wallet]] | None = None) -> incident.Aggregate[Wallet]:
    """The wallet; every execute call appends (command name, state) to ``seen``."""
    calls = seen if seen is not None else []
    wallet: incident.Aggregate[Wallet] = incident.Aggregate("wallet", initial=Wallet())

    @wallet.execute
    def open_(state: Wallet, cmd: Open) -> Opened:
        calls.append(("Open", state))
        if state.opened:
            raise incident.Rejected("already_open")
        return Opened()

    @wallet.execute
    def deposit(state: Wallet, cmd: Deposit) -> Deposited:
        calls.append(("Deposit", state))
        if not state.opened:
            raise incident.Rejected("not_open")
        return Deposited(amount=cmd.amount)

    @wallet.execute
    def withdraw(state: Wallet, cmd: Withdraw) -> Withdrawn:
        calls.append(("Withdraw", state))
        if state.balance < cmd.amount:
            raise incident.Rejected("no_money")
        return Withdrawn(amount=cmd.amount)

    @wallet.execute
    def touch(state: Wallet, cmd: Touch) -> tuple[()]:
        calls.append(("Touch", state))
        return ()

    @wallet.apply
    def opened(state: Wallet, event: Opened) -> Wallet:
        return Wallet(opened=True)

    @wallet.apply
    def deposited(state: Wallet, event: Deposited) -> Wallet:
        return msgspec.structs.replace(state, balance=state.balance + event.amount)

    @wallet.apply
    def withdrawn(state: Wallet, event: Withdrawn) -> Wallet:
        return msgspec.structs.replace(state, balance=state.balance - event.amount)

    return wallet


def rows() -> incident.EventHandler:
    """Keeps a WalletRow per wallet, from the state after each event."""
    handler = incident.EventHandler("rows")

    @handler.listen(Opened, Deposited, Withdrawn)
    def row(recorded: incident.Recorded[Any], state: Wallet) -> WalletRow:
        return WalletRow(
            aggregate_id=recorded.aggregate_id, balance=state.balance, version=recorded.version
        )

    return handler


def reacting(event_type: type[incident.Event], reaction: Any) -> incident.EventHandler:
    """An event handler returning ``reaction`` (or ``reaction(recorded)`` if callable)."""
    handler = incident.EventHandler(f"on_{event_type.__name__}")

    @handler.listen(event_type)
    def react(recorded: incident.Recorded[Any], state: Any) -> Any:
        return reaction(recorded) if callable(reaction) else reaction

    return handler


def make(
    *handlers: incident.EventHandler, seen: list[tuple[str, Wallet]] | None = None, **options: Any
) -> incident.CommandHandler:
    return incident.CommandHandler(
        "memory://", aggregates=[wallet_aggregate(seen)], event_handlers=list(handlers), **options
    )


def log_of(app: incident.CommandHandler) -> list[incident.Recorded[Any]]:
    return list(app.event_store.read_all())


@pytest.fixture
def app() -> Iterator[incident.CommandHandler]:
    handler = make(rows())
    yield handler
    handler.event_store.close()


# -- construction and routing ----------------------------------------------------------------


def test_stores_may_be_given_as_urls_or_objects() -> None:
    """URLs are opened; projection_store=None is the event store's own database."""
    by_url = incident.CommandHandler("memory://", aggregates=[wallet_aggregate()])
    assert isinstance(by_url.event_store, incident.EventStore)
    assert by_url.event_store.shares_database_with(by_url.projection_store)
    store = MemoryEventStore()
    projections = store.projections()
    by_object = incident.CommandHandler(store, projections, aggregates=[wallet_aggregate()])
    assert by_object.event_store is store and by_object.projection_store is projections


def test_a_command_no_aggregate_handles_names_what_is_routed(
    app: incident.CommandHandler,
) -> None:
    """RoutingError names the command and every command type this handler routes."""
    with pytest.raises(incident.RoutingError) as caught:
        app.dispatch(Unrouted(aggregate_id="W1"))
    message = str(caught.value)
    assert "Unrouted" in message
    assert "Deposit, Open, Touch, Withdraw" in message
    assert log_of(app) == []


def test_two_aggregates_claiming_one_command_type_are_refused() -> None:
    """A command type belongs to exactly one aggregate; the error names both."""
    other: incident.Aggregate[int] = incident.Aggregate("ledger", initial=0)

    @other.execute
    def deposit(state: int, cmd: Deposit) -> Deposited:
        return Deposited(amount=cmd.amount)

    with pytest.raises(incident.RegistrationError) as caught:
        incident.CommandHandler("memory://", aggregates=[wallet_aggregate(), other])
    assert "Deposit" in str(caught.value)
    assert "wallet" in str(caught.value) and "ledger" in str(caught.value)


def test_two_aggregates_with_one_name_are_refused() -> None:
    """Aggregate names identify streams' owners in .state and Recorded; they must be unique."""
    with pytest.raises(incident.RegistrationError, match="'wallet'"):
        incident.CommandHandler(
            "memory://", aggregates=[wallet_aggregate(), incident.Aggregate("wallet", initial=0)]
        )


def test_negative_retries_are_refused() -> None:
    """retries counts extra attempts; below zero is a mistake."""
    with pytest.raises(ValueError, match="retries"):
        make(retries=-1)


def test_state_by_name_or_by_aggregate(app: incident.CommandHandler) -> None:
    """.state folds the stream; an unknown id gives the initial state."""
    app.dispatch(Open(aggregate_id="W1"))
    app.dispatch(Deposit(aggregate_id="W1", amount=5))
    assert app.state("wallet", "W1") == Wallet(opened=True, balance=5)
    assert app.state(app.aggregates[0], "W1") == Wallet(opened=True, balance=5)
    assert app.state("wallet", "nobody") == Wallet()


def test_state_of_an_unknown_aggregate_name_names_the_known_ones(
    app: incident.CommandHandler,
) -> None:
    """RoutingError names the unknown aggregate and the aggregates this handler knows."""
    with pytest.raises(incident.RoutingError) as caught:
        app.state("walet", "W1")
    assert "'walet'" in str(caught.value) and "wallet" in str(caught.value)


# -- the happy path ------------------------------------------------------------------------


def test_dispatch_returns_the_recorded_events_and_projects_them(
    app: incident.CommandHandler,
) -> None:
    """The returned envelopes are what was stored; the projection committed with them."""
    app.dispatch(Open(aggregate_id="W1"))
    recorded = app.dispatch(Deposit(aggregate_id="W1", amount=7))
    assert [(r.version, r.aggregate, r.event_type, r.data) for r in recorded] == [
        (2, "wallet", "Deposited", Deposited(amount=7))
    ]
    assert recorded == app.event_store.get("W1")[1:]
    assert app.projection_store.get(WalletRow, "W1") == WalletRow(
        aggregate_id="W1", balance=7, version=2
    )


def test_dispatch_returns_nothing_when_the_aggregate_decides_nothing() -> None:
    """An empty decision stores nothing, runs no listener and returns []."""
    ran: list[str] = []

    def record(recorded: incident.Recorded[Any]) -> None:
        ran.append(recorded.event_type)

    app = make(reacting(Opened, record))
    assert app.dispatch(Touch(aggregate_id="W1")) == []
    assert log_of(app) == [] and ran == []


def test_a_rejected_command_stores_nothing(app: incident.CommandHandler) -> None:
    """Rejected reaches the caller with its reason; the stream is unchanged."""
    app.dispatch(Open(aggregate_id="W1"))
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(Withdraw(aggregate_id="W1", amount=1))
    assert caught.value.reason == "no_money"
    assert len(log_of(app)) == 1


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (Deposit(aggregate_id="W1", amount=0), "amount"),
        (Deposit(aggregate_id="W1", amount="5"), "amount"),  # type: ignore[arg-type]
        (Open(aggregate_id=1), "aggregate_id"),  # type: ignore[arg-type]
    ],
)
def test_an_invalid_command_names_the_field_and_stores_nothing(
    command: incident.Command, field: str
) -> None:
    """InvalidCommand is raised before the aggregate runs; nothing reaches the stores."""
    seen: list[tuple[str, Wallet]] = []
    app = make(rows(), seen=seen)
    app.dispatch(Open(aggregate_id="W1"))
    before, calls = log_of(app), len(seen)
    with pytest.raises(incident.InvalidCommand) as caught:
        app.dispatch(command)
    assert caught.value.field == field
    assert log_of(app) == before
    assert len(seen) == calls  # execute never ran
    assert app.projection_store.get(WalletRow, "W1") == WalletRow(
        aggregate_id="W1", balance=0, version=1
    )


# -- optimistic concurrency ---------------------------------------------------------------


class AlwaysConflicts:
    """Wraps a store; every commit raises ConcurrencyError and writes nothing."""

    def __init__(self, inner: MemoryEventStore) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit(self, request: AppendRequest, **options: Any) -> Committed:
        self.calls += 1
        version = request.expected_version
        raise incident.ConcurrencyError(request.aggregate_id, version, version + 1)


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_are_bounded_then_the_conflict_reaches_the_caller(retries: int) -> None:
    """A command is tried retries+1 times against a store that always conflicts, then raised."""
    store = AlwaysConflicts(MemoryEventStore())
    seen: list[tuple[str, Wallet]] = []
    app = incident.CommandHandler(
        store,  # type: ignore[arg-type]
        aggregates=[wallet_aggregate(seen)],
        retries=retries,
        backoff=0,
    )
    with pytest.raises(incident.ConcurrencyError) as caught:
        app.dispatch(Open(aggregate_id="W1"))
    assert store.calls == retries + 1
    assert len(seen) == retries + 1  # decided again on every attempt
    assert caught.value.aggregate_id == "W1"
    assert list(store.inner.read_all()) == []


def test_default_retries_is_ten() -> None:
    """Without retries=..., a command is tried eleven times before the conflict is raised."""
    store = AlwaysConflicts(MemoryEventStore())
    app = incident.CommandHandler(store, aggregates=[wallet_aggregate()], backoff=0)  # type: ignore[arg-type]
    with pytest.raises(incident.ConcurrencyError):
        app.dispatch(Open(aggregate_id="W1"))
    assert store.calls == 11


class RacedOnce:
    """Wraps a store; before the first append, another writer appends ``racing`` first."""

    def __init__(self, inner: MemoryEventStore, racing: incident.Event) -> None:
        self.inner = inner
        self.racing = racing
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit(self, request: AppendRequest, **options: Any) -> Committed:
        self.calls += 1
        if self.calls == 1:
            self.inner.append(
                request.aggregate_id,
                [self.racing],
                expected_version=incident.ANY,
                aggregate="wallet",
            )
        return self.inner.commit(request, **options)


def raced_app(racing: incident.Event, seen: list[tuple[str, Wallet]]) -> Any:
    store = RacedOnce(MemoryEventStore(), racing)
    app = incident.CommandHandler(
        store,  # type: ignore[arg-type]
        aggregates=[wallet_aggregate(seen)],
        event_handlers=[rows()],
        backoff=0,
    )
    store.inner.append("W1", [Opened(), Deposited(amount=100)], expected_version=0)
    return app, store


def test_a_conflict_is_decided_again_against_the_fresh_state() -> None:
    """After a conflict the stream is reloaded: the retry sees the racing writer's event."""
    seen: list[tuple[str, Wallet]] = []
    app, store = raced_app(Deposited(amount=50), seen)
    recorded = app.dispatch(Withdraw(aggregate_id="W1", amount=30))
    assert store.calls == 2
    assert [state.balance for _, state in seen] == [100, 150]
    assert [r.version for r in recorded] == [4]
    assert app.state("wallet", "W1").balance == 120
    assert app.projection_store.get(WalletRow, "W1").balance == 120


def test_a_retry_against_fresh_state_can_be_rejected() -> None:
    """If the racing writer took the money, the re-decision rejects; only its event is stored."""
    seen: list[tuple[str, Wallet]] = []
    app, _ = raced_app(Withdrawn(amount=80), seen)
    with pytest.raises(incident.Rejected) as caught:
        app.dispatch(Withdraw(aggregate_id="W1", amount=30))
    assert caught.value.reason == "no_money"
    assert [state.balance for _, state in seen] == [100, 20]
    assert [r.event_type for r in app.event_store.get("W1")] == [
        "Opened",
        "Deposited",
        "Withdrawn",
    ]
    assert app.projection_store.get(WalletRow, "W1") is None  # the losing attempt wrote none


class OffersTurns(RacedOnce):
    """A raced store that also offers turns on a stream (as Postgres does), recording
    the turns taken and whether each append ran inside one."""

    def __init__(self, inner: MemoryEventStore, racing: incident.Event) -> None:
        super().__init__(inner, racing)
        self.turns: list[str] = []
        self.in_turn: list[bool] = []
        self._inside = False

    @contextmanager
    def turn(self, aggregate_id: str) -> Iterator[None]:
        self.turns.append(aggregate_id)
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def commit(self, request: AppendRequest, **options: Any) -> Committed:
        self.in_turn.append(self._inside)
        return super().commit(request, **options)


def test_after_a_conflict_commands_to_the_stream_take_the_stores_turn() -> None:
    """From a stream's first conflict on, its commands decide and append inside the
    store's turn on it, first attempts too, and read what other writers appended
    instead of trusting the cache; streams that never collided take no turn."""
    seen: list[tuple[str, Wallet]] = []
    store = OffersTurns(MemoryEventStore(), Deposited(amount=50))
    app = incident.CommandHandler(
        store,  # type: ignore[arg-type]
        aggregates=[wallet_aggregate(seen)],
        backoff=0,
    )
    store.inner.append("W1", [Opened(), Deposited(amount=100)], expected_version=0)
    store.inner.append("W2", [Opened()], expected_version=0)
    app.dispatch(Withdraw(aggregate_id="W1", amount=30))  # raced, then retried in a turn
    store.inner.append("W1", [Deposited(amount=5)], expected_version=incident.ANY)
    app.dispatch(Withdraw(aggregate_id="W1", amount=10))  # sees the 5 at once
    app.dispatch(Deposit(aggregate_id="W2", amount=1))
    assert store.turns == ["W1", "W1"]
    assert store.in_turn == [False, True, True, False]
    assert [state.balance for _, state in seen] == [100, 150, 125, 0]
    assert app.state("wallet", "W1").balance == 115


# -- inline handlers inside the transaction ----------------------------------------------


def test_a_listener_that_raises_leaves_nothing_stored() -> None:
    """The listener runs inside the append: its error aborts the events and projections."""

    def explode(recorded: incident.Recorded[Any]) -> None:
        raise RuntimeError("listener bug")

    app = make(rows(), reacting(Deposited, explode))
    app.dispatch(Open(aggregate_id="W1"))
    with pytest.raises(RuntimeError, match="listener bug"):
        app.dispatch(Deposit(aggregate_id="W1", amount=5))
    assert [r.event_type for r in log_of(app)] == ["Opened"]
    assert app.projection_store.get(WalletRow, "W1") == WalletRow(
        aggregate_id="W1", balance=0, version=1
    )


def test_a_listener_returning_garbage_leaves_nothing_stored() -> None:
    """A bad listener return value is a RegistrationError raised before anything commits."""
    app = make(rows(), reacting(Opened, 42))
    with pytest.raises(incident.RegistrationError, match="42"):
        app.dispatch(Open(aggregate_id="W1"))
    assert log_of(app) == []
    assert app.projection_store.all(WalletRow) == []


def test_listeners_see_the_state_after_each_event() -> None:
    """With several events in one decision, each listener call gets the state after its event."""
    wallet = wallet_aggregate()

    class OpenWithBonus(incident.Command):
        aggregate_id: str

    @wallet.execute(OpenWithBonus)
    def open_with_bonus(state: Wallet, cmd: OpenWithBonus) -> list[incident.Event]:
        return [Opened(), Deposited(amount=10), Deposited(amount=5)]

    balances: list[int] = []
    history = incident.EventHandler("history")

    @history.listen(Opened, Deposited)
    def remember(recorded: incident.Recorded[Any], state: Wallet) -> None:
        balances.append(state.balance)

    app = incident.CommandHandler(
        "memory://", aggregates=[wallet], event_handlers=[rows(), history]
    )
    recorded = app.dispatch(OpenWithBonus(aggregate_id="W1"))
    assert [r.version for r in recorded] == [1, 2, 3]
    assert balances == [0, 10, 15]
    assert app.projection_store.get(WalletRow, "W1") == WalletRow(
        aggregate_id="W1", balance=15, version=3
    )


# -- metadata and follow-up commands ------------------------------------------------------


def test_user_metadata_is_stored_and_a_correlation_id_generated(
    app: incident.CommandHandler,
) -> None:
    """User keys land on every envelope; correlation_id is a fresh UUID; no causation."""
    given = {"user": "ada", "request": 7}
    recorded = app.dispatch(Open(aggregate_id="W1"), metadata=given)
    stored = app.event_store.get("W1")[0]
    assert stored.metadata == recorded[0].metadata
    assert stored.metadata["user"] == "ada" and stored.metadata["request"] == 7
    assert uuid.UUID(stored.metadata["correlation_id"])
    assert stored.metadata["causation_id"] is None
    assert given == {"user": "ada", "request": 7}  # the caller's dict is left alone
    other = app.dispatch(Deposit(aggregate_id="W1", amount=1))
    assert other[0].metadata["correlation_id"] != stored.metadata["correlation_id"]


def test_a_given_correlation_id_is_kept(app: incident.CommandHandler) -> None:
    """A caller continuing a conversation passes its correlation_id through."""
    recorded = app.dispatch(Open(aggregate_id="W1"), metadata={"correlation_id": "conv-1"})
    assert recorded[0].metadata["correlation_id"] == "conv-1"


def test_follow_up_commands_carry_causation_and_the_root_correlation() -> None:
    """A chain Open -> Deposit -> Withdraw: each follow-up is caused by the event before it,
    all share the root's correlation id and user keys, and dispatch returns only its own."""
    app = make(
        rows(),
        reacting(Opened, lambda r: Deposit(aggregate_id=r.aggregate_id, amount=10)),
        reacting(Deposited, lambda r: Withdraw(aggregate_id=r.aggregate_id, amount=3)),
    )
    returned = app.dispatch(Open(aggregate_id="W1"), metadata={"user": "ada"})
    opened, deposited, withdrawn = app.event_store.get("W1")
    assert returned == [opened]
    assert deposited.metadata["causation_id"] == opened.event_id
    assert withdrawn.metadata["causation_id"] == deposited.event_id
    root = opened.metadata["correlation_id"]
    assert {r.metadata["correlation_id"] for r in (deposited, withdrawn)} == {root}
    assert {r.metadata["user"] for r in (opened, deposited, withdrawn)} == {"ada"}
    assert app.projection_store.get(WalletRow, "W1") == WalletRow(
        aggregate_id="W1", balance=7, version=3
    )


def test_follow_ups_run_after_the_causing_command_committed() -> None:
    """A follow-up sees the state its cause produced (it runs after the commit, in order)."""
    seen: list[tuple[str, Wallet]] = []
    app = make(
        reacting(
            Opened,
            lambda r: (
                Deposit(aggregate_id=r.aggregate_id, amount=1),
                Deposit(aggregate_id=r.aggregate_id, amount=2),
            ),
        ),
        seen=seen,
    )
    app.dispatch(Open(aggregate_id="W1"))
    assert seen == [
        ("Open", Wallet()),
        ("Deposit", Wallet(opened=True, balance=0)),
        ("Deposit", Wallet(opened=True, balance=1)),
    ]


def withdrawal_attempt(amount: int) -> incident.EventHandler:
    """On Deposited: try to withdraw ``amount`` from W1; on success deposit 1 to W2, on
    rejection open W3."""
    return reacting(
        Deposited,
        lambda r: (
            incident.Attempt(
                Withdraw(aggregate_id="W1", amount=amount),
                on_success=Deposit(aggregate_id="W2", amount=1),
                on_rejected=Open(aggregate_id="W3"),
            )
            if r.aggregate_id == "W1"
            else None
        ),
    )


def opened_wallets(app: incident.CommandHandler, *ids: str) -> None:
    for wallet_id in ids:
        app.dispatch(Open(aggregate_id=wallet_id))


def test_attempt_success_dispatches_on_success() -> None:
    """When the attempted command succeeds, on_success runs, caused by the command's event."""
    app = make(withdrawal_attempt(4))
    opened_wallets(app, "W1", "W2")
    root = app.dispatch(Deposit(aggregate_id="W1", amount=10), metadata={"user": "ada"})
    withdrawn = app.event_store.get("W1")[-1]
    assert withdrawn.data == Withdrawn(amount=4)
    assert withdrawn.metadata["causation_id"] == root[0].event_id
    bonus = app.event_store.get("W2")[-1]
    assert bonus.data == Deposited(amount=1)
    assert bonus.metadata["causation_id"] == withdrawn.event_id
    assert bonus.metadata["correlation_id"] == root[0].metadata["correlation_id"]
    assert app.event_store.get("W3") == []


def test_attempt_rejection_dispatches_on_rejected() -> None:
    """When the attempted command is rejected, on_rejected runs instead, caused by the
    original event, and the root dispatch still succeeds."""
    app = make(withdrawal_attempt(50))
    opened_wallets(app, "W1", "W2")
    root = app.dispatch(Deposit(aggregate_id="W1", amount=10))
    assert [r.event_type for r in app.event_store.get("W1")] == ["Opened", "Deposited"]
    assert [r.event_type for r in app.event_store.get("W2")] == ["Opened"]
    (opened,) = app.event_store.get("W3")
    assert opened.metadata["causation_id"] == root[0].event_id
    assert opened.metadata["correlation_id"] == root[0].metadata["correlation_id"]


def test_attempt_branches_may_be_tuples_and_attempts() -> None:
    """A branch holding a tuple runs its steps in order; a nested Attempt branches again."""
    app = make(
        reacting(
            Opened,
            lambda r: (
                incident.Attempt(
                    Deposit(aggregate_id=r.aggregate_id, amount=5),
                    on_success=(
                        Deposit(aggregate_id=r.aggregate_id, amount=1),
                        incident.Attempt(
                            Withdraw(aggregate_id=r.aggregate_id, amount=100),
                            on_rejected=Withdraw(aggregate_id=r.aggregate_id, amount=2),
                        ),
                    ),
                )
                if r.aggregate_id == "W1"
                else None
            ),
        )
    )
    app.dispatch(Open(aggregate_id="W1"))
    assert [r.data for r in app.event_store.get("W1")[1:]] == [
        Deposited(amount=5),
        Deposited(amount=1),
        Withdrawn(amount=2),
    ]


def test_a_rejected_plain_follow_up_is_logged_and_the_root_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A follow-up command (not an Attempt) that is rejected is a warning, not a failure."""
    app = make(rows(), reacting(Opened, lambda r: Withdraw(aggregate_id=r.aggregate_id, amount=9)))
    with caplog.at_level(logging.WARNING, logger="incident"):
        recorded = app.dispatch(Open(aggregate_id="W1"))
    assert [r.event_type for r in recorded] == ["Opened"]
    assert [r.event_type for r in log_of(app)] == ["Opened"]
    (record,) = [r for r in caplog.records if r.name == "incident"]
    assert record.levelno == logging.WARNING
    assert "Withdraw" in record.getMessage() and "no_money" in record.getMessage()
    assert "Opened" in record.getMessage()


def test_an_invalid_follow_up_command_fails_before_its_cause_commits() -> None:
    """A listener producing an invalid command is a bug: the causing events are not stored."""
    app = make(rows(), reacting(Opened, lambda r: Deposit(aggregate_id=r.aggregate_id, amount=0)))
    with pytest.raises(incident.InvalidCommand) as caught:
        app.dispatch(Open(aggregate_id="W1"))
    assert caught.value.field == "amount"
    assert log_of(app) == []
    assert app.projection_store.all(WalletRow) == []


def test_an_unrouted_follow_up_command_fails_before_its_cause_commits() -> None:
    """A listener producing a command nobody handles: RoutingError, and nothing stored."""
    app = make(
        reacting(
            Opened,
            lambda r: incident.Attempt(
                Deposit(aggregate_id=r.aggregate_id, amount=1),
                on_rejected=Unrouted(aggregate_id=r.aggregate_id),
            ),
        )
    )
    with pytest.raises(incident.RoutingError, match="Unrouted"):
        app.dispatch(Open(aggregate_id="W1"))
    assert log_of(app) == []


def test_metadata_that_cannot_be_stored_is_refused_and_nothing_stored(
    app: incident.CommandHandler,
) -> None:
    """Metadata must be JSON on every store; memory refuses what a database could not hold."""
    with pytest.raises(incident.IncidentError, match="JSON"):
        app.dispatch(Open(aggregate_id="W1"), metadata={"user": object()})
    assert log_of(app) == []
    assert app.projection_store.all(WalletRow) == []


class ProjectsTwice:
    """Wraps a store that runs the inline handlers twice, as a store retrying a transaction may."""

    def __init__(self, inner: MemoryEventStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit(self, request: AppendRequest, *, project: Any, **kw: Any) -> Committed:
        def twice(recorded: list[incident.Recorded[Any]]) -> Any:
            project(recorded)
            return project(recorded)

        return self.inner.commit(request, project=twice, **kw)


def test_follow_ups_are_not_duplicated_when_a_store_reruns_the_handlers() -> None:
    """Inline handlers may run more than once per append; their follow-ups run once."""
    store = ProjectsTwice(MemoryEventStore())
    app = incident.CommandHandler(
        store,  # type: ignore[arg-type]
        aggregates=[wallet_aggregate()],
        event_handlers=[
            rows(),
            reacting(Opened, lambda r: Deposit(aggregate_id=r.aggregate_id, amount=3)),
        ],
    )
    app.dispatch(Open(aggregate_id="W1"))
    assert [r.event_type for r in app.event_store.get("W1")] == ["Opened", "Deposited"]
    assert app.projection_store.get(WalletRow, "W1") == WalletRow(
        aggregate_id="W1", balance=3, version=2
    )


def test_a_read_model_that_cannot_be_stored_takes_its_events_with_it(store_url: str) -> None:
    """An inline listener's row holding what its type does not allow (a str in an int
    field: a struct does not check its fields when built) fails the dispatch with
    Unstorable naming the field; the command's events are not written either."""
    handler = incident.EventHandler("rows")

    @handler.listen(Opened, Deposited)
    def row(recorded: incident.Recorded[Any], state: Wallet) -> WalletRow:
        balance: Any = "many" if state.balance > 5 else state.balance
        return WalletRow(aggregate_id=recorded.aggregate_id, balance=balance, version=1)

    app = incident.CommandHandler(
        store_url, aggregates=[wallet_aggregate()], event_handlers=[handler]
    )
    try:
        app.dispatch(Open(aggregate_id="W"))
        with pytest.raises(incident.Unstorable, match=r"\$\.balance"):
            app.dispatch(Deposit(aggregate_id="W", amount=10))
        assert [r.event_type for r in app.event_store.get("W")] == ["Opened"]
        assert app.projection_store.all(WalletRow) == [
            WalletRow(aggregate_id="W", balance=0, version=1)
        ]
    finally:
        app.event_store.close()


def test_a_handler_refused_closes_the_stores_it_opened(postgres_url: str) -> None:
    """Refused in its constructor (two subscriptions of one name, found after the core
    was built), the handler leaves none of the stores it opened from the URL open: no
    pool, no session, no thread."""
    from incident.examples import bank

    schema = postgres_url.rsplit("schema=", 1)[1]

    def pool_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith(f"incident:{schema}")]

    with pytest.raises(incident.RegistrationError, match="Two subscriptions"):
        incident.CommandHandler(
            postgres_url,
            aggregates=[bank.bank_account, bank.transfer],
            subscriptions=[bank.bank_projections, bank.bank_projections],
        )
    deadline = time.monotonic() + 10
    while pool_threads():
        assert time.monotonic() < deadline, pool_threads()
        time.sleep(0.01)
