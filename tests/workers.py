"""Running test work in spawned OS processes, and store-agnostic work for them. Children
import this small module rather than a test module, so they start without pytest."""

from __future__ import annotations

import multiprocessing
from typing import Any

from incident.examples import bank


def run_processes(target: Any, *args: Any, processes: int) -> list[Any]:
    """Start ``processes`` spawned children running ``target(*args, start, results)``, each
    waiting at one barrier so they race; returns what each put on ``results``."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=target, args=(*args, start, results)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return outcomes


def deposit_with_key_in_process(url: str, key: str, start: Any, results: Any) -> None:
    """Deposit 10 into account A under one idempotency key; report the event ids stored."""
    handler = bank.build(url)
    start.wait()
    try:
        recorded = handler.dispatch(
            bank.DepositMoney(aggregate_id="A", amount=10), metadata={"idempotency_key": key}
        )
        results.put(sorted(r.event_id for r in recorded))
    except Exception as error:  # reported to the test rather than lost in a child
        results.put(f"{type(error).__name__}: {error}")
    finally:
        handler.event_store.close()
