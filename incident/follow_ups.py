"""Follow-ups: the commands event handlers return, carried out exactly once.

A listener returns commands and Attempts; this module dispatches them (as plans, see
:mod:`incident.plans`, so the sync and the async command handler share every step), each under a key
made of the handler, the cause, the listener and the command itself (see
:func:`~incident.event_handler.keyed_steps`), so that carrying out the same follow-up
again (a redelivered event, owed work completed after a crash) returns its first
outcome, its events or its rejection, instead of running it twice.

Inline handlers' follow-ups are owed work: ``owed_by`` makes the record the command
handler commits with the cause, ``FollowUps.carry_out`` runs the commands after the
commit and settles the record, and ``complete_owed`` finishes whatever a failure left.
The rules are in docs/processes.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import msgspec

from .aggregate import Aggregate
from .errors import FollowUpFailed, IncidentError, Rejected, StoreError
from .event_handler import Attempt, EventHandler, Output, flatten, keyed_steps
from .messages import Command, Projection, Recorded
from .plans import Blocking, Dispatch, Plan
from .storable import error_text
from .stores import EventStore, Owed
from .stores._common import closing_iterator

__all__ = ["IDEMPOTENCY_KEY", "FollowUp", "FollowUps", "owed_by", "split_outputs"]

log = logging.getLogger("incident")

IDEMPOTENCY_KEY = "idempotency_key"

# A follow-up to run after the command commits: the record that it is owed, the event
# that caused it, and what each listener of the handler returned for it.
FollowUp = tuple[Owed, Recorded[Any], list[tuple[str, list[Any]]]]


class FollowUps:
    """Carries out follow-ups for one command handler, as plans (:mod:`incident.plans`):
    each method returns a generator that yields the dispatches and store work it needs,
    so the sync and the async command handler run the same steps. ``aggregate`` finds an
    aggregate by name, ``check`` validates and routes a reaction (what a compensation
    function returns is checked like a listener's output)."""

    def __init__(
        self,
        *,
        event_store: EventStore,
        handlers: Sequence[EventHandler],
        aggregate: Callable[[str], Aggregate[Any]],
        check: Callable[[Any], None],
    ) -> None:
        self._event_store = event_store
        self._handlers = {handler.name: handler for handler in handlers}
        self._aggregate, self._check = aggregate, check

    # -- owed work ------------------------------------------------------------------

    def carry_out(self, recorded: list[Recorded[Any]], follow_ups: list[FollowUp]) -> Plan[None]:
        """After the commit: each handler's commands for each event, then its owed record
        settled. A failure leaves that record (and those after it) owed."""
        for index, (owed, cause, steps) in enumerate(follow_ups):
            try:
                yield from self.follow_up(owed.handler, cause, steps)
            except Exception as error:
                failed = yield from self._failed(owed, error)
                still = [failed, *(o for o, _, _ in follow_ups[index + 1 :])]
                raise FollowUpFailed(recorded, still, error_text(error)) from error
            yield Blocking(partial(self._event_store.settle, owed.handler, owed.position))

    def complete_owed(self) -> Plan[list[Owed]]:
        """Every follow-up the handlers still owe, oldest first; returns what was
        completed. One that fails again stays owed, with its error; the others go on."""
        completed = []
        for owed in (yield Blocking(self._event_store.owed)):
            handler = self._handlers.get(owed.handler)
            if handler is None:
                continue  # another application's handler
            try:
                yield from self._complete(handler, owed)
            except Exception as error:
                failed = yield from self._failed(owed, error)
                log.warning("%s still owes #%s: %s", owed.handler, owed.position, failed.error)
                continue
            completed.append(owed)
        return completed

    def complete_owed_for(self, recorded: list[Recorded[Any]]) -> Plan[None]:
        """Complete what the handlers still owe for these events (a command dispatched
        again under its key: its first run may have stopped half way)."""
        if not recorded or not self._handlers:
            return
        positions = {r.position for r in recorded}
        for owed in (yield Blocking(self._event_store.owed)):
            handler = self._handlers.get(owed.handler)
            if handler is not None and owed.position in positions:
                try:
                    yield from self._complete(handler, owed)
                except Exception as error:
                    failed = [(yield from self._failed(owed, error))]
                    raise FollowUpFailed(recorded, failed, error_text(error)) from error

    def _complete(self, handler: EventHandler, owed: Owed) -> Plan[None]:
        """Run ``handler``'s listeners on the cause again (they are pure: same event, same
        state, same commands, same keys) and carry out their commands."""
        cause, before = yield Blocking(partial(self._cause_of, owed))
        steps = split_outputs(handler.outputs(cause, before), [])
        yield from self.follow_up(handler.name, cause, steps)
        yield Blocking(partial(self._event_store.settle, owed.handler, owed.position))

    def _cause_of(self, owed: Owed) -> tuple[Recorded[Any], Any]:
        """The event owed work is for, and its aggregate's state after it."""
        store = self._event_store
        cause = next(iter(store.read_all(after=owed.position - 1, limit=1)), None)
        if cause is None or cause.event_id != owed.event_id:
            raise IncidentError(f"{owed.handler} owes work for #{owed.position}, not in the log")
        aggregate = self._aggregate(cause.aggregate)
        with closing_iterator(store.events(cause.aggregate_id)) as events:
            before = aggregate.fold(itertools.islice(events, cause.version - 1))
        return cause, aggregate.evolve(before, cause)

    def _failed(self, owed: Owed, error: BaseException) -> Plan[Owed]:
        failed = msgspec.structs.replace(owed, error=error_text(error), attempts=owed.attempts + 1)
        try:
            yield Blocking(partial(self._event_store.owe, failed))
        except StoreError:  # the root's transaction keeps it owed all the same
            log.warning("could not record why %s failed on #%s", owed.handler, owed.position)
        return failed

    # -- dispatching ----------------------------------------------------------------

    def follow_up(
        self, handler: str, cause: Recorded[Any], steps: Sequence[tuple[str, Sequence[Any]]]
    ) -> Plan[None]:
        """Dispatch what ``handler``'s listeners returned for ``cause`` (``(listener name,
        commands and attempts)`` pairs), each command under a key made of the handler's
        name, the cause's event id, the listener's name and the command itself: carried
        out again, a command that already ran returns its first outcome instead."""
        for listener, commands in steps:
            if commands:
                key = f"{handler}:{cause.event_id}:{listener}"
                yield from self.react(tuple(commands), cause, key=key)

    def react(
        self,
        reaction: Any,
        cause: Recorded[Any],
        root: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
    ) -> Plan[None]:
        """Carry out a listener's command, Attempt, or tuple of them, caused by ``cause``.

        ``root`` is the metadata the dispatched commands inherit (the correlation id and
        user keys); by default the cause's own. With ``key``, every command dispatched is
        an idempotent one, keyed by ``key`` and the command's content (and the branch it
        is on, for an Attempt's).
        """
        if root is None:
            root = {**cause.metadata, "causation_id": cause.event_id}
        for step_key, step in keyed_steps(key, reaction):
            yield from self._react_once(step, cause, root, step_key)

    def _react_once(
        self,
        step: Command | Attempt,
        cause: Recorded[Any],
        root: Mapping[str, Any],
        key: str | None,
    ) -> Plan[None]:
        metadata = {**root, "causation_id": cause.event_id}
        metadata.pop(IDEMPOTENCY_KEY, None)  # the key names the root command only
        if key is not None:
            metadata[IDEMPOTENCY_KEY] = key
        command = step.command if isinstance(step, Attempt) else step
        try:
            recorded = yield Dispatch(command, metadata)
        except Rejected as rejection:
            if isinstance(step, Attempt):
                branch = step.on_rejected
                if callable(branch):  # a compensation that depends on why
                    branch = branch(rejection)
                    flatten(branch, f"on_rejected of {type(command).__name__}")
                    self._check(branch)
                yield from self.react(branch, cause, root, key=_branch(key, "rejected"))
            else:
                log.warning(
                    "%s, dispatched by a listener on %s #%s, was rejected: %s",
                    type(command).__name__,
                    cause.event_type,
                    cause.position,
                    rejection.reason,
                )
            return
        if isinstance(step, Attempt):
            # what follows a success was caused by the attempted command's last event
            after = recorded[-1] if recorded else cause
            yield from self.react(step.on_success, after, root, key=_branch(key, "succeeded"))


def split_outputs(
    outputs: list[tuple[str, list[Output]]], projections: list[Projection]
) -> list[tuple[str, list[Any]]]:
    """Move the projections into ``projections``; the commands and attempts that are
    left, per listener (listeners that returned none left out)."""
    steps = []
    for listener, returned in outputs:
        commands = []
        for output in returned:
            if isinstance(output, Projection):
                projections.append(output)
            else:
                commands.append(output)
        if commands:
            steps.append((listener, commands))
    return steps


def owed_by(handler: str, cause: Recorded[Any]) -> Owed:
    """The record that ``handler`` owes the commands it returned for ``cause``."""
    return Owed(
        handler=handler,
        position=cause.position,
        event_id=cause.event_id,
        aggregate_id=cause.aggregate_id,
        event_type=cause.event_type,
        owed_at=cause.event_date,
    )


def _branch(key: str | None, step: str) -> str | None:
    return None if key is None else f"{key}/{step}"
