"""The subscription commands of ``incident``: replay, subscriptions, retry, subscribe.

They run event handlers named as ``module:object``; :mod:`incident.cli` adds them to its
group.
"""

from __future__ import annotations

import importlib
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from ..aggregate import Aggregate
from ..command_handler import CommandHandler
from ..event_handler import EventHandler
from ..stores import Owed, checkpoint_store_for
from ..subscriptions import Subscription, Subscriptions, last_position
from .support import console, opened_store, require_store

__all__ = ["COMMANDS", "replay", "retry", "subscribe", "subscriptions"]

F = TypeVar("F", bound=Callable[..., Any])


def _inline_option(help: str) -> Callable[[F], F]:
    """``--inline MODULE:OBJECT``, repeatable: the application's inline handlers, which
    retry and subscribe each describe in their own words."""
    return click.option(
        "--inline", "inline_paths", multiple=True, metavar="MODULE:OBJECT", help=help
    )


@click.command()
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

    The rebuilt tables replace the old ones when the replay is done, in the transaction
    that moves the handler's checkpoint to the end of the log and empties its dead
    letters: killed before, it changed nothing, and it can simply be run again. The
    handler must not be running elsewhere.
    """
    out = console()
    handler = _load(handler_path, EventHandler)
    aggregates = _aggregates_for([handler_path], aggregate_paths)
    require_store(url, "events")  # a mistyped path is no store to rebuild from
    with opened_store(url) as store:
        app = CommandHandler(store, aggregates=aggregates)
        subscription = Subscription(handler, app)
        total = last_position(store)
        with Progress(
            *Progress.get_default_columns()[:-1],
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=out,
        ) as progress:
            task = progress.add_task(f"replaying {handler.name}", total=total)
            done = subscription.replay(lambda read: progress.advance(task, read))
    rows = ", ".join(f"{count} {name}" for name, count in done.written.items()) or "no rows"
    out.print(f"[green]✓[/] {handler.name}: rebuilt {rows} up to position {done.position}")
    if done.skipped_commands:
        out.print(
            f"  {done.skipped_commands} commands for events it had already handled were "
            "not dispatched again"
        )


@click.command()
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
    out = console()
    tables = require_store(url, "events")
    positions: dict[str, int] = {}
    parked: list[Any] = []
    owed: list[Owed] = []
    with opened_store(url, create_tables=False) as store:
        head = last_position(store)
        # no subscription has run here yet; reading would create the tables
        if tables is None or {"incident_checkpoints", "incident_parked"} <= tables:
            checkpoints = checkpoint_store_for(store)
            positions = checkpoints.checkpoints()
            parked = checkpoints.parked()
        if tables is None or "incident_owed" in tables:  # an older store may have none
            owed = store.owed()
    table = Table(title=f"{url}: log at position {head}")
    for column in ("handler", "checkpoint", "lag", "parked"):
        table.add_column(column, justify="left" if column == "handler" else "right")
    for name in sorted(positions.keys() | {p.handler for p in parked}):
        position = positions.get(name, 0)
        mine = [p for p in parked if p.handler == name]
        held = sum(1 for p in mine if p.held)
        count = f"{len(mine)} ({held} held)" if held else str(len(mine))
        table.add_row(name, str(position), str(max(head - position, 0)), count)
    out.print(table)
    if show_parked and parked:
        # a failed event's listeners raised; a held one was never tried: it waits behind
        # an earlier parked event of its stream
        detail = Table(title="parked events (held: waiting behind its stream's failure)")
        for column in ("handler", "pos", "aggregate id", "type", "state", "error"):
            detail.add_column(column)
        for p in parked:
            state = "held" if p.held else f"[red]{p.attempts} tries[/]"
            detail.add_row(p.handler, str(p.position), p.aggregate_id, p.event_type, state, p.error)
        out.print(detail)
    _print_owed(out, owed, show_parked)


@click.command()
@click.argument("url")
@click.option(
    "--handler",
    "handler_path",
    default=None,
    help="A subscription's EventHandler, as module:object.",
)
@_inline_option(
    "An inline EventHandler of the application whose owed follow-ups to complete "
    "(repeatable: give them all)."
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
    out = console()
    inline = [_load(path, EventHandler) for path in inline_paths]
    paths = [*([handler_path] if handler_path else []), *inline_paths]
    aggregates = _aggregates_for(paths, aggregate_paths)
    require_store(url, "events")  # a mistyped path has nothing parked or owed
    with opened_store(url) as store:
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
    if inline:
        out.print(f"{len(completed)} of {len(waiting_owed)} owed follow-ups completed")
        for owed in still_owed:
            out.print(
                f"  still owed: {owed.handler} for #{owed.position} {owed.event_type}: {owed.error}"
            )
    if handler_path is None:
        return
    for parked in skipped:
        out.print(f"{handler.name}: skipped #{parked.position} {parked.event_type} unhandled")
    out.print(f"{handler.name}: {len(done)} of {waiting} parked events handled")
    for parked in left:
        state = "held" if parked.held else "failed"
        out.print(
            f"  still parked ({state}): #{parked.position} {parked.event_type}: {parked.error}"
        )


@click.command()
@click.argument("url")
@click.option(
    "--handler",
    "handler_paths",
    required=True,
    multiple=True,
    help="An EventHandler to run, as module:object (repeatable).",
)
@_inline_option(
    "An inline EventHandler of the application: the commands the subscriptions "
    "dispatch run it, as in the application (repeatable)."
)
@click.option("--aggregate", "aggregate_paths", multiple=True, help="As for replay.")
@click.option("--batch-size", type=int, default=5000, show_default=True)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Streams handled at once in each batch, on as many threads (docs/subscriptions.md).",
)
def subscribe(
    url: str,
    handler_paths: tuple[str, ...],
    inline_paths: tuple[str, ...],
    aggregate_paths: tuple[str, ...],
    batch_size: int,
    concurrency: int,
) -> None:
    """Run handlers as durable subscriptions on the store at URL until interrupted.

    Start as many of these as you like, on as many machines: for each handler one
    process works and the others wait to take over.
    """
    out = console()
    handlers = [_load(path, EventHandler) for path in handler_paths]
    aggregates = _aggregates_for(handler_paths, aggregate_paths)
    with opened_store(url) as store:
        app = CommandHandler(
            store,
            aggregates=aggregates,
            event_handlers=[_load(p, EventHandler) for p in inline_paths],
        )
        running = Subscriptions(
            Subscription(h, app, batch_size=batch_size, concurrency=concurrency) for h in handlers
        )
        out.print(f"running {', '.join(running)} on {url} (Ctrl-C stops)")
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same
        running.start()
        try:
            while all(s.error is None for s in running.values()):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            try:
                running.stop()
            except TimeoutError as error:  # a listener that does not return: say which
                raise click.ClickException(str(error)) from error
        failed = [s for s in running.values() if s.error is not None]
        if failed:
            raise click.ClickException(f"{failed[0].name} stopped: {failed[0].error}")


def _print_owed(out: Console, owed: list[Owed], detailed: bool) -> None:
    """What inline handlers still owe: a count per handler, each one with ``detailed``."""
    if not owed:
        return
    table = Table(title="owed follow-ups (incident retry URL --inline ... completes them)")
    for column in ("inline handler", "owed", "oldest"):
        table.add_column(column, justify="left" if column == "inline handler" else "right")
    for name in sorted({o.handler for o in owed}):
        mine = [o for o in owed if o.handler == name]
        table.add_row(name, str(len(mine)), f"#{mine[0].position}")
    out.print(table)
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
        out.print(detail)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _module(path: str) -> Any:
    """The module of ``module:object``, or a one-line error naming the path."""
    try:
        return importlib.import_module(path.partition(":")[0])
    except (ImportError, ValueError) as error:  # ValueError: an empty name
        raise click.ClickException(f"Cannot load {path!r} (module:object): {error}") from error


def _load(path: str, kind: type[Any]) -> Any:
    module, attribute = _module(path), path.partition(":")[2]
    try:
        found = getattr(module, attribute)
    except AttributeError as error:
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
    module = _module(handler_path)
    found = [value for value in vars(module).values() if isinstance(value, Aggregate)]
    if not found:
        raise click.ClickException(
            f"No Aggregate in {module.__name__}; name them with --aggregate module:object"
        )
    return found


#: the commands :mod:`incident.cli` adds to its group
COMMANDS = [replay, subscriptions, retry, subscribe]
