"""Promises README.md and docs/*.md make that no other test pinned, each on every store it
applies to. Each test's docstring quotes the promise and names the doc it comes from."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import psycopg
import pytest
from conftest import DURABLE_BACKENDS, Admin, on_backends
from sqlite_batches import Faults, account, deposit, faulty_connections, ready

import incident
from incident.examples import bank
from incident.stores.postgres import split_url
from incident.stores.protocols import CommitCall, Committed
from incident.testing.contract.projection_store import account_row

# -- a small aggregate of this module's own ---------------------------------------------


class Note(incident.Event, tag="doc_promises.Noted"):
    schema_version: ClassVar[int] = 2
    text: str


class Seal(incident.Event, tag="doc_promises.Sealed"):
    pass


class Write(incident.Command):
    aggregate_id: str
    text: str


class Close(incident.Command):
    aggregate_id: str


class Pad(msgspec.Struct, frozen=True):
    notes: int = 0
    sealed: bool = False


notepad = incident.Aggregate("doc_promises_pad", initial=Pad())


@notepad.execute
def write(state: Pad, cmd: Write) -> Note:
    return Note(text=cmd.text)


@notepad.execute
def close(state: Pad, cmd: Close) -> Seal:
    return Seal()


class KeyedWrite(incident.Command):
    aggregate_id: str
    text: str
    idempotency_key: str


@notepad.execute
def keyed_write(state: Pad, cmd: KeyedWrite) -> Note:
    return Note(text=cmd.text)


# rejections whose text no store keeps as it is (a command's fields cannot carry it)
REFUSALS = [("bad\x00reason", None), ("closed", "a\x00detail"), ("sur\udc80", "and\udc81")]


class Refuse(incident.Command):
    aggregate_id: str
    refusal: int


@notepad.execute
def refuse(state: Pad, cmd: Refuse) -> Note:
    raise incident.Rejected(*REFUSALS[cmd.refusal])


@notepad.apply
def noted(state: Pad, event: Note) -> Pad:
    return msgspec.structs.replace(state, notes=state.notes + 1)


@notepad.apply
def sealed(state: Pad, event: Seal) -> Pad:
    return msgspec.structs.replace(state, sealed=True)


@notepad.terminal
def is_sealed(state: Pad) -> bool:
    return state.sealed


def log(store: incident.EventStore) -> list[tuple[int, str, int, str]]:
    return [(r.position, r.aggregate_id, r.version, r.event_type) for r in store.read_all()]


def append_projecting(
    store: incident.EventStore,
    event: incident.Event,
    expected_version: int,
    row: Any,
    projections: incident.ProjectionStore | None = None,
) -> None:
    """One event appended to account A with ``row`` as its read model, in one commit."""
    store.append_and_project(
        "A",
        [event],
        expected_version=expected_version,
        aggregate="bank_account",
        metadata=None,
        projection_store=store.projections() if projections is None else projections,
        project=lambda recorded: [row],
    )


# -- README.md ----------------------------------------------------------------------------


def test_a_conflict_says_where_the_stream_is_and_that_nothing_was_written(store_url: str) -> None:
    """README.md, Errors: ConcurrencyError, "the stream moved on: `Stream 'ACC1' is at
    version 3, expected 2; nothing was written`"."""
    with closing(incident.open_event_store(store_url)) as store:
        store.append("ACC1", [bank.MoneyDeposited(amount=n) for n in (1, 2, 3)], expected_version=0)
        before = log(store)
        with pytest.raises(incident.ConcurrencyError) as refused:
            store.append("ACC1", [bank.MoneyDeposited(amount=4)], expected_version=2)
        assert "Stream 'ACC1' is at version 3, expected 2; nothing was written" in str(
            refused.value
        )
        assert log(store) == before


def test_a_rejection_decided_on_a_cached_state_is_checked_against_the_store(
    store_url: str,
) -> None:
    """README.md, State cache: "A rejection decided on a cached state is checked against
    the store before it is raised." Another writer made the withdrawal possible: the
    command succeeds instead of being refused on the stale cache."""
    with closing(incident.open_event_store(store_url)) as store:
        cached = incident.CommandHandler(store, aggregates=[bank.bank_account])
        other = incident.CommandHandler(store, aggregates=[bank.bank_account])
        cached.dispatch(bank.OpenAccount(aggregate_id="A"))
        assert cached.state("bank_account", "A").balance == 0  # cached at balance 0
        other.dispatch(bank.DepositMoney(aggregate_id="A", amount=10))
        recorded = cached.dispatch(bank.WithdrawMoney(aggregate_id="A", amount=5))
        assert [(r.version, r.event_type) for r in recorded] == [(3, "MoneyWithdrawn")]
        assert cached.state("bank_account", "A").balance == 5


def test_a_commit_whose_read_model_is_unstorable_writes_no_event(store_url: str) -> None:
    """README.md, Stores: "a command's events and the read models its handlers return
    commit in one transaction: no event without its projections"; Storable values:
    "read-model integers past 64 bits are refused with Unstorable before anything is
    written"."""
    with closing(incident.open_event_store(store_url)) as store:
        store.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
        before = log(store)
        huge = account_row("A", version=2, balance=2**70)
        with pytest.raises(incident.Unstorable):
            append_projecting(store, bank.MoneyDeposited(amount=5), 1, huge)
        assert log(store) == before
        assert store.projections().all(bank.BankAccount) == []
        store.append("A", [bank.MoneyDeposited(amount=5)], expected_version=1)  # still usable


def test_an_idempotency_key_field_on_the_command_stores_its_events_once(store_url: str) -> None:
    """README.md, Idempotent commands: "`dispatch(cmd, metadata={"idempotency_key":
    "pay-42"})` (or an `idempotency_key` field on the command) stores the events once; a
    retry ... gets the first call's outcome back"."""
    with incident.CommandHandler(store_url, aggregates=[notepad]) as app:
        first = app.dispatch(KeyedWrite(aggregate_id="P", text="a", idempotency_key="w-1"))
        again = app.dispatch(KeyedWrite(aggregate_id="P", text="a", idempotency_key="w-1"))
        assert [r.event_id for r in again] == [r.event_id for r in first]
        assert app.event_store.version("P") == 1
        assert app.event_store.outcome_for("w-1") is not None
        # a cold handler on the same store (nothing cached) finds the key too
        cold = incident.CommandHandler(app.event_store, aggregates=[notepad])
        third = cold.dispatch(KeyedWrite(aggregate_id="P", text="a", idempotency_key="w-1"))
        assert [r.event_id for r in third] == [r.event_id for r in first]
        app.dispatch(KeyedWrite(aggregate_id="P", text="b", idempotency_key="w-2"))
        assert [r.version for r in app.event_store.get("P")] == [1, 2]


# -- docs/read-models.md ------------------------------------------------------------------


def test_a_field_added_later_reads_old_rows_with_its_default(store_url: str) -> None:
    """docs/read-models.md: "A field added to the class later gets its column on first
    use; old rows hold NULL there, and a field that cannot be None reads back with its
    default." (A class defined again under its module and name takes its table over.)"""

    class Ledger(incident.Projection):
        aggregate_id: str
        balance: int

    with closing(incident.open_projection_store(store_url)) as projections:
        projections.project(Ledger(aggregate_id="A", balance=1))

        class Ledger(incident.Projection):  # type: ignore[no-redef]  # a notebook cell run again
            aggregate_id: str
            balance: int
            owner: str = "nobody"
            note: str | None = None

        projections.project(Ledger(aggregate_id="B", balance=2, owner="Bo", note="hi"))
        old = Ledger(aggregate_id="A", balance=1)
        new = Ledger(aggregate_id="B", balance=2, owner="Bo", note="hi")
        assert projections.get(Ledger, "A") == old
        assert projections.all(Ledger) == [old, new]
        assert all(type(row) is Ledger for row in projections.all(Ledger))


@pytest.mark.parametrize(
    "column", ["tableoid", "xmin", "cmin", "xmax", "cmax", "ctid", "oid", "a%b", ""]
)
def test_a_field_no_store_could_keep_as_a_column_is_refused_before_any_write(
    store_url: str, column: str
) -> None:
    """docs/read-models.md: "A field that could not be a column of its own on every store:
    an encoded name that is empty, holds a NUL or a `%` ...;
    (msgspec itself refuses a NUL in a field name) or the name of a column
    Postgres gives every table (`tableoid`, `xmin`, `cmin`, `xmax`, `cmax`, `ctid`,
    `oid`)" raises IncidentError "on the type's first use with a store, read or write,
    before anything is written" (the append that projects it included)."""
    misfit = msgspec.defstruct(
        "Misfit",
        [("aggregate_id", str), ("value", int, msgspec.field(default=0, name=column))],
        bases=(incident.Projection,),
        module="doc_promises.read_models",
    )
    with closing(incident.open_event_store(store_url)) as store:
        projections = store.projections()
        with pytest.raises(incident.IncidentError):
            projections.get(misfit, "a")
        with pytest.raises(incident.IncidentError):
            append_projecting(
                store,
                bank.AccountOpened(account_number="A"),
                0,
                misfit(aggregate_id="A"),
                projections,
            )
        assert log(store) == []


def test_a_derived_table_name_past_63_characters_is_refused_before_any_write(
    store_url: str,
) -> None:
    """docs/read-models.md: "A name longer than 63 characters, declared or derived
    (Postgres would cut it short, and two long names could then meet)" raises
    IncidentError on the type's first use, read or write, before anything is written."""
    long_name = "Ledger" + "Of" * 29  # ledger_of_of_...: 6 + 29 * 3 = 93 characters
    ledger = msgspec.defstruct(
        long_name,
        [("aggregate_id", str)],
        bases=(incident.Projection,),
        module="doc_promises.read_models",
    )
    with closing(incident.open_event_store(store_url)) as store:
        projections = store.projections()
        with pytest.raises(incident.IncidentError, match="63"):
            projections.all(ledger)
        with pytest.raises(incident.IncidentError, match="63"):
            projections.project(ledger(aggregate_id="a"))
        with pytest.raises(incident.IncidentError, match="63"):
            append_projecting(
                store,
                bank.AccountOpened(account_number="A"),
                0,
                ledger(aggregate_id="A"),
                projections,
            )
        assert log(store) == []


def test_an_append_projecting_a_bad_table_name_writes_no_event(store_url: str) -> None:
    """docs/read-models.md: "A `table_name` that is not a plain SQL identifier" raises
    IncidentError "on the type's first use with a store, read or write, before anything
    is written": an append that projects it writes none of its events."""

    class Shouty(incident.Projection):
        aggregate_id: str
        table_name: ClassVar[str] = "Shouty-Rows"

    with closing(incident.open_event_store(store_url)) as store:
        store.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
        before = log(store)
        with pytest.raises(incident.IncidentError, match="not a plain SQL identifier"):
            append_projecting(store, bank.MoneyDeposited(amount=1), 1, Shouty(aggregate_id="A"))
        assert log(store) == before


# -- docs/evolution.md --------------------------------------------------------------------


def test_every_command_to_a_terminated_stream_is_rejected(store_url: str) -> None:
    """docs/evolution.md, Terminal states: "From then on every command to it is rejected
    with the reason `aggregate_terminated`" (and nothing is written)."""
    with incident.CommandHandler(store_url, aggregates=[notepad]) as app:
        app.dispatch(Write(aggregate_id="P", text="a"))
        app.dispatch(Close(aggregate_id="P"))
        for command in (Write(aggregate_id="P", text="b"), Close(aggregate_id="P")):
            with pytest.raises(incident.Rejected) as refused:
                app.dispatch(command)
            assert refused.value.reason == "aggregate_terminated"
        assert app.event_store.version("P") == 2
        # a cold handler (nothing cached) refuses it the same way
        cold = incident.CommandHandler(app.event_store, aggregates=[notepad])
        with pytest.raises(incident.Rejected, match="aggregate_terminated"):
            cold.dispatch(Write(aggregate_id="P", text="c"))
        assert app.event_store.version("P") == 2


class StampLetter(incident.Command):
    aggregate_id: str


class StampParcel(incident.Command):
    aggregate_id: str


class Stamped(incident.Event, tag="doc_promises.Stamped"):
    pass


def stamper(name: str, command: type[incident.Command]) -> incident.Aggregate[int]:
    aggregate: incident.Aggregate[int] = incident.Aggregate(name, initial=0)
    aggregate.execute(command)(lambda state, cmd: Stamped())
    aggregate.apply(Stamped)(lambda state, event: state + 1)
    return aggregate


def test_two_aggregates_may_share_an_event_class(store_url: str) -> None:
    """docs/evolution.md, Names and ids: "Two aggregates may share an Event class, but two
    different classes stored under one name are refused": one class in two aggregates,
    in one command handler or in two on one store, is no clash, and both read it."""
    with closing(incident.open_event_store(store_url)) as store:
        letters = stamper("doc_promises_letter", StampLetter)
        parcels = stamper("doc_promises_parcel", StampParcel)
        one = incident.CommandHandler(store, aggregates=[letters])
        two = incident.CommandHandler(store, aggregates=[parcels])
        one.dispatch(StampLetter(aggregate_id="L1"))
        two.dispatch(StampParcel(aggregate_id="P1"))
        both = incident.CommandHandler(store, aggregates=[letters, parcels])
        assert (both.state(letters, "L1"), both.state(parcels, "P1")) == (1, 1)
        assert [type(r.data) for r in store.read_all()] == [Stamped, Stamped]
        assert store.types.registered()["doc_promises.Stamped"] is Stamped


def _store_at_schema_version(url: str, version: int) -> None:
    """Writes one doc_promises.Noted event at position 1 as a release whose class was at
    ``version`` would."""
    old = msgspec.defstruct(
        "Note",
        [("text", str)],
        bases=(incident.Event,),
        tag="doc_promises.Noted",
        module="doc_promises.old_release",
    )
    old.schema_version = version  # type: ignore[attr-defined]
    with closing(incident.open_event_store(url)) as store:
        store.append("P", [old(text="old")], expected_version=0, aggregate=notepad.name)


@on_backends(DURABLE_BACKENDS)  # the memory store keeps Python objects: nothing old
@pytest.mark.parametrize(
    ("stored_at", "says"), [(1, r"upcast\('doc_promises.Noted', 1\)"), (3, "newer")]
)
def test_a_payload_no_upcaster_brings_to_this_code_is_corrupt_and_blocks_writes(
    store_url: str, stored_at: int, says: str
) -> None:
    """docs/evolution.md: "A payload stored at a version with no upcaster to the next one
    raises `CorruptEvent` naming the position and the decorator to add; a payload from a
    newer release than the running code is refused the same way." A command on that
    stream fails with it and writes nothing (docs/integrity.md: "commands on that stream
    fail with it")."""
    _store_at_schema_version(store_url, stored_at)
    with incident.CommandHandler(store_url, aggregates=[notepad]) as app:
        with pytest.raises(incident.CorruptEvent, match=says) as refused:
            app.event_store.get("P")
        assert refused.value.position == 1
        with pytest.raises(incident.CorruptEvent, match=says):
            list(app.event_store.read_all())
        with pytest.raises(incident.CorruptEvent, match=says):
            app.dispatch(Write(aggregate_id="P", text="new"))
        assert app.event_store.version("P") == 1
        app.dispatch(Write(aggregate_id="Q", text="other"))  # other streams are not affected
        assert [r.aggregate_id for r in app.event_store.read_all(after=1)] == ["Q"]


# -- docs/writes.md -----------------------------------------------------------------------


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    """Every SQLite connection opened from here on records its COMMITs."""
    yield from faulty_connections(monkeypatch)


def test_a_shared_sqlite_commit_is_bounded_at_64_appends_or_4096_events(
    tmp_path: Path, faults: Faults
) -> None:
    """docs/writes.md, Who commits: the leader "takes everything queued, in queue order, up
    to 64 appends or 4,096 events (its own append first, whatever its size)". Appends
    handed over together (commit_many, as the async stores do) keep the event bound as
    well as the count bound."""
    store = ready(f"sqlite:///{tmp_path / 'bounds.db'}")
    assert (store.group.max_requests, store.group.max_events) == (64, 4096)
    store.group.max_events = 5
    faults.commits.clear()
    sizes = {"a": 3, "b": 3, "c": 9, "d": 1, "e": 1}
    requests = [(deposit(name, events=size), account) for name, size in sizes.items()]
    calls = [CommitCall(request, store.projections(), project) for request, project in requests]
    outcomes = store.commit_many(calls)
    assert all(isinstance(outcome, Committed) for outcome in outcomes)
    # a (3), then b (3 + 9 > 5), then c alone (9, whatever its size), then d and e (2)
    assert len(faults.commits) == 4
    assert [stream for _, stream, _, _ in log(store)[1:]] == [
        name for name, size in sizes.items() for _ in range(size)
    ]
    assert [r.position for r in store.read_all()] == list(range(1, 2 + sum(sizes.values())))
    store.close()


# -- docs/errors.md -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "opener",
    [incident.open_event_store, incident.open_projection_store, incident.open_async_event_store],
)
@pytest.mark.parametrize("options", [{"bogus": 1}, {"timeout": -1}])
def test_a_misspelt_or_meaningless_store_option_is_invalid_argument(
    store_url: str, opener: Any, options: dict[str, object], tmp_path: Path
) -> None:
    """docs/errors.md: InvalidArgument (also a ValueError) when "a handler, subscription
    or store was built with an option that is not one (`retries=-1`, `batch_size=1.5`, a
    misspelt store option); raised before anything is opened or written"; README.md,
    Errors: "the same on every store". (The memory store takes no option at all.)"""
    with pytest.raises(incident.InvalidArgument) as refused:
        opener(store_url, **options)
    assert isinstance(refused.value, ValueError)
    assert list(tmp_path.iterdir()) == []


# -- docs/live.md -------------------------------------------------------------------------


def test_a_tail_whose_store_closes_raises_out_of_the_loop(store_url: str) -> None:
    """docs/live.md: "A store that fails (closed, the server unreachable) raises out of the
    loop." A tail that has yielded the log and waits for more gets StoreError once its
    store is closed; it neither ends quietly nor waits for ever."""
    store = incident.open_event_store(store_url)
    store.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
    tail = store.subscribe(after=0, poll_interval=0.05)
    assert next(tail).position == 1
    raised: list[BaseException] = []

    def wait_for_the_next() -> None:
        try:
            next(tail)
        except BaseException as error:  # StopIteration included: the test names it
            raised.append(error)

    waiting = threading.Thread(target=wait_for_the_next, daemon=True)
    waiting.start()  # it may be reading or waiting when the store closes: StoreError either way
    store.close()
    waiting.join(10)
    assert not waiting.is_alive()
    assert [type(error) for error in raised] == [incident.StoreError]


class PadRow(msgspec.Struct, frozen=True):
    """A read model's shape that is not an incident.Projection."""

    aggregate_id: str
    notes: int = 0


def test_an_inline_listener_returning_a_plain_struct_is_refused_and_writes_nothing(
    store_url: str,
) -> None:
    """docs/read-models.md, What is refused: anything that is not an
    `incident.Projection` ("a `msgspec.Struct` with the same fields, a dict") ... "A
    listener that returns one is refused earlier, with `RegistrationError`"; the
    command's events are not written either (docs/writes.md: "An append that fails ...
    leaves nothing behind")."""
    rows = incident.EventHandler("doc_promises_rows")

    @rows.listen(Note)
    def row(recorded: incident.Recorded[Note], state: Pad) -> PadRow:
        return PadRow(aggregate_id=recorded.aggregate_id, notes=state.notes)

    with incident.CommandHandler(store_url, aggregates=[notepad], event_handlers=[rows]) as app:
        with pytest.raises(incident.RegistrationError, match="row"):
            app.dispatch(Write(aggregate_id="P", text="a"))
        assert app.event_store.version("P") == 0
        assert log(app.event_store) == []


@on_backends(DURABLE_BACKENDS)
def test_a_table_is_named_by_the_class_and_its_columns_by_the_encoded_names(
    store_url: str, tmp_path: Path
) -> None:
    """docs/read-models.md, What the table is: "Name: ... else the class name in
    snake_case (`BankAccount` -> `bank_account`, `HTTPStatusView` -> `http_status_view`)";
    "Columns: one per field, named like the field's encoded name (msgspec `rename`
    applies)"; "`X | None` is stored like `X`, NULL for None"."""

    class HTTPStatusView(incident.Projection):
        aggregate_id: str
        status_code: int = msgspec.field(default=0, name="code")
        note: str | None = None

    with closing(incident.open_projection_store(store_url)) as projections:
        projections.project(HTTPStatusView(aggregate_id="r", status_code=404))
        assert projections.get(HTTPStatusView, "r") == HTTPStatusView(
            aggregate_id="r", status_code=404
        )
    if store_url.startswith("sqlite"):
        with closing(sqlite3.connect(tmp_path / "store.db")) as conn:
            rows = conn.execute("SELECT aggregate_id, code, note FROM http_status_view").fetchall()
    else:
        conninfo, schema = split_url(store_url)
        with psycopg.connect(conninfo) as conn:
            rows = conn.execute(
                f'SELECT aggregate_id, code, note FROM "{schema}".http_status_view'
            ).fetchall()
    assert [tuple(row) for row in rows] == [("r", 404, None)]


def test_a_store_without_create_tables_renames_no_old_table(
    postgres_url: str, postgres_admin: Admin
) -> None:
    """docs/read-models.md, Tables made by earlier releases: "A store opened with
    `create_tables=False` renames nothing: run `ALTER TABLE ... RENAME TO ...` with a
    role that may." The old table keeps its name and its rows; the read is refused with
    a StoreError pointing at what to run, not answered from an empty new table."""
    schema = postgres_url.rsplit("schema=", 1)[1]
    postgres_admin.execute(f'CREATE SCHEMA "{schema}"')
    postgres_admin.execute(
        f'CREATE TABLE "{schema}".archive_ledger (aggregate_id text PRIMARY KEY, total bigint)'
    )
    postgres_admin.execute(f'INSERT INTO "{schema}".archive_ledger VALUES (%s, 1)', ["a"])

    class ArchiveLedger(incident.Projection):
        aggregate_id: str
        table_name: ClassVar[str] = "archive_ledgers"
        total: int = 0

    store = incident.open_projection_store(postgres_url, create_tables=False)
    with closing(store), pytest.raises(incident.StoreError):
        store.all(ArchiveLedger)
    tables = {
        name
        for (name,) in postgres_admin.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema]
        ).fetchall()
    }
    assert tables == {"archive_ledger"}
    rows = postgres_admin.execute(f'SELECT * FROM "{schema}".archive_ledger').fetchall()
    assert rows == [("a", 1)]


def test_the_pools_reconnection_log_is_silent_unless_logging_is_configured() -> None:
    """docs/errors.md, Pool timeouts: "incident attaches a `NullHandler` to `psycopg`, so
    nothing is printed to stderr unless your application configured logging; handlers
    you install still receive these records". (The pool, and psycopg with it, is loaded
    when a Postgres store is opened.)"""
    script = (
        "import logging, sys\n"
        "import incident\n"
        "incident.open_event_store('postgresql://nobody@127.0.0.1:1/none')  # no connection yet\n"
        "logging.getLogger('psycopg.pool').warning('error connecting in pool')\n"
        "got = []\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, record): got.append(record.getMessage())\n"
        "logging.getLogger().addHandler(Keep())\n"
        "logging.getLogger('psycopg.pool').warning('again')\n"
        "print(got)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stderr == ""
    assert done.stdout.strip() == "['again']"


@pytest.mark.parametrize("poll_interval", [math.inf, math.nan, -1.0])
def test_a_poll_interval_that_is_not_a_finite_time_is_refused_when_subscribing(
    store_url: str, poll_interval: float
) -> None:
    """docs/live.md: "Bad arguments (..., `poll_interval <= 0`, ...) raise `ValueError`
    when you call it, not at the first event." An endless poll_interval was taken and the
    tail then failed at its first wait with a bare OverflowError, not incident's error."""
    store = incident.open_event_store(store_url)
    with closing(store), pytest.raises(incident.InvalidArgument, match="poll_interval"):
        store.subscribe(after=0, poll_interval=poll_interval)

    async def subscribe_async() -> None:
        async with incident.open_async_event_store(store_url) as store:
            store.subscribe(after=0, poll_interval=poll_interval)

    with pytest.raises(incident.InvalidArgument, match="poll_interval"):
        asyncio.run(subscribe_async())


@pytest.mark.parametrize(
    "options",
    [
        {"backoff": -1},
        {"backoff": math.nan},
        {"backoff": math.inf},
        {"backoff": "0.1"},
        {"backoff": True},
    ],
)
def test_a_command_handler_built_with_a_bad_backoff_is_refused(
    store_url: str, options: dict[str, object]
) -> None:
    """docs/errors.md: InvalidArgument when "a handler, subscription or store was built
    with an option that is not one ...; raised before anything is opened or written". A
    backoff that is not a finite number of seconds >= 0 was taken and failed the first
    conflict's retry with a bare TypeError or ValueError from its sleep."""
    with pytest.raises(incident.InvalidArgument, match="backoff"):
        incident.CommandHandler(store_url, aggregates=[notepad], **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"backoff": math.inf},
        {"idle": 0},
        {"idle": -1},
        {"idle": math.inf},
        {"idle": math.nan},
        {"idle": "1"},
        {"outage_backoff": -1},
        {"outage_backoff": math.nan},
        {"outage_backoff": math.inf},
        {"cache_size": -1},
        {"cache_size": 1.5},
    ],
)
def test_a_subscription_built_with_an_option_that_is_not_one_is_refused(
    store_url: str, options: dict[str, object]
) -> None:
    """docs/errors.md: InvalidArgument when "a handler, subscription or store was built
    with an option that is not one (`retries=-1`, `batch_size=1.5`, ...); raised before
    anything is opened or written": a pause that is not a finite number of seconds (idle
    > 0, backoff and outage_backoff >= 0) or a cache size that is not a count; nothing is
    checkpointed."""
    handler = incident.EventHandler("doc_promises_options")

    @handler.listen(Note)
    def nothing(recorded: incident.Recorded[Note], state: Pad) -> None:
        return None

    with incident.CommandHandler(store_url, aggregates=[notepad]) as app:
        with pytest.raises(incident.InvalidArgument, match=next(iter(options))):
            incident.Subscription(handler, app, **options)  # type: ignore[arg-type]
        checkpoints = incident.stores.checkpoint_store_for(app.event_store)
        assert checkpoints.load("doc_promises_options") == 0


@pytest.mark.parametrize("metadata", [[1], "ab", [("user", "ann")], 5, []])
def test_metadata_that_is_not_a_mapping_is_unstorable_and_writes_nothing(
    store_url: str, metadata: object
) -> None:
    """README.md, Storable values: "metadata that is not plain JSON ... [is] refused with
    `Unstorable` before anything is written"; Errors: "Every error is an
    `incident.IncidentError`". Metadata that is not a mapping raised a bare TypeError or
    ValueError from `dict()`, or (a list of pairs) was stored as a dict it never was."""
    with incident.CommandHandler(store_url, aggregates=[notepad]) as app:
        with pytest.raises(incident.Unstorable, match="metadata"):
            app.event_store.append(
                "P",
                [Note(text="a")],
                expected_version=0,
                metadata=metadata,  # type: ignore[arg-type]
            )
        with pytest.raises(incident.Unstorable, match="metadata"):
            app.dispatch(Write(aggregate_id="P", text="a"), metadata=metadata)  # type: ignore[arg-type]
        assert log(app.event_store) == []


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"expected_version": -1}, "expected_version"),
        ({"expected_version": 1.0}, "expected_version"),
        ({"expected_version": True}, "expected_version"),
        ({"expected_version": None}, "expected_version"),
        ({"events": [Write(aggregate_id="P", text="a")]}, "not an Event"),
        ({"events": "ab"}, "not an Event"),
    ],
)
def test_an_append_argument_no_store_can_act_on_is_invalid_argument(
    store_url: str, arguments: dict[str, object], says: str
) -> None:
    """docs/errors.md: `InvalidArgument` (also a `ValueError`), "a store's verb was called
    with an argument no store can act on ...; raised before anything is opened or
    written". An expected version that is not a version, or something that is not an
    Event among the events, was a bare IncidentError."""
    call: dict[str, Any] = {"events": [Note(text="a")], "expected_version": 0, **arguments}
    with closing(incident.open_event_store(store_url)) as store:
        with pytest.raises(incident.InvalidArgument, match=says) as refused:
            store.append("P", call["events"], expected_version=call["expected_version"])
        assert isinstance(refused.value, ValueError)
        assert log(store) == []


@pytest.mark.parametrize("rows", [None, 5])
def test_replace_all_given_no_rows_at_all_is_invalid_argument_and_keeps_the_table(
    store_url: str, rows: object
) -> None:
    """docs/read-models.md, What is refused: anything that is not an
    `incident.Projection` given to `replace_all` "is refused with
    `incident.InvalidArgument` on every store ... before anything is written". Rows that
    are not even an iterable raised a bare TypeError."""
    with closing(incident.open_projection_store(store_url)) as projections:
        kept = projections.project(account_row("A", version=1, balance=10))
        with pytest.raises(incident.InvalidArgument, match="replace_all"):
            projections.replace_all(bank.BankAccount, rows)  # type: ignore[arg-type]
        assert projections.all(bank.BankAccount) == [kept]


@pytest.mark.parametrize(
    ("verb", "arguments"),
    [
        ("save", {"handler": "h", "position": -1, "expected": 0}),
        ("save", {"handler": "h", "position": 1.5, "expected": 0}),
        ("save", {"handler": "h", "position": True, "expected": 0}),
        ("save", {"handler": "h", "position": 2**63, "expected": 0}),
        ("save", {"handler": "h", "position": 1, "expected": -1}),
        ("save", {"handler": "h", "position": 1, "expected": None}),
        ("save", {"handler": 7, "position": 1, "expected": 0}),
        ("reset", {"handler": "h", "position": -1}),
        ("reset", {"handler": "h", "position": 1.5}),
        ("reset", {"handler": None, "position": 1}),
        ("load", {"handler": 7}),
    ],
)
def test_a_checkpoint_that_is_not_a_position_is_invalid_argument_and_writes_nothing(
    store_url: str, verb: str, arguments: dict[str, Any]
) -> None:
    """docs/errors.md: `InvalidArgument`, "a store's verb was called with an argument no
    store can act on ...; raised before anything is opened or written". A checkpoint
    store saved or reset a checkpoint of -1 or 1.5 (which the subscription then could
    not read from), and took a handler name that is not a str."""
    with closing(incident.open_event_store(store_url)) as store:
        checkpoints = incident.stores.checkpoint_store_for(store)
        checkpoints.save("h", 3, expected=0)
        arguments = dict(arguments)  # the parameters are shared by the backends
        handler = arguments.pop("handler")
        with pytest.raises(incident.InvalidArgument):
            getattr(checkpoints, verb)(handler, **arguments)
        assert checkpoints.checkpoints() == {"h": 3}


@pytest.mark.parametrize(
    ("refusal", "kept"),
    [
        (0, ("bad\\x00reason", None)),
        (1, ("closed", "a\\x00detail")),
        (2, ("sur\\udc80", "and\\udc81")),
    ],
)
def test_a_keyed_rejection_whose_reason_no_store_keeps_is_still_a_rejection(
    store_url: str, refusal: int, kept: tuple[str, str | None]
) -> None:
    """README.md, Idempotent commands: a retry "gets the first call's outcome back: ...
    its rejection (the reason is remembered under the key ...)"; docs/errors.md:
    `Rejected` is "don't retry: a business rule said no", `StoreError` "retry once the
    database is back". A rejection whose reason or detail held a NUL or a lone surrogate
    was a StoreError (Postgres) or a bare UnicodeEncodeError (SQLite, Postgres) when
    remembered, every time; it is remembered with those escaped, alike on every store,
    as a parked event's error is."""
    with incident.CommandHandler(store_url, aggregates=[notepad]) as app:
        command = Refuse(aggregate_id="P", refusal=refusal)
        with pytest.raises(incident.Rejected) as first:
            app.dispatch(command, metadata={"idempotency_key": "r-1"})
        # the caller sees the rejection as raised
        assert (first.value.reason, first.value.detail) == REFUSALS[refusal]
        stored = app.event_store.outcome_for("r-1")
        assert stored is not None and (stored.rejected, stored.detail) == kept
        with pytest.raises(incident.Rejected) as again:
            app.dispatch(command, metadata={"idempotency_key": "r-1"})
        assert (again.value.reason, again.value.detail) == kept
        assert log(app.event_store) == []


@pytest.mark.parametrize(("reason", "detail"), [("a\x00b", None), ("ok", "\udc80"), (7, None)])
def test_a_store_refuses_a_rejection_it_could_not_give_back(
    store_url: str, reason: object, detail: object
) -> None:
    """README.md, Storable values: "what a store accepts it gives back unchanged, on every
    store: ... NUL, lone surrogates ... are refused with `Unstorable` before anything is
    written". remember_rejection stored them on one store and failed on another."""
    with closing(incident.open_event_store(store_url)) as store:
        with pytest.raises(incident.Unstorable):
            store.remember_rejection("r-1", reason, detail)  # type: ignore[arg-type]
        assert store.outcome_for("r-1") is None
