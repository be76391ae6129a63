"""Concurrent writers with conflicts mixed in, for tests/test_concurrent_writers.py: the
work each writer (a thread, or a spawned OS process) does on the Bank, what it reports
back (one ``Done`` per request: what was asked, what came of it, which events were
acknowledged), and tail readers that follow the log meanwhile. Children import this
small module rather than the test module, so they start without pytest.

Every writer owns some accounts and a ledger stream that no other writer touches, so it
knows what must come of each request there (a withdrawal beyond its balance is
Rejected, a stale expected version a ConcurrencyError); on the shared accounts the
writers race, and the test checks what they report against the log.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import incident
from incident.examples import bank

SHARED_ACCOUNTS = ("S0", "S1", "S2")
SHARED_OPENING = 20  # deposited into each shared account before the writers start
OWN_ACCOUNTS = 2
SHARED_KEYS = 4  # keyed deposits that every writer sends, racing the others' twins
DOOMED = 999_999  # the amount of every event a conflicting append tries to write
IDEMPOTENCY_KEY = "idempotency_key"  # the metadata key (incident.follow_ups.IDEMPOTENCY_KEY)


def own_account(writer: int, index: int) -> str:
    return f"W{writer}-{index}"


def ledger(writer: int) -> str:
    """The stream this writer appends raw multi-event batches to (not an account)."""
    return f"W{writer}-ledger"


@dataclass(frozen=True)
class Done:
    """One request and what came of it. ``outcome``: ``ok`` (acknowledged: its events
    are ``event_ids``, at ``positions`` and ``versions``, as the store returned them),
    ``rejected``, ``conflict`` (ConcurrencyError), or ``accepted`` (a request that had
    to be refused and was not). ``expected`` is the outcome the writer knew in advance
    (on streams only it writes), else None. ``amount`` is what the request does to the
    stream's balance if it takes effect; ``started`` and ``ended`` are
    ``time.monotonic_ns()`` (one clock for every process of the machine) around it."""

    writer: int
    op: str
    stream: str
    amount: int
    key: str | None
    outcome: str
    expected: str | None
    event_ids: tuple[str, ...]
    positions: tuple[int, ...]
    versions: tuple[int, ...]
    started: int
    ended: int


def _acknowledged(recorded: Sequence[incident.Recorded[Any]]) -> dict[str, Any]:
    return {
        "event_ids": tuple(r.event_id for r in recorded),
        "positions": tuple(r.position for r in recorded),
        "versions": tuple(r.version for r in recorded),
    }


_NOTHING: dict[str, Any] = {"event_ids": (), "positions": (), "versions": ()}


def dispatch(
    handler: incident.CommandHandler,
    writer: int,
    op: str,
    command: bank.DepositMoney | bank.WithdrawMoney | bank.OpenAccount,
    *,
    key: str | None = None,
    expected: str | None = None,
) -> Done:
    """Dispatch one Bank command (under ``key``, if given) and say what came of it."""
    if isinstance(command, bank.DepositMoney):
        amount = command.amount
    elif isinstance(command, bank.WithdrawMoney):
        amount = -command.amount
    else:
        amount = 0
    metadata = {IDEMPOTENCY_KEY: key} if key is not None else None
    started = time.monotonic_ns()
    try:
        recorded = handler.dispatch(command, metadata)
    except incident.Rejected:
        outcome, events = "rejected", _NOTHING
    except incident.ConcurrencyError:  # out of retries, nothing written
        outcome, events = "conflict", _NOTHING
    else:
        outcome, events = "ok", _acknowledged(recorded)
    ended = time.monotonic_ns()
    return Done(
        writer=writer,
        op=op,
        stream=command.aggregate_id,
        amount=amount,
        key=key,
        outcome=outcome,
        expected=expected,
        started=started,
        ended=ended,
        **events,
    )


def append(
    store: incident.EventStore,
    writer: int,
    op: str,
    stream: str,
    amounts: Sequence[int],
    expected_version: int,
    *,
    expected: str,
    aggregate: str,
) -> Done:
    """A raw append of MoneyDeposited events, one per amount, at ``expected_version``;
    a request that must conflict is marked in its metadata (``doomed``) as well as by its
    amounts, so the test can tell if any of it reached the log."""
    metadata = {"doomed": f"{writer}-{op}"} if expected == "conflict" else {"writer": writer}
    events = [bank.MoneyDeposited(amount=amount) for amount in amounts]
    started = time.monotonic_ns()
    try:
        recorded = store.append(
            stream,
            events,
            expected_version=expected_version,
            aggregate=aggregate,
            metadata=metadata,
        )
    except incident.ConcurrencyError:
        outcome, acknowledged = "conflict", _NOTHING
    else:
        outcome = "ok" if expected == "ok" else "accepted"
        acknowledged = _acknowledged(recorded)
    ended = time.monotonic_ns()
    return Done(
        writer=writer,
        op=op,
        stream=stream,
        amount=sum(amounts),
        key=None,
        outcome=outcome,
        expected=expected,
        started=started,
        ended=ended,
        **acknowledged,
    )


def open_accounts(handler: incident.CommandHandler, writers: int) -> list[Done]:
    """Before the writers start: the shared accounts, with money in them, and each
    writer's own accounts (empty)."""
    done = []
    for account in SHARED_ACCOUNTS:
        done.append(dispatch(handler, -1, "open", bank.OpenAccount(aggregate_id=account)))
        deposit = bank.DepositMoney(aggregate_id=account, amount=SHARED_OPENING)
        done.append(dispatch(handler, -1, "deposit", deposit))
    for writer in range(writers):
        for index in range(OWN_ACCOUNTS):
            opening = bank.OpenAccount(aggregate_id=own_account(writer, index))
            done.append(dispatch(handler, -1, "open", opening))
    assert all(d.outcome == "ok" for d in done), done
    return done


OPS = (
    "deposit_shared",
    "deposit_shared",
    "withdraw_shared",
    "withdraw_shared",
    "deposit_own",
    "withdraw_own",
    "keyed_twice",
    "keyed_rejection_twice",
    "stale_own",
    "stale_shared",
    "ledger",
    "stale_ledger",
)


def write_mix(
    handler: incident.CommandHandler,
    writer: int,
    requests: int,
    stop: threading.Event | None = None,
    rendezvous: Any = None,
) -> list[Done]:
    """About ``requests`` requests of every kind in OPS, in an order drawn from
    ``writer``'s own seed, plus the SHARED_KEYS keyed deposits every writer sends at the
    same steps, each after waiting for the other writers at ``rendezvous`` (a barrier
    of all the writers), so the twins race. Stops early once ``stop`` is set."""
    rng = random.Random(1000 + writer)
    # what this writer's own accounts hold, by what it was told (were a store to get
    # them wrong, the amounts stay valid and the test reports it)
    store = handler.event_store
    own = [own_account(writer, index) for index in range(OWN_ACCOUNTS)]
    balance = dict.fromkeys(own, 0)
    version = dict.fromkeys(own, 1)  # opened by open_accounts
    ledger_version = 0
    shared_at = {round(j * requests / SHARED_KEYS): j for j in range(SHARED_KEYS)}
    done: list[Done] = []

    told: set[str] = set()  # events this writer was told of, so a replay counts once

    def took_effect(d: Done) -> Done:
        if d.outcome == "ok" and d.stream in balance and not told.issuperset(d.event_ids):
            told.update(d.event_ids)
            balance[d.stream] += d.amount
            version[d.stream] = d.versions[-1]
        done.append(d)
        return d

    for step in range(requests):
        if stop is not None and stop.is_set():
            break
        if step in shared_at:
            j = shared_at[step]
            account = SHARED_ACCOUNTS[j % len(SHARED_ACCOUNTS)]
            command = bank.DepositMoney(aggregate_id=account, amount=j + 1)
            if rendezvous is not None:
                # a broken barrier: a writer failed or stopped, race whoever is left
                with contextlib.suppress(threading.BrokenBarrierError):
                    rendezvous.wait(30)
            done.append(dispatch(handler, writer, "shared_key", command, key=f"shared-{j}"))
        op = rng.choice(OPS)
        shared = rng.choice(SHARED_ACCOUNTS)
        mine = rng.choice(own)
        if op == "deposit_shared":
            command = bank.DepositMoney(aggregate_id=shared, amount=rng.randint(1, 9))
            done.append(dispatch(handler, writer, op, command))
        elif op == "withdraw_shared":  # Rejected or not, depending on the race
            command = bank.WithdrawMoney(aggregate_id=shared, amount=rng.randint(1, 30))
            done.append(dispatch(handler, writer, op, command))
        elif op == "deposit_own":
            command = bank.DepositMoney(aggregate_id=mine, amount=rng.randint(1, 9))
            took_effect(dispatch(handler, writer, op, command, expected="ok"))
        elif op == "withdraw_own":
            if balance[mine] > 0 and rng.random() < 0.5:
                amount, expected = rng.randint(1, balance[mine]), "ok"
            else:
                amount, expected = max(balance[mine], 0) + rng.randint(1, 5), "rejected"
            command = bank.WithdrawMoney(aggregate_id=mine, amount=amount)
            took_effect(dispatch(handler, writer, op, command, expected=expected))
        elif op == "keyed_twice":  # the second time returns the first's events
            key = f"w{writer}-{step}"
            command = bank.DepositMoney(aggregate_id=mine, amount=rng.randint(1, 9))
            for _ in range(2):
                took_effect(dispatch(handler, writer, op, command, key=key, expected="ok"))
        elif op == "keyed_rejection_twice":  # the second time is Rejected as the first
            key = f"w{writer}-{step}"
            command = bank.WithdrawMoney(aggregate_id=mine, amount=max(balance[mine], 0) + 1)
            for _ in range(2):
                took_effect(dispatch(handler, writer, op, command, key=key, expected="rejected"))
        elif op == "stale_own":  # behind, or ahead of, a stream only this writer writes
            stale = version[mine] + rng.choice((-1, 1))
            done.append(
                append(
                    store,
                    writer,
                    op,
                    mine,
                    [DOOMED],
                    stale,
                    expected="conflict",
                    aggregate="bank_account",
                )
            )
        elif op == "stale_shared":  # every shared account was opened: 0 is stale
            done.append(
                append(
                    store,
                    writer,
                    op,
                    shared,
                    [DOOMED],
                    0,
                    expected="conflict",
                    aggregate="bank_account",
                )
            )
        elif op == "ledger":  # a multi-event append that must land whole
            amounts = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
            d = append(
                store,
                writer,
                op,
                ledger(writer),
                amounts,
                ledger_version,
                expected="ok",
                aggregate="ledger",
            )
            if d.outcome == "ok":
                ledger_version = d.versions[-1]
            done.append(d)
        elif op == "stale_ledger":  # a multi-event append that must write nothing
            stale = ledger_version - 1 if ledger_version else ledger_version + 1
            done.append(
                append(
                    store,
                    writer,
                    op,
                    ledger(writer),
                    [DOOMED] * 3,
                    stale,
                    expected="conflict",
                    aggregate="ledger",
                )
            )
    return done


# -- running writers ------------------------------------------------------------------


def run_threads(
    work: Callable[[int, threading.Event, threading.Barrier], Any], count: int, *, timeout: float
) -> list[Any]:
    """Run ``work(index, stop, barrier)`` in ``count`` threads released together at
    ``barrier`` (which they may meet at again); returns their results in index order. A
    thread that fails sets ``stop`` and breaks the barrier for the others; whatever
    happens every thread is told to stop and joined before this returns or raises."""
    stop = threading.Event()
    start = threading.Barrier(count)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            start.wait(timeout)
            results[index] = work(index, stop, start)
        except BaseException as error:  # reported to the test
            errors.append(error)
            stop.set()
            start.abort()

    threads = [
        threading.Thread(target=run, args=(index,), name=f"writer-{index}", daemon=True)
        for index in range(count)
    ]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
        start.abort()
        for thread in threads:
            thread.join(10)
    hung = [thread.name for thread in threads if thread.is_alive()]
    if errors:
        raise errors[0]
    assert not hung, f"threads still running after {timeout} s: {hung}"
    return [results[index] for index in range(count)]


def mix_in_process(url: str, writer: int, requests: int, start: Any, results: Any) -> None:
    """A spawned writer: its own CommandHandler on ``url``, the same mix as a thread;
    reports (writer, list of Done) or (writer, an error's text)."""
    try:
        handler = bank.build(url)
    except Exception as error:
        start.abort()
        results.put((writer, f"{type(error).__name__}: {error}"))
        return
    try:
        start.wait(60)
        results.put((writer, write_mix(handler, writer, requests, rendezvous=start)))
    except Exception as error:  # reported to the test rather than lost in a child
        start.abort()
        results.put((writer, f"{type(error).__name__}: {error}"))
    finally:
        handler.close()


def run_processes(url: str, count: int, requests: int, *, timeout: float) -> list[list[Done]]:
    """``count`` spawned processes running ``mix_in_process``, released together; their
    reports in writer order. Children still alive at the end are terminated."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(count), context.Queue()
    children = [
        context.Process(target=mix_in_process, args=(url, writer, requests, start, results))
        for writer in range(count)
    ]
    reports: dict[int, Any] = {}
    try:
        for child in children:
            child.start()
        deadline = time.monotonic() + timeout
        while len(reports) < count:
            try:
                writer, report = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{count - len(reports)} writer processes did not report in {timeout} s"
                ) from None
            reports[writer] = report
        for child in children:
            child.join(30)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(10)
        results.close()
    failed = {writer: report for writer, report in reports.items() if isinstance(report, str)}
    assert not failed, failed
    assert [child.exitcode for child in children] == [0] * count
    return [reports[writer] for writer in range(count)]


# -- tail readers -----------------------------------------------------------------------


class TailReader:
    """A thread following the log with ``read_all(after=last)``: polling, or, with
    ``wait=True``, blocking in ``wait_for_append`` between reads. It keeps every event
    it is handed, in the order handed; ``finish()`` (once the writers are done) makes it
    read once more and stop."""

    def __init__(self, store: incident.EventStore, *, wait: bool) -> None:
        self.store = store
        self.wait = wait
        self.seen: list[tuple[int, str]] = []  # (position, event_id), in the order read
        self.batches = 0  # reads that returned something
        self.error: BaseException | None = None
        self._writers_done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tail-reader", daemon=True)

    def __enter__(self) -> TailReader:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._writers_done.set()
        self._thread.join(30)

    def _read(self) -> int:
        last = self.seen[-1][0] if self.seen else 0
        batch = [(r.position, r.event_id) for r in self.store.read_all(after=last)]
        self.seen.extend(batch)
        self.batches += bool(batch)
        return len(batch)

    def _run(self) -> None:
        try:
            while not self._writers_done.is_set():
                if self.wait:
                    last = self.seen[-1][0] if self.seen else 0
                    self.store.wait_for_append(last, 0.05)  # type: ignore[attr-defined]
                    self._read()
                elif not self._read():
                    time.sleep(0.001)
            self._read()  # everything the writers committed is visible by now
        except BaseException as error:  # reported to the test
            self.error = error

    def finish(self) -> list[tuple[int, str]]:
        self._writers_done.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the tail reader did not stop"
        if self.error is not None:
            raise self.error
        return self.seen
