"""Hypothesis strategies derived from message types: commands that pass validation,
commands that fail it, and events."""

from __future__ import annotations

import datetime as dt
import functools
import importlib.util
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import msgspec.inspect as mi

from ..aggregate import Aggregate
from ..codec import validate_command
from ..errors import InvalidCommand
from ..messages import Command, Event
from ..storable import keepable_id

__all__ = ["HAVE_HYPOTHESIS", "commands", "events", "invalid_commands", "require_hypothesis"]
# Specs need nothing more; strategies and the machine need hypothesis (incident[testing]).
HAVE_HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None
if TYPE_CHECKING or HAVE_HYPOTHESIS:
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy


def require_hypothesis(what: str) -> None:
    if not HAVE_HYPOTHESIS:
        raise ImportError(
            f"incident.testing.{what} needs hypothesis: pip install 'incident[testing]'"
        )


_INT64 = (-(2**63), 2**63 - 1)


# -- strategies ---------------------------------------------------------------------------

Fields = Mapping[str, Any]  # field name -> a strategy, or a plain value to always use


def commands(*sources: Aggregate[Any] | type[Command], **fields: Any) -> SearchStrategy[Any]:
    """Commands that pass :func:`incident.validate_command`, derived from their types,
    with an ``aggregate_id`` every store keeps (so a dispatch does not refuse it).

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
    require_hypothesis("commands")
    types = _types(sources, Command, lambda aggregate: aggregate.command_types)
    _check_fields(types, fields)
    return st.one_of(*(_struct(t, fields) for t in types))


def events(*sources: Aggregate[Any] | type[Event], **fields: Any) -> SearchStrategy[Any]:
    """Events derived from their types: every event an aggregate applies, or the types
    given; keywords override fields as in :func:`commands`."""
    require_hypothesis("events")
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
    require_hypothesis("invalid_commands")
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
    if issubclass(struct_type, Command) and "aggregate_id" in drawn.keys() - fields.keys():
        # validate_command takes "" or 300 characters for a bare str; no store keeps them
        drawn["aggregate_id"] = drawn["aggregate_id"].filter(_keepable)
    return st.builds(struct_type, **drawn)


def _keepable(value: object) -> bool:
    return isinstance(value, str) and keepable_id(value)


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
            return _nested(info.cls)
        case _:
            raise TypeError(
                f"Cannot derive a strategy for {info!r}; pass one for this field by name"
            )


@functools.cache
def _nested(cls: type[Any]) -> SearchStrategy[Any]:
    # deferred, and one strategy a type: a struct that nests itself then refers to the
    # strategy being built rather than deriving a new one without end
    return st.deferred(lambda: _struct(cls, {}))


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
    if not step:
        return values
    # k * step for whole k in the bounds (kept finite), and for k a power of two, which
    # msgspec's check (the remainder of x / step is 0) accepts for any step: of k * 0.1,
    # only powers of two pass it (3 * 0.1 is 0.30000000000000004)
    span = float(2**60)
    low_k = -(2**60) if low is None else math.ceil(max(min(low / step, span), -span))
    high_k = 2**60 if high is None else math.floor(max(min(high / step, span), -span))
    powers = st.tuples(st.sampled_from((1, -1)), st.integers(0, 60)).map(lambda p: p[0] * 2 ** p[1])
    declared = Annotated[
        float, msgspec.Meta(ge=info.ge, gt=info.gt, le=info.le, lt=info.lt, multiple_of=step)
    ]
    return (
        (st.integers(low_k, high_k) | powers | st.just(0))
        .map(lambda k: float(k) * step)
        .filter(lambda x: math.isfinite(x) and _accepts(declared, x))
    )


def _text(**sizes: Any) -> SearchStrategy[str]:
    return st.text(_characters(), **sizes)


def _characters() -> SearchStrategy[str]:
    # no NUL nor lone surrogate: no store keeps one (docs/storable.md), so
    # validate_command refuses them
    return st.characters(codec="utf-8", exclude_characters="\x00")


def _strings(info: mi.StrType) -> SearchStrategy[str]:
    low, high = info.min_length or 0, info.max_length
    if info.pattern is None:
        return _text(min_size=low, max_size=high)
    # msgspec matches patterns with re.search, which is what from_regex generates for
    return st.from_regex(info.pattern, alphabet=_characters()).filter(
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
