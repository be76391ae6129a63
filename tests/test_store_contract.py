"""The store contract on memory, SQLite and Postgres: the public suite
(``incident.testing.contract``) once per backend, and the tests that write rows behind
a store's back, on the backends that keep rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import INVALID_JSON_BACKENDS, RAW_BACKENDS, OnEveryBackend, RawEvent, on_backends

import incident
from incident.examples.bank import MoneyDeposited
from incident.testing.contract import EventStoreContract, ProjectionStoreContract
from incident.testing.contract.event_store import deposited


class TestEventStores(OnEveryBackend, EventStoreContract):
    """The public event store contract, on every backend."""


class TestProjectionStores(OnEveryBackend, ProjectionStoreContract):
    """The public projection store contract, on every backend."""


@on_backends(INVALID_JSON_BACKENDS)
def test_a_row_that_does_not_decode_is_a_corrupt_event(
    event_store: incident.EventStore, write_raw_event: Callable[[RawEvent], None]
) -> None:
    """Bad JSON in the store raises CorruptEvent naming the position and the aggregate."""
    event_store.append("acc-1", deposited(1), expected_version=0)
    write_raw_event(
        RawEvent(
            position=2, aggregate_id="acc-1", version=2, event_type="MoneyDeposited", data="{oops"
        )
    )
    with pytest.raises(incident.CorruptEvent) as caught:
        event_store.get("acc-1")
    assert (caught.value.position, caught.value.aggregate_id) == (2, "acc-1")
    assert "position 2" in str(caught.value) and "'acc-1'" in str(caught.value)
    with pytest.raises(incident.CorruptEvent):
        list(event_store.read_all())
    assert [r.position for r in event_store.read_all(limit=1)] == [1]


@on_backends(RAW_BACKENDS)
def test_a_row_of_the_wrong_shape_is_a_corrupt_event(
    event_store: incident.EventStore, write_raw_event: Callable[[RawEvent], None]
) -> None:
    """Valid JSON that does not match the event's fields is corrupt too, and says why."""
    event_store.initialize()
    write_raw_event(
        RawEvent(
            position=1,
            aggregate_id="acc-9",
            version=1,
            event_type="MoneyDeposited",
            data='{"type": "MoneyDeposited", "amount": "lots"}',
        )
    )
    with pytest.raises(incident.CorruptEvent, match="amount") as caught:
        event_store.get("acc-9")
    assert (caught.value.position, caught.value.aggregate_id) == (1, "acc-9")


@on_backends(RAW_BACKENDS)
def test_an_unknown_event_type_names_it_and_the_registered_ones(
    event_store: incident.EventStore, write_raw_event: Callable[[RawEvent], None]
) -> None:
    """A stored type name no class carries raises UnknownEventType naming it, its position
    and the registered types."""
    event_store.append("acc-1", deposited(1), expected_version=0)
    write_raw_event(
        RawEvent(position=2, aggregate_id="acc-1", version=2, event_type="MoneyVanished", data="{}")
    )
    with pytest.raises(incident.UnknownEventType) as caught:
        event_store.get("acc-1")
    assert caught.value.event_type == "MoneyVanished"
    assert caught.value.position == 2
    assert "MoneyDeposited" in caught.value.registered
    assert "MoneyVanished" in str(caught.value) and "MoneyDeposited" in str(caught.value)
    with pytest.raises(incident.UnknownEventType):
        list(event_store.read_all())


@on_backends(INVALID_JSON_BACKENDS)
def test_events_through_a_damaged_row_raise_like_get(
    event_store: incident.EventStore, write_raw_event: Callable[[RawEvent], None]
) -> None:
    """A payload the batch decoder refuses is read again row by row: CorruptEvent or
    UnknownEventType, naming the position, exactly as get() reports it."""
    event_store.types.register(MoneyDeposited)
    event_store.append("acc-1", deposited(1), expected_version=0)
    write_raw_event(
        RawEvent(
            position=2, aggregate_id="acc-1", version=2, event_type="MoneyDeposited", data="{oops"
        )
    )
    with pytest.raises(incident.CorruptEvent) as caught:
        list(event_store.events("acc-1"))
    assert caught.value.position == 2
    assert [e.amount for e in event_store.events("acc-1", after=2)] == []  # type: ignore[attr-defined]


@on_backends(RAW_BACKENDS)
def test_events_through_a_row_of_an_unknown_type_raise_like_get(
    event_store: incident.EventStore, write_raw_event: Callable[[RawEvent], None]
) -> None:
    """A stored type no class carries, met by the batch decoder, is read again alone and
    raises UnknownEventType naming its position, as get() does."""
    event_store.types.register(MoneyDeposited)
    event_store.append("acc-2", deposited(1), expected_version=0)
    write_raw_event(
        RawEvent(position=2, aggregate_id="acc-2", version=2, event_type="MoneyVanished", data="{}")
    )
    with pytest.raises(incident.UnknownEventType) as caught_unknown:
        list(event_store.events("acc-2"))
    assert caught_unknown.value.position == 2
