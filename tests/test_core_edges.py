"""Edges of the pure core and the shared store code: what is refused at declaration,
what every store refuses or gives back alike (the storable rule inside dataclasses and
enums, the sign of zero), and the error paths of registries and read-model tables."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import math
import sys
from collections.abc import Callable
from contextlib import closing
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import pytest
from conftest import on_backends

import incident
from incident import storable
from incident.event_types import EventTypes
from incident.stores import checkpoint_store_for, read_model_rows

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
