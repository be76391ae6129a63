"""Reading a Postgres event log: streams (whole, in batches, or as the pages a fold
decodes in one call), the whole log in batches, versions, and what idempotency keys and
owed work recorded. The event store (:mod:`.events`) is this and its writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator, Iterator
from typing import Any

import msgspec

from ...codec import EventTypes
from ...errors import CorruptEvent, IncidentError
from ...messages import Event, Recorded
from ...storable import keepable_id
from .._common import ChainedBatches, check_positions, check_versions, owed_from_row
from ..protocols import Outcome, Owed
from .database import Database
from .session import Connection, Query
from .sql import PAYLOAD_OPENING, EventStatements

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
        )

    def _fetch(self, doing: str, query: Query, *params: Any) -> list[tuple[Any, ...]]:
        self._db.ready()
        with self._db.connection(doing) as conn:
            return conn.execute(query, params).fetchall()

    def _recorded(self, row: tuple[Any, ...]) -> Recorded[Any]:
        (position, event_id, aggregate_id, aggregate, version, event_type, schema_version,
         event_date, data, metadata) = row  # fmt: skip
        event = self.types.decode(
            event_type,
            data,
            position=position,
            aggregate_id=aggregate_id,
            schema_version=schema_version,
        )
        try:
            meta = msgspec.json.decode(metadata, type=dict[str, Any])
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise CorruptEvent(position, aggregate_id, f"metadata: {error}") from error
        return Recorded(
            position=position,
            event_id=event_id,
            aggregate_id=aggregate_id,
            aggregate=aggregate,
            version=version,
            event_type=event_type,
            event_date=event_date.astimezone(dt.UTC),
            data=event,
            metadata=meta,
        )

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        if not keepable_id(aggregate_id):
            return []  # no stream can have it
        rows = self._fetch(
            f"reading stream {aggregate_id!r}", self._sql.stream, aggregate_id, after
        )
        check_versions(aggregate_id, after, [r[4] for r in rows], [r[0] for r in rows])
        return [self._recorded(row) for row in rows]

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches, so a stream of any length
        folds in constant memory (``aggregate.fold(store.stream(id))``)."""
        if not keepable_id(aggregate_id):
            return
        while True:
            rows = self._fetch(
                f"reading stream {aggregate_id!r}",
                self._sql.stream_page,
                aggregate_id,
                after,
                self._batch_size,
            )
            check_versions(aggregate_id, after, [r[4] for r in rows], [r[0] for r in rows])
            for row in rows:
                yield self._recorded(row)
            if len(rows) < self._batch_size:
                return
            after = rows[-1][4]

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
        if not keepable_id(aggregate_id):
            return iter(())
        return ChainedBatches.of(self._event_pages(aggregate_id, after))

    def _event_pages(self, aggregate_id: str, after: int) -> Generator[list[Event], None, None]:
        doing = f"reading stream {aggregate_id!r}"
        while True:
            end = after + EVENTS_PAGE
            ((joined, count, last, tagged, more),) = self._fetch(
                doing,
                self._sql.joined,
                PAYLOAD_OPENING,
                aggregate_id,
                end,
                aggregate_id,
                after,
                end,
            )
            events = None
            damage: CorruptEvent | None = None
            if count and last == after + count and tagged == count:
                events = self.types.decode_joined(joined, count)
            elif not count and not more:
                return  # the stream's end
            if events is None:
                events, damage = self._row_by_row(doing, aggregate_id, after)
            # a fold that stops short of the damage (a subscription's, up to one event)
            # gets the events before it first
            yield events
            if damage is not None:
                raise damage
            if not more or not events:  # the end (or rows deleted as we read)
                return
            after += len(events)

    def _row_by_row(
        self, doing: str, aggregate_id: str, after: int
    ) -> tuple[list[Event], CorruptEvent | None]:
        """A page read again with its type names and decoded one row at a time (upcasting
        where needed): the events up to the first hole or unreadable row, and why."""
        rows = self._fetch(doing, self._sql.payloads, aggregate_id, after, EVENTS_PAGE)
        damage: CorruptEvent | None = None
        try:
            check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        except CorruptEvent as hole:
            assert hole.version is not None
            rows, damage = rows[: hole.version - after - 1], hole
        events = []
        for position, version, event_type, schema_version, data in rows:
            try:
                events.append(
                    self.types.decode(
                        event_type,
                        data,
                        position=position,
                        aggregate_id=aggregate_id,
                        schema_version=schema_version,
                    )
                )
            except CorruptEvent as bad:
                bad.version = version
                return events, bad  # before any hole: the rows stop there
        return events, damage

    def version(self, aggregate_id: str) -> int:
        if not keepable_id(aggregate_id):
            return 0
        rows = self._fetch(
            f"reading the version of {aggregate_id!r}", self._sql.version, aggregate_id
        )
        return int(rows[0][0])

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log after ``after``, fetched in batches (one short checkout each), so a slow
        consumer holds no connection and every batch starts where the last one ended."""
        if limit is not None and limit < 0:
            raise IncidentError(f"limit must be None or >= 0, got {limit}")
        return self._pages(after, limit)

    def _pages(self, after: int, limit: int | None) -> Iterator[Recorded[Any]]:
        remaining = limit
        while remaining is None or remaining > 0:
            size = self._batch_size if remaining is None else min(self._batch_size, remaining)
            rows = self._fetch("reading the log", self._sql.page, after, size)
            check_positions(after, [r[0] for r in rows])
            for row in rows:
                yield self._recorded(row)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

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
        return Outcome([self._recorded(row) for row in rows])

    def outcome_for(self, idempotency_key: str) -> Outcome | None:
        self._db.ready()
        with self._db.connection(f"looking up idempotency key {idempotency_key!r}") as conn:
            return self._outcome(conn, idempotency_key)

    def owed(self, handler: str | None = None) -> list[Owed]:
        if handler is None:
            rows = self._fetch("reading owed work", self._sql.owed)
        else:
            rows = self._fetch(f"reading the work {handler} owes", self._sql.owed_by, handler)
        return [owed_from_row(row) for row in rows]
