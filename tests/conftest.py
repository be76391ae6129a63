"""Shared fixtures: every store backend the suite runs on, as URLs.

Each backend adds itself to STORE_BACKENDS; tests that take ``store_url`` run once per
backend. Postgres needs INCIDENT_TEST_POSTGRES_URL: without it the Postgres cases skip
with a visible reason, except under CI (CI=true), where they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import incident

# backend name -> a function (tmp_path, request) -> store URL that is fresh for one test
StoreFactory = Callable[[Path, pytest.FixtureRequest], str]


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return "memory://"


STORE_BACKENDS: dict[str, StoreFactory] = {"memory": _memory}


@pytest.fixture(params=sorted(STORE_BACKENDS))
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL naming a fresh, empty database on each backend in turn."""
    yield STORE_BACKENDS[request.param](tmp_path, request)


@pytest.fixture
def event_store(store_url: str) -> Iterator[incident.EventStore]:
    store = incident.open_event_store(store_url)
    yield store
    store.close()


def running_under_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}
