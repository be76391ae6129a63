"""A lone Postgres append whose COMMIT went through but whose flush then failed on a
live session (cancelled, as a statement_timeout or an operator's pg_cancel_backend
does) is stored: the store looks it up once it is durable and acknowledges it, instead
of a StoreError saying nothing was stored (after which a retry without a key stored it
twice). Each place a lone append's flush can fail: the statement sent after the COMMIT
of a numbered, a predicted synchronous or a locked append, and the shared wait for the
WAL flush afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import incident
from incident.examples.bank import MoneyDeposited
from incident.stores.postgres import durability, events, numbered


@pytest.fixture
def store(postgres_url: str) -> Iterator[Any]:
    opened = incident.open_event_store(postgres_url)
    opened.initialize()
    yield opened
    opened.close()


# cancelled by the server itself while it sleeps: QueryCanceled on a live session
REFUSED = "SELECT pg_cancel_backend(pg_backend_pid())::text, pg_sleep(5)::text"


def deposits(store: Any) -> list[tuple[str, int]]:
    return [(r.aggregate_id, r.version) for r in store.read_all()]


@pytest.mark.parametrize(
    ("module", "statement", "before", "expected"),
    [
        (numbered, "FLUSH_IF_WAITED", 0, 0),  # a fresh store numbers its first append
        (events, "FLUSHED", 1, 1),  # alone and predicting: a synchronous commit
        (events, "WAL_POSITIONS", 1, incident.ANY),  # ANY goes the locked way
    ],
    ids=["numbered", "predicted", "locked"],
)
def test_an_append_whose_flush_is_refused_after_its_commit_is_stored_once(
    store: Any,
    monkeypatch: pytest.MonkeyPatch,
    module: Any,
    statement: str,
    before: int,
    expected: Any,
) -> None:
    for _ in range(before):  # the locked way: the store predicts after it
        store.append("A", [MoneyDeposited(amount=1)], expected_version=incident.ANY)
    real = getattr(module, statement)
    monkeypatch.setattr(module, statement, REFUSED)
    recorded = store.append("A", [MoneyDeposited(amount=2)], expected_version=expected)
    monkeypatch.setattr(module, statement, real)
    assert [r.version for r in recorded] == [before + 1]
    assert deposits(store) == [("A", v) for v in range(1, before + 2)]
    store.append("A", [MoneyDeposited(amount=3)], expected_version=before + 1)  # works again


def test_an_append_whose_wait_for_the_flush_fails_after_its_commit_is_stored_once(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = durability.Durability.after
    failed: list[int] = []

    def after(self: Any, positions: Any, conn: Any) -> None:
        if not failed:  # the append's own wait; the look-up's waits go through
            failed.append(1)
            raise psycopg.errors.QueryCanceled("canceling statement due to user request")
        real(self, positions, conn)

    monkeypatch.setattr(durability.Durability, "after", after)
    recorded = store.append("A", [MoneyDeposited(amount=1)], expected_version=incident.ANY)
    monkeypatch.undo()
    assert failed == [1]
    assert [r.version for r in recorded] == [1]
    assert deposits(store) == [("A", 1)]
    store.append("A", [MoneyDeposited(amount=2)], expected_version=1)  # works again
    assert deposits(store) == [("A", 1), ("A", 2)]
