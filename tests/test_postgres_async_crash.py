"""A Postgres crash while an AsyncCommandHandler's tasks dispatch (issues 18 and 19): the
appends that go to Postgres from the event loop, on async connections, in shared
transactions (postgres/async_batch.py), keep the guarantees of the sync path's crash
test (test_postgres_crash.py), whose checks this test reuses.

Sixteen tasks share one Bank AsyncCommandHandler, dispatching deposits (most unkeyed,
so they go in the loop's batches; some keyed, retried after a store error),
withdrawals, deposits to two accounts every task races for, transfers, and raw
three-event appends, while a tail reader with a sync store of its own follows the log.
The private cluster crashes (``pg_ctl stop -m immediate``) mid-flight and comes back
after OUTAGE seconds; the same handler must work again within RECOVERY seconds, and
then every acknowledged event is in the log where it was told, nothing is half there,
positions are gapless, and the reader saw nothing the crash took back.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import closing
from functools import partial
from typing import Any

import pytest
from bounded_loop import run_bounded
from test_postgres_crash import (
    BATCH,
    OUTAGE,
    POOL_TIMEOUT,
    RECOVERY,
    Attempt,
    Reader,
    acknowledged,
    check_log,
    check_read_models,
    cluster,
    event_types,
    settled,
)

import incident
from incident.examples import bank

__all__ = ["cluster"]  # the private cluster fixture, shared with the sync crash test

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TASKS = 16
SHARED = ("S0", "S1")
BEFORE_CRASH = 400  # acknowledged requests before the crash
AFTER_RESTART = 5  # acknowledged requests each task must make after the restart
KEYED_TRIES = 5


async def attempt(
    task: int, op: str, stream: str, call: Callable[[], Awaitable[Any]], key: str | None = None
) -> Attempt:
    done = Attempt(task, op, stream, key=key)
    try:
        recorded = await call()
    except Exception as error:
        return settled(done, failure=error)
    return settled(done, recorded)


async def write(
    handler: incident.AsyncCommandHandler, task: int, stop: asyncio.Event, log: list[Attempt]
) -> None:
    """Requests of every kind until ``stop``; after a store error, a bounded backoff."""
    rng = random.Random(task)
    own = f"W{task}"
    backoff = 0.0
    step = 0
    while not stop.is_set():
        step += 1
        op = rng.choice(("deposit", "deposit", "keyed", "withdraw", "shared", "transfer", "batch"))
        tries: list[Attempt] = []
        if op == "keyed":  # tried again after a store error: stored once
            key = f"deposit-{task}-{step}"
            keyed = bank.DepositMoney(aggregate_id=own, amount=rng.randint(1, 9))
            call = partial(handler.dispatch, keyed, {"idempotency_key": key})
            for _ in range(KEYED_TRIES):
                tries.append(await attempt(task, op, own, call, key))
                if tries[-1].outcome not in ("store_error", "commit_unknown") or stop.is_set():
                    break
                await asyncio.sleep(0.05 * len(tries))
        elif op == "batch":  # three events to a stream of their own: whole or nothing
            stream = f"L{task}-{step}"
            events = [bank.MoneyDeposited(amount=i + 1) for i in range(BATCH)]

            def append(stream: str = stream, events: list[Any] = events) -> Awaitable[Any]:
                return handler.event_store.append(
                    stream, events, expected_version=0, aggregate="ledger"
                )

            tries.append(await attempt(task, op, stream, append))
        else:
            command: incident.Command
            if op == "deposit":
                command = bank.DepositMoney(aggregate_id=own, amount=rng.randint(1, 9))
            elif op == "withdraw":  # Rejected when the account has too little
                command = bank.WithdrawMoney(aggregate_id=own, amount=rng.randint(1, 12))
            elif op == "shared":  # raced by every task: the handler retries conflicts
                command = bank.DepositMoney(aggregate_id=rng.choice(SHARED), amount=1)
            else:  # its process runs inline: follow-ups on two accounts
                command = bank.RequestTransfer(
                    aggregate_id=f"T{task}-{step}",
                    source_account_number=own,
                    destination_account_number=rng.choice(SHARED),
                    amount=rng.randint(1, 5),
                )
            tries.append(
                await attempt(task, op, command.aggregate_id, lambda c=command: handler.dispatch(c))
            )
        log.extend(tries)
        if tries[-1].outcome in ("store_error", "commit_unknown"):
            backoff = min(max(backoff * 2, 0.02), 0.25)
            await asyncio.sleep(backoff * rng.uniform(0.5, 1.0))
        else:
            backoff = 0.0
            await asyncio.sleep(0)  # the other tasks' turn: their commits share a batch


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_a_crash_during_async_dispatch_loses_nothing_acknowledged(cluster: Any) -> None:
    url = cluster.url(schema="async_crash")
    reader_store = incident.open_event_store(url, timeout=POOL_TIMEOUT)
    event_types(reader_store)
    reader = Reader(reader_store)
    logs: list[list[Attempt]] = [[] for _ in range(TASKS)]
    probes: list[Attempt] = []

    def acks(since: float = 0.0) -> list[int]:
        return [sum(1 for d in log if acknowledged(d) and d.started > since) for log in logs]

    async def main() -> tuple[float, float]:
        store = incident.open_async_event_store(url, timeout=POOL_TIMEOUT)
        async with store, bank.build_async(store) as handler:
            for name in (*SHARED, "PROBE", *(f"W{t}" for t in range(TASKS))):
                await handler.dispatch(bank.OpenAccount(aggregate_id=name))
            for t in range(TASKS):
                await handler.dispatch(bank.DepositMoney(aggregate_id=f"W{t}", amount=50))
            stop = asyncio.Event()
            writers = [asyncio.create_task(write(handler, t, stop, logs[t])) for t in range(TASKS)]
            reader.thread.start()
            try:

                async def enough() -> bool:
                    return sum(acks()) >= BEFORE_CRASH

                await wait_until(enough, 60, "acknowledged requests")
                crashed_at = time.monotonic()
                await asyncio.to_thread(cluster.crash)  # the tasks go on, and meet it
                await asyncio.sleep(OUTAGE)
                await asyncio.to_thread(cluster.start)
                restarted_at = time.monotonic()

                async def probe() -> bool:  # the same handler works again
                    deposit = bank.DepositMoney(aggregate_id="PROBE", amount=1)
                    probes.append(
                        await attempt(-1, "probe", "PROBE", lambda: handler.dispatch(deposit))
                    )
                    if not acknowledged(probes[-1]):
                        await asyncio.sleep(0.1)
                    return acknowledged(probes[-1])

                first_success = await wait_until(probe, RECOVERY, "a dispatch after the restart")

                async def every_task() -> bool:  # for every task sharing it
                    return min(acks(restarted_at)) >= AFTER_RESTART

                await wait_until(every_task, RECOVERY, "requests per task after the restart")
            finally:
                stop.set()
                results = await asyncio.gather(*writers, return_exceptions=True)
            assert not [r for r in results if isinstance(r, BaseException)], results
            target = max(p for log in logs for d in log for p in d.positions)

            async def reader_caught_up() -> bool:
                return reader.last() >= target

            await wait_until(reader_caught_up, RECOVERY, "the reader after the restart")
            return crashed_at, first_success

    try:
        crashed_at, first_success = run_bounded(main(), 150)
    finally:
        reader.stop.set()
        if reader.thread.is_alive():
            reader.thread.join(30)
        reader_store.close()
    assert not reader.thread.is_alive()

    done = [d for log in logs for d in log] + probes
    untyped = [d for d in done if d.outcome == "untyped"] + reader.untyped
    assert not untyped, f"errors a caller is not told to expect: {untyped[:5]}"
    outcomes = Counter(d.outcome for d in done)
    hit = [d for d in done if d.outcome in ("store_error", "commit_unknown", "follow_up_failed")]
    assert hit, f"no request met the outage: {outcomes}"
    assert outcomes["ok"] > BEFORE_CRASH
    with closing(incident.open_event_store(url)) as store:
        event_types(store)
        log = list(store.read_all())
        check_log(log, done, reader.seen)
        check_read_models(store.projections(), log)
    print(
        f"\n{len(log)} events, {outcomes}; reader errors {len(reader.errors)}; first dispatch"
        f" {first_success:.2f} s after the restart; outage seen from"
        f" {min(d.started for d in hit) - crashed_at:+.2f} s to"
        f" {max(d.ended for d in hit) - crashed_at:+.2f} s of the crash"
    )
