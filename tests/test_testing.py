"""incident.testing: specs, strategies derived from message types, the stateful machine."""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import re
import subprocess
import sys
from typing import Annotated, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from msgspec.structs import replace

import incident
from incident.examples.bank import (
    AccountOpened,
    DepositMoney,
    MoneyDeposited,
    MoneyWithdrawn,
    OpenAccount,
    WithdrawMoney,
    bank_account,
)
from incident.testing import (
    Scenario,
    ScenarioFailed,
    aggregate_machine,
    commands,
    diff_events,
    events,
    invalid_commands,
)
from incident.testing import given as given_events

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# no explain phase: it reruns a failing machine hundreds of times to annotate its steps
MACHINE = settings(
    max_examples=200,
    stateful_step_count=20,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
)

opened = given_events(bank_account, AccountOpened(account_number="A1"))


# -- given / when / then --------------------------------------------------------------------


def test_then_returns_the_state_after_the_decided_events() -> None:
    """then() passes when exactly the expected events are decided and returns the state."""
    state = opened.when(DepositMoney(aggregate_id="A1", amount=7)).then(MoneyDeposited(amount=7))
    assert state.balance == 7


def test_then_with_nothing_expects_no_events() -> None:
    """then() with no arguments fails when something was decided."""
    with pytest.raises(ScenarioFailed, match="differ"):
        opened.when(DepositMoney(aggregate_id="A1", amount=7)).then()


def test_a_wrong_event_shows_a_readable_diff() -> None:
    """The failure lists given and when, then a -/+ diff with the fields that differ."""
    history = opened.given(MoneyDeposited(amount=10))
    with pytest.raises(ScenarioFailed) as caught:
        history.when(WithdrawMoney(aggregate_id="A1", amount=4)).then(MoneyWithdrawn(amount=5))
    assert str(caught.value) == "\n".join(
        [
            "bank_account: the decided events differ from the expected ones.",
            "given",
            "  AccountOpened(account_number='A1')",
            "  MoneyDeposited(amount=10)",
            "when",
            "  WithdrawMoney(aggregate_id='A1', amount=4)",
            "then (- expected, + decided)",
            "  - MoneyWithdrawn(amount=5)",
            "  + MoneyWithdrawn(amount=4)",
            "      amount: expected 5, got 4",
        ]
    )


def test_a_rejection_where_events_were_expected_names_the_reason() -> None:
    """then() on a rejected command says so, with the reason and the expected events."""
    with pytest.raises(ScenarioFailed) as caught:
        opened.when(WithdrawMoney(aggregate_id="A1", amount=1)).then(MoneyWithdrawn(amount=1))
    message = str(caught.value)
    assert "expected 1 event (MoneyWithdrawn), but it was rejected with 'no_enough_balance'" in (
        message
    )
    assert message.endswith("expected\n  MoneyWithdrawn(amount=1)")


def test_then_rejected_checks_the_reason() -> None:
    """then_rejected() returns the Rejected, and fails on another reason or on events."""
    outcome = given_events(bank_account).when(DepositMoney(aggregate_id="A1", amount=1))
    assert outcome.then_rejected("account_not_found").reason == "account_not_found"
    assert outcome.then_rejected().reason == "account_not_found"
    with pytest.raises(ScenarioFailed, match="rejected with 'account_not_found'"):
        outcome.then_rejected("no_enough_balance")
    with pytest.raises(ScenarioFailed, match=r"but it decided 1 event \(MoneyDeposited\)"):
        opened.when(DepositMoney(aggregate_id="A1", amount=1)).then_rejected("x")


def test_then_invalid_checks_validation_not_rules() -> None:
    """then_invalid() holds for a command that fails validate_command, naming the field."""
    bad = opened.when(DepositMoney(aggregate_id="A1", amount=-3))
    assert bad.then_invalid().field == "amount"
    assert bad.then_invalid("amount").command_type == "DepositMoney"
    with pytest.raises(ScenarioFailed, match="expected an invalid 'aggregate_id'"):
        bad.then_invalid("aggregate_id")
    with pytest.raises(ScenarioFailed, match="the command is invalid"):
        bad.then(MoneyDeposited(amount=-3))
    with pytest.raises(ScenarioFailed, match="valid and was rejected"):
        given_events(bank_account).when(DepositMoney(aggregate_id="A1", amount=1)).then_invalid()
    with pytest.raises(ScenarioFailed, match="valid and decided events"):
        opened.when(DepositMoney(aggregate_id="A1", amount=1)).then_invalid()


def test_an_invalid_command_is_never_decided() -> None:
    """when() validates first, as dispatch does: a wrong type never reaches execute."""
    outcome = opened.when(DepositMoney(aggregate_id="A1", amount="10"))  # type: ignore[arg-type]
    assert isinstance(outcome.error, incident.InvalidCommand)
    assert outcome.events == ()


def test_scenarios_are_immutable_and_share_histories() -> None:
    """given() returns a new scenario; the original keeps its history."""
    richer = opened.given(MoneyDeposited(amount=3))
    assert len(opened.history) == 1
    assert richer.state.balance == 3
    assert opened.state.balance == 0
    assert repr(richer) == "Scenario('bank_account', 2 events)"


def test_given_commands_builds_history_from_commands() -> None:
    """given_commands() runs commands to set the scene, and refuses a refused one."""
    scene = Scenario(bank_account).given_commands(
        OpenAccount(aggregate_id="A1"), DepositMoney(aggregate_id="A1", amount=5)
    )
    assert scene.history == (AccountOpened(account_number="A1"), MoneyDeposited(amount=5))
    with pytest.raises(ScenarioFailed, match="a given command was refused"):
        Scenario(bank_account).given_commands(DepositMoney(aggregate_id="A1", amount=5))


def test_given_takes_only_events() -> None:
    with pytest.raises(TypeError, match="given\\(\\) takes events"):
        opened.given(OpenAccount(aggregate_id="A1"))  # type: ignore[arg-type]


def test_long_histories_are_summarised_in_failures() -> None:
    """Only the latest given events are listed; the rest are counted."""
    long = opened.given(*[MoneyDeposited(amount=1)] * 30)
    with pytest.raises(ScenarioFailed) as caught:
        long.when(DepositMoney(aggregate_id="A1", amount=1)).then()
    assert "... 19 earlier events" in str(caught.value)
    assert str(caught.value).count("MoneyDeposited(amount=1)") == 12 + 1


def test_diff_events_pairs_by_type_and_shows_missing_and_extra() -> None:
    """Events missing on one side get - or +; same-type pairs show changed fields."""
    text = diff_events(
        [AccountOpened(account_number="A1"), MoneyDeposited(amount=1)],
        [MoneyWithdrawn(amount=2), MoneyDeposited(amount=1), MoneyDeposited(amount=9)],
    )
    assert text.splitlines() == [
        "  - AccountOpened(account_number='A1')",
        "  + MoneyWithdrawn(amount=2)",
        "    MoneyDeposited(amount=1)",
        "  + MoneyDeposited(amount=9)",
    ]
    assert diff_events([], []) == "    (no events on either side)"


# -- strategies -------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(msgspec.Struct, frozen=True):
    city: Annotated[str, msgspec.Meta(min_length=2, max_length=20)]


class Everything(incident.Command):
    """A command using every constraint the strategies know about."""

    aggregate_id: Annotated[str, msgspec.Meta(pattern="^[A-Z]{2}[0-9]{2}$")]
    positive: Annotated[int, msgspec.Meta(gt=0)]
    bounded: Annotated[int, msgspec.Meta(ge=-5, le=5)]
    below: Annotated[int, msgspec.Meta(lt=100)]
    tens: Annotated[int, msgspec.Meta(multiple_of=10)]
    ratio: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=8)]
    tags: Annotated[list[str], msgspec.Meta(max_length=3)]
    scores: dict[str, int]
    kind: Literal["a", "b"]
    colour: Colour
    note: str | None
    when: dt.datetime
    address: Address
    flag: bool = False


class Nothing(incident.Event):
    pass


class Something(incident.Event):
    value: int
    label: str


class Opaque:
    """A type msgspec cannot describe: strategies need to be told how to make it."""


class WithOpaque(incident.Command):
    aggregate_id: str
    thing: Opaque


@FAST
@given(commands(Everything))
def test_generated_commands_pass_validation(command: Everything) -> None:
    """Every constraint is honoured, so validate_command accepts what commands() makes."""
    assert incident.validate_command(command) is command
    assert re.search("^[A-Z]{2}[0-9]{2}$", command.aggregate_id)  # msgspec uses re.search
    assert command.positive > 0 and -5 <= command.bounded <= 5 and command.tens % 10 == 0


@FAST
@given(invalid_commands(Everything))
def test_invalid_commands_fail_validation(command: Everything) -> None:
    with pytest.raises(incident.InvalidCommand):
        incident.validate_command(command)


CONSTRAINED = {
    "gt": Annotated[int, msgspec.Meta(gt=0)],
    "ge and le": Annotated[int, msgspec.Meta(ge=-5, le=5)],
    "lt": Annotated[int, msgspec.Meta(lt=100)],
    "multiple_of": Annotated[int, msgspec.Meta(multiple_of=10)],
    "float range": Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)],
    "min_length": Annotated[str, msgspec.Meta(min_length=3)],
    "max_length": Annotated[str, msgspec.Meta(max_length=2)],
    "pattern": Annotated[str, msgspec.Meta(pattern="^[a-z]+$")],
    "list length": Annotated[list[int], msgspec.Meta(min_length=1, max_length=2)],
    "literal": Literal["a", "b"],
    "enum": Colour,
    "optional": int | None,
}


def one_field(annotation: object) -> type[incident.Command]:
    """A command with one constrained field beside its aggregate_id."""
    return msgspec.defstruct(  # type: ignore[no-any-return]
        "OneField", [("aggregate_id", str), ("value", annotation)], bases=(incident.Command,)
    )


@pytest.mark.parametrize("constraint", sorted(CONSTRAINED))
def test_each_constraint_is_honoured_and_can_be_broken(constraint: str) -> None:
    """commands() stays inside the constraint; invalid_commands() breaks it at that field."""
    command_type = one_field(CONSTRAINED[constraint])

    @settings(FAST, max_examples=30)
    @given(commands(command_type))
    def valid(command: incident.Command) -> None:
        incident.validate_command(command)

    def broken_here(command: incident.Command) -> bool:
        try:
            incident.validate_command(command)
        except incident.InvalidCommand as error:
            return error.field == "value"
        return False

    valid()
    found = find(invalid_commands(command_type), broken_here, settings=settings(database=None))
    assert broken_here(found)


def test_invalid_commands_shrink_to_the_boundary() -> None:
    """A minimal non-positive amount is 0: constraint violations come before wrong types."""

    def bad_amount(command: DepositMoney) -> bool:
        try:
            incident.validate_command(command)
        except incident.InvalidCommand as error:
            return error.field == "amount"
        return False

    found = find(invalid_commands(DepositMoney), bad_amount, settings=settings(database=None))
    assert found.amount == 0


@FAST
@given(commands(bank_account, aggregate_id=st.sampled_from(["A", "B"])))
def test_field_overrides_aim_commands_at_a_few_aggregates(command: incident.Command) -> None:
    assert command.aggregate_id in {"A", "B"}  # type: ignore[attr-defined]
    assert type(command) in bank_account.command_types


@FAST
@given(commands(DepositMoney, amount=5))
def test_a_plain_value_override_is_used_as_is(command: DepositMoney) -> None:
    assert command.amount == 5


def test_an_override_naming_no_field_is_refused() -> None:
    with pytest.raises(ValueError, match="No generated type has a field named amont"):
        commands(DepositMoney, amont=st.just(1))


def test_sources_must_be_aggregates_or_message_types() -> None:
    with pytest.raises(TypeError, match=r"incident\.Command subclass"):
        commands(MoneyDeposited)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No command types"):
        commands()


def test_a_type_msgspec_cannot_describe_needs_an_override() -> None:
    """The error says how to fix it; with an override the command is generated."""
    with pytest.raises(TypeError, match="pass one for this field by name"):
        commands(WithOpaque).example()
    made = find(commands(WithOpaque, thing=st.builds(Opaque)), lambda c: True)
    assert isinstance(made.thing, Opaque)


@FAST
@given(events(Something, Nothing))
def test_events_are_derived_from_event_types(event: incident.Event) -> None:
    assert isinstance(event, Something | Nothing)
    assert msgspec.json.decode(msgspec.json.encode(event), type=type(event)) == event


@FAST
@given(events(bank_account))
def test_events_of_an_aggregate_all_apply(event: incident.Event) -> None:
    bank_account.evolve(bank_account.initial, event)


# -- the stateful machine ------------------------------------------------------------------


def test_the_bank_account_machine_passes() -> None:
    """The real aggregate keeps its balance non-negative under random commands."""
    machine = aggregate_machine(bank_account, invariants={"never negative": non_negative})
    run_state_machine_as_test(machine, settings=settings(MACHINE, max_examples=30))


def non_negative(state: incident.Aggregate[object]) -> bool:
    return state.balance >= 0  # type: ignore[attr-defined]


def test_the_machine_is_a_pytest_test_case_with_modest_settings() -> None:
    machine = aggregate_machine(bank_account)
    assert machine.__name__ == "BankAccountMachine"
    assert machine.TestCase.settings.deadline is None
    assert machine.TestCase.settings.max_examples <= 100


def _broken_bank() -> incident.Aggregate[object]:
    """The bank account with a withdrawal rule that forgets the balance."""

    class State(msgspec.Struct, frozen=True):
        opened: bool = False
        balance: int = 0

    broken: incident.Aggregate[State] = incident.Aggregate("broken", initial=State())

    @broken.execute(OpenAccount)
    def open_(state: State, cmd: OpenAccount) -> AccountOpened:
        return AccountOpened(account_number=cmd.aggregate_id)

    @broken.execute(DepositMoney)
    def deposit(state: State, cmd: DepositMoney) -> MoneyDeposited:
        return MoneyDeposited(amount=cmd.amount)

    @broken.execute(WithdrawMoney)
    def withdraw(state: State, cmd: WithdrawMoney) -> MoneyWithdrawn:
        if not state.opened:
            raise incident.Rejected("account_not_found")
        return MoneyWithdrawn(amount=cmd.amount)  # the bug: no balance check

    @broken.apply(AccountOpened)
    def opened_(state: State, event: AccountOpened) -> State:
        return replace(state, opened=True)

    @broken.apply(MoneyDeposited)
    def deposited(state: State, event: MoneyDeposited) -> State:
        return replace(state, balance=state.balance + event.amount)

    @broken.apply(MoneyWithdrawn)
    def withdrawn(state: State, event: MoneyWithdrawn) -> State:
        return replace(state, balance=state.balance - event.amount)

    return broken  # type: ignore[return-value]


def test_the_machine_finds_a_broken_rule() -> None:
    """A withdrawal without a balance check breaks the invariant and is shrunk to it."""
    machine = aggregate_machine(_broken_bank(), invariants={"never negative": non_negative})
    with pytest.raises(AssertionError, match="invariant never negative failed for broken") as e:
        run_state_machine_as_test(machine, settings=MACHINE)
    notes = "\n".join(getattr(e.value, "__notes__", []))
    # the steps are shrunk to the smallest story: open, then withdraw 1
    assert "OpenAccount(" in notes and "WithdrawMoney(" in notes
    assert re.search(r"amount=1\b", notes), notes


def test_invariants_are_named_by_their_function_or_number() -> None:
    unshrunk = settings(MACHINE, phases=[Phase.generate])  # only the message matters here
    machine = aggregate_machine(_broken_bank(), invariants=[lambda s: True, non_negative])
    with pytest.raises(AssertionError, match="invariant non_negative failed"):
        run_state_machine_as_test(machine, settings=unshrunk)
    machine = aggregate_machine(_broken_bank(), invariants=[lambda s: s.balance >= 0])
    with pytest.raises(AssertionError, match="invariant #1 failed"):
        run_state_machine_as_test(machine, settings=unshrunk)


class Add(incident.Command):
    aggregate_id: Literal["only"]
    item: Annotated[int, msgspec.Meta(ge=0, le=3)]


class Added(incident.Event):
    item: int


def test_the_machine_catches_state_mutated_in_place() -> None:
    """An apply function that mutates its state is caught, before it corrupts others."""
    bag: incident.Aggregate[list[int]] = incident.Aggregate("bag", initial=[])

    @bag.execute
    def add(state: list[int], cmd: Add) -> Added:
        return Added(item=cmd.item)

    @bag.apply
    def added(state: list[int], event: Added) -> list[int]:
        state.append(event.item)  # the bug: the initial list is shared and grows
        return state

    with pytest.raises(AssertionError, match="applying Added changed its input state in place"):
        run_state_machine_as_test(aggregate_machine(bag, commands(Add)), settings=MACHINE)


def test_the_machine_catches_a_decision_that_is_not_pure() -> None:
    """An execute function with hidden inputs decides differently the second time."""
    ticks = itertools.count()
    clock: incident.Aggregate[int] = incident.Aggregate("clock", initial=0)

    @clock.execute
    def add(state: int, cmd: Add) -> Added:
        return Added(item=next(ticks))  # the bug: a hidden counter, like reading the clock

    @clock.apply
    def added(state: int, event: Added) -> int:
        return state + 1

    with pytest.raises(AssertionError, match="decided differently on the same state"):
        run_state_machine_as_test(aggregate_machine(clock, commands(Add)), settings=MACHINE)


def test_the_machine_tolerates_invalid_and_rejected_commands() -> None:
    """Refused commands change nothing, so a machine fed only those has no state."""
    machine = aggregate_machine(
        bank_account,
        commands(bank_account) | invalid_commands(bank_account),
        invariants=[non_negative],
    )
    run_state_machine_as_test(machine, settings=settings(MACHINE, max_examples=20))


class CheckIn(incident.Command):
    aggregate_id: Annotated[str, msgspec.Meta(pattern=r"^R\d{3}$")]
    guests: Annotated[int, msgspec.Meta(ge=1, le=4)]


class CheckedIn(incident.Event):
    guests: int


def _rooms() -> incident.Aggregate[int]:
    rooms: incident.Aggregate[int] = incident.Aggregate("rooms", initial=0)

    @rooms.execute
    def check_in(state: int, cmd: CheckIn) -> CheckedIn:
        return CheckedIn(guests=cmd.guests)

    @rooms.apply
    def checked_in(state: int, event: CheckedIn) -> int:
        return state + event.guests

    return rooms


def test_the_machine_refuses_streams_no_command_can_target() -> None:
    """Default streams ("A", "B") against an aggregate_id pattern of room numbers would
    make every command invalid and check nothing: the machine is refused when made, and
    says to pass streams=; matching streams run and reach the invariant."""
    with pytest.raises(ValueError, match=r"no generated CheckIn can be valid .*pass streams="):
        aggregate_machine(_rooms(), invariants=[lambda s: False])
    machine = aggregate_machine(_rooms(), invariants=[lambda s: False], streams=["R101"])
    with pytest.raises(AssertionError, match="invariant #1 failed for rooms 'R101'"):
        run_state_machine_as_test(machine, settings=settings(MACHINE, phases=[Phase.generate]))


def test_a_run_that_checked_no_state_fails() -> None:
    """With commands= that are never valid, a deliberately false invariant is never
    reached: the run fails, saying it checked no state and why."""
    machine = aggregate_machine(
        _rooms(), commands(CheckIn, aggregate_id="A"), invariants=[lambda s: False]
    )
    with pytest.raises(AssertionError, match="checked no state") as caught:
        run_state_machine_as_test(machine, settings=MACHINE)
    assert "at aggregate_id" in str(caught.value)
    assert "commands= gave no command that passes validate_command" in str(caught.value)


def test_the_machine_catches_an_apply_with_hidden_state() -> None:
    """An apply function with an input besides state and event (here a global counter)
    folds differently the second time, so the fold disagrees with the steps."""
    serial = itertools.count(1)
    numbered: incident.Aggregate[tuple[int, ...]] = incident.Aggregate("numbered", initial=())

    @numbered.execute
    def add(state: tuple[int, ...], cmd: Add) -> Added:
        return Added(item=cmd.item)

    @numbered.apply
    def added(state: tuple[int, ...], event: Added) -> tuple[int, ...]:
        return (*state, next(serial))  # the bug: numbering lines from outside the history

    with pytest.raises(AssertionError, match="folding its history gives"):
        run_state_machine_as_test(aggregate_machine(numbered, commands(Add)), settings=MACHINE)


def test_specs_work_without_hypothesis() -> None:
    """given/when/then needs only incident; strategies say which extra to install."""
    script = """
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "hypothesis" else real(name, *a)
from incident.examples.bank import AccountOpened, OpenAccount, bank_account
from incident.testing import commands, given
given(bank_account).when(OpenAccount(aggregate_id="A")).then(AccountOpened(account_number="A"))
try:
    commands(bank_account)
except ImportError as error:
    print(error)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert "pip install 'incident[testing]'" in done.stdout
