"""The whole Bank suite again, with the Bank's handlers run as durable subscriptions.

Each dispatch waits until the subscriptions have caught up with everything it caused
(read-your-writes), so the suite's assertions hold unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import test_bank

import incident
from incident.examples import bank

# the Bank suite's tests, collected here too, where `app` is the fixture below
globals().update({name: test for name, test in vars(test_bank).items() if name.startswith("test_")})


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    handler = bank.build(store_url, subscriptions=True)
    dispatch = handler.dispatch

    def dispatch_and_wait(command: incident.Command, metadata: Any = None) -> Any:
        try:
            return dispatch(command, metadata)
        finally:
            # the transfer process dispatches too, from its own thread: it must not wait
            if not threading.current_thread().name.startswith("incident-subscription-"):
                handler.subscriptions.wait_until_caught_up(timeout=60)

    handler.dispatch = dispatch_and_wait  # type: ignore[method-assign]
    with handler.subscriptions:
        yield handler
    handler.event_store.close()
