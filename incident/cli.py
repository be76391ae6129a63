"""The ``incident`` command: init, demo, events, subscribe, replay, subscriptions, retry.

The CLI is the one place that may read the environment; the library never does.
"""

from __future__ import annotations

import datetime as dt
import importlib
import itertools
import logging
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import click
import msgspec
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from . import errors
from .aggregate import Aggregate
from .command_handler import CommandHandler
from .event_handler import EventHandler
from .messages import Recorded
from .stores import Owed, checkpoint_store_for, open_event_store
from .stores.sqlite import MEMORY, sqlite_path
from .subscriptions import Subscription, Subscriptions, last_position

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
    # --import and module:object name the user's modules, which `python -m` would find
    # in the current directory; an installed script starts with its own directory instead
    here = os.getcwd()
    if sys.path[:1] != [here]:
        sys.path.insert(0, here)


@main.command()
@click.argument("url")
def init(url: str) -> None:
    """Create or migrate the tables of the store at URL (idempotent)."""
    store = _open(url)
    try:
        done = store.initialize()
        if callable(getattr(store, "checkpoints", None)):  # the subscriptions' tables too
            done += checkpoint_store_for(store).initialize()
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
    _require_store(url, "events")
    store = _open(url, create_tables=False)
    try:
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
    except errors.UnknownEventType as error:
        hint = " (--import the module that defines it)"
        raise click.ClickException(f"{error}{hint}") from error
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    _console().print(events_table(rows, title=stream_id or correlation_id or url))


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


@main.command()
@click.argument("url")
@click.option(
    "--handler",
    "handler_path",
    required=True,
    help="The EventHandler to rebuild, as module:object "
    "(e.g. incident.examples.bank:bank_projections).",
)
@click.option(
    "--aggregate",
    "aggregate_paths",
    multiple=True,
    help="An Aggregate whose state the listeners receive, as module:object (repeatable); "
    "by default every Aggregate in the handler's module.",
)
def replay(url: str, handler_path: str, aggregate_paths: tuple[str, ...]) -> None:
    """Rebuild a handler's projections from the start of the log at URL.

    The rebuilt tables replace the old ones when the replay is done, and the handler's
    checkpoint moves to the end of the log. The handler must not be running elsewhere.
    """
    console = _console()
    handler = _load(handler_path, EventHandler)
    aggregates = _aggregates_for([handler_path], aggregate_paths)
    store = _open(url)
    try:
        app = CommandHandler(store, aggregates=aggregates)
        subscription = Subscription(handler, app)
        total = last_position(store)
        with Progress(
            *Progress.get_default_columns()[:-1],
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(f"replaying {handler.name}", total=total)
            done = subscription.replay(lambda read: progress.advance(task, read))
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    rows = ", ".join(f"{count} {name}" for name, count in done.written.items()) or "no rows"
    console.print(f"[green]✓[/] {handler.name}: rebuilt {rows} up to position {done.position}")
    if done.skipped_commands:
        console.print(
            f"  {done.skipped_commands} commands for events it had already handled were "
            "not dispatched again"
        )


@main.command()
@click.argument("url")
@click.option(
    "--parked",
    "show_parked",
    is_flag=True,
    help="Also list the parked events and the owed follow-ups, one by one.",
)
def subscriptions(url: str, show_parked: bool) -> None:
    """List the subscriptions of the store at URL: checkpoint, lag and parked events;
    and the follow-ups inline handlers still owe."""
    console = _console()
    tables = _require_store(url, "events")
    store = _open(url, create_tables=False)
    positions: dict[str, int] = {}
    parked: list[Any] = []
    owed: list[Owed] = []
    try:
        head = last_position(store)
        # no subscription has run here yet; reading would create the tables
        if tables is None or {"incident_checkpoints", "incident_parked"} <= tables:
            checkpoints = checkpoint_store_for(store)
            positions = checkpoints.checkpoints()
            parked = checkpoints.parked()
        if tables is None or "incident_owed" in tables:  # a store from before owed work
            owed = store.owed()
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    table = Table(title=f"{url}: log at position {head}")
    for column in ("handler", "checkpoint", "lag", "parked"):
        table.add_column(column, justify="left" if column == "handler" else "right")
    for name in sorted(positions.keys() | {p.handler for p in parked}):
        position = positions.get(name, 0)
        mine = [p for p in parked if p.handler == name]
        held = sum(1 for p in mine if p.held)
        count = f"{len(mine)} ({held} held)" if held else str(len(mine))
        table.add_row(name, str(position), str(max(head - position, 0)), count)
    console.print(table)
    if show_parked and parked:
        # a failed event's listeners raised; a held one was never tried: it waits behind
        # an earlier parked event of its stream
        detail = Table(title="parked events (held: waiting behind its stream's failure)")
        for column in ("handler", "pos", "aggregate id", "type", "state", "error"):
            detail.add_column(column)
        for p in parked:
            state = "held" if p.held else f"[red]{p.attempts} tries[/]"
            detail.add_row(p.handler, str(p.position), p.aggregate_id, p.event_type, state, p.error)
        console.print(detail)
    _print_owed(console, owed, show_parked)


@main.command()
@click.argument("url")
@click.option(
    "--handler",
    "handler_path",
    default=None,
    help="A subscription's EventHandler, as module:object.",
)
@click.option(
    "--inline",
    "inline_paths",
    multiple=True,
    metavar="MODULE:OBJECT",
    help="An inline EventHandler of the application whose owed follow-ups to complete "
    "(repeatable: give them all).",
)
@click.option("--aggregate", "aggregate_paths", multiple=True, help="As for replay.")
@click.option(
    "--position",
    type=int,
    default=None,
    help="Retry this parked event only (and the ones of its stream before it, first).",
)
@click.option(
    "--skip",
    "skips",
    type=int,
    multiple=True,
    metavar="POSITION",
    help="Drop this parked event without handling it, then retry (repeatable).",
)
def retry(
    url: str,
    handler_path: str | None,
    inline_paths: tuple[str, ...],
    aggregate_paths: tuple[str, ...],
    position: int | None,
    skips: tuple[int, ...],
) -> None:
    """Handle a subscription's parked events again, stream by stream in log order; those
    that succeed leave the dead letters. One that fails again keeps the rest of its
    stream held behind it; --skip drops it (unhandled) so that the rest can go.

    --inline names the application's inline handlers (all of them: the commands
    dispatched run them, as in the application): the follow-ups they still owe are
    completed, each command once."""
    if handler_path is None and not inline_paths:
        raise click.UsageError("name a subscription (--handler) or inline handlers (--inline)")
    console = _console()
    inline = [_load(path, EventHandler) for path in inline_paths]
    paths = [*([handler_path] if handler_path else []), *inline_paths]
    aggregates = _aggregates_for(paths, aggregate_paths)
    store = _open(url)
    try:
        app = CommandHandler(store, aggregates=aggregates, event_handlers=inline)
        if inline:
            waiting_owed = [o for o in store.owed() if o.handler in {h.name for h in inline}]
            completed = app.complete_owed()
            still_owed = [o for o in store.owed() if o.handler in {h.name for h in inline}]
        if handler_path is not None:
            handler = _load(handler_path, EventHandler)
            subscription = Subscription(handler, app)
            skipped = [subscription.skip_parked(skip) for skip in skips]
            waiting = len(subscription.parked())
            done = subscription.retry_parked(position)
            left = subscription.parked()
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()
    if inline:
        console.print(f"{len(completed)} of {len(waiting_owed)} owed follow-ups completed")
        for owed in still_owed:
            console.print(
                f"  still owed: {owed.handler} for #{owed.position} {owed.event_type}: {owed.error}"
            )
    if handler_path is None:
        return
    for parked in skipped:
        console.print(f"{handler.name}: skipped #{parked.position} {parked.event_type} unhandled")
    console.print(f"{handler.name}: {len(done)} of {waiting} parked events handled")
    for parked in left:
        state = "held" if parked.held else "failed"
        console.print(
            f"  still parked ({state}): #{parked.position} {parked.event_type}: {parked.error}"
        )


@main.command()
@click.argument("url")
@click.option(
    "--handler",
    "handler_paths",
    required=True,
    multiple=True,
    help="An EventHandler to run, as module:object (repeatable).",
)
@click.option(
    "--inline",
    "inline_paths",
    multiple=True,
    metavar="MODULE:OBJECT",
    help="An inline EventHandler of the application: the commands the subscriptions "
    "dispatch run it, as in the application (repeatable).",
)
@click.option("--aggregate", "aggregate_paths", multiple=True, help="As for replay.")
@click.option("--batch-size", type=int, default=5000, show_default=True)
def subscribe(
    url: str,
    handler_paths: tuple[str, ...],
    inline_paths: tuple[str, ...],
    aggregate_paths: tuple[str, ...],
    batch_size: int,
) -> None:
    """Run handlers as durable subscriptions on the store at URL until interrupted.

    Start as many of these as you like, on as many machines: for each handler one
    process works and the others wait to take over.
    """
    console = _console()
    handlers = [_load(path, EventHandler) for path in handler_paths]
    aggregates = _aggregates_for(handler_paths, aggregate_paths)
    store = _open(url)
    try:
        app = CommandHandler(
            store,
            aggregates=aggregates,
            event_handlers=[_load(p, EventHandler) for p in inline_paths],
        )
        running = Subscriptions(Subscription(h, app, batch_size=batch_size) for h in handlers)
        console.print(f"running {', '.join(running)} on {url} (Ctrl-C stops)")
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same
        running.start()
        try:
            while all(s.error is None for s in running.values()):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            running.stop()
        failed = [s for s in running.values() if s.error is not None]
        if failed:
            raise click.ClickException(f"{failed[0].name} stopped: {failed[0].error}")
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error
    finally:
        store.close()


def _print_owed(console: Console, owed: list[Owed], detailed: bool) -> None:
    """What inline handlers still owe: a count per handler, each one with ``detailed``."""
    if not owed:
        return
    table = Table(title="owed follow-ups (incident retry URL --inline ... completes them)")
    for column in ("inline handler", "owed", "oldest"):
        table.add_column(column, justify="left" if column == "inline handler" else "right")
    for name in sorted({o.handler for o in owed}):
        mine = [o for o in owed if o.handler == name]
        table.add_row(name, str(len(mine)), f"#{mine[0].position}")
    console.print(table)
    if detailed:
        detail = Table(title="owed follow-ups")
        for column in ("handler", "pos", "aggregate id", "type", "tries", "error"):
            detail.add_column(column)
        for o in owed:
            detail.add_row(
                o.handler,
                str(o.position),
                o.aggregate_id,
                o.event_type,
                str(o.attempts),
                o.error or "",
            )
        console.print(detail)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _load(path: str, kind: type[Any]) -> Any:
    module_name, _, attribute = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise click.ClickException(f"Cannot load {path!r} (module:object): {error}") from error
    if not isinstance(found, kind):
        raise click.ClickException(f"{path} is a {type(found).__name__}, not a {kind.__name__}")
    return found


def _aggregates_for(
    handler_paths: Iterable[str], aggregate_paths: Iterable[str]
) -> list[Aggregate[Any]]:
    """The aggregates named with --aggregate, else every Aggregate in the handlers'
    modules; one per name."""
    found = [_load(path, Aggregate) for path in aggregate_paths] or [
        aggregate for path in handler_paths for aggregate in _aggregates_beside(path)
    ]
    return list({aggregate.name: aggregate for aggregate in found}.values())


def _aggregates_beside(handler_path: str) -> list[Aggregate[Any]]:
    module = importlib.import_module(handler_path.partition(":")[0])
    found = [value for value in vars(module).values() if isinstance(value, Aggregate)]
    if not found:
        raise click.ClickException(
            f"No Aggregate in {module.__name__}; name them with --aggregate module:object"
        )
    return found


def _open(url: str, *, create_tables: bool = True) -> Any:
    """The store at URL; with create_tables=False a Postgres store creates nothing (a
    read-only command checks with _require_store first that there is something to read)."""
    options = {} if create_tables or not _is_postgres(url) else {"create_tables": False}
    try:
        return open_event_store(url, **options)
    except errors.IncidentError as error:
        raise click.ClickException(str(error)) from error


def _is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0].lower() in {"postgres", "postgresql"}


def _require_store(url: str, *needed: str) -> set[str] | None:
    """The incident tables of the store at URL, or a "no such store" error when it has
    not the ``needed`` ones; None for a store that lives in this process (nothing to
    check). Looks without creating anything: a mistyped path or schema is not a store."""
    if url.split("://", 1)[0].lower() == "sqlite":
        try:
            path = sqlite_path(url.split("?", 1)[0])
        except errors.IncidentError as error:
            raise click.ClickException(str(error)) from error
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
