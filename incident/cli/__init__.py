"""The ``incident`` command: init, demo, serve, events, subscribe, replay, subscriptions,
retry.

The CLI is the one place that may read the environment; the library never does. This
module holds the group and the commands that read and set up a store; the subscription
commands are in :mod:`incident.cli.subscriptions`, and what every command uses to open
a store and report its errors in :mod:`incident.cli.support`.
"""

from __future__ import annotations

import datetime as dt
import importlib
import itertools
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import click
import msgspec
from rich.table import Table

from .. import errors
from ..aggregate import Aggregate
from ..messages import Recorded
from ..stores import EventStore, checkpoint_store_for
from ..subscriptions import last_position
from .subscriptions import COMMANDS as SUBSCRIPTION_COMMANDS
from .support import console, in_one_process, opened_store, reported, require_store

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


@click.group()
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
# deprecated spelling of --stream (replay, subscribe and retry take --aggregate MODULE:OBJECT)
@click.option("--aggregate", "deprecated_stream_id", hidden=True)
@click.option("--correlation", "correlation_id", help="Show every event of one correlation id.")
@click.option("--after", type=int, default=0, show_default=True, help="Start after this position.")
@click.option(
    "--limit", type=click.IntRange(min=0), default=None, help="Show at most this many events."
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Then print each new event (of the stream or correlation, if given) as it "
    "commits, one line each, until interrupted.",
)
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
    follow: bool,
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
        except (ImportError, ValueError) as error:  # ValueError: an empty name
            raise click.ClickException(f"Cannot import {name!r}: {error}") from error
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
        # a filtered listing is not read from the log: its tail starts where the log was
        log_end = last_position(store) if follow else 0
        found: Iterable[Recorded[Any]] = (
            (r for r in store.get(stream_id) if r.position > after)
            if stream_id is not None
            else store.read_all(after=after)
        )
        if correlation_id is not None:
            found = (r for r in found if r.metadata.get("correlation_id") == correlation_id)
        rows = list(itertools.islice(found, limit))
        console().print(events_table(rows, title=stream_id or correlation_id or url))
        if follow:
            shown = rows[-1].position if rows else after
            filtered = stream_id is not None or correlation_id is not None
            tail_events(
                store,
                after=max(log_end, after) if filtered else shown,
                shown=shown,
                keep=lambda r: (
                    (stream_id is None or r.aggregate_id == stream_id)
                    and (
                        correlation_id is None or r.metadata.get("correlation_id") == correlation_id
                    )
                ),
            )


def tail_events(
    store: EventStore, *, after: int, shown: int, keep: Callable[[Recorded[Any]], bool]
) -> None:
    """``events --follow``: each later event that ``keep`` takes, one line each, until
    Ctrl-C (which ends it quietly); one the table already showed is not printed again."""
    try:
        for recorded in store.subscribe(after=after):
            if recorded.position > shown and keep(recorded):
                click.echo("  ".join(event_cells(recorded)))
    except KeyboardInterrupt:
        pass


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
        table.add_row(*event_cells(r))
    return table


def event_cells(r: Recorded[Any]) -> list[str]:
    """One event as the table's columns: position, stream, version, type, the payload as
    field=value, the UTC time."""
    fields = msgspec.structs.asdict(r.data)
    return [
        str(r.position),
        f"{r.aggregate}/{r.aggregate_id}" if r.aggregate else r.aggregate_id,
        str(r.version),
        r.event_type,
        " ".join(f"{key}={value}" for key, value in fields.items()),
        r.event_date.astimezone(dt.UTC).strftime("%m-%d %H:%M:%S"),
    ]


def demo_store(help: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The --store option of the commands that run the Bank (an SQLite file by default)."""
    return click.option("--store", "url", default=DEFAULT_DEMO_STORE, show_default=True, help=help)


@main.command()
@demo_store("Where to keep the demo's events and read models.")
def demo(url: str) -> None:
    """Run the Bank example end to end and tell what happened."""
    from ..examples.bank import demo as bank_demo

    with reported():
        bank_demo.run(url, console=console(), run_id=uuid.uuid4().hex[:4].upper())


@main.command()
@demo_store("The Bank's store (an SQLite file by default; any store URL).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    help="How often a conflicting command is decided again before a 409 (default 10).",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log a line per request (the log itself records every command that landed).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes sharing the port (each with its own handler on the same store).",
)
def serve(
    url: str, host: str, port: int, retries: int | None, access_log: bool, workers: int
) -> None:
    """Serve the Bank over HTTP (POST /commands/{CommandType}, GET /accounts/{id},
    GET /events as Server-Sent Events) with uvicorn; needs `pip install 'incident[web]'`."""
    try:
        import uvicorn

        from ..examples.bank import web
    except ImportError as error:
        raise click.ClickException(
            f"incident serve needs the web extra: pip install 'incident[web]' ({error})"
        ) from error
    local = in_one_process(url)
    if workers > 1 and local:
        raise click.ClickException(
            f"--workers {workers} needs a store the processes share (a file or a "
            f"server), not {url!r}, which lives in one process"
        )
    if not local:
        # opened here first: a store that cannot open is one line now, not a traceback
        # from the server's startup; and its tables are made before workers race to it
        with opened_store(url):
            pass
    served: Any
    if workers == 1:
        served = web.app(url, **({} if retries is None else {"retries": retries}))
    else:
        # uvicorn starts each worker process from an import string, not from an object
        os.environ[web.STORE_VARIABLE] = url
        os.environ[web.RETRIES_VARIABLE] = "" if retries is None else str(retries)
        served = f"{web.__name__}:{web.app_from_environment.__name__}"
    with reported():
        uvicorn.run(
            served,
            factory=workers > 1,
            workers=workers,
            host=host,
            port=port,
            log_level="info",
            access_log=access_log,
        )


for _command in SUBSCRIPTION_COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
