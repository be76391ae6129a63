"""Event evolution: upcasters bring old stored payloads to the current shape; terminal
aggregates refuse commands."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
import pytest
from conftest import DURABLE_BACKENDS, on_backends

import incident


class Opened(incident.Event, tag="evolution.Opened"):
    """Version 3: v1 had `owner` only, v2 added `currency`, v3 renamed `owner` to `holder`."""

    schema_version: ClassVar[int] = 3
    holder: str
    currency: str = "EUR"


class Open(incident.Command):
    aggregate_id: str
    holder: str


class Close(incident.Command):
    aggregate_id: str


class Closed(incident.Event, tag="evolution.Closed"):
    pass


class State(msgspec.Struct, frozen=True):
    holder: str | None = None
    closed: bool = False


account = incident.Aggregate("evolution_account", initial=State())


@account.execute
def open_(state: State, cmd: Open) -> Opened:
    return Opened(holder=cmd.holder)


@account.execute
def close(state: State, cmd: Close) -> Closed:
    return Closed()


@account.apply
def opened(state: State, event: Opened) -> State:
    return State(holder=event.holder)


@account.apply
def closed(state: State, event: Closed) -> State:
    return msgspec.structs.replace(state, closed=True)


@account.upcast("evolution.Opened", 1)
def add_currency(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "currency": "GBP"}


@account.upcast(Opened, 2)
def rename_owner(payload: dict[str, Any]) -> dict[str, Any]:
    payload = dict(payload)
    payload["holder"] = payload.pop("owner")
    return payload


@account.terminal
def is_closed(state: State) -> bool:
    return state.closed


def types() -> incident.EventTypes:
    registry = incident.EventTypes(account.event_types)
    for (name, version), upcaster in account.upcasters.items():
        registry.register_upcaster(name, version, upcaster)
    return registry


def test_a_version_1_payload_is_upcast_through_the_chain() -> None:
    stored = b'{"type": "evolution.Opened", "owner": "ann"}'
    event = types().decode("evolution.Opened", stored, schema_version=1)
    assert event == Opened(holder="ann", currency="GBP")


def test_a_version_2_payload_takes_only_the_last_step() -> None:
    stored = b'{"type": "evolution.Opened", "owner": "bob", "currency": "USD"}'
    assert types().decode("evolution.Opened", stored, schema_version=2) == Opened(
        holder="bob", currency="USD"
    )


def test_a_current_payload_is_decoded_directly() -> None:
    stored = msgspec.json.encode(Opened(holder="cy"))
    assert types().decode("evolution.Opened", stored, schema_version=3) == Opened(holder="cy")


def test_a_missing_upcaster_is_a_corrupt_event_that_says_what_to_register() -> None:
    registry = incident.EventTypes([Opened])
    with pytest.raises(incident.CorruptEvent, match=r"upcast\('evolution.Opened', 1\)") as caught:
        registry.decode("evolution.Opened", b'{"owner": "x"}', schema_version=1, position=7)
    assert caught.value.position == 7


def test_a_payload_newer_than_the_code_is_refused() -> None:
    with pytest.raises(incident.CorruptEvent, match="newer"):
        types().decode("evolution.Opened", b'{"holder": "x"}', schema_version=4)


def test_registering_an_upcaster_twice_names_both() -> None:
    with pytest.raises(incident.RegistrationError, match="add_currency"):

        @account.upcast("evolution.Opened", 1)
        def again(payload: dict[str, Any]) -> dict[str, Any]:
            return payload


def test_renamed_class_keeps_its_stored_type_name() -> None:
    assert incident.event_type_name(Opened) == "evolution.Opened"
    assert msgspec.json.decode(msgspec.json.encode(Opened(holder="a")))["type"] == (
        "evolution.Opened"
    )


def test_commands_to_a_terminated_aggregate_are_rejected() -> None:
    handler = incident.CommandHandler("memory://", aggregates=[account])
    handler.dispatch(Open(aggregate_id="A", holder="ann"))
    handler.dispatch(Close(aggregate_id="A"))
    with pytest.raises(incident.Rejected) as caught:
        handler.dispatch(Open(aggregate_id="A", holder="bob"))
    assert caught.value.reason == "aggregate_terminated"
    assert "evolution_account A" in str(caught.value)
    assert handler.event_store.version("A") == 2


def test_command_handler_registers_the_upcasters_with_its_store() -> None:
    handler = incident.CommandHandler("memory://", aggregates=[account])
    decoded = handler.event_store.types.decode(
        "evolution.Opened", b'{"owner": "dee"}', schema_version=1
    )
    assert decoded == Opened(holder="dee", currency="GBP")


@on_backends(DURABLE_BACKENDS)  # the memory store keeps Python objects: nothing old
def test_a_database_written_by_old_code_is_read_by_new_code(store_url: str) -> None:
    """Events stored at schema version 1 come back in today's shape through the upcasters."""

    class OldOpened(incident.Event, tag="evolution.Opened"):  # what release 1 wrote
        owner: str

    old = incident.open_event_store(store_url)
    old.append("A", [OldOpened(owner="ann")], expected_version=0, aggregate=account.name)
    old.close()

    handler = incident.CommandHandler(store_url, aggregates=[account])
    assert [r.data for r in handler.event_store.get("A")] == [Opened(holder="ann", currency="GBP")]
    assert handler.state(account, "A") == State(holder="ann")
    handler.dispatch(Close(aggregate_id="A"))
    assert [r.version for r in handler.event_store.read_all()] == [1, 2]
    handler.event_store.close()
