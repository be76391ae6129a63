"""Run by test_lock_forks.py: takes handler ``h``'s lock, forks a child that outlives
it, and dies holding the lock. Prints what the child and the parent saw, as JSON."""

from __future__ import annotations

import json
import os
import sys
import time

import incident
from incident.stores import checkpoint_store_for


def main() -> None:
    store = incident.open_event_store(sys.argv[1])
    checkpoints = checkpoint_store_for(store)
    lock = checkpoints.lock("h")
    assert lock.acquire(timeout=10)
    readable, writable = os.pipe()
    child = os.fork()
    if child == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)  # the test waits for its parent's output to end, not for this
        os.dup2(quiet, 2)
        held = lock.held()  # the parent's lock, not this process's
        lock.release()  # must leave the parent's lock alone
        os.write(writable, b"1" if held else b"0")
        time.sleep(60)  # outlives its parent; the test kills it
        os._exit(0)
    child_saw_held = os.read(readable, 1) == b"1"
    another = checkpoints.lock("h")
    another_took_it = another.acquire(timeout=0)
    another.release()
    report = {"child": child, "child_saw_held": child_saw_held, "another_took_it": another_took_it}
    print(json.dumps(report), flush=True)
    os._exit(0)  # dies holding the lock, its child still running


if __name__ == "__main__":
    main()
