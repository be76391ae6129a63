"""Shared fixtures: every store backend the suite runs on, as URLs.

Each backend adds itself to STORE_BACKENDS; tests that take ``store_url`` run once per
backend. Postgres needs INCIDENT_TEST_POSTGRES_URL: without it the Postgres cases skip
with a visible reason, except under CI (CI=true), where they fail instead.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import incident
from incident.examples import bank

# backend name -> a function (tmp_path, request) -> store URL that is fresh for one test
StoreFactory = Callable[[Path, pytest.FixtureRequest], str]


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return "memory://"


def _postgres(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh schema of its own in the test database, dropped after the test, so tests
    (and engineers) sharing one server never see each other's rows."""
    server = postgres_server()
    schema = f"incident_test_{uuid.uuid4().hex[:12]}"
    request.addfinalizer(functools.partial(_drop_schema, server, schema))
    return f"{server}{'&' if '?' in server else '?'}schema={schema}"


STORE_BACKENDS: dict[str, StoreFactory] = {
    "memory": _memory,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(STORE_BACKENDS))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming a fresh, empty database on each backend in turn."""
    yield STORE_BACKENDS[request.param](tmp_path, request)


@pytest.fixture
def event_store(store_url: str) -> Iterator[incident.EventStore]:
    store = incident.open_event_store(store_url)
    # Stores that decode by name resolve unregistered names to the Event class defined
    # last; other tests (the README's) define their own MoneyDeposited, so say which.
    store.types.register(*bank.bank_account.event_types, *bank.transfer.event_types)
    yield store
    store.close()


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


@pytest.fixture
def postgres_admin() -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit psycopg connection to the test server, for inspecting and
    killing the store's backends."""
    with psycopg.connect(postgres_server(), autocommit=True) as conn:
        yield conn
