"""The handler test_replay_crash.py replays, and a replay process it kills.

``balances`` keeps an unversioned row per account (``Balance``: only the order it is
written in keeps it right) that names the event it was made from. Run as ``python
replay_balances.py URL STEP``, this module replays ``balances`` over URL and, at STEP,
prints ``at STEP`` and blocks reading stdin until it is killed:

- ``rebuilding``: the first batch of the log has been read;
- ``swapped``: inside the reset's transaction, the tables swapped, the dead letters and
  the checkpoint not yet written (a store of the same database as the read models);
- ``committed``: the reset has committed, the replay not yet returned.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import incident
from incident.examples import bank
from incident.examples.bank import AccountState

__all__ = ["FAILING", "HOOKS", "Balance", "app_for", "balances"]


class Balance(incident.Projection):
    """An account's balance, made from the event at ``position`` (not a version field:
    the stores keep whichever row comes last)."""

    aggregate_id: str
    balance: int
    position: int


balances = incident.EventHandler("balances")
FAILING: set[int] = set()  # positions whose event the listener fails on
HOOKS: list[Callable[[int], None]] = []  # called with each position before it is handled


@balances.listen(bank.AccountOpened, bank.MoneyDeposited)
def balance(recorded: incident.Recorded[Any], state: AccountState) -> Balance:
    for hook in HOOKS:
        hook(recorded.position)
    if recorded.position in FAILING:
        raise RuntimeError("a bug")
    return Balance(
        aggregate_id=recorded.aggregate_id, balance=state.balance, position=recorded.position
    )


def app_for(url: str) -> incident.CommandHandler:
    return incident.CommandHandler(url, aggregates=[bank.bank_account, bank.transfer])


def _block(step: str) -> None:
    print(f"at {step}", flush=True)
    sys.stdin.read()  # until killed: the test never writes or closes it first
    raise SystemExit(f"stdin closed at {step}")


def _after(owner: Any, name: str, step: str) -> None:
    """Block (at ``step``) right after ``owner.name`` returns."""
    real = getattr(owner, name)

    def blocking(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        _block(step)
        return result

    setattr(owner, name, blocking)


def main(url: str, step: str) -> None:
    import incident.stores.postgres.projections as postgres_projections
    import incident.stores.sqlite.checkpoints as sqlite_checkpoints

    if step == "swapped":
        _after(sqlite_checkpoints, "swap_tables", step)  # as the SQLite reset calls it
        _after(postgres_projections.PostgresProjectionStore, "swap", step)
    subscription = incident.Subscription(balances, app_for(url), batch_size=2)
    if step == "committed":
        _after(type(subscription.checkpoints), "reset", step)
    subscription.replay(lambda read: _block(step) if step == "rebuilding" else None)
    print("replayed", flush=True)


if __name__ == "__main__":
    # under its own name, so that Balance is the class the test's process stores
    import replay_balances

    replay_balances.main(sys.argv[1], sys.argv[2])
