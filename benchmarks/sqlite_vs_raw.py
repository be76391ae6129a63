"""incident on SQLite against raw sqlite3 + msgspec, at the same durability, in one run.

    python benchmarks/sqlite_vs_raw.py [--events 10000] [--commands 2000]
                                       [--synchronous FULL NORMAL] [--dir PATH]

Two measurements, each against a ceiling doing the least the same work needs:

load      rebuild the state of one aggregate of N events. incident: CommandHandler.state()
          (read the stream, decode the envelopes, fold). Ceiling: one SELECT of the payloads,
          msgspec-decode each into its event class, and the same fold.
load*     the same, against a ceiling that reads what incident reads (the whole envelope:
          ids, dates, metadata) into plain tuples: the cost of the envelope objects alone.
dispatch  M DepositMoney commands over 200 accounts. incident: dispatch() (load the stream,
          decide, append the event and write the BankAccount projection in one
          transaction). Ceiling: one INSERT of the encoded event per commit.

Both sides use WAL and the same ``synchronous`` setting; the files live in --dir (a
temporary directory on the same disk as this script by default). Aims from issue 3:
load >= 60% of its ceiling, dispatch >= 80%. Run by hand; nothing here is a test.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

import incident
from incident.examples import bank
from incident.examples.bank import AccountState, DepositMoney, MoneyDeposited, OpenAccount

ACCOUNTS = 200


def best_of(runs: int, work: Callable[[], Any]) -> float:
    """The fastest of a few runs, in seconds (the least disturbed by the machine)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


# -- the ceiling: raw sqlite3 + msgspec --------------------------------------------------


def raw_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS events (position INTEGER PRIMARY KEY, stream TEXT, "
        "version INTEGER, type TEXT, data TEXT, UNIQUE (stream, version))"
    )
    return conn


def raw_load(path: Path, events: int, synchronous: str) -> float:
    conn = raw_connection(path, synchronous)
    encode = msgspec.json.encode
    rows = [("ACC1", 1, "AccountOpened", encode(bank.AccountOpened(account_number="ACC1")))]
    rows += [
        ("ACC1", v, "MoneyDeposited", encode(MoneyDeposited(amount=1)))
        for v in range(2, events + 1)
    ]
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO events (stream, version, type, data) VALUES (?, ?, ?, ?)",
        [(s, v, t, d.decode()) for s, v, t, d in rows],
    )
    conn.execute("COMMIT")
    decoders = {
        name: msgspec.json.Decoder(cls)
        for name, cls in (("AccountOpened", bank.AccountOpened), ("MoneyDeposited", MoneyDeposited))
    }

    def load() -> AccountState:
        cursor = conn.execute(
            "SELECT type, data FROM events WHERE stream = ? ORDER BY version", ("ACC1",)
        )
        state: AccountState = bank.bank_account.fold(
            decoders[kind].decode(data) for kind, data in cursor
        )
        assert state.balance == events - 1
        return state

    seconds = best_of(20, load)
    conn.close()
    return seconds


def raw_load_envelopes(path: Path, events: int, synchronous: str) -> float:
    """The same rows incident reads (ids, dates, metadata too), decoded into plain tuples:
    what is left when only the envelope objects and the store's checks are taken away."""
    incident_load(path, events, synchronous)  # writes the file, as incident lays it out
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    decoders = {
        name: msgspec.json.Decoder(cls)
        for name, cls in (("AccountOpened", bank.AccountOpened), ("MoneyDeposited", MoneyDeposited))
    }
    metadata = msgspec.json.Decoder(dict[str, Any])
    parse = datetime.datetime.fromisoformat

    def load() -> AccountState:
        rows = conn.execute(
            "SELECT position, version, event_type, data, event_id, event_date, metadata, "
            "aggregate FROM events WHERE aggregate_id = ? AND version > 0 ORDER BY version",
            ("ACC1",),
        )
        envelopes = [
            (p, v, t, decoders[t].decode(d), i, parse(w), metadata.decode(m), a)
            for p, v, t, d, i, w, m, a in rows
        ]
        state: AccountState = bank.bank_account.fold(e[3] for e in envelopes)
        assert state.balance == events - 1
        return state

    seconds = best_of(20, load)
    conn.close()
    return seconds


def raw_dispatch(path: Path, commands: int, synchronous: str) -> float:
    conn = raw_connection(path, synchronous)
    encode = msgspec.json.encode
    versions = dict.fromkeys((f"A{i}" for i in range(ACCOUNTS)), 0)
    start = time.perf_counter()
    for i in range(commands):
        stream = f"A{i % ACCOUNTS}"
        versions[stream] += 1
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO events (stream, version, type, data) VALUES (?, ?, ?, ?)",
            (stream, versions[stream], "MoneyDeposited", encode(MoneyDeposited(amount=1)).decode()),
        )
        conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


# -- incident ---------------------------------------------------------------------------


def incident_load(path: Path, events: int, synchronous: str) -> float:
    url = f"sqlite:///{path}"
    store = incident.open_event_store(url, synchronous=synchronous)
    store.append(
        "ACC1",
        [bank.AccountOpened(account_number="ACC1")],
        expected_version=0,
        aggregate="bank_account",
    )
    store.append(
        "ACC1",
        [MoneyDeposited(amount=1) for _ in range(events - 1)],
        expected_version=1,
        aggregate="bank_account",
    )
    handler = bank.build(store)

    def load() -> AccountState:
        state: AccountState = handler.state("bank_account", "ACC1")
        assert state.balance == events - 1
        return state

    seconds = best_of(20, load)
    store.close()
    return seconds


def incident_dispatch(path: Path, commands: int, synchronous: str) -> float:
    url = f"sqlite:///{path}"
    setup = bank.build(incident.open_event_store(url, synchronous="OFF"))
    for i in range(ACCOUNTS):
        setup.dispatch(OpenAccount(aggregate_id=f"A{i}"))
    setup.event_store.close()
    handler = bank.build(incident.open_event_store(url, synchronous=synchronous))
    start = time.perf_counter()
    for i in range(commands):
        handler.dispatch(DepositMoney(aggregate_id=f"A{i % ACCOUNTS}", amount=1))
    seconds = time.perf_counter() - start
    row = handler.projection_store.get(bank.BankAccount, "A0")
    assert row is not None and row.balance == commands // ACCOUNTS
    handler.event_store.close()
    return seconds


# -- the report ---------------------------------------------------------------------------


def compare(
    name: str,
    count: int,
    ours: Callable[[Path], float],
    ceiling: Callable[[Path], float],
    where: Path,
) -> float:
    trials = []
    for trial in range(3):  # alternate the two sides so drift in the machine hits both
        ceiling_s = ceiling(where / f"{name}-raw-{trial}.db")
        ours_s = ours(where / f"{name}-incident-{trial}.db")
        trials.append((ceiling_s, ours_s))
    ceiling_s = min(c for c, _ in trials)
    ours_s = min(o for _, o in trials)
    ratio = ceiling_s / ours_s
    print(
        f"  {name:<9} incident {count / ours_s:>10,.0f} /s   raw {count / ceiling_s:>10,.0f} /s"
        f"   ratio {ratio:6.1%}   (ratios per trial: "
        f"{', '.join(f'{c / o:.0%}' for c, o in trials)}; median "
        f"{statistics.median(c / o for c, o in trials):.0%})"
    )
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--commands", type=int, default=2_000)
    parser.add_argument("--synchronous", nargs="+", default=["FULL", "NORMAL"])
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    base = args.dir or Path(__file__).resolve().parent
    work = Path(tempfile.mkdtemp(prefix="incident-bench-", dir=base))
    print(f"SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}, files in {work}")
    try:
        for synchronous in args.synchronous:
            print(f"synchronous={synchronous} (WAL)")
            (work / synchronous).mkdir()
            compare(
                "load",
                args.events,
                lambda p, s=synchronous: incident_load(p, args.events, s),
                lambda p, s=synchronous: raw_load(p, args.events, s),
                work / synchronous,
            )
            compare(
                "load*",
                args.events,
                lambda p, s=synchronous: incident_load(p, args.events, s),
                lambda p, s=synchronous: raw_load_envelopes(p, args.events, s),
                work / synchronous,
            )
            compare(
                "dispatch",
                args.commands,
                lambda p, s=synchronous: incident_dispatch(p, args.commands, s),
                lambda p, s=synchronous: raw_dispatch(p, args.commands, s),
                work / synchronous,
            )
    finally:
        shutil.rmtree(work)
    print("aims: load >= 60%, dispatch >= 80% of the raw ceiling")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
