"""The connections a Postgres event store LISTENs on, for subscriptions waiting for appends."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from incident.examples import bank

pytestmark = pytest.mark.postgres


def listening(admin: psycopg.Connection[tuple[object, ...]], url: str) -> int:
    """How many sessions LISTEN on the store's channel."""
    schema = parse_qs(urlsplit(url).query)["schema"][0]
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query = %s",
        [f'LISTEN "incident_events:{schema}"'],
    ).fetchone()
    return int(row[0]) if row else 0


def test_restarted_subscriptions_do_not_pile_up_listen_connections(
    postgres_url: str, postgres_admin: psycopg.Connection[tuple[object, ...]]
) -> None:
    """Subscriptions stopped and started again five times hold no more LISTEN sessions
    than one run of them: a stopped subscription's thread gives its connection back."""
    app = bank.build(postgres_url, subscriptions=True)
    try:
        for number in range(5):
            with app.subscriptions:
                app.dispatch(bank.OpenAccount(aggregate_id=f"ACC{number}"))
                app.subscriptions.wait_until_caught_up(timeout=10)
        assert listening(postgres_admin, postgres_url) <= len(app.subscriptions)
    finally:
        app.event_store.close()
    # a closed connection's backend leaves pg_stat_activity a moment after the client
    # hangs up: wait for it (bounded), the count must still reach 0
    deadline = time.monotonic() + 10
    while listening(postgres_admin, postgres_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listening(postgres_admin, postgres_url) == 0
