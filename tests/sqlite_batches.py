"""The harness of the SQLite shared-commit tests (test_sqlite_group_commit,
test_sqlite_batch, test_sqlite_edges): connections that fail where they are told to,
appends, and batches forced by holding a first append (the leader) inside its
``project`` until the others wait behind it, so that its writer takes them into its
transaction. Nothing is timed."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from interrupts import wait_until

import incident
from incident.examples.bank import BankAccount, MoneyDeposited
from incident.stores.protocols import AppendRequest, Committed
from incident.stores.sqlite import SQLiteEventStore, open_sqlite

# -- connections that fail where they are told to ---------------------------------------


class Rule:
    """Raise ``error`` at the next ``times`` statements ``matches`` accepts (on the thread
    named ``thread``, when given): after running the statement (``after``), or having
    rolled the transaction back first (``rollback``: a full disk)."""

    def __init__(
        self,
        matches: Callable[[str], bool],
        error: BaseException,
        *,
        times: int = 1,
        after: bool = False,
        rollback: bool = False,
        thread: str | None = None,
    ) -> None:
        self.matches, self.error, self.times = matches, error, times
        self.after, self.rollback, self.thread = after, rollback, thread
        self.hits = 0


class Faults:
    """What the faulty connections do: run the rules armed, and record every statement,
    the threads that ran COMMIT and the connections opened."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.statements: list[str] = []  # every statement run, in order
        self.commits: list[str] = []  # the thread of each COMMIT, in order
        self.connections: list[sqlite3.Connection] = []
        self.lock = threading.Lock()

    def arm(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def rule_for(self, sql: str) -> Rule | None:
        with self.lock:
            self.statements.append(sql)
            if sql == "COMMIT":
                self.commits.append(threading.current_thread().name)
            for rule in self.rules:
                ours = rule.thread is None or rule.thread == threading.current_thread().name
                if rule.times and ours and rule.matches(sql):
                    rule.times -= 1
                    rule.hits += 1
                    return rule
        return None


FAULTS = Faults()


class FaultyConnection(sqlite3.Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        FAULTS.connections.append(self)

    def _run(self, sql: str, run: Callable[[], sqlite3.Cursor]) -> sqlite3.Cursor:
        rule = FAULTS.rule_for(sql)
        if rule is None:
            return run()
        if rule.rollback and self.in_transaction:
            super().execute("ROLLBACK")
        if rule.after:
            run()
        raise rule.error

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self._run(sql, lambda: super(FaultyConnection, self).execute(sql, parameters))

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        return self._run(sql, lambda: super(FaultyConnection, self).executemany(sql, parameters))


def exactly(statement: str) -> Callable[[str], bool]:
    return lambda sql: sql == statement


def writing(table: str) -> Callable[[str], bool]:
    return lambda sql: f'INSERT INTO "{table}"' in sql


S = TypeVar("S")


def recording(
    monkeypatch: pytest.MonkeyPatch, factory: type[sqlite3.Connection], state: S
) -> Iterator[S]:
    """A fixture's body: every connection the stores open from here on is a
    ``factory``, writing into ``state``, which starts afresh and is reset at the end."""
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return original(*args, **kwargs, factory=factory)

    monkeypatch.setattr(sqlite3, "connect", connect)
    state.__init__()  # type: ignore[misc]
    yield state
    state.__init__()  # type: ignore[misc]


def faulty_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    """A fixture's body: every connection the stores open from here on is a
    FaultyConnection, with no rule armed."""
    yield from recording(monkeypatch, FaultyConnection, FAULTS)


# -- stores and appends --------------------------------------------------------------------

Project = Callable[[list[incident.Recorded[Any]]], list[incident.Projection]]


def deposit(
    aggregate_id: str, events: int = 1, expected: object = 0, key: str | None = None
) -> AppendRequest:
    return AppendRequest(
        aggregate_id=aggregate_id,
        events=[MoneyDeposited(amount=1) for _ in range(events)],
        expected_version=expected,
        aggregate="bank_account",
        idempotency_key=key,
    )


def deposits_for(**projects: Project) -> dict[str, tuple[AppendRequest, Project]]:
    """For each name, a deposit into the stream of that name, with its ``project``."""
    return {name: (deposit(name), project) for name, project in projects.items()}


def account(recorded: Sequence[incident.Recorded[Any]]) -> list[incident.Projection]:
    last = recorded[-1]
    return [
        BankAccount(
            aggregate_id=last.aggregate_id,
            account_number=last.aggregate_id,
            balance=last.version,
            version=last.version,
            event_id=last.event_id,
            event_date=last.event_date,
        )
    ]


def ready(url: str, **options: Any) -> SQLiteEventStore:
    """A store whose tables (the BankAccount table too) exist already."""
    store = open_sqlite(url, **options)
    store.commit(deposit("setup"), projection_store=store.projections(), project=account)
    return store


def log(store: SQLiteEventStore) -> list[tuple[int, str]]:
    return [(r.position, r.aggregate_id) for r in store.read_all()]


def in_threads(
    work: Callable[[int], None], count: int, store: SQLiteEventStore
) -> list[incident.Recorded[Any]]:
    """``work(0)`` ... ``work(count - 1)``, each on a thread of its own, to their end;
    raises the first error one of them raised, else returns the log, checked gapless."""
    failures: list[BaseException] = []

    def run(worker: int) -> None:
        try:
            work(worker)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    if failures:
        raise failures[0]
    events = list(store.read_all())
    assert [r.position for r in events] == list(range(1, len(events) + 1))
    return events


# -- batches -------------------------------------------------------------------------------

Result = Committed | BaseException


class Batch:
    """Holds a first append (the leader: on a thread named "leader", its append of
    ``events`` events) inside its ``project`` until the appends given to :meth:`enqueue`
    wait behind it; :meth:`finish` lets it go: its writer takes them, in queue order,
    into the same transaction, after its own append and before its COMMIT."""

    def __init__(self, store: SQLiteEventStore, events: int = 1) -> None:
        self.store = store
        self.outcomes: dict[str, Result] = {}
        self.threads: list[threading.Thread] = []
        entered, self.release = threading.Event(), threading.Event()

        def hold(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
            entered.set()
            assert self.release.wait(10)
            return account(recorded)

        self.start("leader", deposit("leader", events), hold)
        assert entered.wait(10)

    def start(self, name: str, request: AppendRequest, project: Any) -> None:
        """Commit ``request`` on a thread named ``name``; its outcome goes in
        :attr:`outcomes`."""

        def run() -> None:
            try:
                self.outcomes[name] = self.store.commit(
                    request, projection_store=self.store.projections(), project=project
                )
            except BaseException as error:
                self.outcomes[name] = error

        thread = threading.Thread(target=run, name=name, daemon=True)  # none outlives a stall
        self.threads.append(thread)
        thread.start()

    def enqueue(self, appends: dict[str, tuple[AppendRequest, Any]]) -> None:
        """Start each append, in order, each once the one before waits in the queue."""
        for queued, (name, (request, project)) in enumerate(appends.items(), 1):
            self.start(name, request, project)
            self.wait_for_queue(queued)

    def wait_for_queue(self, length: int) -> None:
        wait_until(lambda: self.store.group.queued == length)

    def finish(self) -> dict[str, Result]:
        """Let the leader go; the outcome of each append, once all are over."""
        self.release.set()
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive()
        return self.outcomes

    def queue(self, appends: dict[str, tuple[AppendRequest, Any]]) -> dict[str, Result]:
        self.enqueue(appends)
        return self.finish()
