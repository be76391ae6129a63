"""Durable subscriptions on the AsyncCommandHandler
(incident/command_handler/async_subscriptions.py): the Bank's read models and transfer
process run as subscriptions of an async handler, caught up on demand or as running
tasks, on every store; their checkpoints hold and their commands run once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import incident
from incident.examples import bank

HANDLERS = [bank.bank_projections, bank.money_transfer]


def async_bank(url: str, **options: Any) -> incident.AsyncCommandHandler:
    return incident.AsyncCommandHandler(
        url, aggregates=[bank.bank_account, bank.transfer], subscriptions=HANDLERS, **options
    )


async def open_and_fund(app: incident.AsyncCommandHandler) -> None:
    for account in ("A", "B"):
        await app.dispatch(bank.OpenAccount(aggregate_id=account))
    await app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
    await app.dispatch(
        bank.RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=30
        )
    )


def test_catching_up_runs_the_read_models_and_the_transfer_process(store_url: str) -> None:
    async def main() -> None:
        async with async_bank(store_url) as app:
            await open_and_fund(app)
            # nothing ran inline: the transfer waits for its process
            assert await app.projection_store.get(bank.BankAccount, "B") is None
            assert await app.subscriptions.catch_up() > 0
            b = await app.projection_store.get(bank.BankAccount, "B")
            transfer = await app.projection_store.get(bank.Transfer, "T1")
            assert b is not None and b.balance == 30
            assert transfer is not None and transfer.status == "completed"
            assert (await app.state("bank_account", "A")).balance == 70
            again = await app.subscriptions.catch_up()
            assert again == 0  # checkpoints hold: nothing is handled twice
            checkpoints = app.subscriptions["money_transfer"].checkpoints
            assert checkpoints.load("money_transfer") == await app.event_store.last_position()

    asyncio.run(main())


def test_started_subscriptions_run_as_tasks_and_stop_with_the_handler(store_url: str) -> None:
    async def main() -> None:
        async with async_bank(store_url) as app:
            await app.subscriptions.start()
            await open_and_fund(app)
            await app.subscriptions.wait_until_caught_up(timeout=60)
            transfer = await app.projection_store.get(bank.Transfer, "T1")
            assert transfer is not None and transfer.status == "completed"
            log = [r.event_type async for r in app.event_store.read_all()]
            assert log.count("TransferCompleted") == 1 and log.count("MoneyReceived") == 1
        assert not app.subscriptions._tasks  # close() stopped them

    asyncio.run(main())


def test_a_restarted_handler_carries_on_from_its_checkpoints(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'bank.db'}"

    async def main() -> None:
        async with async_bank(url) as app:
            await open_and_fund(app)
            await app.subscriptions.catch_up()
        async with async_bank(url) as again:
            assert await again.subscriptions.catch_up() == 0
            await again.dispatch(bank.DepositMoney(aggregate_id="B", amount=5))
            assert await again.subscriptions.catch_up() > 0
            b = await again.projection_store.get(bank.BankAccount, "B")
            assert b is not None and b.balance == 35
            log = [r.event_type async for r in again.event_store.read_all()]
            assert log.count("MoneySent") == 1  # the transfer process ran once in all

    asyncio.run(main())


def test_follow_ups_need_the_handlers_loop() -> None:
    app = async_bank("memory://")
    subscription = app.subscriptions["money_transfer"]
    with pytest.raises(RuntimeError, match="from its loop"):
        subscription.command_handler.follow_up("money_transfer", None, [("x", [])])  # type: ignore[arg-type]
