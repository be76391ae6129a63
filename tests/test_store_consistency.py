"""Places where the three stores (memory, SQLite, Postgres) once answered alike calls
differently: a struct that is not a Projection given as a read model, owed work no
store could keep (an event id that is not a UUID...), and a checkpoint's rows for a
projection store the checkpoint store does not recognise as its own. Each is the same
typed error, or the same outcome, on every store, sync and async, with nothing written."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import msgspec
import pytest
from conftest import on_backends

import incident
from incident.examples.bank import MoneyDeposited
from incident.ids import new_uuid
from incident.stores import (
    AppendRequest,
    Effects,
    Parked,
    ReplaceableProjectionStore,
    checkpoint_store_for,
)
from incident.stores.memory import MemoryProjectionStore
from incident.testing.asynchronous import EventLoopThread
from incident.testing.contract.checkpoint_store import parked_event


class Balance(incident.Projection):
    aggregate_id: str
    amount: int
    version: int


class Plain(msgspec.Struct):
    """A struct with everything a read model has, but not a Projection."""

    aggregate_id: str
    amount: int
    version: int
    table_name = "balance"  # the table Balance is kept in: it must not claim it


class Wrapped:
    """A projection store of the caller's own around another: no store recognises it as
    sharing its database, though it writes into one."""

    def __init__(self, store: incident.ProjectionStore) -> None:
        self.get, self.all, self.project = store.get, store.all, store.project

    def close(self) -> None:
        """The wrapped store is the test's to close."""


def projections_of(event_store: incident.EventStore) -> incident.ProjectionStore:
    return event_store.projections()


# -- a struct that is not a Projection ---------------------------------------------------


@pytest.mark.parametrize("value", [Plain(aggregate_id="a", amount=1, version=1), {"a": 1}])
def test_project_refuses_what_is_not_a_projection(
    event_store: incident.EventStore, value: Any
) -> None:
    """Refused with InvalidArgument before any table is made or claimed for its type:
    the read model it imitates keeps its table, and nothing is written."""
    projections = projections_of(event_store)
    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        projections.project(value)
    projections.project(Balance(aggregate_id="a", amount=2, version=1))
    assert projections.all(Balance) == [Balance(aggregate_id="a", amount=2, version=1)]


def test_reads_refuse_a_type_that_is_not_a_projection(event_store: incident.EventStore) -> None:
    """``get`` and ``all`` of such a type: InvalidArgument, no table made or claimed."""
    projections = projections_of(event_store)
    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        projections.get(Plain, "a")  # type: ignore[type-var]
    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        projections.all(Plain)  # type: ignore[type-var]
    assert projections.all(Balance) == []


def test_replace_all_refuses_what_is_not_a_projection(event_store: incident.EventStore) -> None:
    """A type that is not a Projection, or a row of a class defined again under a
    Projection's name that is not one: InvalidArgument, the table left as it was."""
    projections = projections_of(event_store)
    assert isinstance(projections, ReplaceableProjectionStore)
    kept = Balance(aggregate_id="a", amount=2, version=1)
    projections.project(kept)
    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        projections.replace_all(Plain, [Plain(aggregate_id="b", amount=1, version=1)])  # type: ignore[type-var]
    impostor = msgspec.defstruct(
        "Balance",
        [("aggregate_id", str), ("amount", int), ("version", int)],
        module=__name__,
    )
    impostor.__qualname__ = Balance.__qualname__
    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        projections.replace_all(Balance, [impostor(aggregate_id="b", amount=1, version=1)])
    assert projections.all(Balance) == [kept]


def deposit(event_store: incident.EventStore, project: Any, elsewhere: bool) -> None:
    target = MemoryProjectionStore() if elsewhere else projections_of(event_store)
    event_store.append_and_project(
        "acc",
        [MoneyDeposited(amount=1)],
        expected_version=0,
        aggregate="bank_account",
        metadata=None,
        projection_store=target,
        project=project,
    )


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same database", "elsewhere"])
def test_a_commit_whose_read_models_are_not_projections_writes_nothing(
    event_store: incident.EventStore, elsewhere: bool
) -> None:
    """Refused inside the append, before its events commit, wherever the read models
    would have gone."""

    def project(recorded: list[incident.Recorded[Any]]) -> list[Any]:
        return [
            Balance(aggregate_id="acc", amount=1, version=1),
            Plain(aggregate_id="acc", amount=1, version=1),
        ]

    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        deposit(event_store, project, elsewhere)
    assert event_store.version("acc") == 0
    assert list(event_store.read_all()) == []
    assert projections_of(event_store).all(Balance) == []


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same database", "elsewhere"])
def test_a_checkpoint_whose_read_models_are_not_projections_writes_nothing(
    event_store: incident.EventStore, elsewhere: bool
) -> None:
    """A batch holding a struct that is not a Projection: InvalidArgument, and neither
    the checkpoint nor any of the batch's rows (those before it either) is written."""
    checkpoints = checkpoint_store_for(event_store)
    target = MemoryProjectionStore() if elsewhere else projections_of(event_store)
    batch: Sequence[Any] = [
        Balance(aggregate_id="a", amount=1, version=1),
        Plain(aggregate_id="b", amount=1, version=1),
    ]
    with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
        checkpoints.save("balances", 2, expected=0, projections=batch, projection_store=target)
    assert checkpoints.load("balances") == 0
    assert target.all(Balance) == []


def test_an_async_store_refuses_what_is_not_a_projection(store_url: str) -> None:
    with EventLoopThread() as loop:
        store = loop.view(incident.open_async_event_store(store_url))
        try:
            projections = loop.view(store.projections())
            with pytest.raises(incident.InvalidArgument, match=r"incident\.Projection"):
                projections.project(Plain(aggregate_id="a", amount=1, version=1))
            assert projections.all(Balance) == []
        finally:
            store.close()


# -- owed work no store could keep -------------------------------------------------------


def owed(**changes: Any) -> incident.Owed:
    fields: dict[str, Any] = {
        "handler": "mailer",
        "position": 1,
        "event_id": new_uuid(),
        "aggregate_id": "acc",
        "event_type": "MoneyDeposited",
        "owed_at": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
    }
    return incident.Owed(**(fields | changes))


MALFORMED = {
    "event id not a uuid": {"event_id": "not-a-uuid"},
    "event id a uuid spelled otherwise": {"event_id": new_uuid().upper()},
    "event id not a str": {"event_id": 7},
    "position 0": {"position": 0},
    "position negative": {"position": -1},
    "position a bool": {"position": True},
    "position a str": {"position": "1"},
    "position past 64 bits": {"position": 2**63},
    "handler empty": {"handler": ""},
    "handler with a NUL": {"handler": "mail\x00er"},
    "handler not a str": {"handler": None},
    "aggregate id empty": {"aggregate_id": ""},
    "aggregate id too long": {"aggregate_id": "a" * 256},
    "aggregate id with a lone surrogate": {"aggregate_id": "a\udc80"},
    "event type with a NUL": {"event_type": "Money\x00Deposited"},
    "event type empty": {"event_type": ""},
    "attempts negative": {"attempts": -1},
    "attempts past an integer column": {"attempts": 2**31},
    "error not a str": {"error": 3},
    "owed at a naive datetime": {"owed_at": dt.datetime(2024, 5, 1, 12, 0)},
    "owed at not a datetime": {"owed_at": "2024-05-01T12:00:00+00:00"},
}


@pytest.mark.parametrize("changes", MALFORMED.values(), ids=MALFORMED.keys())
def test_owe_refuses_owed_work_no_store_could_keep(
    event_store: incident.EventStore, changes: dict[str, Any]
) -> None:
    """InvalidArgument on every store, before anything is written: the owed work
    already kept under the same handler and position is left as it was."""
    first = owed()
    event_store.owe(first)
    bad = msgspec.structs.replace(first, **changes)
    with pytest.raises(incident.InvalidArgument):
        event_store.owe(bad)
    assert event_store.owed() == [first]


def test_owe_keeps_well_formed_owed_work_as_given(event_store: incident.EventStore) -> None:
    work = owed(position=2**63 - 1, attempts=2**31 - 1, error="Boom: x", handler="h" * 300)
    event_store.owe(work)
    assert event_store.owed("h" * 300) == [work]


@pytest.mark.parametrize("key", ["event id not a uuid", "position 0", "handler with a NUL"])
def test_a_commit_owing_malformed_work_writes_nothing(
    event_store: incident.EventStore, key: str
) -> None:
    """Owed work an append's inline handlers return is checked as ``owe`` checks it,
    inside the append: refused, the events are not written either."""

    def project(recorded: list[incident.Recorded[Any]]) -> Effects:
        last = recorded[-1]
        work = owed(
            position=last.position,
            event_id=last.event_id,
            aggregate_id=last.aggregate_id,
            event_type=last.event_type,
            owed_at=last.event_date,
        )
        return Effects(owed=[msgspec.structs.replace(work, **MALFORMED[key])])

    with pytest.raises(incident.InvalidArgument):
        deposit(event_store, project, elsewhere=False)
    assert event_store.version("acc") == 0
    assert event_store.owed() == []


def test_an_async_store_refuses_owed_work_no_store_could_keep(store_url: str) -> None:
    with EventLoopThread() as loop:
        store = loop.view(incident.open_async_event_store(store_url))
        try:
            with pytest.raises(incident.InvalidArgument, match="event_id"):
                store.owe(owed(event_id="not-a-uuid"))
            assert store.owed() == []
        finally:
            store.close()


# -- a checkpoint's rows for a store it does not recognise -------------------------------


@pytest.fixture
def wrapped(event_store: incident.EventStore) -> Iterator[Wrapped]:
    yield Wrapped(projections_of(event_store))


def test_a_checkpoint_writes_rows_through_a_wrapper_of_its_own_database(
    event_store: incident.EventStore, wrapped: Wrapped
) -> None:
    """A wrapper around the event store's own projection store is another database as
    far as the checkpoint store can tell: its rows are written with the checkpoint (on
    SQLite, inside the checkpoint's own transaction, which holds the file's lock)."""
    checkpoints = checkpoint_store_for(event_store)
    assert not checkpoints.shares_database_with(wrapped)  # type: ignore[arg-type]
    row = Balance(aggregate_id="a", amount=1, version=1)
    checkpoints.save("balances", 1, expected=0, projections=[row], projection_store=wrapped)  # type: ignore[arg-type]
    assert checkpoints.load("balances") == 1
    assert projections_of(event_store).all(Balance) == [row]


def test_a_conflicting_save_writes_no_rows_through_a_wrapper(
    event_store: incident.EventStore, wrapped: Wrapped
) -> None:
    """CheckpointConflict: none of the loser's rows, not even through a wrapper."""
    checkpoints = checkpoint_store_for(event_store)
    checkpoints.save("balances", 5, expected=0)
    stale = Balance(aggregate_id="a", amount=1, version=1)
    with pytest.raises(incident.CheckpointConflict):
        checkpoints.save("balances", 3, expected=0, projections=[stale], projection_store=wrapped)  # type: ignore[arg-type]
    assert projections_of(event_store).all(Balance) == []
    assert checkpoints.load("balances") == 5


def test_a_row_refused_through_a_wrapper_leaves_the_checkpoint_and_the_rows(
    event_store: incident.EventStore, wrapped: Wrapped
) -> None:
    """A row no store could keep, late in the batch: Unstorable, and neither the
    checkpoint nor the rows before it are written."""
    checkpoints = checkpoint_store_for(event_store)
    batch = [
        Balance(aggregate_id="a", amount=1, version=1),
        Balance(aggregate_id="b", amount=2**70, version=1),
    ]
    with pytest.raises(incident.Unstorable):
        checkpoints.save("balances", 2, expected=0, projections=batch, projection_store=wrapped)  # type: ignore[arg-type]
    assert checkpoints.load("balances") == 0
    assert projections_of(event_store).all(Balance) == []


def test_a_refused_save_through_a_wrapper_leaves_the_database_usable(
    store_url: str,
) -> None:
    """Rows for a wrapper, refused mid-batch, leave the database usable for the next
    save and append (no transaction left open)."""
    with closing(incident.open_event_store(store_url)) as store:
        checkpoints = checkpoint_store_for(store)
        wrapper = Wrapped(store.projections())
        bad = [Balance(aggregate_id="b", amount=2**70, version=1)]
        with pytest.raises(incident.Unstorable):
            checkpoints.save("balances", 1, expected=0, projections=bad, projection_store=wrapper)  # type: ignore[arg-type]
        good = [Balance(aggregate_id="a", amount=1, version=1)]
        checkpoints.save("balances", 1, expected=0, projections=good, projection_store=wrapper)  # type: ignore[arg-type]
        store.append("acc", [MoneyDeposited(amount=1)], expected_version=0)
        assert store.projections().all(Balance) == good and store.version("acc") == 1


def test_a_checkpoint_writes_rows_through_a_wrapper_of_another_store_on_its_database(
    store_url: str,
) -> None:
    """The wrapped store was opened on its own, on the event store's database (on
    SQLite, another connection to the same file): the checkpoint's rows are written
    through it, promptly (its writer does not wait for the lock the checkpoint's
    transaction holds), and a refused batch leaves neither rows nor checkpoint."""
    options = {"timeout": 2} if store_url.startswith("sqlite") else {}
    with (
        closing(incident.open_event_store(store_url)) as store,
        closing(incident.open_event_store(store_url, **options)) as other,
    ):
        checkpoints = checkpoint_store_for(store)
        wrapper = Wrapped(other.projections())
        bad = [
            Balance(aggregate_id="a", amount=1, version=1),
            Balance(aggregate_id="b", amount=2**70, version=1),
        ]
        with pytest.raises(incident.Unstorable):
            checkpoints.save("balances", 1, expected=0, projections=bad, projection_store=wrapper)  # type: ignore[arg-type]
        assert other.projections().all(Balance) == [] and checkpoints.load("balances") == 0
        good = [Balance(aggregate_id="a", amount=1, version=1)]
        checkpoints.save("balances", 1, expected=0, projections=good, projection_store=wrapper)  # type: ignore[arg-type]
        assert checkpoints.load("balances") == 1
        assert other.projections().all(Balance) == good
        other.projections().project(Balance(aggregate_id="c", amount=3, version=1))
        assert [row.aggregate_id for row in other.projections().all(Balance)] == ["a", "c"]


@on_backends(["sqlite"])
@pytest.mark.parametrize("opened", ["the same store", "another store"])
def test_a_table_made_through_a_wrapper_in_a_save_that_rolls_back_is_made_again(
    store_url: str, opened: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wrapper's first row makes its table inside the checkpoint's transaction;
    that transaction then fails (writing its dead letter fails in the driver) and rolls
    the table back with everything else. The store that made it must not take it for
    made: its next row makes it again, instead of failing on a missing table."""
    from incident.stores.sqlite import checkpoints as sqlite_checkpoints

    monkeypatch.setattr(sqlite_checkpoints, "PARK", "INSERT INTO nowhere VALUES (?)")
    with closing(incident.open_event_store(store_url)) as store:
        other = store if opened == "the same store" else incident.open_event_store(store_url)
        with closing(other):
            checkpoints = checkpoint_store_for(store)
            wrapper = Wrapped(other.projections())
            row = Balance(aggregate_id="a", amount=1, version=1)
            unbindable = parked_event("balances", 1)
            with pytest.raises(incident.StoreError):
                checkpoints.save(
                    "balances",
                    1,
                    expected=0,
                    projections=[row],
                    projection_store=wrapper,  # type: ignore[arg-type]
                    parked=[unbindable],
                )
            monkeypatch.undo()
            assert checkpoints.load("balances") == 0 and checkpoints.parked() == []
            other.projections().project(row)
            assert other.projections().all(Balance) == [row]


@pytest.mark.parametrize("effects", ["not a projection", "owed work not for a uuid"])
def test_an_async_commit_refuses_its_effects_and_writes_nothing(
    store_url: str, effects: str
) -> None:
    """An async store's commit (batched with others, or alone) checks what ``project``
    returns as the sync store does: InvalidArgument, and the events are not written."""

    def project(recorded: list[incident.Recorded[Any]]) -> Effects:
        if effects == "not a projection":
            return Effects(projections=[Plain(aggregate_id="acc", amount=1, version=1)])  # type: ignore[list-item]
        return Effects(owed=[owed(event_id="not-a-uuid", position=recorded[-1].position)])

    request = AppendRequest(
        aggregate_id="acc",
        events=[MoneyDeposited(amount=1)],
        expected_version=0,
        aggregate="bank_account",
    )
    with EventLoopThread() as loop:
        store = loop.view(incident.open_async_event_store(store_url))
        try:
            with pytest.raises(incident.InvalidArgument):
                store.commit(request, projection_store=store.projections(), project=project)
            assert store.version("acc") == 0 and store.owed() == []
        finally:
            store.close()


# -- dead letters ------------------------------------------------------------------------


def parked(**changes: Any) -> Parked:
    fields: dict[str, Any] = {
        "handler": "mailer",
        "position": 1,
        "event_id": new_uuid(),
        "aggregate_id": "acc",
        "event_type": "MoneyDeposited",
        "error": "RuntimeError: boom",
        "attempts": 1,
        "parked_at": dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC),
    }
    return Parked(**(fields | changes))


KEPT_IN_A_DEAD_LETTER = {
    "event id not a uuid",
    "event id a uuid spelled otherwise",
    "aggregate id empty",
    "aggregate id too long",
    "event type empty",
}
MALFORMED_PARKED = {
    name: {("parked_at" if key == "owed_at" else key): value for key, value in changes.items()}
    for name, changes in MALFORMED.items()
    # a damaged row's dead letter knows neither its event's id nor always its stream
    if "error" not in changes and name not in KEPT_IN_A_DEAD_LETTER
} | {
    "error None": {"error": None},
    "error with a NUL": {"error": "Runtime\x00Error"},
    "error with a lone surrogate": {"error": "bad \udcff"},
}


@pytest.mark.parametrize("changes", MALFORMED_PARKED.values(), ids=MALFORMED_PARKED.keys())
def test_park_and_save_refuse_a_dead_letter_no_store_could_keep(
    event_store: incident.EventStore, changes: dict[str, Any]
) -> None:
    """InvalidArgument on every store, before anything is written (Postgres failed with
    a driver StoreError, SQLite with a bare UnicodeEncodeError, memory kept it): the
    dead letter already kept is left as it was, and a save carrying one moves nothing."""
    checkpoints = checkpoint_store_for(event_store)
    first = parked()
    checkpoints.park(first)
    bad = msgspec.structs.replace(first, **changes)
    with pytest.raises(incident.InvalidArgument):
        checkpoints.park(bad)
    with pytest.raises(incident.InvalidArgument):
        checkpoints.save("mailer", 5, expected=0, parked=[bad])
    assert checkpoints.parked() == [first]
    assert checkpoints.load("mailer") == 0
