"""The SQL the SQLite stores run on incident's own tables, as text: the layout's DDL, the
log's reads and writes, idempotency keys, owed follow-ups, checkpoints and parked events.

No driver here: the statements read in one place, and a test can ask SQLite for the plan
of one (``EXPLAIN QUERY PLAN``) without a store. A migration step's own statements stay
with the step in :mod:`incident.stores.sqlite.migrations`; the SQL of a projection's
table comes from its type (:mod:`incident.stores.sqlite.projection_tables`).
"""

from __future__ import annotations

import datetime as dt
import textwrap

from ...mapper import ENVELOPE_COLUMNS, PAYLOAD_COLUMNS
from ...messages import Event
from .._common import OWED_COLUMNS, PARKED_COLUMNS

# -- the layout ---------------------------------------------------------------------

EVENTS_TABLE = textwrap.dedent("""\
    CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        aggregate TEXT NOT NULL,
        version INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        schema_version INTEGER NOT NULL DEFAULT 1,
        event_date TEXT NOT NULL,
        data TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        UNIQUE (aggregate_id, version)
    )""")
# as migration 2 makes it; migration 4 adds the outcome of a rejected command
IDEMPOTENCY_TABLE_2 = textwrap.dedent("""\
    CREATE TABLE incident_idempotency (
        key TEXT PRIMARY KEY,
        first_position INTEGER NOT NULL,
        last_position INTEGER NOT NULL
    )""")
# a rejected command stored no events: its row keeps the reason, and positions 0, 0
IDEMPOTENCY_TABLE = textwrap.dedent("""\
    CREATE TABLE incident_idempotency (
        key TEXT PRIMARY KEY,
        first_position INTEGER NOT NULL,
        last_position INTEGER NOT NULL,
        rejected TEXT,
        detail TEXT
    )""")
OWED_TABLE = textwrap.dedent("""\
    CREATE TABLE incident_owed (
        handler TEXT NOT NULL,
        position INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        aggregate_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        error TEXT,
        attempts INTEGER NOT NULL,
        owed_at TEXT NOT NULL,
        PRIMARY KEY (handler, position)
    )""")
EVENT_COLUMNS = (
    "position, event_id, aggregate_id, aggregate, version, event_type, schema_version, "
    "event_date, data, metadata"
)

# the layout version a file has, one row per version it went through
SCHEMA_TABLE = (
    "CREATE TABLE incident_schema (version INTEGER PRIMARY KEY, "
    "description TEXT NOT NULL, applied_at TEXT NOT NULL)"
)
TABLE_EXISTS = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
RECORDED_VERSION = "SELECT coalesce(max(version), 0) FROM incident_schema"
RECORD_VERSION = "INSERT INTO incident_schema VALUES (?, ?, ?)"

# -- the log --------------------------------------------------------------------------

ENVELOPE = ENVELOPE_COLUMNS  # the column order incident.mapper reads envelopes in
INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
STREAM_VERSION = "SELECT coalesce(max(version), 0) FROM events WHERE aggregate_id = ?"
LAST_POSITION = "SELECT coalesce(max(position), 0) FROM events"
# inside the write lock: the stream's version and the log's last position, in one step
HEAD = f"SELECT ({STREAM_VERSION}), ({LAST_POSITION})"
STREAM = f"SELECT {ENVELOPE} FROM events WHERE aggregate_id = ? AND version > ? ORDER BY version"
# One batch of a stream's payloads for a fold, joined by commas in SQL (one Python string
# instead of one per row), with what proves the batch whole: how many rows there are and
# the last version (gapless exactly when it is the batch's ``after`` + that count), how
# many are at the first schema version and open with their row's type as the tag
# ({"type":"<event_type>"...), as an encoded event does, and whether the stream goes on
# past the batch (an empty batch before more rows is a hole, not the end). A batch short
# of any of these goes down the row-by-row path, which upcasts and names the damage. The
# WHERE pins the scan to the UNIQUE (aggregate_id, version) index, which SQLite walks in
# version order and feeds to the aggregate in that order (tests/test_sqlite.py checks it).
TAG_AT = len(f'{{"{Event.__struct_config__.tag_field}":"') + 1
JOINED = (
    "SELECT group_concat(data, ','), count(*), max(version), "
    "sum(schema_version = 1 AND instr(data, event_type || '\"') = ?1), "
    "EXISTS (SELECT 1 FROM events WHERE aggregate_id = ?2 AND version > ?4) "
    "FROM events WHERE aggregate_id = ?2 AND version > ?3 AND version <= ?4"
)
PAYLOADS = (
    f"SELECT {PAYLOAD_COLUMNS} FROM events "
    "WHERE aggregate_id = ? AND version > ? ORDER BY version LIMIT ?"
)
LOG_AFTER = (
    f"SELECT {ENVELOPE}, aggregate_id FROM events WHERE position > ? ORDER BY position LIMIT ?"
)
EVENT_ID_AT = "SELECT event_id FROM events WHERE position = ?"
LOG_BETWEEN = f"SELECT {ENVELOPE}, aggregate_id FROM events WHERE position BETWEEN ? AND ?"

# -- idempotency keys and owed follow-ups -----------------------------------------------

KEY_OUTCOME = (
    "SELECT first_position, last_position, rejected, detail FROM incident_idempotency WHERE key = ?"
)
ADD_KEY = "INSERT INTO incident_idempotency (key, first_position, last_position) VALUES (?, ?, ?)"
ADD_REJECTION = (
    "INSERT OR IGNORE INTO incident_idempotency (key, first_position, last_position, rejected,"
    " detail) VALUES (?, 0, 0, ?, ?)"
)
OWE = f"INSERT OR REPLACE INTO incident_owed ({OWED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
OWED = f"SELECT {OWED_COLUMNS} FROM incident_owed ORDER BY position, handler"
OWED_BY = f"SELECT {OWED_COLUMNS} FROM incident_owed WHERE handler = ? ORDER BY position"
SETTLE = "DELETE FROM incident_owed WHERE handler = ? AND position = ?"

# -- checkpoints and parked events --------------------------------------------------------

# (name, DDL): made on first use by the checkpoint store, not by the event log's layout
CHECKPOINT_TABLES = [
    (
        "incident_checkpoints",
        "CREATE TABLE incident_checkpoints ("
        " handler TEXT PRIMARY KEY, position INTEGER NOT NULL, updated_at TEXT NOT NULL)",
    ),
    (
        "incident_parked",
        "CREATE TABLE incident_parked ("
        " handler TEXT NOT NULL, position INTEGER NOT NULL, event_id TEXT NOT NULL,"
        " aggregate_id TEXT NOT NULL, event_type TEXT NOT NULL, error TEXT NOT NULL,"
        " attempts INTEGER NOT NULL, parked_at TEXT NOT NULL, PRIMARY KEY (handler, position))",
    ),
]
LOAD_CHECKPOINT = "SELECT position FROM incident_checkpoints WHERE handler = ?"
SAVE_CHECKPOINT = (
    "INSERT INTO incident_checkpoints (handler, position, updated_at) VALUES (?, ?, ?)"
    " ON CONFLICT (handler) DO UPDATE SET position = excluded.position,"
    " updated_at = excluded.updated_at"
)
CHECKPOINTS = "SELECT handler, position FROM incident_checkpoints"
PARK = f"INSERT OR REPLACE INTO incident_parked ({PARKED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
PARKED = (
    f"SELECT {PARKED_COLUMNS} FROM incident_parked WHERE ? IS NULL OR handler = ? "
    "ORDER BY handler, position"
)
UNPARK = "DELETE FROM incident_parked WHERE handler = ? AND position = ?"
UNPARK_ALL = "DELETE FROM incident_parked WHERE handler = ?"


def date_text(when: dt.datetime) -> str:
    """An instant as the text the log's date columns hold: UTC, to the microsecond, fixed
    width, so the text sorts like the instant it names."""
    if when.tzinfo is not dt.UTC:
        when = when.astimezone(dt.UTC)
    return when.isoformat(timespec="microseconds")
