"""Reservations: a guest books a room for some nights, and may cancel."""

from __future__ import annotations

import msgspec

import incident


class Reserve(incident.Command):
    aggregate_id: str
    room: str
    guest: str
    nights: int


class CancelReservation(incident.Command):
    aggregate_id: str


class Created(incident.Event, tag="ReservationCreated"):
    room: str
    guest: str
    nights: int


class Cancelled(incident.Event, tag="ReservationCancelled"):
    pass


class Reservation(msgspec.Struct, frozen=True):
    room: str | None = None
    guest: str | None = None
    nights: int = 0
    cancelled: bool = False


reservation = incident.Aggregate("reservation", initial=Reservation())


@reservation.execute
def reserve(state: Reservation, cmd: Reserve) -> Created:
    if state.room is not None:
        raise incident.Rejected("reservation_exists")
    return Created(room=cmd.room, guest=cmd.guest, nights=cmd.nights)


@reservation.execute
def cancel(state: Reservation, cmd: CancelReservation) -> Cancelled:
    if state.room is None or state.cancelled:
        raise incident.Rejected("reservation_not_active")
    return Cancelled()


@reservation.apply
def created(state: Reservation, event: Created) -> Reservation:
    return Reservation(room=event.room, guest=event.guest, nights=event.nights)


@reservation.apply
def cancelled(state: Reservation, event: Cancelled) -> Reservation:
    return msgspec.structs.replace(state, cancelled=True)
