"""The SQLite event store: appends, idempotency keys and owed follow-ups, and the stores
that share its file (projections, checkpoints); its reads are
:mod:`incident.stores.sqlite.reading`, which it inherits.

An append takes SQLite's write lock at its first statement (``BEGIN IMMEDIATE``), reads
the stream's version and the log's last position inside it, and writes the events, the
command's key, its inline projections (when they are in this file) and what it owes, in
that one transaction. Appends made at the same time by threads of this process share
that transaction, each in a savepoint of its own, and so one fsync
(:mod:`incident.stores.sqlite.group_commit`, ``docs/writes.md``).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ...codec import EventTypes
from ...errors import InvalidArgument
from .._common import (
    AppendVerbs,
    event_json,
    metadata_json,
    owed_from_row,
    owed_row,
    project_elsewhere,
)
from ..arguments import check_key, check_owed, check_rejection, checked_request, readable_key
from ..live import Live
from ..protocols import (
    AppendRequest,
    CommitCall,
    Committed,
    Outcome,
    Owed,
    ProjectFn,
    ProjectionStore,
)
from .batch import Append, BatchWriter
from .checkpoints import SQLiteCheckpointStore
from .database import Database
from .group_commit import GroupCommit
from .projections import SQLiteProjectionStore, writes_into
from .reading import EventReads
from .sql import (
    ADD_REJECTION,
    EVENT_ID_AT,
    KEY_OUTCOME,
    LOG_BETWEEN,
    OWE,
    OWED,
    OWED_BY,
    SETTLE,
    date_text,
)
from .url import sqlite_path
from .write_lock import LOCK_POLL

__all__ = ["SYNCHRONOUS", "SQLiteEventStore", "open_sqlite"]

SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SQLiteEventStore(EventReads, AppendVerbs, Live):
    """An event log in an SQLite file. ``projections()`` is a projection store in the same
    file; ``append_and_project`` then commits events and projections together."""

    def __init__(self, database: Database, *, types: EventTypes | None = None) -> None:
        self.types = types or EventTypes()
        self._db = database
        self._projections: SQLiteProjectionStore | None = None
        #: the queue concurrent appends share commits through (see ``group_commit``)
        # an in-memory database has no fsync to share, and a reader on this thread may
        # hold its one connection's guard: there, every append commits alone
        self.group: GroupCommit[Append, Committed] = GroupCommit(
            database,
            BatchWriter(database, self._outcome),
            self._landed,
            shared=not database.in_memory,
        )
        self.shares_commits = self.group.shared

    def __repr__(self) -> str:
        return f"SQLiteEventStore({self._db.path!r})"

    @property
    def path(self) -> str:
        return self._db.path

    # -- writing ------------------------------------------------------------------

    def commit(
        self,
        request: AppendRequest,
        *,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> Committed:
        append = self._prepared(CommitCall(request, projection_store, project))
        committed = self.group.commit(append, len(append.events))
        self._db.appends.appended()
        project_elsewhere(committed, projection_store, append.together)
        return committed

    def commit_many(self, calls: Sequence[CommitCall]) -> list[Committed | Exception]:
        """The calls' appends through the group commit together (one transaction and
        one fsync when they fit one batch), each with its own outcome or error."""
        outcomes: list[Committed | Exception | None] = []
        prepared: list[tuple[int, Append]] = []
        for call in calls:
            try:
                prepared.append((len(outcomes), self._prepared(call)))
                outcomes.append(None)
            except Exception as error:  # refused before the lock: nothing written
                outcomes.append(error)
        if prepared:
            written = self.group.commit_many([(a, len(a.events)) for _, a in prepared])
            self._db.appends.appended()
            for (at, append), outcome in zip(prepared, written, strict=True):
                if not isinstance(outcome, Exception):
                    try:
                        project_elsewhere(outcome, calls[at].projection_store, append.together)
                    except Exception as error:
                        outcome = error
                outcomes[at] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _prepared(self, call: CommitCall) -> Append:
        """The append checked and encoded before taking the lock: a bad event or
        metadata fails with nothing written."""
        request = call.request
        batch = checked_request(request)
        payloads = [(event_json(e)[0], type(e).schema_version) for e in batch]
        store = call.projection_store
        together = store is not None and self.shares_database_with(store)
        metadata_text = metadata_json(request.metadata)
        if not self._db.schema_ready:
            self._db.migrate()
        return Append(request, batch, payloads, metadata_text, call.project, together)

    @staticmethod
    def _landed(conn: sqlite3.Connection, written: list[Committed]) -> bool:
        """Whether appends written in a transaction whose end went unseen are in the log:
        their events' ids are random, so finding the first one at its position says so."""
        for committed in written:
            if committed.recorded:
                first = committed.recorded[0]
                found = conn.execute(EVENT_ID_AT, (first.position,)).fetchone()
                return found is not None and found[0] == first.event_id
        return False

    def _outcome(self, conn: sqlite3.Connection, key: str) -> Outcome | None:
        found = conn.execute(KEY_OUTCOME, (key,)).fetchone()
        if found is None:
            return None
        first, last, rejected, detail = found
        if rejected is not None:
            return Outcome([], rejected, detail)
        return Outcome(self._decode(conn.execute(LOG_BETWEEN, (first, last)).fetchall(), None))

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        if not readable_key(idempotency_key):
            return None  # no key can be it
        found: Outcome | None = self._read(lambda conn: self._outcome(conn, idempotency_key))
        return found

    def remember_rejection(
        self, idempotency_key: str, reason: str, detail: str | None = None
    ) -> Outcome:
        check_key(idempotency_key)
        check_rejection(reason, detail)
        if not self._db.schema_ready:
            self._db.migrate()
        with self._db.errors(), self._db.transaction() as conn:
            conn.execute(ADD_REJECTION, (idempotency_key, reason, detail))
            stored = self._outcome(conn, idempotency_key)
        assert stored is not None  # inserted, or there already
        return stored

    def owed(self, handler: str | None = None) -> list[Owed]:
        rows = self._rows(OWED, ()) if handler is None else self._rows(OWED_BY, (handler,))
        return [owed_from_row(row) for row in rows]

    def owe(self, owed: Owed) -> None:
        check_owed(owed)
        self._write(OWE, owed_row(owed, date_text))

    def settle(self, handler: str, position: int) -> None:
        self._write(SETTLE, (handler, position))

    def _write(self, statement: str, params: tuple[Any, ...]) -> None:
        if not self._db.schema_ready:
            self._db.migrate()
        with self._db.errors(), self._db.transaction() as conn:
            conn.execute(statement, params)

    def _read(self, read: Callable[[sqlite3.Connection], Any]) -> Any:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        with db.errors(), db.guard:
            return read(db.conn())

    def shares_database_with(self, projection_store: ProjectionStore) -> bool:
        return writes_into(self._db, projection_store)

    # -- the database ----------------------------------------------------------

    def projections(self) -> SQLiteProjectionStore:
        if self._projections is None:
            self._projections = SQLiteProjectionStore(self._db)
        return self._projections

    def checkpoints(self) -> SQLiteCheckpointStore:
        """Subscription checkpoints in this file (beside the projections: one commit)."""
        return SQLiteCheckpointStore(self._db)

    def initialize(self) -> list[str]:
        """Create or migrate the tables; returns what was done (nothing the second time).

        >>> store = open_sqlite("sqlite://")
        >>> for line in store.initialize():
        ...     print(line)
        created table incident_schema
        created table events
        created table incident_idempotency
        created table incident_owed
        recorded schema version 4 (the event log)
        >>> store.initialize()
        []
        """
        return self._db.migrate()

    def close(self) -> None:
        """Close the database (its projection store shares it)."""
        self._db.close()


def open_sqlite(url: str, **options: Any) -> SQLiteEventStore:
    """Open ``sqlite:///path.db`` (created on first use) or ``sqlite://`` (in memory).

    Options, as keywords or in the URL's query string (keywords win): ``synchronous``
    (``FULL`` by default; ``NORMAL`` trades the last commits on power loss for speed)
    ``timeout`` (seconds a writer waits for the write lock, 30 by default) and
    ``lock_poll`` (seconds between a waiting writer's tries at the lock, 0.001 by
    default, so waiting processes take turns; 0 leaves the waiting to SQLite's busy
    handler, which is unfair to long waiters but spends less CPU: docs/sqlite.md).

    >>> open_sqlite("sqlite://?synchronous=normal")
    SQLiteEventStore(':memory:')
    """
    path = sqlite_path(url.split("?", 1)[0])
    settings: dict[str, Any] = dict(parse_qsl(urlsplit(url).query))
    settings.update(options)
    unknown = set(settings) - {"synchronous", "timeout", "lock_poll", "types"}
    if unknown:
        raise InvalidArgument(
            f"Unknown SQLite store options {sorted(unknown)}; "
            "known: synchronous, timeout, lock_poll, types"
        )
    synchronous = str(settings.get("synchronous", "FULL")).upper()
    if synchronous not in SYNCHRONOUS:
        raise InvalidArgument(
            f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {settings['synchronous']!r}"
        )
    try:
        timeout = float(settings.get("timeout", 30.0))
        lock_poll = float(settings.get("lock_poll", LOCK_POLL))
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"timeout and lock_poll are seconds: {error}") from error
    if not 0 <= timeout < math.inf:
        raise InvalidArgument(f"timeout must be a number of seconds >= 0, got {timeout}")
    if not 0 <= lock_poll <= 1:
        raise InvalidArgument(f"lock_poll must be between 0 and 1 second, got {lock_poll}")
    types = settings.get("types")
    if types is not None and not isinstance(types, EventTypes):
        raise InvalidArgument(f"types must be an incident.EventTypes, got {types!r}")
    database = Database(path, synchronous=synchronous, timeout=timeout, lock_poll=lock_poll)
    return SQLiteEventStore(database, types=types)
