"""Appends the database numbers (incident/stores/postgres/numbered.py): when an append's
inline work does not look at positions, the append lock is taken, the heads checked and
the rows numbered in one server-side step, whoever else writes; work that looks at a
position is numbered in the client, as before, and gets the real positions."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlite_batches import account as account_row

import incident
from incident.examples import bank
from incident.stores.postgres import PostgresEventStore, session

pytestmark = pytest.mark.postgres


class Seen(incident.Projection, frozen=True, kw_only=True):
    aggregate_id: str
    position: int


@pytest.fixture
def store(postgres_url: str) -> Iterator[PostgresEventStore]:
    opened = incident.open_event_store(postgres_url)
    assert isinstance(opened, PostgresEventStore)
    opened.types.register(*bank.bank_account.event_types)
    yield opened
    opened.close()


def paths(store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which path each append took: "numbered" (by the database) or "client"."""
    taken: list[str] = []
    numbered, predicted = store.numbered.append, store._append_predicted

    def by_database(conn: Any, job: Any, channel: str) -> Any:
        done = numbered(conn, job, channel)
        taken.append("numbered" if done is not None else "client")
        return done

    monkeypatch.setattr(store.numbered, "append", by_database)
    monkeypatch.setattr(store, "_append_predicted", predicted)
    # as if other appends of this process were under way: a lone predicting writer
    # would commit synchronously on the predicted path instead (see the last test)
    monkeypatch.setattr(store._db.in_flight, "one", lambda: contextlib.nullcontext(False))
    return taken


def append(
    store: PostgresEventStore, stream: str, version: int, project: Any = None, **options: Any
) -> list[incident.Recorded[Any]]:
    return store.append_and_project(
        stream,
        [bank.MoneyDeposited(amount=1), bank.MoneyDeposited(amount=2)],
        expected_version=version,
        aggregate=None,
        metadata=None,
        projection_store=store.projections(),
        project=project,
        **options,
    )


def test_work_that_ignores_positions_is_numbered_by_the_database(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def by_version(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        return [Seen(aggregate_id=r.aggregate_id, position=r.version) for r in recorded]

    append(store, "made", 0, by_version)  # a new table: made by the client's path
    taken = paths(store, monkeypatch)
    first = append(store, "a", 0, by_version)
    second = append(store, "b", 0, lambda recorded: seen.extend([len(recorded)]) or [])
    assert taken == ["numbered", "numbered"]
    assert seen == [2]
    assert [r.position for r in first + second] == [3, 4, 5, 6]
    assert [r.position for r in store.read_all()] == [1, 2, 3, 4, 5, 6]
    assert store.get("a") == first and store.get("b") == second
    assert store.projections().get(Seen, "a") == Seen(aggregate_id="a", position=2)


@pytest.mark.parametrize(
    "looks",
    [
        lambda r: r.position + 0,
        lambda r: r.position == 3,
        lambda r: f"{r.position}",
        lambda r: hash(r.position),
        lambda r: {r.position: 1},
    ],
    ids=["arithmetic", "comparison", "formatting", "hash", "dict key"],
)
def test_work_that_looks_at_positions_gets_the_real_ones(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch, looks: Any
) -> None:
    append(store, "before", 0)
    taken = paths(store, monkeypatch)

    def by_position(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        for record in recorded:
            looks(record)
        return [Seen(aggregate_id=r.aggregate_id, position=r.position) for r in recorded]

    recorded = append(store, "a", 0, by_position)
    assert taken == ["client"]
    assert [r.position for r in recorded] == [3, 4]
    assert store.projections().get(Seen, "a") == Seen(aggregate_id="a", position=4)


def test_a_position_copied_into_a_row_is_found_and_numbered_in_the_client(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying a placeholder touches nothing; encoding the row finds it."""
    append(store, "before", 0)
    taken = paths(store, monkeypatch)

    def copying(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        return [Seen(aggregate_id="a", position=recorded[-1].position)]

    append(store, "a", 0, copying)
    assert taken == ["client"]
    assert store.projections().get(Seen, "a") == Seen(aggregate_id="a", position=4)


def test_work_that_catches_the_placeholder_error_is_still_numbered_in_the_client(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(store, "before", 0)
    taken = paths(store, monkeypatch)

    def swallowing(recorded: list[incident.Recorded[Any]]) -> list[incident.Projection]:
        try:
            position = recorded[0].position * 1
        except Exception:
            position = -1
        return [Seen(aggregate_id="a", position=position)]

    append(store, "a", 0, swallowing)
    assert taken == ["client"]
    assert store.projections().get(Seen, "a") == Seen(aggregate_id="a", position=3)


def test_a_conflict_or_a_used_key_on_the_numbered_path_writes_nothing(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = append(store, "a", 0, idempotency_key="k")
    taken = paths(store, monkeypatch)
    with pytest.raises(incident.ConcurrencyError) as caught:
        append(store, "a", 0)
    assert (caught.value.expected, caught.value.actual) == (0, 2)
    with pytest.raises(incident.DuplicateCommand) as duplicate:
        append(store, "b", 0, idempotency_key="k")
    assert duplicate.value.recorded == first
    assert taken == ["client"]  # the conflict was said at once; the key by the locked path
    assert [r.position for r in store.read_all()] == [1, 2]
    assert append(store, "a", 2)[0].position == 3


def test_owed_work_records_the_real_position(postgres_url: str) -> None:
    """The Bank's transfer process runs inline: each RequestTransfer owes commands; the
    owed record, numbered by the database, is settled at the cause's real position."""
    handler = bank.build(postgres_url)
    for account in ("x", "y"):
        handler.dispatch(bank.OpenAccount(aggregate_id=account))
    handler.dispatch(bank.DepositMoney(aggregate_id="x", amount=50))
    handler.dispatch(
        bank.RequestTransfer(
            aggregate_id="t1", source_account_number="x", destination_account_number="y", amount=20
        )
    )
    log = list(handler.event_store.read_all())
    assert [r.position for r in log] == list(range(1, len(log) + 1))
    assert handler.event_store.owed() == []  # carried out and settled, by position
    assert handler.projection_store.get(bank.BankAccount, "y").balance == 20  # type: ignore[union-attr]
    handler.close()


def test_threads_and_stores_numbered_by_the_database_stay_gapless(postgres_url: str) -> None:
    """Two stores (two processes' worth of pools), four threads each: positions gapless,
    in commit order, every append whole."""
    stores = [incident.open_event_store(postgres_url) for _ in range(2)]
    done: list[list[incident.Recorded[Any]]] = []

    def write(store: incident.EventStore, name: str) -> None:
        for version in range(0, 20, 2):
            done.append(append(store, name, version))  # type: ignore[arg-type]

    threads = [
        threading.Thread(target=write, args=(store, f"s{n}-{i}"))
        for n, store in enumerate(stores)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    log = list(stores[0].read_all())
    assert [r.position for r in log] == list(range(1, 161))
    assert sorted(r.event_id for batch in done for r in batch) == sorted(r.event_id for r in log)
    by_position = {r.position: r for r in log}
    for batch in done:
        assert [by_position[r.position].event_id for r in batch] == [r.event_id for r in batch]
        assert batch[1].position == batch[0].position + 1  # an append's rows are together
    for store in stores:
        store.close()


def test_an_append_alone_commits_synchronously_one_behind_another_async_then_flushed(
    postgres_url: str, postgres_admin: Any
) -> None:
    """Alone, holding the lock through the commit's fsync delays nobody: the commit is
    synchronous (one fsync, as a bare insert). Behind another holder of the lock, the
    commit is asynchronous, so the lock is free at once, and the statement after COMMIT
    flushes it before the append returns (the flag it resets is the sign)."""
    store = incident.open_event_store(postgres_url, pool_size=1)
    assert isinstance(store, PostgresEventStore)
    flag = "SELECT current_setting('incident.unflushed', true)"
    try:
        store.append("A", [bank.MoneyDeposited(amount=1)], expected_version=0)
        with store._db.connection("reading the flag") as conn:
            assert conn.execute(flag).fetchone() == (None,)  # never set: synchronous

        postgres_admin.execute("SELECT pg_advisory_lock(%s)", [store._db.append_lock])
        done = threading.Event()
        writer = threading.Thread(
            target=lambda: (
                store.append("A", [bank.MoneyDeposited(amount=2)], expected_version=1),
                done.set(),
            )
        )
        writer.start()
        assert not done.wait(0.5), "appended while another session held the append lock"
        postgres_admin.execute("SELECT pg_advisory_unlock(%s)", [store._db.append_lock])
        writer.join(30)
        assert done.is_set()
        with store._db.connection("reading the flag") as conn:
            assert conn.execute(flag).fetchone() == ("off",)  # set, then reset by the flush
        assert [r.data.amount for r in store.read_all()] == [1, 2]
    finally:
        store.close()


def test_a_lone_predicting_writer_commits_synchronously_on_the_predicted_path(
    store: PostgresEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One writer, alone in its process and the last to write: prepared statements, one
    round trip, one synchronous commit (a bare insert's cost), no separate flush; once
    another append of the process is under way, the numbered path."""
    calls: list[bool] = []
    predicted = store._append_predicted

    def spy(conn: Any, job: Any, *, synchronous: bool = False) -> Any:
        calls.append(synchronous)
        return predicted(conn, job, synchronous=synchronous)

    monkeypatch.setattr(store, "_append_predicted", spy)
    for version in range(0, 6, 2):
        append(store, "alone", version)
    assert calls[-2:] == [True, True]  # predicting from the first commit on
    assert [r.position for r in store.read_all()] == [1, 2, 3, 4, 5, 6]
    taken = paths(store, monkeypatch)
    append(store, "alone", 6)
    assert taken == ["numbered"]


def session_statements(store: PostgresEventStore) -> tuple[Any, set[str]]:
    """The pool's one connection, and the incident statements its session holds."""
    with store._db.pool.connection() as conn:
        rows = conn.execute(session.PREPARED_NAMES).fetchall()
    return conn, {name for (name,) in rows}


@pytest.mark.parametrize("out_of_step", ["deallocated", "forgotten"])
def test_the_numbered_message_runs_prepared_statements_and_survives_losing_track(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, out_of_step: str
) -> None:
    """The one message EXECUTEs statements prepared once per session (the server parses
    and plans them once). When the session and the connection's memory of it disagree,
    as after psycopg's own DEALLOCATE ALL (it sends one on a rollback), or the other
    way round, the append still goes through, once, and the memory is right again."""
    store = incident.open_event_store(postgres_url, pool_size=1)
    assert isinstance(store, PostgresEventStore)
    store.types.register(*bank.bank_account.event_types)
    try:
        append(store, "made", 0, account_row)  # the projection table: the client's path
        taken = paths(store, monkeypatch)
        append(store, "a", 0, account_row)
        conn, prepared = session_statements(store)
        assert len(prepared) == 3  # append_numbered, the event insert, the upsert
        assert conn.__dict__["incident_prepared"] == prepared
        if out_of_step == "deallocated":
            with store._db.pool.connection() as same:
                same.execute("DEALLOCATE ALL")
        else:
            conn.__dict__["incident_prepared"] = set()
        append(store, "b", 0, account_row)
        assert taken == ["numbered", "numbered"]
        assert [r.aggregate_id for r in store.read_all()] == ["made"] * 2 + ["a"] * 2 + ["b"] * 2
        assert session_statements(store)[1] == prepared == conn.__dict__["incident_prepared"]
    finally:
        store.close()
