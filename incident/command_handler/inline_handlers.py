"""The command handler's inline event handlers: run inside the append's transaction,
pure, so their projections (and the record of the commands they owe) commit with the
events, and every command they return is checked before anything commits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..aggregate import Aggregate
from ..codec import validate_command
from ..event_handler import Attempt, EventHandler
from ..follow_ups import FollowUp, owed_by, split_outputs
from ..messages import Command, Projection, Recorded
from ..snapshots import Snapshot
from ..stores import Effects, ProjectFn

__all__ = ["InlineHandlers"]

# The snapshot to commit with the event that reached a version, if any.
SnapshotFn = Callable[[Aggregate[Any], str, Any, int], Snapshot | None]


class InlineHandlers:
    """``handlers`` run for every event a command appends; ``route`` names the aggregate
    of a command (RoutingError if none); ``snapshot`` gives the snapshot to store with an
    event, if any (None: snapshots are off, nothing to ask)."""

    def __init__(
        self,
        handlers: Sequence[EventHandler],
        *,
        route: Callable[[Command], Aggregate[Any]],
        snapshot: SnapshotFn | None,
    ) -> None:
        self.handlers = tuple(handlers)
        self._route, self._snapshot = route, snapshot

    def projector(self, aggregate: Aggregate[Any], aggregate_id: str, state: Any) -> ProjectFn:
        """What runs inside the append's transaction: the inline handlers, pure. It
        returns the projections to commit with the events and, for every handler that
        returned commands for an event, a record that it owes them (committed with the
        events too); its Effects' ``result`` is ``(state, follow_ups)``: the state after
        the events and the commands owed, which the store hands back once it commits
        (it may call this more than once: each call starts afresh)."""
        handlers, check, take_snapshot = self.handlers, self.check_reaction, self._snapshot

        def project(recorded: list[Recorded[Any]]) -> Effects:
            follow_ups: list[FollowUp] = []
            projections: list[Projection] = []
            current = state
            for record in recorded:
                current = aggregate.evolve(current, record)
                for handler in handlers:
                    outputs = handler.outputs(record, current)
                    if not outputs:
                        continue
                    steps = split_outputs(outputs, projections)
                    if steps:
                        for _, commands in steps:
                            for output in commands:
                                check(output)
                        follow_ups.append((owed_by(handler.name, record), record, steps))
                if take_snapshot is not None:
                    snapshot = take_snapshot(aggregate, aggregate_id, current, record.version)
                    if snapshot is not None:
                        projections.append(snapshot)
            owed = [owed for owed, _, _ in follow_ups]
            return Effects(projections, owed, result=(current, follow_ups))

        return project

    def check_reaction(self, reaction: Any) -> None:
        """Validate and route a listener's commands (every branch) inside the transaction,
        so a listener bug stores nothing rather than failing after its cause committed."""
        if isinstance(reaction, tuple):
            for step in reaction:
                self.check_reaction(step)
        elif isinstance(reaction, Attempt):
            self.check_reaction(reaction.command)
            self.check_reaction(reaction.on_success)
            if not callable(reaction.on_rejected):  # checked once it has answered
                self.check_reaction(reaction.on_rejected)
        else:
            self._route(validate_command(reaction))
