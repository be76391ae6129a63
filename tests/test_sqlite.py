"""What the SQLite stores promise beyond the contract suite: URLs and options, the schema,
one transaction per command, typed projection tables, streaming reads, driver errors,
and several threads and OS processes writing to one file."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest
import sqlite_utils
from sqlite_workers import (
    append_after_fork,
    deposit_in_process,
    initialize_in_process,
    withdraw_in_process,
)
from workers import run_processes

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount, DepositMoney, MoneyDeposited
from incident.stores import sqlite as sqlite_store
from incident.stores.sqlite import (
    SQLiteEventStore,
    SQLiteProjectionStore,
    migrations,
    open_sqlite,
    reading,
)
from incident.stores.sqlite.sql import JOINED


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'bank.db'}"


@pytest.fixture
def store(url: str) -> Iterator[SQLiteEventStore]:
    opened = open_sqlite(url)
    yield opened
    opened.close()


def raw(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run SQL on the file with a plain sqlite3 connection, as another program would."""
    with closing(sqlite3.connect(sqlite_store.sqlite_path(url))) as conn, conn:
        return conn.execute(sql, params).fetchall()


def deposits(*amounts: int) -> list[incident.Event]:
    return [MoneyDeposited(amount=a) for a in amounts]


# -- URLs, options, schema ----------------------------------------------------------


def test_relative_absolute_and_memory_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite:///name is relative to the working directory, sqlite://// is absolute,
    sqlite:// is a private in-memory database."""
    monkeypatch.chdir(tmp_path)
    relative = incident.open_event_store("sqlite:///rel.db")
    relative.append("a", deposits(1), expected_version=0)
    relative.close()
    assert (tmp_path / "rel.db").exists()

    absolute = incident.open_event_store(f"sqlite:////{tmp_path.as_posix().lstrip('/')}/abs.db")
    absolute.append("a", deposits(1), expected_version=0)
    absolute.close()
    assert (tmp_path / "abs.db").exists()

    memory = incident.open_event_store("sqlite://")
    memory.append("a", deposits(1, 2), expected_version=0)
    assert memory.version("a") == 2
    assert incident.open_event_store("sqlite://").version("a") == 0  # each one is private
    memory.close()


def test_bad_urls_and_options_are_clear_errors() -> None:
    """A URL with a host, an unknown option or a bad value is refused with a message that says
    what is expected."""
    with pytest.raises(incident.IncidentError, match=re.escape("sqlite:///relative.db")):
        incident.open_event_store("sqlite://host/x.db")
    with pytest.raises(incident.IncidentError, match="Unknown SQLite store options"):
        incident.open_event_store("sqlite://", journal="off")
    with pytest.raises(incident.IncidentError, match="synchronous must be one of"):
        incident.open_event_store("sqlite://?synchronous=sometimes")


def test_durable_by_default_and_relaxed_on_request(url: str) -> None:
    """WAL with synchronous FULL unless NORMAL is asked for, by keyword or in the URL."""

    def pragmas(store: incident.EventStore) -> tuple[str, int]:
        assert isinstance(store, SQLiteEventStore)
        conn = store._db.conn()
        return conn.execute("PRAGMA journal_mode").fetchone()[0], conn.execute(
            "PRAGMA synchronous"
        ).fetchone()[0]

    assert pragmas(incident.open_event_store(url)) == ("wal", 2)
    assert pragmas(incident.open_event_store(url, synchronous="NORMAL")) == ("wal", 1)
    assert pragmas(incident.open_event_store(f"{url}?synchronous=normal")) == ("wal", 1)


def test_initialize_creates_the_tables_once_and_says_so(url: str) -> None:
    """initialize() reports each step it takes, and nothing the second time (also from another
    store object)."""
    store = incident.open_event_store(url)
    assert store.initialize() == FRESH_FILE
    assert store.initialize() == []
    assert incident.open_event_store(url).initialize() == []
    assert raw(url, "SELECT version, description FROM incident_schema") == [(4, "the event log")]
    # each index is a page written at every commit: only the streams' one is kept
    assert events_indexes(url) == ["sqlite_autoindex_events_1"]


FRESH_FILE = [
    "created table incident_schema",
    "created table events",
    "created table incident_idempotency",
    "created table incident_owed",
    "recorded schema version 4 (the event log)",
]


def events_indexes(url: str) -> list[str]:
    rows = raw(url, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'")
    return sorted(name for (name,) in rows)


def test_tables_are_created_on_first_use(url: str) -> None:
    """A fresh file works without initialize(): the first use creates the tables."""
    store = incident.open_event_store(url)
    assert store.get("nobody") == []
    assert store.initialize() == []


def test_a_file_from_a_newer_release_is_refused(url: str) -> None:
    """A schema version this release does not know is a StoreError, not a silent misread."""
    incident.open_event_store(url).initialize()
    raw(url, "INSERT INTO incident_schema VALUES (99, 'the future', '2100-01-01')")
    with pytest.raises(incident.StoreError, match="schema version 99"):
        incident.open_event_store(url).get("a")


def test_the_event_row_holds_readable_columns(store: SQLiteEventStore, url: str) -> None:
    """Plain SQL sees the envelope: JSON text payloads, ISO dates, the schema version."""

    class Renamed(incident.Event, tag="AccountRenamed"):
        name: str
        schema_version: ClassVar[int] = 3

    [recorded] = store.append(
        "acc-1", [Renamed(name="Ann")], expected_version=0, aggregate="bank_account"
    )
    [row] = raw(
        url,
        "SELECT position, event_id, aggregate, version, event_type, schema_version, "
        "event_date, json_extract(data, '$.name'), metadata FROM events",
    )
    assert row == (
        1,
        recorded.event_id,
        "bank_account",
        1,
        "AccountRenamed",
        3,
        recorded.event_date.isoformat(timespec="microseconds"),
        "Ann",
        "{}",
    )


# -- one transaction per command -------------------------------------------------------


def test_events_and_projections_commit_together(url: str) -> None:
    """If writing the projections fails, the events are not stored either."""
    store = open_sqlite(url)

    def failing_projection(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError, match="handler bug"):
        store.append_and_project(
            "ACC1",
            deposits(5),
            expected_version=0,
            aggregate="bank_account",
            metadata=None,
            projection_store=store.projections(),
            project=failing_projection,
        )
    assert store.get("ACC1") == []
    assert store.projections().get(BankAccount, "ACC1") is None


def test_one_command_is_one_commit(url: str) -> None:
    """The events and the projections of a command share one write transaction."""
    handler = bank.build(url)
    handler.dispatch(bank.OpenAccount(aggregate_id="ACC1"))  # tables exist from here on
    assert isinstance(handler.event_store, SQLiteEventStore)
    statements: list[str] = []
    conn = handler.event_store._db.write_conn()
    conn.set_trace_callback(statements.append)
    handler.dispatch(DepositMoney(aggregate_id="ACC1", amount=5))
    conn.set_trace_callback(None)
    assert [s for s in statements if s in {"BEGIN IMMEDIATE", "COMMIT"}] == [
        "BEGIN IMMEDIATE",
        "COMMIT",
    ]
    assert any(s.startswith("INSERT INTO events") for s in statements)
    assert any(s.startswith('INSERT INTO "bank_account"') for s in statements)


def test_a_projection_store_opened_on_the_same_file_shares_the_transaction(url: str) -> None:
    """Same file (even through another object) means one transaction; other files, memory
    stores and separate in-memory databases do not."""
    events = open_sqlite(url)
    same_file = incident.open_projection_store(url)
    other_file = incident.open_projection_store(url.replace("bank.db", "other.db"))
    assert events.shares_database_with(same_file)
    assert not events.shares_database_with(other_file)
    assert not events.shares_database_with(incident.open_projection_store("memory://"))
    assert not open_sqlite("sqlite://").shares_database_with(open_sqlite("sqlite://").projections())
    app = bank.build(url, url)  # two URLs naming one file: still one transaction
    assert app.event_store.shares_database_with(app.projection_store)
    app.dispatch(bank.OpenAccount(aggregate_id="ACC1"))
    row = app.projection_store.get(BankAccount, "ACC1")
    assert row is not None and row.version == 1


def test_projections_in_another_store_follow_the_commit(url: str) -> None:
    """With the read models in another store, the events commit first and the projections
    follow; the SQLite file gets no projection table."""
    handler = bank.build(url, "memory://")
    handler.dispatch(bank.OpenAccount(aggregate_id="ACC1"))
    handler.dispatch(DepositMoney(aggregate_id="ACC1", amount=7))
    row = handler.projection_store.get(BankAccount, "ACC1")
    assert row is not None and row.balance == 7
    assert raw(url, "SELECT name FROM sqlite_master WHERE name = 'bank_account'") == []


# -- projection tables ---------------------------------------------------------------


class Address(msgspec.Struct):
    street: str
    city: str


class Customer(incident.Projection):
    aggregate_id: str
    name: str
    score: float
    vip: bool
    version: int
    since: dt.datetime
    tags: list[str]
    address: Address
    nickname: str | None = None
    blob: bytes = b""


def customer(version: int = 1, **changes: Any) -> Customer:
    fields: dict[str, Any] = {
        "aggregate_id": "C1",
        "name": "Ann",
        "score": 4.5,
        "vip": True,
        "version": version,
        "since": dt.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=dt.UTC),
        "tags": ["a", "b"],
        "address": Address(street="1 Main St", city="Oslo"),
        "blob": b"\x00\x01",
    }
    return Customer(**{**fields, **changes})


def test_projection_tables_have_typed_columns(url: str) -> None:
    """One table per Projection type, typed from its fields, keyed by aggregate_id; nested
    values are JSON text that SQL can reach into."""
    projections = incident.open_projection_store(url)
    projections.project(customer())
    table = sqlite_utils.Database(sqlite_store.sqlite_path(url))["customer"]
    assert table.pks == ["aggregate_id"]
    types = {c.name: c.type for c in table.columns}
    assert types == {
        "aggregate_id": "TEXT",
        "name": "TEXT",
        "score": "REAL",
        "vip": "INTEGER",
        "version": "INTEGER",
        "since": "TEXT",
        "tags": "TEXT",
        "address": "TEXT",
        "nickname": "TEXT",
        "blob": "BLOB",
    }
    assert raw(url, "SELECT json_extract(address, '$.city'), vip, since FROM customer") == [
        ("Oslo", 1, "2024-02-29T12:30:15.123456Z")
    ]


def test_projections_round_trip_exactly(url: str) -> None:
    """Every field comes back equal; an aware datetime as the same instant in UTC, as on
    every store (docs/storable.md)."""
    projections = incident.open_projection_store(url)
    oslo = dt.timezone(dt.timedelta(hours=2))
    for row in (
        customer(),
        customer(version=2, nickname="A", tags=[], since=dt.datetime(2025, 1, 1, tzinfo=oslo)),
    ):
        projections.project(row)
        stored = projections.get(Customer, "C1")
        assert stored == row
        assert stored is not None and stored.since.utcoffset() == dt.timedelta(0)
    assert projections.all(Customer) == [stored]


def test_a_field_added_later_gets_its_column(url: str) -> None:
    """A Projection class redefined with a new field gets its column, even in the same process."""

    class Account(incident.Projection):
        aggregate_id: str
        balance: int

    projections = incident.open_projection_store(url)
    projections.project(Account(aggregate_id="A", balance=1))

    class Account(incident.Projection):  # type: ignore[no-redef]  # as in a notebook
        aggregate_id: str
        balance: int
        owner: str = "nobody"

    projections.project(Account(aggregate_id="B", balance=2, owner="Bo"))
    assert projections.get(Account, "B") == Account(aggregate_id="B", balance=2, owner="Bo")
    assert raw(url, "SELECT aggregate_id, owner FROM account ORDER BY 1") == [
        ("A", None),
        ("B", "Bo"),
    ]


def test_a_table_created_in_a_rolled_back_transaction_is_made_again(url: str) -> None:
    """Creating a projection table is part of the command's transaction: undone with it,
    and done again by the next command."""

    class Fresh(incident.Projection):
        aggregate_id: str

    class Misfit(incident.Projection):
        aggregate_id: str

    raw(url, "CREATE TABLE misfit (aggregate_id TEXT)")  # no key: cannot take upserts
    store = open_sqlite(url)

    def append(*projections: incident.Projection) -> None:
        store.append_and_project(
            "a",
            deposits(1),
            expected_version=incident.ANY,
            aggregate=None,
            metadata=None,
            projection_store=store.projections(),
            project=lambda recorded: projections,
        )

    with pytest.raises(incident.IncidentError, match="not keyed by"):
        append(Fresh(aggregate_id="a"), Misfit(aggregate_id="a"))
    assert raw(url, "SELECT name FROM sqlite_master WHERE name = 'fresh'") == []
    assert store.get("a") == []
    append(Fresh(aggregate_id="a"))
    assert store.projections().all(Fresh) == [Fresh(aggregate_id="a")]


def test_the_key_column_need_not_come_first(url: str) -> None:
    """The version guard and the winner lookup use aggregate_id wherever the field is declared."""

    class Late(incident.Projection):
        version: int
        label: str
        aggregate_id: str

    projections = incident.open_projection_store(url)
    projections.project(Late(version=2, label="new", aggregate_id="k"))
    assert projections.project(Late(version=1, label="old", aggregate_id="k")).label == "new"
    assert projections.get(Late, "k") == Late(version=2, label="new", aggregate_id="k")


def test_the_version_guard_holds_across_store_objects(url: str) -> None:
    """Two store objects (as two processes would have) cannot move a row backwards."""
    first, second = incident.open_projection_store(url), incident.open_projection_store(url)
    first.project(customer(version=5, name="newest"))
    winner = second.project(customer(version=4, name="stale"))
    assert (winner.version, winner.name) == (5, "newest")
    assert raw(url, "SELECT version, name FROM customer") == [(5, "newest")]


def test_two_projection_types_cannot_share_a_table(url: str) -> None:
    """Two classes mapping to one table, or to the event store's tables, are refused;
    table_name chooses another."""
    projections = incident.open_projection_store(url)

    class Customer(incident.Projection):  # same name as the module's, another module path
        aggregate_id: str

    projections.project(customer())
    with pytest.raises(incident.IncidentError, match="both be stored in table 'customer'"):
        projections.project(Customer(aggregate_id="x"))

    class Events(incident.Projection):
        aggregate_id: str

    with pytest.raises(incident.IncidentError, match="incident keeps for itself"):
        projections.project(Events(aggregate_id="x"))

    class Renamed(incident.Projection):
        aggregate_id: str
        table_name: ClassVar[str] = "customer_names"

    projections.project(Renamed(aggregate_id="x"))
    assert raw(url, "SELECT aggregate_id FROM customer_names") == [("x",)]


def test_a_projection_that_cannot_be_stored_writes_nothing(url: str) -> None:
    """A value that does not encode is refused before anything is written."""

    class Loose(incident.Projection):
        aggregate_id: str
        extra: Any

    projections = incident.open_projection_store(url)
    with pytest.raises(incident.IncidentError, match="Cannot store"):
        projections.project(Loose(aggregate_id="x", extra=object()))
    assert projections.all(Loose) == []


# -- reading ------------------------------------------------------------------------


def test_reads_stream_in_batches(store: SQLiteEventStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_all and stream() fetch a batch at a time as they are consumed, so a reader
    holds one batch, not the log (it also sees what commits while it reads)."""
    monkeypatch.setattr(reading, "BATCH", 3)
    store.append("a", deposits(*range(1, 8)), expected_version=0)
    log = store.read_all()
    assert [next(log).position for _ in range(3)] == [1, 2, 3]
    store.append("a", deposits(8), expected_version=7)
    assert [r.position for r in log] == [4, 5, 6, 7, 8]
    assert [r.version for r in store.stream("a", after=2)] == [3, 4, 5, 6, 7, 8]
    assert [r.position for r in store.read_all(after=1, limit=5)] == [2, 3, 4, 5, 6]
    assert [r.position for r in store.read_all(limit=6)] == [1, 2, 3, 4, 5, 6]
    assert bank.bank_account.fold(
        store.stream("a"), bank.AccountState(account_number="a")
    ).balance == sum(range(1, 9))


def test_events_reads_payloads_only(
    store: SQLiteEventStore, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """events() is what a fold needs: the payloads in version order, in batches; bad rows
    still raise."""
    monkeypatch.setattr(reading, "BATCH", 2)
    store.append("a", deposits(1, 2, 3, 4, 5), expected_version=0)
    store.append("b", deposits(9), expected_version=0)
    assert list(store.events("a")) == deposits(1, 2, 3, 4, 5)
    assert list(store.events("a", after=1)) == deposits(2, 3, 4, 5)
    assert list(store.events("a", after=3)) == deposits(4, 5)
    assert list(store.events("nobody")) == []
    raw(url, "UPDATE events SET data = '{' WHERE position = 2")
    with pytest.raises(incident.CorruptEvent, match="position 2 of aggregate 'a'"):
        list(store.events("a"))
    raw(url, "UPDATE events SET event_type = 'Gone' WHERE position = 3")
    with pytest.raises(incident.UnknownEventType, match="Gone"):
        list(store.events("a", after=2))


def test_bad_metadata_is_a_corrupt_event(store: SQLiteEventStore, url: str) -> None:
    """A broken envelope (not only a broken payload) names its position and aggregate."""
    store.append("a", deposits(1), expected_version=0)
    raw(url, "UPDATE events SET metadata = '[1, 2' WHERE position = 1")
    with pytest.raises(incident.CorruptEvent, match="position 1 of aggregate 'a'"):
        store.get("a")


# -- driver errors -----------------------------------------------------------------------


def test_driver_errors_are_store_errors(tmp_path: Path) -> None:
    """A failure inside sqlite3 surfaces as StoreError with the driver's error chained."""
    missing = incident.open_event_store(f"sqlite:///{tmp_path}/no/such/dir/x.db")
    with pytest.raises(incident.StoreError) as caught:
        missing.get("a")
    assert isinstance(caught.value.__cause__, sqlite3.Error)


def test_a_closed_store_says_so(url: str) -> None:
    """Using a closed store is a StoreError that says it is closed."""
    store = incident.open_event_store(url)
    store.close()
    with pytest.raises(incident.StoreError, match="closed"):
        store.get("a")


# -- threads ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "memory"])
def test_racing_threads_get_concurrency_errors_not_locks(url: str, where: str) -> None:
    """Eight threads append to a new stream at once: one wins, seven get ConcurrencyError."""
    store = open_sqlite(url if where == "file" else "sqlite://")
    store.initialize()
    start = threading.Barrier(8)

    def race(i: int) -> str:
        start.wait()
        try:
            store.append("acc", deposits(i + 1), expected_version=0)
        except incident.ConcurrencyError:
            return "conflict"
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(race, range(8)))
    assert outcomes == ["conflict"] * 7 + ["ok"]
    assert [r.version for r in store.get("acc")] == [1]
    store.close()


# -- processes (spawned, so each has its own SQLite connections and locks) -------------


@pytest.mark.slow
def test_five_processes_withdraw_24_from_100(url: str) -> None:
    """Exactly four withdrawals succeed; the balance is 4, on disk and in the projection."""
    setup = bank.build(url)
    setup.dispatch(bank.OpenAccount(aggregate_id="ACC1"))
    setup.dispatch(DepositMoney(aggregate_id="ACC1", amount=100))
    setup.event_store.close()

    outcomes = run_processes(withdraw_in_process, url, processes=5)

    assert sorted(outcomes) == ["no_enough_balance", "ok", "ok", "ok", "ok"]
    check = bank.build(url)
    row = check.projection_store.get(BankAccount, "ACC1")
    assert row is not None and (row.balance, row.version) == (4, 6)
    assert check.state("bank_account", "ACC1").balance == 4
    assert [r.version for r in check.event_store.get("ACC1")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_processes_depositing_at_once_lose_nothing(url: str) -> None:
    """Four processes make 150 deposits each on one account: all 600 are there, versions
    and positions gapless, and the projection agrees. (synchronous=NORMAL keeps the run
    short; durability does not change who wins the lock.)"""
    fast = f"{url}?synchronous=normal"
    setup = bank.build(fast)
    setup.dispatch(bank.OpenAccount(aggregate_id="ACC1"))
    setup.event_store.close()

    outcomes = run_processes(deposit_in_process, fast, 150, processes=4)

    assert outcomes == [150, 150, 150, 150]
    check = bank.build(fast)
    stream = check.event_store.get("ACC1")
    assert [r.version for r in stream] == list(range(1, 602))
    assert [r.position for r in check.event_store.read_all()] == list(range(1, 602))
    assert len({r.event_id for r in stream}) == 601
    row = check.projection_store.get(BankAccount, "ACC1")
    assert row is not None and (row.balance, row.version) == (600, 601)


@pytest.mark.slow
def test_processes_initializing_at_once_take_turns(url: str) -> None:
    """One process creates the tables and says so; the others find nothing to do."""
    outcomes = run_processes(initialize_in_process, url, processes=3)
    assert sorted(outcomes, key=len) == [[], [], FRESH_FILE]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connection(store: SQLiteEventStore) -> None:
    """A store used before a fork keeps working in the child and in the parent."""
    store.append("parent", deposits(1), expected_version=0)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=append_after_fork, args=(store, results))
    child.start()
    assert results.get(timeout=60) == ["parent", "forked"]
    child.join(timeout=60)
    assert child.exitcode == 0
    store.append("parent", deposits(2), expected_version=1)
    assert [r.aggregate_id for r in store.read_all()] == ["parent", "forked", "parent"]


def test_event_ids_are_distinct_version_4_uuids(store: SQLiteEventStore, url: str) -> None:
    """Event ids are random UUIDs made by incident, one per event (no index enforces
    it: 122 random bits do, and an index would cost a page at every commit)."""
    for version in range(0, 200, 4):
        store.append("a", deposits(1, 2, 3, 4), expected_version=version)
    ids = [row[0] for row in raw(url, "SELECT event_id FROM events ORDER BY position")]
    assert len(ids) == len(set(ids)) == 200
    assert {uuid.UUID(i).version for i in ids} == {4}


def test_the_projection_store_type(url: str) -> None:
    """The SQLite stores satisfy the runtime-checkable protocols."""
    assert isinstance(incident.open_projection_store(url), SQLiteProjectionStore)
    assert isinstance(incident.open_projection_store(url), incident.ProjectionStore)
    assert isinstance(incident.open_event_store(url), incident.EventStore)


# The layouts earlier releases wrote, frozen here as they shipped: a migration must
# bring exactly these files forward.
FIRST_RELEASE_LAYOUT = [
    "CREATE TABLE incident_schema (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
    "applied_at TEXT NOT NULL)",
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        aggregate_id TEXT NOT NULL,
        aggregate TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        schema_version INTEGER NOT NULL DEFAULT 1,
        event_date TEXT NOT NULL,
        data TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        UNIQUE (aggregate_id, version)
    )""",
    "CREATE INDEX events_by_type ON events (event_type, position)",
    "INSERT INTO incident_schema VALUES (1, 'the event log', '2026-01-01T00:00:00+00:00')",
]
SECOND_RELEASE_STEPS = [
    "CREATE TABLE incident_idempotency (key TEXT PRIMARY KEY, "
    "first_position INTEGER NOT NULL, last_position INTEGER NOT NULL)",
    "INSERT INTO incident_schema VALUES (2, 'idempotency keys', '2026-02-01T00:00:00+00:00')",
]
# release 3 made fresh files with this layout (events with one index, keys without outcomes)
THIRD_RELEASE_LAYOUT = [
    "CREATE TABLE incident_schema (version INTEGER PRIMARY KEY, description TEXT NOT NULL, "
    "applied_at TEXT NOT NULL)",
    """CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        aggregate TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        schema_version INTEGER NOT NULL DEFAULT 1,
        event_date TEXT NOT NULL,
        data TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        UNIQUE (aggregate_id, version)
    )""",
    """CREATE TABLE incident_idempotency (
        key TEXT PRIMARY KEY,
        first_position INTEGER NOT NULL,
        last_position INTEGER NOT NULL
    )""",
    "INSERT INTO incident_schema VALUES (3, 'the event log', '2026-11-01T00:00:00+00:00')",
]
OLD_ROWS = [
    (
        1,
        "e1",
        "A",
        "bank_account",
        1,
        "AccountOpened",
        1,
        "2026-01-01T00:00:00.000000+00:00",
        '{"type":"AccountOpened","account_number":"A"}',
        "{}",
    ),
    (
        2,
        "e2",
        "B",
        "bank_account",
        1,
        "AccountOpened",
        1,
        "2026-01-01T00:00:01.000000+00:00",
        '{"type":"AccountOpened","account_number":"B"}',
        '{"correlation_id":"c"}',
    ),
    (
        3,
        "e3",
        "A",
        "bank_account",
        2,
        "MoneyDeposited",
        1,
        "2026-01-01T00:00:02.000000+00:00",
        '{"type":"MoneyDeposited","amount":5}',
        "{}",
    ),
]


def old_file(url: str, *, release: int) -> None:
    """A file as release 1 or 2 left it, with events, and a user's index, view and trigger."""
    layout = {
        1: FIRST_RELEASE_LAYOUT,
        2: FIRST_RELEASE_LAYOUT + SECOND_RELEASE_STEPS,
        3: THIRD_RELEASE_LAYOUT,
    }[release]
    with closing(sqlite3.connect(sqlite_store.sqlite_path(url))) as conn, conn:
        for sql in layout:
            conn.execute(sql)
        conn.executemany(f"INSERT INTO events VALUES ({', '.join('?' * 10)})", OLD_ROWS)
        conn.execute("CREATE INDEX my_events_by_date ON events (event_date)")
        conn.execute(
            "CREATE VIEW my_deposits AS SELECT count(*) FROM events "
            "WHERE event_type = 'MoneyDeposited'"
        )
        conn.execute("CREATE TABLE my_audit (position INTEGER)")
        conn.execute(
            "CREATE TRIGGER my_audit_insert AFTER INSERT ON events "
            "BEGIN INSERT INTO my_audit VALUES (new.position); END"
        )


def events_layout(url: str) -> list[Any]:
    """incident's tables' columns and the events' unique index, as SQLite describes them."""
    return [
        raw(url, "SELECT * FROM pragma_table_info('events')"),
        raw(url, "SELECT * FROM pragma_index_info('sqlite_autoindex_events_1')"),
        raw(url, "SELECT * FROM pragma_table_info('incident_idempotency')"),
        raw(url, "SELECT * FROM pragma_table_info('incident_owed')"),
        raw(url, "SELECT * FROM pragma_index_info('sqlite_autoindex_incident_owed_1')"),
    ]


REBUILT = "rebuilt table events with one index instead of three (3 events copied)"
SCHEMA_4 = [
    "added column incident_idempotency.rejected",
    "added column incident_idempotency.detail",
    "created table incident_owed",
    "recorded schema version 4 (remembered rejections and owed follow-ups)",
]


@pytest.mark.parametrize(
    ("release", "steps"),
    [
        (
            1,
            [
                "created table incident_idempotency",
                "recorded schema version 2 (idempotency keys)",
                REBUILT,
                "recorded schema version 3 (one index on events)",
                *SCHEMA_4,
            ],
        ),
        (2, [REBUILT, "recorded schema version 3 (one index on events)", *SCHEMA_4]),
        (3, SCHEMA_4),
    ],
)
def test_a_file_from_an_earlier_release_is_migrated_to_the_current_layout(
    url: str, release: int, steps: list[str]
) -> None:
    """Every row comes through unchanged (positions, ids, dates, payloads); only the
    unused indexes go, and what the user added to the table stays and keeps working."""
    old_file(url, release=release)
    store = incident.open_event_store(url)
    assert store.initialize() == steps
    assert store.initialize() == []
    assert raw(url, "SELECT * FROM events ORDER BY position") == OLD_ROWS
    versions = [v for (v,) in raw(url, "SELECT version FROM incident_schema")]
    assert versions == ([3, 4] if release == 3 else [1, 2, 3, 4])
    assert events_indexes(url) == ["my_events_by_date", "sqlite_autoindex_events_1"]
    fresh = f"{url}.fresh.db"
    incident.open_event_store(fresh).initialize()
    assert events_layout(url) == events_layout(fresh)  # as if made by this release
    assert [(r.version, r.event_type) for r in store.get("A")] == [
        (1, "AccountOpened"),
        (2, "MoneyDeposited"),
    ]
    store.append("A", deposits(7), expected_version=2)
    assert raw(url, "SELECT * FROM my_deposits") == [(2,)]
    assert raw(url, "SELECT position FROM my_audit") == [(4,)]
    with pytest.raises(incident.ConcurrencyError):
        store.append("A", deposits(1), expected_version=2)
    store.close()


def test_a_long_rebuild_is_announced_before_it_starts(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Copying a large log takes seconds per million events: a warning says so first."""
    old_file(url, release=2)
    monkeypatch.setattr(migrations, "ANNOUNCED_REBUILD", 3)
    with caplog.at_level("WARNING", logger="incident.stores.sqlite"):
        assert incident.open_event_store(url).initialize()[0] == REBUILT
    assert "copies its 3 events once" in caplog.text


def test_a_migration_that_fails_leaves_the_file_as_it_was(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuild runs in the migration's transaction: a failure after the copy rolls
    the whole of it back, and the file still opens with the release that made it."""
    old_file(url, release=2)
    before = raw(url, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    def rebuild_then_fail(conn: sqlite3.Connection) -> str:
        migrations._rebuild_events(conn)
        raise sqlite3.OperationalError("disk I/O error")

    failing = [*migrations.MIGRATIONS[:-1], (3, "one index on events", [rebuild_then_fail])]
    monkeypatch.setattr(migrations, "MIGRATIONS", failing)
    with pytest.raises(incident.StoreError, match="disk I/O error"):
        incident.open_event_store(url).initialize()
    assert raw(url, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == before
    assert raw(url, "SELECT * FROM events ORDER BY position") == OLD_ROWS
    assert [v for (v,) in raw(url, "SELECT version FROM incident_schema")] == [1, 2]


def test_a_fold_batch_is_read_through_the_stream_index(store: SQLiteEventStore) -> None:
    """The fold joins a batch's payloads in one aggregate (``JOINED``), which keeps the
    order of the rows it is fed: that is version order only while the scan walks the
    UNIQUE (aggregate_id, version) index, so a planner that chose another plan would
    fold events out of order. This pins the plan."""
    store.append("A", [MoneyDeposited(amount=1)], expected_version=0)
    plan = store._db.conn().execute(f"EXPLAIN QUERY PLAN {JOINED}", (10, "A", 0, 4096)).fetchall()
    # the outer scan (the subquery asking whether the stream goes on comes after it)
    outer = [step for step in plan if step[1] == 0]
    assert outer[0][-1] == (
        "SEARCH events USING INDEX sqlite_autoindex_events_1 "
        "(aggregate_id=? AND version>? AND version<?)"
    ), plan
