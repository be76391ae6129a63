"""The ``incident`` command: init, demo, events.

The CLI is the one place that may read the environment; the library never does.
"""

from __future__ import annotations

import datetime as dt
import importlib
import itertools
import logging
import uuid
from collections.abc import Iterable
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.table import Table

from . import errors
from .messages import Recorded
from .stores import open_event_store

DEFAULT_DEMO_STORE = "sqlite:///incident-demo.db"


def _console() -> Console:
    # made per command, so the terminal's width (or COLUMNS) at run time is what counts
    return Console(highlight=False)


@click.group()
@click.version_option(package_name="incident")
def main() -> None:
    """Event Sourcing and CQRS with pure, decorated functions."""
    # the pool logs every failed reconnection attempt; our StoreError says it once, clearly
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


@main.command()
@click.argument("url")
def init(url: str) -> None:
    """Create or migrate the tables of the store at URL (idempotent)."""
    store = _open(url)
    try:
        done = store.initialize()
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    console = _console()
    for line in done:
        console.print(f"[green]✓[/] {line}")
    if not done:
        console.print(f"{url}: already up to date, nothing to do")


@main.command()
@click.argument("url")
@click.option("--aggregate", "aggregate_id", help="Show one stream instead of the whole log.")
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
    aggregate_id: str | None,
    correlation_id: str | None,
    after: int,
    limit: int | None,
    modules: tuple[str, ...],
) -> None:
    """Print the event log (or one stream) of the store at URL as a table.

    Stored events are read back as your Event classes: --import the module that defines
    them (the Bank example's are always known, for `incident demo` files).
    """
    for module in ("incident.examples.bank", *modules):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise click.ClickException(f"Cannot import {module}: {error}") from error
    store = _open(url)
    try:
        found: Iterable[Recorded[Any]] = (
            (r for r in store.get(aggregate_id) if r.position > after)
            if aggregate_id is not None
            else store.read_all(after=after)
        )
        if correlation_id is not None:
            found = (r for r in found if r.metadata.get("correlation_id") == correlation_id)
        rows = list(itertools.islice(found, limit))
    except errors.UnknownEventType as error:
        hint = " (--import the module that defines it)"
        raise click.ClickException(f"{error}{hint}") from error
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    _console().print(events_table(rows, title=aggregate_id or correlation_id or url))


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

    try:
        bank_demo.run(url, console=_console(), run_id=uuid.uuid4().hex[:4].upper())
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error


def _open(url: str) -> Any:
    try:
        return open_event_store(url)
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":  # pragma: no cover
    main()
