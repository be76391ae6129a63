"""A newcomer's domain: a hotel with rooms, guests and reservations.

Each aggregate names its events ``Created`` and so on, in a module of its own: the
class names clash, and the stored names do not, because each class carries a tag.
Room, guest and reservation ids are kept apart by prefix (``room-101``), because
aggregate ids are one id space per event store.
"""

from __future__ import annotations

from typing import Any

import incident

from . import guests, reservations, rooms

__all__ = ["build", "guests", "reservations", "rooms"]


def build(event_store: incident.EventStore | str, **options: Any) -> incident.CommandHandler:
    return incident.CommandHandler(
        event_store,
        aggregates=[rooms.room, guests.guest, reservations.reservation],
        **options,
    )
