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

It also prints what one thread hop costs on this machine (a no-op ``run_in_executor``
round trip, the least an async SQLite dispatch adds, since its fsync must leave the
loop) and the floor that puts under the single ratio: (sync + hop) / sync.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import common
import psycopg

from incident.examples import bank

THREADS, TASKS = 8, 64


def hop_cost(rounds: int = 5, hops: int = 2000) -> float:
    """Seconds for one no-op round trip from the loop to a worker thread and back (the
    median of ``rounds``)."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as pool:
            for _ in range(100):
                await loop.run_in_executor(pool, int)
            runs = []
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(hops):
                    await loop.run_in_executor(pool, int)
                runs.append((time.perf_counter() - started) / hops)
        return statistics.median(runs)

    return asyncio.run(main())


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
        # each comparison is a sync case and its async twin, measured back to back in
        # every round (which goes first alternates): the disk's fsync rate wanders
        # over minutes, so only a ratio of neighbours is worth keeping
        pairs = {
            "single": ((sync_run, 1), (async_run, 1)),
            "concurrent": ((sync_run, THREADS), (async_run, TASKS)),
        }
        hop = hop_cost()
        cost: dict[tuple[str, str, str], list[float]] = {}
        for round_ in range(args.rounds):
            for backend, fresh in backends.items():
                for pair, twins in pairs.items():
                    flavours = list(zip(("sync", "async"), twins, strict=True))
                    for flavour, (run, writers) in flavours[:: 1 if round_ % 2 else -1]:
                        commands = args.commands - args.commands % writers
                        with fresh() as url:
                            took = run(url, writers, commands)
                        cost.setdefault((backend, pair, flavour), []).append(took / commands)
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        for backend in backends:
            print(f"\n{backend} ({args.commands} commands, {args.rounds} rounds)")
            for pair in pairs:
                sync, asy = cost[(backend, pair, "sync")], cost[(backend, pair, "async")]
                for flavour, runs in (("sync", sync), ("async", asy)):
                    per = statistics.median(runs)
                    print(f"  {pair} {flavour:<6} {per * 1e6:8.0f} us/command (median)")
                ratios = sorted(a / s for a, s in zip(asy, sync, strict=True))
                if pair == "single":
                    what = "one async / one sync dispatch, cost (goal <= 1.3)"
                else:
                    ratios = sorted(1 / r for r in ratios)
                    what = f"{TASKS} tasks / {THREADS} threads, throughput (goal >= 1.0)"
                rounds = ", ".join(f"{r:.2f}" for r in ratios)
                print(f"  {what}: {statistics.median(ratios):.2f}x (rounds: {rounds})")
                if pair == "single" and backend == "sqlite":
                    one = statistics.median(sync)
                    print(
                        f"  a no-op thread hop here costs {hop * 1e6:.0f} us: the floor "
                        f"for one async SQLite dispatch is {(one + hop) / one:.2f}x"
                    )


if __name__ == "__main__":
    main()
