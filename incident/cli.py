"""The ``incident`` command: init, demo, events, subscribe, replay, subscriptions, retry.

The CLI is the one place that may read the environment; the library never does. This
module holds the group, the commands that read and set up a store, and what every
command uses to open one and report its errors; the subscription commands are in
:mod:`incident.cli_subscriptions`.
"""

from __future__ import annotations

import datetime as dt
import importlib
import itertools
import logging
import os
import sqlite3
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import click
import msgspec
from rich.console import Console
from rich.table import Table

from . import errors
from .aggregate import Aggregate
from .messages import Recorded
from .stores import EventStore, checkpoint_store_for, open_event_store
from .stores.sqlite import MEMORY, sqlite_path

__all__ = [
    "DEFAULT_DEMO_STORE",
    "console",
    "events_table",
    "main",
    "opened_store",
    "reported",
    "require_store",
]

DEFAULT_DEMO_STORE = "sqlite:///incident-demo.db"


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


class _Group(click.Group):
    """The ``incident`` group: its own commands, and those of
    :mod:`incident.cli_subscriptions`, added when a command is looked up. That module
    imports this one's helpers, so this one imports it only once it is complete."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_subscription_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._add_subscription_commands()
        return super().get_command(ctx, cmd_name)

    def _add_subscription_commands(self) -> None:
        from .cli_subscriptions import COMMANDS

        for command in COMMANDS:
            self.commands.setdefault(command.name or "", command)


@click.group(cls=_Group)
@click.version_option(package_name="incident")
def main() -> None:
    """Event Sourcing and CQRS with pure, decorated functions."""
    # the pool logs every failed reconnection attempt; our StoreError says it once, clearly
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    # --import and module:object name the user's modules, which `python -m` would find
    # in the current directory; an installed script starts with its own directory instead
    here = os.getcwd()
    if sys.path[:1] != [here]:
        sys.path.insert(0, here)


@main.command()
@click.argument("url")
def init(url: str) -> None:
    """Create or migrate the tables of the store at URL (idempotent)."""
    with opened_store(url) as store:
        done = store.initialize()
        if callable(getattr(store, "checkpoints", None)):  # the subscriptions' tables too
            done += checkpoint_store_for(store).initialize()
    out = console()
    for line in done:
        out.print(f"[green]✓[/] {line}")
    if not done:
        out.print(f"{url}: already up to date, nothing to do")


@main.command()
@click.argument("url")
@click.option(
    "--stream", "stream_id", metavar="ID", help="Show one stream instead of the whole log."
)
# the old name, taken by replay/subscribe/retry for module:object aggregates
@click.option("--aggregate", "deprecated_stream_id", hidden=True)
@click.option("--correlation", "correlation_id", help="Show every event of one correlation id.")
@click.option("--after", type=int, default=0, show_default=True, help="Start after this position.")
@click.option("--limit", type=int, default=None, help="Show at most this many events.")
@click.option(
    "--import",
    "-i",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Import the module that defines your event classes (repeatable).",
)
def events(
    url: str,
    stream_id: str | None,
    deprecated_stream_id: str | None,
    correlation_id: str | None,
    after: int,
    limit: int | None,
    modules: tuple[str, ...],
) -> None:
    """Print the event log (or one stream) of the store at URL as a table.

    Stored events are read back as your Event classes: --import the module that defines
    them (the Bank example's are always known, for `incident demo` files).
    """
    if deprecated_stream_id is not None:
        click.echo("incident events: --aggregate is deprecated, use --stream ID", err=True)
        stream_id = stream_id or deprecated_stream_id
    imported = []
    for name in ("incident.examples.bank", *modules):
        try:
            imported.append(importlib.import_module(name))
        except ImportError as error:
            raise click.ClickException(f"Cannot import {name}: {error}") from error
    require_store(url, "events")
    unknown: dict[type[errors.IncidentError], str] = {
        errors.UnknownEventType: " (--import the module that defines it)"
    }
    with opened_store(url, create_tables=False, hints=unknown) as store:
        # what a CommandHandler would register: the event types and their upcasters
        for module in imported:
            for aggregate in vars(module).values():
                if isinstance(aggregate, Aggregate):
                    store.types.register(*aggregate.event_types)
                    for (name, version), upcaster in aggregate.upcasters.items():
                        store.types.register_upcaster(name, version, upcaster)
        found: Iterable[Recorded[Any]] = (
            (r for r in store.get(stream_id) if r.position > after)
            if stream_id is not None
            else store.read_all(after=after)
        )
        if correlation_id is not None:
            found = (r for r in found if r.metadata.get("correlation_id") == correlation_id)
        rows = list(itertools.islice(found, limit))
    console().print(events_table(rows, title=stream_id or correlation_id or url))


def events_table(rows: list[Recorded[Any]], title: str = "") -> Table:
    """A readable table of recorded events: one row each, the payload as field=value."""
    table = Table(title=f"{title} ({len(rows)} events)")
    table.add_column("pos", justify="right", no_wrap=True)
    table.add_column("stream", overflow="fold", max_width=24)
    table.add_column("v", justify="right", no_wrap=True)
    table.add_column("event", overflow="fold", max_width=20)
    table.add_column("data", overflow="fold", min_width=16)
    table.add_column("UTC", no_wrap=True)
    for r in rows:
        fields = msgspec.structs.asdict(r.data)
        table.add_row(
            str(r.position),
            f"{r.aggregate}/{r.aggregate_id}" if r.aggregate else r.aggregate_id,
            str(r.version),
            r.event_type,
            " ".join(f"{key}={value}" for key, value in fields.items()),
            r.event_date.astimezone(dt.UTC).strftime("%m-%d %H:%M:%S"),
        )
    return table


@main.command()
@click.option(
    "--store",
    "url",
    default=DEFAULT_DEMO_STORE,
    show_default=True,
    help="Where to keep the demo's events and read models.",
)
def demo(url: str) -> None:
    """Run the Bank example end to end and tell what happened."""
    from .examples.bank import demo as bank_demo

    with reported():
        bank_demo.run(url, console=console(), run_id=uuid.uuid4().hex[:4].upper())


def _is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0].lower() in {"postgres", "postgresql"}


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

        from .stores.postgres import split_url as _split_url
    except ImportError as error:
        raise click.ClickException(
            f"Cannot open postgresql:// stores: {error} (pip install 'incident[postgres]')"
        ) from error
    conninfo, schema = _split_url(url)
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


if __name__ == "__main__":  # pragma: no cover
    main()
