"""Given / when / then: specs for one aggregate's rules, pure, without a store."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

from ..aggregate import Aggregate
from ..codec import validate_command
from ..errors import InvalidCommand, Rejected, Unstorable
from ..messages import Command, Event
from ..stores._common import event_json

__all__ = ["Outcome", "Scenario", "ScenarioFailed", "diff_events", "given"]

S = TypeVar("S")

# how many of the given events a failure message shows; older ones are summarised
_SHOWN_GIVEN = 12


# -- given / when / then ------------------------------------------------------------------


class ScenarioFailed(AssertionError):
    """A spec's expectation did not hold; the message shows given, when and a diff."""


class Scenario(Generic[S]):
    """The history of one aggregate instance, ready to receive a command.

    A scenario is immutable: :meth:`given` returns a new one, so a common history can be
    shared by several specs.

    >>> from incident.examples.bank import AccountOpened, bank_account
    >>> Scenario(bank_account).given(AccountOpened(account_number="A1")).state
    AccountState(account_number='A1', balance=0)
    """

    def __init__(self, aggregate: Aggregate[S], history: Sequence[Event] = ()) -> None:
        self.aggregate = aggregate
        self.history: tuple[Event, ...] = tuple(history)

    def __repr__(self) -> str:
        return f"Scenario({self.aggregate.name!r}, {len(self.history)} events)"

    @property
    def state(self) -> S:
        """The aggregate state after the given events."""
        return self.aggregate.fold(self.history)

    def given(self, *events: Event) -> Scenario[S]:
        """This history followed by ``events``."""
        for event in events:
            if not isinstance(event, Event):
                raise TypeError(f"given() takes events, got {event!r}")
        return Scenario(self.aggregate, (*self.history, *events))

    def given_commands(self, *commands: Command) -> Scenario[S]:
        """This history followed by what ``commands`` decide, one after the other.

        A command that is invalid or rejected here is a mistake in the spec's setup, so
        it fails the spec at once.
        """
        scenario = self
        for command in commands:
            outcome = scenario.when(command)
            if outcome.error is not None:
                raise outcome.failure(
                    f"a given command was refused: {_describe_error(outcome.error)}"
                )
            if (unkept := _unkept(outcome.events)) is not None:
                raise outcome.failure(f"a given command decided an event no store keeps ({unkept})")
            scenario = scenario.given(*outcome.events)
        return scenario

    def when(self, command: Command) -> Outcome[S]:
        """Validate ``command`` as a dispatch would, then decide it against the state."""
        try:
            validate_command(command)
        except InvalidCommand as invalid:
            return Outcome(self, command, (), invalid)
        try:
            decided = self.aggregate.decide(self.state, command)
        except Rejected as rejection:
            return Outcome(self, command, (), rejection)
        return Outcome(self, command, tuple(decided), None)


def given(aggregate: Aggregate[S], *events: Event) -> Scenario[S]:
    """A :class:`Scenario` of ``aggregate`` whose history is ``events`` (possibly none).

    >>> from incident.examples.bank import OpenAccount, AccountOpened, bank_account
    >>> given(bank_account).when(OpenAccount(aggregate_id="A1")).then(
    ...     AccountOpened(account_number="A1"))
    AccountState(account_number='A1', balance=0)
    """
    return Scenario(aggregate).given(*events)


class Outcome(Generic[S]):
    """What one command did to a scenario: the events decided, or the error.

    ``events`` holds the decided events; ``error`` the ``InvalidCommand`` or ``Rejected``
    (or None). The ``then`` methods assert and raise :class:`ScenarioFailed` otherwise.
    """

    def __init__(
        self,
        scenario: Scenario[S],
        command: Command,
        events: tuple[Event, ...],
        error: InvalidCommand | Rejected | None,
    ) -> None:
        self.scenario = scenario
        self.command = command
        self.events = events
        self.error = error

    def then(self, *expected: Event) -> S:
        """Assert that exactly ``expected`` were decided (none: nothing was decided):
        each of the same type, equal, and written alike (``10`` is not ``10.0``, ``True``
        not ``1``, an offset not another one for the same instant, as on a store), and
        each one a store keeps (``Unstorable`` at the append fails the spec too).

        Returns the state after them, for further assertions."""
        if self.error is not None:
            raise self.failure(
                f"expected {_count(expected)}, but {_describe_error(self.error)}",
                expected=expected,
            )
        if not _same_events(expected, self.events):
            raise self.failure(
                "the decided events differ from the expected ones",
                expected=expected,
                diff=True,
            )
        if (unkept := _unkept(self.events)) is not None:
            raise self.failure(f"it decided an event no store would keep ({unkept})")
        return self.scenario.aggregate.fold(self.events, self.scenario.state)

    def then_rejected(self, reason: str | None = None) -> Rejected:
        """Assert the command was rejected (with ``reason``, when given); returns the error."""
        wanted = "a rejection" if reason is None else f"a rejection with reason {reason!r}"
        if isinstance(self.error, Rejected):
            if reason is None or self.error.reason == reason:
                return self.error
            raise self.failure(f"expected {wanted}, but it was rejected with {self.error.reason!r}")
        if isinstance(self.error, InvalidCommand):
            raise self.failure(f"expected {wanted}, but {_describe_error(self.error)}")
        raise self.failure(f"expected {wanted}, but it decided {_count(self.events)}")

    def then_invalid(self, field: str | None = None) -> InvalidCommand:
        """Assert the command fails validation (at ``field``, when given); returns the error."""
        wanted = "an invalid command" if field is None else f"an invalid {field!r}"
        if isinstance(self.error, InvalidCommand):
            if field is None or self.error.field == field:
                return self.error
            raise self.failure(f"expected {wanted}, but {_describe_error(self.error)}")
        if isinstance(self.error, Rejected):
            raise self.failure(f"expected {wanted}, but the command is valid and was rejected")
        raise self.failure(f"expected {wanted}, but the command is valid and decided events")

    def failure(
        self, problem: str, *, expected: Sequence[Event] | None = None, diff: bool = False
    ) -> ScenarioFailed:
        """A :class:`ScenarioFailed` that tells the whole story of this outcome."""
        history = self.scenario.history
        lines = [f"{self.scenario.aggregate.name}: {problem}.", "given"]
        if not history:
            lines.append("  (no events)")
        if len(history) > _SHOWN_GIVEN:
            lines.append(f"  ... {len(history) - _SHOWN_GIVEN} earlier events")
        lines += [f"  {event!r}" for event in history[-_SHOWN_GIVEN:]]
        lines += ["when", f"  {self.command!r}"]
        if diff and expected is not None:
            lines += ["then (- expected, + decided)", diff_events(expected, self.events)]
        elif expected is not None:
            lines += ["expected", *(f"  {event!r}" for event in expected)]
        elif self.events:
            lines += ["decided", *(f"  {event!r}" for event in self.events)]
        return ScenarioFailed("\n".join(lines))


def diff_events(expected: Sequence[Event], actual: Sequence[Event]) -> str:
    """A line diff of two event lists: ``-`` expected only, ``+`` actual only, and for an
    event of the same type on both sides, the fields that differ.

    >>> from incident.examples.bank import AccountOpened, MoneyDeposited
    >>> print(diff_events(
    ...     [AccountOpened(account_number="A1"), MoneyDeposited(amount=5)],
    ...     [AccountOpened(account_number="A1"), MoneyDeposited(amount=50)]))
        AccountOpened(account_number='A1')
      - MoneyDeposited(amount=5)
      + MoneyDeposited(amount=50)
          amount: expected 5, got 50
    """
    left, right = [repr(e) for e in expected], [repr(e) for e in actual]
    lines: list[str] = []
    matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            lines += [f"    {line}" for line in left[i1:i2]]
            continue
        olds, news = list(expected[i1:i2]), list(actual[j1:j2])
        # pair events of the same type so their field differences can be shown
        while olds or news:
            old = olds.pop(0) if olds else None
            new = news.pop(0) if news else None
            if old is not None and new is not None and type(old) is not type(new):
                news.insert(0, new)
                new = None
            if old is not None:
                lines.append(f"  - {old!r}")
            if new is not None:
                lines.append(f"  + {new!r}")
            if old is not None and new is not None:
                lines += [f"      {change}" for change in _field_changes(old, new)]
    if not lines:
        lines.append("    (no events on either side)")
    return "\n".join(lines)


def _field_changes(old: Event, new: Event) -> list[str]:
    changes = []
    for name in old.__struct_fields__:
        before, after = getattr(old, name), getattr(new, name)
        if not _exactly(before, after):
            changes.append(f"{name}: expected {before!r}, got {after!r}")
    return changes


def _unkept(events: Sequence[Event]) -> Unstorable | None:
    """Why the first of ``events`` that no store keeps would be refused at the append."""
    for event in events:
        try:
            event_json(event)
        except Unstorable as error:
            return error
    return None


def _same_events(expected: Sequence[Event], actual: Sequence[Event]) -> bool:
    return len(expected) == len(actual) and all(map(_exactly, expected, actual))


def _exactly(left: Any, right: Any) -> bool:
    """Equal, of one type, and the same JSON: ``==`` alone takes ``10.0`` for ``10``,
    ``True`` for ``1``, ``-0.0`` for ``0.0``, ``Decimal("1.00")`` for ``Decimal("1.0")``
    and one instant at two offsets for the same value, and a store keeps them apart."""
    if type(left) is not type(right) or left != right:
        return False
    try:
        written = [msgspec.json.encode(v, order="deterministic") for v in (left, right)]
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return True  # not JSON at all: == is all there is to go by
    return written[0] == written[1]


def _count(events: Sequence[Event]) -> str:
    if not events:
        return "no events"
    names = ", ".join(type(event).__name__ for event in events)
    return f"{len(events)} event{'s' if len(events) > 1 else ''} ({names})"


def _describe_error(error: InvalidCommand | Rejected) -> str:
    if isinstance(error, InvalidCommand):
        return f"the command is invalid ({error})"
    return f"it was rejected with {error.reason!r}"
