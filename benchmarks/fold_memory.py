"""Folding one stream of 1,000,000 events on SQLite stays under 100 MB.

    python benchmarks/fold_memory.py [--events N] [--db PATH]

Writes one Bank account of N events (once: an existing file is reused), then folds it in
a fresh process, twice: once to time it and read the peak resident set (RSS) the
process reached, once under tracemalloc for the peak of Python allocations. The fold
goes through ``CommandHandler.state``, the path every command takes on a cold cache:
``EventStore.events`` streams the payloads from one query in batches, so memory holds a
batch, not the stream.

Run by hand; never part of the test suite.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import common

from incident.examples import bank

LIMIT_MB = 100
ACCOUNT = "ACC-1M"


def seed(path: Path, events: int) -> None:
    handler = bank.build(f"sqlite:///{path}")
    store = handler.event_store
    if store.version(ACCOUNT) == events:
        print(f"reusing {path} ({events:,} events)", file=sys.stderr)
        return
    if store.version(ACCOUNT):
        raise SystemExit(f"{path} holds another {ACCOUNT}; pass a fresh --db")
    started = time.perf_counter()
    handler.dispatch(bank.OpenAccount(aggregate_id=ACCOUNT))
    version = 1
    while version < events:
        batch = min(10_000, events - version)
        store.append(
            ACCOUNT,
            [bank.MoneyDeposited(amount=1)] * batch,
            expected_version=version,
            aggregate=bank.bank_account.name,
        )
        version += batch
    store.close()
    took = time.perf_counter() - started
    print(f"wrote {events:,} events to {path} in {took:.1f} s", file=sys.stderr)


def fold(path: Path, events: int, *, trace: bool) -> None:
    """In a fresh process: fold the stream, print one line of measurements."""
    handler = bank.build(f"sqlite:///{path}")
    handler.state(bank.bank_account, "warm-up")  # open the connection and the schema
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    state = handler.state(bank.bank_account, ACCOUNT)
    took = time.perf_counter() - started
    assert state.balance == events - 1, state
    if trace:
        _, peak = tracemalloc.get_traced_memory()
        print(f"tracemalloc peak {peak / 2**20:.1f} MB")
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"folded {events:,} events in {took:.2f} s ({events / took:,.0f} events/s); "
            f"peak RSS {rss:.1f} MB (the process before the fold: {baseline:.1f} MB)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", help="the SQLite file (default: one in the temp folder)")
    parser.add_argument("--fold", choices=["rss", "trace"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    path = Path(args.db or Path(tempfile.gettempdir()) / f"incident-fold-{args.events}.db")
    if args.fold:
        fold(path, args.events, trace=args.fold == "trace")
        return 0

    seed(path, args.events)
    lines = []
    for mode in ("rss", "trace"):
        command = [sys.executable, __file__, "--events", str(args.events), "--db", str(path)]
        done = subprocess.run([*command, "--fold", mode], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        lines.append(done.stdout.strip())
    print("\n".join(lines))
    peak_rss = float(lines[0].split("peak RSS ")[1].split(" MB")[0])
    peak_traced = float(lines[1].split("peak ")[1].split(" MB")[0])
    verdict = "met" if max(peak_rss, peak_traced) < LIMIT_MB else "MISSED"
    print(f"goal: under {LIMIT_MB} MB for {args.events:,} events: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
