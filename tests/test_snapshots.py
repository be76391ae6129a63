"""Snapshots and the state cache: fewer events read, the same state, never a stale one."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

import incident
from incident.examples import bank
from incident.snapshots import Snapshot, code_key, first_difference, take_snapshot


class CountingReads:
    """Wraps an event store and records the ``after`` of every stream read."""

    def __init__(self, store: incident.EventStore) -> None:
        self._store = store
        self.reads: list[int] = []

    def get(self, aggregate_id: str, *, after: int = 0) -> list[incident.Recorded[Any]]:
        self.reads.append(after)
        return self._store.get(aggregate_id, after=after)

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[incident.Event]:
        self.reads.append(after)  # the command handler folds bare events
        return self._store.events(aggregate_id, after=after)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[incident.EventStore, incident.ProjectionStore]]:
    events, projections = incident.open_stores(store_url)
    yield events, projections
    events.close()


def deposits(app: incident.CommandHandler, count: int) -> None:
    for _ in range(count):
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=1))


def test_a_cold_start_reads_only_events_after_the_snapshot(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    events, projections = stores
    writer = bank.build(events, projections, snapshot_every=5)
    writer.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(writer, 11)  # versions 1..12: snapshots at 5 and 10
    snapshot = projections.get(Snapshot, "bank_account/A")
    assert snapshot is not None and snapshot.version == 10

    counting = CountingReads(events)
    reader = bank.build(counting, projections, snapshot_every=5)  # type: ignore[arg-type]
    assert reader.state("bank_account", "A").balance == 11
    assert counting.reads == [10]


def test_a_snapshot_from_other_code_is_ignored(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    events, projections = stores
    writer = bank.build(events, projections)
    writer.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(writer, 3)
    forged = take_snapshot(
        bank.bank_account, "A", bank.AccountState(account_number="A", balance=999), 4, "old-code"
    )
    assert forged is not None
    projections.project(forged)

    counting = CountingReads(events)
    reader = bank.build(counting, projections, snapshot_every=2)  # type: ignore[arg-type]
    assert reader.state("bank_account", "A").balance == 3
    assert counting.reads == [0]


def test_code_key_changes_when_an_apply_function_changes() -> None:
    before = code_key(bank.bank_account)
    other = incident.Aggregate("bank_account", initial=bank.AccountState())

    @other.apply
    def deposited(state: bank.AccountState, event: bank.MoneyDeposited) -> bank.AccountState:
        return state  # a different rule

    assert code_key(other) != before
    assert code_key(bank.bank_account) == before


def test_a_warm_cache_decides_without_reading(store_url: str) -> None:
    events = incident.open_event_store(store_url)
    counting = CountingReads(events)
    app = bank.build(counting, events.projections())  # type: ignore[arg-type]
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(app, 3)
    assert counting.reads == [0]  # only the first command, on an empty stream
    assert app.state("bank_account", "A").balance == 3  # state() always reads what is new
    assert counting.reads == [0, 4]
    events.close()


def test_a_cold_cache_reads_only_new_events(store_url: str) -> None:
    events = incident.open_event_store(store_url)
    counting = CountingReads(events)
    app = bank.build(counting, events.projections(), cache_size=0)  # type: ignore[arg-type]
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(app, 3)
    assert counting.reads == [0, 0, 0, 0]
    events.close()


def test_a_rejection_on_a_stale_cache_is_checked_against_the_store(store_url: str) -> None:
    """The cache says the balance is 0, another writer deposited: the withdrawal passes."""
    events = incident.open_event_store(store_url)
    first = bank.build(events)
    second = bank.build(events)
    first.dispatch(bank.OpenAccount(aggregate_id="A"))
    second.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
    [withdrawn] = first.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=10))
    assert withdrawn.version == 3
    with pytest.raises(incident.Rejected, match="no_enough_balance"):
        first.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=1))
    assert [r.event_type for r in events.get("A")] == [
        "AccountOpened",
        "MoneyDeposited",
        "MoneyWithdrawn",
    ]
    events.close()


def test_a_stale_cache_is_caught_by_the_expected_version(store_url: str) -> None:
    """Another writer appends behind the cache's back: the next command still sees it."""
    events = incident.open_event_store(store_url)
    first = bank.build(events)
    second = bank.build(events)
    first.dispatch(bank.OpenAccount(aggregate_id="A"))
    first.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
    second.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=10))
    with pytest.raises(incident.Rejected, match="no_enough_balance"):
        first.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=10))
    assert first.state("bank_account", "A").balance == 0
    events.close()


# -- what a snapshot depends on --------------------------------------------------


class Deposit(incident.Command):
    aggregate_id: str
    amount: int


class Deposited(incident.Event):
    amount: int


LEDGER = """
import incident

ledger = incident.Aggregate("ledger", initial=0)


def credited(amount: int) -> int:
    return {credited}


@ledger.execute(Deposit)
def deposit(total: int, command: Deposit) -> Deposited:
    return Deposited(amount=command.amount)


@ledger.apply(Deposited)
def deposited(total: int, event: Deposited) -> int:
    return total + credited(event.amount)
"""


def ledger_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: str, credited: str
) -> types.ModuleType:
    """One release of a module named ``ledger``, as a deploy would import it: the same
    name, the same apply function, the helper it calls as given; the events are this
    test module's, shared by every release as they are by the stored data."""
    path = tmp_path / release / "ledger.py"
    path.parent.mkdir()
    path.write_text(LEDGER.format(credited=credited))
    spec = importlib.util.spec_from_file_location("ledger", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.Deposit, module.Deposited = Deposit, Deposited  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ledger", module)
    spec.loader.exec_module(module)
    return module


def test_a_changed_helper_makes_the_old_snapshot_stale(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release that changes a helper the apply function calls (not the apply function
    itself) has another key, so after the restart the old snapshot is ignored and the
    state is the fold of the stream under the new code: 250, not the old 70."""
    events, projections = stores
    old = ledger_release(tmp_path, monkeypatch, "v1", "amount - 36")
    writer = incident.CommandHandler(events, projections, aggregates=[old.ledger], snapshot_every=5)
    for _ in range(5):
        writer.dispatch(Deposit(aggregate_id="L", amount=50))
    snapshot = projections.get(Snapshot, "ledger/L")
    assert snapshot is not None and (snapshot.version, snapshot.state) == (5, "70")

    new = ledger_release(tmp_path, monkeypatch, "v2", "amount")
    assert code_key(new.ledger) != code_key(old.ledger)
    reader = incident.CommandHandler(events, projections, aggregates=[new.ledger], snapshot_every=5)
    assert reader.state("ledger", "L") == new.ledger.fold(events.get("L")) == 250


NESTED_CODE = """
import incident


class Scored(incident.Event):
    points: tuple[int, ...]


board = incident.Aggregate("board", initial=0)


def bonus(points: int) -> int:
    return points * 2


@board.apply(Scored)
def scored(total: int, event: Scored) -> int:
    double = lambda points: bonus(points)  # noqa: E731
    lucky = sum(p for p in event.points if p in {3, 5, 7})
    doubled = [double(p) for p in event.points]
    return total + lucky + sum(doubled) + len({p: p for p in event.points})
"""

PRINT_KEY = """
import sys
sys.path.insert(0, sys.argv[1])
import nested_code
from incident.snapshots import code_key
if sys.argv[2] == "warm":  # run the apply function first: the key is of the code, not its state
    nested_code.board.fold([nested_code.Scored(points=(3, 4, 5))] * 5000)
print(code_key(nested_code.board))
"""


def test_the_key_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Separate processes (other hash seeds, other addresses, one of them having run the
    apply function thousands of times) compute the same key for an apply function that
    holds a lambda, a generator expression, comprehensions and a set constant."""
    (tmp_path / "nested_code.py").write_text(NESTED_CODE)
    keys = set()
    for seed, warm in [("0", "cold"), ("1", "warm"), ("12345", "cold")]:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", PRINT_KEY, str(tmp_path), warm],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        keys.add(done.stdout.strip())
    assert len(keys) == 1 and len(next(iter(keys))) == 16


def test_the_key_follows_what_decides_the_state() -> None:
    """The snapshot version, an upcaster and an event type's fields each change the
    key; building the same aggregate again does not."""

    def build(
        version: int = 1, upcast: bool = False, event: type[incident.Event] = Deposited
    ) -> str:
        aggregate = incident.Aggregate("keyed", initial=0, snapshot_version=version)

        @aggregate.apply(event)
        def applied(total: int, event: Any) -> int:
            return total + 1

        if upcast:

            @aggregate.upcast("Deposited", 1)
            def renamed(payload: dict[str, Any]) -> dict[str, Any]:
                return payload

        return code_key(aggregate)

    class Wider(incident.Event, tag="Deposited"):
        amount: int
        note: str = ""

    first = build()
    assert build() == first
    assert len({first, build(version=2), build(upcast=True), build(event=Wider)}) == 4


# -- the state keeps its types -----------------------------------------------------------


class Enter(incident.Command):
    aggregate_id: str
    line: int
    quantity: int
    price: Decimal


class Entered(incident.Event):
    line: int
    quantity: int
    price: Decimal


order = incident.Aggregate("order", initial={}, state_type=dict[int, tuple[int, Decimal]])


@order.execute
def enter(lines: dict[int, tuple[int, Decimal]], command: Enter) -> Entered:
    return Entered(line=command.line, quantity=command.quantity, price=command.price)


@order.apply
def entered(
    lines: dict[int, tuple[int, Decimal]], event: Entered
) -> dict[int, tuple[int, Decimal]]:
    return {**lines, event.line: (event.quantity, event.price)}


def test_a_snapshot_keeps_int_keys_decimals_and_tuples(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A dict state with int keys and (int, Decimal) tuple values comes back from a
    snapshot as it was, not as JSON's {'1': [2, '1.5']}."""
    events, projections = stores
    writer = incident.CommandHandler(events, projections, aggregates=[order], snapshot_every=4)
    for line, price in enumerate(["1.5", "0.10", "2", "7.25"], 1):
        writer.dispatch(Enter(aggregate_id="O", line=line, quantity=2, price=Decimal(price)))

    counting = CountingReads(events)
    reader = incident.CommandHandler(
        counting,  # type: ignore[arg-type]
        projections,
        aggregates=[order],
        snapshot_every=4,
    )
    state = reader.state("order", "O")
    assert counting.reads == [4]  # from the snapshot
    assert state[1] == (2, Decimal("1.5"))
    assert first_difference(state, order.fold(events.get("O"))) is None


class Opaque:
    """A state msgspec can neither encode nor decode."""


@pytest.mark.parametrize(
    ("initial", "state_type", "advice"),
    [
        ({}, None, "declare state_type=dict[K, V]"),
        ({1: Decimal("1")}, None, "declare state_type=dict[int, Decimal]"),
        ([], None, "list[int]"),
        ({}, dict[int, Any], "state's values open"),
        (Opaque(), None, "msgspec does not know it"),
        (object(), Any, "leaves state open"),
        ((1, 2), tuple[int, int], None),  # fine: declared
        ({}, dict[int, Decimal], None),
    ],
)
def test_a_state_type_that_cannot_round_trip_is_refused(
    initial: Any, state_type: Any, advice: str | None
) -> None:
    """With snapshot_every, a state type that would not read back as it went in (a bare
    container, Any, a class msgspec cannot decode) is refused when the command handler
    is built, saying what to declare; without snapshot_every nothing is. (None is never
    a state: the Aggregate refuses it.)"""
    loose = incident.Aggregate("loose", initial=initial, state_type=state_type)

    @loose.apply
    def deposited(state: Any, event: Deposited) -> Any:
        return state

    incident.CommandHandler(aggregates=[loose])  # no snapshots: no question asked
    if advice is None:
        incident.CommandHandler(aggregates=[loose], snapshot_every=10)
        return
    with pytest.raises(incident.RegistrationError, match="loose: ") as refused:
        incident.CommandHandler(aggregates=[loose], snapshot_every=10)
    assert advice in str(refused.value)


def test_a_state_that_would_not_read_back_is_not_snapshotted() -> None:
    """A state holding a list where its type says tuple would read back changed: no
    snapshot is taken of it (the command still succeeds)."""
    assert take_snapshot(order, "O", {1: [2, Decimal("1")]}, 4, code_key(order)) is None
    taken = take_snapshot(order, "O", {1: (2, Decimal("1"))}, 4, code_key(order))
    assert taken is not None and taken.state == '{"1":[2,"1"]}'


# -- verification ----------------------------------------------------------------------


def test_verification_reports_the_first_difference(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A snapshot made by this very code but holding another state (a helper the key
    cannot see, a bug) is caught by verification: SnapshotMismatch names the field, the
    snapshot's value and the fold's; an honest snapshot passes and says its version."""
    events, projections = stores
    writer = bank.build(events, projections, snapshot_every=2)
    writer.dispatch(bank.OpenAccount(aggregate_id="A"))
    deposits(writer, 3)
    assert writer.verify_snapshot("bank_account", "A") == 4
    assert writer.verify_snapshot("bank_account", "nobody") is None

    wrong = bank.AccountState(account_number="A", balance=999)
    forged = take_snapshot(bank.bank_account, "A", wrong, 4, code_key(bank.bank_account))
    assert forged is not None
    projections.project(forged)
    with pytest.raises(incident.SnapshotMismatch) as mismatch:
        writer.verify_snapshot("bank_account", "A")
    assert (mismatch.value.path, mismatch.value.stored, mismatch.value.folded) == (
        "state.balance",
        999,
        3,
    )
    assert "at state.balance, the snapshot has 999 and the fold gives 3" in str(mismatch.value)

    verifying = bank.build(events, projections, snapshot_every=2, verify_snapshots=True)
    with pytest.raises(incident.SnapshotMismatch, match=r"state\.balance"):
        verifying.state("bank_account", "A")
    trusting = bank.build(events, projections, snapshot_every=2)
    assert trusting.state("bank_account", "A").balance == 999  # what verification is for


# -- a cold start is a fold -----------------------------------------------------------------


class Owner(msgspec.Struct, frozen=True):
    name: str
    since: dt.datetime


class Book(msgspec.Struct, frozen=True):
    lines: dict[int, tuple[int, Decimal]] = {}
    tags: frozenset[str] = frozenset()
    seen: set[int] = msgspec.field(default_factory=set)
    owner: Owner | None = None


class Note(incident.Command):
    aggregate_id: str
    line: int
    price: Decimal
    tag: str
    at: dt.datetime


class Noted(incident.Event):
    line: int
    price: Decimal
    tag: str
    at: dt.datetime


book = incident.Aggregate("book", initial=Book())


@book.execute
def note(state: Book, command: Note) -> Noted:
    return Noted(line=command.line, price=command.price, tag=command.tag, at=command.at)


@book.apply
def noted(state: Book, event: Noted) -> Book:
    quantity = state.lines.get(event.line, (0, Decimal(0)))[0] + 1
    return Book(
        lines={**state.lines, event.line: (quantity, event.price)},
        tags=state.tags | {event.tag},
        seen=state.seen | {event.line},
        owner=state.owner or Owner(name=event.tag, since=event.at),
    )


def test_a_cold_start_with_or_without_snapshots_is_the_fold(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """Sets, frozensets, a nested Struct, datetimes, Decimals and int keys: a cold start
    from a snapshot, one without snapshots and the fold of the stream are the same state,
    with the same types, at every version (verification on, so a difference would say
    where)."""
    events, projections = stores
    writer = incident.CommandHandler(events, projections, aggregates=[book], snapshot_every=3)
    start = dt.datetime(2024, 5, 1, 9, 30, tzinfo=dt.UTC)
    for n in range(1, 11):
        at = start + dt.timedelta(minutes=n)
        writer.dispatch(
            Note(aggregate_id="B", line=n % 4, price=Decimal(n) / 8, tag=f"t{n % 3}", at=at)
        )
        folded = book.fold(events.get("B"))
        with_snapshots = incident.CommandHandler(
            events, projections, aggregates=[book], snapshot_every=3, verify_snapshots=True
        )
        without = incident.CommandHandler(events, projections, aggregates=[book])
        assert first_difference(with_snapshots.state("book", "B"), folded) is None
        assert first_difference(without.state("book", "B"), folded) is None
    snapshot = projections.get(Snapshot, "book/B")
    assert snapshot is not None and snapshot.version == 9


def test_only_globals_the_code_reads_enter_the_key() -> None:
    """A module constant an apply function reads is part of the key; a global that only
    shares its name with an attribute the function reads (``event.amount``) is not."""
    namespace: dict[str, Any] = {"incident": incident, "Deposited": Deposited, "RATE": 2}
    exec(
        "counted = incident.Aggregate('counted', initial=0)\n"
        "@counted.apply(Deposited)\n"
        "def deposited(total: int, event: Deposited) -> int:\n"
        "    return total + event.amount * RATE\n",
        namespace,
    )
    before = code_key(namespace["counted"])
    namespace["amount"] = 7  # a notebook's loop variable, say
    assert code_key(namespace["counted"]) == before
    namespace["RATE"] = 3
    assert code_key(namespace["counted"]) != before
