"""Registration: routes, and the event types command handlers register with their store,
on every store backend (several command handlers may share one store)."""

from __future__ import annotations

from typing import Any

import pytest

import incident


def kind(name: str, tag: str | None = None) -> tuple[incident.Aggregate[int], type[Any], type[Any]]:
    """An aggregate ``name`` with one command and one event, made by one function, so
    every call defines its classes at the same module and qualified name."""

    class Change(incident.Command):
        aggregate_id: str

    if tag is None:

        class Changed(incident.Event):
            by: int

    else:

        class Changed(incident.Event, tag=tag):  # type: ignore[no-redef]
            by: int

    aggregate: incident.Aggregate[int] = incident.Aggregate(name, initial=0)
    aggregate.execute(Change)(lambda state, cmd: Changed(by=1))
    aggregate.apply(Changed)(lambda state, event: state + event.by)
    return aggregate, Change, Changed


def test_command_handlers_sharing_a_store_each_read_every_event_they_registered(
    event_store: incident.EventStore,
) -> None:
    """Two command handlers with different aggregates on one store: each reads its own
    streams back (cold, past the cache), and the log reads every event as its class."""
    a, change_a, changed_a = kind("a", tag="AChanged")
    b, change_b, changed_b = kind("b", tag="BChanged")
    first = incident.CommandHandler(event_store, aggregates=[a])
    second = incident.CommandHandler(event_store, aggregates=[b])
    first.dispatch(change_a(aggregate_id="x"))
    second.dispatch(change_b(aggregate_id="y"))
    first.dispatch(change_a(aggregate_id="x"))
    first.cache.clear()
    second.cache.clear()
    assert (first.state("a", "x"), second.state("b", "y")) == (2, 1)
    assert [type(r.data) for r in event_store.read_all()] == [changed_a, changed_b, changed_a]
    assert event_store.types.registered() == {"AChanged": changed_a, "BChanged": changed_b}


def test_a_name_another_command_handler_registered_is_refused_not_taken_over(
    event_store: incident.EventStore,
) -> None:
    """A second command handler whose aggregate stores another class under a name the
    first registered (here: the same place, as a notebook's redefinition has) is a
    RegistrationError naming both aggregates and both classes; the first still reads its
    events as its own class."""
    a, change_a, changed_a = kind("a")
    b, _, _ = kind("b")
    first = incident.CommandHandler(event_store, aggregates=[a])
    first.dispatch(change_a(aggregate_id="x"))
    with pytest.raises(incident.RegistrationError) as refused:
        incident.CommandHandler(event_store, aggregates=[b])
    message = str(refused.value)
    assert "a and b both store an event as 'Changed'" in message
    assert 'tag="BChanged"' in message
    first.cache.clear()
    assert first.state("a", "x") == 1
    assert [type(r.data) for r in event_store.read_all()] == [changed_a]


def test_a_refused_command_handler_registers_nothing(event_store: incident.EventStore) -> None:
    """Registration is all or none: a command handler refused for one clashing name
    leaves none of its other aggregates' names behind in the shared registry."""
    a, _, _ = kind("a")
    fresh, _, _ = kind("fresh", tag="FreshChanged")
    clashing, _, _ = kind("clashing")
    incident.CommandHandler(event_store, aggregates=[a])
    with pytest.raises(incident.RegistrationError, match="a and clashing"):
        incident.CommandHandler(event_store, aggregates=[fresh, clashing])
    assert set(event_store.types.registered()) == {"Changed"}


def test_the_same_aggregate_in_two_command_handlers_shares_its_names() -> None:
    """Command handlers of one application (the same aggregates, or an aggregate built
    again by the same code, as a notebook cell run twice) register the same names
    without a clash; the latest definition reads the events (a store that decodes them:
    the memory store hands back the objects it was given)."""
    store = incident.open_event_store("sqlite://")
    a, change, _ = kind("a")
    incident.CommandHandler(store, aggregates=[a]).dispatch(change(aggregate_id="x"))
    incident.CommandHandler(store, aggregates=[a])
    again, _, changed_again = kind("a")
    app = incident.CommandHandler(store, aggregates=[again])
    assert store.types.registered() == {"Changed": changed_again}
    assert app.state("a", "x") == 1


def test_two_upcasters_for_one_step_are_refused() -> None:
    """One stored payload reads one way: command handlers sharing a store may not bring
    the same name and schema version up with two different functions."""
    store = incident.open_event_store("memory://")
    a, _, _ = kind("a", tag="Shared.Changed")
    b: incident.Aggregate[int] = incident.Aggregate("b", initial=0)
    a.upcast("Old", 1)(lambda payload: payload)
    b.upcast("Old", 1)(lambda payload: {**payload, "b": True})
    incident.CommandHandler(store, aggregates=[a])
    incident.CommandHandler(store, aggregates=[a])  # the same function: no clash
    with pytest.raises(incident.RegistrationError, match="both upcast 'Old' from schema"):
        incident.CommandHandler(store, aggregates=[b])


def test_the_fallback_never_shadows_a_registered_name() -> None:
    """A name nobody registered reads as the latest class defined under it (notebooks,
    the CLI); a registered name reads as its registered class whatever is defined later."""
    store = incident.open_event_store("memory://")
    a, _, registered = kind("a", tag="Fallback.Changed")
    incident.CommandHandler(store, aggregates=[a])
    _, _, later = kind("other", tag="Fallback.Changed")
    assert store.types.resolve("Fallback.Changed") is registered
    assert incident.EventTypes().resolve("Fallback.Changed") is later
