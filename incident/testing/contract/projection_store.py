"""The projection store contract: upserts guarded by version, and read-model columns that
mean the same on every store."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from typing import Annotated, Literal

import msgspec
import pytest

from ... import errors
from ...examples.bank import BankAccount, Transfer
from ...messages import Projection
from ...stores import ProjectionStore
from .exactly import same_value
from .fixtures import StoreFixtures

__all__ = ["ProjectionStoreContract", "Reading", "Typed", "account_row"]


class Reading(Projection):
    """A read model with an int column and both kinds of datetime column."""

    aggregate_id: str
    count: int = 0
    at: dt.datetime | None = None
    wall: Annotated[dt.datetime, msgspec.Meta(tz=False)] | None = None
    version: int = 1


class Typed(Projection):
    """A read model whose fields hold only their declared types, one of them named like
    the alias a store might give its table in SQL (``t``)."""

    aggregate_id: str
    kind: Literal["a", "b"] = "a"
    count: int = 0
    ok: bool = False
    t: int = 0


class CasedFields(Projection):
    """Two fields one column apart only by case: one column on SQLite."""

    aggregate_id: str
    Name: str = ""
    name: str = ""


class LongFields(Projection):
    """Two field names that Postgres would cut to the same 63 bytes."""

    aggregate_id: str
    a_field_name_long_enough_to_go_well_past_what_postgres_keeps_of_it_1: int = 1
    a_field_name_long_enough_to_go_well_past_what_postgres_keeps_of_it_2: int = 2


class SystemField(Projection):
    """A field named like a column Postgres gives every table."""

    aggregate_id: str
    xmin: int = 0


class NamelessField(Projection):
    """A field encoded under an empty name."""

    aggregate_id: str
    x: int = msgspec.field(default=0, name="")


def account_row(key: str, *, version: int, balance: int) -> BankAccount:
    """A Bank ``BankAccount`` read model row of that version and balance."""
    return BankAccount(
        aggregate_id=key,
        account_number=key,
        balance=balance,
        version=version,
        event_id=str(uuid.uuid4()),
        event_date=dt.datetime.now(dt.UTC),
    )


class ProjectionStoreContract(StoreFixtures):
    """What every :class:`~incident.ProjectionStore` does: upsert by key, never move a
    read model backwards, and store exactly the column values it can give back. Its tests
    take the ``projection_store`` fixture."""

    @pytest.fixture
    def in_tokyo(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """The process (TZ) and libpq session (PGTZ) time zone is Asia/Tokyo for the test,
        not UTC. A test asks for it before its stores, which are then opened under it."""
        monkeypatch.setenv("PGTZ", "Asia/Tokyo")
        monkeypatch.setenv("TZ", "Asia/Tokyo")
        time.tzset()
        yield
        monkeypatch.undo()
        time.tzset()

    def test_projection_upsert_get_all(self, projection_store: ProjectionStore) -> None:
        row = account_row("A", version=1, balance=10)
        assert projection_store.get(BankAccount, "A") is None
        assert projection_store.project(row) == row
        assert same_value(row, projection_store.get(BankAccount, "A"))
        newer = account_row("A", version=2, balance=20)
        projection_store.project(newer)
        assert same_value(newer, projection_store.get(BankAccount, "A"))
        assert same_value([newer], projection_store.all(BankAccount))
        assert projection_store.all(Transfer) == []

    def test_projection_never_moves_backwards(self, projection_store: ProjectionStore) -> None:
        """A projection of a lower version never replaces a stored newer one."""
        projection_store.project(account_row("A", version=5, balance=50))
        winner = projection_store.project(account_row("A", version=3, balance=30))
        assert winner.version == 5
        stored = projection_store.get(BankAccount, "A")
        assert stored is not None
        assert (stored.version, stored.balance) == (5, 50)

    def test_projection_without_key_is_refused(self, projection_store: ProjectionStore) -> None:
        class Keyless(Projection):
            name: str

        with pytest.raises(errors.IncidentError, match="aggregate_id"):
            projection_store.project(Keyless(name="x"))

    def test_read_model_integers_past_64_bits_are_refused(
        self, projection_store: ProjectionStore
    ) -> None:
        """An int column holds signed 64 bits on every store: the limits come back, one
        past either is refused with Unstorable naming the field, and nothing is written."""
        for count in (2**63, -(2**63) - 1):
            with pytest.raises(errors.Unstorable) as caught:
                projection_store.project(Reading(aggregate_id="r", count=count))
            assert caught.value.field == "count"
        assert projection_store.get(Reading, "r") is None
        for count in (2**63 - 1, -(2**63)):
            projection_store.project(Reading(aggregate_id="r", count=count))
            assert projection_store.get(Reading, "r") == Reading(aggregate_id="r", count=count)

    def test_read_model_datetimes_follow_one_rule_in_any_time_zone(
        self, in_tokyo: None, projection_store: ProjectionStore
    ) -> None:
        """Under a process and Postgres session zone of Asia/Tokyo, an aware datetime
        comes back as the same instant in UTC, a naive one in a tz=False field with the
        same wall time; a naive one where an instant is stored, or an aware one in a
        tz=False field, is refused naming the field and what to declare."""
        india = dt.timezone(dt.timedelta(hours=5, minutes=30))
        for at in (
            dt.datetime(2024, 5, 1, 7, 8, tzinfo=dt.UTC),
            dt.datetime(2024, 5, 1, 7, 8, tzinfo=india),
        ):
            projection_store.project(
                Reading(aggregate_id="r", at=at, wall=dt.datetime(2024, 5, 1, 7, 8))
            )
            got = projection_store.get(Reading, "r")
            assert got is not None and got.at == at and got.at.utcoffset() == dt.timedelta(0)
            assert got.wall == dt.datetime(2024, 5, 1, 7, 8) and got.wall.tzinfo is None
        with pytest.raises(errors.Unstorable, match="tz=False") as caught:
            projection_store.project(Reading(aggregate_id="r", at=dt.datetime(2024, 5, 1, 7, 8)))
        assert caught.value.field == "at"
        with pytest.raises(errors.Unstorable, match="tz=False") as caught:
            projection_store.project(
                Reading(aggregate_id="r", wall=dt.datetime(2024, 5, 1, tzinfo=india))
            )
        assert caught.value.field == "wall"

    def test_a_value_not_of_its_declared_type_is_refused(
        self, projection_store: ProjectionStore
    ) -> None:
        """A field holding what its type does not allow (a value outside a Literal, a
        str or a bool for an int, an int for a bool) is refused with Unstorable naming the
        field, and nothing is written: the table stays readable."""
        for bad in (
            Typed(aggregate_id="x", kind="c"),  # type: ignore[arg-type]
            Typed(aggregate_id="x", count="5"),  # type: ignore[arg-type]
            Typed(aggregate_id="x", count=True),
            Typed(aggregate_id="x", ok=1),  # type: ignore[arg-type]
        ):
            with pytest.raises(errors.Unstorable, match=r"\$\.(kind|count|ok)"):
                projection_store.project(bad)
        assert projection_store.get(Typed, "x") is None
        good = Typed(aggregate_id="y", kind="b", count=3, ok=True, t=7)
        projection_store.project(good)
        # of the declared types too: not 3.0 for 3, nor 1 for True
        assert same_value(good, projection_store.get(Typed, "y"))
        assert same_value([good], projection_store.all(Typed))

    def test_an_instant_past_the_calendar_in_utc_is_refused(
        self, projection_store: ProjectionStore
    ) -> None:
        """An aware datetime whose instant falls outside years 1-9999 once in UTC (the
        first minutes of year 1 east of UTC, the last of 9999 west of it) is refused with
        Unstorable naming the field; the calendar's own ends in UTC are kept."""
        east, west = dt.timezone(dt.timedelta(hours=5)), dt.timezone(dt.timedelta(hours=-5))
        for at in (dt.datetime.min.replace(tzinfo=east), dt.datetime.max.replace(tzinfo=west)):
            with pytest.raises(errors.Unstorable) as caught:
                projection_store.project(Reading(aggregate_id="r", at=at))
            assert caught.value.field == "at"
        assert projection_store.get(Reading, "r") is None
        for at in (dt.datetime.min, dt.datetime(9999, 12, 31, 23, 59, 59)):
            projection_store.project(Reading(aggregate_id="r", at=at.replace(tzinfo=dt.UTC)))
            got = projection_store.get(Reading, "r")
            assert got is not None and got.at == at.replace(tzinfo=dt.UTC)

    def test_field_names_no_store_could_keep_are_refused(
        self, projection_store: ProjectionStore
    ) -> None:
        """A read model whose fields could not each be a column of their own on every
        store is refused on every store, naming the field, before any table is made."""
        for projection_type, field, why in (
            (CasedFields, "name", "case"),
            (LongFields, "a_field_name_long", "63 bytes"),
            (SystemField, "xmin", "Postgres"),
            (NamelessField, "x", "empty"),
        ):
            with pytest.raises(errors.IncidentError, match=why) as caught:
                projection_store.project(projection_type(aggregate_id="a"))
            assert field in str(caught.value)
            with pytest.raises(errors.IncidentError, match=why):
                projection_store.all(projection_type)

    def test_all_lists_rows_in_the_order_of_their_keys(
        self, projection_store: ProjectionStore
    ) -> None:
        """``all`` gives rows by key, in code point order (upper case before lower,
        accented letters after), whatever order they were written in and whatever the
        database's collation: the same list on every store."""
        for key in ("b", "é", "a", "B", "Z", "a2"):
            projection_store.project(Reading(aggregate_id=key))
        keys = [row.aggregate_id for row in projection_store.all(Reading)]
        assert keys == ["B", "Z", "a", "a2", "b", "é"]
