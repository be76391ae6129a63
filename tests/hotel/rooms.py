"""Rooms: added with a number of beds, closed for works."""

from __future__ import annotations

import msgspec

import incident


class AddRoom(incident.Command):
    aggregate_id: str
    beds: int


class CloseRoom(incident.Command):
    aggregate_id: str


class Created(incident.Event, tag="RoomCreated"):
    beds: int


class Closed(incident.Event, tag="RoomClosed"):
    pass


class Room(msgspec.Struct, frozen=True):
    beds: int = 0
    open: bool = False


room = incident.Aggregate("room", initial=Room())


@room.execute
def add(state: Room, cmd: AddRoom) -> Created:
    if state.beds:
        raise incident.Rejected("room_exists")
    return Created(beds=cmd.beds)


@room.execute
def close(state: Room, cmd: CloseRoom) -> Closed:
    if not state.open:
        raise incident.Rejected("room_not_open")
    return Closed()


@room.apply
def created(state: Room, event: Created) -> Room:
    return Room(beds=event.beds, open=True)


@room.apply
def closed(state: Room, event: Closed) -> Room:
    return msgspec.structs.replace(state, open=False)
