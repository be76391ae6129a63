"""EventHandler: listen registration, and the values listeners may return."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

import incident


class Opened(incident.Event):
    number: str


class Closed(incident.Event):
    pass


class Ignored(incident.Event):
    pass


class Notify(incident.Command):
    aggregate_id: str


class Archive(incident.Command):
    aggregate_id: str


class Row(incident.Projection):
    aggregate_id: str
    label: str = ""


def recorded(event: incident.Event, aggregate_id: str = "A1") -> incident.Recorded[Any]:
    return incident.Recorded(
        position=1,
        event_id="e1",
        aggregate_id=aggregate_id,
        aggregate="account",
        version=1,
        event_type=incident.event_type_name(type(event)),
        event_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        data=event,
    )


def handler_returning(value: Any) -> incident.EventHandler:
    handler = incident.EventHandler("h")

    @handler.listen(Opened)
    def listener(rec: incident.Recorded[Any], state: Any) -> Any:
        return value

    return handler


# -- registration ------------------------------------------------------------------


def test_listen_needs_at_least_one_event_type() -> None:
    """listen() with no types is refused: the listener could never run."""
    with pytest.raises(incident.RegistrationError, match=r"h\.listen\(\) needs"):
        incident.EventHandler("h").listen()


@pytest.mark.parametrize("not_an_event", [int, Notify, Row, "Opened"])
def test_listen_refuses_what_is_not_an_event_type(not_an_event: Any) -> None:
    """Only Event subclasses can be listened to; the error names what was given."""
    with pytest.raises(incident.RegistrationError, match=r"not an incident\.Event subclass") as c:
        incident.EventHandler("h").listen(Opened, not_an_event)
    assert repr(not_an_event) in str(c.value)


def test_listen_used_without_parentheses_is_refused() -> None:
    """@handler.listen on a bare function (forgetting the event types) is an error, not a no-op."""
    handler = incident.EventHandler("h")

    def listener(rec: incident.Recorded[Any], state: Any) -> None:
        return None

    with pytest.raises(incident.RegistrationError, match=r"not an incident\.Event subclass"):
        handler.listen(listener)  # type: ignore[arg-type]


def test_the_same_listener_twice_for_one_event_is_refused() -> None:
    """Registering one function twice for one type would run it twice; it is refused."""
    handler = incident.EventHandler("h")

    def listener(rec: incident.Recorded[Any], state: Any) -> None:
        return None

    handler.listen(Opened)(listener)
    with pytest.raises(incident.RegistrationError) as caught:
        handler.listen(Opened)(listener)
    assert "listener" in str(caught.value) and "Opened" in str(caught.value)


def test_one_listener_for_several_event_types() -> None:
    """listen(A, B) registers the listener for both, and only those."""
    handler = incident.EventHandler("h")
    seen: list[str] = []

    @handler.listen(Opened, Closed)
    def listener(rec: incident.Recorded[Any], state: Any) -> None:
        seen.append(rec.event_type)

    assert handler.event_types == (Opened, Closed)
    assert handler.handles(Closed()) and not handler.handles(Ignored())
    handler.handle(recorded(Opened(number="1")), None)
    handler.handle(recorded(Closed()), None)
    assert handler.handle(recorded(Ignored()), None) == []
    assert seen == ["Opened", "Closed"]


def test_listeners_receive_the_recorded_event_and_the_state() -> None:
    """A listener is called as (recorded, state) with exactly what handle was given."""
    handler = incident.EventHandler("h")
    calls: list[tuple[Any, Any]] = []

    @handler.listen(Opened)
    def listener(rec: incident.Recorded[Any], state: Any) -> None:
        calls.append((rec, state))

    rec = recorded(Opened(number="7"))
    handler.handle(rec, {"balance": 3})
    assert calls == [(rec, {"balance": 3})]


# -- what listeners may return ---------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (None, []),
        (Row(aggregate_id="A1"), [Row(aggregate_id="A1")]),
        (Notify(aggregate_id="A1"), [Notify(aggregate_id="A1")]),
        (
            incident.Attempt(Notify(aggregate_id="A1"), on_rejected=Archive(aggregate_id="A1")),
            [incident.Attempt(Notify(aggregate_id="A1"), on_rejected=Archive(aggregate_id="A1"))],
        ),
        ([], []),
        ((), []),
        (
            [Row(aggregate_id="A1"), Notify(aggregate_id="A1")],
            [Row(aggregate_id="A1"), Notify(aggregate_id="A1")],
        ),
        (
            (Notify(aggregate_id="1"), [Row(aggregate_id="2"), (None, Archive(aggregate_id="3"))]),
            [Notify(aggregate_id="1"), Row(aggregate_id="2"), Archive(aggregate_id="3")],
        ),
    ],
    ids=["none", "projection", "command", "attempt", "empty-list", "empty-tuple", "list", "nested"],
)
def test_listener_outputs_are_flattened_in_order(returned: Any, expected: list[Any]) -> None:
    """None, a projection, a command, an Attempt, or (nested) iterables of them: a flat list."""
    assert handler_returning(returned).handle(recorded(Opened(number="1")), None) == expected


def test_a_generator_listener_is_flattened() -> None:
    """A listener may yield its outputs."""
    handler = incident.EventHandler("h")

    @handler.listen(Opened)
    def listener(rec: incident.Recorded[Any], state: Any) -> Iterator[incident.Projection]:
        yield Row(aggregate_id=rec.aggregate_id, label="a")
        yield Row(aggregate_id=rec.aggregate_id, label="b")

    outputs = handler.handle(recorded(Opened(number="1")), None)
    assert [o.label for o in outputs if isinstance(o, Row)] == ["a", "b"]


def test_several_listeners_run_in_registration_order() -> None:
    """Outputs of every listener for the event come back in the order they were registered."""
    handler = incident.EventHandler("h")

    @handler.listen(Opened)
    def first(rec: incident.Recorded[Any], state: Any) -> Row:
        return Row(aggregate_id="A", label="first")

    @handler.listen(Opened, Closed)
    def second(rec: incident.Recorded[Any], state: Any) -> list[Row]:
        return [Row(aggregate_id="A", label="second"), Row(aggregate_id="A", label="third")]

    outputs = handler.handle(recorded(Opened(number="1")), None)
    assert [o.label for o in outputs if isinstance(o, Row)] == ["first", "second", "third"]
    closed = handler.handle(recorded(Closed()), None)
    assert [o.label for o in closed if isinstance(o, Row)] == ["second", "third"]


@pytest.mark.parametrize(
    "returned",
    [42, "A1", b"A1", {"aggregate_id": "A1"}, Opened(number="1"), [Row(aggregate_id="A"), 3.5]],
    ids=["int", "str", "bytes", "dict", "event", "bad-item-in-list"],
)
def test_a_bad_return_value_raises_naming_the_listener(returned: Any) -> None:
    """Anything else is a RegistrationError naming the listener and what it returned."""
    with pytest.raises(incident.RegistrationError) as caught:
        handler_returning(returned).handle(recorded(Opened(number="1")), None)
    message = str(caught.value)
    assert "handler_returning.<locals>.listener" in message
    assert "returned" in message


def test_attempt_defaults_to_no_follow_up() -> None:
    """An Attempt without branches does nothing after its command, whatever the outcome."""
    attempt = incident.Attempt(Notify(aggregate_id="A1"))
    assert attempt.on_success == () and attempt.on_rejected == ()


@pytest.mark.parametrize(
    "attempt",
    [
        incident.Attempt("not a command"),  # type: ignore[arg-type]
        incident.Attempt(Notify(aggregate_id="A1"), on_success=Row(aggregate_id="A1")),  # type: ignore[arg-type]
        incident.Attempt(Notify(aggregate_id="A1"), on_rejected=(Archive(aggregate_id="1"), 3)),  # type: ignore[arg-type]
    ],
    ids=["command", "on-success", "on-rejected-item"],
)
def test_an_attempt_with_a_bad_part_is_refused_when_returned(attempt: incident.Attempt) -> None:
    """A bad command inside an Attempt is caught where the listener returns it, not later."""
    with pytest.raises(incident.RegistrationError, match="listener"):
        handler_returning(attempt).handle(recorded(Opened(number="1")), None)


def test_listening_to_the_event_base_class_is_refused() -> None:
    """Listeners are matched by exact type: listen(incident.Event) would never run."""
    with pytest.raises(incident.RegistrationError, match="Event"):
        incident.EventHandler("h").listen(incident.Event)
