"""Async live tails (incident/stores/async_live.py): ``async for r in store.subscribe()``
yields the log after a position, then each event as it commits, in order, on every
store; waiting tasks share one watcher thread per store instead of holding workers."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest

import incident
from incident.examples import bank

WAIT = 60.0  # seconds before a tail counts as stuck
NEVER = 3600.0  # a poll interval no test lives to see: only a wake-up can deliver


def deposit(amount: int) -> list[bank.MoneyDeposited]:
    return [bank.MoneyDeposited(amount=amount)]


async def take(store: incident.AsyncEventStore, count: int, **options: Any) -> list[Any]:
    seen: list[incident.Recorded[Any]] = []
    async for recorded in store.subscribe(**options):
        seen.append(recorded)
        if len(seen) == count:
            break
    return seen


def test_an_async_tail_yields_the_log_after_the_position_then_each_new_event(
    store_url: str,
) -> None:
    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            for n in range(5):
                await store.append("A", deposit(n), expected_version=n)
            tail = asyncio.create_task(take(store, 6, after=2, batch_size=2, poll_interval=NEVER))
            for n in range(5, 8):
                await asyncio.sleep(0)  # let the tail reach its wait now and then
                await store.append("A", deposit(n), expected_version=n)
            seen = await asyncio.wait_for(tail, WAIT)
            assert [r.position for r in seen] == [3, 4, 5, 6, 7, 8]
            assert seen == [r async for r in store.read_all(after=2)]

    asyncio.run(main())


def test_many_waiting_tails_share_one_thread_and_are_all_woken(store_url: str) -> None:
    """20 tails wait with no poll to save them: one watcher thread waits for the store
    on behalf of all of them, and one append wakes every one."""

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            await store.initialize()
            tails = [asyncio.create_task(take(store, 1, poll_interval=NEVER)) for _ in range(20)]
            for _ in range(100):  # until every tail waits
                await asyncio.sleep(0.01)
            watchers = [t for t in threading.enumerate() if t.name == "incident-append-watch"]
            assert len(watchers) == 1
            await store.append("A", deposit(1), expected_version=0)
            seen = await asyncio.wait_for(asyncio.gather(*tails), WAIT)
            assert [[r.position for r in s] for s in seen] == [[1]] * 20

    asyncio.run(main())


APPEND_ELSEWHERE = """
import sys, incident
from contextlib import closing
from incident.examples import bank
with closing(incident.open_event_store(sys.argv[1])) as store:
    for n in range(3):
        store.append("B", [bank.MoneyDeposited(amount=n)], expected_version=n)
"""


def test_appends_of_another_process_reach_an_async_tail(initialized_url: str) -> None:
    async def main() -> None:
        async with incident.open_async_event_store(initialized_url) as store:
            tail = asyncio.create_task(take(store, 3, poll_interval=0.05))
            writer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", APPEND_ELSEWHERE, initialized_url
            )
            assert await asyncio.wait_for(writer.wait(), WAIT) == 0
            seen = await asyncio.wait_for(tail, WAIT)
            assert [(r.aggregate_id, r.version) for r in seen] == [("B", 1), ("B", 2), ("B", 3)]

    asyncio.run(main())


def test_an_async_tail_under_concurrent_writers_sees_every_event_once_in_order(
    store_url: str,
) -> None:
    writers, each = 8, 20

    async def main() -> None:
        async with incident.open_async_event_store(store_url) as store:
            await store.initialize()
            tail = asyncio.create_task(take(store, writers * each, batch_size=7))

            async def write(n: int) -> None:
                for version in range(each):
                    await store.append(f"w{n}", deposit(version), expected_version=version)

            await asyncio.gather(*(write(n) for n in range(writers)))
            seen = await asyncio.wait_for(tail, WAIT)
            assert [r.position for r in seen] == list(range(1, writers * each + 1))
            assert seen == [r async for r in store.read_all()]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"after": -1}, "after must be a position"),
        ({"after": 1.5}, "after must be a position"),
        ({"poll_interval": -1}, "poll_interval must be > 0"),
        ({"poll_interval": "1"}, "poll_interval must be > 0"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ],
)
def test_bad_arguments_are_refused_when_subscribing(arguments: dict[str, Any], says: str) -> None:
    async def main() -> None:
        async with incident.open_async_event_store("memory://") as store:
            with pytest.raises(ValueError, match=says):
                store.subscribe(**arguments)

    asyncio.run(main())


def test_a_sync_tail_and_an_async_tail_see_the_same_log(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'both.db'}"

    async def main() -> None:
        async with incident.open_async_event_store(url) as store:
            for n in range(4):
                await store.append("A", deposit(n), expected_version=n)
            mine = await take(store, 4)
        other = incident.open_event_store(url)
        try:
            live = other.subscribe()
            theirs = [next(live) for _ in range(4)]
            live.close()
        finally:
            other.close()
        assert mine == theirs

    asyncio.run(main())
