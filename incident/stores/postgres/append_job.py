"""One Postgres append on its way: the request checked and encoded, and what each try of
it wrote, which the event store's paths (:mod:`.events`, :mod:`.numbered`) share."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ...errors import ConcurrencyError
from ...messages import Event, Projection, Recorded
from ..protocols import AppendRequest, Effects, ProjectFn
from .migrations import STREAM_MOVED

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


def raise_if_moved(job: AppendJob, error: psycopg.Error) -> None:
    """The server found the stream at another version than the append expected (the
    numbered and predicted appends check it in the server): the append's
    ConcurrencyError, nothing written; unless its key is to be looked at first
    (``key_first``)."""
    if error.sqlstate == STREAM_MOVED and not key_first(job, error):
        actual = int(error.diag.message_detail or 0)
        version = job.request.expected_version
        raise ConcurrencyError(job.request.aggregate_id, version, actual) from None


def key_first(job: AppendJob, error: psycopg.Error) -> bool:
    """Whether a refusal sends the append the locked way, which reads its key before
    its stream's version: the server checks the version first, but a used key is the
    append's DuplicateCommand on every store whatever version it expected (a command
    retried as it was first sent)."""
    return error.sqlstate == STREAM_MOVED and job.request.idempotency_key is not None


class InFlight:
    """How many appends of this process are under way: ``with in_flight.one() as alone``
    says whether this append is the only one. Alone and predicting, an append commits
    synchronously on the predicted path: prepared statements, one round trip, one fsync,
    as a bare insert; the lock it holds through the fsync keeps nobody of this process
    waiting (one that arrives meanwhile goes the numbered way and queues in the server)."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @contextmanager
    def one(self) -> Iterator[bool]:
        with self._lock:
            self._count += 1
            alone = self._count == 1
        try:
            yield alone
        finally:
            with self._lock:
                self._count -= 1
