"""Dispatch throughput on Postgres with 1 and 8 worker processes, against the raw psycopg
insert ceiling measured in the same run on the same server.

    python benchmarks/postgres_dispatch.py [--url postgresql://...] [--commands 500] [--rounds 3]

Every worker is its own OS process with its own pool, as application servers would be.
A dispatch is a DepositMoney on one of the worker's own accounts: read the stream, decide,
append the event and upsert the BankAccount projection in one transaction (one commit).
The ceiling is one single-row INSERT of the same JSON payload per commit, through plain
psycopg into a bigserial table: no reads, no lock, no projection. Runs in a scratch
schema that is dropped at the end.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import common
import psycopg

import incident
from incident.examples import bank

spawn = multiprocessing.get_context("spawn")
WARMUP = 20
ACCOUNTS = 25


def _dispatch_worker(url: str, prefix: str, commands: int, start: Any, results: Any) -> None:
    app = bank.build(url)
    # Round robin over a few accounts: short streams, as most aggregates have, so the
    # numbers measure the store and not folding one ever-longer stream.
    accounts = [f"{prefix}-{n}" for n in range(ACCOUNTS)]
    for account in accounts:
        app.dispatch(bank.OpenAccount(aggregate_id=account))
    for n in range(WARMUP):
        app.dispatch(bank.DepositMoney(aggregate_id=accounts[n % ACCOUNTS], amount=1))
    start.wait()
    began = time.perf_counter()
    for n in range(commands):
        app.dispatch(bank.DepositMoney(aggregate_id=accounts[n % ACCOUNTS], amount=1))
    results.put((began, time.perf_counter()))
    app.event_store.close()


def _insert_worker(conninfo: str, schema: str, commands: int, start: Any, results: Any) -> None:
    payload = '{"type":"MoneyDeposited","amount":1}'
    query = f'INSERT INTO "{schema}".raw (aggregate_id, data) VALUES (%s, %s::json)'
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for _ in range(WARMUP):
            conn.execute(query, ["warmup", payload])
        start.wait()
        began = time.perf_counter()
        for _ in range(commands):
            conn.execute(query, ["bench", payload])  # autocommit: one commit per insert
        results.put((began, time.perf_counter()))


def run(target: Any, args: Callable[[int], tuple[Any, ...]], workers: int, commands: int) -> float:
    """Operations per second over all workers, from the first start to the last finish."""
    start = spawn.Barrier(workers, timeout=600)
    results = spawn.Queue()
    processes = [
        spawn.Process(target=target, args=(*args(worker), commands, start, results))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    spans: list[tuple[float, float]] = []
    while len(spans) < workers:
        try:
            spans.append(results.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in processes):
                for process in processes:
                    process.kill()
                raise SystemExit("a worker failed; see its traceback above") from None
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a worker failed with exit code {process.exitcode}")
    began = min(span[0] for span in spans)
    ended = max(span[1] for span in spans)
    return workers * commands / (ended - began)


def main() -> None:
    parser = common.parser(__doc__)
    common.add_postgres_url(parser, "--url", "the server to measure, in a scratch schema")
    common.add_workers(parser, commands=500)
    options = parser.parse_args()
    counts = options.workers
    schema = f"incident_bench_{uuid.uuid4().hex[:8]}"
    conninfo = options.url
    url = common.with_schema(conninfo, schema)

    with psycopg.connect(conninfo, autocommit=True) as admin:
        server = admin.execute("SHOW server_version").fetchone()
        sync = admin.execute("SHOW synchronous_commit").fetchone()
        fsync = admin.execute("SHOW fsync").fetchone()
    store = incident.open_event_store(url)
    store.initialize()
    store.close()
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(
            f'CREATE TABLE "{schema}".raw (id bigserial PRIMARY KEY, aggregate_id text, data json)'
        )
    print(
        f"Postgres {server and server[0]}, synchronous_commit={sync and sync[0]},"
        f" fsync={fsync and fsync[0]}, {os.cpu_count()} CPUs"
    )
    print(f"{options.commands} commands per worker, after {WARMUP} warm-up commands each\n")

    # Rounds alternate the two measurements, and the median of each is reported, so a
    # busy moment on a shared machine skews neither side alone.
    raw: dict[int, list[float]] = {n: [] for n in counts}
    dispatch: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for round_ in range(options.rounds):
            for n in counts:
                raw[n].append(
                    run(_insert_worker, lambda _: (conninfo, schema), n, options.commands)
                )
                prefix = f"r{round_}-n{n}"
                dispatch[n].append(
                    run(
                        _dispatch_worker, lambda w, p=prefix: (url, f"{p}-{w}"), n, options.commands
                    )
                )
    finally:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
    print(f"medians of {options.rounds} rounds (all rounds, per second, in brackets)\n")
    for n in counts:
        print(f"{n} worker(s): dispatch {_spread(dispatch[n])}   raw insert {_spread(raw[n])}")
    medians = {n: (statistics.median(dispatch[n]), statistics.median(raw[n])) for n in counts}

    print(f"\n{'workers':>8} {'dispatch/s':>12} {'raw insert/s':>14} {'dispatch/raw':>13}")
    for n in counts:
        d, r = medians[n]
        print(f"{n:>8} {d:>12.0f} {r:>14.0f} {d / r:>13.2f}")
    first, last = counts[0], counts[-1]
    if first != last:
        print(
            f"\nscaling {first} -> {last} workers: dispatch"
            f" x{medians[last][0] / medians[first][0]:.2f},"
            f" raw insert x{medians[last][1] / medians[first][1]:.2f}"
        )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.0f} [{', '.join(f'{v:.0f}' for v in values)}]"


if __name__ == "__main__":
    main()
