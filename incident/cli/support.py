"""What every ``incident`` command uses: where it prints, how it opens a store and
reports an incident error (as click reports bad usage: a message and exit status 1), and
how it checks, without creating anything, that a URL names a store."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from urllib.parse import quote

import click
from rich.console import Console

from .. import errors
from ..stores import EventStore, open_event_store
from ..stores.sqlite import MEMORY, sqlite_path

__all__ = ["console", "in_one_process", "opened_store", "reported", "require_store"]


def console() -> Console:
    """Where a command prints: made per command, so the terminal's width (or COLUMNS)
    at run time is what counts."""
    return Console(highlight=False)


@contextmanager
def reported(hints: Mapping[type[errors.IncidentError], str] | None = None) -> Iterator[None]:
    """Ends the command on an incident error the way click ends it on bad usage: the
    message (and the hint given for its type, if any) on stderr, exit status 1; a
    traceback would tell a user of the command nothing."""
    try:
        yield
    except errors.IncidentError as error:
        hint = next((h for kind, h in (hints or {}).items() if isinstance(error, kind)), "")
        raise click.ClickException(f"{error}{hint}") from error


@contextmanager
def opened_store(
    url: str,
    *,
    create_tables: bool = True,
    hints: Mapping[type[errors.IncidentError], str] | None = None,
) -> Iterator[EventStore]:
    """The store at URL, open for the block and closed after it, its errors
    :func:`reported`; with create_tables=False a Postgres store creates nothing (a
    read-only command checks with :func:`require_store` first that there is something
    to read)."""
    options = {} if create_tables or not _is_postgres(url) else {"create_tables": False}
    with reported(hints):
        store = open_event_store(url, **options)
        try:
            yield store
        finally:
            store.close()


def _is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0].lower() in {"postgres", "postgresql"}


def in_one_process(url: str) -> bool:
    """Whether the store at URL lives in this process only (memory, in-memory SQLite)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        with reported():
            return sqlite_path(url.split("?", 1)[0]) == MEMORY
    return scheme == "memory"


def require_store(url: str, *needed: str) -> set[str] | None:
    """The incident tables of the store at URL, or a "no such store" error when it has
    not the ``needed`` ones; None for a store that lives in this process (nothing to
    check). Looks without creating anything: a mistyped path or schema is not a store."""
    if url.split("://", 1)[0].lower() == "sqlite":
        with reported():
            path = sqlite_path(url.split("?", 1)[0])
        if path == MEMORY:
            return None
        if not os.path.isfile(path):
            raise click.ClickException(f"no such store: {path} does not exist")
        tables = _sqlite_tables(path)
        where = path
    elif _is_postgres(url):
        tables, where = _postgres_tables(url)
    else:
        return None
    missing = [name for name in needed if name not in tables]
    if missing:
        raise click.ClickException(
            f"no such store: {where} has no {', '.join(missing)} table "
            f"(`incident init {url}` creates the tables)"
        )
    return tables


def _sqlite_tables(path: str) -> set[str]:
    try:
        # mode=ro: opening must not create the file, nor a journal
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as error:
        raise click.ClickException(f"Cannot read {path} as an SQLite store: {error}") from error
    return {name for (name,) in rows}


def _postgres_tables(url: str) -> tuple[set[str], str]:
    try:
        import psycopg

        from ..stores.postgres import split_url
    except ImportError as error:
        raise click.ClickException(
            f"Cannot open postgresql:// stores: {error} (pip install 'incident[postgres]')"
        ) from error
    with reported():  # a malformed URL: one line, not a traceback
        conninfo, schema = split_url(url)
    schema = schema or "public"
    try:
        with psycopg.connect(conninfo, connect_timeout=10, autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]
            ).fetchone()
            rows = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [schema]
            ).fetchall()
    except psycopg.Error as error:
        raise click.ClickException(f"Postgres failed opening {url}: {error}") from error
    if found is None:
        raise click.ClickException(f"no such store: there is no schema {schema!r} at {url}")
    return {name for (name,) in rows}, f"schema {schema!r}"
