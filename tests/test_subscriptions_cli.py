"""The CLI's subscription commands, on the durable stores (memory:// lives in one call)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from conftest import STORE_BACKENDS

import incident
import incident.ids
from incident.cli import main
from incident.examples import bank

DURABLE = sorted(name for name in STORE_BACKENDS if name != "memory")


@pytest.fixture(params=DURABLE)
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield STORE_BACKENDS[request.param](tmp_path, request)


def test_replay_rebuilds_a_handlers_read_models(durable_url: str) -> None:
    """`incident replay URL --handler module:object` fixes a damaged read model."""
    app = bank.build(durable_url)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=70))
    row = app.projection_store.get(bank.BankAccount, "A")
    assert row is not None
    app.projection_store.project(msgspec.structs.replace(row, balance=0, version=99))

    result = CliRunner().invoke(
        main, ["replay", durable_url, "--handler", "incident.examples.bank:bank_projections"]
    )
    assert result.exit_code == 0, result.output
    assert "rebuilt 1 BankAccount up to position 2" in result.output
    fixed = app.projection_store.get(bank.BankAccount, "A")
    assert fixed is not None and (fixed.balance, fixed.version) == (70, 2)
    app.event_store.close()


def test_subscriptions_lists_checkpoints_lag_and_parked_events(durable_url: str) -> None:
    app = bank.build(durable_url, subscriptions=True)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.subscriptions["bank_projections"].catch_up()
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5))
    checkpoints = incident.stores.checkpoint_store_for(app.event_store)
    checkpoints.park(
        incident.Parked(
            handler="money_transfer",
            position=2,
            event_id="e",
            aggregate_id="A",
            event_type="MoneyDeposited",
            error="RuntimeError: boom",
            attempts=4,
            parked_at=incident.ids.utc_now(),
        )
    )
    result = CliRunner().invoke(main, ["subscriptions", durable_url, "--parked"])
    assert result.exit_code == 0, result.output
    cells = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in result.output.splitlines()
        if line.startswith("│")
    ]
    # handler, checkpoint, lag, parked
    assert ["bank_projections", "1", "1", "0"] in cells, result.output
    assert ["money_transfer", "0", "2", "1"] in cells, result.output
    assert "RuntimeError:" in result.output  # the parked event's error
    app.event_store.close()


def test_replay_refuses_a_handler_that_is_not_one() -> None:
    result = CliRunner().invoke(
        main, ["replay", "memory://", "--handler", "incident.examples.bank:build"]
    )
    assert result.exit_code != 0
    assert "not a EventHandler" in result.output


def test_retry_handles_parked_events_again(durable_url: str) -> None:
    """`incident retry URL --handler module:object` empties the dead letters it can."""
    app = bank.build(durable_url, subscriptions=True)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    checkpoints = incident.stores.checkpoint_store_for(app.event_store)
    [recorded] = app.event_store.get("A")
    park_for(app, "bank_projections", recorded, "RuntimeError: a bug since fixed")
    result = CliRunner().invoke(
        main, ["retry", durable_url, "--handler", "incident.examples.bank:bank_projections"]
    )
    assert result.exit_code == 0, result.output
    assert "1 of 1 parked events handled" in result.output
    assert checkpoints.parked() == []
    assert app.projection_store.get(bank.BankAccount, "A") is not None
    app.event_store.close()


def park_for(
    app: incident.CommandHandler,
    handler: str,
    recorded: incident.Recorded[object],
    error: str,
) -> None:
    """Park one event by hand: failed (4 tries), or held (0) when the error says so; and
    move the handler's checkpoint past it, as the runner's batch does with it."""
    checkpoints = incident.stores.checkpoint_store_for(app.event_store)
    checkpoints.park(
        incident.Parked(
            handler=handler,
            position=recorded.position,
            event_id=recorded.event_id,
            aggregate_id=recorded.aggregate_id,
            event_type=recorded.event_type,
            error=error,
            attempts=0 if error.startswith("held behind") else 4,
            parked_at=recorded.event_date,
        )
    )
    if checkpoints.load(handler) < recorded.position:
        checkpoints.reset(handler, recorded.position)


def a_parked_stream(durable_url: str) -> incident.CommandHandler:
    """Account A: opened (handled), a deposit that failed, a deposit held behind it."""
    app = bank.build(durable_url, subscriptions=True)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=5))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=7))
    _, failed, held = app.event_store.get("A")
    park_for(app, "bank_projections", failed, "RuntimeError: boom")
    park_for(app, "bank_projections", held, "held behind #2 (RuntimeError: boom)")
    return app


def table_cells(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.splitlines()
        if line.startswith("│")
    ]


def test_subscriptions_shows_held_entries_apart_from_failed_ones(durable_url: str) -> None:
    """`incident subscriptions URL --parked` counts held entries and marks each entry
    failed (with its tries) or held."""
    app = a_parked_stream(durable_url)
    result = CliRunner().invoke(
        main, ["subscriptions", durable_url, "--parked"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    cells = table_cells(result.output)
    assert ["bank_projections", "3", "0", "2 (1 held)"] in cells, result.output
    states = {row[1]: row[4] for row in cells if len(row) == 6}
    assert states == {"2": "4 tries", "3": "held"}, result.output
    assert "held behind #2" in result.output
    app.event_store.close()


def test_retry_handles_a_stream_in_order(durable_url: str) -> None:
    """`incident retry` handles the failed event, then the one held behind it."""
    app = a_parked_stream(durable_url)
    result = CliRunner().invoke(
        main, ["retry", durable_url, "--handler", "incident.examples.bank:bank_projections"]
    )
    assert result.exit_code == 0, result.output
    assert "2 of 2 parked events handled" in result.output
    row = app.projection_store.get(bank.BankAccount, "A")
    assert row is not None and (row.balance, row.version) == (12, 3)
    app.event_store.close()


def test_retry_skip_drops_an_event_and_retries_the_ones_behind_it(durable_url: str) -> None:
    """`incident retry --skip POSITION` drops that dead letter unhandled, then retries the
    rest; a position that is not parked is refused."""
    app = a_parked_stream(durable_url)
    handler = ["--handler", "incident.examples.bank:bank_projections"]
    refused = CliRunner().invoke(main, ["retry", durable_url, *handler, "--skip", "1"])
    assert refused.exit_code != 0
    assert "#1 is not parked" in refused.output

    result = CliRunner().invoke(main, ["retry", durable_url, *handler, "--skip", "2"])
    assert result.exit_code == 0, result.output
    assert "skipped #2 MoneyDeposited unhandled" in result.output
    assert "1 of 1 parked events handled" in result.output
    assert incident.stores.checkpoint_store_for(app.event_store).parked() == []
    row = app.projection_store.get(bank.BankAccount, "A")  # made from the state: 5 + 7
    assert row is not None and (row.balance, row.version) == (12, 3)
    app.event_store.close()


def test_owed_follow_ups_are_listed_and_completed_from_the_shell(durable_url: str) -> None:
    """A crash right after a transfer was requested leaves its follow-ups owed:
    `incident subscriptions` lists them, and `incident retry --inline` (with all the
    application's inline handlers) completes the transfer once."""
    app = incident.CommandHandler(
        durable_url,
        aggregates=[bank.bank_account, bank.transfer],
        event_handlers=[bank.bank_projections],  # the process did not run: as after a crash
    )
    for account in ("A", "B"):
        app.dispatch(bank.OpenAccount(aggregate_id=account))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=100))
    [requested] = app.dispatch(
        bank.RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=30
        )
    )
    app.event_store.owe(
        incident.Owed(
            handler="money_transfer",
            position=requested.position,
            event_id=requested.event_id,
            aggregate_id="T1",
            event_type="TransferRequested",
            owed_at=requested.event_date,
        )
    )
    runner = CliRunner()
    listed = runner.invoke(main, ["subscriptions", durable_url, "--parked"])
    assert listed.exit_code == 0, listed.output
    assert "owed follow-ups" in listed.output and "money_transfer" in listed.output

    inline = ["--inline", "incident.examples.bank:bank_projections"]
    inline += ["--inline", "incident.examples.bank:money_transfer"]
    done = runner.invoke(main, ["retry", durable_url, *inline])
    assert done.exit_code == 0, done.output
    assert "1 of 1 owed follow-ups completed" in done.output
    again = runner.invoke(main, ["retry", durable_url, *inline])
    assert "0 of 0 owed follow-ups completed" in again.output
    assert app.event_store.owed() == []
    assert [r.event_type for r in app.event_store.get("T1")][-1] == "TransferCompleted"
    row = app.projection_store.get(bank.BankAccount, "B")
    assert row is not None and row.balance == 30
    app.event_store.close()


def test_retry_needs_a_subscription_or_inline_handlers(durable_url: str) -> None:
    """`incident retry URL` alone says what it needs."""
    result = CliRunner().invoke(main, ["retry", durable_url])
    assert result.exit_code == 2
    assert "--handler" in result.output and "--inline" in result.output


@pytest.mark.parametrize("concurrency", ["0", "-2", "many"])
def test_subscribe_refuses_a_bad_concurrency_before_opening_the_store(
    tmp_path: Path, concurrency: str
) -> None:
    """`incident subscribe --concurrency N` takes an int of at least 1; anything else is
    a usage error naming the option, and no database is created."""
    url = f"sqlite:///{tmp_path / 'never.db'}"
    handler = "incident.examples.bank:money_transfer"
    arguments = ["subscribe", url, "--handler", handler, "--concurrency", concurrency]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, result.output
    assert "--concurrency" in result.output
    assert not (tmp_path / "never.db").exists()
