"""Snapshots: an aggregate's state every N events, so a cold start reads the latest
snapshot and only the events after it.

A snapshot is a Projection row (key ``"<aggregate>/<id>"``), so every projection store
keeps them, version-guarded, and on the event store's own database it commits in the
same transaction as the event that triggered it. A snapshot is only trusted when its
``code`` matches a hash of the aggregate's apply functions and state type: change how
state is built and old snapshots are ignored, never misread.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import msgspec

from .aggregate import Aggregate
from .messages import Projection

__all__ = ["Snapshot", "code_key", "load_snapshot", "snapshot_key", "take_snapshot"]

log = logging.getLogger("incident")


class Snapshot(Projection):
    aggregate_id: str  # "<aggregate name>/<aggregate id>"
    aggregate: str
    version: int
    code: str
    state: str  # the state as JSON


def code_key(aggregate: Aggregate[Any]) -> str:
    """A hash of what shapes the state: each apply function's code and the state's type."""
    digest = hashlib.sha256(aggregate.name.encode())
    digest.update(repr(type(aggregate.initial)).encode())
    digest.update(repr(getattr(type(aggregate.initial), "__struct_fields__", ())).encode())
    for event_type, applier in sorted(
        aggregate.appliers.items(), key=lambda pair: pair[0].__qualname__
    ):
        code = applier.__code__
        digest.update(event_type.__qualname__.encode())
        digest.update(code.co_code)
        digest.update(repr(code.co_consts).encode())
        digest.update(repr(code.co_names).encode())
    return digest.hexdigest()[:16]


def snapshot_key(aggregate: Aggregate[Any], aggregate_id: str) -> str:
    return f"{aggregate.name}/{aggregate_id}"


def take_snapshot(
    aggregate: Aggregate[Any], aggregate_id: str, state: Any, version: int, code: str
) -> Snapshot | None:
    """A snapshot of ``state``, or None when the state cannot be stored as JSON (a
    snapshot is an optimisation: it must never make a command fail)."""
    try:
        encoded = msgspec.json.encode(state).decode()
    except (TypeError, msgspec.EncodeError):
        log.warning("%s state is not JSON-encodable; not snapshotting it", aggregate.name)
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
    if snapshot is None or snapshot.code != code:
        return None
    try:
        state = msgspec.json.decode(snapshot.state, type=type(aggregate.initial))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # unreadable: fall back to the full stream
    return state, snapshot.version
