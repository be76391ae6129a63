"""What a ``postgresql://`` URL opens: the libpq URL and the schema it names
(:func:`split_url`, also for tools that connect directly), and the event store its
options describe (:func:`open_postgres`)."""

from __future__ import annotations

import math
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ...codec import EventTypes
from ...errors import IncidentError, InvalidArgument
from ...options import check_count
from .database import Database
from .events import PostgresEventStore
from .notify import MAX_NAME_BYTES
from .session import first_line


def split_url(url: str) -> tuple[str, str | None]:
    """A libpq URL without incident's own query parameters, and the schema it named.

    >>> split_url("postgresql+psycopg://u@h/db?schema=bank&sslmode=disable")
    ('postgresql://u@h/db?sslmode=disable', 'bank')
    >>> split_url("postgresql://u@h/db?options=-c%20statement_timeout%3D5s")[0]
    'postgresql://u@h/db?options=-c%20statement_timeout%3D5s'
    """
    try:
        parts = urlsplit(url)
    except ValueError as error:  # "Invalid IPv6 URL": libpq refuses it as well
        raise InvalidArgument(f"Not a usable Postgres URL: {error}") from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    named = list(dict.fromkeys(value for key, value in query if key == "schema"))
    if len(named) > 1:  # which one was meant is anybody's guess
        raise IncidentError(f"Two schemas for one store in the URL: {named[0]!r}, {named[1]!r}")
    schema = named[0] if named else None
    # libpq decodes %20 but not +, so spaces (as in options) must stay %20
    kept = [(key, value) for key, value in query if key != "schema"]
    rest = urlencode(kept, quote_via=quote)
    return urlunsplit(("postgresql", parts.netloc, parts.path, rest, parts.fragment)), schema


def checked_schema(schema: object) -> str:
    """``schema`` if incident can keep its tables there; else IncidentError saying why,
    before anything connects. Postgres would truncate a longer name (two long names would
    share one schema), and keeps ``pg_`` names and information_schema for itself; the
    driver reads a ``%`` in a statement as a parameter's placeholder, and a ``$$`` would
    end the body of a function the migrations make there."""
    if not isinstance(schema, str):
        raise IncidentError(f"A schema is a name (a str), got {schema!r}")
    if not schema:
        problem = "is empty (leave it out for public)"
    elif not schema.isprintable():
        problem = "holds a control character (a NUL, a newline) or a lone surrogate"
    elif (size := len(schema.encode())) > MAX_NAME_BYTES:
        problem = f"is {size} bytes long; Postgres keeps names of at most {MAX_NAME_BYTES} bytes"
    elif "%" in schema:
        problem = "holds a %, which the Postgres driver takes for a parameter's placeholder"
    elif "$$" in schema:
        problem = "holds $$, which would end the body of the functions incident keeps there"
    elif schema.startswith("pg_") or schema == "information_schema":
        problem = "is a Postgres system schema (pg_* and information_schema are reserved)"
    else:
        return schema
    raise IncidentError(f"Schema {schema!r} {problem}")


def open_postgres(
    url: str,
    *,
    schema: str | None = None,
    pool_size: int = 10,
    create_tables: bool = True,
    timeout: float = 10.0,
    batch_size: int = 1000,
    types: EventTypes | None = None,
) -> PostgresEventStore:
    """``postgresql://user:password@host:port/dbname?schema=name``: an event store whose
    ``projections()`` share its pool. Nothing is created until first use (or ``initialize``)."""
    conninfo, url_schema = split_url(url)
    if schema is not None and url_schema is not None and schema != url_schema:
        raise IncidentError(f"Two schemas for one store: {url_schema!r} in the URL, {schema!r}")
    schema = checked_schema(next(s for s in (schema, url_schema, "public") if s is not None))
    check_count("pool_size", pool_size, 1)
    check_count("batch_size", batch_size, 1)
    if not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
        raise InvalidArgument(f"timeout must be a number of seconds > 0, got {timeout!r}")
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error as error:
        raise InvalidArgument(f"Not a usable Postgres URL: {first_line(error)}") from error
    db = Database(
        conninfo, schema=schema, pool_size=pool_size, create_tables=create_tables, timeout=timeout
    )
    return PostgresEventStore(db, types=types, batch_size=batch_size)
