"""The store protocols: every backend (memory, SQLite, Postgres) implements these verbs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from ..codec import EventTypes
from ..messages import Event, Projection, Recorded

__all__ = ["EventStore", "ProjectFn", "ProjectionStore"]

P = TypeVar("P", bound=Projection)

#: Called inside an append's transaction with the freshly stamped events; returns the
#: projections to write in that same transaction. Must be pure: it may run again on retry.
ProjectFn = Callable[[list[Recorded[Any]]], Sequence[Projection]]


@runtime_checkable
class ProjectionStore(Protocol):
    """Read models, one table (or dict) per Projection type, keyed by ``aggregate_id``."""

    def project(self, projection: P) -> P:
        """Upsert; never replaces a stored projection of a higher ``version``. Returns the
        projection now stored (the given one, or the newer one that won)."""
        ...

    def get(self, projection_type: type[P], key: str) -> P | None: ...

    def all(self, projection_type: type[P]) -> list[P]: ...

    def close(self) -> None: ...


@runtime_checkable
class EventStore(Protocol):
    """An append-only log of events, read per aggregate stream or globally."""

    #: resolves stored event type names; command handlers register their aggregates' types
    types: EventTypes

    def append(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        *,
        expected_version: object,
        aggregate: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Recorded[Any]]:
        """Append atomically if the stream is at ``expected_version`` (0 for a new stream,
        or ``incident.ANY``); otherwise raise ConcurrencyError and write nothing."""
        ...

    def append_and_project(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        *,
        expected_version: object,
        aggregate: str | None,
        metadata: Mapping[str, Any] | None,
        projection_store: ProjectionStore,
        project: ProjectFn,
        idempotency_key: str | None = None,
    ) -> list[Recorded[Any]]:
        """Append, then write ``project(recorded)`` to ``projection_store``: in one
        transaction when :meth:`shares_database_with` says so, else right after.

        With an ``idempotency_key``, the key is recorded in the same transaction; a key
        already used raises DuplicateCommand carrying the first time's events."""
        ...

    def recorded_for(self, idempotency_key: str) -> list[Recorded[Any]] | None:
        """The events an earlier append with this idempotency key stored, or None."""
        ...

    def shares_database_with(self, projection_store: ProjectionStore) -> bool: ...

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream's events with ``version > after``, in version order."""
        ...

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events with ``version > after`` in version order, without their
        envelopes: what a fold needs and no more. Read with one query, decoded in batches
        by one reused decoder, streamed, so a stream of any length folds in bounded
        memory. The last version read is ``after`` plus the number of events (versions
        have no gaps)."""
        ...

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The global log from ``position > after``, in position order, streamed."""
        ...

    def version(self, aggregate_id: str) -> int:
        """The stream's current version (0 when it has no events)."""
        ...

    def projections(self) -> ProjectionStore:
        """A projection store in the same database as this event store."""
        ...

    def initialize(self) -> list[str]:
        """Create or migrate the tables, idempotently; returns what was done, one line per
        step (empty when everything was already in place). ``incident init`` prints it."""
        ...

    def close(self) -> None: ...
