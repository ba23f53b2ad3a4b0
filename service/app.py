"""The FastAPI application: routers, error handlers, the body-size guard and request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .errors import ApiError, error_response, install_error_handlers
from .metrics import ServiceMetrics
from .registry import TableRegistry
from .applier import Applier
from .batching import DeviceBytesCollector, LookupBatching, resolve_window_us, warm_up
from .routers import admin, health, lookup, metrics, updates, v2
from .routers import tables as tables_router
from .updatelog import open_log
from .settings import Settings
from .startup import load_tables
from .state import AppState

log = logging.getLogger("embserve")


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes with 413: at once when Content-Length says so, and
    while streaming when it does not (chunked uploads)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.limit:
                    status = 413 if declared > self.limit else 400
                    message = f"body over the {self.limit}-byte limit" if status == 413 else "bad Content-Length"
                    await error_response(status, "too_large" if status == 413 else "bad_request", message)(scope, receive, send)
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, "too_large", f"body over the {self.limit}-byte limit")
            return message

        await self.app(scope, limited_receive, send)


class RequestMetricsMiddleware:
    """Count and time every HTTP request by route template (never by raw path: IDs could be in it)."""

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            m = self.state.metrics
            m.http_requests.labels(template, method, str(status)).inc()
            m.http_latency.labels(template, method).observe(time.perf_counter() - started)
            if status >= 400:
                m.http_errors.labels(template, str(status)).inc()


class EmbservApp(FastAPI):
    """FastAPI with one layer in front of Starlette's whole middleware stack (error handling
    included): the lookup fast path, which answers ``POST /v1/lookup`` itself and hands every
    other request to the stack."""

    outermost: tuple[type, dict[str, Any]] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.outermost is None:
            return stack
        cls, options = self.outermost
        return cls(stack, **options)  # type: ignore[no-any-return]


def create_app(settings: Settings | None = None, registry: TableRegistry | None = None) -> FastAPI:
    """Build the app.  With ``registry`` given, its tables are served as they are; otherwise the
    tables folder is loaded at start-up."""
    settings = settings or Settings()
    torch.set_num_threads(settings.torch_threads)  # always set: the default (1) is a serving choice
    tables = registry or TableRegistry(settings.device, settings.sketch_width, settings.frequency_half_life_s)
    state = AppState(settings, tables, ServiceMetrics(tables))
    state.batching = LookupBatching(resolve_window_us(settings.batch_window_us, settings.device), settings.max_batch_ids, state.metrics.registry)
    state.metrics.registry.register(DeviceBytesCollector(tables))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if registry is None:
            load_tables(settings, tables)  # a SIGINT/SIGTERM meanwhile stops the process (service/startup.py)
            warmed = warm_up(tables)  # GPU tables: compile the kernels before the first request
            if warmed:
                log.info("compiled the GPU lookup kernels of %s", ", ".join(warmed))
        state.update_log = open_log(settings.redis_url, settings.sqlite_path(), settings.redis_stream)
        for problem in state.update_log.check_durability():
            log.warning("update log: %s", problem)
        state.applier = Applier(state.update_log, tables, state.metrics, settings)
        state.applier.start()  # replays the log from the tables' positions; /readyz waits for it
        tables.ready = True
        grpc_server = None
        if settings.grpc_port is not None:
            from . import grpc_v2  # grpcio only when the endpoint is on

            grpc_server = await grpc_v2.start(state)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=2.0)
            state.applier.stop()
            state.applier.snapshot_all(only_dirty=True)  # a clean stop leaves nothing to replay
            state.update_log.close()

    app = EmbservApp(
        title="embserve",
        version=__version__,
        summary="Compressed embedding tables over HTTP",
        lifespan=lifespan,
    )
    app.state.embserve = state
    install_error_handlers(app)
    for router in (lookup.router, updates.router, tables_router.router, admin.router, health.router, metrics.router, v2.router):
        app.include_router(router)
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = lookup.add_openapi_components(base_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.outermost = (lookup.LookupFastPath, {"state": state})  # does its own limits, auth, errors and metrics
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, state=state)
    return app


def app_factory() -> Any:
    """``uvicorn service.app:app_factory --factory``: settings from the environment."""
    return create_app()
