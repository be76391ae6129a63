"""incident against eventsourcing 9.5.6 and raw driver + msgspec ceilings, in one run.

    python benchmarks/compare.py [--quick] [--only sqlite|postgres] [--postgres-url URL]

Three measurements on each backend, every contender at the same durability (SQLite: WAL
with synchronous=FULL, checked on each contender's own connection and printed; Postgres:
server defaults, so every commit waits for its WAL flush):

1. load      read and fold one aggregate of 10,000 events from a cold cache (events/s;
             the best of 20 runs, since noise only ever slows a run down);
2. dispatch  2,000 commands to 200 existing accounts, each command one event, committed
             with its projection for incident (commands/s). eventsourcing does the same
             with an Application and an Aggregate: ``repository.get``, one method call,
             ``save()``, no snapshots, no aggregate cache (its defaults);
3. history   the cost of one command to an aggregate of 10,000 events against one of
             2 events: the median, over 400 pairs timed side by side, of the ratio
             within a pair (after one warm-up command each).

The contenders take turns, round after round, in every measurement: a slow spell of the
disk or of a busy machine lands on all of them alike, so the ratios hold even when the
absolute numbers wander.

The raw ceilings do the least work that still does the job: one query, one reused
msgspec decoder over the payloads joined into one JSON array, the Bank's own apply
functions; one INSERT per commit with the version kept in memory. A second raw column
adds the projection upsert to the same commit, which is the work incident does.

Run by hand; never part of the test suite. eventsourcing's settings are passed through
its documented ``env`` mapping, and only here.
"""

from __future__ import annotations

import datetime as dt
import functools
import gc
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import common
import msgspec

import incident
from incident.examples import bank
from incident.examples.bank.account import AccountState

LONG = 10_000

# -- the contenders --------------------------------------------------------------------


class Contender(Protocol):
    name: str

    def seed(self, aggregate_id: str, events: int) -> None:
        """An opened account with ``events`` events in all (untimed)."""

    def load(self, aggregate_id: str) -> int:
        """Read and fold the whole stream; returns the balance."""

    def command(self, aggregate_id: str) -> None:
        """Deposit 1: one command, one event, one commit."""

    def durability(self) -> str:
        """What the contender's own connection says about journal and sync."""

    def close(self) -> None: ...


SYNCHRONOUS = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


def _sqlite_durability(connection: sqlite3.Connection) -> str:
    journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = connection.execute("PRAGMA synchronous").fetchone()[0]
    return f"journal={journal} synchronous={SYNCHRONOUS[synchronous]}"


class Incident:
    """The Bank example on an incident store: DepositMoney -> MoneyDeposited + BankAccount."""

    name = "incident"

    def __init__(self, url: str) -> None:
        self.handler = bank.build(url)
        self.store = self.handler.event_store
        self.store.initialize()

    def seed(self, aggregate_id: str, events: int) -> None:
        self.handler.dispatch(bank.OpenAccount(aggregate_id=aggregate_id))
        version = 1
        while version < events:
            batch = min(1_000, events - version)
            self.store.append(
                aggregate_id,
                [bank.MoneyDeposited(amount=1)] * batch,
                expected_version=version,
                aggregate=bank.bank_account.name,
            )
            version += batch
        self.handler.cache.clear()

    def load(self, aggregate_id: str) -> int:
        self.handler.cache.clear()
        state: AccountState = self.handler.state(bank.bank_account, aggregate_id)
        return state.balance

    def command(self, aggregate_id: str) -> None:
        self.handler.dispatch(bank.DepositMoney(aggregate_id=aggregate_id, amount=1))

    def durability(self) -> str:
        connection = _store_connection(self.store)
        if isinstance(connection, sqlite3.Connection):
            return _sqlite_durability(connection)
        return "server defaults"

    def close(self) -> None:
        self.store.close()


def _store_connection(store: Any) -> Any:
    """The sqlite3 connection under an incident SQLite store (None for Postgres)."""
    database = getattr(store, "_db", None)
    if database is None or not hasattr(database, "in_memory"):
        return None
    return database.conn()  # this thread's connection, the one the store writes with


@functools.cache  # eventsourcing refuses a second class under the same topic
def eventsourcing_classes() -> tuple[type[Any], type[Any]]:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class Account(Aggregate):  # type: ignore[misc]
        @staticmethod
        def create_id(number: str) -> uuid.UUID:
            return uuid.uuid5(uuid.NAMESPACE_URL, f"/accounts/{number}")

        @event("Opened")
        def __init__(self, number: str) -> None:
            self.number = number
            self.balance = 0

        @event("Deposited")
        def deposit(self, amount: int) -> None:
            self.balance += amount

    return Application, Account


_synchronous_seen: list[int] = []


def _force_full_sync_on_eventsourcing() -> None:
    """eventsourcing turns WAL on itself; synchronous is per connection, so set it on
    every connection its pool makes, and remember what the connection then reports."""
    from eventsourcing.sqlite import SQLiteConnectionPool

    if getattr(SQLiteConnectionPool, "_bench_patched", False):
        return
    create = SQLiteConnectionPool._create_connection

    def create_full_sync(self: Any) -> Any:
        connection = create(self)
        raw: sqlite3.Connection = connection._sqlite_conn
        raw.execute("PRAGMA synchronous=FULL")
        _synchronous_seen.append(raw.execute("PRAGMA synchronous").fetchone()[0])
        return connection

    SQLiteConnectionPool._create_connection = create_full_sync  # type: ignore[method-assign]
    SQLiteConnectionPool._bench_patched = True  # type: ignore[attr-defined]


class EventSourcing:
    """eventsourcing 9.5.6, defaults (no snapshots, no aggregate cache)."""

    name = "eventsourcing"

    def __init__(self, env: dict[str, str]) -> None:
        application, self.account = eventsourcing_classes()
        if env.get("PERSISTENCE_MODULE") == "eventsourcing.sqlite":
            _force_full_sync_on_eventsourcing()
        self.app = application(env=env)
        self.sqlite = env.get("PERSISTENCE_MODULE") == "eventsourcing.sqlite"
        self.db = env.get("SQLITE_DBNAME")

    def seed(self, aggregate_id: str, events: int) -> None:
        account = self.account(aggregate_id)
        self.app.save(account)
        for _ in range(events - 1):
            account.deposit(1)
            if len(account.pending_events) >= 1_000:
                self.app.save(account)
        self.app.save(account)

    def load(self, aggregate_id: str) -> int:
        balance: int = self.app.repository.get(self.account.create_id(aggregate_id)).balance
        return balance

    def command(self, aggregate_id: str) -> None:
        account = self.app.repository.get(self.account.create_id(aggregate_id))
        account.deposit(1)
        self.app.save(account)

    def durability(self) -> str:
        if not self.sqlite:
            return "server defaults"
        assert self.db is not None
        journal = sqlite3.connect(self.db).execute("PRAGMA journal_mode").fetchone()[0]
        seen = sorted({SYNCHRONOUS[value] for value in _synchronous_seen}) or ["?"]
        return f"journal={journal} synchronous={'/'.join(seen)}"

    def close(self) -> None:
        self.app.close()


EVENT_TYPES = (
    bank.AccountOpened,
    bank.MoneyDeposited,
    bank.MoneyWithdrawn,
    bank.MoneySent,
    bank.MoneyReceived,
    bank.MoneySentReverted,
)


class Raw:
    """The ceiling: a bare driver, one reused msgspec decoder, the Bank's apply functions,
    versions kept in memory. ``projection=True`` also upserts the BankAccount row in the
    same commit, as incident does."""

    def __init__(self, connect: Callable[[], Any], dialect: str, *, projection: bool) -> None:
        self.name = "raw + projection" if projection else "raw"
        self.dialect = dialect
        self.projection = projection
        self.connection = connect()
        self.mark = "?" if dialect == "sqlite" else "%s"
        self.decoder = msgspec.json.Decoder(list[_union(EVENT_TYPES)])  # type: ignore[misc]
        self.appliers = {t: bank.bank_account._appliers[t] for t in EVENT_TYPES}
        self.encoder = msgspec.json.Encoder()
        self.states: dict[str, tuple[AccountState, int]] = {}
        key = "INTEGER PRIMARY KEY" if dialect == "sqlite" else "BIGSERIAL PRIMARY KEY"
        blob = "TEXT" if dialect == "sqlite" else "JSON"  # the column types incident uses
        self._run(
            f"CREATE TABLE IF NOT EXISTS events (position {key}, event_id TEXT NOT NULL, "
            "aggregate_id TEXT NOT NULL, aggregate TEXT NOT NULL, version INTEGER NOT NULL, "
            f"event_type TEXT NOT NULL, event_date TEXT NOT NULL, data {blob} NOT NULL, "
            f"metadata {blob} NOT NULL, UNIQUE (aggregate_id, version))"
        )
        self._run(
            "CREATE TABLE IF NOT EXISTS bank_accounts (aggregate_id TEXT PRIMARY KEY, "
            f"version INTEGER NOT NULL, data {blob} NOT NULL)"
        )
        m = self.mark
        self.insert = (
            "INSERT INTO events (event_id, aggregate_id, aggregate, version, event_type, "
            f"event_date, data, metadata) VALUES ({m}, {m}, {m}, {m}, {m}, {m}, {m}, {m})"
        )
        self.upsert = (
            f"INSERT INTO bank_accounts (aggregate_id, version, data) VALUES ({m}, {m}, {m}) "
            "ON CONFLICT (aggregate_id) DO UPDATE SET version = excluded.version, "
            "data = excluded.data WHERE bank_accounts.version <= excluded.version"
        )
        data = "data" if dialect == "sqlite" else "data::text"
        self.select = f"SELECT {data} FROM events WHERE aggregate_id = {m} ORDER BY version"

    def _run(self, sql: str) -> None:
        self.connection.execute(sql)
        self.connection.commit()

    def _write(self, aggregate_id: str, events: list[incident.Event]) -> None:
        state, version = self.states.get(aggregate_id, (AccountState(), 0))
        now = dt.datetime.now(dt.UTC)
        date = now.isoformat()
        rows = []
        for event in events:
            version += 1
            state = self.appliers[type(event)](state, event)
            data = self.encoder.encode(event).decode()
            rows.append(
                (
                    str(uuid.uuid4()),
                    aggregate_id,
                    "bank_account",
                    version,
                    type(event).__name__,
                    date,
                    data,
                    "{}",
                )
            )
        if self.dialect == "sqlite":
            self.connection.execute("BEGIN IMMEDIATE")
        cursor = self.connection.cursor()
        cursor.executemany(self.insert, rows)
        if self.projection:
            row = bank.BankAccount(
                aggregate_id=aggregate_id,
                account_number=aggregate_id,
                balance=state.balance,
                version=version,
                event_id=rows[-1][0],
                event_date=now,
            )
            projection = self.encoder.encode(row).decode()
            cursor.execute(self.upsert, (aggregate_id, version, projection))
        self.connection.commit()
        self.states[aggregate_id] = (state, version)

    def seed(self, aggregate_id: str, events: int) -> None:
        self._write(aggregate_id, [bank.AccountOpened(account_number=aggregate_id)])
        written = 1
        while written < events:
            batch = min(1_000, events - written)
            self._write(aggregate_id, [bank.MoneyDeposited(amount=1)] * batch)
            written += batch

    def load(self, aggregate_id: str) -> int:
        rows = self.connection.execute(self.select, (aggregate_id,)).fetchall()
        events = self.decoder.decode("[" + ",".join([data for (data,) in rows]) + "]")
        appliers = self.appliers
        state = AccountState()
        for event in events:
            state = appliers[type(event)](state, event)
        if self.dialect != "sqlite":
            self.connection.commit()
        return state.balance

    def command(self, aggregate_id: str) -> None:
        self._write(aggregate_id, [bank.MoneyDeposited(amount=1)])

    def durability(self) -> str:
        if self.dialect == "sqlite":
            return _sqlite_durability(self.connection)
        return "server defaults"

    def close(self) -> None:
        self.connection.close()


def _union(types: tuple[type[Any], ...]) -> Any:
    union: Any = types[0]
    for event_type in types[1:]:
        union = union | event_type
    return union


# -- the measurements -----------------------------------------------------------------


@dataclass
class Sizes:
    long: int = LONG
    loads: int = 20
    dispatch: int = 2_000
    accounts: int = 200
    history_commands: int = 400
    slow_history_commands: int = 20  # eventsourcing replays 10,000 events per command


QUICK = Sizes(
    long=LONG, loads=5, dispatch=500, accounts=100, history_commands=50, slow_history_commands=5
)


@dataclass
class Measured:
    durability: str = ""
    load: float = 0.0  # events/s
    dispatch: float = 0.0  # commands/s
    at_long: float = 0.0  # seconds per command, median, 10,000 events of history
    at_short: float = 0.0  # seconds per command, median, 2 events of history
    pair_ratio: float = float("nan")  # median of (long / short) over adjacent pairs
    notes: list[str] = field(default_factory=list)

    @property
    def growth(self) -> float:
        """What 10,000 events of history do to a command's cost. Each long command is
        paired with the short one timed right beside it, so both saw the same disk."""
        return self.pair_ratio


def measure(contenders: dict[str, Contender], sizes: Sizes) -> dict[str, Measured]:
    """Every measurement runs the contenders in turn, round after round, so that a slow
    spell of the disk or the server lands on all of them alike."""
    results = {name: Measured(durability=c.durability()) for name, c in contenders.items()}
    run = uuid.uuid4().hex[:8]
    long_id, short_id = f"long-{run}", f"short-{run}"
    accounts = [f"acc-{run}-{n}" for n in range(sizes.accounts)]
    for contender in contenders.values():
        contender.seed(long_id, sizes.long)
        contender.seed(short_id, 2)
        for account in accounts:
            contender.seed(account, 1)

    def each() -> list[tuple[str, Contender]]:
        return list(contenders.items())

    loads: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(sizes.loads):
        for name, contender in each():
            gc.collect()
            started = time.perf_counter()
            balance = contender.load(long_id)
            loads[name].append(time.perf_counter() - started)
            assert balance == sizes.long - 1, (name, balance)
    for name, timings in loads.items():
        results[name].load = sizes.long / min(timings)  # the best of the runs: noise only slows

    rounds = 20
    spent = dict.fromkeys(contenders, 0.0)
    per_round = sizes.dispatch // rounds
    for round_ in range(rounds):
        for name, contender in each():
            gc.collect()
            started = time.perf_counter()
            for n in range(round_ * per_round, (round_ + 1) * per_round):
                contender.command(accounts[n % len(accounts)])
            spent[name] += time.perf_counter() - started
    for name, contender in each():
        results[name].dispatch = per_round * rounds / spent[name]
        assert contender.load(accounts[0]) == per_round * rounds // len(accounts), name

    at_long: dict[str, list[float]] = {name: [] for name in contenders}
    at_short: dict[str, list[float]] = {name: [] for name in contenders}
    for contender in contenders.values():
        contender.command(long_id)  # the first command after a restart reads everything
        contender.command(short_id)
    for n in range(sizes.history_commands):
        for name, contender in each():
            if name == "eventsourcing" and n >= sizes.slow_history_commands:
                continue  # it replays 10,000 events per command: a few tell enough
            pair = [(long_id, at_long[name]), (short_id, at_short[name])]
            for aggregate_id, timings in pair if n % 2 else pair[::-1]:  # neither always first
                started = time.perf_counter()
                contender.command(aggregate_id)
                timings.append(time.perf_counter() - started)
    for name in contenders:
        results[name].at_long = statistics.median(at_long[name])
        results[name].at_short = statistics.median(at_short[name])
        pairs = zip(at_long[name], at_short[name], strict=True)
        results[name].pair_ratio = statistics.median(long / short for long, short in pairs)
    return results


# -- the backends ---------------------------------------------------------------------


def sqlite_contenders(folder: Path) -> list[tuple[str, Callable[[], Contender]]]:
    def raw_connect(path: Path) -> Callable[[], sqlite3.Connection]:
        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            # the DB-API's commit() is a no-op in autocommit mode: write it out
            return _AutocommitSqlite(connection)  # type: ignore[return-value]

        return connect

    return [
        ("incident", lambda: Incident(f"sqlite:///{folder / 'incident.db'}")),
        (
            "eventsourcing",
            lambda: EventSourcing(
                {
                    "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                    "SQLITE_DBNAME": str(folder / "eventsourcing.db"),
                    "ORIGINATOR_ID_TYPE": "uuid",
                }
            ),
        ),
        ("raw", lambda: Raw(raw_connect(folder / "raw.db"), "sqlite", projection=False)),
        (
            "raw + projection",
            lambda: Raw(raw_connect(folder / "raw_projection.db"), "sqlite", projection=True),
        ),
    ]


class _AutocommitSqlite:
    """sqlite3 in autocommit mode with explicit BEGIN IMMEDIATE ... COMMIT."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self._connection.execute(sql, parameters)

    def commit(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("COMMIT")


def postgres_contenders(url: str) -> list[tuple[str, Callable[[], Contender]]]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    base = conninfo_to_dict(url)

    def fresh(name: str) -> str:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name}")
            admin.execute(f"CREATE DATABASE {name}")
        return make_conninfo(url, dbname=name)

    def url_of(conninfo: str) -> str:
        parts = conninfo_to_dict(conninfo)
        user = parts.get("user", "postgres")
        password = f":{parts['password']}" if parts.get("password") else ""
        host, port = parts.get("host", "127.0.0.1"), parts.get("port", 5432)
        return f"postgresql://{user}{password}@{host}:{port}/{parts['dbname']}"

    def eventsourcing() -> Contender:
        fresh("bench_eventsourcing")
        return EventSourcing(
            {
                "PERSISTENCE_MODULE": "eventsourcing.postgres",
                "POSTGRES_DBNAME": "bench_eventsourcing",
                "POSTGRES_HOST": str(base.get("host", "127.0.0.1")),
                "POSTGRES_PORT": str(base.get("port", "5432")),
                "POSTGRES_USER": str(base.get("user", "postgres")),
                "POSTGRES_PASSWORD": str(base.get("password", "")),
            }
        )

    return [
        ("incident", lambda: Incident(url_of(fresh("bench_incident")))),
        ("eventsourcing", eventsourcing),
        (
            "raw",
            lambda: Raw(lambda: psycopg.connect(fresh("bench_raw")), "postgres", projection=False),
        ),
        (
            "raw + projection",
            lambda: Raw(
                lambda: psycopg.connect(fresh("bench_raw_projection")),
                "postgres",
                projection=True,
            ),
        ),
    ]


def postgres_reachable(url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except Exception as error:
        return str(error).strip().splitlines()[0]
    return None


# -- the table --------------------------------------------------------------------------


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value else "-"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def report(backend: str, results: dict[str, Measured], sizes: Sizes) -> str:
    inc = results.get("incident")
    es = results.get("eventsourcing")
    raw = results.get("raw")
    raw_p = results.get("raw + projection")
    names = ["incident", "eventsourcing", "raw", "raw + projection"]
    width = 40
    head = f"{'':{width}}" + "".join(f"{n:>18}" for n in names)
    head += f"{'inc/es':>9}{'inc/raw':>9}{'inc/raw+p':>11}"
    lines = [head, "-" * len(head)]

    def row(label: str, values: list[str], ratios: list[str]) -> None:
        lines.append(
            f"{label:{width}}"
            + "".join(f"{v:>18}" for v in values)
            + f"{ratios[0]:>9}{ratios[1]:>9}{ratios[2]:>11}"
        )

    def get(m: Measured | None, attribute: str) -> float:
        return getattr(m, attribute) if m is not None else 0.0

    for label, attribute in (
        (f"load {sizes.long:,}-event aggregate, ev/s", "load"),
        (f"dispatch {sizes.dispatch:,} commands, cmd/s", "dispatch"),
    ):
        value = get(inc, attribute)
        row(
            label,
            [_rate(get(results.get(n), attribute)) for n in names],
            [
                _ratio(value, get(es, attribute)),
                _ratio(value, get(raw, attribute)),
                _ratio(value, get(raw_p, attribute)),
            ],
        )
    per_command = [
        f"{1 / get(results.get(n), 'at_long'):,.0f}" if get(results.get(n), "at_long") else "-"
        for n in names
    ]
    row(f"command at {sizes.long:,} events, cmd/s", per_command, ["", "", ""])
    per_command = [
        f"{1 / get(results.get(n), 'at_short'):,.0f}" if get(results.get(n), "at_short") else "-"
        for n in names
    ]
    row("command at 2 events, cmd/s", per_command, ["", "", ""])
    growth = [f"{results[n].growth:.2f}x" if n in results else "-" for n in names]
    row(f"cost at {sizes.long:,} / cost at 2", growth, ["", "", ""])
    lines.append("")
    for name in names:
        if name in results:
            lines.append(f"  {name}: {results[name].durability}")
            lines.extend(f"  {name}: {note}" for note in results[name].notes)
    return f"{backend}\n" + "\n".join(lines)


def goals(backend: str, results: dict[str, Measured]) -> list[str]:
    inc, es, raw = (results.get(n) for n in ("incident", "eventsourcing", "raw"))
    if inc is None:
        return []
    checks = []

    def check(label: str, value: float, goal: float, context: str = "") -> None:
        verdict = "met" if value >= goal else "MISSED"
        checks.append(f"  {backend} {label}: {value:.2f} (goal >= {goal}) {verdict}{context}")

    def share_of_ceiling(goal: float, of: Measured | None, speed: float) -> str:
        """How much of the raw ceiling a goal asks for: near 1.0, only a contender with
        no work beyond the ceiling's could meet it on this run's disk."""
        if of is None:
            return ""
        return f"; {goal:g}x eventsourcing is {goal * speed / of.dispatch:.0%} of raw here"

    if es:
        check("load / eventsourcing", inc.load / es.load, 20)
        check(
            "dispatch / eventsourcing",
            inc.dispatch / es.dispatch,
            2,
            share_of_ceiling(2, raw, es.dispatch),
        )
    if raw:
        check("load / raw", inc.load / raw.load, 0.85)
        if backend.startswith("SQLite"):
            check("dispatch / raw one-insert-per-commit", inc.dispatch / raw.dispatch, 0.8)
    verdict = "met" if inc.growth <= 1.2 else "MISSED"
    checks.append(
        f"  {backend} command cost at {LONG:,} / at 2: {inc.growth:.2f} (goal <= 1.2) {verdict}"
    )
    return checks


def run_backend(
    backend: str, makers: list[tuple[str, Callable[[], Contender]]], sizes: Sizes
) -> dict[str, Measured]:
    contenders: dict[str, Contender] = {}
    try:
        for name, make in makers:
            try:
                contenders[name] = make()
            except Exception as error:
                print(f"  {backend}: {name} skipped: {error}", file=sys.stderr)
        print(f"  {backend}: measuring {', '.join(contenders)} ...", file=sys.stderr, flush=True)
        return measure(contenders, sizes)
    finally:
        for contender in contenders.values():
            contender.close()


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer commands and repeats")
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    common.add_postgres_url(
        parser,
        "--postgres-url",
        "a database to connect to; the benchmark creates its own bench_* databases",
    )
    common.add_dir(parser, "where the SQLite files go (default: a temp folder)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()

    tables, checks = [], []
    if args.only in (None, "sqlite"):
        folder = Path(args.dir or tempfile.mkdtemp(prefix="incident-bench-"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            label = "SQLite (WAL, synchronous=FULL)"
            results = run_backend(label, sqlite_contenders(folder), sizes)
            tables.append(report(label, results, sizes))
            checks += goals(label, results)
        finally:
            if not args.dir:
                shutil.rmtree(folder, ignore_errors=True)
    if args.only in (None, "postgres"):
        problem = postgres_reachable(args.postgres_url)
        if problem:
            tables.append(f"Postgres skipped: cannot connect to {args.postgres_url}: {problem}")
        else:
            label = "Postgres (server defaults)"
            results = run_backend(label, postgres_contenders(args.postgres_url), sizes)
            tables.append(report(label, results, sizes))
            checks += goals(label, results)

    print(
        f"incident {incident.__version__} vs eventsourcing, python {sys.version.split()[0]}, "
        f"sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus"
        f"{' (quick)' if args.quick else ''}\n"
    )
    print("\n\n".join(tables))
    if checks:
        print("\ngoals:")
        print("\n".join(checks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
