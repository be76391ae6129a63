"""aggregate_machine: an aggregate as a hypothesis RuleBasedStateMachine, checking that
folding matches, invariants hold and nothing is changed in place."""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from ..aggregate import Aggregate
from ..codec import validate_command
from ..errors import InvalidCommand, Rejected, Unstorable
from ..messages import Command, Event
from ..stores._common import event_json
from .strategies import HAVE_HYPOTHESIS, require_hypothesis
from .strategies import commands as derive_commands  # its parameter "commands" hides the name

if TYPE_CHECKING or HAVE_HYPOTHESIS:
    from hypothesis import settings as Settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
    from hypothesis.strategies import SearchStrategy

__all__ = ["aggregate_machine"]


# -- the stateful machine -----------------------------------------------------------------

Invariant = Callable[[Any], object]


def aggregate_machine(
    aggregate: Aggregate[Any],
    commands: SearchStrategy[Any] | None = None,
    *,
    invariants: Sequence[Invariant] | Mapping[str, Invariant] = (),
    streams: Sequence[str] = ("A", "B"),
    settings: Settings | None = None,
) -> type[RuleBasedStateMachine]:
    """A hypothesis ``RuleBasedStateMachine`` that runs random commands through ``aggregate``.

    Each step validates a command (an invalid one is refused and changes nothing, as in
    a dispatch), decides it against the state of its ``aggregate_id``'s stream (a
    ``Rejected`` changes nothing either) and evolves that state with the decided events.
    After every step it checks:

    - each of ``invariants`` on every stream's state: an invariant takes a state and
      fails by returning False or raising AssertionError (give a dict to name them);
    - that folding each stream's whole history gives the state reached step by step,
      and that no execute or apply function changed the state it was given in place
      (states must compare by value, as msgspec Structs and dataclasses do);
    - that deciding the same command on the same state again gives the same events
      (an execute function that reads the clock or draws randomness fails this);
    - that every decided event is one a store keeps (docs/storable.md: a float in an
      ``int`` field, ``nan``, a NUL... would be refused as ``Unstorable`` at the append).

    ``commands`` defaults to :func:`commands` of the aggregate aimed at ``streams``;
    a command type whose ``aggregate_id`` refuses every stream is a ValueError here.
    A run of 50 commands or more that never reached a state (all invalid or rejected)
    fails: it would have tested nothing.
    Run it with ``Machine.TestCase`` (pytest collects it) or
    ``hypothesis.stateful.run_state_machine_as_test(Machine)``; ``settings`` default to
    a modest, deadline-free run.

    >>> from hypothesis.stateful import run_state_machine_as_test
    >>> from incident.examples.bank import bank_account
    >>> Machine = aggregate_machine(bank_account, invariants=[lambda s: s.balance >= 0])
    >>> run_state_machine_as_test(Machine)
    """
    require_hypothesis("aggregate_machine")
    if commands is None:
        _check_streams(aggregate, streams)
    chosen: SearchStrategy[Any] = (
        commands
        if commands is not None
        else derive_commands(aggregate, aggregate_id=st.sampled_from(list(streams)))
    )
    # over the whole run, not one example: a run that never reached a state has tested
    # nothing, and hypothesis would call it a pass
    tally = {"commands": 0, "invalid": 0, "at aggregate_id": 0, "rejected": 0, "states": 0}
    if commands is None:
        advice = f"no generated command was valid for its streams {tuple(streams)!r}; "
        advice += "pass streams= matching your ids"
    else:
        advice = "commands= gave no command that passes validate_command and is accepted"
    if isinstance(invariants, Mapping):
        checks = list(invariants.items())
    else:
        checks = [(_name(check, n), check) for n, check in enumerate(invariants, 1)]

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.states: dict[str, Any] = {}
            self.histories: dict[str, list[Event]] = {}

        @rule(command=chosen)
        def dispatch(self, command: Command) -> None:
            self.decide(command)
            # counted once handled: a step that failed a check is not "nothing checked"
            tally["commands"] += 1

        def decide(self, command: Command) -> None:
            try:
                validate_command(command)
            except InvalidCommand as error:
                tally["invalid"] += 1
                tally["at aggregate_id"] += error.field == "aggregate_id"
                return
            key: str = command.aggregate_id
            state = self.states.get(key, aggregate.initial)
            before = copy.deepcopy(state)
            try:
                decided = aggregate.decide(state, command)
            except Rejected:
                tally["rejected"] += 1
                _unchanged(state, before, f"executing {type(command).__name__}")
                return
            _unchanged(state, before, f"executing {type(command).__name__}")
            again = aggregate.decide(state, command)
            assert again == decided, (
                f"{aggregate.name} decided differently on the same state and command:\n"
                f"first  {decided!r}\nsecond {again!r}"
            )
            for event in decided:
                _storable(aggregate.name, command, event)
                before = copy.deepcopy(state)
                evolved = aggregate.evolve(state, event)
                _unchanged(state, before, f"applying {type(event).__name__}")
                state = evolved
            self.states[key] = state
            self.histories.setdefault(key, []).extend(decided)

        @invariant()
        def check(self) -> None:
            tally["states"] += len(self.states)
            for key, state in self.states.items():
                folded = aggregate.fold(self.histories[key])
                assert folded == state, (
                    f"{aggregate.name} {key!r}: folding its history gives\n  {folded!r}\n"
                    f"but step by step it reached\n  {state!r}"
                )
                for name, holds in checks:
                    if holds(state) is False:
                        raise AssertionError(
                            f"invariant {name} failed for {aggregate.name} {key!r}: {state!r}"
                        )

        def teardown(self) -> None:
            if tally["states"] == 0 and tally["commands"] >= _NOTHING_CHECKED_AFTER:
                raise AssertionError(
                    f"aggregate_machine({aggregate.name}) checked no state in "
                    f"{tally['commands']} commands: {tally['invalid']} invalid "
                    f"({tally['at aggregate_id']} at aggregate_id), {tally['rejected']} "
                    f"rejected, none decided: {advice}"
                )

    Machine.__name__ = Machine.__qualname__ = f"{_camel(aggregate.name)}Machine"
    Machine.TestCase.settings = settings or Settings(
        max_examples=50, stateful_step_count=25, deadline=None
    )
    return Machine


# commands a run may dispatch without reaching a state before the machine says so
_NOTHING_CHECKED_AFTER = 50


def _check_streams(aggregate: Aggregate[Any], streams: Sequence[str]) -> None:
    """Refuses streams that some command type's aggregate_id can never take: its
    commands would all be invalid, and the machine would test nothing with them."""
    if not streams:
        raise ValueError(f"aggregate_machine({aggregate.name}): streams= is empty")
    refused = []
    for command_type in aggregate.command_types:
        try:
            annotation = typing.get_type_hints(command_type, include_extras=True)["aggregate_id"]
        except Exception:  # an annotation we cannot resolve: the run-level check remains
            continue
        accepted = []
        for stream in streams:
            try:
                msgspec.convert(stream, annotation)
            except msgspec.ValidationError:
                continue
            accepted.append(stream)
        if not accepted:
            refused.append(command_type.__name__)
    if refused:
        raise ValueError(
            f"aggregate_machine({aggregate.name}): no generated {', '.join(refused)} can be "
            f"valid for its streams {tuple(streams)!r} (its aggregate_id refuses each of "
            "them); pass streams= matching your ids"
        )


def _storable(name: str, command: Command, event: Event) -> None:
    try:
        event_json(event)
    except Unstorable as error:
        raise AssertionError(
            f"{name} decided an event no store would keep, for {command!r}: {error}"
        ) from None


def _unchanged(state: Any, before: Any, doing: str) -> None:
    # a state changed in place corrupts every state that shares it (the initial one too)
    assert state == before, (
        f"{doing} changed its input state in place:\n  before {before!r}\n  after  {state!r}"
    )


def _name(function: Callable[..., Any], number: int) -> str:
    name = getattr(function, "__name__", "<lambda>")
    return f"#{number}" if name == "<lambda>" else name


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", name))
