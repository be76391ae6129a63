"""The store contract: the tests every event, projection and checkpoint store passes.

Memory, SQLite and Postgres run these very tests (``tests/test_store_contract.py`` and
``tests/test_checkpoint_contract.py``); a store of your own runs them by subclassing, in
a test module of yours::

    from incident.stores import MemoryEventStore
    from incident.testing.contract import StoreContract

    class TestMyStore(StoreContract):
        def make_event_store(self):
            return MemoryEventStore()  # your store: fresh and empty each time

``StoreContract`` is the three suites together. Each is a class of its own too
(:class:`EventStoreContract`, :class:`ProjectionStoreContract`,
:class:`CheckpointStoreContract`), for a backend that has only some of the stores. The
tests take the fixtures of :class:`StoreFixtures`: ``event_store`` (from
``make_event_store()``, closed after the test), ``projection_store`` (its
``projections()``) and ``checkpoint_store`` (its ``checkpoints()``); a backend whose
stores need other fixtures (a temporary directory, a server) or stand alone overrides
these fixtures in its subclass instead.

This package needs pytest and hypothesis (``pip install 'incident[dev]'``, or both by
hand): it is imported by test modules only, never by incident itself. pytest rewrites
the assertions of test modules alone; for detailed failure messages from these, call
``pytest.register_assert_rewrite("incident.testing.contract")`` in your ``conftest.py``.
"""

from .arguments import ArgumentsContract
from .checkpoint_store import CheckpointStoreContract
from .event_store import EventStoreContract
from .fixtures import StoreFixtures
from .projection_store import ProjectionStoreContract

__all__ = [
    "ArgumentsContract",
    "CheckpointStoreContract",
    "EventStoreContract",
    "ProjectionStoreContract",
    "StoreContract",
    "StoreFixtures",
]


class StoreContract(EventStoreContract, ProjectionStoreContract, CheckpointStoreContract):
    """The event, projection and checkpoint store contracts at once, for a backend whose
    event store makes the other two (``projections()``, ``checkpoints()``). Subclass it
    and define ``make_event_store()``."""
