"""The public checkpoint store contract (``incident.testing.contract``) on memory, SQLite
and Postgres."""

from __future__ import annotations

from conftest import OnEveryBackend

import incident
from incident.testing.contract import CheckpointStoreContract


class TestCheckpointStores(OnEveryBackend, CheckpointStoreContract):
    """The public checkpoint store contract, on every backend."""


def test_checkpoints_share_the_event_stores_database(event_store: incident.EventStore) -> None:
    """An event store's checkpoints and projections are one database on every backend,
    so the contract's one-transaction branch runs on each of them."""
    checkpoints = incident.stores.checkpoint_store_for(event_store)
    assert checkpoints.shares_database_with(event_store.projections())
