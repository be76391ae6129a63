"""Who closes what: a command handler closes the stores it opened, a checkpoint store
leaves the database it shares with its event store open."""

from __future__ import annotations

import threading

import pytest
from conftest import DURABLE_BACKENDS, on_backends

import incident
from incident.examples import bank


@on_backends(DURABLE_BACKENDS)  # a memory store has nothing to close
def test_close_closes_the_stores_the_handler_opened_from_urls(store_url: str) -> None:
    """A command handler made from URLs closes its event and projection stores."""
    app = incident.CommandHandler(store_url, store_url, aggregates=[bank.bank_account])
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.close()
    with pytest.raises(incident.StoreError):
        app.event_store.version("A")
    with pytest.raises(incident.StoreError):
        app.projection_store.get(bank.BankAccount, "A")
    app.close()  # closing twice is harmless


@on_backends(DURABLE_BACKENDS)
def test_stores_given_as_objects_stay_the_callers(store_url: str) -> None:
    """close() leaves open the stores it was given: their owner closes them."""
    store = incident.open_event_store(store_url)
    with incident.CommandHandler(store, aggregates=[bank.bank_account]) as app:
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
    assert store.version("A") == 1
    store.close()


@on_backends(DURABLE_BACKENDS)
def test_a_command_handler_is_a_context_manager(store_url: str) -> None:
    """`with CommandHandler(url) as app` closes what it opened on the way out, and stops
    its subscriptions first."""
    with bank.build(store_url, subscriptions=True) as app:
        before = set(threading.enumerate())
        app.subscriptions.start()
        running = set(threading.enumerate()) - before
        app.dispatch(bank.OpenAccount(aggregate_id="A"))
        app.subscriptions.wait_until_caught_up()
        assert running
    assert not any(thread.is_alive() for thread in running)
    with pytest.raises(incident.StoreError):
        app.event_store.version("A")


def test_closing_a_checkpoint_store_leaves_its_event_store_usable(store_url: str) -> None:
    """A checkpoint store from event_store.checkpoints() shares the event store's
    database; closing it (as a subscription finishing may) does not close that."""
    store = incident.open_event_store(store_url)
    checkpoints = incident.stores.checkpoint_store_for(store)
    checkpoints.save("reports", 0, expected=0)
    checkpoints.close()
    store.append("A", [bank.AccountOpened(account_number="A")], expected_version=0)
    assert [r.event_type for r in store.read_all()] == ["AccountOpened"]
    again = incident.stores.checkpoint_store_for(store)
    assert again.checkpoints() == {"reports": 0}
    store.close()
