"""The public store contract on the async stores of every backend, driven from sync
tests through one event loop (``incident.testing.asynchronous``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import incident
from incident.testing.asynchronous import EventLoopThread
from incident.testing.contract import EventStoreContract, ProjectionStoreContract


class AsyncOnEveryBackend:
    """The contract's ``event_store`` fixture: a sync view of the async store of each
    backend, its coroutines awaited on one loop."""

    @pytest.fixture
    def event_store(self, store_url: str) -> Iterator[Any]:
        with EventLoopThread() as loop:
            store = loop.view(incident.open_async_event_store(store_url))
            yield store
            store.close()


class TestAsyncEventStores(AsyncOnEveryBackend, EventStoreContract):
    """The public event store contract, on every backend's async store."""


class TestAsyncProjectionStores(AsyncOnEveryBackend, ProjectionStoreContract):
    """The public projection store contract, on every backend's async projection store."""
