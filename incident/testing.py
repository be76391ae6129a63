"""Testing helpers for aggregates: given/when/then specs, hypothesis strategies derived
from the message types, and a stateful machine that runs random commands.

Everything here is pure, like the aggregates it tests: no store, no clock.

Specs read like the rules they check:

>>> from incident.examples.bank import (
...     AccountOpened, DepositMoney, MoneyDeposited, WithdrawMoney, bank_account)
>>> opened = given(bank_account, AccountOpened(account_number="A1"))
>>> opened.when(DepositMoney(aggregate_id="A1", amount=10)).then(MoneyDeposited(amount=10))
AccountState(account_number='A1', balance=10)
>>> opened.when(WithdrawMoney(aggregate_id="A1", amount=1)).then_rejected("no_enough_balance")
Rejected('no_enough_balance')
>>> opened.when(DepositMoney(aggregate_id="A1", amount=0)).then_invalid("amount")
InvalidCommand('Invalid DepositMoney: Expected `int` >= 1 - at `amount`')

Strategies generate commands that pass :func:`incident.validate_command` (or, from
:func:`invalid_commands`, that fail it), and :func:`aggregate_machine` turns an
aggregate into a hypothesis ``RuleBasedStateMachine``.

See Also: :class:`Scenario`, :func:`commands`, :func:`events`, :func:`invalid_commands`,
:func:`aggregate_machine`, :func:`diff_events`.
"""

from __future__ import annotations

import copy
import datetime as dt
import difflib
import importlib.util
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import msgspec.inspect as mi

from .aggregate import Aggregate
from .codec import validate_command
from .errors import InvalidCommand, Rejected
from .messages import Command, Event

__all__ = [
    "Outcome",
    "Scenario",
    "ScenarioFailed",
    "aggregate_machine",
    "commands",
    "diff_events",
    "events",
    "given",
    "invalid_commands",
]


# Specs need nothing more; strategies and the machine need hypothesis (incident[testing]).
_HAVE_HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None
if TYPE_CHECKING or _HAVE_HYPOTHESIS:
    from hypothesis import settings as Settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
    from hypothesis.strategies import SearchStrategy


def _require_hypothesis(what: str) -> None:
    if not _HAVE_HYPOTHESIS:
        raise ImportError(
            f"incident.testing.{what} needs hypothesis: pip install 'incident[testing]'"
        )


S = TypeVar("S")

# how many of the given events a failure message shows; older ones are summarised
_SHOWN_GIVEN = 12
_INT64 = (-(2**63), 2**63 - 1)


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
        """Assert that exactly ``expected`` were decided (none: nothing was decided).

        Returns the state after them, for further assertions."""
        if self.error is not None:
            raise self.failure(
                f"expected {_count(expected)}, but {_describe_error(self.error)}",
                expected=expected,
            )
        if list(self.events) != list(expected):
            raise self.failure(
                "the decided events differ from the expected ones",
                expected=expected,
                diff=True,
            )
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
        if before != after:
            changes.append(f"{name}: expected {before!r}, got {after!r}")
    return changes


def _count(events: Sequence[Event]) -> str:
    if not events:
        return "no events"
    names = ", ".join(type(event).__name__ for event in events)
    return f"{len(events)} event{'s' if len(events) > 1 else ''} ({names})"


def _describe_error(error: InvalidCommand | Rejected) -> str:
    if isinstance(error, InvalidCommand):
        return f"the command is invalid ({error})"
    return f"it was rejected with {error.reason!r}"


# -- strategies ---------------------------------------------------------------------------

Fields = Mapping[str, Any]  # field name -> a strategy, or a plain value to always use


def commands(*sources: Aggregate[Any] | type[Command], **fields: Any) -> SearchStrategy[Any]:
    """Commands that pass :func:`incident.validate_command`, derived from their types.

    ``sources`` are aggregates (all the commands they execute) or command types. Each
    keyword names a field and gives a strategy (or a plain value) to use for it in every
    generated type that has it: ``aggregate_id=st.sampled_from(["A", "B"])`` makes a
    sequence of commands hit the same few aggregates. A field given this way is used as
    is, so it is up to you to keep it valid.

    >>> from hypothesis import given as for_all
    >>> from incident import validate_command
    >>> from incident.examples.bank import bank_account
    >>> @for_all(commands(bank_account, aggregate_id="A1"))
    ... def test(command):
    ...     assert validate_command(command).aggregate_id == "A1"
    >>> test()
    """
    _require_hypothesis("commands")
    types = _types(sources, Command, lambda aggregate: aggregate.command_types)
    _check_fields(types, fields)
    return st.one_of(*(_struct(t, fields) for t in types))


def events(*sources: Aggregate[Any] | type[Event], **fields: Any) -> SearchStrategy[Any]:
    """Events derived from their types: every event an aggregate applies, or the types
    given; keywords override fields as in :func:`commands`."""
    _require_hypothesis("events")
    types = _types(sources, Event, lambda aggregate: aggregate.event_types)
    _check_fields(types, fields)
    return st.one_of(*(_struct(t, fields) for t in types))


def invalid_commands(
    *sources: Aggregate[Any] | type[Command], **fields: Any
) -> SearchStrategy[Any]:
    """Commands that fail :func:`incident.validate_command`: one field of each breaks a
    constraint (``Meta(gt=0)``, a length, a pattern...) or holds a value of the wrong type.

    Keywords override the other, valid fields as in :func:`commands`.

    >>> from hypothesis import given as for_all
    >>> from incident import InvalidCommand, validate_command
    >>> from incident.examples.bank import DepositMoney
    >>> @for_all(invalid_commands(DepositMoney))
    ... def test(command):
    ...     try:
    ...         validate_command(command)
    ...     except InvalidCommand:
    ...         return
    ...     raise AssertionError(command)
    >>> test()
    """
    _require_hypothesis("invalid_commands")
    types = _types(sources, Command, lambda aggregate: aggregate.command_types)
    _check_fields(types, fields)
    options = [
        _broken(command_type, field, breaker, fields)
        for command_type in types
        for field, breaker in _breakers(command_type).items()
    ]
    if not options:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(f"No field of {names} can be made invalid (they all accept anything)")
    return st.one_of(*options).filter(_fails_validation)


def _types(
    sources: Iterable[Any], base: type[Any], of: Callable[[Aggregate[Any]], Iterable[type[Any]]]
) -> list[type[Any]]:
    found: list[type[Any]] = []
    for source in sources:
        if isinstance(source, Aggregate):
            found += of(source)
        elif isinstance(source, type) and issubclass(source, base):
            found.append(source)
        else:
            raise TypeError(
                f"Expected an Aggregate or an incident.{base.__name__} subclass, got {source!r}"
            )
    if not found:
        raise ValueError(f"No {base.__name__.lower()} types to generate from {list(sources)!r}")
    return list(dict.fromkeys(found))  # unique, in order


def _check_fields(types: Sequence[type[Any]], fields: Fields) -> None:
    known = {name for t in types for name in t.__struct_fields__}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"No generated type has a field named {', '.join(unknown)}; "
            f"their fields are: {', '.join(sorted(known))}"
        )


def _strategy(value: Any) -> SearchStrategy[Any]:
    return value if isinstance(value, SearchStrategy) else st.just(value)


def _struct(struct_type: type[Any], fields: Fields) -> SearchStrategy[Any]:
    info = mi.type_info(struct_type)
    assert isinstance(info, mi.StructType)
    drawn = {
        f.name: _strategy(fields[f.name]) if f.name in fields else _valid(f.type)
        for f in info.fields
    }
    return st.builds(struct_type, **drawn)


def _valid(info: mi.Type) -> SearchStrategy[Any]:
    """Values that msgspec accepts for a field of this type, constraints included."""
    match info:
        case mi.Metadata():
            return _valid(info.type)
        case mi.AnyType():
            return st.none() | st.booleans() | st.integers(*_INT64) | _text()
        case mi.NoneType():
            return st.none()
        case mi.BoolType():
            return st.booleans()
        case mi.IntType():
            return _integers(info)
        case mi.FloatType():
            return _floats(info)
        case mi.StrType():
            return _strings(info)
        case mi.BytesType() | mi.ByteArrayType() | mi.MemoryViewType():
            return st.binary(min_size=info.min_length or 0, max_size=info.max_length)
        case mi.DateTimeType():
            zones = {True: st.just(dt.UTC), False: st.none(), None: st.none() | st.just(dt.UTC)}
            return st.datetimes(timezones=zones[info.tz])
        case mi.DateType():
            return st.dates()
        case mi.TimeType():
            zones = {True: st.just(dt.UTC), False: st.none(), None: st.none() | st.just(dt.UTC)}
            return st.times(timezones=zones[info.tz])
        case mi.TimeDeltaType():
            return st.timedeltas()
        case mi.UUIDType():
            return st.uuids()
        case mi.DecimalType():
            return st.decimals(allow_nan=False, allow_infinity=False)
        case mi.LiteralType():
            return st.sampled_from(info.values)
        case mi.EnumType():
            return st.sampled_from(info.cls)
        case mi.ListType() | mi.VarTupleType() | mi.SetType() | mi.FrozenSetType():
            return _collection(info, _valid(info.item_type))
        case mi.TupleType():
            return st.tuples(*(_valid(item) for item in info.item_types))
        case mi.DictType():
            return st.dictionaries(
                _valid(info.key_type),
                _valid(info.value_type),
                min_size=info.min_length or 0,
                max_size=info.max_length,
            )
        case mi.UnionType():
            return st.one_of(*(_valid(member) for member in info.types))
        case mi.StructType():
            cls = info.cls
            return st.deferred(lambda: _struct(cls, {}))  # deferred: structs may nest
        case _:
            raise TypeError(
                f"Cannot derive a strategy for {info!r}; pass one for this field by name"
            )


def _integers(info: mi.IntType) -> SearchStrategy[int]:
    low = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else None)
    high = info.le if info.le is not None else (info.lt - 1 if info.lt is not None else None)
    # unbounded ints are kept to 64 bits, what the stores' JSON and SQL columns round-trip
    low = _INT64[0] if low is None else low
    high = _INT64[1] if high is None else high
    step = info.multiple_of
    if step:
        return st.integers(-(-low // step), high // step).map(lambda k: k * step)
    return st.integers(low, high)


def _floats(info: mi.FloatType) -> SearchStrategy[float]:
    low = info.ge if info.ge is not None else info.gt
    high = info.le if info.le is not None else info.lt
    values = st.floats(
        min_value=low,
        max_value=high,
        exclude_min=info.gt is not None and info.ge is None,
        exclude_max=info.lt is not None and info.le is None,
        allow_nan=False,
        allow_infinity=False,
    )
    step = info.multiple_of
    if step:
        return values.map(lambda x: math.floor(x / step) * step).filter(
            lambda x: (low is None or x >= low) and (high is None or x <= high)
        )
    return values


def _text(**sizes: Any) -> SearchStrategy[str]:
    # no NUL: no store keeps one (docs/storable.md), so validate_command refuses it
    return st.text(st.characters(codec="utf-8", exclude_characters="\x00"), **sizes)


def _strings(info: mi.StrType) -> SearchStrategy[str]:
    low, high = info.min_length or 0, info.max_length
    if info.pattern is None:
        return _text(min_size=low, max_size=high)
    # msgspec matches patterns with re.search, which is what from_regex generates for
    return st.from_regex(info.pattern).filter(
        lambda s: len(s) >= low and (high is None or len(s) <= high)
    )


def _collection(
    info: mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType,
    items: SearchStrategy[Any],
) -> SearchStrategy[Any]:
    low, high = info.min_length or 0, info.max_length
    if isinstance(info, mi.SetType | mi.FrozenSetType):
        made = st.sets(items, min_size=low, max_size=high)
        return made.map(frozenset) if isinstance(info, mi.FrozenSetType) else made
    made_list = st.lists(items, min_size=low, max_size=high)
    return made_list.map(tuple) if isinstance(info, mi.VarTupleType) else made_list


# values of every JSON kind; those a field's type refuses are wrong-typed values for it
_KINDS: tuple[Any, ...] = (None, True, 0, 1.5, "text", [], {})


def _breakers(struct_type: type[Any]) -> dict[str, SearchStrategy[Any]]:
    """For each field that can be made invalid, a strategy of values msgspec refuses."""
    hints = typing.get_type_hints(struct_type, include_extras=True)
    info = mi.type_info(struct_type)
    assert isinstance(info, mi.StructType)
    found: dict[str, SearchStrategy[Any]] = {}
    for field in info.fields:
        wrong = [value for value in _KINDS if not _accepts(hints[field.name], value)]
        options = [st.sampled_from(wrong)] if wrong else []
        violation = _violations(field.type)
        if violation is not None:
            options.insert(0, violation)  # constraint violations first: they shrink better
        if options:
            found[field.name] = st.one_of(*options)
    return found


def _accepts(annotation: Any, value: Any) -> bool:
    try:
        msgspec.convert(value, annotation)
    except msgspec.ValidationError:
        return False
    return True


def _violations(info: mi.Type) -> SearchStrategy[Any] | None:
    """Values of the right type that break the field's constraints, if it has any."""
    options: list[SearchStrategy[Any]] = []
    match info:
        case mi.Metadata():
            return _violations(info.type)
        case mi.IntType() | mi.FloatType():
            numbers: Callable[..., SearchStrategy[Any]] = (
                st.integers
                if isinstance(info, mi.IntType)
                else lambda **kw: st.floats(allow_nan=False, allow_infinity=False, **kw)
            )
            if info.gt is not None:
                options.append(numbers(max_value=info.gt))
            if info.ge is not None:
                options.append(numbers(max_value=info.ge - 1))
            if info.lt is not None:
                options.append(numbers(min_value=info.lt))
            if info.le is not None:
                options.append(numbers(min_value=info.le + 1))
            if info.multiple_of:
                step = info.multiple_of
                options.append(numbers(min_value=-1000, max_value=1000).filter(lambda x: x % step))
        case mi.StrType():
            options += _length_violations(info, _text)
            if info.pattern is not None:
                pattern = re.compile(info.pattern)
                options.append(_text().filter(lambda s: pattern.search(s) is None))
        case mi.ListType():
            options += _length_violations(info, lambda **kw: st.lists(_valid(info.item_type), **kw))
        case mi.BytesType():
            options += _length_violations(info, st.binary)
        case mi.DictType():
            keys, values = _valid(info.key_type), _valid(info.value_type)
            options += _length_violations(info, lambda **kw: st.dictionaries(keys, values, **kw))
    return st.one_of(*options) if options else None


def _length_violations(
    info: mi.StrType | mi.ListType | mi.BytesType | mi.DictType,
    sized: Callable[..., SearchStrategy[Any]],
) -> list[SearchStrategy[Any]]:
    options = []
    if info.min_length:
        options.append(sized(max_size=info.min_length - 1))
    if info.max_length is not None:
        options.append(sized(min_size=info.max_length + 1, max_size=info.max_length + 8))
    return options


def _broken(
    command_type: type[Any], field: str, breaker: SearchStrategy[Any], fields: Fields
) -> SearchStrategy[Any]:
    others = {name: value for name, value in fields.items() if name != field}
    valid = _struct(command_type, others)
    return st.tuples(valid, breaker).map(
        lambda pair: msgspec.structs.replace(pair[0], **{field: pair[1]})
    )


def _fails_validation(command: Command) -> bool:
    try:
        validate_command(command)
    except InvalidCommand:
        return True
    return False


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
      (an execute function that reads the clock or draws randomness fails this).

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
    _require_hypothesis("aggregate_machine")
    if commands is None:
        _check_streams(aggregate, streams)
    chosen: SearchStrategy[Any] = (
        commands
        if commands is not None
        else _derive_commands(aggregate, aggregate_id=st.sampled_from(list(streams)))
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
            tally["commands"] += 1
            try:
                validate_command(command)
            except InvalidCommand as error:
                tally["invalid"] += 1
                tally["at aggregate_id"] += error.field == "aggregate_id"
                return
            key: str = command.aggregate_id  # type: ignore[attr-defined]
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


def _unchanged(state: Any, before: Any, doing: str) -> None:
    # a state changed in place corrupts every state that shares it (the initial one too)
    assert state == before, (
        f"{doing} changed its input state in place:\n  before {before!r}\n  after  {state!r}"
    )


_derive_commands = commands  # aggregate_machine's parameter of that name hides the function


def _name(function: Callable[..., Any], number: int) -> str:
    name = getattr(function, "__name__", "<lambda>")
    return f"#{number}" if name == "<lambda>" else name


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^0-9A-Za-z]+", name))
