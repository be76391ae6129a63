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
from collections.abc import Generator, Iterator
from typing import Any

import msgspec

from ...codec import EventTypes
from ...errors import CorruptEvent
from ...messages import Event, Recorded
from ...storable import keepable_id
from .._common import ChainedBatches, check_positions, check_versions
from .database import Database
from .sql import JOINED, LAST_POSITION, LOG_AFTER, PAYLOADS, STREAM, STREAM_VERSION, TAG_AT

__all__ = ["BATCH", "EVENTS_BATCH", "EventReads"]

BATCH = 1000  # rows per query when streaming; bounds memory whatever the log's size
EVENTS_BATCH = 4096  # rows fetched and decoded at a time when folding a stream

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class EventReads:
    """The reads of an SQLite event store, for the store to inherit: it sets ``types``
    (how payloads decode) and ``_db`` (the file). ``_rows`` and ``_decode`` serve its
    writing half too (owed follow-ups, a keyed command's outcome)."""

    types: EventTypes
    _db: Database

    def _decode(self, rows: list[tuple[Any, ...]], aggregate_id: str | None) -> list[Recorded[Any]]:
        """Rows (``ENVELOPE`` columns, without aggregate_id when reading one stream) back
        as envelopes. This is the hot loop of every load, hence the local caches: events of
        one append share their date and metadata text, and a stream few event types."""
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}
        metadata_cache: dict[str, dict[str, Any]] = {}
        last_date, event_date = "", _EPOCH
        recorded = []
        for row in rows:
            position, version, event_type, data, event_id, date, meta, aggregate, schema = row[:9]
            stream = aggregate_id if aggregate_id is not None else row[9]
            try:
                event = self._payload(decoders, event_type, data, schema, position, stream)
                if date != last_date:
                    last_date, event_date = date, dt.datetime.fromisoformat(date)
                metadata = metadata_cache.get(meta)
                if metadata is None:
                    metadata = metadata_cache[meta] = _metadata_decoder.decode(meta)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                raise CorruptEvent(
                    position, stream, str(error), version=version, event_type=event_type
                ) from error
            except (ValueError, TypeError) as error:
                raise CorruptEvent(
                    position,
                    stream,
                    f"bad envelope: {error}",
                    version=version,
                    event_type=event_type,
                ) from error
            recorded.append(
                Recorded(
                    position=position,
                    event_id=event_id,
                    aggregate_id=stream,
                    aggregate=aggregate,
                    version=version,
                    event_type=event_type,
                    event_date=event_date,
                    data=event,
                    metadata=metadata.copy(),  # each envelope owns its dict, as on append
                )
            )
        return recorded

    def _payload(
        self,
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]],
        event_type: str,
        data: str,
        schema: int,
        position: int,
        aggregate_id: str,
    ) -> Event:
        """One stored payload as an event: straight through the reused decoder, or, when
        older code stored it, through the aggregate's upcasters."""
        known = decoders.get(event_type)
        if known is None:
            known = decoders[event_type] = self._decoder(event_type, position, aggregate_id)
        decoder, current = known
        if schema == current:
            event: Event = decoder.decode(data)
            return event
        return self.types.decode(
            event_type, data, position=position, aggregate_id=aggregate_id, schema_version=schema
        )

    def _decoder(
        self, event_type: str, position: int, aggregate_id: str
    ) -> tuple[msgspec.json.Decoder[Any], int]:
        """The reusable decoder for a stored type and the schema version it reads directly."""
        decoder = self.types.decoder(event_type, position=position, aggregate_id=aggregate_id)
        resolved = self.types.resolve(event_type)
        return decoder, resolved.schema_version if resolved is not None else 1

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
        if not keepable_id(aggregate_id):
            return []
        rows = self._rows(STREAM, (aggregate_id, after))
        check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        return self._decode(rows, aggregate_id)

    def events(self, aggregate_id: str, *, after: int = 0) -> Iterator[Event]:
        """The stream's events without their envelopes, in version order and in batches:
        all a fold needs (``aggregate.fold(store.events(id))``), at close to the cost of
        raw SQL and in constant memory (full envelopes cost two to three times as much).
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
        if not keepable_id(aggregate_id):
            return iter(())
        # chained lists: the caller's loop steps through each batch at C speed
        return ChainedBatches.of(self._event_batches(aggregate_id, after))

    def _event_batches(self, aggregate_id: str, after: int) -> Generator[list[Event], None, None]:
        db = self._db
        if not db.schema_ready:
            db.migrate()
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}
        with db.guard:
            try:
                conn = db.conn()
                while True:
                    window = (TAG_AT, aggregate_id, after, after + EVENTS_BATCH)
                    joined, count, last, tagged, more = conn.execute(JOINED, window).fetchone()
                    events = None
                    if count and last == after + count and tagged == count:
                        events = self.types.decode_joined(joined, count)
                    elif not count and not more:
                        return  # the stream's end
                    if events is None:
                        again = conn.execute(PAYLOADS, (aggregate_id, after, EVENTS_BATCH))
                        events, damage = self._checked(
                            again.fetchall(), aggregate_id, after, decoders
                        )
                        # a fold that stops short of the damage (a subscription's, up to
                        # one event) gets the events before it first
                        yield events
                        if damage is not None:
                            raise damage
                    else:
                        yield events
                    if not more or not events:  # the end (or rows deleted as we read)
                        return
                    after += len(events)
            except sqlite3.Error as error:
                raise db.store_error(error) from error

    def _checked(
        self,
        rows: list[tuple[Any, ...]],
        aggregate_id: str,
        after: int,
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]],
    ) -> tuple[list[Event], CorruptEvent | None]:
        """``PAYLOADS`` rows decoded one by one up to the first hole in their versions or
        the first that cannot be read, and the CorruptEvent for it."""
        try:
            check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        except CorruptEvent as hole:
            assert hole.version is not None
            events, bad = self._one_by_one(rows[: hole.version - after - 1], aggregate_id, decoders)
            return events, bad or hole
        return self._one_by_one(rows, aggregate_id, decoders)

    def _one_by_one(
        self,
        rows: list[tuple[Any, ...]],
        aggregate_id: str,
        decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]],
    ) -> tuple[list[Event], CorruptEvent | None]:
        """The rows' events up to the first that cannot be read, and why it cannot."""
        batch = []
        for position, version, event_type, data, schema in rows:
            try:
                batch.append(
                    self._payload(decoders, event_type, data, schema, position, aggregate_id)
                )
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                damage = CorruptEvent(
                    position, aggregate_id, str(error), version=version, event_type=event_type
                )
                damage.__cause__ = error
                return batch, damage
            except CorruptEvent as damage:
                return batch, damage
        return batch, None

    def stream(self, aggregate_id: str, *, after: int = 0) -> Iterator[Recorded[Any]]:
        """The stream in version order, fetched in batches: fold a stream of any length
        (``aggregate.fold(store.stream(id))``) without holding it in memory."""
        if not keepable_id(aggregate_id):
            return
        while True:
            rows = self._rows(f"{STREAM} LIMIT {BATCH}", (aggregate_id, after))
            check_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
            yield from self._decode(rows, aggregate_id)
            if len(rows) < BATCH:
                return
            after = rows[-1][1]

    def read_all(self, after: int = 0, limit: int | None = None) -> Iterator[Recorded[Any]]:
        """The log in position order, fetched in batches as it is consumed."""
        remaining = limit
        while remaining is None or remaining > 0:
            size = BATCH if remaining is None else min(BATCH, remaining)
            rows = self._rows(LOG_AFTER, (after, size))
            check_positions(after, [r[0] for r in rows])
            yield from self._decode(rows, None)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def version(self, aggregate_id: str) -> int:
        if not keepable_id(aggregate_id):
            return 0
        version: int = self._rows(STREAM_VERSION, (aggregate_id,))[0][0]
        return version

    def last_position(self) -> int:
        position: int = self._rows(LAST_POSITION, ())[0][0]
        return position
