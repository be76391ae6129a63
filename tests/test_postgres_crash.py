"""A Postgres crash during concurrent dispatch (issue 18): nothing acknowledged is lost,
nothing is half there, no reader saw what the crash took back, and the same objects work
once the server is back.

The test never stops the machine's shared server: it runs a private, throwaway cluster
of its own (tests/private_postgres.py) and crashes that one with ``pg_ctl stop -m
immediate`` (no shutdown checkpoint: the restart runs WAL crash recovery, as after a
crash), then starts it again on the same port.

Six threads share one Bank CommandHandler, dispatching deposits (under idempotency keys,
retried after a store error), withdrawals and transfers, and appending raw multi-event
batches (three events to a stream of their own each), while a tail reader with a store
of its own follows the log. Every request's outcome is kept: what was acknowledged (event
ids, positions) and every error, which must be one a caller is told to expect
(StoreError, CommitUnknown, ConcurrencyError, Rejected, FollowUpFailed). Mid-flight the
cluster crashes; the writers keep going through the outage and the cluster comes back
after OUTAGE seconds. The same handler and reader store must then work again within a
bounded time, and afterwards the log must hold every acknowledged event at its
position, every batch whole or not at all, gapless positions, every event the reader
saw at the position it saw it, and each CommitUnknown's events entirely or not at all.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
from conftest import running_under_ci
from private_postgres import PrivateCluster, find_bindir

import incident
from incident.examples import bank

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WRITERS = 6
OWN_ACCOUNTS = 2
SHARED_ACCOUNTS = ("S0", "S1")
BATCH = 3  # events per raw append
BEFORE_CRASH = 300  # acknowledged requests before the crash
OUTAGE = 1.5  # seconds the server stays down
RECOVERY = 20.0  # seconds the same objects have to work again after the restart
AFTER_RESTART = 10  # acknowledged requests each writer must make after the restart
POOL_TIMEOUT = 1.0  # seconds a dispatch waits for a pooled connection
KEYED_TRIES = 5  # tries of a keyed deposit that met a store error

# what a caller may be told while the server is down or because of the race; anything
# else fails the test
TYPED = (
    incident.CommitUnknown,
    incident.StoreError,
    incident.ConcurrencyError,
    incident.Rejected,
    incident.FollowUpFailed,
)


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    """A private cluster, started; stopped and removed whatever happens."""
    bindir = find_bindir()
    if bindir is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl): see /usr/lib/postgresql"
        if running_under_ci():
            pytest.fail(f"the crash test is required under CI: {reason}", pytrace=False)
        pytest.skip(f"crash test skipped: {reason}")
    private = PrivateCluster(bindir)
    try:
        private.start()
        yield private
    finally:
        private.close()


@dataclass
class Attempt:
    """One request and what came of it. ``outcome``: ok (acknowledged: ``event_ids`` at
    ``positions``), rejected, conflict, follow_up_failed (the command's events are
    acknowledged; a follow-up is owed), commit_unknown (``unknown_ids`` may or may not be
    stored), store_error, or untyped (an error no caller is told to expect)."""

    writer: int
    op: str
    stream: str
    outcome: str = ""
    event_ids: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    unknown_ids: tuple[str, ...] = ()
    key: str | None = None
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0


def attempt(
    writer: int, op: str, stream: str, call: Callable[[], Sequence[Any]], key: str | None = None
) -> Attempt:
    done = Attempt(writer, op, stream, key=key)
    try:
        recorded = call()
    except Exception as error:
        return settled(done, failure=error)
    return settled(done, recorded)


def settled(
    done: Attempt, recorded: Sequence[Any] = (), *, failure: Exception | None = None
) -> Attempt:
    """``done`` with what its call returned, or the error it raised, sorted."""
    try:
        if failure is not None:
            raise failure
    except incident.FollowUpFailed as error:
        done.outcome = "follow_up_failed"
        recorded = error.recorded
    except incident.CommitUnknown as error:
        done.outcome, done.unknown_ids, recorded = "commit_unknown", tuple(error.event_ids), []
        done.error = repr(error)
    except incident.StoreError as error:
        done.outcome, recorded, done.error = "store_error", [], repr(error)
    except incident.ConcurrencyError:
        done.outcome, recorded = "conflict", []
    except incident.Rejected:
        done.outcome, recorded = "rejected", []
    except Exception as error:  # reported by the test
        done.outcome, recorded = "untyped", []
        done.error = f"{type(error).__module__}.{type(error).__qualname__}: {error}"
    else:
        done.outcome = "ok"
    if recorded:
        done.event_ids = tuple(r.event_id for r in recorded)
        done.positions = tuple(r.position for r in recorded)
    done.ended = time.monotonic()
    return done


def acknowledged(done: Attempt) -> bool:
    return done.outcome in ("ok", "follow_up_failed")


def write(
    handler: incident.CommandHandler, writer: int, stop: threading.Event, log: list[Attempt]
) -> None:
    """Requests of every kind until ``stop``: after a store error, a bounded backoff."""
    rng = random.Random(writer)
    store = handler.event_store
    own = [f"W{writer}-{index}" for index in range(OWN_ACCOUNTS)]
    others = [f"W{other}-0" for other in range(WRITERS) if other != writer]
    backoff = 0.0
    step = 0
    while not stop.is_set():
        step += 1
        op = rng.choice(("deposit", "withdraw", "shared", "transfer", "batch", "batch"))
        tries: list[Attempt] = []
        if op == "deposit":  # keyed, so tried again after a store error
            key = f"deposit-{writer}-{step}"
            deposit = bank.DepositMoney(aggregate_id=rng.choice(own), amount=rng.randint(1, 9))
            call = partial(handler.dispatch, deposit, {"idempotency_key": key})
            for _ in range(KEYED_TRIES):
                tries.append(attempt(writer, op, deposit.aggregate_id, call, key))
                if tries[-1].outcome not in ("store_error", "commit_unknown") or stop.is_set():
                    break
                time.sleep(0.05 * len(tries))
        else:
            command: incident.Command | None = None
            if op == "withdraw":  # Rejected when the account has too little
                command = bank.WithdrawMoney(
                    aggregate_id=rng.choice(own), amount=rng.randint(1, 12)
                )
            elif op == "shared":  # raced by every writer: the handler retries conflicts
                command = bank.DepositMoney(
                    aggregate_id=rng.choice(SHARED_ACCOUNTS), amount=rng.randint(1, 9)
                )
            elif op == "transfer":  # its process runs inline: follow-ups on two accounts
                command = bank.RequestTransfer(
                    aggregate_id=f"T{writer}-{step}",
                    source_account_number=rng.choice(own),
                    destination_account_number=rng.choice(others + list(SHARED_ACCOUNTS)),
                    amount=rng.randint(1, 5),
                )
            if command is not None:
                call = partial(handler.dispatch, command)
                stream = command.aggregate_id
            else:  # a raw append of BATCH events to a stream of its own: whole or nothing
                stream = f"L{writer}-{step}"
                call = partial(
                    store.append,
                    stream,
                    [bank.MoneyDeposited(amount=i + 1) for i in range(BATCH)],
                    expected_version=0,
                    aggregate="ledger",
                    metadata={"writer": writer},
                )
            tries.append(attempt(writer, op, stream, call))
        log.extend(tries)
        if tries[-1].outcome in ("store_error", "commit_unknown"):
            backoff = min(max(backoff * 2, 0.02), 0.25)
            time.sleep(backoff * rng.uniform(0.5, 1.0))
        else:
            backoff = 0.0


class Reader:
    """A thread following the log with ``read_all(after=last)`` on a store of its own,
    keeping every event it is handed (position, event id); store errors (the outage) are
    kept too and the read tried again after a pause."""

    def __init__(self, store: incident.EventStore) -> None:
        self.store = store
        self.seen: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.untyped: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="crash-reader", daemon=True)

    def last(self) -> int:
        return self.seen[-1][0] if self.seen else 0

    def _run(self) -> None:
        given_up = float("inf")  # once stopped: how long a last read may keep failing
        while True:
            stopping = self.stop.is_set()
            if stopping and given_up == float("inf"):
                given_up = time.monotonic() + 10
            try:
                for r in self.store.read_all(after=self.last()):
                    self.seen.append((r.position, r.event_id))
            except incident.StoreError as error:
                self.errors.append(repr(error))
            except Exception as error:  # reported by the test
                self.untyped.append(f"{type(error).__qualname__}: {error}")
            else:
                if stopping:
                    return  # the last read, after the writers stopped, succeeded
                time.sleep(0.002)
                continue
            if time.monotonic() > given_up:
                return
            time.sleep(0.05)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took ``condition`` to hold; fails the test after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


def event_types(store: incident.EventStore) -> None:
    store.types.register(*bank.bank_account.event_types, *bank.transfer.event_types)


def test_a_crash_during_concurrent_dispatch_loses_nothing_acknowledged(
    cluster: PrivateCluster,
) -> None:
    url = cluster.url(schema="crash")
    handler = bank.build(incident.open_event_store(url, timeout=POOL_TIMEOUT))
    reader_store = incident.open_event_store(url, timeout=POOL_TIMEOUT)
    event_types(reader_store)
    setup: list[incident.Command] = [
        bank.OpenAccount(aggregate_id=a) for a in (*SHARED_ACCOUNTS, "PROBE")
    ]
    setup += [bank.OpenAccount(aggregate_id=f"W{w}-{i}") for w in range(WRITERS) for i in range(2)]
    setup += [bank.DepositMoney(aggregate_id=f"W{w}-0", amount=50) for w in range(WRITERS)]
    try:
        for command in setup:
            handler.dispatch(command)

        logs: list[list[Attempt]] = [[] for _ in range(WRITERS)]
        stop = threading.Event()
        failures: list[BaseException] = []

        def run(writer: int) -> None:
            try:
                write(handler, writer, stop, logs[writer])
            except BaseException as error:  # reported by the test
                failures.append(error)

        threads = [
            threading.Thread(target=run, args=(w,), name=f"crash-writer-{w}", daemon=True)
            for w in range(WRITERS)
        ]
        reader = Reader(reader_store)

        def acks(since: float = 0.0) -> list[int]:
            return [
                sum(1 for d in list(log) if acknowledged(d) and d.started > since) for log in logs
            ]

        probes: list[Attempt] = []
        try:
            reader.thread.start()
            for thread in threads:
                thread.start()
            wait_until(lambda: sum(acks()) >= BEFORE_CRASH, 60, "acknowledged requests")
            crashed_at = time.monotonic()
            cluster.crash()
            time.sleep(OUTAGE)  # the writers keep going, and meet the outage
            cluster.start()
            restarted_at = time.monotonic()

            # the same handler works again within a bounded time...
            def probe() -> bool:
                probes.append(
                    attempt(
                        -1,
                        "probe",
                        "PROBE",
                        lambda: handler.dispatch(bank.DepositMoney(aggregate_id="PROBE", amount=1)),
                    )
                )
                if not acknowledged(probes[-1]):
                    time.sleep(0.1)
                return acknowledged(probes[-1])

            first_success = wait_until(probe, RECOVERY, "a dispatch after the restart")
            # ...for every writer thread sharing it, and so does the reader's store
            wait_until(
                lambda: min(acks(restarted_at)) >= AFTER_RESTART,
                RECOVERY,
                f"{AFTER_RESTART} acknowledged requests per writer after the restart",
            )
            target = max(p for log in logs for d in list(log) for p in d.positions)
            wait_until(lambda: reader.last() >= target, RECOVERY, "the reader after the restart")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            reader.stop.set()
            reader.thread.join(30)
        assert not failures, failures
        assert not any(t.is_alive() for t in threads) and not reader.thread.is_alive()

        done = [d for log in logs for d in log] + probes
        untyped = [d for d in done if d.outcome == "untyped"] + reader.untyped
        assert not untyped, f"errors a caller is not told to expect: {untyped[:5]}"
        outcomes = Counter(d.outcome for d in done)
        hit = [
            d for d in done if d.outcome in ("store_error", "commit_unknown", "follow_up_failed")
        ]
        assert hit, f"no request met the outage: {outcomes}"
        assert reader.errors, "the reader never met the outage"

        with closing(incident.open_event_store(url)) as store:
            event_types(store)
            log = list(store.read_all())
            check_log(log, done, reader.seen)
            check_read_models(handler.projection_store, log)
        print(
            f"\n{len(log)} events, {outcomes}; reader errors {len(reader.errors)}; first dispatch"
            f" {first_success:.2f} s after the restart; outage seen by requests from"
            f" {min(d.started for d in hit) - crashed_at:+.2f} s to"
            f" {max(d.ended for d in hit) - crashed_at:+.2f} s of the crash"
        )
    finally:
        handler.close()
        reader_store.close()


def check_log(
    log: list[incident.Recorded[Any]],
    done: list[Attempt],
    seen: list[tuple[int, str]],
) -> None:
    positions = [r.position for r in log]
    assert positions == list(range(1, len(log) + 1)), "positions are not gapless 1..n"
    by_id = {r.event_id: r for r in log}
    assert len(by_id) == len(log), "an event id is in the log twice"

    # every acknowledged request's events are there, at the positions it was told
    lost = [
        d
        for d in done
        if acknowledged(d)
        and [by_id[i].position if i in by_id else None for i in d.event_ids] != list(d.positions)
    ]
    assert not lost, f"{len(lost)} acknowledged requests are not in the log as told: {lost[:3]}"

    # a CommitUnknown's events are all there or none is
    halves = [
        d
        for d in done
        if d.outcome == "commit_unknown"
        and 0 < sum(i in by_id for i in d.unknown_ids) < len(d.unknown_ids)
    ]
    assert not halves, f"CommitUnknown requests partly in the log: {halves[:3]}"

    # every raw batch is whole or absent; an acknowledged one is whole, one that failed
    # with a plain StoreError (not CommitUnknown) wrote nothing
    batches: dict[str, list[incident.Recorded[Any]]] = defaultdict(list)
    for r in log:
        if r.aggregate_id.startswith("L"):
            batches[r.aggregate_id].append(r)
    partial = {s: len(rs) for s, rs in batches.items() if len(rs) != BATCH}
    assert not partial, f"multi-event appends partly in the log: {partial}"
    for d in done:
        if d.op != "batch":
            continue
        if acknowledged(d):
            assert [r.event_id for r in batches[d.stream]] == list(d.event_ids), d
        elif d.outcome == "store_error":
            assert d.stream not in batches, f"a batch that failed is in the log: {d}"
        elif d.outcome == "commit_unknown":
            stored = [r.event_id for r in batches.get(d.stream, [])]
            assert stored in ([], list(d.unknown_ids)), d

    # a keyed deposit tried again is in the log once, as its acknowledgement says
    keyed: dict[str, list[str]] = defaultdict(list)
    for r in log:
        key = r.metadata.get("idempotency_key")
        if key is not None:
            keyed[key].append(r.event_id)
    twice = {k: ids for k, ids in keyed.items() if len(ids) != 1}
    assert not twice, f"keyed deposits stored more than once: {twice}"
    for d in done:
        if d.key is not None and acknowledged(d):
            assert keyed[d.key] == list(d.event_ids), d

    # the reader saw each event once, in order, and nothing the crash took back
    gone = [(p, i) for p, i in seen if p > len(log) or log[p - 1].event_id != i]
    assert not gone, f"the reader saw {len(gone)} events that are not in the log: {gone[:5]}"
    assert seen == [(r.position, r.event_id) for r in log], "the reader missed or repeated events"


def check_read_models(
    projections: incident.ProjectionStore, log: list[incident.Recorded[Any]]
) -> None:
    """The projections commit with their events: each account's read model is at its
    stream's last version."""
    last: dict[str, int] = {}
    for r in log:
        if r.aggregate == "bank_account":
            last[r.aggregate_id] = r.version
    behind = {}
    for account, version in last.items():
        row = projections.get(bank.BankAccount, account)
        if row is None or row.version != version:
            behind[account] = (version, row and row.version)
    assert not behind, f"read models not at their stream's version: {behind}"


@pytest.mark.slow
def test_after_a_restart_pool_errors_say_the_server_refused_not_that_the_pool_was_busy(
    cluster: PrivateCluster,
) -> None:
    """While the server is down the pool's own reconnects are refused and back off; once
    it is up again a checkout can still time out before the pool's next try. What that
    error says must be what happened (the server refused connections), never "raise
    pool_size", which would send an operator after the wrong knob."""
    store = incident.open_event_store(cluster.url(schema="refused"), timeout=0.3)
    try:
        assert store.version("A") == 0
        cluster.crash()
        messages = []
        down_until = time.monotonic() + 3.0  # long enough for the pool's backoff to grow
        while time.monotonic() < down_until:
            with pytest.raises(incident.StoreError) as caught:
                store.version("A")
            messages.append(str(caught.value))
        cluster.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert store.version("A") == 0
                break
            except incident.StoreError as error:
                messages.append(str(error))
                assert time.monotonic() < deadline, messages[-3:]
        assert messages, "the outage was never noticed"
        busy = [m for m in messages if "raise pool_size" in m]
        assert not busy, busy[:3]
    finally:
        store.close()
