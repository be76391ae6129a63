"""What runs on one session (one connection) of a Postgres store: the statement helpers
every module uses, transactions synced once, advisory lock keys and turns, and whether a
failure on a session may hide a commit. No pool here: :mod:`.database` hands out the
sessions these work on."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

# one logger for the whole package, under the name the docs give
log = logging.getLogger("incident.stores.postgres")
# psycopg and its pool log each failed reconnection; with no handler of the
# application's anywhere, Python's last resort would print them to stderr, while the
# StoreError already says what failed. A NullHandler stops only that: handlers the
# application installs still receive every record.
logging.getLogger("psycopg").addHandler(logging.NullHandler())

Connection = psycopg.Connection[tuple[Any, ...]]
AsyncConnection = psycopg.AsyncConnection[Any]
Query = str | sql.SQL | sql.Composed
# how long a writer queues for a stream's turn before it goes on without one: a holder
# that takes this long is stuck, and the expected version keeps the append correct anyway
TURN_WAIT = "5s"
# how an append's transaction starts (the pools' sessions are autocommit; see database.py)
BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"


def lock_key(schema: str, purpose: str) -> int:
    """A stable 64-bit advisory lock key per schema, so applications in other schemas of
    the same database never wait on each other."""
    digest = hashlib.blake2b(f"incident:{schema}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def first_line(error: BaseException) -> str:
    """The error's first line (a driver error's detail follows it), for messages."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def fetch_value(conn: Connection, query: Query, *params: Any) -> Any:
    """The first column of the query's first row, or None when it returns no row."""
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


class Afterwards:
    """What one_sync_transaction's ``then`` statement returned, once the block is over,
    and whether its COMMIT went through (also when ``then`` failed after it)."""

    row: tuple[Any, ...] | None = None
    committed = False


class FailedAfterCommit(psycopg.OperationalError):
    """A statement after an append's COMMIT failed on a live session (its flush
    cancelled, say): the append is stored, whether it is flushed is not known here. The
    store looks it up (:func:`may_hide_a_commit`) rather than say nothing was stored."""


def after_commit(conn: Connection, error: BaseException) -> BaseException:
    """``error``, as FailedAfterCommit when it came once the transaction had committed:
    the session alive and outside any transaction (before the COMMIT, a failure leaves
    the transaction aborted, not ended)."""
    if not isinstance(error, psycopg.Error) or isinstance(error, OUT_OF_STEP):
        return error  # out of step: nothing of the message ran
    if conn.broken or conn.closed:
        return error
    if conn.info.transaction_status != TransactionStatus.IDLE:
        return error
    failed = FailedAfterCommit(f"after the COMMIT: {error}")
    failed.__cause__ = error
    return failed


@contextmanager
def one_sync_transaction(conn: Connection, *, then: str | None = None) -> Iterator[Afterwards]:
    """BEGIN, the block's statements and COMMIT in one pipeline, synced once at the end
    (psycopg's ``transaction()`` syncs once more, before its COMMIT). A failed statement
    makes the server skip everything after it up to the sync, the COMMIT included; the
    transaction it leaves open, or one a Python error left open, is rolled back here.
    ``then``, a statement run after the COMMIT in the same round trip, has its first row
    in the yielded ``Afterwards`` once the block is over."""
    failed: psycopg.Error | None = None
    afterwards = Afterwards()
    cursor = None
    try:
        with conn.pipeline():
            try:
                conn.execute(BEGIN)
                yield afterwards
                conn.execute("COMMIT")
                if then is not None:
                    cursor = conn.execute(then)
            except psycopg.Error as error:
                # a statement failed and its error came back before the block ended: end
                # the pipeline quietly (its sync then says it was aborted), raise it below
                failed = error
    except BaseException as error:
        # the sync found a failure: after the COMMIT (``then``'s) if no transaction is left
        idle = conn.info.transaction_status == TransactionStatus.IDLE
        afterwards.committed = failed is None and idle
        roll_back(conn)
        if failed is not None:
            raise failed from None  # not the "pipeline aborted" that followed it
        if afterwards.committed:
            raise after_commit(conn, error) from None
        raise
    if failed is not None:
        roll_back(conn)
        raise failed
    afterwards.committed = True
    if cursor is not None:
        afterwards.row = cursor.fetchone()


def one_message_transaction(
    conn: Connection, statements: Sequence[tuple[str, Sequence[Any]]], *, then: str
) -> list[list[tuple[Any, ...]] | None]:
    """BEGIN, the statements, COMMIT and ``then`` sent as one message (the simple query
    protocol, values bound in the client by psycopg's literal quoting), so the server runs
    them back to back: a lock the first one takes is held for none of this process's time
    (no round trip, no wait for it to be scheduled again) while the rest arrive. Returns
    each statement's rows (None for one without), ``then``'s last. A failure rolls back."""
    cursor = psycopg.ClientCursor(conn)
    try:
        cursor.execute(message_text(cursor, statements, then))
        results: list[list[tuple[Any, ...]] | None] = []
        while True:
            results.append(cursor.fetchall() if cursor.description else None)
            if not cursor.nextset():
                break
    except BaseException as error:
        late = after_commit(conn, error)  # ``then`` failed, after the COMMIT
        roll_back(conn)
        if late is not error:
            raise late from None
        raise
    return results[1:-2] + results[-1:]  # neither BEGIN's nor COMMIT's


def message_text(
    cursor: psycopg.ClientCursor[Any] | psycopg.AsyncClientCursor[Any],
    statements: Sequence[tuple[str, Sequence[Any]]],
    then: str,
) -> str:
    """The one message of :func:`one_message_transaction` (the async store sends it too)."""
    return ";".join(
        [BEGIN] + [cursor.mogrify(query, params) for query, params in statements] + ["COMMIT", then]
    )


class Prepared(NamedTuple):
    """A statement of a one-message transaction as an SQL-level prepared statement:
    the simple query protocol cannot use the extended protocol's, so the message
    ``EXECUTE``s it and the server parses and plans it once per session, not per
    message (about a sixth of the server's time for a numbered append)."""

    name: str
    prepare: str  # PREPARE name AS the query, its %s as $1, $2, ...
    call: str  # EXECUTE name(%s, ...), for message_text to bind


_PREPARED: dict[tuple[str, int], Prepared] = {}  # by (query, number of parameters)


def prepared(query: str, parameters: int) -> Prepared:
    found = _PREPARED.get((query, parameters))
    if found is None:
        name = "incident_" + hashlib.blake2b(query.encode(), digest_size=8).hexdigest()
        parts = query.split("%s")
        assert len(parts) == parameters + 1, query  # no literal %s in incident's SQL
        positional = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], 1))
        marks = ", ".join(["%s"] * parameters)
        found = Prepared(
            name,
            f"PREPARE {name} AS {positional}",
            f"EXECUTE {name}({marks})" if marks else f"EXECUTE {name}",
        )
        _PREPARED[(query, parameters)] = found
    return found


def to_prepare(
    conn: psycopg.BaseConnection[Any], statements: Sequence[tuple[str, Sequence[Any]]]
) -> tuple[list[Prepared], list[tuple[str, Sequence[Any]]]]:
    """What ``conn`` has not prepared yet of ``statements`` (for the caller to PREPARE
    first, each on its own and outside a transaction, then mark with ``was_prepared``:
    a PREPARE survives a rollback, so one that ran is never lost track of), and the
    statements as EXECUTEs. The connection object remembers its session's names (a new
    session is a new object)."""
    known: set[str] = conn.__dict__.setdefault("incident_prepared", set())
    missing: list[Prepared] = []
    calls: list[tuple[str, Sequence[Any]]] = []
    for query, params in statements:
        statement = prepared(query, len(params))
        if statement.name not in known and statement not in missing:
            missing.append(statement)
        calls.append((statement.call, params))
    return missing, calls


def was_prepared(conn: psycopg.BaseConnection[Any], statement: Prepared) -> None:
    conn.__dict__["incident_prepared"].add(statement.name)


#: the session's own names, when what the connection remembers proved wrong: psycopg
#: sends DEALLOCATE ALL for its own statements on a rollback and after some commands,
#: which drops incident's too
PREPARED_NAMES = "SELECT name FROM pg_prepared_statements WHERE name LIKE 'incident~_%' ESCAPE '~'"
OUT_OF_STEP = (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)


def learned_prepared(conn: psycopg.BaseConnection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    """What the session has prepared, read back from it (``PREPARED_NAMES``)."""
    conn.__dict__["incident_prepared"] = {name for (name,) in rows}


def prepared_message_transaction(
    conn: Connection, statements: Sequence[tuple[str, Sequence[Any]]], *, then: str
) -> list[list[tuple[Any, ...]] | None]:
    """``one_message_transaction`` of the statements prepared on the session (preparing
    any it lacks: a round trip once per session and statement). When the session's
    statements are not what the connection remembers (OUT_OF_STEP: nothing of the
    message ran), it learns them from the session and sends the message once more."""
    for attempt in range(2):
        try:
            missing, calls = to_prepare(conn, statements)
            for statement in missing:
                conn.execute(statement.prepare)
                was_prepared(conn, statement)
            return one_message_transaction(conn, calls, then=then)
        except OUT_OF_STEP:
            if attempt:
                raise
            roll_back(conn)
            learned_prepared(conn, conn.execute(PREPARED_NAMES).fetchall())
    raise AssertionError("unreachable")  # pragma: no cover


def roll_back(conn: Connection) -> None:
    """psycopg's rollback(), not a ROLLBACK statement: it also forgets the statements it
    has prepared on the connection. A failed pipeline skips the statements queued after
    the failure, and psycopg would otherwise count one it was preparing there as
    prepared ("prepared statement _pg3_4 does not exist" on its next use)."""
    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with suppress(psycopg.Error):  # a broken connection: the pool discards it
            conn.rollback()


def take_turn(conn: Connection, key: int) -> bool:
    """Queue for a stream's lock, for TURN_WAIT at most; False when it did not come.
    Taken inside a transaction only to bound the wait: a session lock outlives it."""
    try:
        with one_sync_transaction(conn):
            conn.execute(f"SET LOCAL lock_timeout = '{TURN_WAIT}'")
            conn.execute("SELECT pg_advisory_lock(%s)", [key])
    except psycopg.errors.LockNotAvailable:
        log.warning("incident: a stream's turn took over %s; appending without it", TURN_WAIT)
        return False
    return True


def give_turn(conn: Connection, key: int) -> None:
    """Release a stream's lock; a session that cannot say so is closed, which releases
    it as well (and the pool discards a closed connection)."""
    try:
        roll_back(conn)  # a transaction left open would keep the unlock waiting
        conn.execute("SELECT pg_advisory_unlock(%s)", [key])
    except psycopg.Error:
        conn.close()


def may_hide_a_commit(conn: psycopg.BaseConnection[Any], error: BaseException | None) -> bool:
    """Whether an append's failure leaves its COMMIT in doubt: the connection died, or
    the driver lost track of it (a kill can also surface as "cannot exit pipeline mode
    while busy", the connection not yet marked broken), so the reply may be what was
    lost. An error the server sent (a conflict, a constraint) is an answer."""
    if conn.broken or conn.closed or isinstance(error, FailedAfterCommit):
        return True
    if isinstance(error, psycopg.InterfaceError):
        return True
    return isinstance(error, psycopg.OperationalError) and (
        error.sqlstate is None or error.sqlstate.startswith(("08", "57P"))
    )
