"""A subscriber process for the multi-process tests: runs the ``audit`` handler over the
Bank's log at the URL given on the command line until it is killed.

    python tests/subscriber_process.py URL [BATCH_SIZE] [DELAY]

DELAY (seconds per event, default 0) slows the listener down, so that a test killing the
process at a random moment is likely to catch it in the middle of a batch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import incident
from incident.examples import bank
from incident.examples.bank.projections import account_row


class Handled(incident.Projection):
    """One row per event: which position, and which process handled it."""

    aggregate_id: str  # the position, as text
    pid: int


audit = incident.EventHandler("audit")
DELAY = 0.0


@audit.listen(bank.AccountOpened, bank.MoneyDeposited, bank.MoneyWithdrawn)
def audited(recorded: incident.Recorded[Any], state: bank.AccountState) -> list[Any]:
    # reading the pid makes this listener impure on purpose: the tests see who worked
    if DELAY:
        time.sleep(DELAY)
    return [
        account_row(recorded, state),
        Handled(aggregate_id=str(recorded.position), pid=os.getpid()),
    ]


def app(url: str) -> incident.CommandHandler:
    return incident.CommandHandler(url, aggregates=[bank.bank_account, bank.transfer])


def main(url: str, batch_size: int = 100, delay: float = 0.0) -> None:
    global DELAY
    DELAY = delay
    incident.Subscription(audit, app(url), batch_size=batch_size, idle=0.05).run()


if __name__ == "__main__":
    main(sys.argv[1], *(int(sys.argv[2]), float(sys.argv[3]))[: len(sys.argv) - 2])
