"""Snapshots at their edges: state types refused with advice that helps, states compared
types and all, unreadable and impossible snapshots, bad options, and the state cache."""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
import pytest

import incident
from incident.command_handler.state_cache import StateCache
from incident.snapshots import (
    Snapshot,
    code_key,
    first_difference,
    load_snapshot,
    snapshot_key,
    take_snapshot,
)


class Bump(incident.Command):
    aggregate_id: str
    n: int = 1


class Bumped(incident.Event, tag="edges.Bumped"):
    n: int


class Dropped(incident.Event, tag="edges.Dropped"):
    pass


def counter(name: str = "edges", **options: Any) -> incident.Aggregate[Any]:
    aggregate: incident.Aggregate[Any] = incident.Aggregate(name, **{"initial": 0, **options})

    @aggregate.execute(Bump)
    def bump(total: Any, command: Bump) -> Bumped:
        return Bumped(n=command.n)

    @aggregate.apply(Bumped)
    def bumped(total: int, event: Bumped) -> int:
        return total + event.n

    return aggregate


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[incident.EventStore, incident.ProjectionStore]]:
    events, projections = incident.open_stores(store_url)
    yield events, projections
    events.close()


# -- refused state types --------------------------------------------------------------


class Mixed(enum.Enum):  # msgspec takes all-int or all-str enums only
    A = 1
    B = "b"


class Loose(msgspec.Struct):
    total: int = 0
    extra: Any = None


class Described(msgspec.Struct):  # Any under Annotated metadata is Any all the same
    extra: Annotated[dict, msgspec.Meta(title="free-form")] = {}  # type: ignore[type-arg]


class Node(msgspec.Struct):
    value: int = 0
    next: Node | None = None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"state_type": 5}, "snapshots cannot decode the state type 5"),
        ({"initial": object(), "state_type": int}, "snapshots cannot encode the initial state"),
        ({"state_type": str}, "the initial state 0 does not read back as str"),
        ({"state_type": type(None)}, "the initial state 0 does not read back as NoneType"),
        (
            {"initial": (1, 2), "state_type": list[int]},
            "does not survive a snapshot: at state, (1, 2) reads back as [1, 2]",
        ),
        ({"initial": (1, "a")}, "declare state_type=tuple[int, str]"),
        ({"initial": {"a": Mixed.A}}, "declare state_type=dict[K, V]"),
        ({"initial": Loose()}, "leaves state.extra open"),
        (
            {"initial": [], "state_type": list[Annotated[Any, msgspec.Meta(description="x")]]},
            "leaves state's items open",
        ),
        (
            {"initial": Described()},
            "leaves state.extra's keys open",
        ),
    ],
)
def test_a_state_that_would_not_come_back_is_refused(options: dict[str, Any], message: str) -> None:
    """Each way a state type can fail a snapshot, refused when the command handler is
    built (RegistrationError), saying what is wrong where."""
    aggregate = counter(**options)
    with pytest.raises(incident.RegistrationError) as refused:
        incident.CommandHandler(aggregates=[aggregate], snapshot_every=2)
    assert message in str(refused.value)


def test_advice_for_an_open_field_of_a_class_names_the_field() -> None:
    """A Struct with an Any field: the advice names that field, not the Struct itself
    (declaring state_type=Loose, as it used to say, is what the aggregate already has)."""
    with pytest.raises(incident.RegistrationError) as refused:
        incident.CommandHandler(aggregates=[counter(initial=Loose())], snapshot_every=2)
    assert "give state.extra a type that says what it holds" in str(refused.value)
    assert "state_type=Loose" not in str(refused.value)


def test_a_recursive_state_type_is_accepted_and_comes_back(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A Struct that holds itself (a linked list) is checked once per type, accepted, and
    a cold start from its snapshot is the fold, on every store."""
    events, projections = stores
    chain: incident.Aggregate[Node] = incident.Aggregate("chain", initial=Node())

    @chain.execute(Bump)
    def bump(state: Node, command: Bump) -> Bumped:
        return Bumped(n=command.n)

    @chain.apply(Bumped)
    def bumped(state: Node, event: Bumped) -> Node:
        return Node(value=event.n, next=state)

    writer = incident.CommandHandler(events, projections, aggregates=[chain], snapshot_every=2)
    for n in (1, 2, 3):
        writer.dispatch(Bump(aggregate_id="C", n=n))
    assert projections.get(Snapshot, "chain/C") is not None
    reader = incident.CommandHandler(
        events, projections, aggregates=[chain], snapshot_every=2, verify_snapshots=True
    )
    state = reader.state("chain", "C")
    assert state == chain.fold(events.get("C"))
    assert (state.value, state.next.value, state.next.next.value) == (3, 2, 1)


# -- comparing states ---------------------------------------------------------------------


@dataclasses.dataclass
class Point:
    x: int
    y: Any


@pytest.mark.parametrize(
    ("left", "right", "path"),
    [
        ([1, 2], [1, 2, 3], "state"),
        ((1, 2), (1, 3), "state[1]"),
        ({1, 2}, {1, 3}, "state"),
        ({1, 2}, {1.0, 2}, "state"),  # equal sets, but 1 is not 1.0
        (frozenset({"a"}), frozenset({"a"}), None),
        (Point(1, "a"), Point(1, "b"), "state.y"),
        (Point(1, [1]), Point(1, (1,)), "state.y"),
        ({"a": 1}, {"a": 1, "b": 2}, "state['b']"),
        ({"a": 1, "b": 2}, {"a": 1}, "state['b']"),
        (Node(1, Node(2)), Node(1, Node(3)), "state.next.value"),
        (1, 1.0, "state"),
        (Point(1, 2), Point(1, 2), None),
    ],
)
def test_first_difference(left: Any, right: Any, path: str | None) -> None:
    """The first place two states differ, types included, or None when they are the same."""
    found = first_difference(left, right)
    assert (found[0] if found else None) == path


def test_a_key_missing_on_one_side_is_reported_as_missing(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A snapshot holding a key the fold does not: SnapshotMismatch says <missing> for the
    fold's side, on every store."""
    events, projections = stores
    tally = incident.Aggregate("tally", initial={}, state_type=dict[str, int])

    @tally.execute(Bump)
    def bump(state: dict[str, int], command: Bump) -> Bumped:
        return Bumped(n=command.n)

    @tally.apply(Bumped)
    def bumped(state: dict[str, int], event: Bumped) -> dict[str, int]:
        return {**state, "n": state.get("n", 0) + event.n}

    app = incident.CommandHandler(events, projections, aggregates=[tally], snapshot_every=2)
    app.dispatch(Bump(aggregate_id="T"))
    app.dispatch(Bump(aggregate_id="T"))
    forged = take_snapshot(tally, "T", {"n": 2, "ghost": 1}, 2, code_key(tally))
    assert forged is not None
    projections.project(forged)
    with pytest.raises(incident.SnapshotMismatch) as mismatch:
        app.verify_snapshot("tally", "T")
    assert mismatch.value.path == "state['ghost']"
    assert "the snapshot has 1 and the fold gives <missing>" in str(mismatch.value)


# -- snapshots that cannot be taken or read ----------------------------------------------


class Holder(msgspec.Struct):
    total: int = 0
    note: int = 0


def test_a_state_that_cannot_be_encoded_is_not_snapshotted(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An apply function that puts an unencodable value in the state (a Struct does not
    check its fields): the command succeeds, no snapshot is stored, a warning says why,
    and the state is the fold, on every store."""
    events, projections = stores
    holder: incident.Aggregate[Holder] = incident.Aggregate("holder", initial=Holder())

    @holder.execute(Bump)
    def bump(state: Holder, command: Bump) -> Bumped:
        return Bumped(n=command.n)

    @holder.apply(Bumped)
    def bumped(state: Holder, event: Bumped) -> Holder:
        return Holder(total=state.total + event.n, note=object())  # type: ignore[arg-type]

    app = incident.CommandHandler(events, projections, aggregates=[holder], snapshot_every=1)
    with caplog.at_level(logging.WARNING, logger="incident"):
        [recorded] = app.dispatch(Bump(aggregate_id="H", n=4))
    assert recorded.version == 1
    assert projections.get(Snapshot, "holder/H") is None
    assert "not snapshotting a state that does not round-trip" in caplog.text
    assert app.state("holder", "H").total == 4


def test_an_unreadable_snapshot_falls_back_to_the_stream(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A snapshot made by this code whose state does not decode (a damaged row, a state
    JSON of another shape) is ignored: the state is the fold of the whole stream, on
    every store."""
    events, projections = stores
    aggregate = counter()
    app = incident.CommandHandler(events, projections, aggregates=[aggregate], snapshot_every=2)
    for _ in range(3):
        app.dispatch(Bump(aggregate_id="U"))
    code = code_key(aggregate)
    for state in ('"three"', "{not json"):
        damaged = Snapshot(
            aggregate_id="edges/U", aggregate="edges", version=4, code=code, state=state
        )
        assert load_snapshot(aggregate, damaged, code) is None
    projections.project(
        Snapshot(aggregate_id="edges/U", aggregate="edges", version=4, code=code, state='"x"')
    )
    reader = incident.CommandHandler(events, projections, aggregates=[aggregate], snapshot_every=2)
    assert reader.state("edges", "U") == 3
    assert reader.verify_snapshot("edges", "U") is None


def test_a_snapshot_beyond_its_stream_fails_verification(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A snapshot claiming version 10 of a stream of 3 events: SnapshotMismatch at
    "version", with both versions, on every store."""
    events, projections = stores
    aggregate = counter()
    app = incident.CommandHandler(events, projections, aggregates=[aggregate], snapshot_every=5)
    for _ in range(3):
        app.dispatch(Bump(aggregate_id="V"))
    forged = take_snapshot(aggregate, "V", 10, 10, code_key(aggregate))
    assert forged is not None
    projections.project(forged)
    with pytest.raises(incident.SnapshotMismatch) as mismatch:
        app.verify_snapshot("edges", "V")
    assert (mismatch.value.path, mismatch.value.stored, mismatch.value.folded) == (
        "version",
        10,
        3,
    )


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_a_snapshot_interval_that_is_not_a_count_is_refused(store_url: str, every: Any) -> None:
    """snapshot_every must be an int >= 1 (or None): InvalidArgument, and nothing is
    written, on every store."""
    events, projections = incident.open_stores(store_url)
    try:
        with pytest.raises(incident.InvalidArgument, match="snapshot_every"):
            incident.CommandHandler(
                events, projections, aggregates=[counter()], snapshot_every=every
            )
        assert events.get("edges") == []
    finally:
        events.close()


@pytest.mark.parametrize("size", [-1, 1.5, True, None])
def test_a_cache_size_that_is_not_a_count_is_refused(size: Any) -> None:
    """cache_size must be an int >= 0: InvalidArgument (still a ValueError)."""
    with pytest.raises(incident.InvalidArgument, match="cache_size"):
        incident.CommandHandler(aggregates=[counter()], cache_size=size)
    with pytest.raises(ValueError, match="cache_size"):
        StateCache(size)


def test_the_cache_keeps_the_newest_state_and_evicts_the_oldest() -> None:
    """An older version never replaces a newer one (a racing thread's slower load); a
    cache of size 0 keeps nothing; beyond its size the least recently used goes."""
    cache = StateCache(2)
    cache.put(("a", "1"), "new", 5)
    cache.put(("a", "1"), "old", 3)
    assert cache.get(("a", "1")) == ("new", 5)
    cache.put(("a", "2"), "two", 1)
    cache.get(("a", "1"))  # now the most recently used
    cache.put(("a", "3"), "three", 1)
    assert len(cache) == 2
    assert cache.get(("a", "2")) is None and cache.get(("a", "1")) == ("new", 5)
    cache.clear()
    assert len(cache) == 0
    empty = StateCache(0)
    empty.put(("a", "1"), "state", 1)
    assert len(empty) == 0 and empty.get(("a", "1")) is None


# -- an event this aggregate no longer applies --------------------------------------------


def test_an_event_the_aggregate_no_longer_applies_is_a_routing_error(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A stream of this aggregate holding an event type its current code does not apply
    (a release dropped the apply function): RoutingError naming the event, not
    ForeignStream, and the stream is left as it was, on every store."""
    events, projections = stores
    writer = incident.CommandHandler(events, projections, aggregates=[counter()])
    writer.dispatch(Bump(aggregate_id="R"))
    events.append("R", [Dropped()], expected_version=1, aggregate="edges")  # the old release
    before = [(r.version, r.event_type) for r in events.get("R")]

    new = incident.CommandHandler(events, projections, aggregates=[counter()])
    with pytest.raises(incident.RoutingError, match="Dropped") as refused:
        new.dispatch(Bump(aggregate_id="R"))
    assert not isinstance(refused.value, incident.ForeignStream)
    assert [(r.version, r.event_type) for r in events.get("R")] == before


class CountingSnapshotReads:
    """Wraps a projection store and counts the snapshots read."""

    def __init__(self, store: incident.ProjectionStore) -> None:
        self._store = store
        self.reads = 0

    def get(self, model: type[Any], key: str) -> Any:
        self.reads += model is Snapshot
        return self._store.get(model, key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_snapshot_at_the_head_of_its_stream_is_read_once(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """A cold start whose snapshot is the latest version caches the state it read, so
    the next read does not fetch the snapshot again, on every store."""
    events, projections = stores
    aggregate = counter()
    writer = incident.CommandHandler(events, projections, aggregates=[aggregate], snapshot_every=2)
    for _ in range(4):
        writer.dispatch(Bump(aggregate_id="S"))
    counting = CountingSnapshotReads(projections)
    reader = incident.CommandHandler(
        events,
        counting,  # type: ignore[arg-type]
        aggregates=[aggregate],
        snapshot_every=2,
    )
    assert reader.state("edges", "S") == reader.state("edges", "S") == 4
    assert counting.reads == 1
    [bumped] = reader.dispatch(Bump(aggregate_id="S"))
    assert bumped.version == 5 and reader.state("edges", "S") == 5


def test_snapshots_of_names_and_ids_that_join_alike_are_kept_apart(
    stores: tuple[incident.EventStore, incident.ProjectionStore],
) -> None:
    """Aggregate "a/b" with stream "c" and aggregate "a" with stream "b/c" are two
    streams: each keeps its own snapshot (one key for both let the later overwrite the
    other, which then folded its whole stream on every cold start)."""
    events, projections = stores
    nested, flat = counter("a/b"), counter("a")
    with incident.CommandHandler(events, projections, aggregates=[nested], snapshot_every=2) as one:
        for _ in range(2):
            one.dispatch(Bump(aggregate_id="c"))
    with incident.CommandHandler(events, projections, aggregates=[flat], snapshot_every=2) as two:
        for _ in range(4):
            two.dispatch(Bump(aggregate_id="b/c"))
    kept = [
        projections.get(Snapshot, snapshot_key(aggregate, aggregate_id))
        for aggregate, aggregate_id in ((nested, "c"), (flat, "b/c"))
    ]
    assert [(s.aggregate, s.version) for s in kept if s is not None] == [("a/b", 2), ("a", 4)]
    assert snapshot_key(counter("edges"), "A1") == "edges/A1"  # plain names keep their keys
