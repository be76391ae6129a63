"""Stored rows back to events and envelopes: the one place that decodes what a store
reads, upcasts old payloads, checks what it folds and names damaged rows.

Driver-free: a store runs its own SQL and hands the rows over in the column orders
below, so every backend (and a sync or async driver of one) reads alike.

- an envelope row: ``ENVELOPE_COLUMNS``, plus ``aggregate_id`` last when the rows come
  from the whole log rather than from one stream;
- a payload row: ``PAYLOAD_COLUMNS``, what a fold needs of an event it reads row by row;
- a fold batch: a :class:`JoinedBatch`, one row that proves a batch of versions whole.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, NamedTuple

import msgspec

from .codec import EventTypes
from .errors import CorruptEvent
from .messages import Event, Recorded

__all__ = [
    "ENVELOPE_COLUMNS",
    "PAYLOAD_COLUMNS",
    "JoinedBatch",
    "PayloadDecoder",
    "envelopes",
    "fold_batches",
    "gap_in_positions",
    "gap_in_versions",
    "log_pages",
    "stream_pages",
]

ENVELOPE_COLUMNS = (
    "position, version, event_type, data, event_id, event_date, metadata, aggregate, schema_version"
)
PAYLOAD_COLUMNS = "position, version, event_type, schema_version, data"

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])
_INT64_MAX = 2**63 - 1
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def gap_in_versions(
    aggregate_id: str, after: int, versions: Sequence[int], positions: Sequence[int] = ()
) -> CorruptEvent | None:
    """The CorruptEvent for the first hole in a stream read after ``after`` (versions
    ordered and UNIQUE per stream, so the first one and the span prove it whole in O(1)),
    or None."""
    if not versions or (
        versions[0] == after + 1 and versions[-1] - versions[0] + 1 == len(versions)
    ):
        return None
    # the span is off, so some version is not the one before it plus one
    index, version = next((i, v) for i, v in enumerate(versions) if v != after + 1 + i)
    expected = after + 1 + index
    return CorruptEvent(
        positions[index] if positions else None,
        aggregate_id,
        f"version {expected} is missing: the stream goes from version {expected - 1} to {version}",
        version=expected,
    )


def gap_in_positions(after: int, positions: Sequence[int]) -> CorruptEvent | None:
    """The CorruptEvent for the first hole in positions of the log read after ``after``
    (appends assign them gaplessly under the log's lock, so a hole is a lost row), or
    None."""
    expected = max(after, 0) + 1
    if not positions or (
        positions[0] == expected and positions[-1] - positions[0] + 1 == len(positions)
    ):
        return None
    # the span is off, so some position is not the one before it plus one
    index, position = next((i, p) for i, p in enumerate(positions) if p != expected + i)
    expected += index
    return CorruptEvent(
        expected,
        "",
        f"position {expected} is missing from the log: it goes from {expected - 1} to {position}",
    )


#: rows in ``ENVELOPE_COLUMNS`` (with aggregate_id last) -> their envelopes
Decode = Callable[[Sequence[tuple[Any, ...]]], list[Recorded[Any]]]


def log_pages(
    read_rows: Callable[[int, int], Sequence[tuple[Any, ...]]],
    decode: Decode,
    after: int,
    limit: int | None,
    size: int,
) -> Iterator[Recorded[Any]]:
    """The log after position ``after``, at most ``limit`` events, a page of at most
    ``size`` rows at a time (``read_rows(after, size)``, in position order), each page's
    positions checked for a hole before its envelopes are handed out."""
    remaining = limit
    while remaining is None or remaining > 0:
        page = size if remaining is None else min(size, remaining)
        rows = read_rows(after, page)
        hole = gap_in_positions(after, [row[0] for row in rows])
        if hole is not None:
            raise hole
        yield from decode(rows)
        if len(rows) < page:
            return
        after = rows[-1][0]
        if remaining is not None:
            remaining -= len(rows)


def stream_pages(
    read_rows: Callable[[int, int], Sequence[tuple[Any, ...]]],
    decode: Decode,
    aggregate_id: str,
    after: int,
    size: int,
) -> Iterator[Recorded[Any]]:
    """One stream after version ``after``, a page of at most ``size`` rows at a time
    (``read_rows(after, size)``, in version order), each page's versions checked for a
    hole before its envelopes are handed out."""
    while True:
        rows = read_rows(after, size)
        hole = gap_in_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        if hole is not None:
            raise hole
        yield from decode(rows)
        if len(rows) < size:
            return
        after = rows[-1][1]


class PayloadDecoder:
    """Stored payloads to events for one read: a reused decoder per stored type, and the
    upcasters for a payload stored at an older schema version than its type's."""

    def __init__(self, types: EventTypes) -> None:
        self.types = types
        self._decoders: dict[str, tuple[msgspec.json.Decoder[Any], int]] = {}

    def decode(
        self, event_type: str, data: str, schema_version: int, position: int, aggregate_id: str
    ) -> Event:
        """One payload as its event; UnknownEventType, or a decode error, when it is not."""
        known = self._decoders.get(event_type)
        if known is None:
            decoder = self.types.decoder(event_type, position=position, aggregate_id=aggregate_id)
            resolved = self.types.resolve(event_type)
            current = resolved.schema_version if resolved is not None else 1
            known = self._decoders[event_type] = (decoder, current)
        decoder, current = known
        if schema_version == current:
            event: Event = decoder.decode(data)
            return event
        return self.types.decode(
            event_type,
            data,
            position=position,
            aggregate_id=aggregate_id,
            schema_version=schema_version,
        )

    def up_to_damage(
        self, rows: Sequence[tuple[Any, ...]], aggregate_id: str, after: int
    ) -> tuple[list[Event], CorruptEvent | None]:
        """``PAYLOAD_COLUMNS`` rows of one stream after version ``after``, decoded one by
        one up to the first hole in their versions or the first that cannot be read, and
        the CorruptEvent for it (None when all read)."""
        hole = gap_in_versions(aggregate_id, after, [r[1] for r in rows], [r[0] for r in rows])
        if hole is not None:
            assert hole.version is not None
            rows = rows[: hole.version - after - 1]
        events = []
        for position, version, event_type, schema_version, data in rows:
            try:
                events.append(self.decode(event_type, data, schema_version, position, aggregate_id))
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                damage = CorruptEvent(
                    position, aggregate_id, str(error), version=version, event_type=event_type
                )
                damage.__cause__ = error
                return events, damage
            except CorruptEvent as damage:
                damage.version = version
                return events, damage
        return events, hole


class JoinedBatch(NamedTuple):
    """One batch of a stream's versions, read as one row: the payloads joined by commas
    in version order, how many rows there are, the last version, how many are at the
    first schema version with a tag that agrees with their stored type, and whether the
    stream goes on past the batch."""

    joined: str | None
    rows: int
    last: int | None
    tagged: int | None
    more: bool


def fold_batches(
    types: EventTypes,
    aggregate_id: str,
    after: int,
    size: int,
    read_batch: Callable[[int, int], JoinedBatch],
    read_payloads: Callable[[int, int], Sequence[tuple[Any, ...]]],
) -> Generator[list[Event], None, None]:
    """A stream's events after ``after``, a batch of ``size`` versions at a time, each
    checked before it is handed out: ``read_batch(after, end)`` reads versions
    ``after < v <= end`` as a JoinedBatch; a batch that is not provably whole (a hole, a
    tag that disagrees with its type, a payload to upcast or not registered) is read
    again with ``read_payloads(after, limit)`` (``PAYLOAD_COLUMNS`` rows in version
    order) and decoded row by row. A hole or an unreadable row raises CorruptEvent once
    the events before it are out: a fold that stops short of the damage (a
    subscription's, up to one event) still gets them."""
    payloads = PayloadDecoder(types)
    while True:
        # a batch ends at the largest version a column holds: no driver overflows
        joined, count, last, tagged, more = read_batch(after, min(after + size, _INT64_MAX))
        events = None
        if count and last == after + count and tagged == count:
            events = types.decode_joined(joined or "", count)
        elif not count and not more:
            return  # the stream's end
        damage = None
        if events is None:
            events, damage = payloads.up_to_damage(read_payloads(after, size), aggregate_id, after)
        yield events
        if damage is not None:
            raise damage
        if not more or not events:  # the end (or rows deleted as they were read)
            return
        after += len(events)


def envelopes(
    types: EventTypes,
    rows: Sequence[tuple[Any, ...]],
    aggregate_id: str | None,
    to_datetime: Callable[[Any], dt.datetime],
) -> list[Recorded[Any]]:
    """``ENVELOPE_COLUMNS`` rows back as envelopes (with ``aggregate_id`` as a tenth
    column when ``aggregate_id`` is None: rows of the whole log). ``to_datetime`` turns
    the stored event date into an aware datetime in UTC. This is the hot loop of every
    read of envelopes, hence the local caches: events of one append share their date
    and metadata text, and a stream has few event types. A row that cannot be read is a
    CorruptEvent naming it."""
    payloads = PayloadDecoder(types)
    metadata_cache: dict[str, dict[str, Any]] = {}
    last_date: Any = None
    event_date = _EPOCH
    recorded = []
    for row in rows:
        position, version, event_type, data, event_id, date, meta, aggregate, schema = row[:9]
        stream = aggregate_id if aggregate_id is not None else row[9]
        try:
            event = payloads.decode(event_type, data, schema, position, stream)
            if date != last_date:
                last_date, event_date = date, to_datetime(date)
            metadata = metadata_cache.get(meta)
            if metadata is None:
                metadata = metadata_cache[meta] = _metadata_decoder.decode(meta)
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            raise CorruptEvent(
                position, stream, str(error), version=version, event_type=event_type
            ) from error
        except (ValueError, TypeError) as error:
            raise CorruptEvent(
                position, stream, f"bad envelope: {error}", version=version, event_type=event_type
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
