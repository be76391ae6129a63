"""The CLI's read-only commands read what is there, as the user's code would read it,
and create nothing; user modules are found in the current directory."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from conftest import postgres_server

import incident
from incident.cli import main
from incident.stores.postgres import split_url as _split_url

WIDE = {"COLUMNS": "200"}

ROOMS_V2 = '''
from typing import ClassVar

import incident


class Booked(incident.Event, tag="rooms.Booked"):
    """Version 2: version 1 called the guest `name`."""

    schema_version: ClassVar[int] = 2
    guest: str


class Book(incident.Command):
    aggregate_id: str
    guest: str


room = incident.Aggregate("room", initial=())


@room.execute
def book(state: tuple[str, ...], cmd: Book) -> Booked:
    return Booked(guest=cmd.guest)


@room.apply
def booked(state: tuple[str, ...], event: Booked) -> tuple[str, ...]:
    return (*state, event.guest)


@room.upcast(Booked, 1)
def name_to_guest(payload: dict) -> dict:
    return {"guest": payload.pop("name"), **payload}
'''


class OldBooked(incident.Event, tag="rooms.Booked"):
    """What the release before wrote (schema version 1)."""

    name: str


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The current directory is a fresh one; sys.path is restored after, and the
    modules the test wrote are forgotten."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("rooms_v2", "hotel"):
        sys.modules.pop(name, None)


def _rows(output: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.splitlines()
        if line.startswith("│")
    ]


# -- --import: the module's types and upcasters ----------------------------------------


def test_events_upcasts_with_the_imported_modules_upcasters(in_tmp: Path) -> None:
    """Events stored at an old schema version are shown in today's shape through the
    upcasters the --import'ed module's Aggregates register, as a CommandHandler would."""
    (in_tmp / "rooms_v2.py").write_text(ROOMS_V2)
    url = f"sqlite:///{in_tmp / 'rooms.db'}"
    old = incident.open_event_store(url)
    old.append("R101", [OldBooked(name="ann")], expected_version=0, aggregate="room")
    old.close()

    result = CliRunner().invoke(main, ["events", url, "--import", "rooms_v2"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "guest=ann" in result.output


# -- modules in the current directory -------------------------------------------------


def test_modules_are_imported_from_the_current_directory(in_tmp: Path) -> None:
    """As with `python -m`, a module beside the user is found though the installed
    script's own directory, not the current one, starts sys.path."""
    (in_tmp / "hotel.py").write_text(ROOMS_V2)
    here = os.getcwd()
    sys.path[:] = [entry for entry in sys.path if entry not in ("", here)]
    url = f"sqlite:///{in_tmp / 'hotel.db'}"
    incident.open_event_store(url).initialize()

    result = CliRunner().invoke(main, ["events", url, "--import", "hotel"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "Cannot import" not in result.output


# -- --stream, and --aggregate as its old name -----------------------------------------


def test_stream_shows_one_stream_and_aggregate_still_works_with_a_note(in_tmp: Path) -> None:
    """--stream ID names the stream; --aggregate ID, its old name, still works and says
    on stderr, in one line, that it is deprecated."""
    url = f"sqlite:///{in_tmp / 'two.db'}"
    store = incident.open_event_store(url)
    store.append("R1", [OldBooked(name="ann")], expected_version=0)
    store.append("R2", [OldBooked(name="bob")], expected_version=0)
    store.close()

    runner = CliRunner()
    stream = runner.invoke(main, ["events", url, "--stream", "R2"], env=WIDE)
    assert stream.exit_code == 0, stream.output
    assert [row[1] for row in _rows(stream.stdout)] == ["R2"]
    assert stream.stderr == ""

    old = runner.invoke(main, ["events", url, "--aggregate", "R2"], env=WIDE)
    assert old.exit_code == 0, old.output
    assert [row[1] for row in _rows(old.stdout)] == ["R2"]
    assert old.stderr.count("\n") == 1 and "--aggregate is deprecated" in old.stderr
    assert "--aggregate" not in runner.invoke(main, ["events", "--help"]).output


# -- reading creates nothing -----------------------------------------------------------


@pytest.mark.parametrize("command", ["events", "subscriptions"])
def test_a_missing_sqlite_file_is_no_such_store_and_is_not_created(
    in_tmp: Path, command: str
) -> None:
    """A mistyped path is an error naming it, not an empty store made on the spot."""
    missing = in_tmp / "mistyped.db"
    result = CliRunner().invoke(main, [command, f"sqlite:///{missing}"])
    assert result.exit_code != 0
    assert f"no such store: {missing}" in result.output
    assert list(in_tmp.iterdir()) == []


@pytest.mark.parametrize("command", ["events", "subscriptions"])
def test_an_sqlite_file_without_the_tables_is_no_such_store_and_stays_empty(
    in_tmp: Path, command: str
) -> None:
    """A file that holds no event log (another program's, or an empty one) is refused,
    and no table is added to it."""
    path = in_tmp / "other.db"
    sqlite3.connect(path).close()
    result = CliRunner().invoke(main, [command, f"sqlite:///{path}"])
    assert result.exit_code != 0
    assert "no such store" in result.output and "incident init" in result.output
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_subscriptions_of_a_store_no_subscription_ran_on_creates_no_tables(
    in_tmp: Path,
) -> None:
    """An event log without the subscription tables lists no subscriptions, and gets no
    tables from being looked at."""
    path = in_tmp / "log.db"
    store = incident.open_event_store(f"sqlite:///{path}")
    store.append("R1", [OldBooked(name="ann")], expected_version=0)
    store.close()
    result = CliRunner().invoke(main, ["subscriptions", f"sqlite:///{path}"])
    assert result.exit_code == 0, result.output
    assert "log at position 1" in result.output
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert "incident_checkpoints" not in tables


def _schema_exists(url: str) -> bool:
    conninfo, schema = _split_url(url)
    with psycopg.connect(conninfo) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema])
        return found.fetchone() is not None


@pytest.mark.parametrize("command", ["events", "subscriptions"])
def test_a_missing_postgres_schema_is_no_such_store_and_is_not_created(
    postgres_url: str, command: str
) -> None:
    """A mistyped schema is an error naming it; nothing is created on the server."""
    result = CliRunner().invoke(main, [command, postgres_url])
    assert result.exit_code != 0
    assert "no such store: there is no schema" in result.output
    assert not _schema_exists(postgres_url)


@pytest.mark.parametrize("command", ["events", "subscriptions"])
def test_a_postgres_schema_without_the_tables_is_no_such_store(
    postgres_url: str, command: str
) -> None:
    """A schema that holds no event log is refused, and no table is made in it."""
    conninfo, schema = _split_url(postgres_url)
    with psycopg.connect(postgres_server(), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    result = CliRunner().invoke(main, [command, postgres_url])
    assert result.exit_code != 0
    assert "no such store" in result.output and "no events table" in result.output
    with psycopg.connect(conninfo) as conn:
        tables = conn.execute("SELECT 1 FROM pg_tables WHERE schemaname = %s", [schema])
        assert tables.fetchall() == []


def test_subscriptions_on_a_postgres_log_without_subscription_tables_creates_none(
    postgres_url: str,
) -> None:
    """On Postgres too, looking at the subscriptions of a bare event log adds nothing."""
    store = incident.open_event_store(postgres_url)
    store.append("R1", [OldBooked(name="ann")], expected_version=0)
    store.close()
    result = CliRunner().invoke(main, ["subscriptions", postgres_url])
    assert result.exit_code == 0, result.output
    conninfo, schema = _split_url(postgres_url)
    with psycopg.connect(conninfo) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'incident_checkpoints'",
            [schema],
        )
        assert found.fetchone() is None
