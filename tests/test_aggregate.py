"""Aggregate: registration by annotation and explicit type, decide, evolve, fold, history."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import msgspec
import pytest

import incident

# -- messages and a small aggregate (module level, so annotations resolve) ------------


class Add(incident.Command):
    aggregate_id: str
    n: int


class Reset(incident.Command):
    aggregate_id: str


class Nothing(incident.Command):
    aggregate_id: str


class Unhandled(incident.Command):
    aggregate_id: str


class Added(incident.Event):
    n: int


class WasReset(incident.Event):
    pass


class NeverApplied(incident.Event):
    pass


class Total(msgspec.Struct, frozen=True):
    total: int = 0
    changes: int = 0


def counter() -> incident.Aggregate[Total]:
    """A fresh aggregate: Add and Reset by annotation, Nothing by the explicit form."""
    agg: incident.Aggregate[Total] = incident.Aggregate("counter", initial=Total())

    @agg.execute
    def add(state: Total, cmd: Add) -> Added:
        if cmd.n == 0:
            raise incident.Rejected("nothing_to_add")
        return Added(n=cmd.n)

    @agg.execute
    def reset(state: Total, cmd: Reset) -> list[incident.Event]:
        return [WasReset(), Added(n=1)]

    @agg.execute(Nothing)
    def nothing(state, cmd):  # type: ignore[no-untyped-def]
        return ()

    @agg.apply
    def added(state: Total, event: Added) -> Total:
        return Total(total=state.total + event.n, changes=state.changes + 1)

    @agg.apply(WasReset)
    def was_reset(state, event):  # type: ignore[no-untyped-def]
        return Total(total=0, changes=state.changes + 1)

    return agg


def recorded(event: incident.Event, version: int = 1) -> incident.Recorded[Any]:
    return incident.Recorded(
        position=version,
        event_id=f"e{version}",
        aggregate_id="c1",
        aggregate="counter",
        version=version,
        event_type=incident.event_type_name(type(event)),
        event_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        data=event,
    )


# -- registration ------------------------------------------------------------------


def test_annotation_and_explicit_forms_register_their_types() -> None:
    """@execute/@apply take the type from the annotation; @agg.execute(T) takes it explicitly."""
    agg = counter()
    assert set(agg.command_types) == {Add, Reset, Nothing}
    assert set(agg.event_types) == {Added, WasReset}
    assert agg.name == "counter"
    assert agg.initial == Total()


def test_registered_functions_name_each_message_and_its_function() -> None:
    """What the tour notebook shows: commands first, then events, in registration order."""
    agg: incident.Aggregate[int] = incident.Aggregate("listed", initial=0)

    @agg.execute
    def add(state: int, cmd: Add) -> Added:
        return Added(n=cmd.n)

    @agg.apply
    def added(state: int, event: Added) -> int:
        return state + event.n

    registered = agg.registered_functions()
    assert list(registered) == ["Add", "Added"]
    assert registered["Add"].endswith("<locals>.add")
    assert registered["Added"].endswith("<locals>.added")


def test_decorators_return_the_function_unchanged() -> None:
    """Registering a function leaves it callable as a plain function (for unit tests)."""
    agg: incident.Aggregate[int] = incident.Aggregate("plain", initial=0)

    def add(state: int, cmd: Add) -> Added:
        return Added(n=cmd.n)

    def explicit(state: int, event: Added) -> int:
        return state + event.n

    assert agg.execute(add) is add
    assert agg.apply(Added)(explicit) is explicit
    assert add(0, Add(aggregate_id="x", n=3)) == Added(n=3)


def test_registering_a_command_twice_names_both_functions() -> None:
    """A second execute function for the same command is refused, naming both sides."""
    agg = counter()
    with pytest.raises(incident.RegistrationError) as caught:

        @agg.execute
        def add_again(state: Total, cmd: Add) -> Added:
            return Added(n=1)

    message = str(caught.value)
    assert "Add" in message
    assert "counter.<locals>.add" in message
    assert "add_again" in message
    assert set(agg.command_types) == {Add, Reset, Nothing}


def test_registering_an_event_twice_explicitly_names_both_functions() -> None:
    """The explicit form also refuses a duplicate, naming the existing and the new function."""
    agg = counter()
    with pytest.raises(incident.RegistrationError) as caught:

        @agg.apply(Added)
        def added_again(state: Total, event: Added) -> Total:
            return state

    assert "added_again" in str(caught.value)
    assert "counter.<locals>.added" in str(caught.value)


def test_an_unannotated_function_is_refused() -> None:
    """Without an annotation on the message parameter there is nothing to register by."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)
    with pytest.raises(incident.RegistrationError) as caught:

        @agg.execute
        def add(state, cmd):  # type: ignore[no-untyped-def]
            return ()

    message = str(caught.value)
    assert "add" in message and "'cmd'" in message
    assert "@aggregate.execute(MessageType)" in message
    assert agg.command_types == ()


@pytest.mark.parametrize("role", ["execute", "apply"])
def test_an_annotation_that_is_not_a_message_type_is_refused(role: str) -> None:
    """Annotating the message with int (or with the wrong message family) is refused."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    def takes_int(state: int, message: int) -> int:
        return state

    with pytest.raises(incident.RegistrationError, match="not an incident"):
        getattr(agg, role)(takes_int)


def test_an_event_annotation_on_execute_is_refused() -> None:
    """execute wants a Command: an Event annotation names the base class it expected."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    def wrong(state: int, event: Added) -> Added:
        return event

    with pytest.raises(incident.RegistrationError, match=r"Added.*not an incident\.Command"):
        agg.execute(wrong)


@pytest.mark.parametrize("role", ["execute", "apply"])
def test_explicit_form_refuses_a_non_message_type(role: str) -> None:
    """@agg.execute(int) and @agg.apply(SomeCommand) are refused at the decorator."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)
    with pytest.raises(incident.RegistrationError, match="not an incident"):
        getattr(agg, role)(int)
    wrong_family = Added if role == "execute" else Add
    with pytest.raises(incident.RegistrationError, match=wrong_family.__name__):
        getattr(agg, role)(wrong_family)


@pytest.mark.parametrize("role", ["execute", "apply"])
def test_wrong_arity_is_refused(role: str) -> None:
    """A message function takes exactly (state, message)."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    def one(cmd: Add) -> None:
        return None

    def three(state: int, cmd: Add, extra: int) -> None:
        return None

    for function, count in ((one, 1), (three, 3)):
        with pytest.raises(incident.RegistrationError, match=f"it takes {count}"):
            getattr(agg, role)(function)


def test_explicit_form_checks_arity_too() -> None:
    """@agg.execute(Add) on a one-parameter function is refused when registering, not later."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    def one(cmd: Add) -> Added:
        return Added(n=cmd.n)

    with pytest.raises(incident.RegistrationError, match="two parameters"):
        agg.execute(Add)(one)
    assert agg.command_types == ()


def test_a_non_callable_is_refused() -> None:
    """Decorating something that is neither a function nor a message type is an error."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)
    with pytest.raises(incident.RegistrationError, match="function or a message type"):
        agg.execute(42)


# -- decide --------------------------------------------------------------------------


def test_decide_returns_a_list_of_events() -> None:
    """One event, a list of events and () all come back as a list."""
    agg = counter()
    assert agg.decide(Total(), Add(aggregate_id="c", n=2)) == [Added(n=2)]
    assert agg.decide(Total(), Reset(aggregate_id="c")) == [WasReset(), Added(n=1)]
    assert agg.decide(Total(), Nothing(aggregate_id="c")) == []


def test_decide_lets_rejections_through() -> None:
    """A Rejected raised by the execute function reaches the caller with its reason."""
    with pytest.raises(incident.Rejected) as caught:
        counter().decide(Total(), Add(aggregate_id="c", n=0))
    assert caught.value.reason == "nothing_to_add"


def test_decide_an_unhandled_command_names_what_is_handled() -> None:
    """RoutingError names the command and every command the aggregate handles."""
    with pytest.raises(incident.RoutingError) as caught:
        counter().decide(Total(), Unhandled(aggregate_id="c"))
    message = str(caught.value)
    assert "counter" in message and "Unhandled" in message
    assert "Add, Nothing, Reset" in message


def test_decide_routes_by_exact_type() -> None:
    """A subclass of a handled command is not silently handled by its parent's function."""

    class AddTwice(Add):
        pass

    with pytest.raises(incident.RoutingError, match="AddTwice"):
        counter().decide(Total(), AddTwice(aggregate_id="c", n=1))


def test_execute_returning_none_is_a_clear_error() -> None:
    """Forgetting the return statement is reported, suggesting () for no events."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    @agg.execute
    def forgot(state: int, cmd: Add) -> None:
        pass

    with pytest.raises(incident.RegistrationError, match=r"forgot returned None.*\(\)"):
        agg.decide(0, Add(aggregate_id="a", n=1))


@pytest.mark.parametrize("returned", [42, [Added(n=1), "oops"], Add(aggregate_id="a", n=1)])
def test_execute_returning_a_non_event_is_a_clear_error(returned: Any) -> None:
    """Anything in the decision that is not an Event is named in the error."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    @agg.execute
    def bad(state: int, cmd: Add) -> Any:
        return returned

    @agg.apply
    def added(state: int, event: Added) -> int:
        return state

    with pytest.raises(incident.IncidentError, match="bad"):
        agg.decide(0, Add(aggregate_id="a", n=1))


def test_execute_returning_an_event_without_apply_is_a_clear_error() -> None:
    """Deciding an event the aggregate cannot apply fails at decide time, naming the event."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    @agg.execute
    def decides_unknown(state: int, cmd: Add) -> NeverApplied:
        return NeverApplied()

    with pytest.raises(incident.RoutingError) as caught:
        agg.decide(0, Add(aggregate_id="a", n=1))
    assert "NeverApplied" in str(caught.value)
    assert "decides_unknown" in str(caught.value)


def test_execute_may_return_a_generator() -> None:
    """Any iterable of events is a decision, including a generator."""
    agg = counter()

    @agg.execute
    def many(state: Total, cmd: Unhandled) -> Any:
        yield from (Added(n=n) for n in (1, 2, 3))

    assert agg.decide(Total(), Unhandled(aggregate_id="c")) == [Added(n=1), Added(n=2), Added(n=3)]


# -- evolve, fold, history -----------------------------------------------------------


def test_evolve_applies_events_and_recorded_envelopes_alike() -> None:
    """evolve unwraps a Recorded and applies its data."""
    agg = counter()
    assert agg.evolve(Total(), Added(n=4)) == Total(total=4, changes=1)
    assert agg.evolve(Total(), recorded(Added(n=4))) == Total(total=4, changes=1)


def test_evolve_an_event_without_apply_names_what_is_applied() -> None:
    """RoutingError names the event and the events the aggregate applies."""
    with pytest.raises(incident.RoutingError) as caught:
        counter().evolve(Total(), NeverApplied())
    assert "NeverApplied" in str(caught.value)
    assert "Added, WasReset" in str(caught.value)


def _forgetful() -> incident.Aggregate[int]:
    """A counter whose apply function for WasReset forgets its return."""
    agg: incident.Aggregate[int] = incident.Aggregate("forgetful", initial=0)

    @agg.apply
    def added(total: int, event: Added) -> int:
        return total + event.n

    @agg.apply
    def was_reset(total: int, event: WasReset) -> int:
        0  # noqa: B018 - the bug: the new state is computed and dropped

    return agg


@pytest.mark.parametrize("wrap", [lambda e: e, recorded], ids=["event", "recorded"])
def test_an_apply_that_returns_none_fails_the_fold_naming_it_and_the_event(
    wrap: Any,
) -> None:
    """An apply function that returns None (a forgotten return) raises RegistrationError
    at the first fold that reaches it, naming the function and the event type, instead
    of making the state None."""
    agg = _forgetful()
    events = [wrap(Added(n=2)), wrap(WasReset()), wrap(Added(n=1))]
    for fold in (agg.fold, lambda events: list(agg.history(events))):
        with pytest.raises(incident.RegistrationError) as caught:
            fold(events)
        assert "was_reset returned None applying WasReset" in str(caught.value)
    with pytest.raises(incident.RegistrationError, match="was_reset"):
        agg.evolve(2, wrap(WasReset()))
    assert agg.fold([wrap(Added(n=2))]) == 2


def test_an_initial_state_of_none_is_refused() -> None:
    """A state is never None, so that None can only mean a forgotten return: initial=None
    is refused when the aggregate is made."""
    with pytest.raises(incident.RegistrationError, match="initial=None"):
        incident.Aggregate("nothing", initial=None)


EVENTS: list[incident.Event] = [Added(n=2), Added(n=5), WasReset(), Added(n=7)]


def test_fold_is_functools_reduce_over_evolve() -> None:
    """fold(events) == reduce(evolve, events, initial), for events and envelopes."""
    agg = counter()
    expected = functools.reduce(agg.evolve, EVENTS, agg.initial)
    assert expected == Total(total=7, changes=4)
    assert agg.fold(EVENTS) == expected
    assert agg.fold([recorded(e, v) for v, e in enumerate(EVENTS, 1)]) == expected
    assert agg.fold(iter(EVENTS)) == expected


def test_fold_starts_from_a_given_state() -> None:
    """fold(events, state) continues from that state: folding in two halves equals one fold."""
    agg = counter()
    half = agg.fold(EVENTS[:2])
    assert agg.fold(EVENTS[2:], half) == agg.fold(EVENTS)
    assert agg.fold([], half) == half
    assert agg.fold([]) == agg.initial


def test_fold_from_a_falsy_state_is_not_replaced_by_initial() -> None:
    """Only state=None means 'from the initial state'; 0 is a real state."""
    agg: incident.Aggregate[int] = incident.Aggregate("sum", initial=100)

    @agg.apply
    def added(state: int, event: Added) -> int:
        return state + event.n

    assert agg.fold([Added(n=1)], 0) == 1
    assert agg.fold([Added(n=1)]) == 101


def test_history_yields_one_state_per_event() -> None:
    """history gives the state right after each event; its last state is the fold."""
    agg = counter()
    states = list(agg.history(EVENTS))
    assert len(states) == len(EVENTS)
    assert [s.total for s in states] == [2, 7, 0, 7]
    assert states[-1] == agg.fold(EVENTS)
    assert states == [agg.fold(EVENTS[: i + 1]) for i in range(len(EVENTS))]
    assert list(agg.history([])) == []


@pytest.mark.parametrize(
    ("role", "base"), [("execute", incident.Command), ("apply", incident.Event)]
)
def test_the_base_classes_themselves_are_refused(role: str, base: type[Any]) -> None:
    """Routing is by exact type, so a function for incident.Command/Event would never run."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)
    with pytest.raises(incident.RegistrationError, match=base.__name__):
        getattr(agg, role)(base)

    def annotated(state: int, message: base) -> Any:  # type: ignore[valid-type]
        return state

    annotated.__annotations__["message"] = base  # what the annotation resolves to
    with pytest.raises(incident.RegistrationError, match=base.__name__):
        getattr(agg, role)(annotated)


class Broadcast(incident.Command):
    text: str


def test_a_command_without_aggregate_id_is_refused() -> None:
    """Commands name their target by aggregate_id; a command type without one cannot be routed
    to a stream, so registering it is an error naming the field."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    def shout(state: int, cmd: Broadcast) -> tuple[()]:
        return ()

    with pytest.raises(incident.RegistrationError, match="aggregate_id"):
        agg.execute(shout)
    with pytest.raises(incident.RegistrationError, match="Broadcast"):
        agg.execute(Broadcast)(shout)


def test_an_annotation_that_cannot_be_resolved_suggests_the_explicit_form() -> None:
    """A string annotation naming a local class cannot be resolved; the error says what to do."""
    agg: incident.Aggregate[int] = incident.Aggregate("a", initial=0)

    class LocalCommand(incident.Command):
        aggregate_id: str

    def local(state: int, cmd: LocalCommand) -> tuple[()]:  # a string under __future__
        return ()

    with pytest.raises(incident.RegistrationError) as caught:
        agg.execute(local)
    assert "LocalCommand" in str(caught.value)
    assert "@aggregate.execute(MessageType)" in str(caught.value)
    assert agg.execute(LocalCommand)(local) is local  # the explicit form works
