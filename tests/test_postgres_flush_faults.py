"""A lone Postgres append whose COMMIT went through but whose flush then failed on a
live session (cancelled, as a statement_timeout or an operator's pg_cancel_backend
does) is stored: the store looks it up once it is durable and acknowledges it, instead
of a StoreError saying nothing was stored (after which a retry without a key stored it
twice). Here the shared wait for the WAL flush after the COMMIT fails."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import incident
from incident.examples.bank import MoneyDeposited
from incident.stores.postgres import durability


@pytest.fixture
def store(postgres_url: str) -> Iterator[Any]:
    opened = incident.open_event_store(postgres_url)
    opened.initialize()
    yield opened
    opened.close()


def deposits(store: Any) -> list[tuple[str, int]]:
    return [(r.aggregate_id, r.version) for r in store.read_all()]


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
