"""The event store contract: appends, reads and what a store gives back unchanged."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ... import errors
from ...command_handler import CommandHandler
from ...examples import bank
from ...examples.bank import MoneyDeposited, MoneyWithdrawn
from ...messages import ANY, Event
from ...stores import EventStore
from .arguments import ArgumentsContract
from .exactly import same_value
from .values import EVERYTHING, JSON_VALUES, LOOKALIKES, TEXT, Everything, Nested

__all__ = ["Everything", "EventStoreContract", "Measured", "Nested", "deposited", "nested"]


def deposited(*amounts: int) -> list[Event]:
    """One Bank ``MoneyDeposited`` event per amount: the events most tests append."""
    return [MoneyDeposited(amount=a) for a in amounts]


class Measured(Event):
    """An event with a float and loose fields, to offer values no store can keep."""

    celsius: float
    note: str = ""
    extra: Any = None


LMT = dt.timezone(dt.timedelta(minutes=19, seconds=32))  # Amsterdam's mean time, till 1937


def nested(depth: int) -> Any:
    """A list nested ``depth`` levels deep (itself included)."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


class EventStoreContract(ArgumentsContract):
    """What every :class:`~incident.EventStore` does: atomic appends guarded by the
    expected version, gapless reads in commit order, and exactly the values it accepts
    given back equal (``docs/storable.md``), and bad arguments refused alike
    (:class:`~incident.testing.contract.arguments.ArgumentsContract`). Its tests take the
    ``event_store`` fixture."""

    def test_append_then_get_returns_events_in_version_order(self, event_store: EventStore) -> None:
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

    def test_get_after_version_returns_only_newer_events(self, event_store: EventStore) -> None:
        event_store.append("acc-1", deposited(1, 2, 3), expected_version=0)
        assert [r.version for r in event_store.get("acc-1", after=1)] == [2, 3]
        assert event_store.version("acc-1") == 3
        assert event_store.version("nobody") == 0
        assert event_store.get("nobody") == []

    def test_stale_expected_version_raises_and_writes_nothing(
        self, event_store: EventStore
    ) -> None:
        event_store.append("acc-1", deposited(1), expected_version=0)
        with pytest.raises(errors.ConcurrencyError) as caught:
            event_store.append("acc-1", deposited(2, 3), expected_version=0)
        assert (caught.value.aggregate_id, caught.value.expected, caught.value.actual) == (
            "acc-1",
            0,
            1,
        )
        with pytest.raises(errors.ConcurrencyError):
            event_store.append("acc-1", deposited(2), expected_version=5)
        assert [r.data for r in event_store.get("acc-1")] == deposited(1)
        assert [r.position for r in event_store.read_all()] == [1]

    def test_any_appends_whatever_the_version(self, event_store: EventStore) -> None:
        event_store.append("acc-1", deposited(1), expected_version=ANY)
        event_store.append("acc-1", deposited(2), expected_version=ANY)
        assert [r.version for r in event_store.get("acc-1")] == [1, 2]

    def test_a_batch_with_a_bad_event_writes_nothing(self, event_store: EventStore) -> None:
        """An append is atomic: one bad item and none of the batch is stored."""
        with pytest.raises(errors.IncidentError):
            event_store.append(
                "acc-1",
                [MoneyDeposited(amount=1), "not an event"],  # type: ignore[list-item]
                expected_version=0,
            )
        with pytest.raises(errors.IncidentError):
            event_store.append(
                "acc-1", deposited(1), expected_version=0, metadata={"bad": object()}
            )
        assert event_store.get("acc-1") == []
        assert list(event_store.read_all()) == []

    def test_bad_expected_version_is_a_clear_error(self, event_store: EventStore) -> None:
        for bad in (-1, "1", None, 1.0):
            with pytest.raises(errors.IncidentError, match="expected_version"):
                event_store.append("acc-1", deposited(1), expected_version=bad)
        assert event_store.get("acc-1") == []

    def test_an_empty_append_writes_nothing(self, event_store: EventStore) -> None:
        assert event_store.append("acc-1", [], expected_version=0) == []
        assert event_store.version("acc-1") == 0

    def test_events_and_stream_read_one_stream(self, event_store: EventStore) -> None:
        """events() gives a stream's payloads (what a fold needs), stream() its envelopes
        lazily; both in version order, both honour ``after``. A store without stream()
        (it is not in the protocol, as events() is) skips this test."""
        if not hasattr(event_store, "stream"):
            pytest.skip(f"{type(event_store).__name__} has no stream()")
        event_store.append("a", deposited(1, 2), expected_version=0)
        event_store.append("b", deposited(5), expected_version=0)
        event_store.append("a", deposited(3), expected_version=2)
        assert list(event_store.events("a")) == deposited(1, 2, 3)
        assert list(event_store.events("a", after=2)) == deposited(3)
        assert list(event_store.events("nobody")) == []
        assert list(event_store.stream("a", after=1)) == event_store.get("a", after=1)

    def test_read_all_is_gapless_in_commit_order_and_pages(self, event_store: EventStore) -> None:
        event_store.append("a", deposited(1, 2), expected_version=0)
        event_store.append("b", [MoneyWithdrawn(amount=5)], expected_version=0)
        event_store.append("a", deposited(3), expected_version=2)
        log = list(event_store.read_all())
        assert [r.position for r in log] == [1, 2, 3, 4]
        assert [(r.aggregate_id, r.version) for r in log] == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("a", 3),
        ]
        assert [r.position for r in event_store.read_all(after=2)] == [3, 4]
        assert [r.position for r in event_store.read_all(after=1, limit=2)] == [2, 3]
        assert list(event_store.read_all(after=4)) == []
        assert list(event_store.read_all(limit=0)) == []
        assert log[2].data == MoneyWithdrawn(amount=5)
        # a version counts its own stream's events, not the log's
        assert (event_store.version("a"), event_store.version("b")) == (3, 1)

    def test_a_negative_limit_is_refused(self, event_store: EventStore) -> None:
        """A limit is None or a count: -1 is a typed error at the call, not an empty log."""
        event_store.append("a", deposited(1), expected_version=0)
        with pytest.raises(errors.IncidentError, match="limit"):
            event_store.read_all(limit=-1)

    def test_events_are_the_stream_without_envelopes(self, event_store: EventStore) -> None:
        """events() yields the bare events after a version, in order, from registered
        types (one decoder for the batch) and from unregistered ones (resolved by name)."""
        event_store.append("acc-1", deposited(1, 2, 3), expected_version=0)
        event_store.append("acc-2", deposited(9), expected_version=0)

        def amounts(after: int = 0) -> list[tuple[str, int]]:
            return [
                (type(e).__name__, e.amount)  # type: ignore[attr-defined]
                for e in event_store.events("acc-1", after=after)
            ]

        assert amounts() == [("MoneyDeposited", 1), ("MoneyDeposited", 2), ("MoneyDeposited", 3)]
        event_store.types.register(MoneyDeposited, MoneyWithdrawn)
        assert amounts() == [("MoneyDeposited", 1), ("MoneyDeposited", 2), ("MoneyDeposited", 3)]
        assert amounts(after=2) == [("MoneyDeposited", 3)]
        assert amounts(after=3) == []
        assert list(event_store.events("nobody")) == []

    # -- what a store accepts, it gives back unchanged (docs/storable.md) -------------------

    @pytest.mark.parametrize(
        "event, field",
        [
            (Measured(celsius=math.nan), "celsius"),
            (Measured(celsius=math.inf), "celsius"),
            (Measured(celsius=1.0, extra={"a": [-math.inf]}), "extra['a'][0]"),
            (Measured(celsius=1.0, extra=math.nan), "extra"),
            (Measured(celsius=1.0, note="\udc80"), "note"),
            (Measured(celsius=1.0, note="a\x00b"), "note"),
            (Measured(celsius=1.0, extra=nested(10_000)), None),
            (Measured(celsius=1.0, extra=nested(64)), None),
            (Measured(celsius=1.0, extra=(1, 2)), "extra"),
            (Measured(celsius=1.0, extra=dt.datetime(1900, 1, 1, tzinfo=LMT)), "extra"),
        ],
        ids=[
            "nan",
            "inf",
            "nested-inf",
            "any-nan",
            "surrogate",
            "nul",
            "deep",
            "just-too-deep",
            "tuple-in-any",
            "offset-seconds",
        ],
    )
    def test_an_event_no_store_can_give_back_is_refused_and_nothing_is_written(
        self, event_store: EventStore, event: Event, field: str | None
    ) -> None:
        """Non-finite floats, lone surrogates, NUL and nesting past 64 levels are refused
        with Unstorable (a ValueError) naming the field, on every store alike, before any
        write."""
        with pytest.raises(errors.Unstorable) as caught:
            event_store.append("m-1", [MoneyDeposited(amount=1), event], expected_version=0)
        assert isinstance(caught.value, ValueError)
        if field is not None:
            assert caught.value.field == field
        assert len(str(caught.value)) < 300
        assert event_store.get("m-1") == []

    def test_nesting_up_to_the_limit_comes_back(self, event_store: EventStore) -> None:
        """An event nested exactly 64 levels deep (itself included) is stored and read
        back."""
        event = Measured(celsius=1.0, extra=nested(63))
        event_store.append("m-1", [event], expected_version=0)
        assert [r.data for r in event_store.get("m-1")] == [event]

    @pytest.mark.parametrize(
        "aggregate_id",
        ["x" * 256, "x" * 10_000, "a\x00b", "a\udc80"],
        ids=["256", "10000", "nul", "surrogate"],
    )
    def test_an_id_no_store_can_keep_is_refused_with_a_short_message(
        self, event_store: EventStore, aggregate_id: str
    ) -> None:
        """Ids longer than 255 characters, or holding NUL or a lone surrogate, are refused
        by every store, with a message that quotes at most 80 characters of the id."""
        with pytest.raises(errors.Unstorable, match="aggregate_id") as caught:
            event_store.append(aggregate_id, deposited(1), expected_version=0)
        assert len(str(caught.value)) < 200
        assert event_store.read_all() is not None and list(event_store.read_all()) == []

    @pytest.mark.parametrize(
        "aggregate_id",
        ["x" * 10_000, "a\x00b", "a\udc80", "\ud800"],
        ids=["10000", "nul", "surrogate", "lone-high"],
    )
    def test_an_id_no_store_can_keep_reads_as_an_empty_stream(
        self, event_store: EventStore, aggregate_id: str
    ) -> None:
        """No stream can have such an id, so every read of one is empty, on every store as
        on memory: no UnicodeEncodeError, no StoreError."""
        app = CommandHandler(event_store, aggregates=[bank.bank_account])
        assert event_store.get(aggregate_id) == []
        assert list(event_store.events(aggregate_id)) == []
        if hasattr(event_store, "stream"):  # not in the protocol
            assert list(event_store.stream(aggregate_id)) == []
        assert event_store.version(aggregate_id) == 0
        assert app.state(bank.bank_account, aggregate_id) == bank.AccountState()
        assert app.projection_store.get(bank.BankAccount, aggregate_id) is None

    def test_an_id_of_255_characters_is_kept(self, event_store: EventStore) -> None:
        """The longest id allowed, 255 characters of any script, round-trips."""
        aggregate_id = "é" * 255
        event_store.append(aggregate_id, deposited(1), expected_version=0)
        assert event_store.get(aggregate_id)[0].aggregate_id == aggregate_id

    @pytest.mark.parametrize(
        "metadata, field",
        [
            ({"tags": {"a"}}, "['tags']"),
            ({"pair": (1, 2)}, "['pair']"),
            ({"by_id": {1: "a"}}, "['by_id']"),
            ({"at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}, "['at']"),
            ({"raw": b"\x00"}, "['raw']"),
            ({"x": math.nan}, "['x']"),
            ({"x": nested(10_000)}, None),
            ({"x": "\udc80"}, "['x']"),
        ],
        ids=["set", "tuple", "int-key", "datetime", "bytes", "nan", "deep", "surrogate"],
    )
    def test_metadata_that_is_not_plain_json_is_refused(
        self, event_store: EventStore, metadata: dict[str, Any], field: str | None
    ) -> None:
        """Metadata holds str keys and str/int/float/bool/None/list/dict values only:
        anything else would come back changed on some store, so every store refuses it."""
        with pytest.raises(errors.Unstorable, match="metadata") as caught:
            event_store.append("m-1", deposited(1), expected_version=0, metadata=metadata)
        assert field is None or caught.value.field == field
        assert event_store.get("m-1") == []

    def test_plain_metadata_comes_back_unchanged(self, event_store: EventStore) -> None:
        """Plain JSON metadata, nested, with big integers, bools and -0.0, is read back
        as it was: equal, and of the same types (not 1 for True, nor a float for 2**70)."""
        metadata = {
            "user": "ann",
            "n": 2**70,
            "r": 0.1,
            "z": -0.0,
            "ok": True,
            "none": None,
            "l": [{"a": [1, 1.0, False]}],
        }
        event_store.append("m-1", deposited(1), expected_version=0, metadata=metadata)
        got = event_store.get("m-1")[0].metadata
        assert same_value(metadata, got), f"appended {metadata!r}, read back {got!r}"

    def test_whatever_a_store_accepts_comes_back_equal(self, event_store: EventStore) -> None:
        """Generated events of every field kind, with plain JSON metadata, read back as
        appended (30 examples a store, and one of values ``==`` takes for others): equal,
        and of the same types, floats with their sign, datetimes at their offset."""
        streams = iter(range(10**6))

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(event=EVERYTHING, metadata=st.dictionaries(TEXT, JSON_VALUES, max_size=3))
        @example(event=LOOKALIKES, metadata={"ok": True, "n": 2**70, "z": -0.0})
        def round_trip(event: Everything, metadata: dict[str, Any]) -> None:
            aggregate_id = f"s-{next(streams)}"
            event_store.append(aggregate_id, [event], expected_version=0, metadata=metadata)
            [got] = event_store.get(aggregate_id)
            assert same_value(event, got.data), f"appended {event!r}, read back {got.data!r}"
            assert same_value(metadata, got.metadata), f"read back {got.metadata!r}"

        round_trip()
