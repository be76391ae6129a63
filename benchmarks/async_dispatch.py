"""AsyncCommandHandler against CommandHandler on SQLite and Postgres (issue 19): one task
against one thread, and 64 tasks against 8 threads, as ratios measured in one run.

    python benchmarks/async_dispatch.py [--only sqlite|postgres] [--commands 400]
                                        [--rounds 3] [--dir DIR] [--postgres-url URL]

A command is the Bank's DepositMoney to one of the writer's own accounts (read or cache
the state, decide, append the event and upsert its BankAccount projection in one
transaction). ``single``: ``--commands`` dispatched one after the other, by one thread on
the sync handler, by one task on the async one; the figure is the async cost per command
over the sync cost (goal: at most 1.3). ``concurrent``: the same number of commands
spread over 8 threads sharing one sync handler, and over 64 tasks on one async handler;
the figure is the async throughput over the sync one (goal: at least 1.0). Every
measurement gets a fresh database and takes its turn in every round; medians over rounds
are reported. Run by hand; never part of the test suite.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import common
import psycopg

from incident.examples import bank

THREADS, TASKS = 8, 64


def deposits(writer: int, count: int) -> list[bank.DepositMoney]:
    return [bank.DepositMoney(aggregate_id=f"W{writer}-{n % 3}", amount=1) for n in range(count)]


def sync_run(url: str, writers: int, commands: int) -> float:
    """Seconds for ``commands`` deposits over ``writers`` threads on one CommandHandler."""
    with bank.build(url) as app:
        for writer in range(writers):
            for n in range(3):
                app.dispatch(bank.OpenAccount(aggregate_id=f"W{writer}-{n}"))
        plans = [deposits(writer, commands // writers) for writer in range(writers)]
        if writers == 1:
            started = time.perf_counter()
            for command in plans[0]:
                app.dispatch(command)
            return time.perf_counter() - started
        threads = [
            threading.Thread(target=lambda p=plan: [app.dispatch(c) for c in p]) for plan in plans
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started


def async_run(url: str, writers: int, commands: int) -> float:
    """Seconds for ``commands`` deposits over ``writers`` tasks on one AsyncCommandHandler."""

    async def main() -> float:
        async with bank.build_async(url) as app:
            for writer in range(writers):
                for n in range(3):
                    await app.dispatch(bank.OpenAccount(aggregate_id=f"W{writer}-{n}"))
            plans = [deposits(writer, commands // writers) for writer in range(writers)]

            async def write(plan: list[bank.DepositMoney]) -> None:
                for command in plan:
                    await app.dispatch(command)

            started = time.perf_counter()
            await asyncio.gather(*(write(plan) for plan in plans))
            return time.perf_counter() - started

    return asyncio.run(main())


@contextmanager
def fresh_sqlite(folder: Path) -> Iterator[str]:
    yield f"sqlite:///{folder / uuid.uuid4().hex}.db"


@contextmanager
def fresh_postgres(server: str) -> Iterator[str]:
    schema = f"incident_bench_{uuid.uuid4().hex[:12]}"
    try:
        yield common.with_schema(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--commands", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    common.add_dir(parser, "where the SQLite files go (default: a temporary folder)")
    common.add_postgres_url(parser, "--postgres-url", "the Postgres server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        backends: dict[str, Callable[[], AbstractContextManager[str]]] = {
            "sqlite": partial(fresh_sqlite, Path(folder)),
            "postgres": partial(fresh_postgres, args.postgres_url),
        }
        if args.only:
            backends = {args.only: backends[args.only]}
        cases = {
            "single sync": (sync_run, 1),
            "single async": (async_run, 1),
            f"{THREADS} threads sync": (sync_run, THREADS),
            f"{TASKS} tasks async": (async_run, TASKS),
        }
        seconds: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for backend, fresh in backends.items():
                # the order turns each round, so no case is always first (or last)
                order = (
                    list(cases.items())[round_ % len(cases) :]
                    + list(cases.items())[: round_ % len(cases)]
                )
                for case, (run, writers) in order:
                    commands = args.commands - args.commands % writers
                    with fresh() as url:
                        took = run(url, writers, commands)
                    seconds.setdefault((backend, case), []).append(took / commands)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        for backend in backends:
            per = {case: statistics.median(seconds[(backend, case)]) for case in cases}
            print(f"\n{backend} ({args.commands} commands, median of {args.rounds} rounds)")
            for case, cost in per.items():
                print(f"  {case:<18} {cost * 1e6:8.0f} us/command  {1 / cost:8.0f} commands/s")
            single = per["single async"] / per["single sync"]
            concurrent = per[f"{THREADS} threads sync"] / per[f"{TASKS} tasks async"]
            print(f"  one async / one sync dispatch (cost): {single:.2f}x (goal <= 1.3)")
            print(
                f"  {TASKS} tasks / {THREADS} threads (throughput): {concurrent:.2f}x (goal >= 1.0)"
            )


if __name__ == "__main__":
    main()
