"""The `incident` command: init, demo, events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import incident
from incident.cli import main
from incident.examples import bank


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_init_says_what_it_did_then_that_nothing_is_left(runner: CliRunner, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    first = runner.invoke(main, ["init", url])
    assert first.exit_code == 0, first.output
    assert "created table events" in first.output
    again = runner.invoke(main, ["init", url])
    assert again.exit_code == 0
    assert "nothing to do" in again.output


def test_demo_runs_twice_on_one_file(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default store is a file in the working directory; a second run carries on."""
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = runner.invoke(main, ["demo"])
        assert result.exit_code == 0, result.output
        assert "completed" in result.output
        assert "no_enough_balance" in result.output
    store = incident.open_event_store("sqlite:///incident-demo.db")
    log = list(store.read_all())
    assert [r.position for r in log] == list(range(1, len(log) + 1))
    assert sum(r.event_type == "TransferCompleted" for r in log) == 2
    store.close()


def test_events_shows_a_stream_and_a_correlation(runner: CliRunner, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bank.db'}"
    app = bank.build(url)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    app.dispatch(bank.OpenAccount(aggregate_id="B"))
    app.dispatch(bank.DepositMoney(aggregate_id="A", amount=50))
    story = app.dispatch(
        bank.RequestTransfer(
            aggregate_id="T1", source_account_number="A", destination_account_number="B", amount=5
        )
    )
    app.event_store.close()

    stream = runner.invoke(main, ["events", url, "--stream", "T1"], env={"COLUMNS": "200"})
    assert stream.exit_code == 0, stream.output
    assert "(3 events)" in stream.output
    assert "TransferCompleted" in stream.output
    assert "MoneyDeposited" not in stream.output

    correlation = story[0].metadata["correlation_id"]
    whole = runner.invoke(
        main, ["events", url, "--correlation", correlation], env={"COLUMNS": "200"}
    )
    assert "(5 events)" in whole.output
    assert "MoneySent" in whole.output and "MoneyReceived" in whole.output


def test_a_bad_url_is_a_clear_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["events", "nowhere"])
    assert result.exit_code != 0
    assert "Not a store URL" in result.output


def test_python_dash_m_incident_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "incident", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout and "events" in result.stdout


def test_events_follow_prints_each_later_event_of_its_stream_until_interrupted(
    initialized_url: str,
) -> None:
    """`events --follow`: the table, then one line per new event of the stream as it
    commits (from another process: this one), none of another stream, none twice; Ctrl-C
    ends it cleanly."""
    import queue
    import signal
    import threading

    app = bank.build(initialized_url)
    app.dispatch(bank.OpenAccount(aggregate_id="A"))
    command = [sys.executable, "-m", "incident", "events", initialized_url, "--stream", "A", "-f"]
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout or []]).start()

    printed: list[str] = []

    def line_with(text: str) -> str:
        while True:
            printed.append(lines.get(timeout=60))
            if text in printed[-1]:
                return printed[-1]

    try:
        line_with("AccountOpened")  # the table has been printed: the tail is on
        app.dispatch(bank.OpenAccount(aggregate_id="B"))
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=7))
        app.dispatch(bank.DepositMoney(aggregate_id="A", amount=8))
        first, second = line_with("MoneyDeposited"), line_with("MoneyDeposited")
        assert first.split()[:3] == ["3", "bank_account/A", "2"] and "amount=7" in first
        assert second.split()[:3] == ["4", "bank_account/A", "3"] and "amount=8" in second
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=60) == 0
        app.close()
    while not lines.empty():
        printed.append(lines.get())
    assert not [line for line in printed if "bank_account/B" in line]
    assert sum("MoneyDeposited" in line for line in printed) == 2


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        (["events", "{db}", "--limit", "-1"], "Invalid value for '--limit'"),
        (["events", "{db}", "--import", ""], "Cannot import ''"),
        (["retry", "{db}", "--handler", "nope:x"], "Cannot load 'nope:x'"),
        (["events", "postgresql://postgres@[::1/test"], "Postgres URL"),
        (["serve", "--store", "bogus://x"], "bogus"),
        (["serve", "--store", "{db}", "--port", "99999"], "Invalid value for '--port'"),
    ],
)
def test_bad_arguments_are_one_line_errors_not_tracebacks(
    runner: CliRunner, tmp_path: Path, arguments: list[str], says: str
) -> None:
    db = f"sqlite:///{tmp_path / 'bank.db'}"
    bank.build(db).event_store.close()  # a store that is there
    result = runner.invoke(main, [a.format(db=db) for a in arguments])
    assert result.exit_code != 0
    assert says in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("command", ["replay", "retry"])
def test_rebuilding_or_retrying_a_mistyped_path_creates_nothing(
    runner: CliRunner, tmp_path: Path, command: str
) -> None:
    missing = tmp_path / "mistyped.db"
    handler = ["--handler", "incident.examples.bank:bank_projections"]
    result = runner.invoke(main, [command, f"sqlite:///{missing}", *handler])
    assert result.exit_code != 0
    assert "no such store" in result.output
    assert not missing.exists()
