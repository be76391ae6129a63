"""An AsyncCommandHandler over HTTP: an ASGI application (Starlette) that takes commands
as JSON, streams the log as Server-Sent Events, and serves what an application adds
(read models, states). ``pip install 'incident[web]'``; the Bank's is
:mod:`incident.examples.bank.web`, run by ``incident serve``.

- ``POST /commands/{CommandType}``: the body is the command as JSON, decoded and
  checked with the command's own type; an ``Idempotency-Key`` header makes a retry safe
  (the first call's outcome comes back). 200 with ``{"events": [...]}``, the recorded
  events; 404 for a command type the handler does not route; 422 ``InvalidCommand``
  naming the field; 409 ``Rejected`` with its reason, ``ConcurrencyError`` once the
  handler's retries are spent, ``ForeignStream``; 503 when the store failed
  (``CommitUnknown``: the command may have been stored, retry with the same key).
- ``GET /events?after=N``: the log after position N, then each event as it commits,
  as ``text/event-stream`` (``id`` is the position, ``event`` the event type, ``data``
  the recorded event as JSON); a reconnecting client's ``Last-Event-ID`` resumes after
  the last event it got. Comment lines keep an idle stream open through proxies; a
  stream whose tail fails ends with an ``error`` event saying why.
- ``GET /health``: 200 with the log's last position, once the handler is open.

Starlette rather than FastAPI: incident's commands are msgspec Structs that check
themselves (:func:`incident.decode_command`), so FastAPI's pydantic models would be a
second description of the same types; Starlette is the part of FastAPI this needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .codec import decode_command
from .command_handler.asynchronous import AsyncCommandHandler
from .errors import (
    CommitUnknown,
    ConcurrencyError,
    ForeignStream,
    InvalidCommand,
    RegistrationError,
    Rejected,
    StoreError,
    Unstorable,
)
from .messages import Command

__all__ = [
    "KEEP_ALIVE",
    "CommandApp",
    "CommandRoute",
    "command_app",
    "command_outcome",
    "json_response",
    "problem",
]

KEEP_ALIVE = 15.0  # seconds of silence after which an event stream sends a comment
QUEUED = 1024  # events an event stream reads ahead of a slow client
RECONNECT_MS = 1000  # what a stream that ends asks its client to wait before reconnecting

_encoder = msgspec.json.Encoder()
log = logging.getLogger("incident.web")
COMMANDS = "/commands/"
ALLOW: tuple[tuple[bytes, bytes], ...] = ((b"allow", b"POST"),)


def json_response(value: Any, status: int = 200) -> Response:
    """``value`` as JSON, encoded by msgspec (Structs, datetimes and all)."""
    return Response(_encoder.encode(value), status, media_type="application/json")


def problem(status: int, error: str, message: str, **details: Any) -> Response:
    """An error as JSON: ``{"error": <type>, "message": ..., <details>}``."""
    code, body = _problem(status, error, message, **details)
    return Response(body, code, media_type="application/json")


def command_app(
    open_handler: Callable[[], AsyncCommandHandler],
    *,
    routes: Sequence[BaseRoute] = (),
    keep_alive: float = KEEP_ALIVE,
) -> Starlette:
    """The ASGI app: the command, event-stream and health routes, plus ``routes`` (read
    sides, which find the handler at ``request.app.state.handler``). The handler is
    opened by ``open_handler()`` when the server starts and closed when it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        handler = open_handler()
        app.state.handler = handler
        app.state.commands = commands_by_name(handler)
        app.state.stopping = stopping = asyncio.Event()
        # a server waits for its connections to close before it stops the app: told
        # to stop, the event streams end first, or it would wait for their clients
        restore = _on_stop_signals(stopping)
        try:
            yield
        finally:
            restore()
            stopping.set()
            await handler.close()

    async def events(request: Request) -> Response:
        return await event_stream(request, keep_alive)

    return CommandApp(
        routes=[
            Route("/events", events, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            *routes,
        ],
        lifespan=lifespan,
        # a read side's store failing answers as a command's does, not a bare 500
        exception_handlers={StoreError: _store_failed, 404: _no_route},
    )


async def _store_failed(request: Request, error: Exception) -> Response:
    return problem(503, "StoreError", str(error))


async def _no_route(request: Request, error: Exception) -> Response:
    """Errors are JSON, the 404 of a path no route takes too (Starlette's is text)."""
    return problem(404, "NotFound", f"Nothing at {request.url.path!r}")


class CommandApp(Starlette):
    """Starlette, with ``POST /commands/...`` answered (:class:`CommandRoute`) before
    its middleware stack: the error middleware's wrapping of every ``send`` was a tenth
    of a command's server time, and a command's answers are all decided here anyway
    (an unexpected error still reaches the server, which answers 500 and logs it)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._commands = CommandRoute(super().__call__)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        await self._commands(scope, receive, send)


def commands_by_name(handler: AsyncCommandHandler) -> dict[str, type[Command]]:
    """The command types the handler routes, by class name (the URL's last part)."""
    found: dict[str, type[Command]] = {}
    for aggregate in handler.aggregates:
        for command_type in aggregate.command_types:
            other = found.setdefault(command_type.__name__, command_type)
            if other is not command_type:
                raise RegistrationError(
                    f"Two command types are named {command_type.__name__!r} "
                    f"({other.__module__} and {command_type.__module__}): "
                    "POST /commands/{name} could not tell them apart"
                )
    return found


class CommandRoute:
    """``POST /commands/{CommandType}`` as plain ASGI, ahead of Starlette's router: the
    route every command takes does without a Request object, the router's matching and
    the exception middleware's wrapping, since its answers are all known here (see
    :func:`command_outcome`); every other path goes on to the router."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(COMMANDS):
            await self.app(scope, receive, send)
            return
        name = path[len(COMMANDS) :]
        if scope["method"] != "POST":
            status, body, extra = 405, _encoder.encode({"error": "MethodNotAllowed"}), ALLOW
        elif not name or "/" in name:
            await self.app(scope, receive, send)  # the router's 404
            return
        else:
            posted = await _body(receive)
            if posted is None:
                return  # the client left: no one to answer
            key = next((v for k, v in scope["headers"] if k == b"idempotency-key"), None)
            state = scope["app"].state
            status, body = await command_outcome(
                state.handler,
                state.commands,
                name,
                posted,
                None if key is None else key.decode("latin-1"),
            )
            extra = ()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _body(receive: Receive) -> bytes | None:
    """The whole request body, however many messages it came in (None if the client
    disconnected first)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def command_outcome(
    handler: AsyncCommandHandler,
    commands: Mapping[str, type[Command]],
    name: str,
    body: bytes,
    key: str | None,
) -> tuple[int, bytes]:
    """The status and JSON body answering a command posted as ``name`` (see the module
    for each status)."""
    command_type = commands.get(name)
    if command_type is None:
        return _problem(
            404, "UnknownCommand", f"No command type {name!r} here", commands=sorted(commands)
        )
    try:
        command = decode_command(command_type, body)
        recorded = await handler.dispatch(command, {"idempotency_key": key} if key else None)
    except InvalidCommand as error:
        return _problem(422, "InvalidCommand", str(error), command=name, field=error.field)
    except Unstorable as error:  # the client's data: no store could keep it as it is
        return _problem(422, "Unstorable", str(error), what=error.what, field=error.field)
    except Rejected as error:
        return _problem(409, "Rejected", str(error), reason=error.reason, detail=error.detail)
    except ConcurrencyError as error:
        return _problem(
            409,
            "ConcurrencyError",
            str(error),
            aggregate_id=error.aggregate_id,
            actual=error.actual,
        )
    except ForeignStream as error:
        return _problem(409, "ForeignStream", str(error), aggregate_id=error.aggregate_id)
    except CommitUnknown as error:
        return _problem(503, "CommitUnknown", str(error), event_ids=error.event_ids)
    except StoreError as error:
        return _problem(503, "StoreError", str(error))
    return 200, _encoder.encode({"events": recorded})


def _problem(status: int, error: str, message: str, **details: Any) -> tuple[int, bytes]:
    return status, _encoder.encode({"error": error, "message": message, **details})


async def health(request: Request) -> Response:
    handler: AsyncCommandHandler = request.app.state.handler
    try:
        last = await handler.event_store.last_position()
    except StoreError as error:
        return problem(503, "StoreError", str(error))
    return json_response({"ok": True, "last_position": last})


def whole_number(text: str) -> int | None:
    """The int >= 0 that ``text`` spells in ASCII digits, else None (int() would also
    take "+1", " 1", "1_0" and other scripts' digits)."""
    return int(text) if text.isascii() and text.isdigit() else None


async def event_stream(request: Request, keep_alive: float) -> Response:
    after_text = request.headers.get("last-event-id") or request.query_params.get("after", "0")
    after = whole_number(after_text)
    if after is None:
        return problem(
            422, "InvalidPosition", f"after must be a position (an int >= 0), got {after_text!r}"
        )
    handler: AsyncCommandHandler = request.app.state.handler
    live = handler.event_store.subscribe(after=after, poll_interval=keep_alive)
    return StreamingResponse(
        _frames(live, keep_alive, request.app.state.stopping),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _frames(
    live: AsyncIterator[Any], keep_alive: float, stopping: asyncio.Event
) -> AsyncIterator[bytes]:
    """Server-Sent Event frames, one per event, and a comment line whenever the log stays
    quiet for ``keep_alive`` seconds; a closing frame once the server is ``stopping``.
    The tail runs in a task of its own, feeding a bounded queue, so waiting for the next
    event can time out without cancelling it."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=QUEUED)

    async def pump() -> None:
        try:
            async for recorded in live:
                await queue.put(recorded)
        except Exception as error:  # the stream ends; the client reconnects and resumes
            await queue.put(error)
        else:
            await queue.put(_ENDED)

    feeding = asyncio.create_task(pump())
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        yield b": incident event stream\n\n"  # the headers go out now, not at the first event
        while True:
            if not queue.empty():  # no task to wait for: the usual case under load
                recorded = queue.get_nowait()
            else:
                getting = asyncio.ensure_future(queue.get())
                await asyncio.wait(
                    (getting, stopped), timeout=keep_alive, return_when=asyncio.FIRST_COMPLETED
                )
                if not getting.done():
                    getting.cancel()  # a cancelled get leaves its item in the queue
                    if stopped.done():
                        yield _closing_frame(_STOPPING)
                        return
                    yield b": keep-alive\n\n"
                    continue
                recorded = getting.result()
            if recorded is _ENDED or isinstance(recorded, Exception):
                yield _closing_frame(recorded)
                return
            yield (
                b"id: %d\nevent: %s\ndata: %s\n\n"
                % (recorded.position, recorded.event_type.encode(), _encoder.encode(recorded))
            )
    finally:
        stopped.cancel()
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding


_ENDED = object()  # the tail finished (its store closed), as opposed to failed
_STOPPING = object()  # the server is stopping


def _on_stop_signals(stopping: asyncio.Event) -> Callable[[], None]:
    """Set ``stopping`` on SIGINT or SIGTERM, then do what was to be done (the server's
    own handler: uvicorn's starts its graceful shutdown). Signals reach the main thread
    only: elsewhere nothing is installed. Returns what puts the handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    before: dict[int, Any] = {}

    def on_signal(number: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stopping.set)
        previous = before.get(number)
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_DFL:  # nobody else listens: as if not here
            signal.signal(number, signal.SIG_DFL)
            signal.raise_signal(number)

    for number in (signal.SIGINT, signal.SIGTERM):
        # None: a handler set outside Python (an embedding host), which could be neither
        # called on nor put back afterwards, so it keeps the signal
        if signal.getsignal(number) is not None:
            before[number] = signal.signal(number, on_signal)

    def restore() -> None:
        for number, previous in before.items():
            if signal.getsignal(number) is on_signal:
                signal.signal(number, previous)

    return restore


def _closing_frame(why: object) -> bytes:
    """The last frame of a stream whose tail stopped: an ``error`` event saying why, so
    a client is not left guessing between a quiet log and a dead stream. Its reconnect
    (``Last-Event-ID``: the last ``id`` it got) resumes where it was."""
    if isinstance(why, Exception):
        log.warning("incident: an event stream's tail failed; the stream ends", exc_info=why)
        body = {"error": type(why).__name__, "message": str(why)}
    elif why is _STOPPING:
        body = {"error": "StreamClosed", "message": "the server is stopping"}
    else:
        body = {"error": "StreamClosed", "message": "the event store was closed"}
    return b"retry: %d\nevent: error\ndata: %s\n\n" % (RECONNECT_MS, _encoder.encode(body))
