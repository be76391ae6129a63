"""codec: command validation and decoding, event encoding, stored type-name resolution."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, ClassVar

import msgspec
import pytest

import incident
from incident.codec import encode
from incident.examples.bank import DepositMoney

Positive = Annotated[int, msgspec.Meta(gt=0)]


class Deposit(incident.Command):
    aggregate_id: str
    amount: Positive


class Address(msgspec.Struct, frozen=True):
    street: str
    number: Positive


class Move(incident.Command):
    aggregate_id: str
    to: Address
    when: dt.date | None = None


# -- validate_command ----------------------------------------------------------------


def test_a_valid_command_is_returned_unchanged() -> None:
    """validate_command gives back the very command it was given."""
    command = Deposit(aggregate_id="A1", amount=5)
    assert incident.validate_command(command) is command
    moved = Move(aggregate_id="A1", to=Address("Main", 1), when=dt.date(2026, 1, 2))
    assert incident.validate_command(moved) is moved


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (Deposit(aggregate_id="A1", amount="5"), "amount"),  # type: ignore[arg-type]
        (Deposit(aggregate_id="A1", amount=0), "amount"),
        (Deposit(aggregate_id="A1", amount=-1), "amount"),
        (Deposit(aggregate_id="A1", amount=2.5), "amount"),  # type: ignore[arg-type]
        (Deposit(aggregate_id="A1", amount=True), "amount"),
        (Deposit(aggregate_id=None, amount=1), "aggregate_id"),  # type: ignore[arg-type]
        (Move(aggregate_id="A1", to=Address("Main", 0)), "to.number"),
        (Move(aggregate_id="A1", to="Main 1"), "to"),  # type: ignore[arg-type]
    ],
)
def test_a_command_that_breaks_its_own_type_names_the_field(
    command: incident.Command, field: str
) -> None:
    """Wrong types and broken Meta constraints raise InvalidCommand naming the field."""
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.validate_command(command)
    assert caught.value.field == field
    assert caught.value.command_type == type(command).__name__
    assert f"`{field}`" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, incident.IncidentError)


class Booked(incident.Command):
    aggregate_id: str
    on: dt.date
    ref: uuid.UUID
    tags: tuple[str, ...] = ()
    stops: list[Address] = msgspec.field(default_factory=list)
    price: float = 0.0


def booked(**changes: Any) -> Booked:
    valid: dict[str, Any] = {
        "aggregate_id": "B1",
        "on": dt.date(2026, 1, 2),
        "ref": uuid.UUID(int=1),
        "tags": ("a",),
        "stops": [Address("Main", 1)],
    }
    return Booked(**{**valid, **changes})


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"on": "2026-01-02"}, "on", "Expected `date`, got `str`"),
        ({"ref": str(uuid.UUID(int=1))}, "ref", "Expected `UUID`, got `str`"),
        ({"tags": ["a"]}, "tags", "Expected `tuple`, got `list`"),
        ({"stops": [Address("Main", 1), Address("Side", "2")]}, "stops[1].number", None),
    ],
)
def test_values_that_only_look_right_as_json_are_refused(
    changes: dict[str, Any], field: str, problem: str | None
) -> None:
    """A str where a date or UUID belongs (or a list for a tuple) is still the wrong type,
    even though its JSON spelling would convert: InvalidCommand names the field."""
    assert incident.validate_command(booked()) == booked()
    assert incident.validate_command(booked(price=1)).price == 1  # an int is a fine float
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.validate_command(booked(**changes))
    assert caught.value.field == field
    if problem is not None:
        assert caught.value.problem == problem


class Loose(incident.Command):
    aggregate_id: str
    payload: Any = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


@pytest.mark.parametrize(
    "payload",
    [(1, 2), {1, 2}, dt.date(2026, 1, 2), uuid.UUID(int=3), {"when": dt.date(2026, 1, 1)}],
)
def test_loosely_typed_fields_accept_any_representable_value(payload: Any) -> None:
    """Fields declared Any or dict[str, Any] take tuples, sets, dates as they are."""
    command = Loose(aggregate_id="L1", payload=payload, extra={"x": payload})
    assert incident.validate_command(command) is command


def test_a_value_that_cannot_be_encoded_is_an_invalid_command() -> None:
    """A field holding an arbitrary object is InvalidCommand naming it, not a bare TypeError."""
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.validate_command(Deposit(aggregate_id="A1", amount=object()))  # type: ignore[arg-type]
    assert caught.value.field == "amount"


def test_something_that_is_not_a_command_is_refused() -> None:
    """validate_command only accepts incident.Command instances."""
    with pytest.raises(incident.InvalidCommand, match=r"not an incident\.Command"):
        incident.validate_command({"aggregate_id": "A1"})  # type: ignore[type-var]


# -- decode_command ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    ['{"aggregate_id": "A1", "amount": 5}', b'{"aggregate_id": "A1", "amount": 5}'],
    ids=["str", "bytes"],
)
def test_decode_command_from_json(data: str | bytes) -> None:
    """JSON text or bytes decode into the command type."""
    assert incident.decode_command(Deposit, data) == Deposit(aggregate_id="A1", amount=5)


def test_decode_command_from_a_dict() -> None:
    """A mapping (a web form, a queue message) decodes too, nested structs included."""
    assert incident.decode_command(Deposit, {"aggregate_id": "A1", "amount": 5}) == Deposit(
        aggregate_id="A1", amount=5
    )
    moved = incident.decode_command(
        Move, {"aggregate_id": "A1", "to": {"street": "Main", "number": 3}, "when": "2026-01-02"}
    )
    assert moved == Move(aggregate_id="A1", to=Address("Main", 3), when=dt.date(2026, 1, 2))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"aggregate_id": "A1"}, "amount"),
        ('{"aggregate_id": "A1"}', "amount"),
        ({}, "aggregate_id"),
        ({"aggregate_id": "A1", "amount": "5"}, "amount"),
        ('{"aggregate_id": "A1", "amount": 0}', "amount"),
        ({"aggregate_id": 7, "amount": 5}, "aggregate_id"),
    ],
)
def test_decode_command_names_the_missing_or_wrong_field(data: Any, field: str) -> None:
    """A missing field, a wrong type or a broken constraint: InvalidCommand with .field."""
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.decode_command(Deposit, data)
    assert caught.value.field == field
    assert caught.value.command_type == "Deposit"


def test_decode_command_names_a_missing_nested_field() -> None:
    """Missing fields inside nested structs are named by their dotted path."""
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.decode_command(Move, {"aggregate_id": "A1", "to": {"street": "Main"}})
    assert caught.value.field == "to.number"
    assert "missing required field" in caught.value.problem


@pytest.mark.parametrize("data", ['{"aggregate_id": "A1",', "not json", b"\xff"])
def test_decode_command_bad_json_is_an_invalid_command(data: str | bytes) -> None:
    """Text that is not JSON raises InvalidCommand (no field), not a msgspec error."""
    with pytest.raises(incident.InvalidCommand, match="not valid JSON") as caught:
        incident.decode_command(Deposit, data)
    assert caught.value.field is None


def test_decode_command_json_that_is_not_an_object() -> None:
    """A JSON array where an object is expected is InvalidCommand."""
    with pytest.raises(incident.InvalidCommand, match="Deposit"):
        incident.decode_command(Deposit, "[1, 2]")


# -- encode --------------------------------------------------------------------------


class Stored(incident.Event):
    n: int
    note: str = ""


def test_encode_writes_the_stable_type_name() -> None:
    """Events encode to JSON carrying their type name as the tag."""
    assert msgspec.json.decode(encode(Stored(n=1))) == {"type": "Stored", "n": 1, "note": ""}


def test_encode_refuses_what_json_cannot_hold() -> None:
    """Unencodable values raise IncidentError, never fall back to pickle."""
    with pytest.raises(incident.IncidentError, match="Cannot store"):
        encode({"when": object()})


# -- EventTypes ----------------------------------------------------------------------


class Renamed(incident.Event, tag="LegacyName"):
    n: int


def test_resolution_uses_the_explicit_tag() -> None:
    """A class with tag=... is found under that tag, not under its class name."""
    types = incident.EventTypes()
    assert types.resolve("LegacyName") is Renamed
    assert types.decode("LegacyName", b'{"n": 3}') == Renamed(n=3)


class Contested(incident.Event):
    n: int


def test_registered_types_win_over_defined_ones() -> None:
    """A type registered under a name beats any other class defined with that name."""

    class Shadow(incident.Event, tag="Contested"):
        n: int
        shadow: bool = True

    types = incident.EventTypes([Contested])
    assert types.resolve("Contested") is Contested
    assert type(types.decode("Contested", b'{"type": "Contested", "n": 1}')) is Contested
    assert incident.EventTypes().resolve("Contested") is Shadow  # unregistered: latest wins
    with pytest.raises(incident.RegistrationError, match=r"Shadow and test_codec\.Contested"):
        types.register(Shadow)  # another class under a registered name: refused at once
    assert types.resolve("Contested") is Contested


def test_a_class_defined_again_takes_over_its_name() -> None:
    """The same module and qualified name defined again (a notebook cell run twice)
    replaces the registered class rather than clashing with it."""

    def define() -> type[incident.Event]:
        class Rerun(incident.Event):
            n: int

        return Rerun

    first, second = define(), define()
    types = incident.EventTypes([first])
    types.register(second)
    assert types.resolve("Rerun") is second


def test_the_latest_defined_class_is_the_fallback() -> None:
    """Without registration, the class defined last under a name wins (notebook redefinition)."""

    def define() -> type[incident.Event]:
        class Noted(incident.Event):
            text: str

        return Noted

    first = define()
    types = incident.EventTypes()
    assert type(types.decode("Noted", b'{"text": "a"}')) is first
    second = define()
    assert types.resolve("Noted") is second
    assert type(types.decode("Noted", b'{"text": "a"}')) is second


def test_an_unknown_event_type_lists_the_registered_names() -> None:
    """UnknownEventType names the type, the position, and what is registered."""
    types = incident.EventTypes([Stored, Renamed])
    with pytest.raises(incident.UnknownEventType) as caught:
        types.decode("NoSuchEvent", b"{}", position=12, aggregate_id="A1")
    error = caught.value
    assert error.event_type == "NoSuchEvent"
    assert error.position == 12
    assert {"Stored", "LegacyName"} <= set(error.registered)
    assert "NoSuchEvent" in str(error) and "position 12" in str(error)
    assert "LegacyName" in str(error)
    assert isinstance(error, LookupError)


@pytest.mark.parametrize(
    "payload",
    [b'{"n": "three"}', b'{"note": "no n"}', b'{"n": 1', b"[]", b'{"type": "Other", "n": 1}'],
    ids=["wrong-type", "missing-field", "truncated", "not-an-object", "wrong-tag"],
)
def test_a_corrupt_payload_names_its_position_and_aggregate(payload: bytes) -> None:
    """CorruptEvent says where the bad event lives, and chains the decoder's error."""
    types = incident.EventTypes([Stored])
    with pytest.raises(incident.CorruptEvent) as caught:
        types.decode("Stored", payload, position=42, aggregate_id="ACC9")
    error = caught.value
    assert (error.position, error.aggregate_id) == (42, "ACC9")
    assert "position 42" in str(error) and "'ACC9'" in str(error)
    assert isinstance(error.__cause__, msgspec.MsgspecError)


def test_encode_then_decode_round_trips() -> None:
    """What encode writes, EventTypes reads back equal."""
    event = Stored(n=5, note="five")
    assert incident.EventTypes([Stored]).decode("Stored", encode(event)) == event


class Priced(incident.Event):
    schema_version: ClassVar[int] = 2
    amount: int
    currency: str


def test_an_upcaster_that_fails_on_a_payload_is_a_corrupt_event() -> None:
    """A stored payload an upcaster cannot handle is reported as a CorruptEvent naming the
    position, the aggregate and the upcaster, with the upcaster's error chained."""
    types = incident.EventTypes([Priced])

    def add_currency(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "currency": payload["unit"]}  # KeyError on payloads without a unit

    types.register_upcaster("Priced", 1, add_currency)
    upcast = types.decode("Priced", b'{"amount": 5, "unit": "EUR"}', schema_version=1)
    assert upcast == Priced(amount=5, currency="EUR")
    with pytest.raises(incident.CorruptEvent) as caught:
        types.decode("Priced", b'{"amount": 5}', position=3, aggregate_id="A1", schema_version=1)
    error = caught.value
    assert (error.position, error.aggregate_id) == (3, "A1")
    assert "add_currency" in str(error) and "schema version 1 to 2" in str(error)
    assert isinstance(error.__cause__, KeyError)


def test_a_class_whose_module_is_gone_does_not_shadow_a_live_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A README example or a finished test defining its own MoneyDeposited must not change
    how an unregistered store reads the Bank's MoneyDeposited afterwards."""
    import sys
    import types as pytypes

    from incident.examples.bank import MoneyDeposited

    module = pytypes.ModuleType("gone_example")
    monkeypatch.setitem(sys.modules, "gone_example", module)
    exec(
        "import incident\nclass MoneyDeposited(incident.Event):\n    cents: int = 0\n",
        module.__dict__,
    )
    assert incident.EventTypes().resolve("MoneyDeposited") is module.MoneyDeposited
    monkeypatch.delitem(sys.modules, "gone_example")
    assert incident.EventTypes().resolve("MoneyDeposited") is MoneyDeposited


class Unkept(incident.Command):
    aggregate_id: str
    ratio: float = 0.0
    extra: Any = None


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "command, field",
    [
        (Unkept(aggregate_id="a", ratio=float("nan")), "ratio"),
        (Unkept(aggregate_id="a", extra={"x": float("inf")}), "extra['x']"),
        (Unkept(aggregate_id="a\udc80"), "aggregate_id"),
        (Unkept(aggregate_id="a", extra="\x00"), "extra"),
        (Unkept(aggregate_id="a", extra=_deep(10_000)), None),
        # no float, no nesting: nothing in the type itself invites a closer look
        (DepositMoney(aggregate_id="\ud800", amount=1), "aggregate_id"),
    ],
    ids=["nan", "inf", "surrogate", "nul", "deep", "surrogate-flat"],
)
def test_a_command_no_store_could_keep_is_invalid(
    command: incident.Command, field: str | None
) -> None:
    """Non-finite floats, lone surrogates, NUL and nesting past 64 levels in a command are
    InvalidCommand naming the field, not a UnicodeEncodeError or RecursionError."""
    with pytest.raises(incident.InvalidCommand) as caught:
        incident.validate_command(command)
    assert field is None or caught.value.field == field
    assert len(str(caught.value)) < 300
