"""The fixtures the contract's tests take, and the one hook most backends define."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest

from ...stores import CheckpointStore, EventStore, ProjectionStore, checkpoint_store_for

__all__ = ["StoreFixtures"]


class StoreFixtures:
    """The stores a contract test runs against, each fresh and empty for one test.

    The defaults derive everything from :meth:`make_event_store`. Override a fixture
    (same name, in the subclass) when a store needs other fixtures or stands alone: the
    contract's tests only ever ask for these three.
    """

    def make_event_store(self) -> EventStore:
        """A new, empty event store (its database unused by any other test)."""
        raise NotImplementedError(
            f"{type(self).__name__} runs the store contract: define make_event_store(), "
            "or override the event_store fixture"
        )

    @pytest.fixture
    def event_store(self) -> Iterator[EventStore]:
        """The store of :meth:`make_event_store`, closed after the test."""
        with closing(self.make_event_store()) as store:
            yield store

    @pytest.fixture
    def projection_store(self, event_store: EventStore) -> ProjectionStore:
        """The event store's own projection store (closed with it)."""
        return event_store.projections()

    @pytest.fixture
    def checkpoint_store(self, event_store: EventStore) -> Iterator[CheckpointStore]:
        """The event store's own checkpoint store, closed after the test."""
        with closing(checkpoint_store_for(event_store)) as store:
            yield store
