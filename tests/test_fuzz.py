"""Fuzz every operation of the API from its own OpenAPI schema (schemathesis): whatever the
generated request, the service answers without a server error, and errors keep the JSON shape.

The app runs with its lifespan (update log, applier) and a write token, and the fuzzer sends
that token, so the write and admin paths are exercised past the auth check."""

from __future__ import annotations

import tempfile
from pathlib import Path

import orjson
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from starlette.types import Receive, Scope, Send

from compression import compress_uniform
from compression.layout import RowClass
from service.app import create_app
from service.registry import TableRegistry
from service.settings import Settings

TOKEN = "fuzz-token-0123456789abcdef"


def _app():  # type: ignore[no-untyped-def]
    registry = TableRegistry("cpu")
    registry.add("emb", compress_uniform(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)), RowClass(8, 8)))
    folder = Path(tempfile.mkdtemp(prefix="embserve-fuzz-"))
    app = create_app(
        Settings(tables_dir=folder, token=TOKEN, max_updates_per_request=512, max_ids_per_request=4096, max_body_bytes=1 << 20),
        registry=registry,
    )
    runner = TestClient(app)
    runner.__enter__()  # run the lifespan once; the fuzzer's own clients share the app's state
    assert app.state.embserve.applier.wait_caught_up(10)
    return app


APP = _app()


async def served_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The app without lifespan events: schemathesis opens a test client per call, and each
    would otherwise start (and stop) a fresh update log and applier."""
    if scope["type"] != "lifespan":
        await APP(scope, receive, send)
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@schemathesis.serializer("application/x-embserve-lookup", "application/x-embserve-updates", "application/octet-stream")
def raw_bytes(_: object, value: object) -> bytes:
    """Binary bodies are declared as ``format: binary`` strings: send what was generated, as bytes."""
    return value if isinstance(value, bytes) else str(value).encode()


schema = schemathesis.openapi.from_asgi("/openapi.json", served_app)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    response = case.call(headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis keeps every value of a header
    if response.status_code >= 400 and content_type.startswith("application/json"):
        error = orjson.loads(response.content)["error"]
        assert error if case.path.startswith("/v2") else {"status", "code", "message"} <= set(error)
