"""Owed follow-ups on the async handler: the scenarios of tests/test_processes.py
(a follow-up that fails stays owed; a retry of the root or complete_owed() finishes it,
nothing runs twice), run unchanged on an AsyncCommandHandler over each async store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_processes as processes

import incident
from incident.examples import bank
from incident.testing.asynchronous import EventLoopThread

SCENARIOS = [
    processes.test_a_failed_follow_up_stays_owed_and_a_retry_of_the_root_completes_it,
    processes.test_owed_work_is_completed_after_a_restart_and_nothing_runs_twice,
]


@pytest.fixture
def async_store(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A sync view of the backend's async store; the scenarios' command handlers become
    AsyncCommandHandlers on it, driven through the same loop."""
    with EventLoopThread() as loop:
        view = loop.view(incident.open_async_event_store(store_url))

        def inline_bank(store: Any, outage: processes.Outage) -> Any:
            handlers = [bank.bank_projections, bank.money_transfer, outage.handler]
            aggregates = [bank.bank_account, bank.transfer]
            app = incident.AsyncCommandHandler(
                store.target, aggregates=aggregates, event_handlers=handlers
            )
            return loop.view(app)

        monkeypatch.setattr(processes, "inline_bank", inline_bank)
        yield view
        view.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_on_the_async_handler(scenario: Callable[[Any], None], async_store: Any) -> None:
    scenario(async_store)
