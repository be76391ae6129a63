"""Shared fixtures: every store backend the suite runs on, as URLs.

Each backend adds itself to STORE_BACKENDS; tests that take ``store_url`` run once per
backend. Postgres needs INCIDENT_TEST_POSTGRES_URL: without it the Postgres cases skip
with a visible reason, except under CI (CI=true), where they fail instead.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

import incident
from incident.stores.postgres import split_url
from incident.stores.sqlite import sqlite_path

# the public store contract's failed assertions are explained as a test module's are
# (the hook must run before the test modules import it)
pytest.register_assert_rewrite("incident.testing.contract")

# backend name -> a function (tmp_path, request) -> store URL that is fresh for one test
StoreFactory = Callable[[Path, pytest.FixtureRequest], str]


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return "memory://"


def _sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def _postgres(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh schema of its own in the test database, dropped after the test, so tests
    (and engineers) sharing one server never see each other's rows."""
    server = postgres_server()
    schema = f"incident_test_{uuid.uuid4().hex[:12]}"
    request.addfinalizer(functools.partial(_drop_schema, server, schema))
    return f"{server}{'&' if '?' in server else '?'}schema={schema}"


STORE_BACKENDS: dict[str, StoreFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
}


class RawEvent(msgspec.Struct, kw_only=True):
    """An event row as the database holds it, written behind the store's back."""

    position: int
    aggregate_id: str
    version: int
    event_type: str
    data: str
    aggregate: str = "bank_account"
    metadata: str = "{}"


# backend name -> a function (store URL, row) that inserts the row directly into the event
# table (which initialize() has created), to test how stores read bad data. Backends
# without raw rows leave themselves out.
RawEventWriter = Callable[[str, RawEvent], None]


def _write_sqlite_row(url: str, row: RawEvent) -> None:
    with closing(sqlite3.connect(sqlite_path(url))) as conn, conn:
        conn.execute(
            "INSERT INTO events (position, event_id, aggregate_id, aggregate, version, "
            "event_type, event_date, data, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.position,
                str(uuid.uuid4()),
                row.aggregate_id,
                row.aggregate,
                row.version,
                row.event_type,
                dt.datetime.now(dt.UTC).isoformat(),
                row.data,
                row.metadata,
            ),
        )


def _write_postgres_row(url: str, row: RawEvent) -> None:
    try:
        msgspec.json.decode(row.data)
    except msgspec.DecodeError:
        raise AssertionError(
            "a json column cannot hold invalid JSON: run this test on INVALID_JSON_BACKENDS"
        ) from None
    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".events (position, event_id, aggregate_id, aggregate,'
            " version, event_type, event_date, data, metadata)"
            " VALUES (%s, %s, %s, %s, %s, %s, now(), %s::json, %s::json)",
            (
                row.position,
                uuid.uuid4(),
                row.aggregate_id,
                row.aggregate,
                row.version,
                row.event_type,
                row.data,
                row.metadata,
            ),
        )


RAW_EVENT_WRITERS: dict[str, RawEventWriter] = {
    "sqlite": _write_sqlite_row,
    "postgres": _write_postgres_row,
}


# backend name -> a function (store URL, position, columns) that edits the event row at
# that position behind the store's back: sets the given columns, or deletes the row when
# columns is None (to test what reads make of damage)
RawEventEditor = Callable[[str, int, "dict[str, object] | None"], None]


def _edit_sqlite_row(url: str, position: int, columns: dict[str, object] | None) -> None:
    with closing(sqlite3.connect(sqlite_path(url))) as conn, conn:
        if columns is None:
            conn.execute("DELETE FROM events WHERE position = ?", (position,))
            return
        sets = ", ".join(f"{name} = ?" for name in columns)
        conn.execute(f"UPDATE events SET {sets} WHERE position = ?", (*columns.values(), position))


def _edit_postgres_row(url: str, position: int, columns: dict[str, object] | None) -> None:
    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if columns is None:
            conn.execute(f'DELETE FROM "{schema}".events WHERE position = %s', (position,))
            return
        sets = ", ".join(
            f"{name} = %s::json" if name in ("data", "metadata") else f"{name} = %s"
            for name in columns
        )
        conn.execute(
            f'UPDATE "{schema}".events SET {sets} WHERE position = %s',
            (*columns.values(), position),
        )


RAW_EVENT_EDITORS: dict[str, RawEventEditor] = {
    "sqlite": _edit_sqlite_row,
    "postgres": _edit_postgres_row,
}

# A test that applies to some backends only is generated for those only (a skip would
# hide, among the reasons, a test that was meant to run): mark it with one of these.
# Backends that keep rows a test can write behind the store's back (not memory's objects)
RAW_BACKENDS = sorted(RAW_EVENT_WRITERS)
# Backends whose event column can hold a payload that is not JSON (Postgres's json
# refuses it on write)
INVALID_JSON_BACKENDS = ["sqlite"]
# Backends that outlive a process: other processes, and later runs, open the same data
DURABLE_BACKENDS = sorted(name for name in STORE_BACKENDS if name != "memory")


def on_backends(names: list[str]) -> pytest.MarkDecorator:
    """Run a test taking ``store_url`` (directly or through ``event_store``) on these
    backends only."""
    return pytest.mark.parametrize("store_url", names, indirect=True)


@pytest.fixture(params=sorted(STORE_BACKENDS))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming a fresh, empty database on each backend in turn."""
    yield STORE_BACKENDS[request.param](tmp_path, request)


@pytest.fixture
def write_raw_event(request: pytest.FixtureRequest, store_url: str) -> Callable[[RawEvent], None]:
    """Writes a row straight into the current backend's event table (a test using it
    runs on RAW_BACKENDS: ``@on_backends(RAW_BACKENDS)``)."""
    backend = request.node.callspec.params["store_url"]
    writer = RAW_EVENT_WRITERS.get(backend)
    if writer is None:
        raise AssertionError(
            f"the {backend} store has no raw rows: mark the test @on_backends(RAW_BACKENDS)"
        )
    return lambda row: writer(store_url, row)


@pytest.fixture
def edit_raw_event(
    request: pytest.FixtureRequest, store_url: str
) -> Callable[[int, dict[str, object] | None], None]:
    """Edits (or, given None, deletes) the current backend's event row at a position,
    behind the store's back (a test using it runs on RAW_BACKENDS)."""
    backend = request.node.callspec.params["store_url"]
    editor = RAW_EVENT_EDITORS.get(backend)
    if editor is None:
        raise AssertionError(
            f"the {backend} store has no raw rows: mark the test @on_backends(RAW_BACKENDS)"
        )
    return lambda position, columns: editor(store_url, position, columns)


@pytest.fixture
def event_store(store_url: str) -> Iterator[incident.EventStore]:
    with closing(incident.open_event_store(store_url)) as store:
        yield store


class OnEveryBackend:
    """Mixed in before a class of ``incident.testing.contract``, runs that public suite
    on every backend: its ``event_store`` fixture becomes the one above, one per
    ``store_url``."""

    @pytest.fixture
    def event_store(self, store_url: str) -> Iterator[incident.EventStore]:
        with closing(incident.open_event_store(store_url)) as store:
            yield store


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@functools.cache
def _postgres_reachable() -> tuple[str | None, str]:
    url = os.environ.get("INCIDENT_TEST_POSTGRES_URL")
    if not url:
        return None, "INCIDENT_TEST_POSTGRES_URL is not set (see DEVELOPERS.md)"
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as error:
        return None, f"cannot reach INCIDENT_TEST_POSTGRES_URL={url}: {error}"
    return url, ""


def postgres_server() -> str:
    """The test server's URL; skips the test when there is none, fails it under CI."""
    url, reason = _postgres_reachable()
    if url is None:
        if running_under_ci():
            pytest.fail(f"Postgres is required under CI: {reason}", pytrace=False)
        pytest.skip(f"Postgres tests skipped: {reason}")
    return url


def _drop_schema(server: str, schema: str) -> None:
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A Postgres store URL naming a fresh schema (see ``_postgres``)."""
    return _postgres(tmp_path, request)


#: a plain autocommit connection to the test server (``postgres_admin``)
Admin = psycopg.Connection[tuple[Any, ...]]


@pytest.fixture
def postgres_admin() -> Iterator[Admin]:
    """A plain autocommit psycopg connection to the test server, for inspecting and
    killing the store's backends."""
    with psycopg.connect(postgres_server(), autocommit=True) as conn:
        yield conn


@pytest.fixture(params=DURABLE_BACKENDS)
def initialized_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store shared by processes (SQLite, Postgres), its event and subscription
    tables already made, so racing processes do not create them."""
    url = STORE_BACKENDS[request.param](tmp_path, request)
    store = incident.open_event_store(url)
    store.initialize()
    incident.stores.checkpoint_store_for(store).initialize()
    store.close()
    yield url


def kill_backends(admin: Admin, application_name: str, *, wait: float = 0) -> int:
    """Terminates the server sessions of stores opened with this ``application_name``
    (never ``admin``'s own), as a server restart or an operator would, and returns how
    many there were. With ``wait`` (seconds) each termination waits that long at most
    for the session to be gone (pg_terminate_backend's timeout), so the next call sees
    it dead; without, the kill lands while the store may still be mid-query."""
    rows = admin.execute(
        "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        [round(wait * 1000), application_name],
    ).fetchall()
    return len(rows)
