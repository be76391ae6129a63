"""Waves: a batch of the log cut into units that may run side by side.

A subscription with ``concurrency`` above 1 handles a batch as one *wave*: the batch is
cut into *units*, each unit's events are handled in log order by one worker, and
different units run at the same time. Two events land in one unit when they belong to
the same stream (the same ``aggregate_id``) or when the handler's ``sequence_by`` gives
them the same key; the relation is closed transitively, so a unit is the smallest set
of events that shares a stream or a key with nothing outside it. A stream therefore
never spans two units: its events are handled in order, parking holds it as it would
in a sequential run, and the state a listener receives is never folded by two workers.

This module is pure: it decides who goes with whom, the subscription does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..errors import CorruptEvent
from ..messages import Recorded

__all__ = ["Item", "SequenceBy", "Unit", "done_prefix", "split"]

# One entry of a batch: an event, or the damage read in its place.
Item = Recorded[Any] | CorruptEvent
# What else a handler needs kept in order, besides each stream: events with equal keys
# are handled one after the other, in log order.
SequenceBy = Callable[[Recorded[Any]], Hashable]
# A unit: indexes into the batch, in log order.
Unit = list[int]


def split(
    batch: Sequence[Item],
    sequence_by: SequenceBy | None = None,
    handles: Callable[[Recorded[Any]], bool] = lambda recorded: True,
) -> list[Unit]:
    """The batch's units, each in log order, ordered by their first event.

    ``sequence_by`` is asked only about the events ``handles`` accepts (a key function
    may read fields that only the handler's own event types have); damage joins its
    stream's unit.

    >>> from incident.messages import Event, Recorded
    >>> def at(position, stream):
    ...     return Recorded(position=position, event_id=str(position), aggregate_id=stream,
    ...                     aggregate="a", version=1, event_type="E", event_date=None,
    ...                     data=None, metadata={})
    >>> batch = [at(1, "A"), at(2, "B"), at(3, "A"), at(4, "C")]
    >>> split(batch)
    [[0, 2], [1], [3]]
    >>> split(batch, sequence_by=lambda r: "same" if r.aggregate_id != "A" else "A")
    [[0, 2], [1, 3]]
    """
    parent: dict[Hashable, Hashable] = {}

    def root(node: Hashable) -> Hashable:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # halve the path: later finds are short
            node = parent[node]
        return node

    for item in batch:
        stream = root(("stream", item.aggregate_id))
        if sequence_by is not None and isinstance(item, Recorded) and handles(item):
            key = root(("key", sequence_by(item)))
            if key != stream:
                parent[key] = stream

    units: dict[Hashable, Unit] = {}
    for index, item in enumerate(batch):
        units.setdefault(root(("stream", item.aggregate_id)), []).append(index)
    return list(units.values())  # a dict keeps insertion order: by first event


def done_prefix(done: Sequence[bool]) -> int:
    """How many items, from the start of the batch, are all done: the checkpoint may
    move past those and no further, so nothing after a gap is ever skipped.

    >>> done_prefix([True, True, False, True])
    2
    """
    for index, finished in enumerate(done):
        if not finished:
            return index
    return len(done)
