"""The Bank over HTTP (incident/web.py, incident/examples/bank/web.py), served by
`incident serve` as a real process on a free loopback port and driven by an HTTP
client: every status code the API promises, the live event stream, and a concurrent
load after which money is conserved and the log has no gap and no duplicate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest

import incident
from incident.examples import bank

START = 60.0  # seconds for a server to answer /health before the test gives up on it
TIMEOUT = httpx.Timeout(60.0)


def free_port() -> int:
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """`incident serve` in a process group of its own, stopped (SIGINT, then SIGKILL)
    after; whatever of the group is left then (its worker processes, should the server
    have died without stopping them) is killed too."""

    def __init__(self, store_url: str, *options: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.said = ""  # the end of its stderr, once stopped
        command = [sys.executable, "-m", "incident", "serve", "--store", store_url]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port), *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its workers join its group, which stop() ends
        )
        deadline = time.monotonic() + START
        while True:
            assert self.process.poll() is None, self.stopped_saying()
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    def stopped_saying(self) -> str:
        self.process.wait(10)
        return (self.process.stderr.read() if self.process.stderr else b"").decode()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        with contextlib.suppress(ProcessLookupError):  # nothing left of the group
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.stderr and not self.process.stderr.closed:  # stopped once only
            self.said = self.process.stderr.read().decode()[-4000:]
            self.process.stderr.close()


@pytest.fixture
def strict_server(initialized_url: str) -> Iterator[tuple[Server, str]]:
    """A server that gives up on a conflict at once (--retries 0)."""
    server = Server(initialized_url, "--retries", "0")
    try:
        yield server, initialized_url
    finally:
        server.stop()


def post(base: str, command: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{base}/commands/{command}", json=body, headers=headers, timeout=TIMEOUT)


def test_every_status_code_the_api_promises(strict_server: tuple[Server, str]) -> None:
    server, url = strict_server
    base = server.base
    opened = post(base, "OpenAccount", {"aggregate_id": "A"})
    assert opened.status_code == 200
    assert [e["event_type"] for e in opened.json()["events"]] == ["AccountOpened"]
    assert post(base, "DepositMoney", {"aggregate_id": "A", "amount": 50}).status_code == 200

    invalid = post(base, "DepositMoney", {"aggregate_id": "A", "amount": 0})
    assert invalid.status_code == 422
    assert invalid.json()["error"] == "InvalidCommand" and invalid.json()["field"] == "amount"
    missing = post(base, "DepositMoney", {"aggregate_id": "A"})
    assert (missing.status_code, missing.json()["field"]) == (422, "amount")
    not_json = httpx.post(f"{base}/commands/DepositMoney", content=b"{", timeout=TIMEOUT)
    assert not_json.status_code == 422
    # valid for the command's type, but no store could keep it: the client's to change
    too_long = post(base, "OpenAccount", {"aggregate_id": "x" * 256})
    assert too_long.status_code == 422
    assert too_long.json()["error"] == "Unstorable" and too_long.json()["what"] == "aggregate_id"
    too_big = post(base, "DepositMoney", {"aggregate_id": "A", "amount": 2**64})
    assert (too_big.status_code, too_big.json()["error"]) == (422, "Unstorable")

    unknown = post(base, "StealMoney", {"aggregate_id": "A"})
    assert unknown.status_code == 404 and "DepositMoney" in unknown.json()["commands"]
    not_posted = httpx.get(f"{base}/commands/DepositMoney", timeout=TIMEOUT)
    assert not_posted.status_code == 405 and not_posted.headers["allow"] == "POST"
    assert httpx.post(f"{base}/commands/", timeout=TIMEOUT).status_code == 404
    assert httpx.post(f"{base}/commands/a/b", timeout=TIMEOUT).status_code == 404

    rejected = post(base, "WithdrawMoney", {"aggregate_id": "A", "amount": 500})
    assert rejected.status_code == 409
    assert rejected.json() | {"message": ""} == {
        "error": "Rejected",
        "message": "",
        "reason": "no_enough_balance",
        "detail": None,
    }

    # another writer moves A on: the server's cached state is stale, and with no retries
    # its next command to A conflicts; the one after reads the stream again
    with bank.build(url) as other:
        other.dispatch(bank.DepositMoney(aggregate_id="A", amount=1))
    conflict = post(base, "DepositMoney", {"aggregate_id": "A", "amount": 2})
    assert conflict.status_code == 409
    assert conflict.json()["error"] == "ConcurrencyError" and conflict.json()["actual"] == 3
    assert post(base, "DepositMoney", {"aggregate_id": "A", "amount": 3}).status_code == 200

    account = httpx.get(f"{base}/accounts/A", timeout=TIMEOUT)
    assert account.status_code == 200 and account.json()["balance"] == 54
    at_two = httpx.get(f"{base}/accounts/A", params={"version": 2}, timeout=TIMEOUT)
    assert at_two.json() == {
        "account_id": "A",
        "version": 2,
        "state": {"account_number": "A", "balance": 50},
    }
    assert httpx.get(f"{base}/accounts/A?version=99", timeout=TIMEOUT).status_code == 404
    assert httpx.get(f"{base}/accounts/A?version=x", timeout=TIMEOUT).status_code == 422
    assert httpx.get(f"{base}/accounts/nobody", timeout=TIMEOUT).status_code == 404

    keyed = {"Idempotency-Key": "k1"}
    first = post(base, "DepositMoney", {"aggregate_id": "A", "amount": 5}, **keyed)
    again = post(base, "DepositMoney", {"aggregate_id": "A", "amount": 5}, **keyed)
    assert first.status_code == again.status_code == 200
    assert first.json()["events"] == again.json()["events"]
    assert httpx.get(f"{base}/accounts/A", timeout=TIMEOUT).json()["balance"] == 59


def frames(lines: Iterator[str], count: int) -> list[dict[str, str]]:
    """The next ``count`` Server-Sent Events (comment lines skipped)."""
    found: list[dict[str, str]] = []
    frame: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if frame:
                found.append(frame)
                frame = {}
                if len(found) == count:
                    return found
            continue
        name, _, value = line.partition(": ")
        frame[name] = value
    raise AssertionError(f"the stream ended after {len(found)} events")


def test_the_event_stream_delivers_what_is_dispatched_after_it_opened_in_order(
    strict_server: tuple[Server, str],
) -> None:
    server, _ = strict_server
    base = server.base
    post(base, "OpenAccount", {"aggregate_id": "S"})
    with httpx.stream("GET", f"{base}/events", params={"after": 1}, timeout=TIMEOUT) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        sent = [post(base, "DepositMoney", {"aggregate_id": "S", "amount": n}) for n in (1, 2, 3)]
        got = frames(lines, 3)
    expected = [r.json()["events"][0] for r in sent]
    assert [int(f["id"]) for f in got] == [e["position"] for e in expected] == [2, 3, 4]
    assert [f["event"] for f in got] == ["MoneyDeposited"] * 3
    assert [json.loads(f["data"]) for f in got] == expected

    # a client that reconnects says the last id it saw, and resumes right after it
    resume = {"Last-Event-ID": "2"}
    with httpx.stream("GET", f"{base}/events", headers=resume, timeout=TIMEOUT) as again:
        assert [int(f["id"]) for f in frames(again.iter_lines(), 2)] == [3, 4]
    bad = httpx.get(f"{base}/events", params={"after": "-1"}, timeout=TIMEOUT)
    assert bad.status_code == 422


ACCOUNTS = [f"L{n}" for n in range(16)]
CLIENTS = 64
COMMANDS = 2_000


async def load(base: str) -> list[tuple[str, dict[str, Any], str | None, int, Any]]:
    """COMMANDS commands from CLIENTS concurrent clients: deposits, withdrawals (some
    beyond the balance: rejected), transfers (some beyond the balance: cancelled), and
    deposits sent twice at once under one key (one must be stored, both answered alike).
    Every command has its key, so a client whose connection drops sends it again, as a
    client over a real network does: what a command did is then still counted once."""
    # the client lets an idle connection go well before the server's keep-alive timeout
    # (uvicorn: 5 s) can close it under a request it is sending
    limits = httpx.Limits(
        max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=1.0
    )
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT, limits=limits) as client:

        async def send(command: str, body: dict[str, Any], key: str | None) -> Any:
            headers = {"Idempotency-Key": key} if key else {}
            for attempt in range(3):
                try:
                    response = await client.post(f"/commands/{command}", json=body, headers=headers)
                    break
                except httpx.TransportError:  # a connection the server was closing
                    if key is None or attempt == 2:
                        raise
            return (command, body, key, response.status_code, response.json())

        for account in ACCOUNTS:
            await send("OpenAccount", {"aggregate_id": account}, None)
        plan: list[tuple[str, dict[str, Any], str | None]] = []
        for n in range(COMMANDS - len(ACCOUNTS)):
            account, other = ACCOUNTS[n % len(ACCOUNTS)], ACCOUNTS[(n * 7 + 3) % len(ACCOUNTS)]
            kind = n % 5
            own = f"command-{n}"
            if kind in (0, 1):
                plan.append(("DepositMoney", {"aggregate_id": account, "amount": 10}, own))
            elif kind == 2:
                plan.append(("WithdrawMoney", {"aggregate_id": account, "amount": 15}, own))
            elif kind == 3 and account != other:
                body = {
                    "aggregate_id": f"T{n}",
                    "source_account_number": account,
                    "destination_account_number": other,
                    "amount": 12,
                }
                plan.append(("RequestTransfer", body, own))
            else:
                key = f"key-{n // 2}"  # two in a row share a key
                plan.append(("DepositMoney", {"aggregate_id": account, "amount": 1}, key))
        queue: asyncio.Queue[tuple[str, dict[str, Any], str | None]] = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)
        results: list[Any] = []

        async def client_loop() -> None:
            while not queue.empty():
                results.append(await send(*queue.get_nowait()))

        await asyncio.gather(*(client_loop() for _ in range(CLIENTS)))
        return results


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-processes"])
def test_a_concurrent_load_loses_nothing_and_duplicates_nothing(
    initialized_url: str, workers: int
) -> None:
    """With two server processes (``--workers 2``) each has its own handler and cache on
    the same store: a command decided on a stale state conflicts and is decided again,
    and the two sends of a key may reach different processes, yet one is stored."""
    server = Server(initialized_url, "--workers", str(workers))
    try:
        try:
            results = asyncio.run(load(server.base))
        except httpx.TransportError as error:
            server.stop()
            raise AssertionError(f"{error!r}; the server said: {server.said}") from error
        balances = {
            account: httpx.get(f"{server.base}/accounts/{account}", timeout=TIMEOUT).json()
            for account in ACCOUNTS
        }
    finally:
        server.stop()
    statuses = Counter(status for *_, status, _ in results)
    assert set(statuses) <= {200, 409}, statuses
    refused = [answer for *_, status, answer in results if status == 409]
    assert {answer["error"] for answer in refused} <= {"Rejected"}
    assert statuses[409] > 0  # withdrawals beyond the balance were mixed in

    with closing(incident.open_event_store(initialized_url)) as store:
        log = list(store.read_all())
    assert [r.position for r in log] == list(range(1, len(log) + 1))
    ids = Counter(r.event_id for r in log)
    assert max(ids.values()) == 1
    answered = {
        e["event_id"] for *_, status, answer in results if status == 200 for e in answer["events"]
    }
    assert answered <= set(ids), "an acknowledged event is not in the log"
    keyed: dict[str, list[Any]] = {}
    for _, _, key, status, answer in results:
        if key is not None:
            keyed.setdefault(key, []).append((status, answer))
    for answers in keyed.values():  # both sends of a key got the one outcome
        assert all(answer == answers[0] for answer in answers)

    # money is conserved: what the accepted deposits and withdrawals moved (a key's
    # deposit once, however often it was sent); transfers only move it between accounts
    expected, counted = 0, set()
    for command, body, key, status, _ in results:
        if status != 200 or command not in ("DepositMoney", "WithdrawMoney"):
            continue
        if key is not None:
            if key in counted:
                continue
            counted.add(key)
        expected += body["amount"] if command == "DepositMoney" else -body["amount"]
    assert sum(b["balance"] for b in balances.values()) == expected
    assert all(b["balance"] >= 0 for b in balances.values())
    keyed_deposits = [r for r in log if r.event_type == "MoneyDeposited" and r.data.amount == 1]
    assert len(keyed_deposits) == len({key for key in counted if key.startswith("key-")})


def test_serve_refuses_workers_on_a_store_of_one_process() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "incident", "serve", "--store", "memory://", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "needs a store the processes share" in done.stderr


def test_serve_without_the_web_extra_names_it(tmp_path: Any) -> None:
    """`incident serve` names the extra to install when uvicorn (or starlette) is missing."""
    blocker = (
        "import sys, runpy; sys.modules['uvicorn'] = None; sys.argv = ['incident', 'serve', "
        f"'--store', 'sqlite:///{tmp_path / 'x.db'}']; runpy.run_module('incident', "
        "run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "pip install 'incident[web]'" in done.stderr


@pytest.mark.parametrize("stopping", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_server_stopping_ends_its_event_streams_and_exits(
    initialized_url: str, stopping: signal.Signals
) -> None:
    """A server told to stop while a client follows the event stream does not wait for
    the client to leave: the stream's last frame says StreamClosed, and it exits."""
    server = Server(initialized_url)
    try:
        with httpx.stream("GET", f"{server.base}/events", timeout=TIMEOUT) as stream:
            lines = stream.iter_lines()
            post(server.base, "OpenAccount", {"aggregate_id": "S"})
            assert frames(lines, 1)[0]["event"] == "AccountOpened"
            server.process.send_signal(stopping)
            deadline = time.monotonic() + 10  # keep-alive comments come every 15 s at most
            ending = (line for line in lines if time.monotonic() < deadline or _too_late())
            [last] = frames(ending, 1)
        assert last["event"] == "error"
        assert json.loads(last["data"])["error"] == "StreamClosed"
        # it exits (uvicorn raises the signal again once stopped: SIGTERM's own exit)
        assert server.process.wait(20) in (0, -stopping), server.stopped_saying()
    finally:
        server.stop()


def _too_late() -> bool:
    raise AssertionError("the stream went on after the server was told to stop")


def test_an_event_stream_whose_tail_fails_says_so_and_ends(caplog: Any) -> None:
    """A stream whose tail stops does not go quiet as if the log were idle: it ends
    with an ``error`` event naming the failure (and logs it), or saying the store closed,
    and the client's reconnect from the last id it got resumes there."""
    from incident.examples.bank import web

    app = web.app("memory://")

    async def scenario() -> list[list[dict[str, str]]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                for name in ("F1", "F2"):
                    opened = await client.post("/commands/OpenAccount", json={"aggregate_id": name})
                    assert opened.status_code == 200
                store = app.state.handler.event_store
                real_subscribe = store.subscribe

                async def failing(after: int = 0, **options: Any) -> Any:
                    async for recorded in real_subscribe(after=after, **options):
                        yield recorded
                        raise incident.StoreError("the server went away")

                async def ending(after: int = 0, **options: Any) -> Any:
                    async for recorded in real_subscribe(after=after, **options):
                        yield recorded
                        return  # as a tail does once its store is closed

                store.subscribe = failing
                first = await client.get("/events", params={"after": 0})
                again = await client.get("/events", headers={"Last-Event-ID": "1"})
                store.subscribe = ending
                closed = await client.get("/events", params={"after": 0})
                return [frames(iter(r.text.splitlines()), 2) for r in (first, again, closed)]

    with caplog.at_level("WARNING", logger="incident.web"):
        first, again, closed = asyncio.run(scenario())
    assert closed[0]["id"] == "1" and closed[1]["event"] == "error"
    assert json.loads(closed[1]["data"])["error"] == "StreamClosed"
    for got, position in ((first, "1"), (again, "2")):
        assert got[0]["id"] == position and got[0]["event"] == "AccountOpened"
        assert got[1]["event"] == "error" and got[1]["retry"] == "1000"
        assert json.loads(got[1]["data"]) == {
            "error": "StoreError",
            "message": "the server went away",
        }
    assert "tail failed" in caplog.text


def test_read_routes_answer_a_failing_store_and_odd_numbers_in_json() -> None:
    """A read side whose store fails answers 503 StoreError in JSON, as a command does
    (it was a bare 500); a version or position in other digits than ASCII ("²", "٣"),
    or spelled as int() alone would take it ("+1", "1_0"), is a 422; a path no route
    takes is a 404 in JSON too."""
    from incident.examples.bank import web

    app = web.app("memory://")

    async def scenario() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                opened = await client.post("/commands/OpenAccount", json={"aggregate_id": "A"})
                assert opened.status_code == 200
                answers = [
                    await client.get("/accounts/A", params={"version": odd})
                    for odd in ("\u00b2", "\u0663", "+1")
                ]
                answers += [
                    await client.get("/events", params={"after": odd})
                    for odd in ("+1", "1_0", "\u0661")
                ]
                await app.state.handler.event_store.close()  # every read fails from now on
                for path in ("/accounts/A", "/accounts/A?version=1", "/transfers/T"):
                    answers.append(await client.get(path))
                for path in ("/commands/", "/commands/OpenAccount/", "/nowhere"):
                    answers.append(await client.post(path, json={}))
                return answers

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [422] * 6 + [503] * 3 + [404] * 3
    assert all(a.headers["content-type"] == "application/json" for a in answers)
    assert [a.json()["error"] for a in answers[6:]] == ["StoreError"] * 3 + ["NotFound"] * 3
