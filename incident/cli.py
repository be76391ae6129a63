"""The ``incident`` command: init, demo, events.

The CLI is the one place that may read the environment; the library never does.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Iterable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import errors
from .codec import encode
from .messages import Recorded
from .stores import open_event_store

DEFAULT_DEMO_STORE = "sqlite:///incident-demo.db"

console = Console(highlight=False)


@click.group()
@click.version_option(package_name="incident")
def main() -> None:
    """Event Sourcing and CQRS with pure, decorated functions."""


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
def events(
    url: str, aggregate_id: str | None, correlation_id: str | None, after: int, limit: int | None
) -> None:
    """Print the event log (or one stream) of the store at URL as a table."""
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
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    console.print(events_table(rows, title=aggregate_id or correlation_id or url))


def events_table(rows: list[Recorded[Any]], title: str = "") -> Table:
    """A readable table of recorded events."""
    table = Table(title=f"{title} ({len(rows)} events)")
    for column in ("pos", "aggregate", "id", "v", "type", "data", "date"):
        table.add_column(column, justify="right" if column in ("pos", "v") else "left")
    for r in rows:
        data = encode(r.data).decode()
        table.add_row(
            str(r.position),
            r.aggregate,
            r.aggregate_id,
            str(r.version),
            r.event_type,
            data,
            r.event_date.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
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
        bank_demo.run(url, console=console, run_id=uuid.uuid4().hex[:4].upper())
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error


def _open(url: str) -> Any:
    try:
        return open_event_store(url)
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":  # pragma: no cover
    main()
