"""Store URLs that cannot name a usable store are refused when the store is opened, with
the URL parser's typed error, before anything connects or is created: malformed URLs on
every backend, and Postgres schemas that Postgres would truncate, default or keeps for
itself. A schema it can keep works end to end, its NOTIFY channel included."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import Admin, postgres_server
from psycopg import sql

import incident
from incident.examples import bank
from incident.stores.postgres.notify import MAX_NAME_BYTES, channel_for

# nothing listens there: a store that tried to connect would fail, not be refused
NOWHERE = "postgresql://nobody@127.0.0.1:1/none"


@pytest.mark.parametrize(
    ("url", "error", "says"),
    [
        ("sqlite:///tmp/a\x00b.db", incident.IncidentError, "cannot hold a NUL"),
        ("sqlite://[::1/x.db", incident.IncidentError, "Not an SQLite URL"),
        ("postgresql://[::1/test", incident.InvalidArgument, "Not a usable Postgres URL"),
        (f"{NOWHERE}?nosuch=1", incident.InvalidArgument, "Not a usable Postgres URL"),
    ],
)
def test_a_malformed_url_is_a_typed_error(url: str, error: type[Exception], says: str) -> None:
    """A NUL in an SQLite path and an unclosed IPv6 bracket used to leak a bare
    ValueError: they are the parser's own error for a bad URL of that backend. A URL
    libpq cannot use is the caller's to fix (InvalidArgument), not a StoreError, which
    says to try again once the database is back."""
    with pytest.raises(error, match=says) as refused:
        incident.open_event_store(url)
    assert isinstance(refused.value, incident.IncidentError)
    assert not isinstance(refused.value, incident.StoreError)
    with pytest.raises(error, match=says):
        incident.open_async_event_store(url)


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        (NOWHERE, {"bogus": 1}, "do not take these options"),
        (NOWHERE, {"timeout": 0}, "timeout must be a number of seconds > 0"),
        (NOWHERE, {"timeout": float("nan")}, "timeout must be a number of seconds > 0"),
        (NOWHERE, {"pool_size": 2.5}, "pool_size must be an int >= 1"),
        ("memory://", {"bogus": 1}, "takes no path or options"),
        ("sqlite:///{tmp}/x.db", {"bogus": 1}, "Unknown SQLite store options"),
        ("sqlite:///{tmp}/x.db", {"timeout": -5}, "timeout must be a number of seconds >= 0"),
        ("sqlite:///{tmp}/x.db?timeout=nan", {}, "timeout must be a number of seconds >= 0"),
        ("sqlite:///{tmp}/x.db", {"timeout": None}, "timeout and lock_poll are seconds"),
    ],
)
def test_an_option_no_store_takes_is_an_incident_error_before_anything_opens(
    url: str, options: dict[str, object], says: str, tmp_path: Path
) -> None:
    """A misspelt option or a meaningless number is refused as the caller's mistake
    (an IncidentError, not a TypeError from inside a driver), and no file is made."""
    url = url.format(tmp=tmp_path)
    with pytest.raises(incident.IncidentError, match=says):
        incident.open_event_store(url, **options)
    assert list(tmp_path.iterdir()) == []


LONG = "incident_test_" + "x" * 50  # 64 bytes


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ("", "is empty"),
        (LONG, "64 bytes long; Postgres keeps names of at most 63 bytes"),
        ("é" * 32, "64 bytes long"),  # bytes, not characters, are what Postgres counts
        ("a%00b", "control character"),
        ("pg_catalog", "system schema"),
        ("pg_toast", "system schema"),
        ("pg_mine", "system schema"),  # Postgres refuses to create any pg_ schema
        ("information_schema", "system schema"),
    ],
)
def test_a_schema_postgres_cannot_keep_is_refused_before_connecting(schema: str, says: str) -> None:
    """An empty ?schema= used to mean public, a long one was truncated by Postgres (two
    long names shared one schema), and the system schemas were taken: all are refused
    at open, in the URL or as the option, before a connection is tried."""
    with pytest.raises(incident.IncidentError, match=says):
        incident.open_event_store(f"{NOWHERE}?schema={schema}")
    if "%" not in schema:
        with pytest.raises(incident.IncidentError, match=says):
            incident.open_event_store(NOWHERE, schema=schema)


def test_every_schema_has_a_channel_postgres_can_keep() -> None:
    """The channel appends NOTIFY is unchanged for a schema it fits beside (processes
    of earlier releases listen there), and a digest of the schema beyond, so it never
    passes Postgres's 63 bytes and two long schemas never share one."""
    assert channel_for("bank") == "incident_events:bank"
    fits = "s" * (MAX_NAME_BYTES - len("incident_events:"))
    assert channel_for(fits) == f"incident_events:{fits}"
    longer = [fits + "t", "s" * 62 + "a", "s" * 62 + "b", "é" * 31]
    channels = {channel_for(schema) for schema in longer}
    assert len(channels) == len(longer)
    assert all(len(c.encode()) <= MAX_NAME_BYTES for c in channels)


def fresh_schema(request: pytest.FixtureRequest, size: int) -> str:
    """A schema name of ``size`` bytes of this test's own, dropped after it."""
    schema = f"incident_test_{uuid.uuid4().hex[:12]}".ljust(size, "x")
    request.addfinalizer(lambda: drop_schemas_named(schema[:MAX_NAME_BYTES]))
    return schema


def drop_schemas_named(prefix: str) -> None:
    """Drops the schemas that start with ``prefix`` (a test's own, unique one)."""
    with psycopg.connect(postgres_server(), autocommit=True) as conn:
        for (name,) in created(conn, prefix):
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def created(conn: Admin, prefix: str) -> list[tuple[str]]:
    query = "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, %s)"
    return conn.execute(query, [prefix]).fetchall()


@pytest.mark.postgres
def test_two_long_schemas_never_share_one(
    request: pytest.FixtureRequest, postgres_admin: Admin
) -> None:
    """Two names alike in their first 63 bytes were one schema to Postgres, made with
    the tables before the first append failed ("channel name too long"): now both are
    refused and nothing is created."""
    common = fresh_schema(request, MAX_NAME_BYTES)
    for schema in (f"{common}_one", f"{common}_two"):
        with pytest.raises(incident.IncidentError, match="at most 63 bytes"):
            store = incident.open_event_store(f"{postgres_server()}?schema={schema}")
            try:
                store.append("A", [bank.MoneyDeposited(amount=1)], expected_version=0)
            finally:
                store.close()
    assert created(postgres_admin, common) == []


@pytest.mark.postgres
def test_a_schema_of_63_bytes_works_end_to_end(request: pytest.FixtureRequest) -> None:
    """The longest schema Postgres keeps takes appends (their NOTIFY channel used to be
    too long for pg_notify), and its tail is woken by another store's append."""
    schema = fresh_schema(request, MAX_NAME_BYTES)
    url = f"{postgres_server()}?schema={schema}"
    reader, writer = incident.open_event_store(url), incident.open_event_store(url)
    reader.initialize()
    woken: list[float] = []

    def wait() -> None:
        start = time.monotonic()
        if reader.wait_for_append(0, 30):  # type: ignore[attr-defined]
            woken.append(time.monotonic() - start)

    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    time.sleep(0.5)  # listening by now
    writer.append("A", [bank.MoneyDeposited(amount=1)], expected_version=0)
    waiting.join(30)
    assert woken and woken[0] < 10, "the NOTIFY did not reach the listener"
    assert [r.data for r in reader.get("A")] == [bank.MoneyDeposited(amount=1)]
    reader.close()
    writer.close()
