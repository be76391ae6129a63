"""Catch-up throughput: the Bank's projections rebuilt by a subscription over a long log.

    python benchmarks/catch_up.py [URL ...] [--events N] [--accounts A]

For each store URL (default: memory://, plus sqlite and Postgres when given), writes a log
of N events on A accounts (each opened, then deposited into), then times the Bank's
projections catching up from position 0 as a subscription. With few accounts a batch
folds many events into few rows (the common case); with many, nearly every event is a
row to write. The same-run baseline is a bare ``read_all`` over the log, so the ratio
shows what handling and checkpointing cost on top of reading.
"""

from __future__ import annotations

import time

import common

import incident
from incident.examples import bank


def fill(store: incident.EventStore, events: int, accounts: int = 1_000) -> None:
    per_account = max(events // accounts, 1)
    for n in range(accounts):
        batch: list[incident.Event] = [bank.AccountOpened(account_number=f"ACC{n}")]
        batch += [bank.MoneyDeposited(amount=1) for _ in range(per_account - 1)]
        store.append(f"ACC{n}", batch, expected_version=0, aggregate="bank_account")


def measure(url: str, events: int, accounts: int) -> None:
    app = bank.build(url, subscriptions=True)
    store = app.event_store
    store.initialize()
    fill(store, events, accounts)
    total = incident.subscriptions.last_position(store)

    started = time.perf_counter()
    read = sum(1 for _ in store.read_all())
    baseline = read / (time.perf_counter() - started)

    subscription = app.subscriptions["bank_projections"]
    started = time.perf_counter()
    handled = subscription.catch_up()
    elapsed = time.perf_counter() - started
    rate = handled / elapsed
    assert subscription.position == total
    rows = len(app.projection_store.all(bank.BankAccount))
    print(
        f"{url.split('://')[0]:>10}: {handled:,} events in {elapsed:.2f}s = {rate:,.0f} events/s "
        f"(read_all alone: {baseline:,.0f}/s, ratio {rate / baseline:.2f}; {rows:,} rows)"
    )
    store.close()


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("urls", nargs="*", default=["memory://"])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    options = parser.parse_args()
    for url in options.urls:
        measure(url, options.events, options.accounts)


if __name__ == "__main__":
    main()
