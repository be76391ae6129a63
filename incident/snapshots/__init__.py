"""Snapshots: an aggregate's state every N events, so a cold start reads the latest
snapshot and only the events after it.

A snapshot is a Projection row (key ``"<aggregate>/<id>"``: :func:`snapshot_key`), so
every projection store keeps them, version-guarded, and on the event store's own
database it commits in the same transaction as the event that triggered it.

A snapshot is only trusted when its ``code`` equals :func:`code_key` of the running
code, a hash of everything that decides what the state is (:mod:`incident.snapshots.code`),
so a changed program ignores the snapshots of the old one.

The state is encoded as JSON and decoded as the aggregate's ``state_type``, so it comes
back with its own types (int keys, ``Decimal``, tuples, sets, nested Structs, dates).
:func:`check_snapshottable` (:mod:`incident.snapshots.checks`) refuses, when the command
handler is built, a state type that would not come back as it went in; the encoding and
the comparison are in :mod:`incident.snapshots.state`.
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Iterable
from typing import Any

import msgspec

from ..aggregate import Aggregate
from ..errors import SnapshotMismatch
from ..messages import Projection
from .checks import check_snapshottable
from .code import code_key
from .state import first_difference, round_trip, state_decoder

__all__ = [
    "Snapshot",
    "check_snapshottable",
    "code_key",
    "first_difference",
    "load_snapshot",
    "snapshot_key",
    "take_snapshot",
    "verify_snapshot",
]

log = logging.getLogger("incident")


class Snapshot(Projection):
    aggregate_id: str  # "<aggregate name>/<aggregate id>"
    aggregate: str
    version: int
    code: str
    state: str  # the state as JSON


def snapshot_key(aggregate: Aggregate[Any], aggregate_id: str) -> str:
    """``"<aggregate name>/<aggregate id>"``, with ``%`` and ``/`` escaped in the name,
    so that the first ``/`` ends it: aggregate ``a/b`` with stream ``c`` and aggregate
    ``a`` with stream ``b/c`` do not share a key (plain names keep theirs).

    >>> snapshot_key(Aggregate("a/b", initial=0), "c")
    'a%2Fb/c'
    """
    name = aggregate.name.replace("%", "%25").replace("/", "%2F")
    return f"{name}/{aggregate_id}"


def take_snapshot(
    aggregate: Aggregate[Any], aggregate_id: str, state: Any, version: int, code: str
) -> Snapshot | None:
    """A snapshot of ``state``, or None when it would not read back as it is (a value
    that does not fit ``state_type``): a snapshot is an optimisation, it must never make
    a command fail, nor hand back another state."""
    try:
        encoded, decoded = round_trip(state, aggregate.state_type)
    except (TypeError, ValueError, msgspec.EncodeError, msgspec.DecodeError) as error:
        log.warning("%s: not snapshotting a state that does not round-trip: %s", aggregate, error)
        return None
    difference = first_difference(decoded, state)
    if difference is not None:
        path, back, before = difference
        log.warning(
            "%s: not snapshotting %s: at %s, %r would read back as %r; declare a state_type "
            "that says what it is",
            aggregate,
            aggregate_id,
            path,
            before,
            back,
        )
        return None
    return Snapshot(
        aggregate_id=snapshot_key(aggregate, aggregate_id),
        aggregate=aggregate.name,
        version=version,
        code=code,
        state=encoded,
    )


def load_snapshot(
    aggregate: Aggregate[Any], snapshot: Snapshot | None, code: str
) -> tuple[Any, int] | None:
    """(state, version) from a snapshot made by the same code, else None."""
    if snapshot is None or snapshot.code != code:  # the code key holds the name too
        return None
    try:
        state = state_decoder(aggregate.state_type).decode(snapshot.state)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # unreadable: fall back to the full stream
    return state, snapshot.version


def verify_snapshot(
    aggregate: Aggregate[Any],
    aggregate_id: str,
    loaded: tuple[Any, int],
    events: Iterable[Any],
) -> None:
    """Fold ``events`` (the stream from its start) up to the snapshot's version and
    compare with the snapshot's state; SnapshotMismatch at the first difference."""
    state, version = loaded
    stream = iter(events)
    folded, count = aggregate.fold_count(itertools.islice(stream, version), aggregate.initial)
    # read to the end: a store's stream may not be closable half way (a chain of batches)
    collections.deque(stream, maxlen=0)
    key = snapshot_key(aggregate, aggregate_id)
    if count < version:
        raise SnapshotMismatch(key, version, "version", version, count)
    difference = first_difference(state, folded)
    if difference is not None:
        path, snapshot_value, folded_value = difference
        raise SnapshotMismatch(key, version, path, snapshot_value, folded_value)
