"""What any write path must keep, however many writers share it (issue 18's guarantee
tests): 8 threads sharing one CommandHandler, and 8 processes each with its own, send
the Bank deposits and withdrawals with conflicts mixed in (raw appends at a stale
expected version, keyed commands sent twice and by every writer at once, withdrawals
Rejected for lack of money, multi-event appends). Afterwards every acknowledged request's
events are in the log exactly once, at the positions and versions it was told, nothing
of a refused request is, positions are gapless and follow commit order, and every read
model equals its stream's fold and what the acknowledged commands imply. A tail reader
following the log meanwhile sees every event exactly once, in order, with no gap.

The work and the harness are in tests/writer_mix.py (spawned children import it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from typing import Any

import pytest
from writer_mix import (
    DOOMED,
    SHARED_ACCOUNTS,
    Done,
    TailReader,
    open_accounts,
    run_processes,
    run_threads,
    write_mix,
)

import incident
from incident.examples import bank
from incident.examples.bank import BankAccount

WRITERS = 8
THREAD_REQUESTS = 40  # per writer thread, besides the keyed deposits every writer sends
PROCESS_REQUESTS = 30  # per writer process
TAIL_REQUESTS = 40  # per writer, while the tail readers follow
TIMEOUT = 120  # seconds for all the writers to finish


@pytest.fixture
def handler(store_url: str) -> Iterator[incident.CommandHandler]:
    app = bank.build(store_url)
    yield app
    app.close()


def flat(reports: Sequence[Sequence[Done]]) -> list[Done]:
    return [done for report in reports for done in report]


# -- what the log must be, given what the writers were told ----------------------------


def check_log(
    store: incident.EventStore, projections: incident.ProjectionStore, done: list[Done]
) -> list[incident.Recorded[Any]]:
    """Every guarantee the writers' reports (``done``, the setup's included) let us check
    against the log; returns the log."""
    log = list(store.read_all())
    positions = [r.position for r in log]
    assert positions == list(range(1, len(log) + 1)), "positions are not gapless 1..n"
    by_id = {r.event_id: r for r in log}
    assert len(by_id) == len(log), "an event id is in the log twice"

    # requests that had to be refused were, and wrote nothing
    doomed = [r for r in log if "doomed" in r.metadata or getattr(r.data, "amount", 0) == DOOMED]
    assert not doomed, f"events of refused appends are in the log: {doomed[:3]}"
    accepted = [d for d in done if d.outcome == "accepted"]
    assert not accepted, f"stale appends that were not refused: {accepted[:3]}"
    for d in done:
        if d.outcome != "ok":
            assert d.event_ids == (), d
    unexpected = [d for d in done if d.expected is not None and d.outcome != d.expected]
    assert not unexpected, (
        f"requests on a writer's own streams that came out otherwise: {unexpected[:3]}"
    )

    # one command, whoever sent it and however often: the same events every time
    commands = acknowledged_commands(done)
    told: list[str] = [event_id for d, _ in commands for event_id in d.event_ids]
    assert len(told) == len(set(told)), "two acknowledged commands were told the same event"
    missing = [event_id for event_id in told if event_id not in by_id]
    assert not missing, f"{len(missing)} acknowledged events are not in the log"
    unacknowledged = [r for r in log if r.event_id not in set(told)]
    assert not unacknowledged, f"events no writer was told of: {unacknowledged[:3]}"

    # each as acknowledged: its position, version, stream and payload, in one piece
    for d, _ in commands:
        stored = [by_id[event_id] for event_id in d.event_ids]
        assert tuple(r.position for r in stored) == d.positions, d
        assert tuple(r.version for r in stored) == d.versions, d
        assert {r.aggregate_id for r in stored} == {d.stream}, d
        first = d.positions[0]
        assert d.positions == tuple(range(first, first + len(stored))), f"split append: {d}"
        assert d.versions == tuple(range(d.versions[0], d.versions[0] + len(stored))), d
        assert sum(getattr(r.data, "amount", 0) for r in stored) == abs(d.amount), d
        if d.key is not None:
            assert all(r.metadata.get("idempotency_key") == d.key for r in stored), d
    check_commit_order(commands)

    # streams: versions gapless, read per stream as in the log
    streams: dict[str, list[incident.Recorded[Any]]] = defaultdict(list)
    for r in log:
        streams[r.aggregate_id].append(r)
    for stream, events in streams.items():
        assert [r.version for r in events] == list(range(1, len(events) + 1)), stream
        assert [r.event_id for r in store.get(stream)] == [r.event_id for r in events], stream
        assert store.version(stream) == len(events), stream

    # balances: the fold of the stream, the read model and the acknowledged commands agree
    implied: dict[str, int] = defaultdict(int)
    for d, _ in commands:
        implied[d.stream] += d.amount
    accounts = {d.stream for d in done if d.op == "open"}
    assert set(SHARED_ACCOUNTS) <= accounts
    for account in sorted(accounts):
        folded = 0
        for r in streams[account]:
            folded += balance_change(r)
            assert folded >= 0, f"{account} went below zero at version {r.version}"
        row = projections.get(BankAccount, account)
        assert row is not None, account
        assert (row.balance, row.version) == (folded, len(streams[account])), account
        assert folded == implied[account], account
    return log


def balance_change(recorded: incident.Recorded[Any]) -> int:
    if isinstance(recorded.data, bank.MoneyDeposited):
        return int(recorded.data.amount)
    if isinstance(recorded.data, bank.MoneyWithdrawn):
        return -int(recorded.data.amount)
    assert isinstance(recorded.data, bank.AccountOpened), recorded
    return 0


def acknowledged_commands(done: list[Done]) -> list[tuple[Done, tuple[int, int]]]:
    """The acknowledged requests, one per command: requests under one key (twins of
    several writers, or sent again) are one command, each told the same events. With
    each, the time span its commit fell in: after the earliest start of its requests,
    before the earliest end (every one of them returned the committed events)."""
    by_key: dict[str, list[Done]] = defaultdict(list)
    commands: list[tuple[Done, tuple[int, int]]] = []
    for d in done:
        if d.outcome != "ok":
            continue
        if d.key is None:
            assert d.event_ids, f"an acknowledged request with no events: {d}"
            commands.append((d, (d.started, d.ended)))
        else:
            by_key[d.key].append(d)
    for key, twins in by_key.items():
        assert len({d.event_ids for d in twins}) == 1, f"{key} took effect more than once"
        assert len({(d.stream, d.amount) for d in twins}) == 1, twins
        span = (min(d.started for d in twins), min(d.ended for d in twins))
        commands.append((twins[0], span))
    # a key that was rejected once is rejected every time
    rejected_keys = {d.key for d in done if d.key is not None and d.outcome == "rejected"}
    assert not rejected_keys & set(by_key), "a key both stored events and was rejected"
    return commands


def check_commit_order(commands: list[tuple[Done, tuple[int, int]]]) -> None:
    """A command acknowledged before another was sent has the lower positions."""
    by_end = sorted(commands, key=lambda c: c[1][1])
    highest, earlier, i = 0, None, 0
    for d, (started, _) in sorted(commands, key=lambda c: c[1][0]):
        while i < len(by_end) and by_end[i][1][1] < started:
            if by_end[i][0].positions[-1] > highest:
                highest, earlier = by_end[i][0].positions[-1], by_end[i][0]
            i += 1
        assert d.positions[0] > highest, (
            f"committed after {earlier} was acknowledged, yet at a lower position: {d}"
        )


def check_tail(seen: list[tuple[int, str]], log: list[incident.Recorded[Any]]) -> None:
    """What a tail reader saw is the log: every event once, in order, no gap."""
    positions = [position for position, _ in seen]
    assert positions == list(range(1, len(positions) + 1)), "the reader skipped or repeated"
    assert seen == [(r.position, r.event_id) for r in log]


def tail_readers(
    store_url: str, writers_store: incident.EventStore, stack: ExitStack
) -> list[TailReader]:
    """A polling reader, and, where the store can wake it, one waiting in
    wait_for_append; each on a store of its own, except in memory (one process's log)."""

    def store() -> incident.EventStore:
        if store_url.startswith("memory:"):
            return writers_store
        return stack.enter_context(closing(incident.open_event_store(store_url)))

    readers = [TailReader(store(), wait=False)]
    waiting = store()
    if isinstance(waiting, incident.stores.AppendNotifier):
        readers.append(TailReader(waiting, wait=True))
    for reader in readers:
        stack.enter_context(reader)
    return readers


# -- 1. threads sharing one CommandHandler --------------------------------------------


def test_eight_threads_sharing_a_command_handler_lose_nothing_and_write_nothing_refused(
    handler: incident.CommandHandler,
) -> None:
    """Each thread sends about 40 requests of the mix through the one handler, every
    writer's keyed deposits racing each other's at a barrier."""
    setup = open_accounts(handler, WRITERS)
    reports = run_threads(
        lambda writer, stop, barrier: write_mix(handler, writer, THREAD_REQUESTS, stop, barrier),
        WRITERS,
        timeout=TIMEOUT,
    )
    done = flat(reports)
    check_log(handler.event_store, handler.projection_store, setup + done)
    assert {d.outcome for d in done} == {"ok", "rejected", "conflict"}  # the mix was mixed


# -- 2. processes, each with its own CommandHandler, on one database -------------------


@pytest.mark.slow
def test_eight_processes_lose_nothing_and_write_nothing_refused(initialized_url: str) -> None:
    """The same mix from 8 OS processes on one SQLite file or one Postgres schema, with
    two tail readers (polling; waiting where the store can wake them) following the log
    in this process meanwhile."""
    with bank.build(initialized_url) as app, ExitStack() as stack:
        setup = open_accounts(app, WRITERS)
        readers = tail_readers(initialized_url, app.event_store, stack)
        reports = run_processes(initialized_url, WRITERS, PROCESS_REQUESTS, timeout=TIMEOUT)
        seen = [reader.finish() for reader in readers]
        log = check_log(app.event_store, app.projection_store, setup + flat(reports))
        for tail in seen:
            check_tail(tail, log)


# -- 3. a tail reader under 8 writer threads ----------------------------------------


def test_a_tail_reader_under_eight_writer_threads_sees_every_event_once_in_order(
    store_url: str, handler: incident.CommandHandler
) -> None:
    """The mix from 8 threads while a polling reader, and on stores that wake readers
    (memory, Postgres) one blocked in wait_for_append, follow the log: each is handed
    exactly the final log, and it got it in more than one read."""
    setup = open_accounts(handler, WRITERS)
    with ExitStack() as stack:
        readers = tail_readers(store_url, handler.event_store, stack)
        reports = run_threads(
            lambda writer, stop, barrier: write_mix(handler, writer, TAIL_REQUESTS, stop, barrier),
            WRITERS,
            timeout=TIMEOUT,
        )
        seen = [reader.finish() for reader in readers]
    log = list(handler.event_store.read_all())
    assert len(log) > len(setup) + WRITERS * TAIL_REQUESTS // 2
    for reader, tail in zip(readers, seen, strict=True):
        assert reader.batches > 1, "the reader got everything in one read: it tailed nothing"
        check_tail(tail, log)
    assert len(flat(reports)) >= WRITERS * TAIL_REQUESTS
