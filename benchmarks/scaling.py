"""Dispatch throughput as writers are added: 1, 2, 4, 8 threads sharing one CommandHandler
and as many processes (each its own handler), on SQLite and Postgres, against raw
ceilings measured in the same run.

    python benchmarks/scaling.py [--only sqlite|postgres] [--modes threads,processes]
                                 [--workers 1,2,4,8] [--commands 300] [--rounds 3]
                                 [--dir DIR] [--postgres-url URL]

A command is the Bank's DepositMoney to one of the writer's own accounts (round robin over
a few, so streams stay short): read or cache the state, decide, append the event and
upsert its BankAccount projection in one transaction. The ceilings are compare.py's raw
contenders, one per writer, each with its own connection: ``raw`` is one single-row
INSERT per commit, ``raw + projection`` adds the projection upsert to the same commit
(the work incident does). SQLite runs in WAL with synchronous=FULL for everyone, so a
raw commit is one fsync; Postgres at server defaults, so every commit waits for its WAL
flush. On SQLite, the mean number of commands that shared a commit is printed for the
threads (the store's group commit, docs/writes.md).

Every measurement takes its turn in every round (contenders, modes and writer counts
interleaved), and the medians over rounds are reported: a slow spell of a shared machine
lands on all of them alike. Run by hand; never part of the test suite.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import common
import compare
import postgres_dispatch

import incident
from incident.examples import bank

WARMUP = 20
ACCOUNTS = 5
CONTENDERS = ("incident", "raw", "raw + projection")


class Spec(NamedTuple):
    """What one writer runs, picklable for a spawned process."""

    contender: str  # one of CONTENDERS
    backend: str  # "sqlite" or "postgres"
    target: str  # incident: the store URL; raw: the SQLite file or the Postgres conninfo
    schema: str  # raw on Postgres: the schema its tables are in
    prefix: str  # the accounts' ids start with it (fresh streams each measurement)


def raw_connection(spec: Spec) -> Any:
    if spec.backend == "sqlite":
        # autocommit mode: Raw writes BEGIN IMMEDIATE itself, and commit() ends it
        connection = sqlite3.connect(spec.target, isolation_level=None, timeout=60)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        return connection
    import psycopg

    return psycopg.connect(spec.target, options=f"-c search_path={spec.schema}")


def writer(spec: Spec, worker: int, app: incident.CommandHandler | None) -> Callable[[int], None]:
    """Opens the writer's accounts and warms it up (untimed); returns its command."""
    accounts = [f"{spec.prefix}-w{worker}-{n}" for n in range(ACCOUNTS)]
    if spec.contender == "incident":
        handler = app if app is not None else bank.build(spec.target)
        for account in accounts:
            handler.dispatch(bank.OpenAccount(aggregate_id=account))

        def command(n: int) -> None:
            handler.dispatch(bank.DepositMoney(aggregate_id=accounts[n % ACCOUNTS], amount=1))

    else:
        raw = compare.Raw(
            lambda: raw_connection(spec), spec.backend, projection=spec.contender != "raw"
        )
        for account in accounts:
            raw.seed(account, 1)

        def command(n: int) -> None:
            raw.command(accounts[n % ACCOUNTS])

    for n in range(WARMUP):
        command(n)
    return command


#: the mean number of commands per commit of each SQLite threads measurement, in turn
SHARED: dict[tuple[str, int], list[float]] = {}


def commits_so_far(store: Any) -> tuple[int, int]:
    """(transactions, appends) the store's shared commits have made so far: SQLite's
    group commit, or a Postgres store's thread batches, whose commits outside a batch
    are a transaction each (appends counted as events: one per command here)."""
    group = getattr(store, "group", None)
    if group is not None:
        return group.transactions, group.appends
    batches = getattr(store, "thread_batches", None)
    if batches is None:
        return 0, 0
    appends = store.last_position()
    return appends - batches.batched + batches.batches, appends


def in_threads(spec: Spec, workers: int, commands: int) -> float:
    """Commands per second, ``workers`` threads (sharing one CommandHandler for incident,
    one connection each for raw), from the first start to the last finish."""
    app = bank.build(spec.target) if spec.contender == "incident" else None
    start = threading.Barrier(workers + 1, timeout=600)
    spans: list[tuple[float, float]] = []
    failures: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            command = writer(spec, worker, app)
            start.wait()
            began = time.perf_counter()
            for n in range(commands):
                command(n)
            spans.append((began, time.perf_counter()))
        except BaseException as error:
            failures.append(error)
            start.abort()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    store = app.event_store if app is not None else None
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    before = commits_so_far(store)
    for thread in threads:
        thread.join()
    after = commits_so_far(store)
    if after[0] > before[0]:
        shared = (after[1] - before[1]) / (after[0] - before[0])
        SHARED.setdefault(("threads", workers), []).append(shared)
    if app is not None:
        app.close()
    if failures:
        raise failures[0]
    return workers * commands / (max(s[1] for s in spans) - min(s[0] for s in spans))


def _process_worker(spec: Spec, worker: int, commands: int, start: Any, results: Any) -> None:
    command = writer(spec, worker, None)
    start.wait()
    began = time.perf_counter()
    for n in range(commands):
        command(n)
    results.put((began, time.perf_counter()))


def in_processes(spec: Spec, workers: int, commands: int) -> float:
    """Commands per second over ``workers`` spawned processes, each its own writer."""
    return postgres_dispatch.run(_process_worker, lambda w: (spec, w), workers, commands)


class Backend(NamedTuple):
    name: str
    specs: dict[str, Callable[[str], Spec]]  # contender -> (prefix -> Spec)
    cleanup: Callable[[], None]


def sqlite_backend(folder: Path) -> Backend:
    def spec(contender: str, file: str) -> Callable[[str], Spec]:
        path = folder / file
        target = f"sqlite:///{path}" if contender == "incident" else str(path)
        return lambda prefix: Spec(contender, "sqlite", target, "", prefix)

    files = {"incident": "incident.db", "raw": "raw.db", "raw + projection": "raw_p.db"}
    for contender in CONTENDERS[1:]:  # WAL and the tables, made once before writers race
        made = spec(contender, files[contender])("")
        compare.Raw(lambda s=made: raw_connection(s), "sqlite", projection=False).close()
    return Backend(
        "SQLite (WAL, synchronous=FULL)",
        {c: spec(c, files[c]) for c in CONTENDERS},
        lambda: None,
    )


def postgres_backend(url: str) -> Backend:
    import psycopg

    tag = uuid.uuid4().hex[:8]
    schemas = {c: f"scaling_{tag}_{n}" for n, c in enumerate(CONTENDERS)}
    with psycopg.connect(url, autocommit=True) as admin:
        for schema in schemas.values():
            admin.execute(f'CREATE SCHEMA "{schema}"')
    store = incident.open_event_store(common.with_schema(url, schemas["incident"]))
    store.initialize()
    store.close()
    for contender in CONTENDERS[1:]:  # their tables, made once before writers race
        spec = Spec(contender, "postgres", url, schemas[contender], "")
        compare.Raw(lambda s=spec: raw_connection(s), "postgres", projection=False).close()

    def spec(contender: str) -> Callable[[str], Spec]:
        target = common.with_schema(url, schemas[contender]) if contender == "incident" else url
        return lambda prefix: Spec(contender, "postgres", target, schemas[contender], prefix)

    def cleanup() -> None:
        with psycopg.connect(url, autocommit=True) as admin:
            for schema in schemas.values():
                admin.execute(f'DROP SCHEMA "{schema}" CASCADE')

    return Backend("Postgres (server defaults)", {c: spec(c) for c in CONTENDERS}, cleanup)


Key = tuple[str, str, int]  # (mode, contender, writers)


def measure(
    backend: Backend, modes: list[str], counts: list[int], options: Any
) -> dict[Key, list[float]]:
    runs: dict[Key, list[float]] = {}
    for round_ in range(options.rounds):
        for n in counts:
            for mode in modes:
                run = in_threads if mode == "threads" else in_processes
                for contender in CONTENDERS:
                    spec = backend.specs[contender](f"r{round_}-{mode[0]}{n}")
                    rate = run(spec, n, options.commands)
                    runs.setdefault((mode, contender, n), []).append(rate)
        print(f"  round {round_ + 1} of {options.rounds} done", flush=True)
    return runs


def report(
    backend: Backend, runs: dict[Key, list[float]], modes: list[str], counts: list[int]
) -> None:
    median = {key: statistics.median(values) for key, values in runs.items()}
    print(f"\n{backend.name}: commands/s, median of {len(next(iter(runs.values())))} rounds")
    print(
        f"{'mode':<10}{'writers':>8}{'incident':>10}{'raw':>8}{'raw+p':>8}"
        f"{'inc/raw':>9}{'inc/raw+p':>10}{'inc/raw@1':>10}   all rounds (incident)"
    )
    for mode in modes:
        ceiling = median[(mode, "raw", counts[0])]
        for n in counts:
            inc, raw, rawp = (median[(mode, c, n)] for c in CONTENDERS)
            rounds = ", ".join(f"{v:.0f}" for v in runs[(mode, "incident", n)])
            print(
                f"{mode:<10}{n:>8}{inc:>10.0f}{raw:>8.0f}{rawp:>8.0f}{inc / raw:>9.2f}"
                f"{inc / rawp:>10.2f}{inc / ceiling:>10.2f}   [{rounds}]"
            )
        if mode == "threads" and SHARED:
            print(
                f"{'':<10}commands per commit (incident, threads): "
                + ", ".join(
                    f"{n}: {statistics.median(SHARED.get(('threads', n), [0])):.1f}" for n in counts
                )
            )
        first, last = counts[0], counts[-1]
        if first != last:
            scale = median[(mode, "incident", last)] / median[(mode, "incident", first)]
            best = max(median[(mode, "raw", n)] for n in counts)
            print(
                f"{'':<10}incident {last} {mode} / {first}: {scale:.2f}x;"
                f" {last} {mode} / best raw one-insert-per-commit ({best:.0f}/s):"
                f" {median[(mode, 'incident', last)] / best:.2f}x"
            )


def main() -> None:
    parser = common.parser(__doc__)
    common.add_postgres_url(parser, "--postgres-url", "the Postgres server, in scratch schemas")
    common.add_dir(parser, "where the SQLite files go (default: a temporary folder)")
    common.add_workers(parser, commands=300)
    parser.set_defaults(workers=[1, 2, 4, 8])
    parser.add_argument("--only", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--modes", default="threads,processes", help="threads, processes or both")
    options = parser.parse_args()
    modes = options.modes.split(",")
    counts = options.workers
    print(
        f"{os.cpu_count()} CPUs, sqlite {sqlite3.sqlite_version}, {options.commands} commands"
        f" per writer after {WARMUP} warm-up commands, writers {counts}\n"
    )
    backends: list[Callable[[], Backend]] = []
    if options.only in (None, "sqlite"):
        # a fresh folder each run, inside --dir when given: the files' accounts are named
        # by round and writer, so a second run on the same files would find them opened
        folder = Path(tempfile.mkdtemp(prefix="scaling-", dir=options.dir))
        backends.append(lambda: sqlite_backend(folder))
    if options.only in (None, "postgres"):
        unreachable = compare.postgres_reachable(options.postgres_url)
        if unreachable is None:
            backends.append(lambda: postgres_backend(options.postgres_url))
        else:
            print(f"Postgres skipped: {unreachable}")
    for make in backends:
        backend = make()
        print(backend.name)
        try:
            runs = measure(backend, modes, counts, options)
        finally:
            backend.cleanup()
        report(backend, runs, modes, counts)
        SHARED.clear()
        print()


if __name__ == "__main__":
    main()
