"""Edges of the pure core and the shared store code: what is refused at declaration,
what every store refuses or gives back alike (the storable rule inside dataclasses and
enums, the sign of zero), and the error paths of registries and read-model tables."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import math
import sys
import uuid
from collections.abc import Callable
from contextlib import closing
from typing import Annotated, Any, ClassVar, Literal

import hypothesis
import msgspec
import pytest
from conftest import on_backends
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine

import incident
from incident import mapper, storable
from incident.event_handler import command_key, keyed_steps
from incident.event_types import EventTypes
from incident.examples import bank
from incident.stores import checkpoint_store_for, read_model_rows
from incident.stores.combining import DONE, LEADS, TAKEN, Combiner, Ticket
from incident.stores.unnumbered import Placeholders, PositionNotKnownYet
from incident.testing.strategies import commands, invalid_commands

# -- an Aggregate's name is refused where it is declared --------------------------------


@pytest.mark.parametrize("name", ["bank\x00account", "bank\udc80", "", 7, None])
def test_an_aggregate_name_no_store_keeps_is_refused_at_declaration(name: Any) -> None:
    """A name is stored with every event of the aggregate's streams: one with a NUL or a
    lone surrogate, an empty one or one that is not a str is a RegistrationError when
    the Aggregate is declared, not an Unstorable at its first dispatch."""
    with pytest.raises(incident.RegistrationError, match="name"):
        incident.Aggregate(name, initial=0)


def test_a_refused_aggregate_name_says_which_rule() -> None:
    with pytest.raises(incident.RegistrationError, match="NUL"):
        incident.Aggregate("a\x00b", initial=0)
    with pytest.raises(incident.RegistrationError, match="surrogate"):
        incident.Aggregate("a\udc80", initial=0)


# -- the sign of zero --------------------------------------------------------------------


class Drifted(incident.Event, tag="core_edges_drifted"):
    x: float
    anything: Any = None


class Drift(incident.Projection):
    aggregate_id: str
    x: float = 1.0
    xs: list[float] = msgspec.field(default_factory=list)
    anything: Any = None
    label: str = ""


def _sign(value: float) -> float:
    return math.copysign(1.0, value)


def test_a_read_model_keeps_no_sign_of_zero_on_any_store(store_url: str) -> None:
    """-0.0 in a read model (a float column, a nested list, an Any field) reads back as
    0.0 with a positive sign on every store, as neither SQLite's REAL nor Postgres's
    jsonb keeps it; a str that spells "-0.0" is untouched."""
    with closing(incident.open_projection_store(store_url)) as projections:
        projections.project(
            Drift(aggregate_id="d", x=-0.0, xs=[-0.0, -0.5], anything={"z": -0.0}, label="-0.0")
        )
        (stored,) = projections.all(Drift)
        got = projections.get(Drift, "d")
    for row in (stored, got):
        assert row is not None
        assert row.x == 0.0 and _sign(row.x) == 1.0
        assert [_sign(v) for v in row.xs] == [1.0, -1.0] and row.xs == [0.0, -0.5]
        assert row.anything == {"z": 0.0} and _sign(row.anything["z"]) == 1.0
        assert row.label == "-0.0"


def test_events_and_metadata_keep_the_sign_of_zero_on_every_store(store_url: str) -> None:
    """Event payloads and metadata are kept as the JSON text written, so -0.0 comes back
    -0.0 on every store."""
    with closing(incident.open_event_store(store_url)) as store:
        store.initialize()
        store.append(
            "s",
            [Drifted(x=-0.0, anything=[-0.0])],
            expected_version=0,
            aggregate="drift",
            metadata={"z": -0.0},
        )
        (recorded,) = store.read_all()
    assert _sign(recorded.data.x) == -1.0 and _sign(recorded.data.anything[0]) == -1.0
    assert _sign(recorded.metadata["z"]) == -1.0


def test_unsigned_zeros_touches_numbers_only() -> None:
    """Strings (with escaped quotes and backslashes) and numbers that only start like
    -0.0 are left as they are."""
    value = {"a": -0.0, "b": [-0.05, -0.001, -0.0], "c": 'x\\"-0.0', "-0.0": -0.0, "d": "\\"}
    data = msgspec.json.encode(value)
    back = msgspec.json.decode(read_model_rows.unsigned_zeros(data))
    assert back == value
    assert [_sign(back[k]) for k in ("a", "-0.0")] == [1.0, 1.0]
    assert [_sign(v) for v in back["b"]] == [-1.0, -1.0, 1.0]
    assert back["c"] == 'x\\"-0.0' and back["d"] == "\\"


# -- the storable rule inside dataclasses and enums --------------------------------------


@dataclasses.dataclass
class Point:
    x: float
    label: str = ""


class Colour(enum.Enum):
    NUL = "a\x00b"
    PLAIN = "plain"


class Placed(incident.Event, tag="core_edges_placed"):
    point: Point
    anything: Any = None


class Painted(incident.Event, tag="core_edges_painted"):
    colour: Colour


class Spot(incident.Projection):
    aggregate_id: str
    point: Point | None = None


BAD_POINTS = {
    "nul": (Point(1.0, "a\x00b"), "NUL"),
    "surrogate": (Point(1.0, "\udc80"), "surrogate"),
    "nan": (Point(math.nan), "finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_POINTS))
def test_a_dataclass_in_an_event_is_checked_like_a_struct(store_url: str, case: str) -> None:
    """A NUL, a lone surrogate or a NaN inside a dataclass field is Unstorable naming the
    field, on every store, and nothing is written (memory and SQLite took the NUL, and
    Postgres refused it only as a driver error for a read model)."""
    point, rule = BAD_POINTS[case]
    with closing(incident.open_event_store(store_url)) as store:
        store.initialize()
        for event in (Placed(point=point), Placed(point=Point(0.0), anything=point)):
            with pytest.raises(incident.Unstorable, match=rule) as raised:
                store.append("s", [event], expected_version=0)
            assert raised.value.field in ("point.label", "point.x", "anything.label", "anything.x")
        assert list(store.read_all()) == [] and store.version("s") == 0


@pytest.mark.parametrize("case", sorted(BAD_POINTS))
def test_a_dataclass_in_a_read_model_is_checked_like_a_struct(store_url: str, case: str) -> None:
    point, rule = BAD_POINTS[case]
    with closing(incident.open_projection_store(store_url)) as projections:
        with pytest.raises(incident.Unstorable, match=rule):
            projections.project(Spot(aggregate_id="p", point=point))
        assert projections.get(Spot, "p") is None
        projections.project(Spot(aggregate_id="p", point=Point(2.5, "fine")))
        assert projections.get(Spot, "p") == Spot(aggregate_id="p", point=Point(2.5, "fine"))


def test_an_enum_value_with_a_nul_is_refused_on_every_store(store_url: str) -> None:
    """An enum is written as its value, so a value with a NUL breaks the rule as a str
    would (the type's plan counted enums as scalars and skipped the scan)."""
    with closing(incident.open_event_store(store_url)) as store:
        store.initialize()
        with pytest.raises(incident.Unstorable, match="NUL"):
            store.append("s", [Painted(colour=Colour.NUL)], expected_version=0)
        assert list(store.read_all()) == []
        store.append("s", [Painted(colour=Colour.PLAIN)], expected_version=0)
        assert [r.data for r in store.read_all()] == [Painted(colour=Colour.PLAIN)]


class Keyed(incident.Event, tag="core_edges_keyed"):
    values: dict[str, int]


class Pair(incident.Event, tag="core_edges_pair"):
    pair: tuple[int, str]


class Node(msgspec.Struct):
    label: str
    children: list[Node] = msgspec.field(default_factory=list)


class Tree(incident.Event, tag="core_edges_tree"):
    root: Node


def _nested_type(depth: int) -> Any:
    found: Any = str
    for _ in range(depth):
        found = list[found]
    return found


Deep = msgspec.defstruct("Deep", [("value", _nested_type(storable.MAX_DEPTH + 2))])


def _nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


class Opaque(incident.Event, tag="core_edges_opaque"):
    value: Any


@pytest.mark.parametrize(
    ("event", "rule"),
    [
        (Keyed(values={"a\x00": 1}), "the key"),
        (Pair(pair=(1, "a\x00")), "NUL"),
        (Tree(root=Node("top", [Node("a\x00")])), "NUL"),
    ],
    ids=["dict-key", "fixed-tuple", "recursive-struct"],
)
def test_the_rule_reaches_into_every_declared_shape(
    event_store: incident.EventStore, event: incident.Event, rule: str
) -> None:
    """A NUL in a dict key, in a fixed tuple, or deep in a recursive struct is refused on
    every store (each shape has its own plan of what to scan for), nothing written."""
    event_store.initialize()
    with pytest.raises(incident.Unstorable, match=rule):
        event_store.append("s", [event], expected_version=0)
    assert event_store.version("s") == 0


def test_a_declared_type_nested_past_the_limit_is_scanned() -> None:
    """A declared type deeper than MAX_DEPTH may hold anything, so its values are always
    scanned: a NUL at the bottom is found."""
    with pytest.raises(incident.Unstorable, match="nests deeper"):
        storable.checked_json(Deep(value=_nested(storable.MAX_DEPTH + 2, "a\x00")), "event")
    assert storable.plan_of(Deep) == (True, True, True)


def test_a_type_msgspec_cannot_inspect_is_scanned_for_everything() -> None:
    class Odd:
        pass

    assert storable.plan_of(Odd) == (True, True, True)


def test_the_encoder_failing_where_the_walk_sees_nothing_is_still_unstorable(
    event_store: incident.EventStore,
) -> None:
    """A lone surrogate msgspec meets where the walk does not look (an enum used as a
    dict key) is refused as not encodable, nothing written."""

    class Key(enum.Enum):
        BAD = "\udc80"

    event_store.initialize()
    with pytest.raises(incident.Unstorable, match="could not be encoded"):
        event_store.append("s", [Opaque(value={Key.BAD: 1})], expected_version=0)
    assert event_store.version("s") == 0


def test_a_metadata_key_with_a_nul_is_refused(event_store: incident.EventStore) -> None:
    event_store.initialize()
    with pytest.raises(incident.Unstorable, match="the key") as raised:
        event_store.append("s", [Drifted(x=1.0)], expected_version=0, metadata={"ok": {"a\x00": 1}})
    assert raised.value.what == "metadata"
    assert event_store.version("s") == 0


@pytest.mark.parametrize("aggregate_id", ["", 7])
def test_an_empty_or_non_str_stream_id_is_refused_on_append(
    event_store: incident.EventStore, aggregate_id: Any
) -> None:
    event_store.initialize()
    with pytest.raises(incident.Unstorable, match="non-empty str"):
        event_store.append(aggregate_id, [Drifted(x=1.0)], expected_version=0)
    assert list(event_store.read_all()) == []


class Counted(incident.Event, tag="core_edges_counted"):
    n: int


def test_an_event_that_does_not_decode_as_its_type_is_refused(
    event_store: incident.EventStore,
) -> None:
    """A struct does not check its fields when built: a str in an int field is refused
    at the door on every store, nothing written."""
    event_store.initialize()
    with pytest.raises(incident.Unstorable, match="Expected `int`"):
        event_store.append("s", [Counted(n="three")], expected_version=0)  # type: ignore[arg-type]
    assert event_store.version("s") == 0


# -- read-model rows and tables ----------------------------------------------------------


class Stamp(incident.Projection):
    aggregate_id: str
    at: dt.datetime | None = None


def test_read_model_datetime_columns_refuse_what_they_cannot_keep(store_url: str) -> None:
    """An offset with seconds, a str in a datetime field and an id with a NUL are each
    Unstorable on every store, and nothing is written."""
    odd = dt.timezone(dt.timedelta(minutes=19, seconds=32))
    with closing(incident.open_projection_store(store_url)) as projections:
        with pytest.raises(incident.Unstorable, match="whole minutes"):
            projections.project(Stamp(aggregate_id="a", at=dt.datetime(1900, 1, 1, tzinfo=odd)))
        with pytest.raises(incident.Unstorable, match="datetime"):
            projections.project(Stamp(aggregate_id="a", at="2024-01-01"))  # type: ignore[arg-type]
        with pytest.raises(incident.Unstorable, match="NUL"):
            projections.project(Stamp(aggregate_id="a\x00"))
        assert projections.all(Stamp) == []


class Shade(enum.Enum):
    LIGHT = "light"
    DARK = "dark"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 2


class Choices(incident.Projection):
    aggregate_id: str
    shade: Shade = Shade.LIGHT
    size: Size = Size.SMALL
    level: Literal[1, 2, 3] = 1
    count: Annotated[int, msgspec.Meta(ge=0)] = 0
    maybe: Annotated[int | None, msgspec.Meta(description="optional")] = None


def test_enum_literal_and_annotated_columns_round_trip(store_url: str) -> None:
    """Columns of str enums, int enums, int literals and Annotated types keep their
    values on every store."""
    row = Choices(aggregate_id="c", shade=Shade.DARK, size=Size.LARGE, level=3, count=5, maybe=7)
    with closing(incident.open_projection_store(store_url)) as projections:
        projections.project(row)
        projections.project(Choices(aggregate_id="d"))
        assert projections.all(Choices) == [row, Choices(aggregate_id="d")]


class BadTableName(incident.Projection):
    aggregate_id: str
    table_name: ClassVar[Any] = 5


class IntKeyed(incident.Projection):
    aggregate_id: int


def test_read_model_types_no_table_can_hold_are_refused(store_url: str) -> None:
    """A table_name that is not a str, and an aggregate_id that is not a str, are
    IncidentErrors naming the type, on every store."""
    with closing(incident.open_projection_store(store_url)) as projections:
        with pytest.raises(incident.IncidentError, match="table_name must be a str"):
            projections.all(BadTableName)
        with pytest.raises(incident.IncidentError, match="aggregate_id: str"):
            projections.all(IntKeyed)


def test_a_memory_row_that_no_longer_decodes_is_an_incident_error() -> None:
    """A class redefined under the same name with a field of another type reads the old
    row as an IncidentError naming the row, not a msgspec error."""
    projections = incident.open_projection_store("memory://")

    class Gauge(incident.Projection):
        aggregate_id: str
        level: str = "high"

    projections.project(Gauge(aggregate_id="g"))

    class Gauge(incident.Projection):  # type: ignore[no-redef]
        aggregate_id: str
        level: int = 0

    with pytest.raises(incident.IncidentError, match=r"'g'.*does not decode"):
        projections.get(Gauge, "g")


# -- registries ----------------------------------------------------------------------------


class Add(incident.Command):
    aggregate_id: str


class Added(incident.Event, tag="core_edges_added"):
    pass


def test_aggregate_registration_errors() -> None:
    """A snapshot_version that is not an int, an upcast from version 0 and a second
    terminal predicate are RegistrationErrors; handles() says which commands it takes."""
    with pytest.raises(incident.RegistrationError, match="snapshot_version"):
        incident.Aggregate("a", initial=0, snapshot_version="2")  # type: ignore[arg-type]
    counter = incident.Aggregate("counter", initial=0)
    with pytest.raises(incident.RegistrationError, match="from_version"):
        counter.upcast(Added, 0)
    counter.terminal(lambda state: state > 3)
    with pytest.raises(incident.RegistrationError, match="already has the terminal"):
        counter.terminal(lambda state: False)

    @counter.execute
    def add(state: int, command: Add) -> Added:
        return Added()

    class Other(incident.Command):
        aggregate_id: str

    assert counter.handles(Add(aggregate_id="x")) and not counter.handles(Other(aggregate_id="x"))


def test_two_classes_under_one_name_in_one_registration_are_refused() -> None:
    class First(incident.Event, tag="core_edges_same"):
        pass

    class Second(incident.Event, tag="core_edges_same"):
        pass

    types = EventTypes()
    with pytest.raises(incident.RegistrationError, match="core_edges_same"):
        types.register(First, Second, owner="a")
    assert types.resolve("core_edges_same") is not None  # the fallback, none registered
    types.register(First, owner="a")


def _make_upcaster() -> Callable[[dict[str, Any]], dict[str, Any]]:
    def lift(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    return lift


def test_an_upcaster_defined_again_by_its_owner_takes_over() -> None:
    """The same function defined again (same module and name, a notebook cell run twice)
    replaces the first for the same owner; another owner's is refused."""
    types = EventTypes()
    first, again = _make_upcaster(), _make_upcaster()
    types.register_upcaster("core_edges_lifted", 1, first, owner="a")
    types.register_upcaster("core_edges_lifted", 1, again, owner="a")
    with pytest.raises(incident.RegistrationError, match="both upcast"):
        types.register_upcaster("core_edges_lifted", 1, _make_upcaster(), owner="b")


class Opened(incident.Event, tag="core_edges_opened"):
    number: str


class Kinded(incident.Event, tag="core_edges_kinded", tag_field="kind"):
    number: str


def test_decode_joined_stands_aside_when_it_cannot_decode_in_one_call() -> None:
    """Damaged payloads and types that cannot share one tagged union give None (the
    store then decodes row by row), never an error."""
    types = EventTypes([Opened])
    assert types.decode_joined('{"type":"core_edges_opened","number":1}', 1) is None
    assert types.decode_joined('{"type":"core_edges_opened","number":"A"}', 2) is None
    mixed = EventTypes([Opened, Kinded])
    assert mixed.decode_joined('{"type":"core_edges_opened","number":"A"}', 1) is None


# -- the store openers ---------------------------------------------------------------------


def test_memory_urls_take_no_path_or_options() -> None:
    with pytest.raises(incident.IncidentError, match="no path or options"):
        incident.open_event_store("memory://somewhere")
    with pytest.raises(incident.IncidentError, match="no path or options"):
        incident.open_event_store("memory://", timeout=3)


def test_a_backend_that_does_not_import_is_an_incident_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing driver is an IncidentError saying which extra to install."""
    monkeypatch.setitem(sys.modules, "incident.stores.postgres", None)
    with pytest.raises(incident.IncidentError, match=r"incident\[postgres\]"):
        incident.open_event_store("postgresql://nowhere/db")


def test_checkpoint_store_for_a_store_without_checkpoints() -> None:
    with pytest.raises(incident.IncidentError, match="keeps no checkpoints"):
        checkpoint_store_for(object())  # type: ignore[arg-type]


def test_memory_events_with_projections_in_another_database(tmp_path: Any) -> None:
    """A memory event store writing projections to a SQLite store commits the events,
    then writes the projections there."""
    events = incident.open_event_store("memory://")
    with closing(incident.open_projection_store(f"sqlite:///{tmp_path / 'p.db'}")) as other:
        assert not events.shares_database_with(other)
        events.append_and_project(
            "d",
            [Drifted(x=2.0)],
            expected_version=0,
            aggregate="drift",
            metadata=None,
            projection_store=other,
            project=lambda recorded: [Drift(aggregate_id="d", x=recorded[0].data.x)],
        )
        assert other.get(Drift, "d") == Drift(aggregate_id="d", x=2.0)
    assert events.version("d") == 1


# -- damaged envelopes ---------------------------------------------------------------------


@on_backends(["sqlite"])
def test_an_unreadable_event_date_is_a_corrupt_event(
    event_store: incident.EventStore,
    edit_raw_event: Callable[[int, dict[str, object] | None], None],
) -> None:
    """A stored event date that is not a date reads as a CorruptEvent naming the row."""
    event_store.initialize()
    event_store.append("s", [Drifted(x=1.0)], expected_version=0)
    edit_raw_event(1, {"event_date": "not a date"})
    with pytest.raises(incident.CorruptEvent, match="bad envelope") as raised:
        list(event_store.read_all())
    assert raised.value.position == 1


# -- holes in what was read ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("after", "versions", "positions", "missing", "at", "problem"),
    [
        (
            0,
            [1, 2, 4],
            [7, 8, 9],
            3,
            9,
            "version 3 is missing: the stream goes from version 2 to 4",
        ),
        (0, [2, 3], [], 1, None, "version 1 is missing: the stream goes from version 0 to 2"),
        (5, [6, 6], [1, 2], 7, 2, "version 7 is missing: the stream goes from version 6 to 6"),
        (0, [1, 3, 2], [], 2, None, "version 2 is missing: the stream goes from version 1 to 3"),
    ],
)
def test_gap_in_versions_names_the_first_missing_version(
    after: int, versions: list[int], positions: list[int], missing: int, at: Any, problem: str
) -> None:
    found = mapper.gap_in_versions("s", after, versions, positions)
    assert found is not None
    assert (found.version, found.position, found.problem) == (missing, at, problem)
    assert mapper.gap_in_versions("s", after, list(range(after + 1, after + 4))) is None
    assert mapper.gap_in_versions("s", after, []) is None


@pytest.mark.parametrize(
    ("after", "positions", "missing", "problem"),
    [
        (0, [1, 2, 5], 3, "position 3 is missing from the log: it goes from 2 to 5"),
        (-1, [2], 1, "position 1 is missing from the log: it goes from 0 to 2"),
        (10, [11, 11], 12, "position 12 is missing from the log: it goes from 11 to 11"),
    ],
)
def test_gap_in_positions_names_the_first_missing_position(
    after: int, positions: list[int], missing: int, problem: str
) -> None:
    found = mapper.gap_in_positions(after, positions)
    assert found is not None and (found.position, found.problem) == (missing, problem)
    assert mapper.gap_in_positions(after, [max(after, 0) + 1, max(after, 0) + 2]) is None


# -- owed follow-ups that fail again -------------------------------------------------------


class _Outage:
    """An inline handler that fails on MoneySent while ``broken``."""

    def __init__(self) -> None:
        self.broken = True
        self.handler = incident.EventHandler("outage")

        @self.handler.listen(bank.MoneySent)
        def fail(recorded: incident.Recorded[Any], state: Any) -> None:
            if self.broken:
                raise RuntimeError("down")


def _inline_bank(store: incident.EventStore, outage: _Outage) -> incident.CommandHandler:
    app = incident.CommandHandler(
        store,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections, bank.money_transfer, outage.handler],
    )
    for account in ("A", "B"):
        app.dispatch(bank.OpenAccount(aggregate_id=account))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
    return app


def _request() -> bank.RequestTransfer:
    return bank.RequestTransfer(
        aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=30
    )


def test_owed_work_that_fails_again_stays_owed_with_its_error(
    event_store: incident.EventStore,
) -> None:
    """complete_owed() and a dispatch again under the root's key, while the follow-up
    still fails: the record stays owed, one attempt more each time, with the error; the
    dispatch says FollowUpFailed; nothing of the follow-up is written."""
    outage = _Outage()
    app = _inline_bank(event_store, outage)
    with pytest.raises(incident.FollowUpFailed):
        app.dispatch(_request(), metadata={"idempotency_key": "t-1"})
    assert [o.attempts for o in event_store.owed()] == [1]

    assert app.complete_owed() == []
    (owed,) = event_store.owed()
    assert owed.attempts == 2 and owed.error is not None and "down" in owed.error

    with pytest.raises(incident.FollowUpFailed, match="down") as failed:
        app.dispatch(_request(), metadata={"idempotency_key": "t-1"})
    assert [o.attempts for o in failed.value.owed] == [3]
    assert [o.attempts for o in event_store.owed()] == [3]
    assert [r.event_type for r in event_store.get("A")] == ["AccountOpened", "MoneyDeposited"]

    outage.broken = False
    assert [o.event_type for o in app.complete_owed()] == ["TransferRequested"]
    assert event_store.owed() == []


@on_backends(["sqlite"])
def test_owed_work_whose_cause_left_the_log_stays_owed(
    event_store: incident.EventStore,
    edit_raw_event: Callable[[int, dict[str, object] | None], None],
) -> None:
    """A record owed for an event that is no longer in the log (its row deleted behind
    the store's back) is not completed: it stays owed, saying so."""
    outage = _Outage()
    app = _inline_bank(event_store, outage)
    with pytest.raises(incident.FollowUpFailed):
        app.dispatch(_request())
    (owed,) = event_store.owed()
    edit_raw_event(owed.position, None)
    outage.broken = False
    assert app.complete_owed() == []
    (still,) = event_store.owed()
    assert still.error is not None and "not in the log" in still.error


# -- validate_command: richer types given as their JSON spelling -------------------------


class Plan(incident.Command):
    aggregate_id: str
    days: list[dt.date] = msgspec.field(default_factory=list)
    owners: dict[str, uuid.UUID] = msgspec.field(default_factory=dict)


def test_a_str_for_a_date_inside_a_list_or_dict_is_invalid_at_its_path() -> None:
    """A str where a list item or dict value is declared a date or UUID passes msgspec's
    conversion (JSON spells them so) but is still the wrong type, named by its path."""
    with pytest.raises(incident.InvalidCommand) as in_list:
        incident.validate_command(
            Plan(aggregate_id="p", days=[dt.date(2024, 1, 1), "2024-01-02"])  # type: ignore[list-item]
        )
    assert in_list.value.field == "days[1]"
    owner = "12345678-1234-5678-1234-567812345678"
    with pytest.raises(incident.InvalidCommand) as in_dict:
        incident.validate_command(Plan(aggregate_id="p", owners={"a": owner}))  # type: ignore[dict-item]
    assert in_dict.value.field == "owners['a']"
    fine = Plan(aggregate_id="p", days=[dt.date(2024, 1, 1)], owners={"a": uuid.UUID(owner)})
    assert incident.validate_command(fine) is fine


# -- specs ---------------------------------------------------------------------------------


def test_spec_failures_say_what_happened_instead() -> None:
    """then() on an invalid command says no events were expected; then_rejected() on an
    invalid one says it was invalid; a diff shows only the fields that differ."""
    from incident.testing import ScenarioFailed, diff_events, given

    invalid = given(bank.bank_account).when(bank.DepositMoney(aggregate_id="A", amount=-1))
    with pytest.raises(ScenarioFailed, match="expected no events, but the command is invalid"):
        invalid.then()
    with pytest.raises(ScenarioFailed, match="expected a rejection, but the command is invalid"):
        invalid.then_rejected()
    diff = diff_events(
        [
            bank.TransferRequested(
                source_account_number="A", destination_account_number="B", amount=5
            )
        ],
        [
            bank.TransferRequested(
                source_account_number="A", destination_account_number="C", amount=5
            )
        ],
    )
    assert "destination_account_number: expected 'B', got 'C'" in diff
    assert "amount:" not in diff and "source_account_number:" not in diff


# -- the state machine's stream check ------------------------------------------------------


def test_aggregate_machine_refuses_no_streams_and_skips_unresolvable_ids() -> None:
    """streams=() is a ValueError; a command type whose aggregate_id annotation cannot be
    resolved is left to the run-level check instead of failing the declaration."""
    from incident.testing import aggregate_machine

    with pytest.raises(ValueError, match="streams= is empty"):
        aggregate_machine(bank.bank_account, streams=())
    loose = incident.Aggregate("core_edges_loose", initial=0)

    class Poke(incident.Command):
        aggregate_id: NotDefinedAnywhere  # type: ignore[name-defined]  # noqa: F821

    @loose.execute(Poke)
    def poke(state: int, command: Any) -> list[incident.Event]:
        return []

    machine = aggregate_machine(loose, st.just(Poke(aggregate_id="A")))
    assert issubclass(machine, RuleBasedStateMachine)


# -- strategies ------------------------------------------------------------------------------


class Colours(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Everything(incident.Command):
    aggregate_id: str
    anything: Any = None
    raw: bytes = b""
    at: Annotated[dt.datetime, msgspec.Meta(tz=True)] | None = None
    wall: Annotated[dt.datetime, msgspec.Meta(tz=False)] | None = None
    day: dt.date | None = None
    clock: dt.time | None = None
    wait: dt.timedelta | None = None
    ident: uuid.UUID | None = None
    cost: decimal.Decimal | None = None
    level: Literal["low", "high"] = "low"
    colour: Colours = Colours.RED
    pair: tuple[int, str] = (0, "")
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    seen: set[int] = msgspec.field(default_factory=set)
    many: tuple[int, ...] = ()
    step: Annotated[float, msgspec.Meta(ge=0, le=10, multiple_of=0.5)] = 0.0
    above: Annotated[float, msgspec.Meta(gt=1.0)] = 2.0


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(commands(Everything))
def test_derived_commands_of_every_field_type_are_valid(command: Everything) -> None:
    """commands() draws only commands validate_command accepts, whatever the field types."""
    assert incident.validate_command(command) is command
    assert 0 <= command.step <= 10 and command.step % 0.5 == 0 and command.above > 1.0


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(invalid_commands(Everything))
def test_derived_invalid_commands_of_every_field_type_are_invalid(command: Everything) -> None:
    with pytest.raises(incident.InvalidCommand):
        incident.validate_command(command)


class Loose(incident.Command):
    aggregate_id: Any
    payload: Any = None


def test_invalid_commands_of_a_type_that_accepts_anything_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="can be made invalid"):
        invalid_commands(Loose)


def test_an_unstorable_projection_for_another_database_writes_no_events(
    store_url: str, tmp_path: Any
) -> None:
    """Projections in another database are written after the events commit, so they are
    checked inside the append: an Unstorable one leaves nothing written (the events
    were kept before, though Unstorable says nothing was written)."""
    elsewhere = "memory://" if store_url != "memory://" else f"sqlite:///{tmp_path / 'p.db'}"
    with (
        closing(incident.open_event_store(store_url)) as events,
        closing(incident.open_projection_store(elsewhere)) as other,
    ):
        events.initialize()
        assert not events.shares_database_with(other)
        with pytest.raises(incident.Unstorable, match="finite"):
            events.append_and_project(
                "d",
                [Drifted(x=1.0)],
                expected_version=0,
                aggregate="drift",
                metadata=None,
                projection_store=other,
                project=lambda recorded: [Drift(aggregate_id="d", x=math.nan)],
                idempotency_key="k-1",
            )
        assert events.version("d") == 0 and list(events.read_all()) == []
        assert events.outcome_for("k-1") is None and other.all(Drift) == []


@pytest.mark.parametrize("tag", ["we\x00ird", "we\udc80ird"])
def test_an_event_type_name_no_store_keeps_is_refused_at_declaration(tag: str) -> None:
    """The stored type name of an Event class with a NUL or a lone surrogate is a
    RegistrationError where the class is defined (memory and SQLite stored it, and
    Postgres failed with a StoreError at the first append)."""
    with pytest.raises(incident.RegistrationError, match="stored event type name"):

        class Weird(incident.Event, tag=tag):
            pass


# -- the combining writers' queue ----------------------------------------------------------


class _Lapses(Combiner[str, str]):
    def __init__(self) -> None:
        super().__init__()
        self.lapses = 0

    def lapsed(self) -> None:
        self.lapses += 1


def test_an_interrupted_caller_handed_the_lead_passes_it_on() -> None:
    """abandon(): a queued ticket leaves the queue unwritten; one handed the lead hands
    it to the next queued caller (whose sleep ends), or lets it lapse with nobody left;
    one already taken stays with its batch."""
    combiner = _Lapses()
    first, second = Ticket[str, str]("a").sleeper(), Ticket[str, str]("b").sleeper()
    combiner.queue.extend([first, second])
    first.state = LEADS
    combiner.abandon(first)
    assert first.state == DONE and list(combiner.queue) == [second]
    assert second.state == LEADS and second.wake.acquire(blocking=False)
    assert combiner.lapses == 0

    combiner.abandon(second)
    assert list(combiner.queue) == [] and combiner.lapses == 1

    queued, taken = Ticket[str, str]("c").sleeper(), Ticket[str, str]("d")
    taken.state = TAKEN
    combiner.queue.extend([queued])
    combiner.abandon(taken)
    combiner.abandon(queued)
    assert list(combiner.queue) == [] and (queued.state, taken.state) == (DONE, DONE)
    assert combiner.lapses == 1 and not queued.wake.acquire(blocking=False)


# -- keyed steps ---------------------------------------------------------------------------


def test_keyed_steps_flatten_nested_reactions_and_refuse_what_is_not_a_command() -> None:
    """A tuple inside a reaction is its steps in order, keyed as if it were flat (a
    repeat inside the inner tuple of a command before it is ``#2``: it had the first
    one's key, so it did not run); no prefix gives no keys; a step that is not a
    Command is a RegistrationError."""
    a, b = bank.OpenAccount(aggregate_id="A"), bank.OpenAccount(aggregate_id="B")
    nested = keyed_steps("p", (a, (b, a)))
    assert nested == keyed_steps("p", (a, b, a))
    assert [step for _, step in nested] == [a, b, a]
    assert [key for key, _ in nested] == [
        f"p/{command_key(a)}",
        f"p/{command_key(b)}",
        f"p/{command_key(a)}#2",
    ]
    assert keyed_steps(None, (a, incident.Attempt(b))) == [(None, a), (None, incident.Attempt(b))]
    with pytest.raises(incident.RegistrationError, match="not a Command"):
        keyed_steps("p", (a, "B"))


def test_a_command_repeated_in_a_nested_branch_runs_each_time(store_url: str) -> None:
    """An Attempt's branch may nest tuples: each command in it runs as often as it is
    listed, as in a flat tuple (a repeat in the inner tuple shared the first one's key,
    so it returned that outcome instead of running)."""
    deposits = incident.EventHandler("core_edges_deposits")

    @deposits.listen(bank.AccountOpened)
    def deposit(recorded: incident.Recorded[Any], state: Any) -> incident.Attempt:
        def dep(amount: int) -> bank.DepositMoney:
            return bank.DepositMoney(aggregate_id=recorded.aggregate_id, amount=amount)

        return incident.Attempt(dep(1), on_success=(dep(2), (dep(3), dep(2))))

    with closing(incident.open_event_store(store_url)) as store:
        app = incident.CommandHandler(
            store, aggregates=[bank.bank_account], event_handlers=[deposits]
        )
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
        state: bank.AccountState = app.state("bank_account", "A")
        assert state.balance == 1 + 2 + 3 + 2


class Unequal(incident.Event, tag="core_edges_unequal", eq=False):
    n: int = 1


def test_an_event_class_of_eq_false_is_stored(event_store: incident.EventStore) -> None:
    """A class declared eq=False compares by identity, so its read-back copy is never
    == the original: its fields are compared instead (a StopIteration escaped)."""
    event_store.initialize()
    event_store.append("s", [Unequal(n=2)], expected_version=0)
    (recorded,) = event_store.read_all()
    assert type(recorded.data) is Unequal and recorded.data.n == 2


@pytest.mark.parametrize("workers", [-1, 1.5, True])
def test_a_bad_worker_count_is_refused_before_the_store_opens(tmp_path: Any, workers: Any) -> None:
    """open_async_event_store refuses a worker count that is not an int >= 0 with
    InvalidArgument before it opens anything: no SQLite file is created (the store was
    opened first, then left open when the count was refused)."""
    path = tmp_path / "never.db"
    with pytest.raises(incident.InvalidArgument, match="workers must be an int >= 0"):
        incident.open_async_event_store(f"sqlite:///{path}", workers=workers)
    assert not path.exists()


class Tenths(incident.Command):
    aggregate_id: str
    tenths: Annotated[float, msgspec.Meta(multiple_of=0.1)] = 0.0
    narrow: Annotated[float, msgspec.Meta(multiple_of=0.1, ge=0.35, le=0.45)] = 0.4


@hypothesis.settings(max_examples=100, deadline=None, database=None)
@hypothesis.given(commands(Tenths))
def test_derived_floats_of_a_step_msgspec_checks_inexactly_are_valid(command: Tenths) -> None:
    """A float step that is not a power of two: commands() draws only what msgspec's
    check accepts (3 * 0.1 is not, by it), and never overflows on a huge draw (it raised
    OverflowError, or drew invalid commands)."""
    assert incident.validate_command(command) is command
    assert command.narrow == 0.4


def test_a_type_that_is_not_a_struct_has_no_table(store_url: str) -> None:
    with (
        closing(incident.open_projection_store(store_url)) as projections,
        pytest.raises(incident.IncidentError, match="is not a msgspec Struct"),
    ):
        projections.all(dict)  # type: ignore[type-var]


def test_an_append_under_a_used_key_writes_nothing(event_store: incident.EventStore) -> None:
    """A second append under an idempotency key already used is DuplicateCommand
    carrying the first outcome, whatever its expected version, and writes nothing."""
    event_store.initialize()

    def nothing(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        return []

    first = event_store.append_and_project(
        "s",
        [Drifted(x=1.0)],
        expected_version=0,
        aggregate="drift",
        metadata=None,
        projection_store=event_store.projections(),
        project=nothing,
        idempotency_key="k-1",
    )
    with pytest.raises(incident.DuplicateCommand) as duplicate:
        event_store.append_and_project(
            "s",
            [Drifted(x=2.0)],
            expected_version=incident.ANY,
            aggregate="drift",
            metadata=None,
            projection_store=event_store.projections(),
            project=nothing,
            idempotency_key="k-1",
        )
    assert [r.event_id for r in duplicate.value.recorded] == [r.event_id for r in first]
    assert event_store.version("s") == 1


def test_looking_at_a_placeholder_position_marks_the_append() -> None:
    """An envelope's placeholder position refuses arithmetic and comparison, and even
    its repr marks the append's inline work as position-dependent."""
    placeholders = Placeholders()
    recorded = incident.Recorded(
        position=0,
        event_id="e",
        aggregate_id="s",
        aggregate="drift",
        version=1,
        event_type="core_edges_drifted",
        event_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        data=Drifted(x=1.0),
    )
    (stand_in,) = placeholders.stand_in([recorded])
    assert not placeholders.used
    assert "not known yet" in repr(stand_in.position) and placeholders.used
    again = Placeholders()
    (other,) = again.stand_in([recorded])
    with pytest.raises(PositionNotKnownYet):
        other.position + 1
    assert again.used
