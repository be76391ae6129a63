"""Reading an SQLite event log: streams and the log as envelopes, and the fold's batches.

The reading half of ``SQLiteEventStore``, which inherits it (its appends are in
:mod:`incident.stores.sqlite.events`). Everything here reads in one snapshot per query
and checks what it reads: versions gapless within a stream, positions within the
log, and each payload decodable as its type; what is wrong is a CorruptEvent naming its
position.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
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
from .._common import ChainedBatches, check_versions
from ..arguments import check_after, check_limit, readable_id
from .database import Database
from .sql import JOINED, LAST_POSITION, LOG_AFTER, PAYLOADS, STREAM, STREAM_VERSION, TAG_AT

__all__ = ["BATCH", "EVENTS_BATCH", "EventReads"]

BATCH = 1000  # rows per query when streaming; bounds memory whatever the log's size
EVENTS_BATCH = 4096  # rows fetched and decoded at a time when folding a stream


class EventReads:
    """The reads of an SQLite event store, for the store to inherit: it sets ``types``
    (how payloads decode) and ``_db`` (the file). ``_rows`` and ``_decode`` serve its
    writing half too (owed follow-ups, a keyed command's outcome)."""

    types: EventTypes
    _db: Database

    def _decode(
        self, rows: Sequence[tuple[Any, ...]], aggregate_id: str | None
    ) -> list[Recorded[Any]]:
        """Rows (``ENVELOPE`` columns, without aggregate_id when reading one stream) back
        as envelopes: :func:`incident.mapper.envelopes`, with the dates stored as text."""
        return envelopes(self.types, rows, aggregate_id, dt.datetime.fromisoformat)

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        try:
            with db.guard:
                rows: list[tuple[Any, ...]] = db.conn().execute(sql, params).fetchall()
        except sqlite3.Error as error:
            raise db.store_error(error) from error
        return rows

    def get(self, aggregate_id: str, *, after: int = 0) -> list[Recorded[Any]]:
        """The stream in version order, read in one snapshot."""
        after = check_after(after)
        if not readable_id(aggregate_id):
            return []
        rows = self._rows(STREAM, (aggregate_id, after))
        check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        return self._decode(rows, aggregate_id)

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes, in version order and in batches:
        all a fold needs (``aggregate.fold(store.events(id))``), without decoding ids,
        dates and metadata, and in constant memory.
        Versions are gapless, so each batch must end at its start + its number of events,
        and each payload's tag must agree with its row's type name; a hole or a mismatch
        is a CorruptEvent.

        One query per ``EVENTS_BATCH`` versions hands back the batch's payloads joined in
        SQL, decoded in one call by the registered types' union decoder
        (``EventTypes.decode_joined``). A batch it stands aside for (a type not
        registered, a damaged payload, a schema version other than the first) is read
        again with the type names and decoded row by row, upcasting where needed and
        naming the position of whatever is wrong.
        """
        after = check_after(after)
        if not readable_id(aggregate_id):
            return iter(())
        # chained lists: the caller's loop steps through each batch at C speed
        return ChainedBatches.of(self._event_batches(aggregate_id, after))

    def _event_batches(self, aggregate_id: str, after: int) -> Generator[list[Event], None, None]:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        # the guard is taken for each query, not across the yields: a reader that stops
        # early must not keep every other thread off an in-memory database's connection

        def read_batch(after: int, end: int) -> JoinedBatch:
            with db.guard:
                found = db.conn().execute(JOINED, (TAG_AT, aggregate_id, after, end)).fetchone()
            return JoinedBatch(*found)

        def read_payloads(after: int, limit: int) -> list[tuple[Any, ...]]:
            with db.guard:
                rows: list[tuple[Any, ...]] = (
                    db.conn().execute(PAYLOADS, (aggregate_id, after, limit)).fetchall()
                )
            return rows

        try:
            yield from fold_batches(
                self.types, aggregate_id, after, EVENTS_BATCH, read_batch, read_payloads
            )
        except sqlite3.Error as error:
            raise db.store_error(error) from error

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches: fold a stream of any length
        (``aggregate.fold(store.stream(id))``) without holding it in memory."""
        after = check_after(after)
        if not readable_id(aggregate_id):
            return iter(())

        def read_rows(after: int, size: int) -> list[tuple[Any, ...]]:
            return self._rows(f"{STREAM} LIMIT ?", (aggregate_id, after, size))

        return stream_pages(
            read_rows, lambda rows: self._decode(rows, aggregate_id), aggregate_id, after, BATCH
        )

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log in position order, fetched in batches as it is consumed."""
        after = check_after(after)
        check_limit(limit)

        def read_rows(after: int, size: int) -> list[tuple[Any, ...]]:
            return self._rows(LOG_AFTER, (after, size))

        return log_pages(read_rows, lambda rows: self._decode(rows, None), after, limit, BATCH)

    def version(self, aggregate_id: str) -> int:
        if not readable_id(aggregate_id):
            return 0
        version: int = self._rows(STREAM_VERSION, (aggregate_id,))[0][0]
        return version

    def last_position(self) -> int:
        position: int = self._rows(LAST_POSITION, ())[0][0]
        return position

    def wait_for_append(self, after: int, timeout: float) -> bool:
        """Wait for an append of this process to the file (the database's signal); one of
        another process is seen when ``timeout`` runs out and the log is read again."""
        return self._db.appends.wait(timeout, lambda: self.last_position() > after)
