"""Postgres-only behaviour: migrations, typed projection tables, lost connections, commit
order, and many OS processes sharing one database. The store contract and the Bank suite
also run on Postgres (see conftest.STORE_BACKENDS)."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from conftest import Admin, kill_backends
from test_tables import projection_class

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount, MoneyDeposited, RequestTransfer, WithdrawMoney
from incident.stores.postgres import PostgresEventStore, migrations, session
from incident.stores.postgres.session import lock_key

pytestmark = pytest.mark.postgres

spawn = multiprocessing.get_context("spawn")


def deposited(*amounts: int) -> list[incident.Event]:
    return [MoneyDeposited(amount=a) for a in amounts]


def open_store(url: str, **options: Any) -> incident.EventStore:
    """A store that decodes the Bank's events as the Bank's classes (other tests define
    classes under the same names)."""
    store = incident.open_event_store(url, **options)
    store.types.register(*bank.bank_account.event_types, *bank.transfer.event_types)
    return store


def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresEventStore]:
    opened = open_store(postgres_url)
    assert isinstance(opened, PostgresEventStore)
    yield opened
    opened.close()


# -- tables and migrations ---------------------------------------------------------------


def test_initialize_creates_then_reports_nothing_to_do(postgres_url: str, postgres_admin: Admin):
    """`incident init` is idempotent: the second run finds everything in place."""
    first = open_store(postgres_url)
    done = first.initialize()
    assert done[0] == f"created schema {schema_of(postgres_url)}"
    assert any(line.startswith("applied migration 0001_events") for line in done)
    assert first.initialize() == []
    second = open_store(postgres_url)
    assert second.initialize() == []
    ran = postgres_admin.execute(
        f'SELECT name FROM "{schema_of(postgres_url)}".incident_migrations'
    ).fetchall()
    assert ran == [
        ("0001_events",),
        ("0002_idempotency_keys",),
        ("0003_begin_append",),
        ("0004_json_payloads",),
        ("0005_outcomes_and_owed_work",),
        ("0006_numbered_appends",),
        ("0007_sync_when_alone",),
    ]
    first.close()
    second.close()


def test_initialize_applies_only_the_missing_migrations(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """A database made by an older release (here: only 0001) is brought up to date,
    its events kept."""
    store = open_store(postgres_url)
    store.append("a", deposited(1), expected_version=0)
    schema = schema_of(postgres_url)
    postgres_admin.execute(f'DROP TABLE "{schema}".idempotency_keys')
    postgres_admin.execute(
        f"DELETE FROM \"{schema}\".incident_migrations WHERE name = '0002_idempotency_keys'"
    )
    older = open_store(postgres_url)
    assert [line.split(":")[0] for line in older.initialize()] == [
        "applied migration 0002_idempotency_keys"
    ]
    assert [r.data for r in older.get("a")] == deposited(1)
    older.close()
    store.close()


def a_log_from_before_json_payloads(
    url: str, monkeypatch: pytest.MonkeyPatch, *amounts: int
) -> list[incident.Recorded[Any]]:
    """Deposits appended to account "a" by a store with the migrations of the releases
    before 0004, whose events table kept data and metadata as jsonb."""
    with monkeypatch.context() as older_release:
        older_release.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
        older = open_store(url)
        written = older.append("a", deposited(*amounts), expected_version=0, metadata={"k": [1]})
        older.close()
    return written


def test_a_log_stored_as_jsonb_is_rewritten_as_json_with_every_event_kept(
    postgres_url: str,
    postgres_admin: Admin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Releases before 0004 kept payloads and metadata as jsonb. The migration turns both
    columns into json, keeps every row (ids, dates, metadata), announces a long log, and
    the store then writes and reads as before; metadata still defaults to {}."""
    schema = schema_of(postgres_url)
    written = a_log_from_before_json_payloads(postgres_url, monkeypatch, 1, 2, 3)
    column_types = f"""SELECT column_name, data_type FROM information_schema.columns
        WHERE table_schema = '{schema}' AND table_name = 'events'
        AND column_name IN ('data', 'metadata') ORDER BY column_name"""
    assert postgres_admin.execute(column_types).fetchall() == [
        ("data", "jsonb"),
        ("metadata", "jsonb"),
    ]

    monkeypatch.setattr(migrations, "ANNOUNCED_REWRITE", 3)
    store = open_store(postgres_url)
    with caplog.at_level("WARNING", logger="incident.stores.postgres"):
        done = store.initialize()
    assert [line.split(":")[0] for line in done] == [
        "applied migration 0004_json_payloads",
        "applied migration 0005_outcomes_and_owed_work",
        "applied migration 0006_numbered_appends",
        "applied migration 0007_sync_when_alone",
    ]
    assert "rewrites the 3 events" in caplog.text
    assert postgres_admin.execute(column_types).fetchall() == [
        ("data", "json"),
        ("metadata", "json"),
    ]
    assert store.get("a") == written
    store.append("a", deposited(4), expected_version=3)
    postgres_admin.execute(
        f'INSERT INTO "{schema}".events (position, event_id, aggregate_id, aggregate, version,'
        " event_type, event_date, data) VALUES (5, gen_random_uuid(), 'b', 'bank_account', 1,"
        """ 'MoneyDeposited', now(), '{"type": "MoneyDeposited", "amount": 5}')"""
    )
    assert [r.data for r in store.read_all()] == deposited(1, 2, 3, 4, 5)
    assert store.get("b")[0].metadata == {}
    store.close()


def test_a_short_log_is_rewritten_without_a_warning(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a_log_from_before_json_payloads(postgres_url, monkeypatch, 1, 2)
    monkeypatch.setattr(migrations, "ANNOUNCED_REWRITE", 3)
    store = open_store(postgres_url)
    with caplog.at_level("WARNING", logger="incident.stores.postgres"):
        assert store.initialize()
    assert caplog.text == ""
    assert [r.data for r in store.get("a")] == deposited(1, 2)
    store.close()


def test_without_create_tables_a_missing_table_is_a_clear_error(postgres_url: str) -> None:
    """A locked-down role gets a StoreError pointing at `incident init`, not a driver error."""
    store = open_store(postgres_url, create_tables=False)
    with pytest.raises(incident.StoreError, match="incident init") as caught:
        store.append("a", deposited(1), expected_version=0)
    # the schema is missing too (or only a table, for a schema made by another tool)
    missing = (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)
    assert isinstance(caught.value.__cause__, missing)
    assert store.initialize()  # explicit initialization still works
    store.append("a", deposited(1), expected_version=0)
    assert store.version("a") == 1
    store.close()


def test_a_role_without_ddl_rights_works_on_tables_made_by_init(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """Production roles may only read and write: once `incident init` (and a first use
    of each projection) made the tables, such a role runs the Bank, with create_tables
    on or off, and never attempts DDL."""
    schema = schema_of(postgres_url)
    owner = bank.build(postgres_url)
    owner.event_store.initialize()
    owner.projection_store.all(BankAccount)
    owner.projection_store.all(bank.Transfer)
    owner.event_store.close()
    role = f"incident_app_{uuid.uuid4().hex[:8]}"
    postgres_admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        postgres_admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        postgres_admin.execute(
            f'GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'
        )
        # owed follow-ups are deleted once carried out
        postgres_admin.execute(f'GRANT DELETE ON "{schema}".incident_owed TO "{role}"')
        for create_tables in (False, True):
            app = bank.build(open_store(f"{postgres_url}&user={role}", create_tables=create_tables))
            a, b = f"A{create_tables}", f"B{create_tables}"
            app.dispatch(bank.OpenAccount(aggregate_id=a))
            app.dispatch(bank.DepositMoney(aggregate_id=a, amount=10))
            app.dispatch(bank.OpenAccount(aggregate_id=b))
            app.dispatch(RequestTransfer(
                aggregate_id=f"T{create_tables}", source_account_number=a,
                destination_account_number=b, amount=4,
            ))  # fmt: skip
            row = app.projection_store.get(BankAccount, b)
            assert row is not None and row.balance == 4
            app.event_store.close()
        with pytest.raises(incident.StoreError, match="permission denied"):
            locked = incident.open_projection_store(f"{postgres_url}&user={role}")
            try:
                locked.project(Profile(aggregate_id="p", version=1, score=1.0, active=True))
            finally:
                locked.close()
    finally:
        postgres_admin.execute(f'DROP OWNED BY "{role}"')
        postgres_admin.execute(f'DROP ROLE "{role}"')


def test_url_options_and_schema_conflicts(postgres_url: str) -> None:
    """The schema may come from the URL or the options, not from both in disagreement;
    postgres:// and postgresql+psycopg:// URLs open the same store."""
    schema = schema_of(postgres_url)
    same = postgres_url.replace("postgresql://", "postgres://", 1)
    with pytest.raises(incident.IncidentError, match="schemas"):
        open_store(postgres_url, schema="other")
    writer = open_store(postgres_url)
    writer.append("a", deposited(1), expected_version=0)
    for url in (same, postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)):
        reader = open_store(url)
        assert [r.data for r in reader.get("a")] == deposited(1)
        assert schema in repr(reader)
        reader.close()
    writer.close()


def test_schemas_keep_applications_apart(postgres_url: str, postgres_admin: Admin) -> None:
    """Two schemas in one database are two separate logs and never share a transaction."""
    one = open_store(postgres_url)
    other = open_store(f"{postgres_url}_b")
    one.append("a", deposited(1), expected_version=0)
    assert other.get("a") == []
    assert list(other.read_all()) == []
    assert not one.shares_database_with(other.projections())
    one.close()
    other.close()
    postgres_admin.execute(f'DROP SCHEMA "{schema_of(postgres_url)}_b" CASCADE')


def test_events_row_holds_typed_columns(store: PostgresEventStore, postgres_admin: Admin) -> None:
    """The events row holds a uuid, the class's schema_version, json data and metadata and
    a timestamptz, and reads back as the event."""

    class Rescheduled(incident.Event):
        schema_version = 3
        when: dt.date

    recorded = store.append(
        "a", [Rescheduled(when=dt.date(2026, 1, 2))], expected_version=0, metadata={"k": [1]}
    )
    columns = "event_id, schema_version, data, metadata, event_date"
    row = postgres_admin.execute(f'SELECT {columns} FROM "{store._db.schema}".events').fetchone()
    assert row == (
        uuid.UUID(recorded[0].event_id),
        3,
        {"type": "Rescheduled", "when": "2026-01-02"},
        {"k": [1]},
        recorded[0].event_date,
    )
    assert store.get("a")[0].data == Rescheduled(when=dt.date(2026, 1, 2))


def test_a_corrupt_or_unknown_row_names_its_position(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """Rows edited behind the store's back: CorruptEvent or UnknownEventType naming the
    position."""
    store.append("a", deposited(1, 2), expected_version=0)
    events = f'"{store._db.schema}".events'
    postgres_admin.execute(f"""UPDATE {events} SET data = '{{"amount": "x"}}' WHERE position = 2""")
    with pytest.raises(incident.CorruptEvent) as corrupt:
        store.get("a")
    assert corrupt.value.position == 2
    postgres_admin.execute(f"UPDATE {events} SET event_type = 'Vanished' WHERE position = 2")
    with pytest.raises(incident.UnknownEventType) as unknown:
        list(store.read_all())
    assert unknown.value.position == 2


def test_read_all_pages_across_batches(postgres_url: str) -> None:
    """read_all, stream and events fetch in batches (here 2 rows); pages and limits line up
    across them."""
    store = open_store(postgres_url, batch_size=2)
    store.append("a", deposited(1, 2, 3), expected_version=0)
    store.append("b", deposited(4, 5, 6, 7), expected_version=0)
    assert [r.position for r in store.read_all()] == [1, 2, 3, 4, 5, 6, 7]
    assert [r.position for r in store.read_all(after=1, limit=3)] == [2, 3, 4]
    assert [r.position for r in store.read_all(after=2, limit=4)] == [3, 4, 5, 6]
    assert [r.position for r in store.read_all(after=5)] == [6, 7]
    assert list(store.read_all(limit=0)) == []
    assert [r.version for r in store.stream("b", after=1)] == [2, 3, 4]
    assert list(store.events("b")) == deposited(4, 5, 6, 7)
    stream = store.read_all()
    assert next(stream).position == 1
    store.append("c", deposited(8), expected_version=0)  # a reader mid-stream sees it too
    assert [r.position for r in stream] == [2, 3, 4, 5, 6, 7, 8]
    store.close()


def test_failed_appends_leave_no_hole_in_positions(store: PostgresEventStore) -> None:
    """A conflict or a failing projection rolls back before anything is numbered for good:
    the next event takes the next position (a sequence would have burnt some)."""
    store.append("a", deposited(1), expected_version=0)
    with pytest.raises(incident.ConcurrencyError):
        store.append("a", deposited(2), expected_version=0)

    def broken(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise RuntimeError("a listener failed")

    with pytest.raises(RuntimeError):
        store.append_and_project(
            "b",
            deposited(3, 4),
            expected_version=0,
            aggregate=None,
            metadata=None,
            projection_store=store.projections(),
            project=broken,
        )
    assert store.append("c", deposited(5), expected_version=0)[0].position == 2
    assert [(r.aggregate_id, r.position) for r in store.read_all()] == [("a", 1), ("c", 2)]


# -- projection tables -------------------------------------------------------------------


class Profile(incident.Projection):
    aggregate_id: str
    version: int
    score: float
    active: bool
    nickname: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)
    address: dict[str, str] = msgspec.field(default_factory=dict)
    born: dt.date | None = None


def test_projection_tables_have_typed_columns(store: PostgresEventStore, postgres_admin: Admin):
    """Each projection field gets a column of its own type (jsonb for nested values), and
    rows round-trip exactly."""
    projections = store.projections()
    row = Profile(
        aggregate_id="p1",
        version=1,
        score=2.5,
        active=True,
        tags=["a", "b"],
        address={"city": "Oslo"},
        born=dt.date(2000, 2, 29),
    )
    projections.project(row)
    assert projections.get(Profile, "p1") == row
    columns = dict(
        postgres_admin.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'profile'",
            [store._db.schema],
        ).fetchall()
    )
    assert columns == {
        "aggregate_id": "text",
        "version": "bigint",
        "score": "double precision",
        "active": "boolean",
        "nickname": "text",
        "tags": "jsonb",
        "address": "jsonb",
        "born": "date",
    }
    projections.project(BankAccount(
        aggregate_id="A", account_number="A", balance=1, version=1,
        event_id=str(uuid.uuid4()), event_date=dt.datetime.now(dt.UTC),
    ))  # fmt: skip
    kinds = dict(
        postgres_admin.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'bank_account'",
            [store._db.schema],
        ).fetchall()
    )
    assert kinds["event_date"] == "timestamp with time zone"
    assert kinds["balance"] == "bigint"


def test_a_field_added_later_becomes_a_new_column(postgres_url: str) -> None:
    """Projection types grow: the missing column is added on first use, old rows read
    back with the field's default."""

    class Counter(incident.Projection):
        aggregate_id: str
        count: int

    first = incident.open_projection_store(postgres_url)
    first.project(Counter(aggregate_id="c", count=1))
    first.close()

    class Counter(incident.Projection):  # type: ignore[no-redef]
        aggregate_id: str
        count: int
        label: str = "none"

    second = incident.open_projection_store(postgres_url)
    assert second.get(Counter, "c") == Counter(aggregate_id="c", count=1)
    second.project(Counter(aggregate_id="d", count=2, label="two"))
    assert second.all(Counter) == [
        Counter(aggregate_id="c", count=1),
        Counter(aggregate_id="d", count=2, label="two"),
    ]
    second.close()


def test_a_projection_cannot_take_the_events_table(store: PostgresEventStore) -> None:
    """A projection class whose table name is one incident uses is refused, not merged in."""

    class Events(incident.Projection):
        aggregate_id: str

    with pytest.raises(incident.IncidentError, match="rename"):
        store.projections().project(Events(aggregate_id="x"))
    assert list(store.read_all()) == []


def tables_of(admin: Admin, schema: str) -> set[str]:
    rows = admin.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema]
    ).fetchall()
    return {name for (name,) in rows}


def test_table_name_names_the_postgres_table(postgres_url: str, postgres_admin: Admin) -> None:
    """A projection class's table_name is its table; nothing is made under its class name."""
    ledger = projection_class("Ledger", "shop.read_models", table_name="shop_ledgers")
    projections = incident.open_projection_store(postgres_url)
    projections.project(ledger(aggregate_id="a", total=1))
    schema = schema_of(postgres_url)
    assert postgres_admin.execute(
        f'SELECT aggregate_id, total FROM "{schema}".shop_ledgers'
    ).fetchall() == [("a", 1)]
    assert "ledger" not in tables_of(postgres_admin, schema)
    projections.close()


def test_a_table_under_the_class_name_is_renamed_to_the_table_name(
    postgres_url: str, postgres_admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """Releases that ignored table_name stored a type under the snake_case of its class
    name: on first use that table is renamed to the table_name, rows kept, with a warning
    saying so; the next store finds it in place and says nothing."""
    schema = schema_of(postgres_url)
    postgres_admin.execute(f'CREATE SCHEMA "{schema}"')
    postgres_admin.execute(
        f'CREATE TABLE "{schema}".ledger (aggregate_id text PRIMARY KEY, total bigint)'
    )
    postgres_admin.execute(f"INSERT INTO \"{schema}\".ledger VALUES ('a', 1)")
    ledger = projection_class("Ledger", "shop.read_models", table_name="shop_ledgers")
    caplog.set_level("WARNING", logger="incident.stores.postgres")
    projections = incident.open_projection_store(postgres_url)
    assert projections.all(ledger) == [ledger(aggregate_id="a", total=1)]
    renamed = [r for r in caplog.records if r.name == "incident.stores.postgres"]
    assert [r.getMessage() for r in renamed] == [
        f"incident: renamed table {schema}.ledger to {schema}.shop_ledgers, the table_name"
        " shop.read_models.Ledger declares"
    ]
    assert {"shop_ledgers", "ledger"} & tables_of(postgres_admin, schema) == {"shop_ledgers"}
    projections.close()
    caplog.clear()
    again = incident.open_projection_store(postgres_url)
    again.project(ledger(aggregate_id="b", total=2))
    assert [r.aggregate_id for r in again.all(ledger)] == ["a", "b"]
    assert not [r for r in caplog.records if r.name == "incident.stores.postgres"]
    again.close()


def test_a_table_under_the_class_name_stays_with_the_class_that_owns_it(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """The old table is not taken when the table_name's table exists already, nor when
    a class used with the store owns the old name now."""
    schema = schema_of(postgres_url)
    plain = projection_class("Ledger", "billing.read_models")
    named = projection_class("Ledger", "shop.read_models", table_name="shop_ledgers")
    projections = incident.open_projection_store(postgres_url)
    projections.project(plain(aggregate_id="a", total=1))
    assert projections.all(named) == []
    assert projections.all(plain) == [plain(aggregate_id="a", total=1)]
    projections.close()

    renamed = projection_class("Ledger", "billing.read_models", table_name="billing_ledgers")
    postgres_admin.execute(
        f'CREATE TABLE "{schema}".billing_ledgers (aggregate_id text PRIMARY KEY, total bigint)'
    )
    again = incident.open_projection_store(postgres_url)
    assert again.all(renamed) == []
    assert {"ledger", "shop_ledgers", "billing_ledgers"} <= tables_of(postgres_admin, schema)
    again.close()


@pytest.mark.parametrize("path", ["locked", "predicted"])
def test_projections_that_fail_to_write_take_the_events_with_them(
    postgres_url: str, postgres_admin: Admin, path: str
) -> None:
    """Events and projections are one transaction: a projection Postgres refuses (a
    negative balance, against a CHECK a DBA added to the table) leaves no event behind,
    on either way of appending, and the connection (the only one here) is rolled back
    and works for the next append."""
    store = open_store(postgres_url, pool_size=1)
    if path == "predicted":
        store.append("other", deposited(1), expected_version=0)  # now it knows the heads
    now = dt.datetime.now(dt.UTC)
    store.projections().project(
        BankAccount(
            aggregate_id="Z", account_number="Z", balance=0, version=1, event_id="e",
            event_date=now,
        )
    )  # fmt: skip
    table = f'"{schema_of(postgres_url)}".bank_account'
    postgres_admin.execute(f"ALTER TABLE {table} ADD CONSTRAINT covered CHECK (balance >= 0)")

    def project(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        return [
            BankAccount(
                aggregate_id="A", account_number="A", balance=-1, version=1,
                event_id=recorded[0].event_id, event_date=now,
            )
        ]  # fmt: skip

    with pytest.raises(incident.StoreError):
        store.append_and_project(
            "A",
            deposited(1),
            expected_version=0,
            aggregate="bank_account",
            metadata=None,
            projection_store=store.projections(),
            project=project,
        )
    assert store.get("A") == []
    assert store.projections().get(BankAccount, "A") is None
    [recorded] = store.append("A", deposited(2), expected_version=0)
    assert recorded.position == (2 if path == "predicted" else 1)
    store.close()


def test_a_projection_store_of_its_own_pool_still_shares_the_transaction(
    store: PostgresEventStore, postgres_url: str
) -> None:
    """A projection store opened separately on the same database and schema still
    commits with the events (the event store's connection writes its tables)."""
    other = incident.open_projection_store(postgres_url)
    assert store.shares_database_with(other)
    assert not store.shares_database_with(incident.open_projection_store("memory://"))
    other.close()


# -- lost connections --------------------------------------------------------------------


def test_a_connection_killed_mid_append_leaves_nothing_and_recovers(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """pg_terminate_backend while the events are inserted but not committed: a StoreError
    saying what failed, no partial batch, and the next append works on a new connection."""
    name = f"kill-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={name}")
    store.append("other", deposited(5), expected_version=0)
    killed: list[int] = []
    running: list[str] = []

    def project(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        # wait until the server has the batch's INSERT (sent, not committed), then kill
        deadline = time.monotonic() + 30
        while not any(q.startswith("INSERT INTO") for q in running):
            assert time.monotonic() < deadline, running
            running[:] = [
                query
                for (query,) in postgres_admin.execute(
                    "SELECT query FROM pg_stat_activity WHERE application_name = %s", [name]
                )
            ]
        killed.append(kill_backends(postgres_admin, name, wait=10))
        return []

    with pytest.raises(incident.StoreError, match="appending 3 event") as caught:
        store.append_and_project(
            "acc",
            deposited(1, 2, 3),
            expected_version=0,
            aggregate=None,
            metadata=None,
            projection_store=store.projections(),
            project=project,
        )
    assert killed and killed[0] >= 1
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert store.get("acc") == []
    assert store.append("acc", deposited(7), expected_version=0)[0].position == 2
    assert [(r.aggregate_id, r.position) for r in store.read_all()] == [("other", 1), ("acc", 2)]
    store.close()


def test_idle_connections_the_server_dropped_are_replaced(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """After a server restart or an admin's kill, the next call checks out a live
    connection instead of failing once per dead one."""
    name = f"idle-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={name}", pool_size=4)
    store.append("a", deposited(1), expected_version=0)
    assert kill_backends(postgres_admin, name, wait=10) >= 1
    assert [r.data for r in store.get("a")] == deposited(1)
    store.append("a", deposited(2), expected_version=1)
    store.close()


def test_an_unreachable_server_is_a_store_error() -> None:
    """No server: a StoreError carrying the driver's reason, chained."""
    store = open_store("postgresql://nobody@127.0.0.1:1/none", timeout=0.5)
    with pytest.raises(incident.StoreError, match=r"Postgres failed .*connection") as caught:
        store.version("a")
    assert isinstance(caught.value.__cause__, psycopg.Error)
    store.close()


def test_an_exhausted_pool_says_so(postgres_url: str) -> None:
    """Every pooled connection busy past the timeout: a StoreError that says so, and the
    next call works once one is free."""
    store = open_store(postgres_url, pool_size=1, timeout=0.2)
    assert isinstance(store, PostgresEventStore)
    store.initialize()
    # the only connection, held elsewhere
    with store._db.pool.connection(), pytest.raises(incident.StoreError, match="raise pool_size"):
        store.version("a")
    assert store.version("a") == 0
    store.close()


def test_a_pool_refilling_after_a_refusal_is_not_blamed_on_its_size(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout that times out moments after the server refused the pool (and the pool
    reconnected) says the pool is still reconnecting, not "raise pool_size"; long after
    a refusal, a busy pool is told to grow again."""
    from incident.stores.postgres import database

    store = open_store(postgres_url, pool_size=1, timeout=0.2)
    assert isinstance(store, PostgresEventStore)
    store.initialize()
    conninfo = store._db.conninfo
    now = time.monotonic()
    monkeypatch.setitem(database._refused, conninfo, (now - 1.0, "connection refused"))
    monkeypatch.setitem(database._connected, conninfo, now - 0.5)
    with store._db.pool.connection(), pytest.raises(incident.StoreError) as caught:
        store.version("a")
    assert "still reconnecting" in str(caught.value) and "pool_size" not in str(caught.value)
    monkeypatch.setitem(database._refused, conninfo, (now - 60.0, "connection refused"))
    with store._db.pool.connection(), pytest.raises(incident.StoreError, match="raise pool_size"):
        store.version("a")
    store.close()


def _use_after_fork(store: incident.EventStore, results: Any) -> None:
    try:
        store.append("child", deposited(2), expected_version=0)
        with store._db.connection("asking for the backend") as conn:  # type: ignore[attr-defined]
            backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        results.put(("ok", backend, [r.aggregate_id for r in store.read_all()]))
    except Exception as error:
        results.put((repr(error), None, []))


@pytest.mark.parametrize("used_before", [True, False], ids=["used", "unused"])
def test_a_store_opened_before_fork_works_in_parent_and_child(
    postgres_url: str, used_before: bool
) -> None:
    """A forked child (multiprocessing's default on Linux, gunicorn --preload) gets a
    pool of its own instead of sharing the parent's sockets; the parent carries on."""
    store = open_store(postgres_url)
    assert isinstance(store, PostgresEventStore)
    parents = set()
    if used_before:
        store.append("parent", deposited(1), expected_version=0)
        with store._db.connection("asking for the backend") as conn:
            parents.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    child = fork.Process(target=_use_after_fork, args=(store, results))
    child.start()
    outcome, backend, seen = results.get(timeout=120)
    child.join()
    assert (outcome, seen) == ("ok", ["parent", "child"] if used_before else ["child"])
    assert backend not in parents
    store.append("parent", deposited(3), expected_version=incident.ANY)
    assert [r.aggregate_id for r in store.read_all()][-2:] == ["child", "parent"]
    store.close()


def test_a_fork_while_an_append_takes_its_turn_leaves_the_child_free(postgres_url: str) -> None:
    """A thread of the parent was appending (holding the process's turn) when another
    forked: the child starts with its own turn instead of waiting for ever."""
    store = open_store(postgres_url)
    assert isinstance(store, PostgresEventStore)
    store.append("parent", deposited(1), expected_version=0)  # now predicting
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    with store._db.append_turns:
        child = fork.Process(target=_use_after_fork, args=(store, results))
        child.start()
        outcome, _, seen = results.get(timeout=60)
    child.join()
    assert (outcome, seen) == ("ok", ["parent", "child"])
    store.close()


# -- commit order ------------------------------------------------------------------------


def waiting_on_append_lock(admin: Admin, schema: str) -> int:
    key = lock_key(schema, "append") & 0xFFFF_FFFF_FFFF_FFFF
    row = admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid::bigint = %s AND objid::bigint = %s",
        [key >> 32, key & 0xFFFF_FFFF],
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_later_append_waits_for_an_earlier_commit(
    store: PostgresEventStore, postgres_url: str, postgres_admin: Admin
) -> None:
    """While one append is open, a second one (from another process: a store with a
    pool of its own) cannot take the next position or commit first, and readers see
    neither: positions follow commit order."""
    other = open_store(postgres_url)
    store.append("seed", deposited(1), expected_version=0)
    inside, release = threading.Event(), threading.Event()

    def slow(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        assert recorded[0].position > 0  # looks at positions: numbered in the client
        inside.set()
        release.wait()
        return []

    def first() -> list[incident.Recorded[Any]]:
        return store.append_and_project(
            "first",
            deposited(1, 2),
            expected_version=0,
            aggregate=None,
            metadata=None,
            projection_store=store.projections(),
            project=slow,
        )

    results: dict[str, list[incident.Recorded[Any]]] = {}
    a = threading.Thread(target=lambda: results.setdefault("first", first()))
    a.start()
    assert inside.wait(30)
    b = threading.Thread(
        target=lambda: results.setdefault(
            "second", other.append("second", deposited(3), expected_version=0)
        )
    )
    b.start()
    deadline = time.monotonic() + 30
    while waiting_on_append_lock(postgres_admin, store._db.schema) == 0:
        assert b.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    assert [r.aggregate_id for r in store.read_all()] == ["seed"]
    release.set()
    a.join()
    b.join()
    assert [r.position for r in results["first"]] == [2, 3]
    assert [r.position for r in results["second"]] == [4]
    assert [r.position for r in store.read_all()] == [1, 2, 3, 4]
    other.close()


# -- one round trip per append -------------------------------------------------------------


def count_locked_appends(store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each append that took the locked path (heads read first, then the rows).
    The store numbers appends in the client, as it does when their inline work looks at
    positions: the database's numbering (tests/test_postgres_numbered.py) is off."""
    monkeypatch.setattr(store.numbered, "available", False)
    locked: list[str] = []
    original = store._append_locked

    def counting(conn: Any, job: Any) -> Any:
        locked.append(job.request.aggregate_id)
        return original(conn, job)

    monkeypatch.setattr(store, "_append_locked", counting)
    return locked


def test_a_lone_writer_predicts_its_heads(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that nobody else writes to reads the heads on its first append only,
    then sends each append's lock, check and rows together."""
    locked = count_locked_appends(store, monkeypatch)
    for version in range(5):
        store.append("a", deposited(version), expected_version=version)
    store.append("b", deposited(1, 2), expected_version=0)
    assert locked == ["a"]
    assert [(r.aggregate_id, r.position, r.version) for r in store.read_all()] == [
        ("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("a", 4, 4), ("a", 5, 5), ("b", 6, 1), ("b", 7, 2)
    ]  # fmt: skip


def test_a_wrong_prediction_writes_nothing_then_appends_in_order(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process appended in between: the predicted last position is stale, so
    the one-trip attempt is rolled back and the locked path appends after the other's
    events, gapless. Predicting resumes once two appends in a row (twice as many as
    before) found the store alone, and the miss logs nothing."""
    mine, theirs = open_store(postgres_url), open_store(postgres_url)
    assert isinstance(mine, PostgresEventStore) and isinstance(theirs, PostgresEventStore)
    locked = count_locked_appends(mine, monkeypatch)
    monkeypatch.setattr(theirs.numbered, "available", False)
    mine.append("a", deposited(1), expected_version=0)
    mine.append("a", deposited(2), expected_version=1)
    assert len(locked) == 1  # predicting from the second append
    theirs.append("b", deposited(3, 4), expected_version=0)
    now = dt.datetime.now(dt.UTC)

    def project(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        time.sleep(0.2)  # the check's error arrives while the block still sends statements
        return [
            BankAccount(
                aggregate_id="a", account_number="a", balance=r.data.amount, version=r.version,
                event_id=r.event_id, event_date=now,
            )
            for r in recorded
        ]  # fmt: skip

    [recorded] = mine.append_and_project(
        "a",
        deposited(5),
        expected_version=2,
        aggregate=None,
        metadata=None,
        projection_store=mine.projections(),
        project=project,
    )
    assert (recorded.position, recorded.version) == (5, 3)
    assert len(locked) == 2  # the wrong prediction, done again the locked way
    mine.append("a", deposited(6), expected_version=3)
    mine.append("a", deposited(7), expected_version=4)
    assert len(locked) == 4  # alone twice in a row: predicting again
    mine.append("a", deposited(8), expected_version=5)
    assert len(locked) == 4  # and right
    assert [r.position for r in mine.read_all()] == list(range(1, 9))
    assert [r.data for r in mine.get("a")] == deposited(1, 2, 5, 6, 7, 8)
    assert mine.projections().get(BankAccount, "a") == BankAccount(
        aggregate_id="a", account_number="a", balance=5, version=3,
        event_id=recorded.event_id, event_date=now,
    )  # fmt: skip
    assert not [r for r in caplog.records if r.name.startswith("psycopg")]
    mine.close()
    theirs.close()


def test_threads_of_one_process_keep_predicting(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threaded server: while the store predicts, its appends take turns in the
    process, so one thread's append never makes another's guess wrong."""
    locked = count_locked_appends(store, monkeypatch)

    def write(stream: str) -> None:
        for version in range(20):
            store.append(stream, deposited(version), expected_version=version)

    threads = [threading.Thread(target=write, args=(f"s{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.position for r in store.read_all()] == list(range(1, 81))
    assert len(locked) == 1, len(locked)  # the first: nothing to guess from yet


def test_a_predicted_append_still_checks_the_expected_version(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expected version ahead of the stream would leave a gap: refused, nothing
    written, on the one-trip path as on the locked one. A conflict is not a wrong
    prediction of the log: the store goes on predicting."""
    locked = count_locked_appends(store, monkeypatch)
    store.append("a", deposited(1), expected_version=0)
    store.append("b", deposited(1), expected_version=0)
    locked.clear()  # the first append had no guess to go by
    with pytest.raises(incident.ConcurrencyError) as caught:
        store.append("a", deposited(2), expected_version=3)
    assert (caught.value.expected, caught.value.actual) == (3, 1)
    with pytest.raises(incident.ConcurrencyError):
        store.append("a", deposited(2), expected_version=0)
    assert locked == []  # the check in the database said so, in the one trip
    assert [r.position for r in store.read_all()] == [1, 2]
    assert store.append("a", deposited(2), expected_version=1)[0].position == 3
    assert locked == []


def test_refused_appends_leave_the_connection_usable(postgres_url: str) -> None:
    """psycopg prepares a statement on its fifth run. A refused append skips what was
    queued after the refusal, so a statement being prepared there never was; the store
    makes psycopg forget its prepared statements then, and the one connection here keeps
    working whichever run the refusal falls on."""
    store = open_store(postgres_url, pool_size=1)
    for version in range(12):
        with pytest.raises(incident.ConcurrencyError):
            store.append("a", deposited(1), expected_version=version + 1)  # ahead: refused
        store.append("a", deposited(version), expected_version=version)
    assert [r.version for r in store.get("a")] == list(range(1, 13))
    store.close()


def test_a_predicted_append_still_finds_an_idempotency_key(store: PostgresEventStore) -> None:
    def keyed(version: int) -> list[incident.Recorded[Any]]:
        return store.append_and_project(
            "a",
            deposited(1),
            expected_version=version,
            aggregate=None,
            metadata=None,
            projection_store=store.projections(),
            project=lambda recorded: [],
            idempotency_key="k",
        )

    first = keyed(0)
    with pytest.raises(incident.DuplicateCommand) as caught:
        keyed(1)  # predicted: this store wrote the last position
    assert caught.value.recorded == first
    assert store.version("a") == 1


def test_a_schema_without_begin_append_nor_append_numbered_uses_the_locked_path(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """A schema made before migration 0003, opened by a role that may not migrate it:
    every append reads the heads first, and works."""
    open_store(postgres_url).initialize()
    schema = schema_of(postgres_url)
    for function, names in (
        ("begin_append", ["0003_begin_append"]),
        ("append_numbered", ["0006_numbered_appends", "0007_sync_when_alone"]),
    ):
        postgres_admin.execute(f'DROP FUNCTION "{schema}".{function}')
        postgres_admin.execute(
            f'DELETE FROM "{schema}".incident_migrations WHERE name = ANY(%s)', [names]
        )
    older = open_store(postgres_url, create_tables=False)
    for version in range(3):
        older.append("a", deposited(version), expected_version=version)
    assert [r.position for r in older.read_all()] == [1, 2, 3]
    assert isinstance(older, PostgresEventStore)
    assert not older._predictor.available and not older.numbered.available
    older.close()


def test_appends_keep_commit_order_under_a_stricter_default_isolation(postgres_url: str) -> None:
    """A server (or role) whose default isolation is serializable: appends still read
    the heads after the lock, so racing writers get gapless positions, not errors."""
    strict = f"{postgres_url}&options=-c%20default_transaction_isolation%3Dserializable"
    stores = [open_store(strict), open_store(strict)]
    isolation = stores[0]._db.pool.getconn()  # type: ignore[attr-defined]
    try:
        assert isolation.execute("SHOW default_transaction_isolation").fetchone() == (
            "serializable",
        )
    finally:
        stores[0]._db.pool.putconn(isolation)  # type: ignore[attr-defined]
    failures: list[BaseException] = []

    def write(store: incident.EventStore, stream: str) -> None:
        try:
            for version in range(25):
                store.append(stream, deposited(version), expected_version=version)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=write, args=(s, f"s{n}")) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert [r.position for r in stores[0].read_all()] == list(range(1, 51))
    for store in stores:
        store.close()


# -- turns on a stream ------------------------------------------------------------------


def advisory_locks(admin: Admin, key: int, *, granted: bool) -> list[int]:
    """The backends holding (or waiting for) the session-level advisory lock ``key``."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF  # as pg_locks shows it
    rows = admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted = %s"
        " AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1",
        [granted, unsigned >> 32, unsigned & 0xFFFF_FFFF],
    ).fetchall()
    return [pid for (pid,) in rows]


def test_writers_of_a_stream_take_turns_and_an_error_gives_the_turn_back(
    store: PostgresEventStore, postgres_url: str, postgres_admin: Admin
) -> None:
    """A second process's turn on a stream waits in the server while the first holds
    it, a turn on another stream does not, and the turn is given back when its block
    fails."""
    other = open_store(postgres_url)
    assert isinstance(other, PostgresEventStore)
    key = lock_key(schema_of(postgres_url), "stream A")
    order: list[str] = []

    def second() -> None:
        with other.turn("A"):
            order.append("second")

    waiter = threading.Thread(target=second)
    with pytest.raises(ZeroDivisionError), store.turn("A"):
        with other.turn("B"):
            order.append("B")
        waiter.start()
        while not advisory_locks(postgres_admin, key, granted=False):
            time.sleep(0.005)  # the other process now queues for A
        order.append("first")
        1 / 0  # noqa: B018 - the block fails while holding the turn
    waiter.join(timeout=30)
    assert order == ["B", "first", "second"]
    assert advisory_locks(postgres_admin, key, granted=True) == []
    other.close()


def test_a_turn_lends_its_connection_to_the_threads_store_calls(postgres_url: str) -> None:
    """Inside a turn the thread's reads and appends use the turn's connection, so a
    pool of one connection is enough (a second checkout would wait for the first)."""
    store = open_store(postgres_url, pool_size=1, timeout=5)
    assert isinstance(store, PostgresEventStore)
    store.append("A", deposited(1), expected_version=0)
    with store.turn("A"):
        version = store.version("A")
        store.append("A", deposited(2), expected_version=version)
        with store.turn("A"):  # nested: nothing more is taken
            store.append("A", deposited(3), expected_version=2)
    assert [r.data.amount for r in store.get("A")] == [1, 2, 3]
    store.close()


def test_a_turn_whose_session_dies_still_ends_cleanly(
    store: PostgresEventStore, postgres_url: str, postgres_admin: Admin
) -> None:
    """The server ends the session of a turn mid-block: the append in it finds nothing
    stored and is made again on a new connection (its expected version keeps it right
    without the lock), the lock went with the session, and the next turn takes it."""
    key = lock_key(schema_of(postgres_url), "stream A")
    with store.turn("A"):
        (holder,) = advisory_locks(postgres_admin, key, granted=True)
        postgres_admin.execute("SELECT pg_terminate_backend(%s)", [holder])
        store.append("A", deposited(1), expected_version=0)
    with store.turn("A"):
        store.append("A", deposited(2), expected_version=1)
    assert advisory_locks(postgres_admin, key, granted=True) == []
    assert [r.data for r in store.get("A")] == deposited(1, 2)


def test_a_stuck_turn_is_waited_for_only_so_long(
    store: PostgresEventStore,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A writer whose turn does not come within TURN_WAIT appends without it: the turn
    only spares retries, the expected version still decides."""
    monkeypatch.setattr(session, "TURN_WAIT", "50ms")
    other = open_store(postgres_url)
    assert isinstance(other, PostgresEventStore)
    with store.turn("A"), other.turn("A"):
        other.append("A", deposited(1), expected_version=0)
    assert "appending without it" in caplog.text
    assert store.version("A") == 1
    other.close()


# -- many processes ----------------------------------------------------------------------
# Workers are top-level functions, run in spawned interpreters: one pool each.


def _withdraw(url: str, start: Any, results: Any) -> None:
    app = bank.build(url)
    try:
        start.wait()
        app.dispatch(WithdrawMoney(aggregate_id="ACC1", amount=24))
        results.put("ok")
    except incident.Rejected as rejected:
        results.put(rejected.reason)
    except Exception as error:
        results.put(f"error: {error!r}")
    finally:
        app.event_store.close()


def _transfer(url: str, start: Any, results: Any, index: int) -> None:
    app = bank.build(url)
    try:
        start.wait()
        app.dispatch(
            RequestTransfer(
                aggregate_id=f"T{index}",
                source_account_number="A",
                destination_account_number="B",
                amount=24,
            )
        )
        results.put("ok")
    except Exception as error:
        results.put(f"error: {error!r}")
    finally:
        app.event_store.close()


def _write(url: str, start: Any, results: Any, writer: int, batches: int) -> None:
    store = open_store(url)
    try:
        start.wait()
        versions = [0, 0, 0]
        for batch in range(batches):
            stream = batch % 3
            events = deposited(*range(1, batch % 4 + 2))
            recorded = store.append(
                f"w{writer}-{stream}", events, expected_version=versions[stream]
            )
            versions[stream] += len(recorded)
            # a stream every writer appends to as well
            store.append("shared", deposited(batch + 1), expected_version=incident.ANY)
        results.put("ok")
    except Exception as error:
        results.put(f"error: {error!r}")
    finally:
        store.close()


def _withdraw_ones(url: str, start: Any, results: Any, commands: int) -> None:
    app = bank.build(url)
    conflicts = 0
    try:
        start.wait()
        for _ in range(commands):
            try:
                app.dispatch(WithdrawMoney(aggregate_id="ACC1", amount=1))
            except incident.ConcurrencyError:
                conflicts += 1
        results.put(conflicts)
    except Exception as error:
        results.put(f"error: {error!r}")
    finally:
        app.event_store.close()


def run_processes(target: Any, url: str, count: int, *extra: Any) -> list[Any]:
    start = spawn.Barrier(count)
    results = spawn.Queue()
    processes = [
        spawn.Process(target=target, args=(url, start, results, *(e(i) for e in extra)))
        for i in range(count)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join()
        assert process.exitcode == 0
    return outcomes


@pytest.mark.slow
def test_five_processes_withdraw_concurrently(postgres_url: str) -> None:
    """Five OS processes withdraw 24 from 100: exactly four succeed, the balance is 4."""
    app = bank.build(postgres_url)
    app.dispatch(bank.OpenAccount(aggregate_id="ACC1"))
    app.dispatch(bank.DepositMoney(aggregate_id="ACC1", amount=100))
    outcomes = sorted(run_processes(_withdraw, postgres_url, 5))
    assert outcomes == ["no_enough_balance", "ok", "ok", "ok", "ok"]
    row = app.projection_store.get(BankAccount, "ACC1")
    assert row is not None
    assert (row.balance, row.version) == (4, 6)
    assert app.state("bank_account", "ACC1").balance == 4
    app.event_store.close()


HOT_WRITERS, HOT_COMMANDS = 8, 60


@pytest.mark.slow
def test_eight_processes_on_one_hot_account_never_run_out_of_retries(postgres_url: str) -> None:
    """Eight OS processes withdrawing 1 at a time from one account, with the default
    retries: writers that collided queue for the account in the server, so no command
    gives up with a ConcurrencyError and the balance is exactly what was withdrawn."""
    app = bank.build(postgres_url)
    app.dispatch(bank.OpenAccount(aggregate_id="ACC1"))
    total = HOT_WRITERS * HOT_COMMANDS
    app.dispatch(bank.DepositMoney(aggregate_id="ACC1", amount=total + 5))
    outcomes = run_processes(_withdraw_ones, postgres_url, HOT_WRITERS, lambda _: HOT_COMMANDS)
    assert outcomes == [0] * HOT_WRITERS  # ConcurrencyErrors that reached a caller
    assert app.state("bank_account", "ACC1").balance == 5
    row = app.projection_store.get(BankAccount, "ACC1")
    assert row is not None
    assert (row.balance, row.version) == (5, total + 2)
    app.event_store.close()


@pytest.mark.slow
def test_five_processes_transfer_from_one_account(postgres_url: str) -> None:
    """Five concurrent transfers of 24 from A (100) to B: A ends at 4, B at 96."""
    app = bank.build(postgres_url)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
    app.dispatch(bank.OpenAccount(aggregate_id="B"))
    assert run_processes(_transfer, postgres_url, 5, lambda i: i) == ["ok"] * 5
    statuses = sorted(app.projection_store.get(bank.Transfer, f"T{i}").status for i in range(5))  # type: ignore[union-attr]
    assert statuses == ["cancelled", "completed", "completed", "completed", "completed"]
    a, b = (app.projection_store.get(BankAccount, n) for n in "AB")
    assert a is not None and b is not None
    assert (a.balance, b.balance) == (4, 96)
    assert (app.state("bank_account", "A").balance, app.state("bank_account", "B").balance) == (
        4,
        96,
    )
    app.event_store.close()


@pytest.mark.slow
def test_a_tail_reader_sees_every_event_once_in_order(postgres_url: str) -> None:
    """Eight writer processes append while a reader polls read_all(after=last): it sees
    every committed event exactly once, at gapless positions."""
    reader = open_store(postgres_url)
    reader.initialize()
    writers, batches = 8, 30
    start = spawn.Barrier(writers)
    results = spawn.Queue()
    processes = [
        spawn.Process(target=_write, args=(postgres_url, start, results, w, batches))
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    seen: list[incident.Recorded[Any]] = []
    outcomes: list[Any] = []
    while len(outcomes) < writers:
        last = seen[-1].position if seen else 0
        seen.extend(reader.read_all(after=last))
        try:
            outcomes.append(results.get_nowait())
        except queue.Empty:
            time.sleep(0.002)
    for process in processes:
        process.join()
        assert process.exitcode == 0
    assert outcomes == ["ok"] * writers
    seen.extend(reader.read_all(after=seen[-1].position if seen else 0))
    everything = list(reader.read_all())
    assert [r.position for r in seen] == list(range(1, len(everything) + 1))
    assert [r.event_id for r in seen] == [r.event_id for r in everything]
    per_writer = sum(batch % 4 + 1 + 1 for batch in range(batches))
    assert len(seen) == writers * per_writer
    for stream in {r.aggregate_id for r in seen}:
        assert [r.version for r in seen if r.aggregate_id == stream] == list(
            range(1, sum(r.aggregate_id == stream for r in seen) + 1)
        )
    reader.close()


# -- CI ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", "1 error"), ("", "1 skipped")],
)
def test_an_unreachable_server_fails_under_ci_and_skips_elsewhere(ci: str, outcome: str) -> None:
    """CI must not pass by skipping the Postgres tests; a laptop without Postgres may."""
    root = Path(__file__).resolve().parent.parent
    test = (
        "tests/test_store_contract.py::TestEventStores::test_an_empty_append_writes_nothing"
        "[postgres]"
    )
    env = {
        **os.environ,
        "CI": ci,
        "INCIDENT_TEST_POSTGRES_URL": "postgresql://nobody@127.0.0.1:1/none",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", test],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert outcome in run.stdout, run.stdout
    assert (run.returncode != 0) == bool(ci)
    assert "cannot reach INCIDENT_TEST_POSTGRES_URL" in run.stdout
