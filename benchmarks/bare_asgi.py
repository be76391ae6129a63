"""The ceiling of HTTP on this machine for `http_load.py`: an ASGI app that reads the
request and answers 200 with a fixed small JSON body, doing nothing else, served by the
same uvicorn (httptools, uvloop) as `incident serve`. What the Bank's server does beyond
this is incident's part of a request."""

from __future__ import annotations

from typing import Any

BODY = b'{"events":[]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body", False):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
