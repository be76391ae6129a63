"""The whole Bank suite once more, with its handlers as subscriptions that handle every
event twice.

After each dispatch has caught up, every handler's checkpoint is rewound to where the
log stood before the dispatch and the subscriptions start over from there, as after a
crash just before the checkpoint was saved: everything the dispatch caused (the transfer
process's own commands included) is handled a second time. Projections must not move
and no command may decide twice, so the suite's assertions hold unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import test_bank

import incident
from incident.examples import bank
from incident.subscriptions import last_position

# Builds an app of its own (inline handlers, retries=3), so this fixture never runs there.
NOT_HERE = {"test_threads_hammering_one_account_never_run_out_of_retries"}

# the Bank suite's tests, collected here too, where `app` is the fixture below
globals().update(
    {
        name: test
        for name, test in vars(test_bank).items()
        if name.startswith("test_") and name not in NOT_HERE
    }
)


class Redelivery:
    """Wraps ``app.dispatch``: dispatch, run the subscriptions until they have caught
    up, rewind their checkpoints to the position before the dispatch, and run them again
    from there.

    The subscriptions run in the dispatching thread (``catch_up``), one thread at a
    time, each run on new Subscription objects that start from the stored checkpoints
    with nothing in memory, as a restarted process would.
    """

    def __init__(self, app: incident.CommandHandler) -> None:
        self.app = app
        self.dispatch = app.dispatch
        # (rewound to, the log's end, how many events the handlers read again)
        self.rewinds: list[tuple[int, int, int]] = []
        self._one_at_a_time = threading.Lock()
        self._running = threading.local()  # set while this thread runs the subscriptions
        app.dispatch = self._dispatch_twice  # type: ignore[method-assign]

    def _dispatch_twice(self, command: incident.Command, metadata: Any = None) -> Any:
        if getattr(self._running, "now", False):
            # the transfer process dispatching, inside a run: part of what is redelivered
            return self.dispatch(command, metadata)
        before = last_position(self.app.event_store)
        try:
            return self.dispatch(command, metadata)
        finally:
            with self._one_at_a_time:  # a test's threads take turns at running them
                self._run_subscriptions()
                for subscription in self.app.subscriptions.values():
                    subscription.checkpoints.reset(subscription.name, before)
                again = self._run_subscriptions()
                self.rewinds.append((before, last_position(self.app.event_store), again))

    def _run_subscriptions(self) -> int:
        fresh = incident.Subscriptions(
            incident.Subscription(s.handler, self.app, checkpoints=s.checkpoints)
            for s in self.app.subscriptions.values()
        )
        self._running.now = True
        try:
            return fresh.catch_up()
        finally:
            self._running.now = False


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    handler = bank.build(store_url, subscriptions=True)
    Redelivery(handler)
    yield handler
    handler.event_store.close()


def test_every_event_a_dispatch_caused_is_handled_again(store_url: str) -> None:
    """The fixture's own check: after each dispatch the handlers were rewound past all
    the events it caused and caught up again, and a transfer still ran once."""
    handler = bank.build(store_url, subscriptions=True)
    redelivery = Redelivery(handler)
    test_bank.open_with(handler, "A", 100)
    test_bank.open_with(handler, "B")
    handler.dispatch(
        bank.RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=7
        )
    )
    # each handler read each event again: the transfer's five (Requested, Sent,
    # Initiated, Received, Completed) too, and they caused nothing new
    assert redelivery.rewinds == [(0, 1, 2), (1, 2, 2), (2, 3, 2), (3, 8, 10)]
    checkpoints = incident.stores.checkpoint_store_for(handler.event_store)
    assert {name: checkpoints.load(name) for name in handler.subscriptions} == {
        "bank_projections": 8,
        "money_transfer": 8,
    }
    assert test_bank.account(handler, "B").balance == 7
    handler.event_store.close()
