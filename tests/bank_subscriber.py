"""Bank subscriber processes for test_process_faults.py, started quickly and killed.

Run as ``python bank_subscriber.py URL``: it imports incident and its stores once, then
reads lines on stdin. ``start N C`` forks a subscriber: a process running the Bank's
``money_transfer`` and ``bank_projections`` as subscriptions (batch size N, concurrency
C), as ``incident subscribe`` would; ``kill`` SIGKILLs it and reaps it. Each line is answered
with ``ok``. A fork starts working in milliseconds where a new interpreter takes a
second or more (importing), so the kills land while the subscriber works, not while it
starts. End of input kills the subscriber and ends the launcher; a subscriber whose
launcher died stops by itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import incident
import incident.stores.postgres
import incident.stores.postgres_checkpoints
import incident.stores.sqlite
import incident.stores.sqlite_checkpoints
from incident.examples import bank


def subscribe(url: str, batch_size: int, concurrency: int, launcher: int) -> None:
    """In the forked child: run the subscriptions until killed (or orphaned)."""
    app = incident.CommandHandler(url, aggregates=[bank.bank_account, bank.transfer])
    handlers = (bank.money_transfer, bank.bank_projections)
    running = incident.Subscriptions(
        incident.Subscription(handler, app, batch_size=batch_size, concurrency=concurrency)
        for handler in handlers
    )
    running.start()
    while os.getppid() == launcher and all(s.error is None for s in running.values()):
        time.sleep(0.1)


def main(url: str) -> None:
    child = 0
    for line in sys.stdin:
        command, *args = line.split()
        if command == "start" and not child:
            child = os.fork()
            if child == 0:
                try:
                    subscribe(url, int(args[0]), int(args[1]), os.getppid())
                finally:
                    os._exit(1)
        elif command == "kill" and child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            child = 0
        print("ok", child, flush=True)
    if child:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


if __name__ == "__main__":
    main(sys.argv[1])
