"""The schema's migrations and how they run: the tables and the ``begin_append`` function
each one adds or changes, applied in order, each once, recorded in
``incident_migrations``. A new migration is one more entry at the end of MIGRATIONS."""

from __future__ import annotations

from psycopg import sql

from .session import Connection, fetch_value, log


def _append_numbered(replace: str, lock: str) -> str:
    """The body of append_numbered (0006, and 0007's version, which differs in how it
    takes the lock), for migrations to create or replace."""
    return _APPEND_NUMBERED.replace("{replace}", replace).replace("{lock}", lock)


# append_numbered, with a placeholder for how the lock is taken (see 0006 and 0007)
_APPEND_NUMBERED = """
            CREATE {replace}FUNCTION {schema}.append_numbered(
                append_lock bigint, stream text, stream_version integer, wanted_key text,
                channel text, count integer
            ) RETURNS bigint LANGUAGE plpgsql AS $$
            DECLARE
                actual integer;
                last bigint;
            BEGIN
{lock}                SELECT coalesce(max(version), 0) INTO actual FROM {schema}.events
                    WHERE aggregate_id = stream;
                IF actual <> stream_version THEN
                    RAISE EXCEPTION 'stream % is at version %', stream, actual
                        USING ERRCODE = 'IN409', DETAIL = actual::text;
                END IF;
                IF EXISTS (SELECT 1 FROM {schema}.idempotency_keys WHERE key = wanted_key) THEN
                    RAISE EXCEPTION 'idempotency key % was used', wanted_key
                        USING ERRCODE = 'IN411';
                END IF;
                SELECT coalesce(max(position), 0) INTO last FROM {schema}.events;
                PERFORM set_config('incident.base', last::text, true);
                PERFORM pg_notify(channel, (last + count)::text);
                RETURN last;
            END
            $$
            """

# how 0006's append_numbered takes the lock, and 0007's (see 0007)
_LOCK_WAITING = """
                PERFORM pg_advisory_xact_lock(append_lock);
"""

_LOCK_SYNC_WHEN_ALONE = """
                IF NOT pg_try_advisory_xact_lock(append_lock) THEN
                    PERFORM pg_advisory_xact_lock(append_lock);
                    PERFORM set_config('synchronous_commit', 'off', true);
                    PERFORM set_config('incident.unflushed', 'on', false);
                END IF;
"""


# name, what it does (printed by `incident init`), statements ({schema} is filled in)
MIGRATIONS: list[tuple[str, str, list[str]]] = [
    (
        "0001_events",
        "the events table, unique per (aggregate_id, version), indexed for stream reads",
        [
            """
            CREATE TABLE {schema}.events (
                position bigint PRIMARY KEY,
                event_id uuid NOT NULL CONSTRAINT events_event_id UNIQUE,
                aggregate_id text NOT NULL,
                aggregate text NOT NULL,
                version integer NOT NULL CHECK (version > 0),
                event_type text NOT NULL,
                schema_version integer NOT NULL DEFAULT 1,
                event_date timestamptz NOT NULL,
                data jsonb NOT NULL,
                metadata jsonb NOT NULL DEFAULT '{{}}',
                CONSTRAINT events_stream_version UNIQUE (aggregate_id, version)
            )
            """,
        ],
    ),
    (
        "0002_idempotency_keys",
        "the idempotency keys table: which positions each keyed command stored",
        [
            """
            CREATE TABLE {schema}.idempotency_keys (
                key text PRIMARY KEY,
                first_position bigint NOT NULL,
                last_position bigint NOT NULL
            )
            """,
        ],
    ),
    (
        "0003_begin_append",
        "a function that starts an append with predicted heads, so it takes one round trip",
        [
            # Each query in a volatile function takes its own snapshot, so the checks
            # below, made once the lock is granted, see every append committed before.
            """
            CREATE FUNCTION {schema}.begin_append(
                append_lock bigint, stream text, stream_version integer,
                last_position bigint, wanted_key text, channel text, new_last_position text
            ) RETURNS void LANGUAGE plpgsql AS $$
            DECLARE
                actual integer;
            BEGIN
                PERFORM pg_advisory_xact_lock(append_lock);
                IF (SELECT coalesce(max(position), 0) FROM {schema}.events) <> last_position
                THEN
                    RAISE EXCEPTION 'another writer appended' USING ERRCODE = 'IN410';
                END IF;
                SELECT coalesce(max(version), 0) INTO actual FROM {schema}.events
                    WHERE aggregate_id = stream;
                IF actual <> stream_version THEN
                    RAISE EXCEPTION 'stream % is at version %', stream, actual
                        USING ERRCODE = 'IN409', DETAIL = actual::text;
                END IF;
                IF EXISTS (SELECT 1 FROM {schema}.idempotency_keys WHERE key = wanted_key) THEN
                    RAISE EXCEPTION 'idempotency key % was used', wanted_key
                        USING ERRCODE = 'IN411';
                END IF;
                PERFORM pg_notify(channel, new_last_position);
            END
            $$
            """,
        ],
    ),
    (
        "0004_json_payloads",
        "events keep data and metadata as json, the text incident wrote, which reads back"
        " without jsonb's conversion to text",
        [
            # jsonb is rebuilt into text on every read; json is stored as written and
            # still checked on the way in.
            """
            ALTER TABLE {schema}.events
                ALTER COLUMN data TYPE json USING data::json,
                ALTER COLUMN metadata DROP DEFAULT,
                ALTER COLUMN metadata TYPE json USING metadata::json,
                ALTER COLUMN metadata SET DEFAULT '{{}}'
            """,
        ],
    ),
    (
        "0005_outcomes_and_owed_work",
        "idempotency keys remember rejections; the owed follow-ups of inline handlers",
        [
            # a rejected command stored no events: its row keeps the reason, positions 0
            """
            ALTER TABLE {schema}.idempotency_keys
                ADD COLUMN rejected text,
                ADD COLUMN detail text
            """,
            """
            CREATE TABLE {schema}.incident_owed (
                handler text NOT NULL,
                position bigint NOT NULL,
                event_id uuid NOT NULL,
                aggregate_id text NOT NULL,
                event_type text NOT NULL,
                error text,
                attempts integer NOT NULL,
                owed_at timestamptz NOT NULL,
                PRIMARY KEY (handler, position)
            )
            """,
        ],
    ),
    (
        "0006_numbered_appends",
        "a function that numbers an append in the database, so the append lock is held"
        " for one server-side step whoever else is writing",
        [
            # Like begin_append, but it reads the last position under the lock instead of
            # checking a guess, and leaves it in incident.base for the rows that follow
            # in the same transaction (position = base + their place in the append).
            _append_numbered("", _LOCK_WAITING),
        ],
    ),
    (
        "0007_sync_when_alone",
        "an append the lock did not keep waiting commits synchronously (one fsync, as a"
        " bare insert); one that waited commits without waiting for its flush",
        [
            # Alone, holding the lock through the fsync costs nobody anything, and one
            # synchronous commit is one fsync. Behind another append, the commit is made
            # asynchronous (the lock is freed once the commit record is written) and
            # incident.unflushed tells the statement sent after COMMIT to flush it
            # (durability.FLUSH_IF_WAITED). Both settings roll back with a failed append.
            _append_numbered("OR REPLACE ", _LOCK_SYNC_WHEN_ALONE),
        ],
    ),
]
# a migration that rewrites the events table says so first when the log is this long
ANNOUNCED_REWRITE = 100_000
REWRITES_EVENTS = {"0004_json_payloads"}
# what begin_append raises: a conflict (its detail is the stream's version), another
# writer's append (the locked path appends), a used key (the locked path says so)
STREAM_MOVED, LOG_MOVED, KEY_USED = "IN409", "IN410", "IN411"


def migrate(conn: Connection, schema_name: str) -> list[str]:
    """Inside the caller's transaction, holding the schema's migration lock: create the
    schema and the migrations table when missing, then apply the migrations not recorded
    there, in order. Returns what it did, a line each (``incident init`` prints them)."""
    done: list[str] = []
    schema = sql.Identifier(schema_name)
    migrations = sql.Identifier(schema_name, "incident_migrations")
    if not fetch_value(
        conn, "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %s)", schema_name
    ):
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        done.append(f"created schema {schema_name}")
    if fetch_value(conn, "SELECT to_regclass(%s)", migrations.as_string(conn)) is None:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (name text PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(migrations)
        )
        done.append(f"created table {schema_name}.incident_migrations")
    applied = {name for (name,) in conn.execute(sql.SQL("SELECT name FROM {}").format(migrations))}
    for name, description, statements in MIGRATIONS:
        if name in applied:
            continue
        if name in REWRITES_EVENTS:
            _announce_rewrite(conn, schema_name, name)
        for statement in statements:
            conn.execute(sql.SQL(statement.strip()).format(schema=schema))
        conn.execute(
            sql.SQL("INSERT INTO {} (name, description) VALUES (%s, %s)").format(migrations),
            [name, description],
        )
        done.append(f"applied migration {name}: {description}")
    return done


def _announce_rewrite(conn: Connection, schema_name: str, migration: str) -> None:
    """A rewrite of a long log takes a while, and holds every reader and writer of the
    table off until it commits: say so before it starts. (0001 made the table, in an
    earlier run or earlier in this one.)"""
    events = sql.Identifier(schema_name, "events")
    count = fetch_value(conn, sql.SQL("SELECT coalesce(max(position), 0) FROM {}").format(events))
    if count >= ANNOUNCED_REWRITE:
        log.warning(
            "incident: migration %s rewrites the %d events of %s.events once; until it "
            "commits, every reader and writer of the table waits",
            migration,
            count,
            schema_name,
        )
