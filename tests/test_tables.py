"""Projection tables follow one spec on every store: how they are named, which names are
refused, and that one table never holds two classes' rows."""

from __future__ import annotations

import types
from typing import Any

import pytest

import incident
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.tables import RESERVED_NAMES, snake_case
from incident.testing.contract.projection_store import Reading, account_row


def projection_class(
    name: str, module: str, table_name: str | None = None, **fields: Any
) -> type[incident.Projection]:
    """A Projection class as if defined at the top of ``module``."""
    annotations: dict[str, Any] = {"aggregate_id": str, "total": int}
    namespace: dict[str, Any] = {"__module__": module, "total": 0}
    for field, default in fields.items():
        annotations[field] = type(default)
        namespace[field] = default
    if table_name is not None:
        namespace["table_name"] = table_name
    namespace["__annotations__"] = annotations
    cls = types.new_class(name, (incident.Projection,), {}, lambda ns: ns.update(namespace))
    return cls


def camel_case(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))


def test_same_named_classes_from_two_modules_are_refused_at_once(store_url: str) -> None:
    """The second of two same-named classes from different modules is refused on its
    first use, read or write, with both module paths named and table_name suggested;
    nothing of it is written, not even the events of an append that projects it."""
    shop = projection_class("Ledger", "shop.read_models")
    billing = projection_class("Ledger", "billing.read_models")
    event_store = incident.open_event_store(store_url)
    projections = event_store.projections()
    projections.project(shop(aggregate_id="a", total=1))
    expected = (
        r"billing\.read_models\.Ledger and shop\.read_models\.Ledger would both be stored "
        r"in table 'ledger'; give one a table_name"
    )
    with pytest.raises(incident.IncidentError, match=expected):
        projections.get(billing, "a")
    with pytest.raises(incident.IncidentError, match=expected):
        projections.project(billing(aggregate_id="b", total=2))
    with pytest.raises(incident.IncidentError, match=expected):
        event_store.append_and_project(
            "acc-1",
            [MoneyDeposited(amount=5)],
            expected_version=0,
            aggregate="bank_account",
            metadata=None,
            projection_store=projections,
            project=lambda recorded: [billing(aggregate_id="c", total=3)],
        )
    assert list(event_store.read_all()) == []
    assert projections.all(shop) == [shop(aggregate_id="a", total=1)]
    event_store.close()


def test_a_declared_table_name_is_the_table(store_url: str) -> None:
    """A class's table_name is its table on every store: another class whose own name
    leads to that table is refused, and the declaring class's snake_case name is free."""
    renamed = projection_class("Ledger", "shop.read_models", table_name="shop_ledgers")
    clashing = projection_class("ShopLedgers", "billing.read_models")
    free = projection_class("Ledger", "billing.read_models")
    projections = incident.open_projection_store(store_url)
    projections.project(renamed(aggregate_id="a", total=1))
    with pytest.raises(incident.IncidentError, match="both be stored in table 'shop_ledgers'"):
        projections.project(clashing(aggregate_id="b"))
    projections.project(free(aggregate_id="c", total=3))
    assert projections.all(renamed) == [renamed(aggregate_id="a", total=1)]
    assert projections.all(free) == [free(aggregate_id="c", total=3)]
    projections.close()


def test_replaying_one_type_leaves_a_same_named_types_rows(store_url: str) -> None:
    """Two same-named classes given their own table_names keep their own rows, and a
    replay (replace_all) of one never deletes the other's."""
    shop = projection_class("Ledger", "shop.read_models", table_name="shop_ledger")
    billing = projection_class("Ledger", "billing.read_models", table_name="billing_ledger")
    projections = incident.open_projection_store(store_url)
    projections.project(shop(aggregate_id="a", total=1))
    projections.project(billing(aggregate_id="a", total=100))
    projections.project(billing(aggregate_id="b", total=200))
    assert projections.replace_all(shop, [shop(aggregate_id="z", total=9)]) == 1
    assert projections.all(shop) == [shop(aggregate_id="z", total=9)]
    assert projections.all(billing) == [
        billing(aggregate_id="a", total=100),
        billing(aggregate_id="b", total=200),
    ]
    assert projections.replace_all(billing, []) == 0
    assert projections.all(billing) == []
    assert projections.get(shop, "z") == shop(aggregate_id="z", total=9)
    projections.close()


def test_every_reserved_name_is_refused(store_url: str) -> None:
    """No projection may be stored in a table, index or function incident keeps for
    itself (the names of every backend, on every backend), whether its class name leads
    there or its table_name says so; the event store is untouched."""
    event_store = incident.open_event_store(store_url)
    event_store.append("acc-1", [MoneyDeposited(amount=5)], expected_version=0)
    projections = event_store.projections()
    for name in sorted(RESERVED_NAMES):
        by_class_name = projection_class(camel_case(name), "shop.read_models")
        assert snake_case(by_class_name.__name__) == name
        declared = projection_class("Ledger", "shop.read_models", table_name=name)
        for cls in (by_class_name, declared):
            with pytest.raises(incident.IncidentError, match=f"'{name}', which incident keeps"):
                projections.project(cls(aggregate_id="x"))
            with pytest.raises(incident.IncidentError, match="which incident keeps"):
                projections.all(cls)
    assert [r.data for r in event_store.read_all()] == [MoneyDeposited(amount=5)]
    event_store.close()


def test_the_reserved_names_cover_every_backends_own_tables() -> None:
    """The reserved names include every table and function the SQLite and Postgres
    stores create for themselves."""
    sqlite = {"events", "incident_schema", "incident_idempotency", "incident_owed"}
    postgres = {"events", "incident_migrations", "idempotency_keys", "incident_owed"}
    subscriptions = {"incident_checkpoints", "incident_parked"}
    assert sqlite | postgres | subscriptions | {"begin_append"} <= RESERVED_NAMES


@pytest.mark.parametrize(
    ("table_name", "why"),
    [
        ("Ledgers", "not a plain SQL identifier"),
        ("shop-ledgers", "not a plain SQL identifier"),
        ('ledgers"; DROP TABLE events; --', "not a plain SQL identifier"),
        ("2ledgers", "not a plain SQL identifier"),
        ("l" * 64, "longer than 63 characters"),
        ("incident_ledgers", "which incident keeps for itself"),
        ("sqlite_ledgers", "which incident keeps for itself"),
        ("pg_ledgers", "which incident keeps for itself"),
    ],
)
def test_a_table_name_that_is_not_a_plain_identifier_is_refused(
    store_url: str, table_name: str, why: str
) -> None:
    """A declared table_name must be lower-case letters, digits and underscores, at most
    63 characters, and not in incident's or the database engines' own prefixes."""
    cls = projection_class("Ledger", "shop.read_models", table_name=table_name)
    projections = incident.open_projection_store(store_url)
    with pytest.raises(incident.IncidentError, match=why):
        projections.project(cls(aggregate_id="x"))
    projections.close()


def test_a_class_name_that_leads_to_an_incident_prefix_keeps_its_table(store_url: str) -> None:
    """The incident_ prefix binds declared names only: a class such as IncidentReport
    keeps the table its name gives it."""
    cls = projection_class("IncidentReport", "desk.read_models")
    projections = incident.open_projection_store(store_url)
    projections.project(cls(aggregate_id="x", total=1))
    assert projections.all(cls) == [cls(aggregate_id="x", total=1)]
    projections.close()


def test_a_class_redefined_in_its_module_takes_its_table_over(store_url: str) -> None:
    """A class defined again under the same module and name (a notebook cell run twice)
    is the same read model: it reads the rows written before, its new field defaulted."""
    first = projection_class("Ledger", "__main__")
    second = projection_class("Ledger", "__main__", note="none")
    projections = incident.open_projection_store(store_url)
    projections.project(first(aggregate_id="a", total=1))
    assert projections.get(second, "a") == second(aggregate_id="a", total=1, note="none")
    projections.project(second(aggregate_id="b", total=2, note="two"))
    assert projections.all(second) == [
        second(aggregate_id="a", total=1, note="none"),
        second(aggregate_id="b", total=2, note="two"),
    ]
    projections.close()


def test_replace_all_takes_rows_of_its_type_only(store_url: str) -> None:
    """replace_all(T, rows) refuses a row of another type, writing nothing; of rows of
    one key it keeps the newest, as project would, and counts the rows kept."""
    projections = incident.open_projection_store(store_url)
    try:
        first = projections.project(account_row("A", version=1, balance=10))
        with pytest.raises(incident.IncidentError, match="was given a Reading"):
            projections.replace_all(BankAccount, [Reading(aggregate_id="r")])  # type: ignore[list-item]
        assert projections.all(BankAccount) == [first]
        newest = account_row("B", version=3, balance=30)
        rows = [
            account_row("B", version=2, balance=2),
            newest,
            account_row("B", version=1, balance=1),
        ]
        assert projections.replace_all(BankAccount, rows) == 1
        assert projections.all(BankAccount) == [newest]
    finally:
        projections.close()
