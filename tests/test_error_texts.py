"""What a store keeps of an error (a parked event's, owed work's) is text every store
can keep: an exception whose message holds a NUL or a lone surrogate (bytes decoded
with ``surrogateescape``, a C library's buffer) is parked or kept owed like any other,
with those characters escaped, instead of failing the save that records it (on
Postgres every time, so the subscription never got past the event)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import incident
from incident.examples import bank
from incident.examples.bank import AccountOpened, AccountState
from incident.storable import error_text

ODD = "bad\x00byte \udcff end"


@pytest.fixture
def app(store_url: str) -> Iterator[incident.CommandHandler]:
    application = incident.CommandHandler(store_url, aggregates=[bank.bank_account, bank.transfer])
    yield application
    application.event_store.close()


def test_an_error_text_escapes_what_no_store_keeps() -> None:
    assert error_text(ValueError(ODD)) == "ValueError: bad\\x00byte \\udcff end"
    assert error_text(KeyError("plain")) == "KeyError: 'plain'"


def test_a_listener_error_no_store_could_keep_as_it_is_parks_its_event(
    app: incident.CommandHandler,
) -> None:
    handler = incident.EventHandler("odd")

    @handler.listen(AccountOpened)
    def fails(recorded: incident.Recorded[Any], state: AccountState) -> None:
        if recorded.aggregate_id == "B":
            raise ValueError(ODD)

    for number in "ABC":
        app.dispatch(bank.OpenAccount(aggregate_id=number))
    subscription = incident.Subscription(handler, app, backoff=0, retries=0)
    assert subscription.catch_up() == 3
    assert subscription.position == 3
    [parked] = subscription.parked()
    assert parked.position == 2
    assert parked.error == "ValueError: bad\\x00byte \\udcff end"


def test_owed_work_whose_error_no_store_could_keep_stays_owed_with_it(
    event_store: incident.EventStore,
) -> None:
    """A follow-up that fails with such a message stays owed, its error kept escaped."""
    failing = incident.EventHandler("odd_follow_up")

    @failing.listen(bank.MoneySent)
    def fail(recorded: incident.Recorded[Any], state: Any) -> None:
        raise ValueError(ODD)

    app = incident.CommandHandler(
        event_store,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections, bank.money_transfer, failing],
    )
    for account in ("A", "B"):
        app.dispatch(bank.OpenAccount(aggregate_id=account))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
    request = bank.RequestTransfer(
        aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=30
    )
    with pytest.raises(incident.FollowUpFailed):
        app.dispatch(request)
    assert app.complete_owed() == []  # fails again: its error is recorded this time
    (owed,) = event_store.owed()
    assert owed.attempts == 2
    assert owed.error == "ValueError: bad\\x00byte \\udcff end"
