"""The HTTP API's answers that the served-process tests (test_web.py) do not reach,
driven in process through httpx's ASGI transport: a stream owned by another aggregate,
a failing store on the command and health routes, a commit whose outcome is unknown,
two command types sharing a name, a client that leaves before its body arrives, the
keep-alive comments of a quiet stream, and the stop-signal hook's care for handlers it
cannot chain to."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

import incident
from incident import web
from incident.examples import bank
from incident.examples.bank import web as bank_web

Scenario = Callable[[httpx.AsyncClient, Any], Awaitable[Any]]


def served(scenario: Scenario, app: Any = None) -> Any:
    """Run ``scenario(client, app)`` against the Bank's app on a memory store, between
    its startup and its shutdown."""
    app = app if app is not None else bank_web.app("memory://")

    async def run() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                return await scenario(client, app)

    return asyncio.run(run())


def test_a_command_to_a_stream_of_another_aggregate_is_a_409_foreign_stream() -> None:
    """Aggregate ids are one space per store: depositing into a transfer's stream is
    refused with 409 ForeignStream naming the id, and writes nothing."""

    async def scenario(client: httpx.AsyncClient, app: Any) -> tuple[httpx.Response, int]:
        for name in ("A", "B"):
            opened = await client.post("/commands/OpenAccount", json={"aggregate_id": name})
            assert opened.is_success
        requested = await client.post(
            "/commands/RequestTransfer",
            json={
                "aggregate_id": "T1",
                "source_account_number": "A",
                "destination_account_number": "B",
                "amount": 1,
            },
        )
        assert requested.is_success
        before = await app.state.handler.event_store.last_position()
        foreign = await client.post(
            "/commands/DepositMoney", json={"aggregate_id": "T1", "amount": 5}
        )
        return foreign, before - await app.state.handler.event_store.last_position()

    foreign, written = served(scenario)
    assert foreign.status_code == 409
    assert foreign.json()["error"] == "ForeignStream"
    assert foreign.json()["aggregate_id"] == "T1"
    assert written == 0


def test_an_account_route_at_a_version_of_a_transfer_stream_is_a_404() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> list[httpx.Response]:
        for name in ("A", "B"):
            await client.post("/commands/OpenAccount", json={"aggregate_id": name})
        body = {
            "aggregate_id": "T1",
            "source_account_number": "A",
            "destination_account_number": "B",
            "amount": 1,
        }
        assert (await client.post("/commands/RequestTransfer", json=body)).is_success
        return [
            await client.get("/accounts/T1", params={"version": 1}),
            await client.get("/transfers/T1"),
            await client.get("/transfers/nobody"),
        ]

    as_account, transfer, nobody = served(scenario)
    assert as_account.status_code == 404 and "transfer" in as_account.json()["message"]
    assert transfer.status_code == 200 and transfer.json()["aggregate_id"] == "T1"
    assert nobody.status_code == 404 and nobody.json()["error"] == "NotFound"


def test_a_failing_store_answers_commands_and_health_with_503_in_json() -> None:
    async def scenario(client: httpx.AsyncClient, app: Any) -> list[httpx.Response]:
        healthy = await client.get("/health")
        await app.state.handler.event_store.close()
        command = await client.post("/commands/OpenAccount", json={"aggregate_id": "A"})
        return [healthy, command, await client.get("/health")]

    healthy, command, health = served(scenario)
    assert healthy.json() == {"ok": True, "last_position": 0}
    for answer in (command, health):
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"] == "StoreError"


def test_a_commit_of_unknown_outcome_is_a_503_naming_the_event_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CommitUnknown says the command may be stored: the answer carries the event ids
    to look for, so a client can tell before it retries without a key."""

    async def scenario(client: httpx.AsyncClient, app: Any) -> httpx.Response:
        async def lost(command: Any, metadata: Any = None) -> Any:
            raise incident.CommitUnknown("the connection dropped", command.aggregate_id, ["e1"])

        monkeypatch.setattr(app.state.handler, "dispatch", lost)
        return await client.post("/commands/OpenAccount", json={"aggregate_id": "A"})

    answer = served(scenario)
    assert answer.status_code == 503
    assert answer.json()["error"] == "CommitUnknown" and answer.json()["event_ids"] == ["e1"]


def _named_alike() -> list[incident.Aggregate[int]]:
    aggregates = []
    for name in ("left", "right"):

        class Change(incident.Command):
            aggregate_id: str

        class Changed(incident.Event, tag=f"{name}.Changed"):
            by: int

        aggregates.append(_one_command(name, Change, Changed))
    return aggregates


def _one_command(name: str, change: type[Any], changed: type[Any]) -> incident.Aggregate[int]:
    aggregate: incident.Aggregate[int] = incident.Aggregate(name, initial=0)
    aggregate.execute(change)(lambda state, cmd: changed(by=1))
    aggregate.apply(changed)(lambda state, event: state + event.by)
    return aggregate


def test_two_command_types_with_one_name_are_refused_when_the_app_starts() -> None:
    """POST /commands/Change could not tell the two apart: the app does not start."""
    app = web.command_app(
        lambda: incident.AsyncCommandHandler("memory://", aggregates=_named_alike())
    )

    async def start() -> None:
        async with app.router.lifespan_context(app):
            raise AssertionError("the app started")

    with pytest.raises(incident.RegistrationError, match="'Change'"):
        asyncio.run(start())


def test_a_client_that_leaves_before_its_body_is_not_answered_and_nothing_is_written() -> None:
    app = bank_web.app("memory://")
    sent: list[Any] = []

    async def scenario() -> int:
        async with app.router.lifespan_context(app):
            messages = iter(
                [{"type": "http.request", "body": b'{"aggregate_id"', "more_body": True}]
            )

            async def receive() -> Any:
                return next(messages, {"type": "http.disconnect"})

            async def send(message: Any) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/commands/OpenAccount",
                "headers": [],
                "app": app,
            }
            await app(scope, receive, send)
            last: int = await app.state.handler.event_store.last_position()
            return last

    assert asyncio.run(scenario()) == 0
    assert sent == []


def test_a_quiet_event_stream_sends_keep_alive_comments_then_the_next_event() -> None:
    """Driven as raw ASGI (httpx's transport would wait for the stream's end)."""
    app = web.command_app(lambda: bank.build_async("memory://"), keep_alive=0.05)
    bodies: list[bytes] = []
    arrived = asyncio.Event()

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            leave = asyncio.Event()

            async def receive() -> Any:
                await leave.wait()
                return {"type": "http.disconnect"}

            async def send(message: Any) -> None:
                if message["type"] == "http.response.body":
                    bodies.append(message.get("body", b""))
                    arrived.set()

            async def until(found: Callable[[], bool]) -> None:
                async with asyncio.timeout(10):
                    while not found():
                        arrived.clear()
                        await arrived.wait()

            scope = {
                "type": "http",
                "method": "GET",
                "path": "/events",
                "query_string": b"",
                "headers": [],
                "app": app,
            }
            streaming = asyncio.create_task(app(scope, receive, send))
            await until(lambda: bodies.count(b": keep-alive\n\n") >= 2)
            await app.state.handler.dispatch(bank.OpenAccount(aggregate_id="A"))
            await until(lambda: bodies[-1].startswith(b"id: "))
            leave.set()
            async with asyncio.timeout(10):
                await streaming

    asyncio.run(scenario())
    assert bodies[0] == b": incident event stream\n\n"
    assert set(bodies[1:-1]) == {b": keep-alive\n\n"}
    assert bodies[-1].startswith(b"id: 1\nevent: AccountOpened\ndata: ")


def test_the_stop_hook_leaves_a_handler_set_outside_python_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handler installed by C code (an embedding host) reads as None: it can neither
    be called on nor put back, so the hook does not take its place; the other signal,
    whose handler is Python's, is hooked and restored."""
    real_getsignal = signal.getsignal
    foreign = signal.SIGTERM

    def getsignal(number: int) -> Any:
        return None if number == foreign else real_getsignal(number)

    monkeypatch.setattr(web.signal, "getsignal", getsignal)
    sigint_before = real_getsignal(signal.SIGINT)
    sigterm_before = real_getsignal(foreign)

    async def hook() -> tuple[Any, Any]:
        restore = web._on_stop_signals(asyncio.Event())
        hooked = real_getsignal(signal.SIGINT), real_getsignal(foreign)
        restore()
        return hooked

    hooked_sigint, hooked_sigterm = asyncio.run(hook())
    assert hooked_sigterm is sigterm_before
    assert hooked_sigint is not sigint_before and callable(hooked_sigint)
    assert real_getsignal(signal.SIGINT) is sigint_before
