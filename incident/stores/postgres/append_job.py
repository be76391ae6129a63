"""One Postgres append on its way: the request checked and encoded, and what each try of
it wrote, which the event store's paths (:mod:`.events`, :mod:`.numbered`) share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...messages import Event, Projection, Recorded
from ..protocols import AppendRequest, Effects, ProjectFn

# what an append wrote: its events, its effects, the projection types it created
Written = tuple[list[Recorded[Any]], Effects, list[type[Projection]]]
# and the WAL positions read right after its commit (durability.WAL_POSITIONS)
Committing = tuple[Written, tuple[Any, ...] | None]


@dataclass(frozen=True)
class AppendJob:
    """One append, checked and encoded, ready to write. ``sent`` keeps what each try
    of it wrote into a transaction, so a commit the connection died in can be looked up
    by its events' ids."""

    request: AppendRequest
    events: list[Event]  # the request's, checked
    payloads: list[str]
    metadata_text: str  # encoded once, for every row
    project: ProjectFn | None
    shared: bool  # the projections go into this database, in the same transaction
    sent: list[Written] = field(default_factory=list)
