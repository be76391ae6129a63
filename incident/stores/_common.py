"""Helpers every store backend shares: expected-version matching, stamping envelopes,
dead-letter and owed-work rows, the append verbs over ``commit``, and
closing and checking streamed reads. Backends differ only in how they persist."""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import msgspec

from .. import storable
from ..errors import Unstorable
from ..ids import new_uuid, utc_now
from ..mapper import gap_in_versions
from ..messages import Event, Projection, Recorded, event_type_name
from .arguments import check_owed
from .protocols import (
    AppendRequest,
    CommitCall,
    Committed,
    Effects,
    Owed,
    Parked,
    ProjectFn,
    ProjectionStore,
)
from .read_model_rows import check_projections

__all__ = [
    "AppendVerbs",
    "ChainedBatches",
    "closing_iterator",
    "effects_of",
    "event_json",
    "OWED_COLUMNS",
    "owed_from_row",
    "owed_row",
    "metadata_json",
    "PARKED_COLUMNS",
    "parked_from_row",
    "poll",
    "stamp",
]


metadata_json = storable.metadata_json

_event_decoders: dict[type[Event], msgspec.json.Decoder[Any]] = {}


def event_json(event: Event) -> tuple[str, Event]:
    """An event's JSON text and the event read back from it, refusing (Unstorable) what
    would not come back equal (a tuple in an ``Any`` field, a UTC offset with seconds)
    or does not decode as its own type."""
    text = storable.event_json(event)
    decoder = _event_decoders.get(type(event))
    if decoder is None:
        decoder = _event_decoders[type(event)] = msgspec.json.Decoder(type(event))
    try:
        back: Event = decoder.decode(text)
    except msgspec.ValidationError as error:
        raise Unstorable(f"event {type(event).__name__}", None, str(error)) from None
    if back != event:
        field = next(
            (f for f in event.__struct_fields__ if getattr(back, f) != getattr(event, f)), None
        )
        if field is None:  # equal field by field: a class of eq=False compares identities
            return text, back
        rule = (
            f"{storable.shown(getattr(event, field))} would come back as "
            f"{storable.shown(getattr(back, field))}"
        )
        raise Unstorable(f"event {type(event).__name__}", field, rule)
    return text, back


# the dead-letter table's columns, in Parked's field order, so a row decodes by position
PARKED_COLUMNS = ", ".join(Parked.__struct_fields__)


def parked_row(
    parked: Parked, date: Callable[[dt.datetime], Any] = lambda when: when
) -> tuple[Any, ...]:
    """A dead letter as the values of its ``PARKED_COLUMNS`` row, its date through
    ``date`` (as for ``owed_row``)."""
    return (*msgspec.structs.astuple(parked)[:-1], date(parked.parked_at))


def parked_from_row(row: Sequence[Any]) -> Parked:
    """A dead letter from its ``PARKED_COLUMNS`` row; msgspec turns the ISO text SQLite
    keeps into the datetime Postgres already returns."""
    return msgspec.convert(dict(zip(Parked.__struct_fields__, row, strict=True)), Parked)


# the owed-work table's columns, in Owed's field order
OWED_COLUMNS = ", ".join(Owed.__struct_fields__)


def owed_row(owed: Owed, date: Callable[[dt.datetime], Any] = lambda when: when) -> tuple[Any, ...]:
    """Owed work as the values of its ``OWED_COLUMNS`` row, its dates through ``date``
    (a store that keeps dates as text passes its formatter)."""
    return tuple(
        date(value) if isinstance(value, dt.datetime) else value
        for value in msgspec.structs.astuple(owed)
    )


def owed_from_row(row: Sequence[Any]) -> Owed:
    """Owed work from its ``OWED_COLUMNS`` row (dates as ISO text or datetimes)."""
    return msgspec.convert(dict(zip(Owed.__struct_fields__, row, strict=True)), Owed)


def effects_of(
    project: ProjectFn | None, recorded: list[Recorded[Any]], *, checked: bool = True
) -> Effects:
    """What ``project`` returns for an append, as Effects (a plain sequence is the
    projections alone)."""
    if project is None:
        return Effects()
    effects = project(recorded)
    effects = effects if isinstance(effects, Effects) else Effects(list(effects))
    # refused here, inside the append, so that nothing is written: a projection store in
    # another database would refuse them only once the events have committed (one in
    # the same database encodes them in the append's transaction, checking as it goes:
    # ``checked=False``, not twice)
    if checked:
        check_projections(effects.projections)
    for work in effects.owed:
        check_owed(work)
    return effects


def stamp(
    aggregate_id: str,
    aggregate: str | None,
    events: list[Event],
    *,
    first_position: int,
    first_version: int,
    metadata: Mapping[str, Any] | None,
    event_date: dt.datetime | None = None,
) -> list[Recorded[Any]]:
    """Wrap events in envelopes numbered from the given position and version. Each
    envelope gets its own copy of the metadata (stores check it encodes beforehand)."""
    when = event_date or utc_now()
    name = aggregate or ""
    return [
        Recorded(
            position=first_position + offset,
            event_id=new_uuid(),
            aggregate_id=aggregate_id,
            aggregate=name,
            version=first_version + offset,
            event_type=event_type_name(type(event)),
            event_date=when,
            data=event,
            metadata=dict(metadata) if metadata else {},
        )
        for offset, event in enumerate(events)
    ]


class AppendVerbs:
    """``append`` and ``append_and_project`` for a store that implements the one append
    verb, ``commit``: each builds an :class:`AppendRequest` and asks for it."""

    def commit(
        self,
        request: AppendRequest,
        *,
        projection_store: ProjectionStore | None = None,
        project: ProjectFn | None = None,
    ) -> Committed:
        raise NotImplementedError

    #: whether ``commit_many`` writes its commits in one transaction (SQLite's group
    #: commit); the async stores hand such a store their concurrent commits together
    shares_commits = False

    def commit_many(self, calls: Sequence[CommitCall]) -> list[Committed | Exception]:
        """Each call's commit, in order: its Committed, or the error that kept it out of
        the log (each is all-or-nothing by itself, as ``commit`` is). Here one commit
        after another; a store that can share one transaction among them does."""
        outcomes: list[Committed | Exception] = []
        for call in calls:
            try:
                outcomes.append(
                    self.commit(
                        call.request, projection_store=call.projection_store, project=call.project
                    )
                )
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def append(
        self,
        aggregate_id: str,
        events: Iterable[Event],
        *,
        expected_version: object,
        aggregate: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Recorded[Any]]:
        request = AppendRequest(
            aggregate_id=aggregate_id,
            events=list(events),
            expected_version=expected_version,
            aggregate=aggregate,
            metadata=metadata,
        )
        return self.commit(request).recorded

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
        request = AppendRequest(
            aggregate_id=aggregate_id,
            events=list(events),
            expected_version=expected_version,
            aggregate=aggregate,
            metadata=metadata,
            idempotency_key=idempotency_key,
        )
        return self.commit(request, projection_store=projection_store, project=project).recorded


def project_elsewhere(
    committed: Committed, projection_store: ProjectionStore | None, together: bool
) -> None:
    """Projections in another database than the events follow the committed events
    (``together``: they were written in the append's own transaction)."""
    if projection_store is not None and not together:
        for projection in committed.effects.projections:
            projection_store.project(projection)


def write_elsewhere(projection_store: ProjectionStore, projections: Sequence[Projection]) -> None:
    """A checkpoint's rows for a projection store in another database, one ``project``
    each, once every one has been checked as every store checks them: a row refused
    leaves none of the batch written there."""
    check_projections(projections)
    for projection in projections:
        projection_store.project(projection)


def poll(attempt: Callable[[], bool], timeout: float | None, *, first: float, cap: float) -> bool:
    """Call ``attempt`` until it returns True, sleeping ``first`` seconds and doubling up to
    ``cap`` in between; False once ``timeout`` seconds have passed (None: wait for ever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = first
    while not attempt():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        left = pause if deadline is None else min(pause, deadline - time.monotonic())
        time.sleep(max(left, 0.0))
        pause = min(pause * 2, cap)
    return True


T = TypeVar("T")


class ChainedBatches(itertools.chain):  # type: ignore[type-arg]
    """The items of batches read by a generator, stepped through at C speed (a chain),
    with a ``close()`` that closes the generator at once: a reader that stops early, or
    a fold that raises, releases its cursor (and SQLite read lock) there and then, not
    whenever the generator is collected, perhaps after the database was closed.
    Made with :meth:`of`."""

    batches: Generator[Any, None, None]

    @classmethod
    def of(cls, batches: Generator[Any, None, None]) -> ChainedBatches:
        # from_iterable, called on a subclass, makes an instance of it
        chained = cast(ChainedBatches, cls.from_iterable(batches))
        chained.batches = batches
        return chained

    def close(self) -> None:
        self.batches.close()


@contextmanager
def closing_iterator(items: Iterator[T]) -> Iterator[Iterator[T]]:
    """Use a store's streamed read and close it when done, even when the consumer stops
    early or raises, so no cursor (or SQLite read lock) is left open."""
    try:
        yield items
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def check_versions(
    aggregate_id: str, after: int, versions: Sequence[int], positions: Sequence[int] = ()
) -> None:
    """CorruptEvent unless a stream read after ``after`` runs ``after + 1, after + 2, ...``
    without a hole (a deleted row): :func:`incident.mapper.gap_in_versions`, raised."""
    hole = gap_in_versions(aggregate_id, after, versions, positions)
    if hole is not None:
        raise hole
