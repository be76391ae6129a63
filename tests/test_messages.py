"""Messages: frozen keyword-only structs, stable event type names, ANY, Recorded."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import pickle
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import pytest

import incident
from incident.codec import encode


class Open(incident.Command):
    aggregate_id: str


class Opened(incident.Event):
    number: str


class Renamed(incident.Event, tag="AccountClosed"):
    pass


class Row(incident.Projection):
    aggregate_id: str
    balance: int = 0


def test_commands_and_events_are_frozen() -> None:
    """Messages are facts and requests: they cannot be changed after construction."""
    with pytest.raises(AttributeError):
        Open(aggregate_id="A").aggregate_id = "B"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        Opened(number="1").number = "2"  # type: ignore[misc]


def test_commands_and_events_are_keyword_only() -> None:
    """Positional construction is refused, so field order never silently matters."""
    with pytest.raises(TypeError):
        Open("A")  # type: ignore[misc]
    with pytest.raises(TypeError):
        Opened("1")  # type: ignore[misc]


def test_keyword_only_reaches_grandchildren_and_projections() -> None:
    """Every level of subclassing stays keyword-only, projections included."""

    class Child(Opened):
        extra: int = 0

    with pytest.raises(TypeError):
        Child("1", 2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Row("A")  # type: ignore[misc]
    assert Child(number="1", extra=2).extra == 2


def test_projections_are_mutable_read_models() -> None:
    """A projection is plain data a listener may build step by step."""
    row = Row(aggregate_id="A")
    row.balance = 5
    assert row == Row(aggregate_id="A", balance=5)


def test_messages_pickle_by_reference() -> None:
    """Messages cross process boundaries (process pools) unchanged."""
    for message in (Open(aggregate_id="A"), Opened(number="1"), Row(aggregate_id="A")):
        assert pickle.loads(pickle.dumps(message)) == message


def test_event_type_names_are_the_class_name_or_the_explicit_tag() -> None:
    """The stored name is the class name unless a tag was given."""
    assert incident.event_type_name(Opened) == "Opened"
    assert incident.event_type_name(Renamed) == "AccountClosed"
    assert msgspec.json.decode(encode(Renamed())) == {"type": "AccountClosed"}


def test_event_type_name_refuses_non_events() -> None:
    """Commands and projections have no stored event name."""
    with pytest.raises(TypeError, match=r"not an incident\.Event"):
        incident.event_type_name(Open)  # type: ignore[arg-type]


def test_a_subclass_of_an_explicitly_tagged_event_needs_its_own_name() -> None:
    """msgspec passes an explicit tag down to subclasses; incident refuses the collision
    instead of reading the parent's stored events back as the child."""

    class Base(incident.Event, tag="Contested2"):
        n: int

    class Child(Base):
        extra: int = 0

    class Named(Base, tag="Named2"):
        pass

    with pytest.raises(incident.RegistrationError, match=r"Child.*'Contested2'.*Base"):
        incident.event_type_name(Child)
    with pytest.raises(incident.RegistrationError):
        incident.EventTypes([Base, Child])
    assert incident.event_type_name(Named) == "Named2"
    assert incident.event_type_name(Base) == "Contested2"


def test_subclasses_of_plainly_named_events_keep_their_own_names() -> None:
    """Without an explicit tag, each subclass is stored under its own class name."""

    class Child(Opened):
        pass

    assert incident.event_type_name(Child) == "Child"


def test_any_is_a_singleton_that_survives_pickling() -> None:
    """ANY compares by identity, so it must stay the same object across a pickle."""
    assert pickle.loads(pickle.dumps(incident.ANY)) is incident.ANY
    assert type(incident.ANY)() is incident.ANY
    assert repr(incident.ANY) == "ANY"


def test_recorded_round_trips_through_json() -> None:
    """The envelope encodes and decodes with its event and metadata intact."""
    recorded = incident.Recorded(
        position=1,
        event_id="e1",
        aggregate_id="A",
        aggregate="account",
        version=1,
        event_type="Opened",
        event_date=dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC),
        data=Opened(number="A"),
        metadata={"correlation_id": "c", "causation_id": None},
    )
    decoded = msgspec.json.decode(encode(recorded), type=incident.Recorded[Opened])
    assert decoded == recorded
    assert incident.Recorded(**{**msgspec.structs.asdict(recorded), "metadata": {}}).metadata == {}


def test_messages_can_be_defined_dynamically() -> None:
    """msgspec.defstruct works with the message bases (generated types, test factories)."""
    dynamic = msgspec.defstruct(
        "Dynamic", [("aggregate_id", str), ("n", int, 3)], bases=(incident.Command,)
    )
    command = dynamic(aggregate_id="A")
    assert (command.aggregate_id, command.n) == ("A", 3)
    assert incident.validate_command(command) is command
    with pytest.raises(AttributeError):
        command.n = 4
    happened = msgspec.defstruct("Happened", [("n", int)], bases=(incident.Event,))
    assert incident.event_type_name(happened) == "Happened"
    assert msgspec.json.decode(encode(happened(n=1))) == {"type": "Happened", "n": 1}


def test_new_uuids_are_random_version_4() -> None:
    from incident.ids import new_uuid

    ids = [new_uuid() for _ in range(2_000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text


def test_threads_never_share_a_uuid() -> None:
    """Ids are drawn 128 at a time; threads taking them at once still get distinct ones."""
    from incident.ids import new_uuid

    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: [new_uuid() for _ in range(3_000)], range(8)))
    ids = [text for batch in batches for text in batch]
    assert len(set(ids)) == len(ids) == 24_000


def _uuids_in_child(results: Any) -> None:
    from incident.ids import new_uuid

    results.put([new_uuid() for _ in range(50)])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork")
def test_a_forked_child_does_not_reuse_its_parents_uuids() -> None:
    """A child forked while the parent holds drawn ids draws its own."""
    from incident.ids import new_uuid

    new_uuid()  # the parent now holds ids drawn but not handed out
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_uuids_in_child, args=(results,))
    child.start()
    in_child = results.get(timeout=60)
    child.join(timeout=60)
    in_parent = [new_uuid() for _ in range(50)]
    assert not set(in_child) & set(in_parent)


class Later(incident.Command):
    """A command that names its target after its other fields."""

    amount: int
    aggregate_id: str


class Positional(incident.Command, kw_only=False):
    amount: int
    aggregate_id: str


def test_every_command_keeps_its_own_field_order() -> None:
    """``Command.aggregate_id`` is declared for type checkers only: the base adds no
    field, so a command's fields stay in the order it declares them (the Bank's, the
    hotel's, one that names its target last, one built positionally), its JSON keeps
    that order, and the idempotency keys of follow-ups stay what earlier releases made."""
    from hotel import guests, reservations, rooms

    from incident.event_handler import command_key
    from incident.examples import bank

    assert incident.Command.__struct_fields__ == ()
    assert bank.DepositMoney.__struct_fields__ == ("aggregate_id", "amount")
    assert bank.RequestTransfer.__struct_fields__[0] == "aggregate_id"
    assert reservations.Reserve.__struct_fields__ == ("aggregate_id", "room", "guest", "nights")
    assert rooms.CloseRoom.__struct_fields__ == ("aggregate_id",)
    assert guests.RenameGuest(aggregate_id="G", name="Ann").aggregate_id == "G"
    assert Later.__struct_fields__ == ("amount", "aggregate_id")
    assert encode(Later(amount=5, aggregate_id="A")) == b'{"amount":5,"aggregate_id":"A"}'
    assert Positional(5, "A") == Positional(amount=5, aggregate_id="A")
    # digests of earlier releases: a follow-up dispatched again finds its first outcome
    assert command_key(bank.DepositMoney(aggregate_id="A", amount=5)) == "9ad1fef193cb1057808d"
    assert command_key(Later(amount=5, aggregate_id="A")) == "d2018b0d47a00a0260b0"


def test_a_command_without_aggregate_id_cannot_be_registered() -> None:
    """The declaration on the base is no runtime field: a command that does not declare
    its own ``aggregate_id`` is refused where it is registered, as before."""

    class Nameless(incident.Command):
        amount: int

    aggregate = incident.Aggregate("nameless", initial=0)
    with pytest.raises(incident.RegistrationError, match="has no aggregate_id field"):

        @aggregate.execute(Nameless)
        def run(state: int, cmd: Any) -> tuple[()]:
            return ()
