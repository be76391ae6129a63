"""Run by test_lock_forks.py: starts an append-like transaction holding an advisory
lock on a pooled session (sync, or async with ``async``), forks a child that outlives
it, and dies in the middle of the transaction. Prints the child's pid."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import incident


def fork_and_die() -> None:
    child = os.fork()
    if child == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)  # the test waits for its parent's output to end, not for this
        os.dup2(quiet, 2)
        time.sleep(60)  # outlives its parent; the test kills it
        os._exit(0)
    print(child, flush=True)
    os._exit(0)  # dies inside the transaction, its child still running


def main(url: str, key: int, mode: str) -> None:
    if mode == "sync":
        store: Any = incident.open_event_store(url)
        with store.database.connection("holding") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [key])
            fork_and_die()
    else:

        async def hold() -> None:
            store = incident.open_async_event_store(url)
            async with store.connection("holding") as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", [key])
                fork_and_die()

        asyncio.run(hold())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
