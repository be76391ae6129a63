"""Guests: registered, renamed."""

from __future__ import annotations

import msgspec

import incident


class RegisterGuest(incident.Command):
    aggregate_id: str
    name: str


class RenameGuest(incident.Command):
    aggregate_id: str
    name: str


class Created(incident.Event, tag="GuestCreated"):
    name: str


class Renamed(incident.Event, tag="GuestRenamed"):
    name: str


class Guest(msgspec.Struct, frozen=True):
    name: str | None = None
    names: tuple[str, ...] = ()


guest = incident.Aggregate("guest", initial=Guest())


@guest.execute
def register(state: Guest, cmd: RegisterGuest) -> Created:
    if state.name is not None:
        raise incident.Rejected("guest_exists")
    return Created(name=cmd.name)


@guest.execute
def rename(state: Guest, cmd: RenameGuest) -> Renamed:
    if state.name is None:
        raise incident.Rejected("guest_not_found")
    return Renamed(name=cmd.name)


@guest.apply
def created(state: Guest, event: Created) -> Guest:
    return Guest(name=event.name, names=(event.name,))


@guest.apply
def renamed(state: Guest, event: Renamed) -> Guest:
    return Guest(name=event.name, names=(*state.names, event.name))
