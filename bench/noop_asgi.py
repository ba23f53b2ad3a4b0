"""A no-op ASGI app: answers every POST with the same 280 bytes, nothing else.

``bench/service.py`` serves it with uvicorn next to the service, so the HTTP server's own CPU
per request (protocol parsing, the event loop, the socket writes) is measured in the same run:
the floor under any Python ASGI service on the machine."""

from __future__ import annotations

from typing import Any

BODY = b"\0" * 280
_HEADERS = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # drain the request body
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": BODY})
