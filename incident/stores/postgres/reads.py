"""Reading a Postgres event log: streams (whole, in batches, or as the pages a fold
decodes in one call), the whole log in batches, versions, and what idempotency keys and
owed work recorded. The event store (:mod:`.events`) is this and its writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator, Iterator, Sequence
from typing import Any

from ...codec import EventTypes
from ...mapper import (
    JoinedBatch,
    envelopes,
    fold_batches,
    log_pages,
    stream_pages,
)
from ...messages import Event, Recorded
from .._common import ChainedBatches, check_versions, owed_from_row
from ..arguments import check_after, check_limit, readable_id, readable_key
from ..protocols import Outcome, Owed
from .database import Database
from .durability import WAL_POSITIONS, durable_rows
from .session import Connection, Query
from .sql import PAYLOAD_OPENING, EventStatements


def _in_utc(stored: dt.datetime) -> dt.datetime:
    return stored.astimezone(dt.UTC)


EVENTS_PAGE = 16_384  # rows per query when folding a stream: one page for most streams


class PostgresEventReads:
    """The reads of a Postgres event store, each a short checkout of a pooled connection
    (inside a turn on a stream, the turn's own)."""

    def __init__(self, db: Database, *, types: EventTypes | None, batch_size: int) -> None:
        self.types = types or EventTypes()
        self._db = db
        self._batch_size = batch_size
        # Plain strings, rendered once: the schema is the only variable, quoted by psycopg.
        self._sql = EventStatements(
            events=db.table("events").as_string(),
            keys=db.table("idempotency_keys").as_string(),
            owed=db.table("incident_owed").as_string(),
            begin_append=db.table("begin_append").as_string(),
            append_numbered=db.table("append_numbered").as_string(),
        )

    @property
    def database(self) -> Database:
        """The pool and schema this store shares with its projection store."""
        return self._db

    @property
    def statements(self) -> EventStatements:
        """This store's statements (the async store runs the same ones)."""
        return self._sql

    def envelopes_of(self, rows: Sequence[tuple[Any, ...]]) -> list[Recorded[Any]]:
        """Rows of ``EventStatements`` envelope columns back as envelopes."""
        return self._envelopes(rows)

    def _fetch(self, doing: str, query: Query, *params: Any) -> list[tuple[Any, ...]]:
        self._db.ready()
        with self._db.connection(doing) as conn:
            return durable_rows(conn, self._db.durability, query, params)

    def _envelopes(self, rows: Sequence[tuple[Any, ...]]) -> list[Recorded[Any]]:
        """Rows of ``EventStatements`` envelope columns back as envelopes."""
        return envelopes(self.types, rows, None, _in_utc)

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        after = check_after(after)
        if not readable_id(aggregate_id):
            return []  # no stream can have it
        rows = self._fetch(
            f"reading stream {aggregate_id!r}", self._sql.stream, aggregate_id, after
        )
        check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        return self._envelopes(rows)

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches, so a stream of any length
        folds in constant memory (``aggregate.fold(store.stream(id))``)."""
        after = check_after(after)
        if not readable_id(aggregate_id):
            return iter(())
        doing = f"reading stream {aggregate_id!r}"

        def read_rows(after: int, size: int) -> list[tuple[Any, ...]]:
            return self._fetch(doing, self._sql.stream_page, aggregate_id, after, size)

        return stream_pages(read_rows, self._envelopes, aggregate_id, after, self._batch_size)

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes, in version order and in pages:
        all a fold needs, without decoding ids, dates and metadata.

        Each page is one query that hands back the page's payloads joined in version
        order, decoded in one call by the registered types' union decoder
        (``EventTypes.decode_joined``), with what proves the page whole. Its versions
        must continue the stream without a hole and each payload's tag must agree with
        its row's type name; a page short of that, or holding a type not registered or
        a schema version other than the first, is read again with the type names and
        decoded row by row, upcasting where needed, and damage is a CorruptEvent."""
        after = check_after(after)
        if not readable_id(aggregate_id):
            return iter(())
        return ChainedBatches.of(self._event_pages(aggregate_id, after))

    def _event_pages(self, aggregate_id: str, after: int) -> Generator[list[Event], None, None]:
        doing = f"reading stream {aggregate_id!r}"

        def read_page(after: int, end: int) -> JoinedBatch:
            sql, opening = self._sql.joined, PAYLOAD_OPENING
            (row,) = self._fetch(doing, sql, opening, aggregate_id, end, aggregate_id, after, end)
            return JoinedBatch(*row)

        def read_payloads(after: int, limit: int) -> list[tuple[Any, ...]]:
            return self._fetch(doing, self._sql.payloads, aggregate_id, after, limit)

        return fold_batches(self.types, aggregate_id, after, EVENTS_PAGE, read_page, read_payloads)

    def version(self, aggregate_id: str) -> int:
        if not readable_id(aggregate_id):
            return 0
        rows = self._fetch(
            f"reading the version of {aggregate_id!r}", self._sql.version, aggregate_id
        )
        return int(rows[0][0])

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log after ``after``, fetched in batches (one short checkout each), so a slow
        consumer holds no connection and every batch starts where the last one ended."""
        after = check_after(after)
        check_limit(limit)

        def read_rows(after: int, size: int) -> list[tuple[Any, ...]]:
            return self._fetch("reading the log", self._sql.page, after, size)

        return log_pages(read_rows, self._envelopes, after, limit, self._batch_size)

    def last_position(self) -> int:
        position: int = self._fetch("reading the last position", self._sql.last_position)[0][0]
        return position

    def _outcome(self, conn: Connection, key: str) -> Outcome | None:
        """What the key came to (positions of one append are consecutive: appends commit
        one at a time), or None."""
        found = conn.execute(self._sql.key, [key]).fetchone()
        if found is None:
            return None
        first, last, rejected, detail = found
        if rejected is not None:
            return Outcome([], rejected, detail)
        rows = conn.execute(self._sql.span, [first, last]).fetchall()
        return Outcome(self._envelopes(rows))

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        if not readable_key(idempotency_key):
            return None  # no key can be it (a NUL): the server would refuse to look
        self._db.ready()
        with self._db.connection(f"looking up idempotency key {idempotency_key!r}") as conn:
            outcome = self._outcome(conn, idempotency_key)
            # what the key stored may be in flight: returned once it is durable
            self._db.durability.after(conn.execute(WAL_POSITIONS).fetchone(), conn)
            return outcome

    def owed(self, handler: str | None = None) -> list[Owed]:
        if handler is None:
            rows = self._fetch("reading owed work", self._sql.owed)
        else:
            rows = self._fetch(f"reading the work {handler} owes", self._sql.owed_by, handler)
        return [owed_from_row(row) for row in rows]
