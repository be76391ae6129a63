"""The layout of incident's tables in an SQLite file, and how a file an earlier release
wrote is brought to it.

A fresh file gets ``LAYOUT`` at once, recorded as ``SCHEMA_VERSION``; a file made by an
earlier release takes the ``MIGRATIONS`` steps after its recorded version, in the caller's
one ``BEGIN IMMEDIATE`` transaction (``Database.migrate``), so a failed migration leaves
the file as it was. A file whose version is newer than this release knows is refused.
Everything here is a function of one connection; when to run it is the database's call.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Callable

from ...errors import StoreError
from .sql import (
    EVENT_COLUMNS,
    EVENTS_TABLE,
    IDEMPOTENCY_TABLE,
    IDEMPOTENCY_TABLE_2,
    LAST_POSITION,
    OWED_TABLE,
    RECORD_VERSION,
    RECORDED_VERSION,
    SCHEMA_TABLE,
    TABLE_EXISTS,
    date_text,
)

__all__ = ["LAYOUT", "MIGRATIONS", "SCHEMA_VERSION", "schema_version", "upgrade"]

# the package's logger, the one docs/sqlite.md names
log = logging.getLogger("incident.stores.sqlite")

ANNOUNCED_REBUILD = 100_000  # events: a copy long enough to wonder about says so first


def _rebuild_events(conn: sqlite3.Connection) -> str:
    """Copy the log into the layout of version 3, whose only index is the streams' one.

    Every index is a page written at each commit; the log is read by position (the
    primary key) and streams by ``UNIQUE (aggregate_id, version)``, so the unique index
    on event_id (ids are random UUIDs, made by incident) and events_by_type (no incident
    query reads by type) cost commits and serve nothing. SQLite cannot drop a UNIQUE
    constraint in place, so the table is copied, inside the migration's transaction:
    it is rebuilt whole or not at all. Indexes and triggers users added are kept."""
    (events,) = conn.execute(LAST_POSITION).fetchone()
    if events >= ANNOUNCED_REBUILD:
        log.warning(
            "incident: migrating the SQLite event log to schema version 3 copies its %d "
            "events once (about 10 s per million); the file stays as it was until it is done",
            events,
        )
    kept = [
        sql
        for (sql,) in conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'events' "
            "AND type IN ('index', 'trigger') AND sql IS NOT NULL AND name != 'events_by_type'"
        )
    ]
    conn.execute(EVENTS_TABLE.replace("CREATE TABLE events", "CREATE TABLE incident_events_v3"))
    copied = conn.execute(
        f"INSERT INTO incident_events_v3 ({EVENT_COLUMNS}) "
        f"SELECT {EVENT_COLUMNS} FROM events ORDER BY position"
    ).rowcount
    conn.execute("DROP TABLE events")
    # legacy rename: users' views that read events would otherwise fail the renaming,
    # since SQLite checks the whole schema while the old table is gone
    conn.execute("PRAGMA legacy_alter_table = ON")
    try:
        conn.execute("ALTER TABLE incident_events_v3 RENAME TO events")
    finally:
        conn.execute("PRAGMA legacy_alter_table = OFF")
    for sql in kept:
        conn.execute(sql)
    return f"rebuilt table events with one index instead of three ({copied} events copied)"


# A fresh file gets the current layout at once, recorded as SCHEMA_VERSION.
LAYOUT: list[tuple[str, str]] = [
    ("created table events", EVENTS_TABLE),
    ("created table incident_idempotency", IDEMPOTENCY_TABLE),
    ("created table incident_owed", OWED_TABLE),
]
# A file made by an earlier release takes the steps after its version, in order: a step
# is (what it does, a statement), or a function of the connection that says what it
# did. A later release changes LAYOUT and appends the step that brings older files to it.
Step = tuple[str, str] | Callable[[sqlite3.Connection], str]
MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (1, "the event log", []),  # the first release's layout: no older file to bring to it
    (2, "idempotency keys", [("created table incident_idempotency", IDEMPOTENCY_TABLE_2)]),
    (3, "one index on events", [_rebuild_events]),
    (
        4,
        "remembered rejections and owed follow-ups",
        [
            (
                "added column incident_idempotency.rejected",
                "ALTER TABLE incident_idempotency ADD COLUMN rejected TEXT",
            ),
            (
                "added column incident_idempotency.detail",
                "ALTER TABLE incident_idempotency ADD COLUMN detail TEXT",
            ),
            ("created table incident_owed", OWED_TABLE),
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: sqlite3.Connection) -> int | None:
    """The recorded layout version, or None when the file has no incident tables."""
    exists = conn.execute(TABLE_EXISTS, ("incident_schema",)).fetchone()
    if exists is None:
        return None
    version: int = conn.execute(RECORDED_VERSION).fetchone()[0]
    return version


def upgrade(conn: sqlite3.Connection, path: str) -> list[str]:
    """Inside the caller's write transaction: give the file of ``path`` the current layout,
    from nothing or from the version it records; returns one line per step taken."""
    current = schema_version(conn)
    if current is not None and current > SCHEMA_VERSION:
        raise StoreError(
            f"{path!r} has schema version {current}, but this incident knows "
            f"versions up to {SCHEMA_VERSION}; upgrade incident to use it"
        )
    if current is None:
        return _create_layout(conn)
    return _migrate_from(conn, current)


def _create_layout(conn: sqlite3.Connection) -> list[str]:
    conn.execute(SCHEMA_TABLE)
    lines = ["created table incident_schema"]
    for line, statement in LAYOUT:
        conn.execute(statement)
        lines.append(line)
    return [*lines, _record(conn, SCHEMA_VERSION, "the event log")]


def _migrate_from(conn: sqlite3.Connection, current: int) -> list[str]:
    lines = []
    for version, description, steps in MIGRATIONS:
        if version <= current:
            continue
        for step in steps:
            if callable(step):
                lines.append(step(conn))
            else:
                line, statement = step
                conn.execute(statement)
                lines.append(line)
        lines.append(_record(conn, version, description))
    return lines


def _record(conn: sqlite3.Connection, version: int, description: str) -> str:
    conn.execute(RECORD_VERSION, (version, description, date_text(dt.datetime.now(dt.UTC))))
    return f"recorded schema version {version} ({description})"
