"""The store protocols: every backend (memory, SQLite, Postgres) implements these verbs."""

# Long: the whole contract of a store, each verb with what it promises, in one place: it is
# what a backend (ours or a user's) is written and tested against.
from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import msgspec

from ..codec import EventTypes
from ..messages import Event, Projection, Recorded

__all__ = [
    "AppendNotifier",
    "AppendRequest",
    "CheckpointStore",
    "CommitCall",
    "Committed",
    "CommitsMany",
    "Effects",
    "EventStore",
    "HandlerLock",
    "Outcome",
    "Owed",
    "Parked",
    "ProjectFn",
    "ProjectionStore",
    "ReplaceableProjectionStore",
]

P = TypeVar("P", bound=Projection)


class Owed(msgspec.Struct, frozen=True, kw_only=True):
    """Follow-up work an inline event handler owes for one event (a transactional outbox
    row): written in the transaction that stores the event, removed once every command
    the handler's listeners return for it has been carried out. ``error`` and
    ``attempts`` say how the last try went (None and 0 before any failure)."""

    handler: str
    position: int
    event_id: str
    aggregate_id: str
    event_type: str
    error: str | None = None
    attempts: int = 0
    owed_at: dt.datetime


class Effects(NamedTuple):
    """What an append writes besides its events, in the same transaction: the
    projections (in the projection store) and the owed follow-ups (always in the event
    store's own database, so they commit with the events that cause them). ``result``
    is the caller's own: the store hands it back untouched in :class:`Committed` (the
    command handler keeps there the state the events reached and the follow-up commands
    they call for)."""

    projections: Sequence[Projection] = ()
    owed: Sequence[Owed] = ()
    result: Any = None


#: Called inside an append's transaction with the freshly stamped events; returns the
#: projections to write in that same transaction (a sequence, or Effects with the owed
#: follow-ups too). Must be pure: it may run again on retry, and what the last run
#: returned is what the append committed.
ProjectFn = Callable[[list[Recorded[Any]]], Sequence[Projection] | Effects]


class AppendRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One append, as a value: new events for one stream, written only if the stream is
    at ``expected_version`` (0 for a new stream, or ``incident.ANY``), each stamped with
    ``metadata``; with an ``idempotency_key``, recorded under it in the same
    transaction (a key already used raises DuplicateCommand carrying what it came to)."""

    aggregate_id: str
    events: Sequence[Event]
    expected_version: Any
    aggregate: str | None = None
    metadata: Mapping[str, Any] | None = None
    idempotency_key: str | None = None


class Committed(NamedTuple):
    """What an append committed: the events' envelopes, and the Effects ``project``
    returned for them (empty Effects without a ``project``)."""

    recorded: list[Recorded[Any]]
    effects: Effects = Effects()


class CommitCall(NamedTuple):
    """One commit among several asked of a store at once (``commit_many``): the
    arguments of :meth:`EventStore.commit`."""

    request: AppendRequest
    projection_store: ProjectionStore | None = None
    project: ProjectFn | None = None


@runtime_checkable
class CommitsMany(Protocol):
    """A store that takes several commits at once; when ``shares_commits`` it writes
    them together (one transaction, one flush), each still with its own outcome."""

    shares_commits: bool

    def commit_many(self, calls: Sequence[CommitCall]) -> list[Committed | Exception]: ...


class Outcome(NamedTuple):
    """What a command dispatched under an idempotency key came to: the events it stored,
    or the reason (and detail) it was rejected for. A replay of the key takes the same
    branch."""

    recorded: list[Recorded[Any]]
    rejected: str | None = None
    detail: str | None = None


@runtime_checkable
class ProjectionStore(Protocol):
    """Read models, one table (or dict) per Projection type, keyed by ``aggregate_id``."""

    def project(self, projection: P) -> P:
        """Upsert; never replaces a stored projection of a higher ``version``. Returns the
        projection now stored (the given one, or the newer one that won). Anything that
        is not an ``incident.Projection`` (a struct with the same fields, a dict) is
        refused with InvalidArgument on every store, before a table is made or claimed
        for its type; a value no store could keep, with Unstorable; nothing is written."""
        ...

    def get(self, projection_type: type[P], key: str) -> P | None: ...

    def all(self, projection_type: type[P]) -> list[P]: ...

    def close(self) -> None: ...


@runtime_checkable
class EventStore(Protocol):
    """An append-only log of events, read per aggregate stream or globally. Every store
    checks its verbs' arguments alike (``after`` an int >= 0, ids and keys str...):
    :mod:`incident.stores.arguments`."""

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

    def commit(
        self,
        request: AppendRequest,
        *,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> Committed:
        """The one append verb (``append`` and ``append_and_project`` are requests for
        it): write ``request`` atomically, and ``project(recorded)``'s Effects with it,
        the projections in ``projection_store`` (in the same transaction when
        :meth:`shares_database_with` says so, else right after), the owed follow-ups in
        this database, in the append's transaction, whatever the projection store. The
        projections and owed work are checked first, as ``project`` and ``owe`` check
        them: refused (InvalidArgument, Unstorable), the events are not written either."""
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
        already used raises DuplicateCommand carrying the first time's outcome. Owed
        follow-ups ``project`` returns (in Effects) are written in this database, in
        the append's transaction, whatever the projection store."""
        ...

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        """What an earlier command with this idempotency key came to, or None."""
        ...

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        """Record, durably, that the command keyed so was rejected, unless the key already
        has an outcome; returns the outcome now stored (a racing twin's may have won)."""
        ...

    def owed(self, handler: str | None = None) -> list[Owed]:
        """Follow-up work still owed, in position order, of one inline handler or all."""
        ...

    def owe(self, owed: Owed) -> None:
        """Keep (or update: its error and attempts) a record of owed work. Owed work no
        store could keep as given is refused with InvalidArgument on every store, before
        anything is written (the record already kept stays as it was): an ``event_id``
        that is not a UUID spelled as incident spells one (lower case, with hyphens), a
        ``position`` that is not an int from 1 to 2**63 - 1, a ``handler``, ``event_type``
        or ``aggregate_id`` that is not a non-empty str every store keeps (no NUL, no
        lone surrogate; an id of at most 255 characters), ``attempts`` outside 0 to
        2**31 - 1, an ``error`` that is not None or a str, or a naive ``owed_at``
        (:func:`incident.stores.arguments.check_owed`)."""
        ...

    def settle(self, handler: str, position: int) -> None:
        """The work ``handler`` owed for the event at ``position`` is done."""
        ...

    def shares_database_with(self, projection_store: ProjectionStore) -> bool: ...

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream's events with ``version > after``, in version order."""
        ...

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events with ``version > after`` in version order, without their
        envelopes: what a fold needs and no more. Read and decoded in batches, streamed,
        so a stream of any length folds in bounded memory. The last version read is
        ``after`` plus the number of events (versions have no gaps)."""
        ...

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The global log from ``position > after``, in position order, streamed."""
        ...

    def subscribe(
        self, after: int = 0, *, poll_interval: float = 1.0, batch_size: int = 500
    ) -> Iterator[Recorded[Any]]:
        """The log from ``position > after``, then each event as it commits, in order,
        without end: a live tail. A store of your own gets it by inheriting
        ``incident.stores.live.Live`` (``read_all`` plus ``wait_for_append``)."""
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


@runtime_checkable
class AppendNotifier(Protocol):
    """An event store that can wake a tailing reader when something is appended
    (memory: a condition variable; Postgres: LISTEN/NOTIFY). Stores without it are polled."""

    def wait_for_append(self, after: int, timeout: float) -> bool:
        """Block until the log holds a position ``> after`` or ``timeout`` seconds pass;
        True when there is something new (spurious wake-ups are allowed)."""
        ...


@runtime_checkable
class ReplaceableProjectionStore(Protocol):
    """A projection store that can swap a whole table at once, which ``replay`` needs:
    version guards would refuse a rebuilt read model that is older than a stored one."""

    def replace_all(self, projection_type: type[P], projections: Iterable[P]) -> int:
        """Atomically delete every stored ``projection_type`` and write ``projections``;
        returns how many were written. A ``projection_type`` or a row that is not an
        ``incident.Projection`` is refused with InvalidArgument, as by ``project``, and
        the table is left as it was."""
        ...


class Parked(msgspec.Struct, frozen=True, kw_only=True):
    """An event a subscription gave up on: it stays in the dead-letter store, with the
    last error, until it is retried successfully or skipped. A *held* entry is one that
    waits behind an earlier parked event of its stream (parking holds the stream)."""

    handler: str
    position: int
    event_id: str
    aggregate_id: str
    event_type: str
    error: str
    attempts: int
    parked_at: dt.datetime

    @property
    def held(self) -> bool:
        """Held behind an earlier failure of its stream, never tried itself (attempts 0),
        as opposed to an event whose listeners failed."""
        return self.attempts == 0


@runtime_checkable
class HandlerLock(Protocol):
    """Exclusive right to run one handler, across threads, processes and (on Postgres)
    machines. It is held by something that dies with its holder (a session, an open
    file), never by a row with an expiry time."""

    handler: str

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock: wait up to ``timeout`` seconds (None: forever, 0: just try)."""
        ...

    def release(self) -> None: ...

    def held(self) -> bool:
        """Whether this holder still has the lock (a dropped Postgres session loses it)."""
        ...


@runtime_checkable
class CheckpointStore(Protocol):
    """Where subscriptions keep their position in the global log, their dead letters and
    their locks. Checkpoints move by compare-and-set, so two runners that somehow hold
    the same handler cannot both advance it."""

    def load(self, handler: str) -> int:
        """The last position ``handler`` has fully processed (0: none yet)."""
        ...

    def save(
        self,
        handler: str,
        position: int,
        *,
        expected: int,
        projections: Sequence[Projection] = (),
        projection_store: ProjectionStore | None = None,
        parked: Sequence[Parked] = (),
    ) -> None:
        """Write ``projections`` and move the checkpoint from ``expected`` to ``position``:
        in one transaction when the projection store shares this database, else inside
        the checkpoint's transaction once the stored checkpoint has been checked (and is
        held: no other save can move it meanwhile), before it moves (so a crash in
        between re-applies idempotent upserts, never skips). ``parked`` are the batch's
        dead letters (as ``park``), written in the checkpoint's transaction. Raises
        CheckpointConflict, writing nothing (no dead letter, no row in another database
        either), if the stored checkpoint is not ``expected``. Every row is checked as
        ``project`` checks it before any is written, wherever they go: one refused
        (InvalidArgument for what is not a Projection, Unstorable) leaves the batch's
        rows, its dead letters and the checkpoint unwritten."""
        ...

    def reset(
        self,
        handler: str,
        position: int = 0,
        *,
        drop_parked: bool = False,
        tables: Mapping[type[Projection], Sequence[Projection]] | None = None,
        projection_store: ProjectionStore | None = None,
    ) -> None:
        """Set the checkpoint unconditionally (the caller holds the lock). A replay's
        commit: with ``drop_parked``, every dead letter of ``handler`` is dropped in the
        same transaction; with ``tables``, each projection type's table in
        ``projection_store`` is replaced by its rows (as ``replace_all``), in that
        transaction too when the projection store shares this database, else after it
        commits (:mod:`incident.stores.replacing` says why that order). Every row is
        checked before anything is written (Unstorable, IncidentError)."""
        ...

    def checkpoints(self) -> dict[str, int]:
        """Every known handler and its checkpoint."""
        ...

    def park(self, parked: Parked) -> None:
        """Keep a failed event (replacing an earlier record of the same one)."""
        ...

    def parked(self, handler: str | None = None) -> list[Parked]:
        """Parked events, in position order, of one handler or all."""
        ...

    def unpark(self, handler: str, position: int) -> None: ...

    def lock(self, handler: str) -> HandlerLock:
        """A new, unacquired lock object for ``handler``."""
        ...

    def shares_database_with(self, projection_store: ProjectionStore) -> bool: ...

    def initialize(self) -> list[str]: ...

    def close(self) -> None:
        """Release what this store holds of its own; one from ``event_store.checkpoints()``
        shares the event store's database and leaves it open."""
        ...
