"""The handler the multi-process tests run in subscriber processes, started as

    incident subscribe URL --handler audit_handler:audit --aggregate ... --batch-size N

with this folder on PYTHONPATH. INCIDENT_TEST_LISTENER_DELAY (seconds per event) slows the
listener down, so that a test killing the process at a random moment is likely to catch
it in the middle of a batch.
"""

from __future__ import annotations

import os
import time
from typing import Any

import incident
from incident.examples import bank
from incident.examples.bank.projections import account_row

DELAY = float(os.environ.get("INCIDENT_TEST_LISTENER_DELAY", "0"))


class Handled(incident.Projection):
    """One row per event: which position, and which process handled it."""

    aggregate_id: str  # the position, as text
    pid: int


audit = incident.EventHandler("audit")


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
