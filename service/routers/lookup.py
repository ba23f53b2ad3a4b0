"""``POST /v1/lookup``: IDs in, float32 embeddings out, for one or several tables per request.

The body is read on the event loop.  Small requests (the common ranking case, up to
``inline_max_body_bytes``) are answered right there: their lookup takes tens of microseconds,
less than the hand-off to a worker thread.  Larger ones are decoded, looked up and encoded in
the thread pool (the decoder releases the GIL), so they never stall the loop.
Every check happens before any lookup runs: a bad request is answered with a 4xx and nothing
was looked up (the counters do not move either)."""

from __future__ import annotations

import time

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from compression.pooling import validate_offsets

from ..errors import ApiError, error_response, parse_json_body
from ..security import require_reader
from ..state import AppState
from ..wire import (
    BINARY_REQUEST_TYPE,
    BINARY_RESPONSE_TYPE,
    OCTET_STREAM,
    STATUS_PRUNED,
    LookupOutput,
    LookupRequest,
    LookupResponse,
    ParsedLookup,
    WireError,
    encode_binary_response,
    parse_binary_request,
)

router = APIRouter(prefix="/v1", tags=["lookup"])

# The handler reads the raw body (two content types), so FastAPI cannot infer the schema; we
# declare it here and add the models to the OpenAPI components in add_openapi_components().
_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/LookupRequest"}},
            BINARY_REQUEST_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def add_openapi_components(spec: dict) -> dict:  # type: ignore[type-arg]
    """Put LookupRequest (and the models it refers to) into ``components/schemas``."""
    schema = LookupRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(schema.pop("$defs", {}))
    components["LookupRequest"] = schema
    return spec


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


def wants_binary(accept: str | None) -> bool:
    kinds = {_media_type(part) for part in (accept or "").split(",")}
    return BINARY_RESPONSE_TYPE in kinds or OCTET_STREAM in kinds


def parse_body(body: bytes, content_type: str) -> list[ParsedLookup]:
    if content_type == BINARY_REQUEST_TYPE:
        try:
            return parse_binary_request(body)
        except WireError as exc:
            raise ApiError(400, "malformed_body", str(exc)) from exc
    if content_type not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", f"send application/json or {BINARY_REQUEST_TYPE}, not {content_type!r}")
    request = parse_json_body(body, LookupRequest)
    return [
        ParsedLookup(
            item.table,
            np.asarray(item.ids, dtype=np.int64).reshape(-1),
            None if item.offsets is None else np.asarray(item.offsets, dtype=np.int64).reshape(-1),
            item.pooling,
        )
        for item in request.lookups
    ]


def check_limits(state: AppState, lookups: list[ParsedLookup]) -> None:
    settings = state.settings
    if len(lookups) > settings.max_lookups_per_request:
        raise ApiError(413, "too_large", f"{len(lookups)} lookups in one request; the limit is {settings.max_lookups_per_request}")
    total = sum(int(item.ids.shape[0]) for item in lookups)
    if total > settings.max_ids_per_request:
        raise ApiError(413, "too_large", f"{total} IDs in one request; the limit is {settings.max_ids_per_request}")
    for k, item in enumerate(lookups):
        hosted = state.tables.get(item.table)
        if hosted is None:
            raise ApiError(404, "unknown_table", f"lookups[{k}]: no table named {item.table!r}")
        if item.pooling == "none":
            if item.offsets is not None and item.offsets.shape[0]:
                raise ApiError(422, "invalid_request", f"lookups[{k}]: offsets need pooling 'sum' or 'mean'")
        else:
            if item.offsets is None or item.offsets.shape[0] == 0:
                raise ApiError(422, "invalid_request", f"lookups[{k}]: pooling {item.pooling!r} needs bag offsets")
            try:
                validate_offsets(torch.from_numpy(item.offsets), int(item.ids.shape[0]))
            except ValueError as exc:
                raise ApiError(422, "invalid_request", f"lookups[{k}]: {exc}") from exc


def run_lookups(state: AppState, lookups: list[ParsedLookup]) -> list[LookupOutput]:
    metrics = state.metrics
    outputs = []
    for item in lookups:
        hosted = state.tables.get(item.table)
        assert hosted is not None  # checked in check_limits
        ids = torch.from_numpy(item.ids)
        started = time.perf_counter()
        if item.pooling == "none":
            result = hosted.table.lookup(ids)
        else:
            assert item.offsets is not None
            result = hosted.table.lookup_bags(ids, torch.from_numpy(item.offsets), item.pooling)
        metrics.lookup_latency.labels(item.table).observe(time.perf_counter() - started)
        metrics.lookup_ids.labels(item.table).inc(int(ids.shape[0]))
        if state.applier is not None:
            state.applier.record_lookup(item.table, item.ids)  # frequencies, fed off the request path
        if result.num_unknown:
            metrics.unknown_ids.labels(item.table).inc(result.num_unknown)
        # found flags in numpy: one torch op costs more than the whole comparison at ranking batch sizes
        found = result.locators.cpu().numpy() >= 0
        status = None
        if result.pruned is not None:  # only tables with a pruned (dim-0) class
            pruned = result.pruned.cpu().numpy()
            found &= ~pruned
            status = found.astype(np.uint8)
            status[pruned] = STATUS_PRUNED
        outputs.append(LookupOutput(item.table, result.values.cpu().numpy(), found, result.num_unknown, result.num_pruned, status))
    return outputs


def encode_json(outputs: list[LookupOutput]) -> bytes:
    return orjson.dumps(
        {
            "results": [
                {
                    "table": o.table, "shape": list(o.values.shape), "embeddings": o.values, "found": o.found,
                    "unknown": o.unknown, "pruned": o.pruned,
                }
                for o in outputs
            ]
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def handle_lookup(state: AppState, body: bytes, content_type: str, binary: bool) -> Response:
    lookups = parse_body(body, content_type)
    check_limits(state, lookups)
    outputs = run_lookups(state, lookups)
    if binary:
        return Response(encode_binary_response(outputs), media_type=BINARY_RESPONSE_TYPE)
    return Response(encode_json(outputs), media_type="application/json")


@router.post(
    "/lookup",
    summary="Look up embeddings for IDs in one or more tables",
    response_model=LookupResponse,
    openapi_extra=_BODY_SCHEMA,
    responses={
        200: {"content": {BINARY_RESPONSE_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
        400: {"description": "malformed body"},
        404: {"description": "unknown table"},
        413: {"description": "request over a size limit"},
        415: {"description": "unsupported content type"},
        422: {"description": "request does not match the schema"},
    },
)
async def lookup(request: Request) -> Response:
    """Documents the endpoint; requests normally reach :func:`answer_lookup` through
    :class:`LookupFastPath` without passing FastAPI's routing."""
    return await answer_lookup(request.app.state.embserve, request)


async def answer_lookup(state: AppState, request: Request) -> Response:
    await require_reader(request, state)
    body = await request.body()
    content_type = _media_type(request.headers.get("content-type"))
    binary = wants_binary(request.headers.get("accept"))
    if len(body) <= state.settings.inline_max_body_bytes:
        return handle_lookup(state, body, content_type, binary)  # cheaper than a thread hop (~0.3 ms)
    return await run_in_threadpool(handle_lookup, state, body, content_type, binary)


class LookupFastPath:
    """ASGI middleware that answers ``POST /v1/lookup`` itself.

    FastAPI's routing, request handling and exception middleware cost ~0.25 ms a request on
    the reference VM, more than a whole batch-1 lookup.  This sits inside the body-size and
    metrics middlewares (so limits and ``embserve_http_*`` still apply, under the route's own
    template) and answers with the same function and the same error shape as the route."""

    PATH = "/v1/lookup"

    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state
        self.route = next((r for r in router.routes if getattr(r, "path", None) == self.PATH), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.PATH:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what RequestMetricsMiddleware labels the request with
        try:
            response = await answer_lookup(self.state, Request(scope, receive))
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
        await response(scope, receive, send)
