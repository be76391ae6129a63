"""A newcomer's domain (tests/hotel: rooms, guests, reservations) on every store: event
classes with clashing class names and aggregates whose ids look alike come back after a
restart exactly as a fold of their streams gives them, and the mistakes a newcomer makes
(one stored name for two classes, one id for two aggregates) fail at once, naming both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hotel import build, guests, reservations, rooms

import incident

TESTS = Path(__file__).resolve().parent
STREAMS = {
    "room": ["room-101", "room-102"],
    "guest": ["guest-101", "guest-ann"],
    "reservation": ["booking-101", "booking-102"],
}
COMMANDS: list[incident.Command] = [
    rooms.AddRoom(aggregate_id="room-101", beds=2),
    rooms.AddRoom(aggregate_id="room-102", beds=1),
    guests.RegisterGuest(aggregate_id="guest-101", name="Bo"),
    guests.RegisterGuest(aggregate_id="guest-ann", name="Ann"),
    reservations.Reserve(aggregate_id="booking-101", room="room-101", guest="guest-ann", nights=3),
    guests.RenameGuest(aggregate_id="guest-ann", name="Ann Lee"),
    reservations.Reserve(aggregate_id="booking-102", room="room-102", guest="guest-101", nights=1),
    reservations.CancelReservation(aggregate_id="booking-101"),
    rooms.CloseRoom(aggregate_id="room-102"),
    guests.RenameGuest(aggregate_id="guest-ann", name="Ann Lee-Park"),
]

# what a new process prints: every stream's state, as JSON
RESTART = """
import sys, msgspec, incident
from hotel import build
app = build(sys.argv[1], **({{"snapshot_every": 2}} if sys.argv[2] == "yes" else {{}}))
streams = {streams!r}
states = {{f"{{a}}/{{i}}": app.state(a, i) for a, ids in streams.items() for i in ids}}
print(msgspec.json.encode(states).decode())
app.event_store.close()
"""


def folded(app: incident.CommandHandler) -> dict[str, Any]:
    """Every stream's state as a fold of its stored events, with no cache or snapshot."""
    by_name = {aggregate.name: aggregate for aggregate in app.aggregates}
    return {
        f"{name}/{stream}": by_name[name].fold(app.event_store.get(stream))
        for name, ids in STREAMS.items()
        for stream in ids
    }


def states_after_a_restart(
    app: incident.CommandHandler, url: str, snapshots: bool
) -> dict[str, Any]:
    """The states a fresh start reads: a new process for a durable store, a new command
    handler with nothing cached for the memory store (which lives in this process)."""
    options: dict[str, Any] = {"snapshot_every": 2} if snapshots else {}
    if url.startswith("memory"):
        fresh = build(app.event_store, cache_size=0, **options)
        return {
            f"{name}/{stream}": fresh.state(name, stream)
            for name, ids in STREAMS.items()
            for stream in ids
        }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    script = RESTART.format(streams=STREAMS)
    done = subprocess.run(
        [sys.executable, "-c", script, url, "yes" if snapshots else "no"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    printed = json.loads(done.stdout)
    by_name = {aggregate.name: aggregate for aggregate in app.aggregates}
    return {
        key: msgspec.convert(value, type(by_name[key.split("/")[0]].initial))
        for key, value in printed.items()
    }


@pytest.mark.parametrize("snapshots", [False, True], ids=["no-snapshots", "snapshots"])
def test_the_hotel_after_a_restart_is_the_fold_of_its_streams(
    store_url: str, snapshots: bool
) -> None:
    """Commands to three aggregates, then a cold start (a new process on the durable
    stores), with and without snapshots: every state equals the fold of its stream."""
    options: dict[str, Any] = {"snapshot_every": 2} if snapshots else {}
    app = build(store_url, **options)
    for command in COMMANDS:
        app.dispatch(command)
    expected = folded(app)
    assert expected["guest/guest-ann"] == guests.Guest(
        name="Ann Lee-Park", names=("Ann", "Ann Lee", "Ann Lee-Park")
    )
    assert expected["reservation/booking-101"].cancelled
    assert expected["room/room-102"] == rooms.Room(beds=1, open=False)
    assert states_after_a_restart(app, store_url, snapshots) == expected
    assert {r.event_type for r in app.event_store.read_all()} >= {
        "RoomCreated",
        "GuestCreated",
        "ReservationCreated",
    }
    app.event_store.close()


def test_two_event_classes_stored_under_one_name_fail_at_once_naming_both() -> None:
    """Two aggregates whose event classes would be stored under one name are refused
    when the command handler is built, with both classes and both aggregates named."""

    class Made(incident.Event):
        pass

    class Started(incident.Event, tag="Made"):
        pass

    class Noted(msgspec.Struct, frozen=True):
        made: bool = False

    first, second = (incident.Aggregate(name, initial=Noted()) for name in ("shelf", "lamp"))
    first.apply(Made)(lambda state, event: Noted(made=True))
    second.apply(Started)(lambda state, event: Noted(made=True))
    with pytest.raises(incident.RegistrationError) as refused:
        incident.CommandHandler("memory://", aggregates=[first, second])
    message = str(refused.value)
    assert "shelf and lamp" in message and "'Made'" in message
    assert "Made and" in message and "Started" in message


def test_two_command_handlers_sharing_a_store_cannot_store_two_classes_under_one_name() -> None:
    """The store's registry refuses a second class under a name already registered."""

    class Opened(incident.Event, tag="RoomCreated"):  # the name rooms.Created is stored as
        beds: int

    other = incident.Aggregate("annex", initial=rooms.Room())
    other.apply(Opened)(lambda state, event: state)
    store = incident.open_event_store("memory://")
    build(store)
    with pytest.raises(incident.RegistrationError, match="RoomCreated"):
        incident.CommandHandler(store, aggregates=[other])


def test_an_id_another_aggregate_owns_fails_at_once_naming_both(store_url: str) -> None:
    """A guest given the id of an existing room is refused with ForeignStream, naming the
    stream, both aggregates and the rule, before anything is written; reading it as a
    guest says the same."""
    app = build(store_url)
    app.dispatch(rooms.AddRoom(aggregate_id="R101", beds=2))
    with pytest.raises(incident.ForeignStream) as refused:
        app.dispatch(guests.RegisterGuest(aggregate_id="R101", name="Bo"))
    assert (refused.value.aggregate_id, refused.value.aggregate, refused.value.owner) == (
        "R101",
        "guest",
        "room",
    )
    assert "one id space per event store" in str(refused.value)
    assert isinstance(refused.value, incident.RoutingError)
    assert [r.event_type for r in app.event_store.get("R101")] == ["RoomCreated"]
    with pytest.raises(incident.ForeignStream):
        app.state("guest", "R101")
    app.event_store.close()
