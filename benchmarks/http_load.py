"""The Bank over HTTP (`incident serve`) against the AsyncCommandHandler it wraps, called
directly (issue 19): 64 concurrent clients, ratios measured in one run.

    python benchmarks/http_load.py [--only sqlite|postgres] [--commands 2000]
                                   [--rounds 3] [--dir DIR] [--postgres-url URL]

``direct``: 64 tasks on one AsyncCommandHandler in this process dispatch ``--commands``
DepositMoney commands over 64 accounts. ``http``: a server process (`incident serve`,
uvicorn, one worker, no access log) on a fresh store, and 64 concurrent keep-alive
clients in this process (plain HTTP/1.1 on asyncio streams) posting the same commands
over loopback; the client's CPU is on the same 2 cores as
the server's, as in any load test on one machine. ``bare``: the same client against an
ASGI app that does nothing (bare_asgi.py), the cost of HTTP alone here, which bounds
http/direct at bare / (bare + direct). After each HTTP run the log is
checked: every acknowledged event in it once, positions without a gap. The figure is
http throughput over direct throughput (goal: at least 0.7). Every measurement takes
its turn in every round, on a fresh database; medians over rounds are reported. Run by
hand; never part of the test suite.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import common
import httpx
import msgspec

import incident
from incident.examples import bank

CLIENTS = 64
REQUEST = (
    b"POST /commands/DepositMoney HTTP/1.1\r\nHost: bench\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
)


def commands(count: int) -> list[bank.DepositMoney]:
    return [bank.DepositMoney(aggregate_id=f"H{n % CLIENTS}", amount=1) for n in range(count)]


async def run_direct(url: str, count: int) -> float:
    async with bank.build_async(url) as app:
        for n in range(CLIENTS):
            await app.dispatch(bank.OpenAccount(aggregate_id=f"H{n}"))
        todo = commands(count)
        start = time.perf_counter()

        async def task(n: int) -> None:
            for command in todo[n::CLIENTS]:
                await app.dispatch(command)

        await asyncio.gather(*(task(n) for n in range(CLIENTS)))
        return count / (time.perf_counter() - start)


def start_server(url: str | None, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    """`incident serve` on ``url``, or with None the bare ASGI app (bare_asgi.py)."""
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if url is None:
        bare = [
            "--app-dir",
            str(Path(__file__).parent),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        command = ["uvicorn", "bare_asgi:app", "--port", str(port), *bare]
    else:
        command = ["incident", "serve", "--store", url, "--port", str(port)]
        command += ["--workers", str(workers)]
    server = subprocess.Popen(
        [sys.executable, "-m", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not start")


async def post_all(base: str, count: int) -> tuple[float, set[str]]:
    """``count`` deposits from CLIENTS keep-alive connections, each a plain HTTP/1.1
    client on asyncio streams: httpx's async client costs more CPU per request than the
    server does (about 200 requests/s per connection here), and on one machine the load
    generator's CPU is taken from the server's."""
    host, port = base.removeprefix("http://").split(":")
    acknowledged: set[str] = set()
    async with httpx.AsyncClient(base_url=base, timeout=60) as setup:
        for n in range(CLIENTS):
            await setup.post("/commands/OpenAccount", json={"aggregate_id": f"H{n}"})
    bodies = [msgspec.json.encode(command) for command in commands(count)]

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for body in bodies[n::CLIENTS]:
            writer.write(REQUEST % (len(body), body))
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = msgspec.json.decode(await reader.readexactly(length))
            if status.split()[1] != b"200":
                raise SystemExit(f"the server answered {status!r}: {answer}")
            acknowledged.update(e["event_id"] for e in answer["events"])
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return count / (time.perf_counter() - start), acknowledged


def run_http(url: str, count: int, workers: int) -> float:
    server, base = start_server(url, workers)
    try:
        rate, acknowledged = asyncio.run(post_all(base, count))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    with closing(incident.open_event_store(url)) as store:
        log = list(store.read_all())
    ids = [r.event_id for r in log]
    assert [r.position for r in log] == list(range(1, len(log) + 1)), "a gap in the log"
    assert len(set(ids)) == len(ids), "an event twice"
    assert acknowledged <= set(ids), "an acknowledged command is not in the log"
    return rate


def run_bare(count: int) -> float:
    """The same client against bare_asgi.py: what HTTP alone allows here."""
    server, base = start_server(None, 1)
    try:
        rate, _ = asyncio.run(post_all(base, count))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    return rate


def fresh_url(backend: str, folder: Path, postgres_url: str) -> str:
    name = f"http_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        return f"sqlite:///{folder / name}.db"
    return common.with_schema(postgres_url, name)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--only", choices=["sqlite", "postgres"], default=None)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--server-workers",
        type=lambda text: [int(w) for w in text.split(",")],
        default=[1, 2],
        help="server process counts to measure (incident serve --workers), e.g. 1,2",
    )
    common.add_dir(parser, "where the SQLite files go (default: a temporary folder)")
    common.add_postgres_url(parser, "--postgres-url", "the Postgres server")
    options = parser.parse_args()
    backends = [options.only] if options.only else ["sqlite", "postgres"]
    folder = Path(options.dir or tempfile.mkdtemp(prefix="http_load_"))
    print(f"{os.cpu_count()} CPUs, {CLIENTS} clients, {options.commands} commands per run")
    for backend in backends:
        direct: list[float] = []
        bare: list[float] = []
        http: dict[int, list[float]] = {w: [] for w in options.server_workers}
        for round_number in range(options.rounds):
            direct.append(
                asyncio.run(
                    run_direct(fresh_url(backend, folder, options.postgres_url), options.commands)
                )
            )
            for workers, rates in http.items():
                url = fresh_url(backend, folder, options.postgres_url)
                rates.append(run_http(url, options.commands, workers))
            bare.append(run_bare(options.commands))
            print(f"  {backend} round {round_number + 1}: direct {direct[-1]:,.0f}/s, ", end="")
            print(", ".join(f"http x{w} {r[-1]:,.0f}/s" for w, r in http.items()), end="")
            print(f", bare HTTP {bare[-1]:,.0f}/s")
        d = statistics.median(direct)
        b = statistics.median(bare)
        # if a command cost nothing over HTTP beyond what the bare app's request costs,
        # one would take 1/d + 1/b seconds: the best http/direct this machine allows
        print(f"{backend}: bare HTTP {b:,.0f} req/s; so http/direct at best {b / (b + d):.2f}")
        for workers, rates in http.items():
            h = statistics.median(rates)
            print(f"{backend}: direct {d:,.0f} cmd/s, http ({workers} server processes) ", end="")
            print(f"{h:,.0f} cmd/s, http/direct {h / d:.2f} (goal >= 0.7)")


if __name__ == "__main__":
    main()
