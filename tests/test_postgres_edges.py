"""Edges of the Postgres store (incident/stores/postgres/): a read model the server
refuses after the events were sent, a session the server ends in the middle of an
append (its own pg_terminate_backend, from a trigger, so it lands deterministically),
schemas whose names need quoting and those no statement could hold, migrations two
processes run at once, a batch interrupted or left in doubt, waits on a closed store,
and the arguments an append is refused with before the database is touched."""

from __future__ import annotations

import datetime as dt
import linecache
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import psycopg
import psycopg_pool
import pytest
from conftest import Admin, on_backends, postgres_server
from interrupts import signal_main_when, sigusr1_raises
from psycopg import sql
from sqlite_batches import account

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.postgres import PostgresEventStore, split_url
from incident.stores.postgres import batch as batch_module
from incident.stores.postgres import numbered as numbered_module
from incident.stores.postgres.durability import lsn
from incident.stores.postgres.session import lock_key
from incident.stores.protocols import AppendRequest, CommitCall, Committed, Effects, Owed

pytestmark = pytest.mark.postgres

WAIT = 10.0  # seconds any bounded wait on a condition may take at most


def open_store(url: str, **options: Any) -> PostgresEventStore:
    store = incident.open_event_store(url, **options)
    assert isinstance(store, PostgresEventStore)
    store.types.register(*bank.bank_account.event_types)
    return store


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresEventStore]:
    with closing(open_store(postgres_url)) as opened:
        opened.initialize()
        yield opened


def deposit(aggregate_id: str, expected: object = 0, key: str | None = None) -> AppendRequest:
    return AppendRequest(
        aggregate_id=aggregate_id,
        events=[MoneyDeposited(amount=1), MoneyDeposited(amount=2)],
        expected_version=expected,
        aggregate="bank_account",
        idempotency_key=key,
    )


def project_into(store: PostgresEventStore, request: AppendRequest) -> list[incident.Recorded[Any]]:
    return store.append_and_project(
        request.aggregate_id,
        request.events,
        expected_version=request.expected_version,
        aggregate=request.aggregate,
        metadata=None,
        projection_store=store.projections(),
        project=account,
    )


def positions(store: PostgresEventStore) -> list[tuple[int, str, int]]:
    return [(r.position, r.aggregate_id, r.version) for r in store.read_all()]


def trigger(admin: Admin, schema: str, table: str, body: str) -> None:
    """A BEFORE INSERT row trigger on ``schema.table`` running the plpgsql ``body``."""
    function = sql.Identifier(schema, f"edge_{uuid.uuid4().hex[:8]}")
    admin.execute(
        sql.SQL(
            "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN {} RETURN NEW; END $$"
        ).format(function, sql.SQL(body))  # type: ignore[arg-type]
    )
    admin.execute(
        sql.SQL(
            "CREATE TRIGGER edge BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION {}()"
        ).format(sql.Identifier(schema, table), function)
    )


# -- a read model the server refuses after the events were sent -----------------------


def test_a_read_model_the_server_refuses_rolls_back_its_events(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """The upsert of the append's read model fails in the server, after its events' rows
    were sent in the same transaction: neither is kept, whichever way the append went
    (locked, predicted after a first append of this store), and the log stays gapless."""
    schema = store._db.schema
    store.projections().ensure_table(BankAccount)
    table = store.projections().queries(BankAccount)[0]
    trigger(
        postgres_admin,
        schema,
        table,
        "IF NEW.aggregate_id LIKE 'poison%' THEN RAISE EXCEPTION 'refused read model'; END IF;",
    )
    for attempt in range(3):  # the first append and those predicted after it
        with pytest.raises(incident.StoreError, match="refused read model"):
            project_into(store, deposit(f"poison{attempt}"))
        assert store.get(f"poison{attempt}") == [] and store.version(f"poison{attempt}") == 0
        assert store.projections().get(BankAccount, f"poison{attempt}") is None
        project_into(store, deposit(f"fine{attempt}"))
    assert [p for p, _, _ in positions(store)] == list(range(1, 7))
    assert [r.aggregate_id for r in store.projections().all(BankAccount)] == [
        "fine0",
        "fine1",
        "fine2",
    ]


def test_a_read_model_the_server_refuses_in_a_batch_harms_only_its_append(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """In one transaction with others (commit_many), the refused upsert aborts the
    batch; each append goes again alone, so only the poisoned one fails, with nothing of
    it stored, and the others are stored once with their read models."""
    store.projections().ensure_table(BankAccount)
    table = store.projections().queries(BankAccount)[0]
    trigger(
        postgres_admin,
        store._db.schema,
        table,
        "IF NEW.aggregate_id = 'poison' THEN RAISE EXCEPTION 'refused read model'; END IF;",
    )
    calls = [
        CommitCall(deposit(name), store.projections(), account) for name in ["a", "poison", "b"]
    ]
    first, poisoned, last = store.commit_many(calls)
    assert isinstance(first, Committed) and isinstance(last, Committed)
    assert isinstance(poisoned, incident.StoreError) and "refused read model" in str(poisoned)
    assert positions(store) == [(1, "a", 1), (2, "a", 2), (3, "b", 1), (4, "b", 2)]
    assert [r.aggregate_id for r in store.projections().all(BankAccount)] == ["a", "b"]


# -- a session the server ends in the middle of an append ------------------------------


def kill_own_session(admin: Admin, schema: str, times: int) -> None:
    """The events table's inserts end their own session (pg_terminate_backend of
    pg_backend_pid()) the first ``times`` times: a sequence counts them, and a sequence
    is not rolled back with the transaction it was used in."""
    counter = sql.Identifier(schema, "edge_kills")
    admin.execute(sql.SQL("CREATE SEQUENCE {}").format(counter))
    literal = sql.Literal(counter.as_string(admin))
    body = sql.SQL(
        "IF nextval({}) <= {} THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;"
    ).format(literal, sql.Literal(times))
    trigger(admin, schema, "events", body.as_string(admin))


@pytest.mark.parametrize("first", ["first append", "predicted"])
def test_a_session_ended_mid_append_is_tried_again_and_stored_once(
    store: PostgresEventStore, postgres_admin: Admin, first: str
) -> None:
    """The session dies in its INSERT, before COMMIT: nothing is in the log, so the same
    append goes again on a new connection and is stored once, and the next one follows."""
    if first == "predicted":
        store.append("before", [MoneyDeposited(amount=1)], expected_version=0)
    known = len(positions(store))
    kill_own_session(postgres_admin, store._db.schema, 1)
    recorded = project_into(store, deposit("acc"))
    assert [r.event_id for r in store.get("acc")] == [r.event_id for r in recorded]
    assert [p for p, _, _ in positions(store)] == list(range(1, known + 3))
    row = store.projections().get(BankAccount, "acc")
    assert row is not None and row.event_id == recorded[-1].event_id
    assert store.append("acc", [MoneyDeposited(amount=3)], expected_version=2)[0].version == 3


def test_a_session_ended_twice_mid_append_says_nothing_was_stored(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """Both tries die before COMMIT: a StoreError that says nothing was stored (looked
    up) and that trying again is safe; not CommitUnknown. And trying again works."""
    kill_own_session(postgres_admin, store._db.schema, 2)
    with pytest.raises(incident.StoreError, match="nothing was stored") as caught:
        project_into(store, deposit("acc"))
    assert not isinstance(caught.value, incident.CommitUnknown)
    assert store.get("acc") == [] and store.projections().get(BankAccount, "acc") is None
    assert [r.position for r in project_into(store, deposit("acc"))] == [1, 2]


def test_a_session_ended_mid_batch_stores_each_append_once(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """commit_many's transaction dies in its first INSERT: none of the batch is in the
    log, so each append goes again alone, each stored once, in order."""
    kill_own_session(postgres_admin, store._db.schema, 1)
    outcomes = store.commit_many(
        [CommitCall(deposit(name), store.projections(), account) for name in "abc"]
    )
    assert all(isinstance(outcome, Committed) for outcome in outcomes), outcomes
    assert [s for _, s, _ in positions(store)] == ["a", "a", "b", "b", "c", "c"]
    assert [r.aggregate_id for r in store.projections().all(BankAccount)] == ["a", "b", "c"]


# -- a row written past the append lock ------------------------------------------------


def test_a_row_that_bypassed_the_lock_is_a_clean_conflict(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """A writer outside the store (here a trigger, deterministically) takes the stream's
    version between the heads and the insert: the unique constraint refuses the row and
    the append is a ConcurrencyError, nothing of it written, not a bare driver error."""
    trigger(
        postgres_admin,
        store._db.schema,
        "events",
        f"""IF pg_trigger_depth() = 1 AND NEW.aggregate_id = 'raced' THEN
            INSERT INTO {sql.Identifier(store._db.schema, "events").as_string(postgres_admin)}
            SELECT NEW.position + 1000, gen_random_uuid(), NEW.aggregate_id, NEW.aggregate,
                NEW.version, NEW.event_type, NEW.schema_version, NEW.event_date, NEW.data,
                NEW.metadata;
        END IF;""",
    )
    for attempt in range(2):  # the first append, then one predicted
        with pytest.raises(incident.ConcurrencyError) as caught:
            store.append("raced", [MoneyDeposited(amount=1)], expected_version=0)
        assert caught.value.actual == 0 and store.get("raced") == []
        store.append(f"fine{attempt}", [MoneyDeposited(amount=1)], expected_version=0)
    assert [p for p, _, _ in positions(store)] == [1, 2]


# -- schema names that need quoting ---------------------------------------------------

ODD_SCHEMAS = [
    'Odd "Schema"',  # a double quote, a space and capitals
    "semi;colon -- and 'quote'",
    "amp&amp=sign?#+",  # the URL's own characters
    "ünïcødé ☃",
    "$dollar$ $tag$",  # dollars, as long as no two are side by side
]


@pytest.fixture(params=ODD_SCHEMAS)
def odd_schema(request: pytest.FixtureRequest) -> Iterator[str]:
    """A schema name that only works quoted, made unique to this test, dropped after."""
    schema = f"{request.param} {uuid.uuid4().hex[:8]}"
    yield schema
    with psycopg.connect(postgres_server(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_a_schema_name_that_needs_quoting_works_end_to_end(odd_schema: str) -> None:
    """Named in the URL (percent-encoded) or as the option: the tables are made there,
    and appends by every path, reads, read models, checkpoints, a live tail woken by its
    NOTIFY, and a second initialize all work, in that schema alone."""
    url = f"{postgres_server()}?schema={quote(odd_schema, safe='')}"
    with closing(open_store(url)) as store:
        assert store._db.schema == odd_schema
        assert store.initialize()
        store.append("a", [MoneyDeposited(amount=1)], expected_version=0)  # locked
        store.append("a", [MoneyDeposited(amount=2)], expected_version=1)  # predicted
        project_into(store, deposit("b"))
        outcomes = store.commit_many(
            [CommitCall(deposit(name), store.projections(), account) for name in "cd"]
        )
        assert all(isinstance(outcome, Committed) for outcome in outcomes), outcomes
        with store.turn("a"):
            store.append("a", [MoneyDeposited(amount=3)], expected_version=2)
        assert [p for p, _, _ in positions(store)] == list(range(1, 10))
        assert [r.aggregate_id for r in store.projections().all(BankAccount)] == ["b", "c", "d"]
        checkpoints = incident.stores.checkpoint_store_for(store)
        checkpoints.initialize()
        with closing(open_store(postgres_server(), schema=odd_schema)) as same:
            assert same.initialize() == []  # migrated already, found quoted
            assert same.version("a") == 3
            live = same.subscribe(after=9)
            woken: list[int] = []
            reader = threading.Thread(target=lambda: woken.append(next(live).position))
            reader.start()
            store.append("e", [MoneyDeposited(amount=1)], expected_version=0)
            reader.join(WAIT)
            live.close()
            assert woken == [10]
    with psycopg.connect(postgres_server(), autocommit=True) as admin:
        tables = admin.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = 'events'",
            [odd_schema],
        ).fetchone()
        assert tables == (1,)


# -- migrations two processes run at once ---------------------------------------------

MIGRATE = """
import sys, incident
store = incident.open_event_store(sys.argv[1])
print(len(store.initialize()))
store.close()
"""


def test_two_processes_migrating_one_schema_at_once_each_migration_runs_once(
    postgres_url: str, postgres_admin: Admin, tmp_path: Path
) -> None:
    """Two processes initialize a schema that does not exist yet, both queued on the
    schema's migration lock when it is let go: one creates everything, the other finds
    it all done (no duplicate schema, table or migration error), and the store works."""
    with closing(open_store(postgres_url)) as store:
        lock = store._db.migrate_lock
        schema = store._db.schema
    holder = psycopg.connect(postgres_server(), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", [lock])
    script = tmp_path / "migrate.py"
    script.write_text(MIGRATE)
    env_path = str(Path(incident.__file__).parent.parent)
    children = [
        subprocess.Popen(
            [sys.executable, str(script), postgres_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 30
        while True:  # both wait for the lock: neither has looked at the schema yet
            waiting = postgres_admin.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND classid::bigint = %s AND objid::bigint = %s",
                [(lock >> 32) & 0xFFFFFFFF, lock & 0xFFFFFFFF],
            ).fetchone()
            if waiting == (2,):
                break
            assert all(child.poll() is None for child in children), [
                child.communicate() for child in children
            ]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        holder.close()  # lets the lock go
    results = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], results
    done = sorted(int(out) for out, _ in results)
    assert done[0] == 0 and done[1] > 0
    names = postgres_admin.execute(
        sql.SQL("SELECT name FROM {}").format(sql.Identifier(schema, "incident_migrations"))
    ).fetchall()
    assert len(names) == len(set(names)) == done[1] - 2  # the schema and its table, then each
    with closing(open_store(postgres_url)) as store:
        assert [r.position for r in project_into(store, deposit("a"))] == [1, 2]


def test_a_percent_sign_in_a_schema_or_a_column_is_refused_before_anything_is_written(
    postgres_url: str,
) -> None:
    """The driver reads a ``%`` in a statement as a placeholder, so a schema holding one
    failed every statement with parameters (its initialize among them), and a column
    holding one failed every upsert of its table: both are refused up front instead."""
    with pytest.raises(incident.IncidentError, match="holds a %"):
        incident.open_event_store(f"{postgres_server()}?schema={quote('50%off', safe='')}")
    with pytest.raises(incident.IncidentError, match="holds a %"):
        incident.open_event_store(postgres_server(), schema="50%off")
    with pytest.raises(incident.IncidentError, match="holds \\$\\$"):  # its functions' bodies
        incident.open_event_store(postgres_server(), schema="price$$")

    class Rate(incident.Projection):
        aggregate_id: str
        rate: int = msgspec.field(name="rate%of")

    with closing(open_store(postgres_url)) as store:
        with pytest.raises(incident.IncidentError, match="holds a %"):
            store.projections().project(Rate(aggregate_id="x", rate=3))
        assert store.initialize()  # nothing was made before the refusal


# -- a batch whose commit cannot be looked up, or whose writer is interrupted ----------


def test_a_batch_whose_commit_cannot_be_looked_up_tells_each_command_its_own_ids(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch committed, then its connection died before the reply, and no
    connection comes to look it up: every append the batch wrote is CommitUnknown with
    its own events' ids (they are all in the log), the one refused before sending keeps
    its own ConcurrencyError, and none is sent again (no duplicates)."""
    store = open_store(postgres_url, timeout=0.3)
    store.initialize()
    store.append("stale", [MoneyDeposited(amount=1)], expected_version=0)
    original = batch_module.one_sync_transaction
    hidden: list[int] = []

    @contextmanager
    def commit_then_lose(conn: Any, **options: Any) -> Iterator[Any]:
        with original(conn, **options) as afterwards:
            yield afterwards
        hidden.append(1)
        conn.close()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    checkout = store._db.pool.connection

    @contextmanager
    def none_after_the_loss(timeout: float | None = None) -> Iterator[Any]:
        if hidden:
            raise psycopg_pool.PoolTimeout("couldn't get a connection")
        with checkout(timeout) as conn:
            yield conn

    monkeypatch.setattr(batch_module, "one_sync_transaction", commit_then_lose)
    monkeypatch.setattr(store._db.pool, "connection", none_after_the_loss)
    first, stale, last = store.commit_many(
        [CommitCall(deposit(name), None, None) for name in ["a", "stale", "b"]]
    )
    monkeypatch.undo()
    assert hidden == [1]
    assert isinstance(stale, incident.ConcurrencyError)
    assert isinstance(first, incident.CommitUnknown) and isinstance(last, incident.CommitUnknown)
    assert (first.aggregate_id, last.aggregate_id) == ("a", "b")
    assert first.event_ids == [r.event_id for r in store.get("a")]
    assert last.event_ids == [r.event_id for r in store.get("b")]
    assert [p for p, _, _ in positions(store)] == [1, 2, 3, 4, 5]
    store.close()


class Interrupted(KeyboardInterrupt):
    """What a Ctrl-C raises in the thread writing a batch."""


def test_an_interrupted_batch_writer_tells_each_waiting_thread_what_it_may_have_stored(
    store: PostgresEventStore,
) -> None:
    """Three threads' commits queue into one batch; the writing thread (the first) is
    interrupted in the third's inline work. Nothing committed; the second, whose rows
    were sent, is told CommitUnknown with its own ids, the third, of which nothing was
    sent, a StoreError saying nothing was stored; and the store takes commits after."""

    def interrupt(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise Interrupted

    batches = store.thread_batches
    outcomes: dict[str, BaseException | list[incident.Recorded[Any]]] = {}

    def commit(name: str, project: Any) -> None:
        request = deposit(name)
        try:
            outcomes[name] = store.append_and_project(
                name,
                request.events,
                expected_version=0,
                aggregate=request.aggregate,
                metadata=None,
                projection_store=store.projections(),
                project=project,
            )
        except BaseException as error:
            outcomes[name] = error

    with batches.mutex:
        batches.in_flight = batches.depth  # as if two commits were in flight: all queue
    threads = []
    for name, project in [("lead", account), ("sent", account), ("cut", interrupt)]:
        threads.append(threading.Thread(target=commit, args=(name, project)))
        threads[-1].start()
        deadline = time.monotonic() + WAIT
        while len(batches.queue) < len(threads):
            assert time.monotonic() < deadline
            time.sleep(0.001)
    with batches.mutex:
        batches.in_flight -= batches.depth - 1  # one place: the queue's batch
        batches.hand_on()
    for thread in threads:
        thread.join(WAIT)
    assert isinstance(outcomes["lead"], Interrupted)
    sent, cut = outcomes["sent"], outcomes["cut"]
    assert isinstance(sent, incident.CommitUnknown) and sent.aggregate_id == "sent"
    assert len(sent.event_ids) == 2
    assert isinstance(cut, incident.StoreError) and not isinstance(cut, incident.CommitUnknown)
    assert "nothing was stored" in str(cut)
    assert positions(store) == []  # the interrupted transaction rolled back
    with batches.mutex:
        assert batches.in_flight == 0 and not batches.queue
    assert [r.position for r in project_into(store, deposit("after"))] == [1, 2]
    assert store.get("sent") == []


# -- what is refused before the database is touched -----------------------------------

NOWHERE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"schema": 5}, "A schema is a name"),
        ({"pool_size": 0}, "pool_size must be an int >= 1"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ],
)
def test_bad_options_are_refused_before_connecting(options: dict[str, Any], says: str) -> None:
    """Nothing listens at NOWHERE: the refusal comes before any connection is tried."""
    with pytest.raises(incident.IncidentError, match=says):
        incident.open_event_store(NOWHERE, **options)


@pytest.mark.parametrize("store_url", ["memory", "sqlite", "postgres"], indirect=True)
def test_an_append_past_the_version_range_under_a_used_key_is_a_duplicate(
    event_store: incident.EventStore,
) -> None:
    """An expected version past any stream's range is a conflict on every store; under
    a key already used it is that key's DuplicateCommand first, as any append is."""
    event_store.append_and_project(
        "a",
        [MoneyDeposited(amount=1)],
        expected_version=0,
        aggregate=None,
        metadata=None,
        projection_store=event_store.projections(),
        project=lambda recorded: [],
        idempotency_key="k",
    )
    with pytest.raises(incident.DuplicateCommand):
        event_store.append_and_project(
            "a",
            [MoneyDeposited(amount=2)],
            expected_version=2**40,
            aggregate=None,
            metadata=None,
            projection_store=event_store.projections(),
            project=lambda recorded: [],
            idempotency_key="k",
        )
    with pytest.raises(incident.ConcurrencyError):
        event_store.append("a", [MoneyDeposited(amount=2)], expected_version=2**40)
    assert [r.version for r in event_store.get("a")] == [1]


@on_backends(["memory", "sqlite", "postgres"])
def test_a_key_no_store_can_hold_has_no_outcome(event_store: incident.EventStore) -> None:
    assert event_store.outcome_for("a\x00b") is None


def test_commit_many_answers_an_append_of_no_events_without_writing(
    store: PostgresEventStore,
) -> None:
    """An append of no events in commit_many is its stream's version check, answered
    with no events, beside the others' batch; a stale one is its ConcurrencyError."""
    store.append("s", [MoneyDeposited(amount=1)], expected_version=0)
    empty = AppendRequest(aggregate_id="s", events=[], expected_version=1)
    stale = AppendRequest(aggregate_id="s", events=[], expected_version=0)
    requests = [deposit("a"), empty, stale, deposit("b")]
    outcomes = store.commit_many([CommitCall(request, None, None) for request in requests])
    first, nothing, conflict, last = outcomes
    assert isinstance(nothing, Committed) and nothing.recorded == []
    assert isinstance(conflict, incident.ConcurrencyError) and conflict.actual == 1
    assert isinstance(first, Committed) and isinstance(last, Committed)
    assert [s for _, s, _ in positions(store)] == ["s", "a", "a", "b", "b"]


# -- read models -----------------------------------------------------------------------


def test_a_read_model_row_that_no_longer_fits_is_a_store_error(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """A row changed behind the store's back so that its class cannot be made from it
    (a required field emptied) is a StoreError naming the table, not a decode error."""
    project_into(store, deposit("a"))
    table = store.projections().queries(BankAccount)[0]
    postgres_admin.execute(
        sql.SQL("UPDATE {} SET account_number = NULL").format(
            sql.Identifier(store._db.schema, table)
        )
    )
    with pytest.raises(incident.StoreError, match=f"A row of {table} does not fit"):
        store.projections().get(BankAccount, "a")


class NotAProjection(msgspec.Struct):
    aggregate_id: str


@on_backends(["postgres"])  # every store, with InvalidArgument: tests/test_store_consistency.py
def test_a_struct_that_is_not_a_projection_is_refused(event_store: incident.EventStore) -> None:
    """Refused before a table is made for it, with the store's own error."""
    with pytest.raises(incident.IncidentError, match=r"not an incident\.Projection"):
        event_store.projections().project(NotAProjection(aggregate_id="a"))  # type: ignore[type-var]


@pytest.mark.parametrize(
    "bad",
    [
        {"balance": 2**70},  # past a bigint
        {"balance": "x"},  # a struct does not check its fields when built
        {"event_date": dt.datetime(2020, 1, 1)},  # naive, where the column holds instants
    ],
)
@on_backends(["memory", "sqlite", "postgres"])
def test_a_checkpoint_refuses_read_models_its_store_cannot_keep(
    event_store: incident.EventStore, bad: dict[str, Any]
) -> None:
    """Read models saved with a checkpoint, in its transaction, are checked as
    project() checks them: Unstorable, and neither the rows nor the checkpoint moved.
    Postgres wrote them unchecked: a naive datetime was kept as if it were UTC, and the
    others failed in the server as a StoreError."""
    checkpoints = incident.stores.checkpoint_store_for(event_store)
    checkpoints.initialize()
    good = BankAccount(
        aggregate_id="good",
        account_number="good",
        balance=1,
        version=1,
        event_id="e",
        event_date=dt.datetime.now(dt.UTC),
    )
    refused = msgspec.structs.replace(good, aggregate_id="bad", **bad)
    with pytest.raises(incident.Unstorable):
        checkpoints.save(
            "handler",
            1,
            expected=0,
            projections=[good, refused],
            projection_store=event_store.projections(),
        )
    assert checkpoints.load("handler") == 0
    assert event_store.projections().all(BankAccount) == []


# -- a closed store's waits ------------------------------------------------------------


@pytest.mark.parametrize("closing", ["event store", "projection store"])
def test_a_closed_store_opens_no_listen_session_to_wait(
    postgres_url: str, postgres_admin: Admin, closing: str
) -> None:
    """After close(), of the event store or of the projection store sharing its pool,
    waiting for appends is a StoreError, and leaves no session behind: the LISTEN
    connection used to be opened again, for good, by the first wait after close()."""
    name = f"closed-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{postgres_url}&application_name={name}")
    store.initialize()
    assert not store.wait_for_append(0, 0.01)  # its LISTEN connection is open now
    (store if closing == "event store" else store.projections()).close()
    for _ in range(2):
        with pytest.raises(incident.StoreError):
            store.wait_for_append(0, 0.01)
    with pytest.raises(incident.StoreError):
        next(store.subscribe(after=0))
    if closing == "projection store":
        store.close()  # the event store's own close, once
    deadline = time.monotonic() + WAIT
    while postgres_admin.execute(  # a closed session leaves pg_stat_activity shortly after
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name]
    ).fetchone() != (0,):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_commit_interrupted_while_queued_for_a_batch_is_never_written(
    store: PostgresEventStore,
) -> None:
    """Ctrl-C (a signal's handler raising) while the main thread waits in the queue for
    a batch: the interruption reaches the caller, the commit leaves the queue unwritten,
    and the store's next commits go through."""
    batches = store.thread_batches
    main = threading.main_thread()

    def waiting_for_its_turn() -> bool:
        """The main thread is in commit(), on the line that waits for the queue."""
        frame = sys._current_frames().get(main.ident or 0)
        while frame is not None and frame.f_code.co_name != "commit":
            frame = frame.f_back
        return frame is not None and "wake.acquire()" in linecache.getline(
            frame.f_code.co_filename, frame.f_lineno
        )

    with sigusr1_raises(Interrupted):
        with batches.mutex:
            batches.in_flight = batches.depth  # as if two commits were in flight
        # signalled once it waits for its turn, and again until it has left the queue
        sender = signal_main_when(waiting_for_its_turn, again_while=lambda: bool(batches.queue))
        with pytest.raises(Interrupted):
            store.append("gone", [MoneyDeposited(amount=1)], expected_version=0)
        sender.join(WAIT)
    with batches.mutex:
        assert not batches.queue
        batches.in_flight = 0  # the two imagined commits are over
    assert store.get("gone") == []
    assert [r.position for r in project_into(store, deposit("after"))] == [1, 2]


# -- owed work of an append whose reply was lost ----------------------------------------


def owe_for_the_last(recorded: list[incident.Recorded[Any]]) -> Effects:
    last = recorded[-1]
    owed = Owed(
        handler="mailer",
        position=last.position,  # copied, not looked at: the database may number it
        event_id=last.event_id,
        aggregate_id=last.aggregate_id,
        event_type=last.event_type,
        owed_at=last.event_date,
    )
    return Effects(owed=[owed])


def test_owed_work_of_a_numbered_append_whose_reply_was_lost_holds_the_real_position(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database numbered the append, committed it, and the reply was lost: the
    store finds the events by their ids, and the owed work it returns is made again
    from them, holding the position the database gave, as the owed row does (the one it
    sent held a placeholder)."""
    store.append("before", [MoneyDeposited(amount=1)], expected_version=0)
    original = numbered_module.prepared_message_transaction
    hidden: list[int] = []

    def sent_then_lost(conn: Any, *args: Any, **options: Any) -> Any:
        results = original(conn, *args, **options)
        if not hidden:
            hidden.append(1)
            conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return results

    monkeypatch.setattr(numbered_module, "prepared_message_transaction", sent_then_lost)
    store.predictor.missed()  # as if another process had appended: no guess
    committed = store.commit(deposit("acc"), project=owe_for_the_last)
    assert hidden == [1]  # it went the numbered way, and its reply was lost
    stored = store.get("acc")
    assert [r.event_id for r in committed.recorded] == [r.event_id for r in stored]
    (owed,) = committed.effects.owed
    assert owed.position == stored[-1].position == 3 and isinstance(owed.position, int)
    assert [(o.handler, o.position) for o in store.owed()] == [("mailer", 3)]


@pytest.mark.parametrize("way", ["predicted", "not predicting"])
def test_inline_work_that_raises_writes_nothing_and_raises_its_own_error(
    store: PostgresEventStore, way: str
) -> None:
    """The project function fails (a bug in an inline handler) after the rows were
    queued in the append's transaction: the caller gets that error itself, nothing of
    the append is kept, and the session goes back to the pool clean."""

    def broken(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        raise ZeroDivisionError("a bug in an inline handler")

    store.append("before", [MoneyDeposited(amount=1)], expected_version=0)
    for _ in range(2):
        if way == "not predicting":
            store.predictor.missed()  # the numbered way tries it first, then the locked one
        with pytest.raises(ZeroDivisionError, match="a bug"):
            store.commit(deposit("acc"), projection_store=store.projections(), project=broken)
        assert store.get("acc") == [] and store.owed() == []
    assert [r.position for r in project_into(store, deposit("acc"))] == [2, 3]
    assert store.projections().get(BankAccount, "acc") is not None


# -- a rejection's outcome, once durable --------------------------------------------------


def test_remembering_a_rejection_returns_the_keys_outcome_only_once_it_is_flushed(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """The key's row was last written by a commit that is visible but not yet flushed
    (an asynchronous commit, as an append's under contention): remember_rejection, which
    finds the key used and inserts nothing (so its own commit flushes nothing), returns
    that outcome only once the WAL is flushed past it, as outcome_for and an append's
    DuplicateCommand do; a crash could otherwise take back what it said the key stored."""
    store.append_and_project(
        "a",
        [MoneyDeposited(amount=1)],
        expected_version=0,
        aggregate=None,
        metadata=None,
        projection_store=store.projections(),
        project=lambda recorded: [],
        idempotency_key="k",
    )
    keys = sql.Identifier(store._db.schema, "idempotency_keys")
    for _ in range(5):
        with postgres_admin.transaction():
            postgres_admin.execute("SET LOCAL synchronous_commit = off")
            postgres_admin.execute(sql.SQL("UPDATE {} SET key = key").format(keys))
        inserted = postgres_admin.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert inserted is not None
        outcome = store.remember_rejection("k", "too_late")
        assert outcome.recorded and outcome.recorded[0].aggregate_id == "a"
        row = postgres_admin.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
        assert row is not None and lsn(row[0]) >= lsn(inserted[0])


def test_a_turn_whose_session_ends_mid_append_stores_it_once_and_lets_the_stream_go(
    store: PostgresEventStore, postgres_admin: Admin
) -> None:
    """Inside a turn on a stream, the turn's session dies in the append's INSERT: the
    append goes again on another connection and is stored once; the turn's lock went
    with its session, so another writer can take the stream at once, and the store's
    appends after the turn go on."""
    kill_own_session(postgres_admin, store._db.schema, 1)
    with store.turn("acc"):
        recorded = project_into(store, deposit("acc"))
    assert [r.event_id for r in store.get("acc")] == [r.event_id for r in recorded]
    key = lock_key(store._db.schema, "stream acc")
    taken = postgres_admin.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
    assert taken == (True,)
    postgres_admin.execute("SELECT pg_advisory_unlock(%s)", [key])
    with store.turn("acc"):
        store.append("acc", [MoneyDeposited(amount=3)], expected_version=2)
    assert [r.version for r in store.get("acc")] == [1, 2, 3]


def test_a_url_naming_two_schemas_is_refused_before_connecting() -> None:
    """The second ?schema= used to be ignored: the store went to the first, silently.
    The same one twice is still that one."""
    with pytest.raises(incident.IncidentError, match="Two schemas for one store"):
        incident.open_event_store(f"{NOWHERE}?schema=a&schema=b")
    assert split_url(f"{NOWHERE}?schema=a&sslmode=disable&schema=a") == (
        f"{NOWHERE}?sslmode=disable",
        "a",
    )
