"""The event store's statements, driver-free: plain strings, rendered once per store with
the quoted names of its schema's tables, and the parameters of the rows they write."""

from __future__ import annotations

import uuid
from typing import Any

from ...messages import Event, Recorded
from .._common import OWED_COLUMNS

# how an encoded event's payload opens: the fold page query checks each row's tag by it
PAYLOAD_OPENING = f'{{"{Event.__struct_config__.tag_field}":"'
# incident.mapper's envelope columns (ENVELOPE_COLUMNS) as Postgres hands them over as
# text, then the stream's id
_EVENT_COLUMNS = (
    "position, version, event_type, data::text, event_id::text, event_date, metadata::text,"
    " aggregate, schema_version, aggregate_id"
)


class EventStatements:
    """The statements of one schema's event store: the schema is the only variable, and
    its table names come quoted by psycopg (``Database.table(name).as_string()``), so
    every statement is a plain string, built once."""

    def __init__(
        self, events: str, keys: str, owed: str, begin_append: str, append_numbered: str
    ) -> None:
        self.insert = (
            f"INSERT INTO {events} (position, event_id, aggregate_id, aggregate, version,"
            " event_type, schema_version, event_date, data, metadata)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::json, %s::json)"
        )
        # an append the database numbers (append_numbered): a row's position is the
        # base it left in incident.base plus the row's place in the append
        base = "current_setting('incident.base')::bigint + %s"
        self.insert_numbered = self.insert.replace("VALUES (%s,", f"VALUES ({base},", 1)
        self.append_numbered = f"SELECT {append_numbered}(%s, %s, %s, %s, %s, %s)"
        self.heads = (
            f"SELECT (SELECT coalesce(max(version), 0) FROM {events} WHERE aggregate_id = %s),"
            f" (SELECT coalesce(max(position), 0) FROM {events})"
        )
        self.last_position = f"SELECT coalesce(max(position), 0) FROM {events}"
        # a batch's heads, one row per stream: the log's last position and its version
        self.heads_of = (
            f"SELECT (SELECT coalesce(max(position), 0) FROM {events}), stream,"
            f" (SELECT coalesce(max(version), 0) FROM {events} WHERE aggregate_id = stream)"
            " FROM unnest(%s::text[]) AS streams (stream)"
        )
        self.by_ids = (
            f"SELECT {_EVENT_COLUMNS} FROM {events} WHERE event_id = ANY(%s::uuid[])"
            " ORDER BY position"
        )
        self.begin_append = f"SELECT {begin_append}(%s, %s, %s, %s, %s, %s, %s)"
        self.version = f"SELECT coalesce(max(version), 0) FROM {events} WHERE aggregate_id = %s"
        select = f"SELECT {_EVENT_COLUMNS} FROM {events}"
        self.stream = f"{select} WHERE aggregate_id = %s AND version > %s ORDER BY version"
        self.stream_page = f"{self.stream} LIMIT %s"
        self.page = f"{select} WHERE position > %s ORDER BY position LIMIT %s"
        self.span = f"{select} WHERE position BETWEEN %s AND %s ORDER BY position"
        # one page of a stream for a fold: its payloads joined in version order, with
        # what proves it whole (the row count and last version, for a gapless run; how
        # many are at the first schema version and open with their row's type as the tag;
        # whether the stream goes on past the page); a page short of any goes row by row
        self.joined = (
            "SELECT string_agg(data::text, ',' ORDER BY version), count(*), max(version),"
            " count(*) FILTER (WHERE schema_version = 1"
            " AND starts_with(data::text, %s || event_type || '\"')),"
            f" EXISTS (SELECT 1 FROM {events} WHERE aggregate_id = %s AND version > %s)"
            f" FROM {events} WHERE aggregate_id = %s AND version > %s AND version <= %s"
        )
        self.payloads = (  # incident.mapper's PAYLOAD_COLUMNS
            f"SELECT position, version, event_type, schema_version, data::text FROM {events}"
            " WHERE aggregate_id = %s AND version > %s ORDER BY version LIMIT %s"
        )
        self.key = (
            f"SELECT first_position, last_position, rejected, detail FROM {keys} WHERE key = %s"
        )
        self.remember_key = (
            f"INSERT INTO {keys} (key, first_position, last_position) VALUES (%s, %s, %s)"
        )
        self.remember_key_numbered = (
            f"INSERT INTO {keys} (key, first_position, last_position)"
            f" VALUES (%s, {base.replace('%s', '1')}, {base})"
        )
        self.remember_rejection = (
            f"INSERT INTO {keys} (key, first_position, last_position, rejected, detail)"
            " VALUES (%s, 0, 0, %s, %s) ON CONFLICT (key) DO NOTHING"
        )
        columns = OWED_COLUMNS.replace("event_id", "event_id::text")
        self.owe = (
            f"INSERT INTO {owed} ({OWED_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (handler, position) DO UPDATE SET error = excluded.error,"
            " attempts = excluded.attempts"
        )
        # OWED_COLUMNS' second is the position (Owed's field order)
        self.owe_numbered = self.owe.replace("VALUES (%s, %s,", f"VALUES (%s, {base},", 1)
        self.owed = f"SELECT {columns} FROM {owed} ORDER BY position, handler"
        self.owed_by = f"SELECT {columns} FROM {owed} WHERE handler = %s ORDER BY position"
        self.settle = f"DELETE FROM {owed} WHERE handler = %s AND position = %s"


def event_row(recorded: Recorded[Any], payload: str, metadata_text: str) -> tuple[Any, ...]:
    """The parameters of ``EventStatements.insert``, in its column order."""
    return (
        recorded.position,
        uuid.UUID(recorded.event_id),
        recorded.aggregate_id,
        recorded.aggregate,
        recorded.version,
        recorded.event_type,
        getattr(type(recorded.data), "schema_version", 1),
        recorded.event_date,
        payload,
        metadata_text,
    )
