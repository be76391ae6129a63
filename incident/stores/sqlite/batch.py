"""Writing the appends of one commit in bulk: a statement per table for the whole batch,
not a set of statements per append.

Two phases. **Checking** reads what the batch needs in two queries (every stream's
version and the log's last position; the idempotency keys already used) and then, in
Python and in queue order, takes each append in turn: its key, its expected version
(against the versions the appends before it in the batch reached), its events stamped
from the next free position, ``project`` run on them and its projections and owed
follow-ups encoded. An append that fails any of this gets its error as its outcome; it
has written nothing, takes no position and moves no stream, so the next append is
checked as if it had never been queued. **Writing** then inserts the rows of the
appends that passed: one ``executemany`` for the events, one for the keys, one per
projection table, one for what is owed. A write can still fail (a constraint in a
user's table, a full disk); the caller then undoes the writing phase and writes the
batch one append at a time, each in its own savepoint, so the append whose rows fail
fails alone (:mod:`incident.stores.sqlite.group_commit`, ``docs/writes.md``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ...errors import ConcurrencyError, DuplicateCommand
from ...messages import Event
from .._common import effects_of, owed_row, stamp
from ..arguments import check_expected_version
from ..protocols import AppendRequest, Committed, Effects, Outcome, ProjectFn
from .database import Database
from .sql import ADD_KEY, HEAD, INSERT_EVENT, OWE, date_text

__all__ = ["Append", "BatchWriter", "heads_sql", "keys_sql"]


class Append:
    """One append checked and encoded, waiting for its transaction: what the writer
    (this caller's thread, or the leader of a shared commit) needs to write it."""

    __slots__ = ("events", "metadata_text", "payloads", "project", "request", "together")

    def __init__(
        self,
        request: AppendRequest,
        events: list[Event],
        payloads: list[tuple[str, int]],
        metadata_text: str,
        project: ProjectFn | None,
        together: bool,
    ) -> None:
        self.request = request
        self.events = events
        self.payloads = payloads
        self.metadata_text = metadata_text
        self.project = project
        self.together = together  # the projections go into this file, in the transaction


def heads_sql(streams: int) -> str:
    """The log's last position and each stream's version, one row per stream given (the
    correlated max() is one seek in the UNIQUE (aggregate_id, version) index)."""
    values = ", ".join(["(?)"] * streams)
    return (
        "SELECT (SELECT coalesce(max(position), 0) FROM events), column1, "
        "(SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = column1) "
        f"FROM (VALUES {values})"
    )


def keys_sql(keys: int) -> str:
    """Which of the given idempotency keys were used already, with their outcomes."""
    marks = ", ".join(["?"] * keys)
    return (
        "SELECT key, first_position, last_position, rejected, detail FROM incident_idempotency"
        f" WHERE key IN ({marks})"
    )


class _OneByOne(Exception):
    """The batch needs what only the one-append-at-a-time path does (a projection table
    to create): nothing has been written."""


class BatchWriter:
    """``writer(conn, appends)`` inside the open write transaction: each append's outcome
    (its Committed, or the error that kept it out), once the rows of those that passed
    are written; None, having written nothing, when the batch must be written one append
    at a time. A driver error while writing is raised: the caller undoes the writes."""

    def __init__(
        self, db: Database, outcome: Callable[[sqlite3.Connection, str], Outcome | None]
    ) -> None:
        self._db = db
        self._outcome = outcome  # a used key's outcome, read back from the log

    def __call__(
        self, conn: sqlite3.Connection, appends: list[Append]
    ) -> list[Committed | Exception] | None:
        one = len(appends) == 1
        if one:  # the usual case, a writer alone: the queries it always ran
            request = appends[0].request
            version, last = conn.execute(HEAD, (request.aggregate_id,)).fetchone()
            heads = {request.aggregate_id: version}
            keys = [request.idempotency_key] if request.idempotency_key else []
        else:
            streams = list(dict.fromkeys(a.request.aggregate_id for a in appends))
            rows = conn.execute(heads_sql(len(streams)), streams).fetchall()
            last = rows[0][0]
            heads = {stream: version for _, stream, version in rows}
            keys = [a.request.idempotency_key for a in appends if a.request.idempotency_key]
        used = {}
        if keys:
            used = {row[0]: row for row in conn.execute(keys_sql(len(keys)), keys).fetchall()}
        batch = _Rows(self._db, conn, heads, last, used, self._outcome, alone=one)
        outcomes: list[Committed | Exception] = []
        for append in appends:
            try:
                outcomes.append(batch.add(append))
            except _OneByOne:
                return None
            except Exception as error:  # this append alone: nothing of it is in the rows
                outcomes.append(error)
        batch.write()
        return outcomes


class _Rows:
    """The rows of one batch being checked, and the state the appends checked so far
    left: the streams' versions, the last position, the keys they recorded."""

    __slots__ = (
        "alone",
        "conn",
        "db",
        "events",
        "first",
        "heads",
        "keys",
        "last",
        "outcome",
        "owed",
        "recorded_keys",
        "upserts",
        "used",
    )

    def __init__(
        self,
        db: Database,
        conn: sqlite3.Connection,
        heads: dict[str, int],
        last: int,
        used: dict[str, Any],
        outcome: Callable[[sqlite3.Connection, str], Outcome | None],
        *,
        alone: bool,
    ) -> None:
        self.db, self.conn, self.heads, self.last = db, conn, heads, last
        self.used, self.outcome, self.alone = used, outcome, alone
        self.events: list[tuple[Any, ...]] = []
        self.keys: list[tuple[str, int, int]] = []
        self.upserts: dict[str, list[tuple[Any, ...]]] = {}
        self.owed: list[tuple[Any, ...]] = []
        self.recorded_keys: dict[str, Committed] = {}
        self.first: Append | None = None  # the append whose rows come first

    def add(self, append: Append) -> Committed:
        """Check one append against the batch so far and take its rows, or raise with
        nothing taken."""
        request = append.request
        aggregate_id, key = request.aggregate_id, request.idempotency_key
        if key is not None:
            if key in self.used:
                earlier = self.outcome(self.conn, key)
                assert earlier is not None  # read in this transaction, under the lock
                raise DuplicateCommand(key, *earlier)
            if key in self.recorded_keys:  # an earlier append of this batch
                raise DuplicateCommand(key, self.recorded_keys[key].recorded)
        actual = self.heads[aggregate_id]
        check_expected_version(aggregate_id, request.expected_version, actual)
        if not append.events:
            return Committed([])
        recorded = stamp(
            aggregate_id,
            request.aggregate,
            append.events,
            first_position=self.last + 1,
            first_version=actual + 1,
            metadata=request.metadata,
        )
        effects = Effects()
        upserts: list[tuple[str, tuple[Any, ...]]] = []
        owed: list[tuple[Any, ...]] = []
        if append.project is not None:
            effects = effects_of(append.project, recorded, checked=not append.together)
            if append.together:
                upserts = self._projection_rows(effects)
            if effects.owed:
                owed = [owed_row(o, date_text) for o in effects.owed]
        # everything of this append is checked: take its rows
        if self.first is None:
            self.first = append
        date = date_text(recorded[0].event_date)
        metadata_text, aggregate = append.metadata_text, recorded[0].aggregate
        self.events += [
            (
                r.position,
                r.event_id,
                aggregate_id,
                aggregate,
                r.version,
                r.event_type,
                schema_version,
                date,
                data,
                metadata_text,
            )
            for r, (data, schema_version) in zip(recorded, append.payloads, strict=True)
        ]
        for sql, row in upserts:
            self.upserts.setdefault(sql, []).append(row)
        if owed:
            self.owed += owed
        committed = Committed(recorded, effects)
        if key is not None:
            self.keys.append((key, recorded[0].position, recorded[-1].position))
            self.recorded_keys[key] = committed
        self.heads[aggregate_id] = recorded[-1].version
        self.last = recorded[-1].position
        return committed

    def _projection_rows(self, effects: Effects) -> list[tuple[str, tuple[Any, ...]]]:
        """(upsert, row) of each projection, every one encoded before any is written. A
        table not made yet in this process is made here by an append written alone, and
        sends a shared batch down the one-at-a-time path, where a failed append's
        savepoint takes the table it made with it."""
        db, rows = self.db, []
        for projection in effects.projections:
            table = db.table(type(projection))
            if not db.table_ready(table):
                if not self.alone:
                    raise _OneByOne
                db.ensure_table(self.conn, table)
            rows.append((table.upsert_sql, table.row(projection)))
        return rows

    def write(self) -> None:
        """Write the rows taken, a statement per table; a driver error is raised. Only a
        writer that skipped BEGIN IMMEDIATE could break UNIQUE (aggregate_id, version):
        for one append it is the conflict it means."""
        conn = self.conn
        if self.events:
            try:
                conn.executemany(INSERT_EVENT, self.events)
            except sqlite3.IntegrityError as error:
                if not self.alone or "events.aggregate_id, events.version" not in str(error):
                    raise
                assert self.first is not None  # it has rows
                request = self.first.request
                now = conn.execute(HEAD, (request.aggregate_id,)).fetchone()[0]
                raise ConcurrencyError(
                    request.aggregate_id, request.expected_version, now
                ) from error
        if self.keys:
            _insert(conn, ADD_KEY, self.keys)
        for sql, rows in self.upserts.items():
            _insert(conn, sql, rows)
        if self.owed:
            _insert(conn, OWE, self.owed)


def _insert(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    # one row, the usual case alone: execute costs less than executemany
    if len(rows) == 1:
        conn.execute(sql, rows[0])
    else:
        conn.executemany(sql, rows)
