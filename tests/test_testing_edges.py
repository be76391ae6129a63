"""incident.testing at its edges: helpers that must fail when the thing they check is
wrong (specs, strategies, the store contract run on deliberately broken stores)."""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.stateful import run_state_machine_as_test
from msgspec.structs import replace

import incident
from incident.examples.bank import AccountOpened, DepositMoney, MoneyDeposited, bank_account
from incident.messages import ANY, Recorded
from incident.stores import MemoryEventStore, MemoryProjectionStore
from incident.testing import (
    ScenarioFailed,
    aggregate_machine,
    commands,
    diff_events,
    invalid_commands,
)
from incident.testing import given as given_events
from incident.testing.asynchronous import EventLoopThread, Pulled
from incident.testing.contract import EventStoreContract, ProjectionStoreContract, StoreFixtures
from incident.testing.contract.event_store import Everything

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
opened = given_events(bank_account, AccountOpened(account_number="A1"))
deposit = DepositMoney(aggregate_id="A1", amount=10)


# -- specs compare events exactly -----------------------------------------------------------


@pytest.mark.parametrize(
    "expected",
    [MoneyDeposited(amount=10.0), MoneyDeposited(amount=True)],  # type: ignore[arg-type]
    ids=["float-for-int", "bool-for-int"],
)
def test_then_fails_on_an_event_equal_only_loosely(expected: MoneyDeposited) -> None:
    """10.0 == 10 and True == 1 in Python, but an event holding them is another event (a
    store refuses a float in an int field): then() fails, and the diff names the field."""
    outcome = opened.when(deposit)
    with pytest.raises(ScenarioFailed) as caught:
        outcome.then(expected)
    assert f"amount: expected {expected.amount!r}, got 10" in str(caught.value)


class Stamped(incident.Event):
    at: dt.datetime
    ratio: float = 0.0
    price: decimal.Decimal = decimal.Decimal(0)


class Stamp(incident.Command):
    aggregate_id: str
    stamped: Stamped


stamper = incident.Aggregate("stamper", initial=0)


@stamper.execute
def stamp(state: int, command: Stamp) -> Stamped:
    return command.stamped


@stamper.apply
def stamped(state: int, event: Stamped) -> int:
    return state + 1


NOON = dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "decided, expected",
    [
        (Stamped(at=NOON), Stamped(at=NOON.astimezone(dt.timezone(dt.timedelta(hours=1))))),
        (Stamped(at=NOON, ratio=0.0), Stamped(at=NOON, ratio=-0.0)),
        (
            Stamped(at=NOON, price=decimal.Decimal("1.0")),
            Stamped(at=NOON, price=decimal.Decimal("1.00")),
        ),
    ],
    ids=["offset", "sign-of-zero", "decimal-places"],
)
def test_then_fails_on_another_offset_sign_of_zero_or_decimal_precision(
    decided: Stamped, expected: Stamped
) -> None:
    """The same instant at another offset, -0.0 for 0.0, 1.00 for 1.0: a store keeps each
    as written (docs/storable.md), so a spec tells them apart."""
    assert decided == expected  # what a loose comparison accepts
    outcome = given_events(stamper).when(Stamp(aggregate_id="s", stamped=decided))
    with pytest.raises(ScenarioFailed):
        outcome.then(expected)
    assert outcome.then(decided) == 1  # and the very same event still passes


def test_diff_events_names_a_field_equal_only_loosely() -> None:
    assert "amount: expected 1.0, got 1" in diff_events(
        [MoneyDeposited(amount=1.0)],  # type: ignore[arg-type]
        [MoneyDeposited(amount=1)],
    )


# -- strategies draw what validate_command accepts --------------------------------------------


class Patterned(incident.Command):
    aggregate_id: Annotated[str, msgspec.Meta(pattern="^a")]
    code: Annotated[str, msgspec.Meta(pattern="[0-9]", max_length=40)]


class Node(msgspec.Struct):
    label: str
    children: list[Node] = []


class Plant(incident.Command):
    aggregate_id: str
    tree: Node


@pytest.mark.parametrize("command_type", [Patterned, Plant], ids=["pattern", "recursive"])
def test_generated_commands_pass_validation(command_type: type[incident.Command]) -> None:
    """A pattern's strings hold no NUL (which validate_command refuses), and a struct
    that nests itself is generated rather than recursing without end."""

    # trees of Nodes are slow to draw; NULs in patterns are rare, so drawn many times
    @settings(FAST, max_examples=30 if command_type is Plant else 300)
    @given(commands(command_type))
    def check(command: incident.Command) -> None:
        assert incident.validate_command(command) == command

    check()


# -- the store contract fails on broken stores ---------------------------------------------------


class BrokenStore(MemoryEventStore):
    """A memory store broken in one chosen way."""

    def __init__(self, broken: str, mangle: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self.broken, self.mangle = broken, mangle

    def append(  # type: ignore[override]
        self, aggregate_id: str, events: Any, *, expected_version: object, **kwargs: Any
    ) -> list[Recorded[Any]]:
        if self.broken == "ignores expected_version":
            expected_version = ANY
        return super().append(aggregate_id, events, expected_version=expected_version, **kwargs)

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        records = list(super().read_all(after, limit))
        if self.broken == "read_all skips an event" and len(records) > 2:
            del records[1]
        return iter(records)

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        records = super().get(aggregate_id, after=after)
        if self.broken == "get mangles" and self.mangle is not None:
            return [self.mangle(record) for record in records]
        return records


def _flag_as_int(record: Recorded[Any]) -> Recorded[Any]:
    if isinstance(record.data, Everything):
        return replace(record, data=replace(record.data, flag=int(record.data.flag)))
    return record


def _offset_to_utc(record: Recorded[Any]) -> Recorded[Any]:
    if isinstance(record.data, Everything):
        at = record.data.nested.at
        moved = at.astimezone(dt.UTC) if at.tzinfo is not None else at
        return replace(
            record, data=replace(record.data, nested=replace(record.data.nested, at=moved))
        )
    return record


def _ints_as_floats(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {key: _ints_as_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_ints_as_floats(item) for item in value]
    return value


def _metadata_ints_as_floats(record: Recorded[Any]) -> Recorded[Any]:
    return replace(record, metadata=_ints_as_floats(record.metadata))


def _metadata_bools_as_ints(record: Recorded[Any]) -> Recorded[Any]:
    metadata = {k: int(v) if isinstance(v, bool) else v for k, v in record.metadata.items()}
    return replace(record, metadata=metadata)


@pytest.mark.parametrize(
    "broken, test",
    [
        ("ignores expected_version", "test_stale_expected_version_raises_and_writes_nothing"),
        ("read_all skips an event", "test_read_all_is_gapless_in_commit_order_and_pages"),
    ],
)
def test_the_event_store_contract_fails_on_a_broken_store(broken: str, test: str) -> None:
    store = BrokenStore(broken)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        getattr(EventStoreContract(), test)(store)


@pytest.mark.parametrize(
    "mangle, test",
    [
        (_flag_as_int, "test_whatever_a_store_accepts_comes_back_equal"),
        (_offset_to_utc, "test_whatever_a_store_accepts_comes_back_equal"),
        (_metadata_ints_as_floats, "test_plain_metadata_comes_back_unchanged"),
        (_metadata_bools_as_ints, "test_plain_metadata_comes_back_unchanged"),
    ],
    ids=["bool-as-int", "offset-to-utc", "metadata-int-as-float", "metadata-bool-as-int"],
)
def test_the_contract_fails_on_a_store_giving_back_values_equal_only_loosely(
    mangle: Callable[[Any], Any], test: str
) -> None:
    """A store that reads True back as 1, an offset as UTC, 2**70 as a float: all compare
    equal with ==, none is what was appended, so the contract fails it."""
    store = BrokenStore("get mangles", mangle)
    with pytest.raises(AssertionError):
        getattr(EventStoreContract(), test)(store)


def test_the_contract_passes_the_memory_store_as_it_is() -> None:
    """The broken stores above fail for their breakage alone: unbroken, all pass."""
    for test in (
        "test_stale_expected_version_raises_and_writes_nothing",
        "test_read_all_is_gapless_in_commit_order_and_pages",
        "test_whatever_a_store_accepts_comes_back_equal",
        "test_plain_metadata_comes_back_unchanged",
    ):
        getattr(EventStoreContract(), test)(BrokenStore("nothing"))


class PositionAsVersionStore(MemoryEventStore):
    """A store whose version() is the log position of the stream's last event."""

    def version(self, aggregate_id: str) -> int:
        return max((r.position for r in super().get(aggregate_id)), default=0)


def test_the_contract_fails_on_a_version_that_gives_the_position() -> None:
    """Position and version are one number while a test has one stream: a version()
    that gave the position passed every test."""
    with pytest.raises(AssertionError):
        EventStoreContract().test_read_all_is_gapless_in_commit_order_and_pages(
            PositionAsVersionStore()
        )


# -- the machine fails an aggregate that decides what no store keeps ---------------------------


class Halve(incident.Command):
    aggregate_id: str
    n: Annotated[int, msgspec.Meta(ge=0, le=100)]


class Halved(incident.Event):
    n: int


halver = incident.Aggregate("halver", initial=0)


@halver.execute
def halve(total: int, command: Halve) -> Halved:
    return Halved(n=command.n / 2)  # type: ignore[arg-type]  # a float in an int field


@halver.apply
def halved(total: int, event: Halved) -> int:
    return total + 1


def test_the_machine_fails_an_event_no_store_would_keep() -> None:
    """An event holding a float in an int field folds fine, but every store refuses it at
    the append (Unstorable): the machine fails the run, naming the field."""
    machine = aggregate_machine(halver, settings=settings(max_examples=20, database=None))
    with pytest.raises(AssertionError, match="no store would keep") as caught:
        run_state_machine_as_test(machine)
    assert "Halved" in str(caught.value)


def test_then_fails_when_the_decided_event_is_one_no_store_keeps() -> None:
    """Expecting the very event decided is no proof: Halved(n=1.0) equals itself, yet the
    append of it is refused, so then() fails, naming why."""
    outcome = given_events(halver).when(Halve(aggregate_id="h", n=2))
    with pytest.raises(ScenarioFailed, match="no store would keep") as caught:
        outcome.then(Halved(n=1.0))  # type: ignore[arg-type]
    assert "Expected `int`, got `float`" in str(caught.value)


class LooseProjections(MemoryProjectionStore):
    """A projection store that reads ints back as floats and bools as ints."""

    def get(self, projection_type: type[Any], key: str) -> Any:
        return _loosened(super().get(projection_type, key))

    def all(self, projection_type: type[Any]) -> list[Any]:
        return [_loosened(row) for row in super().all(projection_type)]


def _loosened(row: Any) -> Any:
    if row is None:
        return None
    changes = {
        name: float(value) if type(value) is int else int(value)
        for name in row.__struct_fields__
        if type(value := getattr(row, name)) in (int, bool) and name != "version"
    }
    return replace(row, **changes)


@pytest.mark.parametrize(
    "test",
    ["test_projection_upsert_get_all", "test_a_value_not_of_its_declared_type_is_refused"],
)
def test_the_projection_contract_fails_on_columns_read_back_of_another_type(test: str) -> None:
    """balance 10.0 for 10, ok 1 for True: equal with ==, and not what was projected."""
    with pytest.raises(AssertionError):
        getattr(ProjectionStoreContract(), test)(LooseProjections())
    getattr(ProjectionStoreContract(), test)(MemoryProjectionStore())  # unbroken, it passes


# -- smaller guarantees -------------------------------------------------------------------------


class Scaled(incident.Command):
    aggregate_id: str
    step: Annotated[float, msgspec.Meta(multiple_of=0.1)]


def test_invalid_commands_of_a_float_step_are_all_invalid() -> None:
    """x % 0.1 is rarely 0 for multiples of 0.1 (0.3 % 0.1 is 0.09999...), so some drawn
    "violations" are values msgspec accepts: they are dropped, never handed out."""

    @FAST
    @given(invalid_commands(Scaled))
    def check(command: Scaled) -> None:
        with pytest.raises(incident.InvalidCommand):
            incident.validate_command(command)

    check()


def test_a_contract_without_make_event_store_says_what_to_define() -> None:
    class TestMine(StoreFixtures):
        pass

    with pytest.raises(NotImplementedError, match=r"TestMine.*define make_event_store"):
        TestMine().make_event_store()


class Countdown:
    """An async iterator without aclose(): a view's close() leaves it be."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> Countdown:
        return self

    async def __anext__(self) -> int:
        if self.n == 0:
            raise StopAsyncIteration
        self.n -= 1
        return self.n


def test_a_pulled_iterator_without_aclose_closes_quietly() -> None:
    with EventLoopThread() as loop:
        pulled = Pulled(Countdown(3), loop)
        assert next(pulled) == 2
        pulled.close()
        assert list(pulled) == [1, 0]


class Note(incident.Command):
    aggregate_id: str  # no constraint: "" and 300 characters pass validate_command
    text: str = ""


class Noted(incident.Event):
    text: str


notes = incident.Aggregate("notes", initial=0)


@notes.execute
def note(count: int, command: Note) -> Noted:
    return Noted(text=command.text)


@notes.apply
def noted(count: int, event: Noted) -> int:
    return count + 1


def test_generated_commands_have_ids_a_store_keeps() -> None:
    """commands() feeds a dispatch: an id no store keeps ("" or past 255 characters)
    would fail it with Unstorable although the command passed validate_command."""
    handler = incident.CommandHandler(incident.open_event_store("memory://"), aggregates=[notes])

    @FAST
    @given(commands(notes))
    def check(command: Note) -> None:
        assert 0 < len(command.aggregate_id) <= 255
        handler.dispatch(command)

    try:
        check()
    finally:
        handler.event_store.close()


def test_given_commands_fail_on_an_event_no_store_keeps() -> None:
    """A history built by commands is what the store would hold: one that decides an
    event the append would refuse fails the spec's setup."""
    with pytest.raises(ScenarioFailed, match="a given command decided an event no store keeps"):
        given_events(halver).given_commands(Halve(aggregate_id="h", n=2))
    assert opened.given_commands(deposit).state.balance == 10  # a kept one is history
