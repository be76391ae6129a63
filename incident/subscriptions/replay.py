"""Replay: a handler's projections rebuilt from the start of the log.

:func:`rebuild` reads the whole log through the handler's listeners and collects the
rows of each projection type; :func:`replay_into` then swaps each type's table for the
rebuilt rows, moves the checkpoint to the end and empties the dead letters, in one
checkpoint store ``reset`` (docs/subscriptions.md says what a kill leaves). Commands the
listeners return for events the subscription had already handled are not dispatched
again (a replay rebuilds read models, it does not re-run a process); for events past the
old checkpoint, and for the parked and held ones it never handled, they are, as running
would have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from ..event_handler import EventHandler
from ..follow_ups import split_outputs
from ..fp import groupby, partition_all
from ..messages import Projection, Recorded
from ..stores import CheckpointStore
from ..stores.read_model_rows import projection_key
from .reactor import Reactor
from .states import Pending, StreamStates, merge_projections

__all__ = ["Rebuilt", "Replayed", "rebuild", "replay_into"]

FollowUp = Callable[[str, Recorded[Any], Sequence[tuple[str, Sequence[Any]]]], None]


class Replayed(NamedTuple):
    """What a replay did: the position it ended at, the rows written per projection type,
    and how many commands it did not dispatch again."""

    handler: str
    position: int
    written: dict[str, int]
    skipped_commands: int


class Rebuilt(NamedTuple):
    """The rows of each projection type, the last position read, and how many commands
    were not dispatched again."""

    tables: dict[type[Projection], list[Projection]]
    position: int
    skipped_commands: int


def rebuild(
    handler: EventHandler,
    log: Iterable[Recorded[Any]],
    states: StreamStates,
    *,
    already: int,
    follow_up: FollowUp,
    batch_size: int,
    progress: Callable[[int], object] | None = None,
    unhandled: frozenset[int] = frozenset(),
) -> Rebuilt:
    """Run ``handler``'s listeners over ``log`` (from its start), with the states from
    ``states`` (cleared first). Commands returned for events past ``already`` (the old
    checkpoint), or at one of the ``unhandled`` positions (parked or held: never
    handled, though the checkpoint is past them), go to ``follow_up``; those for the
    other earlier events are only counted. ``progress`` is called with the number of
    events read after each batch."""
    states.clear()
    rebuilt: Pending = {}
    position, skipped = 0, 0
    for batch in partition_all(batch_size, log):
        for recorded in batch:
            if not handler.handles(recorded.data):
                states.follow(recorded)
                continue
            projections: list[Projection] = []
            steps = split_outputs(handler.outputs(recorded, states.at(recorded)), projections)
            for projection in projections:
                projection_key(projection)  # raises: a row that cannot be stored fails
            merge_projections(rebuilt, projections)
            if recorded.position > already or recorded.position in unhandled:
                if steps:
                    follow_up(handler.name, recorded, steps)
            else:
                skipped += sum(len(commands) for _, commands in steps)
        position = batch[-1].position
        if progress is not None:
            progress(len(batch))
    return Rebuilt(groupby(type, rebuilt.values()), position, skipped)


def replay_into(
    handler: EventHandler,
    reactor: Reactor,
    checkpoints: CheckpointStore,
    states: StreamStates,
    *,
    already: int,
    batch_size: int,
    progress: Callable[[int], object] | None,
) -> Replayed:
    """Rebuild ``handler``'s projections from the start of the log (:func:`rebuild`) and
    commit them with one ``checkpoints.reset``: each table swapped in the reactor's
    projection store, the checkpoint at the end and the dead letters emptied (every
    event was handled). That is one transaction when the read models share the
    checkpoints' database. Otherwise the checkpoint and the dead letters commit first:
    killed before the tables are swapped, the old tables miss the replayed events until
    the next replay, but no older row is ever written over a newer one, as the other
    order would let the runner and the stale dead letters do
    (:mod:`incident.stores.replacing`)."""
    rebuilt = rebuild(
        handler,
        reactor.event_store.read_all(),
        states,
        already=already,
        follow_up=reactor.follow_up,
        batch_size=batch_size,
        progress=progress,
        unhandled=frozenset(p.position for p in checkpoints.parked(handler.name)),
    )
    checkpoints.reset(
        handler.name,
        rebuilt.position,
        drop_parked=True,
        tables=rebuilt.tables,
        projection_store=reactor.projection_store,
    )
    written = {t.__name__: len(rows) for t, rows in rebuilt.tables.items()}
    return Replayed(handler.name, rebuilt.position, written, rebuilt.skipped_commands)
