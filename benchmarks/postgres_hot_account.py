"""Dispatch throughput on Postgres when every worker process writes to one account.

    python benchmarks/postgres_hot_account.py [--url postgresql://...] [--commands 200]
        [--workers 1,8] [--rounds 3] [--retries 10]

Each worker is its own OS process with its own pool and withdraws 1 at a time from the
same account, so from two workers on every command races the others for one stream.
Reported per worker count: commands per second over all workers (from the first start
to the last finish) and how many commands gave up with a ConcurrencyError after their
retries. Runs in a scratch schema that is dropped at the end. postgres_dispatch.py
measures the uncontended case (every worker on accounts of its own).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import time
import uuid
from contextlib import suppress
from typing import Any

import common
import psycopg

import incident
from incident.examples import bank

spawn = multiprocessing.get_context("spawn")
WARMUP = 5


def _worker(url: str, retries: int, commands: int, start: Any, results: Any) -> None:
    app = bank.build(url, retries=retries)
    for _ in range(WARMUP):  # before the barrier: connections open, statements prepared
        with suppress(incident.ConcurrencyError):
            app.dispatch(bank.WithdrawMoney(aggregate_id="HOT", amount=1))
    start.wait()
    gave_up = 0
    began = time.perf_counter()
    for _ in range(commands):
        try:
            app.dispatch(bank.WithdrawMoney(aggregate_id="HOT", amount=1))
        except incident.ConcurrencyError:
            gave_up += 1
    results.put((began, time.perf_counter(), gave_up))
    app.event_store.close()


def run(url: str, workers: int, commands: int, retries: int) -> tuple[float, int]:
    """(commands per second over all workers, commands that gave up)."""
    app = bank.build(url)
    app.dispatch(bank.OpenAccount(aggregate_id="HOT"))
    app.dispatch(bank.DepositMoney(aggregate_id="HOT", amount=workers * (commands + WARMUP)))
    app.event_store.close()
    start = spawn.Barrier(workers, timeout=600)
    results = spawn.Queue()
    processes = [
        spawn.Process(target=_worker, args=(url, retries, commands, start, results))
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    spans: list[tuple[float, float, int]] = []
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
    began = min(span[0] for span in spans)
    ended = max(span[1] for span in spans)
    return workers * commands / (ended - began), sum(span[2] for span in spans)


def main() -> None:
    parser = common.parser(__doc__)
    common.add_postgres_url(parser, "--url", "the server to measure, in scratch schemas")
    common.add_workers(parser, commands=200)
    parser.add_argument("--retries", type=int, default=10, help="CommandHandler(retries=)")
    options = parser.parse_args()
    counts = options.workers
    print(
        f"{options.commands} withdrawals per worker from one account, retries="
        f"{options.retries}, {os.cpu_count()} CPUs; medians of {options.rounds} rounds\n"
    )
    rates: dict[int, list[float]] = {n: [] for n in counts}
    gave_up: dict[int, list[int]] = {n: [] for n in counts}
    for _ in range(options.rounds):
        for n in counts:
            # a fresh schema per run: every run starts from a two-event account
            schema = f"incident_bench_{uuid.uuid4().hex[:8]}"
            url = common.with_schema(options.url, schema)
            try:
                rate, failed = run(url, n, options.commands, options.retries)
            finally:
                with psycopg.connect(options.url, autocommit=True) as admin:
                    admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            rates[n].append(rate)
            gave_up[n].append(failed)
    print(f"{'workers':>8} {'cmd/s':>8}  {'all rounds':<24} {'gave up (per round)':<20}")
    for n in counts:
        spread = ", ".join(f"{r:.0f}" for r in rates[n])
        print(
            f"{n:>8} {statistics.median(rates[n]):>8.0f}  [{spread}]{'':<4}"
            f" {gave_up[n]} of {n * options.commands}"
        )


if __name__ == "__main__":
    main()
