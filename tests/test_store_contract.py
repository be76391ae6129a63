"""The store contract: every EventStore and ProjectionStore backend behaves the same."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable

import pytest
from conftest import INVALID_JSON_BACKENDS, RAW_BACKENDS, RawEvent, on_backends

import incident
from incident.examples.bank import BankAccount, MoneyDeposited, MoneyWithdrawn, Transfer


def deposited(*amounts: int) -> list[incident.Event]:
    return [MoneyDeposited(amount=a) for a in amounts]


def test_append_then_get_returns_events_in_version_order(event_store: incident.EventStore) -> None:
    """Events come back as appended, versions 1..n, with the envelope filled in."""
    recorded = event_store.append(
        "acc-1",
        deposited(1, 2, 3),
        expected_version=0,
        aggregate="bank_account",
        metadata={"user": "ann"},
    )
    got = event_store.get("acc-1")
    assert [r.data for r in got] == deposited(1, 2, 3)
    assert [r.version for r in got] == [1, 2, 3]
    assert got == recorded
    first = got[0]
    assert first.aggregate_id == "acc-1"
    assert first.aggregate == "bank_account"
    assert first.event_type == "MoneyDeposited"
    assert first.metadata == {"user": "ann"}
    assert first.event_date.tzinfo is not None
    assert first.event_date.utcoffset() == dt.timedelta(0)
    assert abs(first.event_date - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    assert len({r.event_id for r in got}) == 3
    for record in got:  # random UUIDs, spelled as str(uuid.UUID) spells them
        assert uuid.UUID(record.event_id).version == 4
        assert str(uuid.UUID(record.event_id)) == record.event_id


def test_get_after_version_returns_only_newer_events(event_store: incident.EventStore) -> None:
    event_store.append("acc-1", deposited(1, 2, 3), expected_version=0)
    assert [r.version for r in event_store.get("acc-1", after=1)] == [2, 3]
    assert event_store.version("acc-1") == 3
    assert event_store.version("nobody") == 0
    assert event_store.get("nobody") == []


def test_stale_expected_version_raises_and_writes_nothing(
    event_store: incident.EventStore,
) -> None:
    event_store.append("acc-1", deposited(1), expected_version=0)
    with pytest.raises(incident.ConcurrencyError) as caught:
        event_store.append("acc-1", deposited(2, 3), expected_version=0)
    assert (caught.value.aggregate_id, caught.value.expected, caught.value.actual) == (
        "acc-1",
        0,
        1,
    )
    with pytest.raises(incident.ConcurrencyError):
        event_store.append("acc-1", deposited(2), expected_version=5)
    assert [r.data for r in event_store.get("acc-1")] == deposited(1)
    assert [r.position for r in event_store.read_all()] == [1]


def test_any_appends_whatever_the_version(event_store: incident.EventStore) -> None:
    event_store.append("acc-1", deposited(1), expected_version=incident.ANY)
    event_store.append("acc-1", deposited(2), expected_version=incident.ANY)
    assert [r.version for r in event_store.get("acc-1")] == [1, 2]


def test_a_batch_with_a_bad_event_writes_nothing(event_store: incident.EventStore) -> None:
    """An append is atomic: one bad item and none of the batch is stored."""
    with pytest.raises(incident.IncidentError):
        event_store.append(
            "acc-1",
            [MoneyDeposited(amount=1), "not an event"],  # type: ignore[list-item]
            expected_version=0,
        )
    with pytest.raises(incident.IncidentError):
        event_store.append("acc-1", deposited(1), expected_version=0, metadata={"bad": object()})
    assert event_store.get("acc-1") == []
    assert list(event_store.read_all()) == []


def test_bad_expected_version_is_a_clear_error(event_store: incident.EventStore) -> None:
    for bad in (-1, "1", None, 1.0):
        with pytest.raises(incident.IncidentError, match="expected_version"):
            event_store.append("acc-1", deposited(1), expected_version=bad)
    assert event_store.get("acc-1") == []


def test_an_empty_append_writes_nothing(event_store: incident.EventStore) -> None:
    assert event_store.append("acc-1", [], expected_version=0) == []
    assert event_store.version("acc-1") == 0


def test_events_and_stream_read_one_stream(event_store: incident.EventStore) -> None:
    """events() gives a stream's payloads (what a fold needs), stream() its envelopes
    lazily; both in version order, both honour ``after``."""
    if not hasattr(event_store, "events") or not hasattr(event_store, "stream"):
        pytest.skip(f"{type(event_store).__name__} has no events()/stream() yet")
    event_store.append("a", deposited(1, 2), expected_version=0)
    event_store.append("b", deposited(5), expected_version=0)
    event_store.append("a", deposited(3), expected_version=2)
    assert list(event_store.events("a")) == deposited(1, 2, 3)
    assert list(event_store.events("a", after=2)) == deposited(3)
    assert list(event_store.events("nobody")) == []
    assert list(event_store.stream("a", after=1)) == event_store.get("a", after=1)


def test_read_all_is_gapless_in_commit_order_and_pages(event_store: incident.EventStore) -> None:
    event_store.append("a", deposited(1, 2), expected_version=0)
    event_store.append("b", [MoneyWithdrawn(amount=5)], expected_version=0)
    event_store.append("a", deposited(3), expected_version=2)
    log = list(event_store.read_all())
    assert [r.position for r in log] == [1, 2, 3, 4]
    assert [(r.aggregate_id, r.version) for r in log] == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]
    assert [r.position for r in event_store.read_all(after=2)] == [3, 4]
    assert [r.position for r in event_store.read_all(after=1, limit=2)] == [2, 3]
    assert list(event_store.read_all(after=4)) == []
    assert log[2].data == MoneyWithdrawn(amount=5)


def test_projection_upsert_get_all(store_url: str) -> None:
    projections = incident.open_projection_store(store_url)
    now = dt.datetime.now(dt.UTC)
    row = BankAccount(
        aggregate_id="A",
        account_number="A",
        balance=10,
        version=1,
        event_id=str(uuid.uuid4()),
        event_date=now,
    )
    assert projections.get(BankAccount, "A") is None
    assert projections.project(row) == row
    assert projections.get(BankAccount, "A") == row
    newer = BankAccount(
        aggregate_id="A",
        account_number="A",
        balance=20,
        version=2,
        event_id=str(uuid.uuid4()),
        event_date=now,
    )
    projections.project(newer)
    assert projections.get(BankAccount, "A") == newer
    assert projections.all(BankAccount) == [newer]
    assert projections.all(Transfer) == []
    projections.close()


def test_projection_never_moves_backwards(store_url: str) -> None:
    """A projection of a lower version never replaces a stored newer one."""
    projections = incident.open_projection_store(store_url)
    now = dt.datetime.now(dt.UTC)

    def row(version: int, balance: int) -> BankAccount:
        return BankAccount(
            aggregate_id="A",
            account_number="A",
            balance=balance,
            version=version,
            event_id=str(uuid.uuid4()),
            event_date=now,
        )

    projections.project(row(5, 50))
    winner = projections.project(row(3, 30))
    assert winner.version == 5
    stored = projections.get(BankAccount, "A")
    assert stored is not None
    assert (stored.version, stored.balance) == (5, 50)
    projections.close()


def test_projection_without_key_is_refused(store_url: str) -> None:
    projections = incident.open_projection_store(store_url)

    class Keyless(incident.Projection):
        name: str

    with pytest.raises(incident.IncidentError, match="aggregate_id"):
        projections.project(Keyless(name="x"))
    projections.close()


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


def test_events_are_the_stream_without_envelopes(event_store: incident.EventStore) -> None:
    """events() yields the bare events after a version, in order, from registered types
    (one decoder for the batch) and from unregistered ones (resolved by name) alike."""
    event_store.append("acc-1", deposited(1, 2, 3), expected_version=0)
    event_store.append("acc-2", deposited(9), expected_version=0)

    def amounts(after: int = 0) -> list[tuple[str, int]]:
        return [(type(e).__name__, e.amount) for e in event_store.events("acc-1", after=after)]  # type: ignore[attr-defined]

    assert amounts() == [("MoneyDeposited", 1), ("MoneyDeposited", 2), ("MoneyDeposited", 3)]
    event_store.types.register(MoneyDeposited, MoneyWithdrawn)
    assert amounts() == [("MoneyDeposited", 1), ("MoneyDeposited", 2), ("MoneyDeposited", 3)]
    assert amounts(after=2) == [("MoneyDeposited", 3)]
    assert amounts(after=3) == []
    assert list(event_store.events("nobody")) == []


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
