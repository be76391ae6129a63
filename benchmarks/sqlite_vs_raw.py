"""incident on SQLite against raw sqlite3 + msgspec, at the same durability, in one run.

    python benchmarks/sqlite_vs_raw.py [--events 10000] [--commands 2000]
                                       [--synchronous FULL NORMAL] [--dir PATH]

Each measurement pits incident against a ceiling doing the least the same work needs:

load       rebuild the state of one aggregate of N events. incident:
           CommandHandler.state() from a cold cache (read the payloads, decode, fold).
           Ceiling: one SELECT of the payloads, msgspec-decode each, the same fold.
load/env   the same, against a ceiling that also reads the envelope (ids, dates,
           metadata) into plain tuples: what the envelope objects and checks cost.
load/evts  incident's payload-only read, SQLiteEventStore.events() + the same fold,
           against the payload ceiling: what a fold costs when it skips envelopes.
dispatch   M DepositMoney commands over 200 accounts. incident: dispatch() (decide on
           the cached state, append the event and its BankAccount projection in one
           transaction). Ceiling: one INSERT of the encoded event per commit.

The two sides run interleaved, in small rounds on files of their own, so that whatever
else the machine is doing hits both alike; the ratio is the median of the rounds'
ratios (events/s are from the fastest round of each side). Both sides use WAL and the
same ``synchronous``; the files live in --dir (by default a temporary directory beside
this script, so on the disk the project is on). Aims from issue 3: load >= 60% of its
ceiling, dispatch >= 80%. Run by hand; nothing here is a test.
"""

from __future__ import annotations

import datetime
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import msgspec

import incident
from incident.examples import bank
from incident.examples.bank import AccountState, DepositMoney, MoneyDeposited, OpenAccount
from incident.stores.sqlite import SQLiteEventStore

ACCOUNTS = 200
ROUNDS = 20
DECODERS = {
    "AccountOpened": msgspec.json.Decoder(bank.AccountOpened),
    "MoneyDeposited": msgspec.json.Decoder(MoneyDeposited),
}

Work = Callable[[], Any]


def timed(work: Work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def compare(name: str, count: int, ours: Work, ceiling: Work, rounds: int) -> None:
    """Run both sides alternately ``rounds`` times; ``count`` items are done per round."""
    pairs = [(timed(ceiling), timed(ours)) for _ in range(rounds)]
    ratio = statistics.median(c / o for c, o in pairs)
    low, high = (f"{q:.0%}" for q in statistics.quantiles([c / o for c, o in pairs], n=4)[::2])
    best_ours, best_ceiling = min(o for _, o in pairs), min(c for c, _ in pairs)
    print(
        f"  {name:<9} incident {count / best_ours:>9,.0f}/s   raw {count / best_ceiling:>9,.0f}/s"
        f"   ratio {ratio:6.1%}  (quartiles {low} - {high})"
    )


# -- load ----------------------------------------------------------------------------------


def incident_events(path: Path, events: int, synchronous: str) -> incident.EventStore:
    """An aggregate of N events appended one at a time, as N commands would have, each
    with its own date and metadata."""
    url = f"sqlite:///{path}"
    setup = incident.open_event_store(url, synchronous="OFF")
    setup.append("ACC1", [bank.AccountOpened(account_number="ACC1")], expected_version=0)
    for version in range(1, events):
        setup.append(
            "ACC1",
            [MoneyDeposited(amount=1)],
            expected_version=version,
            aggregate="bank_account",
            metadata={"correlation_id": str(uuid.uuid4()), "causation_id": None},
        )
    setup.close()
    return incident.open_event_store(url, synchronous=synchronous)


def load_pair(work: Path, events: int, synchronous: str) -> tuple[Work, Work, Work, Work]:
    """Loads of one N-event aggregate: incident through state() and through
    SQLiteEventStore.events(), the payload ceiling and the envelope ceiling."""
    store = incident_events(work / "load-incident.db", events, synchronous)
    handler = bank.build(store)

    def ours() -> None:
        handler.cache.clear()  # a cold load: the whole stream, not what the cache lacks
        assert handler.state("bank_account", "ACC1").balance == events - 1

    raw = sqlite3.connect(work / "load-raw.db", isolation_level=None)
    raw.execute(f"PRAGMA synchronous = {synchronous}")
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute(
        "CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT, version INTEGER, "
        "type TEXT, data TEXT, UNIQUE (stream, version))"
    )
    raw.executemany(
        "INSERT INTO events (stream, version, type, data) VALUES ('ACC1', ?, ?, ?)",
        [
            (r.version, r.event_type, msgspec.json.encode(r.data).decode())
            for r in store.get("ACC1")
        ],
    )

    def ceiling() -> None:
        rows = raw.execute(
            "SELECT type, data FROM events WHERE stream = ? ORDER BY version", ("ACC1",)
        )
        state: AccountState = bank.bank_account.fold(DECODERS[t].decode(d) for t, d in rows)
        assert state.balance == events - 1

    same = sqlite3.connect(work / "load-incident.db", isolation_level=None)
    metadata = msgspec.json.Decoder(dict[str, Any])
    parse = datetime.datetime.fromisoformat

    def envelope_ceiling() -> None:
        rows = same.execute(
            "SELECT position, version, event_type, data, event_id, event_date, metadata, "
            "aggregate FROM events WHERE aggregate_id = ? AND version > 0 ORDER BY version",
            ("ACC1",),
        )
        envelopes = [
            (p, v, t, DECODERS[t].decode(d), i, parse(w), metadata.decode(m), a)
            for p, v, t, d, i, w, m, a in rows
        ]
        state: AccountState = bank.bank_account.fold(e[3] for e in envelopes)
        assert state.balance == events - 1

    def payloads() -> None:
        assert isinstance(store, SQLiteEventStore)
        assert bank.bank_account.fold(store.events("ACC1")).balance == events - 1

    return ours, payloads, ceiling, envelope_ceiling


# -- dispatch --------------------------------------------------------------------------------


def dispatch_pair(work: Path, per_round: int, synchronous: str) -> tuple[Work, Work]:
    url = f"sqlite:///{work / 'dispatch-incident.db'}"
    setup = bank.build(incident.open_event_store(url, synchronous="OFF"))
    for i in range(ACCOUNTS):
        setup.dispatch(OpenAccount(aggregate_id=f"A{i}"))
    setup.event_store.close()
    handler = bank.build(incident.open_event_store(url, synchronous=synchronous))
    sent = 0

    def ours() -> None:
        nonlocal sent
        for _ in range(per_round):
            handler.dispatch(DepositMoney(aggregate_id=f"A{sent % ACCOUNTS}", amount=1))
            sent += 1

    raw = sqlite3.connect(work / "dispatch-raw.db", isolation_level=None)
    raw.execute("PRAGMA journal_mode = WAL")
    raw.execute(f"PRAGMA synchronous = {synchronous}")
    raw.execute(
        "CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT, version INTEGER, "
        "type TEXT, data TEXT, UNIQUE (stream, version))"
    )
    versions = dict.fromkeys((f"A{i}" for i in range(ACCOUNTS)), 0)
    inserted = 0

    def ceiling() -> None:
        nonlocal inserted
        for _ in range(per_round):
            stream = f"A{inserted % ACCOUNTS}"
            versions[stream] += 1
            inserted += 1
            raw.execute("BEGIN IMMEDIATE")
            raw.execute(
                "INSERT INTO events (stream, version, type, data) VALUES (?, ?, ?, ?)",
                (
                    stream,
                    versions[stream],
                    "MoneyDeposited",
                    msgspec.json.encode(MoneyDeposited(amount=1)).decode(),
                ),
            )
            raw.execute("COMMIT")

    return ours, ceiling


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--commands", type=int, default=2_000)
    parser.add_argument("--synchronous", nargs="+", default=["FULL", "NORMAL"])
    common.add_dir(parser, "where the scratch folder of SQLite files goes (default: here)")
    args = parser.parse_args(argv)
    base = args.dir or Path(__file__).resolve().parent
    root = Path(tempfile.mkdtemp(prefix="incident-bench-", dir=base))
    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, files in {root}")
    try:
        for synchronous in args.synchronous:
            print(f"synchronous={synchronous} (WAL)")
            work = root / synchronous
            work.mkdir()
            ours, payloads, ceiling, envelopes = load_pair(work, args.events, synchronous)
            compare("load", args.events, ours, ceiling, ROUNDS)
            compare("load/env", args.events, ours, envelopes, ROUNDS)
            compare("load/evts", args.events, payloads, ceiling, ROUNDS)
            per_round = max(1, args.commands // ROUNDS)
            ours, ceiling = dispatch_pair(work, per_round, synchronous)
            compare("dispatch", per_round, ours, ceiling, ROUNDS)
    finally:
        shutil.rmtree(root)
    print("aims: load >= 60%, dispatch >= 80% of the raw ceiling")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
