"""Subscription lag: can the Bank's transfer process, run as a durable subscription, keep
up with writer processes dispatching transfers and deposits at full speed? (issue 18)

    python benchmarks/process_lag.py [--only sqlite|postgres] [--seconds 20]
                                     [--writers 4] [--concurrency 1,16] [--rounds 2]
                                     [--accounts 100] [--dir DIR] [--postgres-url URL]
                                     [--sqlite-lock-poll MS]

For each backend, each ``--concurrency`` and each round, on a fresh database: ``--writers``
spawned processes dispatch, as fast as they can for ``--seconds``, RequestTransfer and
DepositMoney in turn (one CommandHandler each, the Bank's read models inline), between
``--accounts`` accounts that are opened first. One more spawned process runs the
transfer process (``money_transfer``) as a Subscription with that concurrency, with the
read models inline in the commands it dispatches, as ``incident subscribe`` would.

Once a second the lag is sampled: in events (the head of the log minus the checkpoint)
and in seconds (the age of the oldest event past the checkpoint, 0 when there is none).
Printed: the writers' commands/s, the max lag and the lag when the writers stop, and the
catch-up time (from the writers' stop until the checkpoint is at the head of a log that
has stopped growing: the process appends as it goes). At the end every transfer must be
completed and the money conserved, or the run says so. The first ``--concurrency`` is the
same-run baseline the others are compared with. Run by hand; never part of the tests.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import common

import incident
from incident.examples import bank
from incident.subscriptions import last_position

OPENING_BALANCE = 10**9
POLL_VARIABLE = "PROCESS_LAG_SQLITE_POLL_MS"  # --sqlite-lock-poll, seen by spawned children
HANDLER = bank.money_transfer.name


def application(url: str, pool: int = 10) -> incident.CommandHandler:
    options = {"pool_size": pool} if url.startswith("postgres") else {}
    if url.startswith("sqlite"):
        _poll_if_asked()
    return incident.CommandHandler(
        incident.open_event_store(url, **options),
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections],
    )


def _writer(url: str, worker: int, accounts: int, start: Any, stop: Any, results: Any) -> None:
    app = application(url)
    n = 0
    start.wait()
    while not stop.is_set():
        source = (worker * 7919 + n) % accounts
        if n % 2:
            app.dispatch(bank.DepositMoney(aggregate_id=f"ACC{source}", amount=5))
        else:
            destination = (source + 1 + n % (accounts - 1)) % accounts
            app.dispatch(
                bank.RequestTransfer(
                    aggregate_id=f"T{worker}-{n}",
                    source_account_number=f"ACC{source}",
                    destination_account_number=f"ACC{destination}",
                    amount=1 + n % 9,
                )
            )
        n += 1
    results.put((worker, n, (n + 1) // 2))
    app.close()


def _poll_if_asked() -> None:
    poll = float(os.environ.get(POLL_VARIABLE) or 0)
    if poll:
        _poll_for_the_write_lock(poll / 1000)


def _poll_for_the_write_lock(interval: float) -> None:
    """An experiment, not the store's behaviour: BEGIN IMMEDIATE without SQLite's busy
    handler (whose sleeps grow to 100 ms, so a process that has waited a while polls
    seldom), tried again every ``interval`` seconds, so waiting processes take turns."""
    import sqlite3

    from incident.stores.sqlite.database import WriteTransaction

    if getattr(WriteTransaction, "polled", False):
        return
    enter = WriteTransaction.__enter__

    def polled(self: WriteTransaction) -> Any:
        deadline = time.monotonic() + 30
        while True:
            try:
                with _no_busy_handler(self):
                    return enter(self)
            except incident.StoreError as error:
                cause = error.__cause__
                locked = isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause)
                if not locked or time.monotonic() > deadline:
                    raise
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
            time.sleep(interval)

    WriteTransaction.__enter__ = polled  # type: ignore[method-assign]
    WriteTransaction.polled = True  # type: ignore[attr-defined]


@contextmanager
def _no_busy_handler(transaction: Any) -> Iterator[None]:
    conn = transaction._db.conn()
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(transaction._db.timeout * 1000)}")


def _time_the_write_lock() -> list[float]:
    """On SQLite, add up how long this process waits in BEGIN IMMEDIATE (for the file's
    one write lock, which the writer processes contend for too)."""
    from incident.stores.sqlite.database import WriteTransaction

    _poll_if_asked()  # first, so that the time of every try is counted
    waited = [0.0]
    enter = WriteTransaction.__enter__

    def timed(self: WriteTransaction) -> Any:
        began = time.perf_counter()
        try:
            return enter(self)
        finally:
            waited[0] += time.perf_counter() - began

    WriteTransaction.__enter__ = timed  # type: ignore[method-assign]
    return waited


def _subscriber(
    url: str, concurrency: int, signals: tuple[Any, Any, Any, Any], report: Any
) -> None:
    """Runs the transfer process until ``stop``; reports where its time went while the
    writers ran (from ``start`` to ``writers_stopped``)."""
    ready, start, writers_stopped, stop = signals
    lock_wait = _time_the_write_lock() if url.startswith("sqlite") else [0.0]
    app = application(url, pool=concurrency + 4)  # a connection per worker, and its own
    subscription = incident.Subscription(bank.money_transfer, app, concurrency=concurrency)
    group = getattr(app.event_store, "group", None)  # SQLite's group commit, if any
    done = threading.Event()
    ready.set()

    def watch() -> None:  # run() waits on a thread's Event; the parent sets a process's
        start.wait()
        began, cpu, waited = time.monotonic(), time.process_time(), lock_wait[0]
        commits = (group.transactions, group.appends) if group else (0, 0)
        writers_stopped.wait()
        wall = time.monotonic() - began
        transactions = group.transactions - commits[0] if group else 0
        shared = (group.appends - commits[1]) / transactions if group and transactions else 0.0
        report.put(Where(time.process_time() - cpu, wall, shared, lock_wait[0] - waited))
        stop.wait()
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    subscription.run(done)
    app.close()


class Where(NamedTuple):
    """Where the subscriber's time went while the writers ran: CPU seconds (all its
    threads), wall seconds, and on SQLite the mean number of appends that shared one
    commit and the seconds its committing thread waited for the write lock."""

    cpu_s: float
    wall_s: float
    appends_per_commit: float
    lock_wait_s: float

    def __str__(self) -> str:
        shared = self.appends_per_commit
        sqlite = (
            f", {shared:.1f} appends/commit, waited for the write lock"
            f" {self.lock_wait_s / self.wall_s:.0%} of the time"
            if shared
            else ""
        )
        return f"subscriber {self.cpu_s / self.wall_s:.2f} cores busy{sqlite}"


class Sample(NamedTuple):
    events: int
    seconds: float


def sample(store: incident.EventStore, checkpoints: incident.CheckpointStore) -> Sample:
    checkpoint = checkpoints.load(HANDLER)
    head = last_position(store)
    oldest = next(iter(store.read_all(after=checkpoint, limit=1)), None)
    if oldest is None:
        return Sample(0, 0.0)
    age = (dt.datetime.now(dt.UTC) - oldest.event_date).total_seconds()
    return Sample(head - checkpoint, max(age, 0.0))


class Result(NamedTuple):
    commands_per_s: float
    max_lag: Sample
    at_stop: Sample
    catch_up_s: float
    problems: list[str]
    where: Where
    load: float  # the machine's 1-minute load average at the writers' stop


def run_once(url: str, concurrency: int, options: Any) -> Result:
    setup = application(url)
    setup.event_store.initialize()
    for n in range(options.accounts):
        setup.dispatch(bank.OpenAccount(aggregate_id=f"ACC{n}"))
        setup.dispatch(bank.DepositMoney(aggregate_id=f"ACC{n}", amount=OPENING_BALANCE))
    store = setup.event_store
    checkpoints = incident.stores.checkpoint_store_for(store)

    context = multiprocessing.get_context("spawn")
    start, stop, ready, done = (context.Event() for _ in range(4))
    results, report = context.Queue(), context.Queue()
    subscriber = context.Process(
        target=_subscriber, args=(url, concurrency, (ready, start, stop, done), report)
    )
    writers = [
        context.Process(
            target=_writer, args=(url, w, options.accounts, start, stop, results), daemon=True
        )
        for w in range(options.writers)
    ]
    subscriber.start()
    for process in writers:
        process.start()
    ready.wait(60)
    time.sleep(2)  # the writers import and connect; the start is one signal to all
    samples: list[Sample] = []
    start.set()
    began = time.monotonic()
    while time.monotonic() - began < options.seconds:
        time.sleep(1)
        samples.append(sample(store, checkpoints))
    stop.set()
    stopped = time.monotonic()
    at_stop = sample(store, checkpoints)
    load = os.getloadavg()[0]
    counts = [results.get(timeout=60) for _ in writers]
    for process in writers:
        process.join(60)
    problems: list[str] = []
    while True:  # caught up: at the head, and the head stays put for a moment
        head = last_position(store)
        if checkpoints.load(HANDLER) == head:
            time.sleep(0.3)
            if last_position(store) == head and checkpoints.load(HANDLER) == head:
                break
        if time.monotonic() - stopped > options.catch_up_limit:
            limit = options.catch_up_limit
            problems.append(f"not caught up {limit:.0f}s after the writers stopped")
            break
        time.sleep(0.02)
    catch_up = time.monotonic() - stopped
    done.set()
    where = report.get(timeout=60)
    subscriber.join(60)

    commands = sum(n for _, n, _ in counts)
    transfers = sum(t for _, _, t in counts)
    if not problems:
        problems += check_books(setup, options, counts)
    setup.close()
    return Result(
        commands / options.seconds,
        Sample(max(s.events for s in samples), max(s.seconds for s in samples)),
        at_stop,
        catch_up,
        [*problems, *([] if transfers else ["no transfer was dispatched"])],
        where,
        load,
    )


def check_books(app: incident.CommandHandler, options: Any, counts: list[Any]) -> list[str]:
    """Every transfer completed; the accounts hold what was deposited."""
    problems = []
    transfers = [f"T{w}-{n}" for w, sent, _ in counts for n in range(0, sent, 2)]
    statuses = {app.state("transfer", t).status for t in transfers}
    if statuses != {"completed"}:
        problems.append(f"transfer statuses {statuses}")
    held = sum(app.state("bank_account", f"ACC{n}").balance for n in range(options.accounts))
    deposited = options.accounts * OPENING_BALANCE + 5 * sum(n // 2 for _, n, _ in counts)
    if held != deposited:
        problems.append(f"the accounts hold {held}, {deposited} went in")
    return problems


@contextmanager
def fresh_database(backend: str, options: Any) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(dir=options.dir) as folder:
            yield f"sqlite:///{Path(folder) / 'lag.db'}"
        return
    import psycopg

    schema = f"process_lag_{uuid.uuid4().hex[:8]}"
    try:
        yield common.with_schema(options.postgres_url, schema)
    finally:
        with psycopg.connect(options.postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def report(backend: str, runs: dict[int, list[Result]]) -> None:
    def spread(values: list[float], form: Callable[[float], str]) -> str:
        low, high = min(values), max(values)
        return form(low) if len(values) == 1 or low == high else f"{form(low)}-{form(high)}"

    whole = "{:,.0f}".format
    print(f"\n{backend}: ranges over {max(len(r) for r in runs.values())} runs")
    print(
        f"{'concurrency':>11}  {'cmd/s':>13}  {'max lag (events)':>17}  {'max lag (s)':>11}  "
        f"{'lag at stop':>18}  {'catch-up (s)':>12}  vs baseline"
    )
    baseline = statistics.median(r.catch_up_s for r in runs[next(iter(runs))])
    for concurrency, results in runs.items():
        catch_up = statistics.median(r.catch_up_s for r in results)
        print(
            f"{concurrency:>11}  {spread([r.commands_per_s for r in results], whole):>13}  "
            f"{spread([r.max_lag.events for r in results], whole):>17}  "
            f"{spread([r.max_lag.seconds for r in results], '{:.2f}'.format):>11}  "
            f"{spread([r.at_stop.events for r in results], whole):>18}  "
            f"{spread([r.catch_up_s for r in results], '{:.1f}'.format):>12}  "
            f"catch-up {catch_up / baseline:.2f}x"
        )
        for result in results:
            for problem in result.problems:
                print(f"{'':>11}  PROBLEM: {problem}")


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--concurrency", type=lambda t: [int(n) for n in t.split(",")],
                        default="1,16")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--catch-up-limit", type=float, default=300)
    parser.add_argument(
        "--sqlite-lock-poll",
        type=float,
        default=0,
        metavar="MS",
        help="an experiment: every process polls for SQLite's write lock at this interval"
        " instead of using SQLite's busy handler",
    )
    common.add_dir(parser, "where the SQLite files go (default: a temporary folder)")
    common.add_postgres_url(parser, "--postgres-url", "the server to measure")
    options = parser.parse_args()
    if options.sqlite_lock_poll:
        os.environ[POLL_VARIABLE] = str(options.sqlite_lock_poll)
    backends = [options.only] if options.only else ["postgres", "sqlite"]
    for backend in backends:
        runs: dict[int, list[Result]] = {c: [] for c in options.concurrency}
        for round_ in range(options.rounds):
            for concurrency in options.concurrency:  # interleaved: a slow spell hits all
                with fresh_database(backend, options) as url:
                    result = run_once(url, concurrency, options)
                runs[concurrency].append(result)
                print(
                    f"{backend} round {round_ + 1} concurrency {concurrency}: "
                    f"{result.commands_per_s:,.0f} cmd/s, max lag {result.max_lag.events:,} "
                    f"events / {result.max_lag.seconds:.2f}s, at stop "
                    f"{result.at_stop.events:,}, catch-up {result.catch_up_s:.1f}s; "
                    f"{result.where}; load {result.load:.1f} {'; '.join(result.problems)}",
                    flush=True,
                )
        report(backend, runs)


if __name__ == "__main__":
    main()
