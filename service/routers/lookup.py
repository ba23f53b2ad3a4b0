"""``POST /v1/lookup``: IDs in, float32 embeddings out, for one or several tables per request.

The body is read on the event loop.  Small requests (the common ranking case, up to
``inline_max_body_bytes``) are answered right there: their lookup takes tens of microseconds,
less than the hand-off to a worker thread.  Larger ones are decoded, looked up and encoded in
the thread pool (the decoder releases the GIL), so they never stall the loop.
Every check happens before any lookup runs: a bad request is answered with a 4xx and nothing
was looked up (the counters do not move either)."""

from __future__ import annotations

import hmac
import logging
import struct
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from compression.kernels.cpu_c import answer_buffer
from compression.pooling import validate_offsets
from compression.table import CompressedTable, LookupResult

from ..buffered import SLICE_BYTES, STREAM_MIN_BYTES, BufferResponse
from ..errors import ApiError, error_body, parse_json_body
from ..response_size import JSON_BYTES_PER_VALUE, check_lookup_response
from ..security import check_reader, require_reader
from ..state import AppState
from ..wire import (
    BINARY_REQUEST_TYPE,
    BINARY_RESPONSE_TYPE,
    DTYPE_CODES,
    DTYPE_ITEMSIZE,
    OCTET_STREAM,
    REQUEST_MAGIC,
    RESPONSE_MAGIC,
    RESPONSE_MAGIC_16,
    DType,
    STATUS_PRUNED,
    LookupOutput,
    LookupRequest,
    LookupResponse,
    ParsedLookup,
    WireError,
    binary_response_size,
    parse_binary_request,
    write_response_head,
    write_result_head,
)

router = APIRouter(prefix="/v1", tags=["lookup"])
log = logging.getLogger("embserve")

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


def accept_dtype(accept: str | None) -> DType | None:
    """The ``dtype=`` parameter of the Accept header (``application/x-embserve-tensor; dtype=f16``,
    also honoured with application/json): the values' precision for lookups that name none."""
    if not accept or "dtype" not in accept:
        return None
    for part in accept.split(","):
        for param in part.split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "dtype":
                value = value.strip().strip('"').lower()
                if value not in DTYPE_CODES:
                    raise ApiError(406, "not_acceptable", f"Accept dtype must be one of {', '.join(DTYPE_CODES)}, not {value!r}")
                return value  # type: ignore[return-value]
    return None


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
            item.dtype,
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


def batching_on(state: AppState) -> bool:
    """Cross-request batching is on (merging needs requests answered on worker threads)."""
    return state.batching is not None and state.batching.enabled


def decode_into_answer(state: AppState, name: str, table: CompressedTable, series: tuple[Any, Any, Any], ids: bytes | bytearray, ids_at: int,
                       n: int, answer: bytearray, rows_at: int, status_at: int, dtype: torch.dtype) -> int | None:
    """The one-call answers of both protocols (HTTP's :meth:`LookupFastPath.answer_one_binary`,
    gRPC's planned ModelInfer): the ``n`` int64 IDs at ``ids[ids_at:]`` decoded into ``answer``
    (:meth:`CompressedTable.lookup_to_buffer`: rows of ``dtype``, 16-bit ones narrowed in C as
    they are decoded, and status bytes), timed and counted in the table's ``series`` (latency,
    IDs, unknown IDs) as every lookup is, and fed to the frequency sketch.  Returns the unknown
    count, or None when the table cannot answer this way (nothing written, nothing counted)."""
    started = time.perf_counter()
    num_unknown = table.lookup_to_buffer(ids, ids_at, n, answer, rows_at, status_at, dtype)
    if num_unknown is None:
        return None
    latency, counted, unknown = series
    latency.observe(time.perf_counter() - started)
    counted.inc(n)
    if num_unknown:
        unknown.inc(num_unknown)
    applier = state.applier
    if applier is not None:
        # the IDs' bytes as they came (little-endian int64); the applier makes the arrays, off the request path
        applier.record_lookup_bytes(name, ids[ids_at : ids_at + 8 * n])
    return num_unknown


def lookup_one(state: AppState, item: ParsedLookup, out: torch.Tensor | None = None) -> LookupResult:
    """One table lookup with its metrics and frequency feed; ``out`` (float32 ``[n, D]``, no
    pooling) is where the rows are decoded to: a view of the response buffer."""
    hosted = state.tables.get(item.table)
    assert hosted is not None  # checked in check_limits
    ids = torch.from_numpy(item.ids)
    started = time.perf_counter()
    if item.pooling == "none":
        if batching_on(state):
            # merged with concurrent lookups of the table (service/batching.py): the rows come
            # back in the merged answer, so they are copied into ``out``
            result = state.batching.lookup(item.table, hosted.table, item.ids)  # type: ignore[union-attr]
            if out is not None:
                out.copy_(result.values)
                result = LookupResult(out, result.locators, result.num_unknown)
        else:
            result = hosted.table.lookup(ids, out=out)
    else:
        assert item.offsets is not None
        result = hosted.table.lookup_bags(ids, torch.from_numpy(item.offsets), item.pooling)
    latency, counted, unknown = state.metrics.table_children(item.table)
    latency.observe(time.perf_counter() - started)
    counted.inc(int(ids.shape[0]))
    if state.applier is not None:
        state.applier.record_lookup(item.table, item.ids)  # frequencies, fed off the request path
    if result.num_unknown:
        unknown.inc(result.num_unknown)
    return result


def _as_dtype(values: torch.Tensor, dtype: str) -> np.ndarray:
    """Values for a JSON answer at the asked precision (bf16, which numpy lacks, as the exact
    float32 of the rounded value)."""
    if dtype == "f16":
        return values.cpu().to(torch.float16).numpy()
    if dtype == "bf16":
        return values.cpu().to(torch.bfloat16).to(torch.float32).numpy()
    return values.cpu().numpy()


def run_lookups(state: AppState, lookups: list[ParsedLookup], default_dtype: DType | None = None) -> list[LookupOutput]:
    outputs = []
    for item in lookups:
        result = lookup_one(state, item)
        # found flags in numpy: one torch op costs more than the whole comparison at ranking batch sizes
        found = result.locators.cpu().numpy() >= 0
        status = None
        if result.pruned is not None:  # only tables with a pruned (dim-0) class
            pruned = result.pruned.cpu().numpy()
            found &= ~pruned
            status = found.astype(np.uint8)
            status[pruned] = STATUS_PRUNED
        values = _as_dtype(result.values, item.dtype or default_dtype or "f32")
        outputs.append(LookupOutput(item.table, values, found, result.num_unknown, result.num_pruned, status))
    return outputs


def lookup_binary(state: AppState, lookups: list[ParsedLookup], default_dtype: DType | None = None) -> bytes:
    """Run the lookups and answer in the binary format, decoding every table's rows straight
    into the one response buffer (f32; 16-bit values are converted into it in one pass)."""
    if len(lookups) == 1:
        item = lookups[0]
        if item.pooling == "none" and (item.dtype or default_dtype or "f32") == "f32":
            return _lookup_binary_f32(state, item)
    dtypes = [item.dtype or default_dtype or "f32" for item in lookups]
    dims = [state.tables.get(item.table).table.dim for item in lookups]  # type: ignore[union-attr]
    shapes = [
        (int(item.ids.shape[0]) if item.pooling == "none" else int(item.offsets.shape[0]), dim, int(item.ids.shape[0]), dtype)  # type: ignore[union-attr]
        for item, dim, dtype in zip(lookups, dims, dtypes, strict=True)
    ]
    wide = any(dtype != "f32" for dtype in dtypes)
    buf = bytearray(binary_response_size(shapes))
    pos = write_response_head(buf, len(lookups), wide)
    for item, (rows, dim, n, dtype) in zip(lookups, shapes, strict=True):
        head = pos
        pos = write_result_head(buf, head, rows, dim, n, 0, dtype, wide)
        count = rows * dim
        view = torch.frombuffer(buf, dtype=TORCH_DTYPES[dtype], count=count, offset=pos).view(rows, dim) if count else None
        direct = view is not None and dtype == "f32" and item.pooling == "none"
        result = lookup_one(state, item, view if direct else None)
        if view is not None and not direct:
            view.copy_(result.values)  # the one pass that converts (or the pooled rows)
        if result.num_unknown:
            write_result_head(buf, head, rows, dim, n, result.num_unknown, dtype, wide)
        pos += DTYPE_ITEMSIZE[dtype] * count
        _write_statuses(buf, pos, n, result)
        pos += n + (-(DTYPE_ITEMSIZE[dtype] * count + n) % 4)
    return bytes(buf) if len(buf) < _COPY_BELOW else buf  # type: ignore[return-value]


def _lookup_binary_f32(state: AppState, item: ParsedLookup) -> bytes:
    """:func:`lookup_binary` of the common request - one table, float32 rows, no pooling - with
    the same bytes and less Python around them: at batch 1 that Python is most of the lookup."""
    n = int(item.ids.shape[0])
    dim = state.tables.get(item.table).table.dim  # type: ignore[union-attr]  # checked in check_limits
    count = n * dim
    buf = bytearray(binary_response_size([(n, dim, n, "f32")]))
    head = write_response_head(buf, 1, False)
    pos = write_result_head(buf, head, n, dim, n, 0, "f32", False)
    # the rows are decoded straight into the answer (lookup_one's ``out``)
    view = torch.frombuffer(buf, dtype=torch.float32, count=count, offset=pos).view(n, dim) if count else None
    result = lookup_one(state, item, view)
    if result.num_unknown:
        write_result_head(buf, head, n, dim, n, result.num_unknown, "f32", False)
    _write_statuses(buf, pos + 4 * count, n, result)  # then zero padding to 4 bytes: the buffer's own zeros
    return bytes(buf) if len(buf) < _COPY_BELOW else buf  # type: ignore[return-value]


# answer_one_binary's request head (wire.py's _HEAD then one _ENTRY: magic, count | name length,
# pooling, dtype, IDs, offsets) and answer head (_HEAD then one _RESULT: rows, dim, n, unknown)
_ONE_HEAD = struct.Struct("<4sIHBBII")
_ONE_ANSWER_HEAD = struct.Struct("<4sIIIII")
_ONE_ROWS_AT = _ONE_ANSWER_HEAD.size
# the same for a 16-bit answer (EMR2: _HEAD then one _RESULT_16, which adds the dtype code); the
# unknown count sits at the same offset in both heads
_ONE_ANSWER_HEAD_16 = struct.Struct("<4sIIIIII")
_ONE_ROWS_AT_16 = _ONE_ANSWER_HEAD_16.size
_ONE_UNKNOWN = struct.Struct("<I")
_ONE_UNKNOWN_AT = _ONE_ANSWER_HEAD.size - _ONE_UNKNOWN.size  # the last field of the EMR1 head
_DTYPE_OF_CODE: dict[int, DType] = {1: "f32", 2: "f16", 3: "bf16"}  # a lookup's own dtype code (0: the request's default)
# LookupFastPath keeps at most this many plans (one per body length seen); then starts over
_PLANS_MAX = 64


class _OnePlan(NamedTuple):
    """What :meth:`LookupFastPath.answer_one_binary` works out from a request's head (every body
    byte before the IDs) and its table: the same for every request with that head, so worked
    out once.  Valid while the registry still hosts ``hosted`` holding ``table``."""

    prefix: bytes  # the body up to its IDs: magic, count, name length, pooling, dtype, n, offsets, name
    name: str
    hosted: Any  # the HostedTable
    table: Any  # its CompressedTable when planned
    n: int  # IDs
    ids_at: int  # where the IDs start in the body
    size: int  # answer bytes
    rows_at: int  # where the rows start (after the answer head)
    values_end: int  # where the rows end and the status bytes start
    padding: bytes  # zeros after the status bytes, to 4 bytes
    answer_head: bytes  # EMR1, 1 | rows, dim, n, unknown=0 (EMR2 with the dtype code for 16-bit values)
    series: tuple[Any, Any, Any]  # the table's lookup latency, IDs and unknown-IDs series
    accept: DType | None  # the Accept header's dtype it was planned for
    wide: torch.dtype | None  # the 16-bit dtype of the answer's values, None for float32


# up to this many IDs the status bytes are written from a Python list: cheaper than the three
# numpy calls (buffer view, tensor view, comparison) below ~16 IDs
_PY_STATUS_MAX = 8


def _write_statuses(buf: bytearray, pos: int, n: int, result: LookupResult) -> None:
    """One status byte per ID at ``buf[pos:pos + n]``: 1 found, 0 unknown, STATUS_PRUNED pruned."""
    if not n:
        return
    if n <= _PY_STATUS_MAX:
        for k, locator in enumerate(result.locators.tolist()):
            if locator >= 0:
                buf[pos + k] = 1
    else:
        status = np.frombuffer(buf, dtype=np.uint8, count=n, offset=pos)
        np.greater_equal(result.locators.numpy(), 0, out=status.view(np.bool_))  # 1 found, 0 unknown
    if result.pruned is not None and result.num_pruned:
        status = np.frombuffer(buf, dtype=np.uint8, count=n, offset=pos)
        status[result.pruned.cpu().numpy()] = STATUS_PRUNED


TORCH_DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}  # of each wire dtype
# small answers go out as bytes (what every server writes fastest); big ones as the bytearray
# itself, so the rows are never copied after decoding
_COPY_BELOW = 64 * 1024


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


def encode_json_parts(outputs: list[LookupOutput]) -> Iterator[bytes]:
    """:func:`encode_json`'s bytes exactly, produced a slice of rows at a time: a large JSON
    answer is never whole in memory, and no one ``orjson`` call holds the GIL for long."""
    yield b'{"results":['
    for k, o in enumerate(outputs):
        values = np.ascontiguousarray(o.values)  # orjson serializes only contiguous arrays (a no-op here)
        rows, dim = values.shape
        yield (b"," if k else b"") + b'{"table":' + orjson.dumps(o.table) + b',"shape":' + orjson.dumps([rows, dim]) + b',"embeddings":['
        step = max(1, SLICE_BYTES // max(1, dim * JSON_BYTES_PER_VALUE))
        for start in range(0, rows, step):
            # a row slice of a C-contiguous array is contiguous: orjson serializes it as nested lists
            rows_json = orjson.dumps(values[start : start + step], option=orjson.OPT_SERIALIZE_NUMPY)
            yield (b"," if start else b"") + rows_json[1:-1]
        yield (
            b'],"found":' + orjson.dumps(o.found, option=orjson.OPT_SERIALIZE_NUMPY) + b',"unknown":' + orjson.dumps(o.unknown)
            + b',"pruned":' + orjson.dumps(o.pruned) + b"}"
        )
    yield b"]}"


# An answer: one buffer (a big binary one is the bytearray the rows were decoded into), or the
# parts of a large JSON answer, encoded lazily as the socket drains.
Answer = bytes | bytearray | Iterator[bytes]
# (status, body, media type, extra headers) of an answer the fast paths build themselves
Reply = tuple[int, bytes | bytearray, str, list[tuple[bytes, bytes]]]


def is_large(payload: Answer) -> bool:
    """Sent in slices (service/buffered.py) rather than in one ``send``."""
    return not isinstance(payload, (bytes, bytearray)) or len(payload) > STREAM_MIN_BYTES


def handle_lookup(state: AppState, body: bytes, content_type: str, binary: bool, default_dtype: DType | None = None) -> Response:
    payload, media_type = answer_bytes(state, body, content_type, binary, default_dtype)
    if is_large(payload):
        return BufferResponse([payload] if isinstance(payload, (bytes, bytearray)) else payload, media_type)
    return Response(memoryview(payload), media_type=media_type)


def answer_bytes(state: AppState, body: bytes, content_type: str, binary: bool, default_dtype: DType | None = None) -> tuple[Answer, str]:
    """The whole lookup, body in, answer out: what both the route and the fast path run."""
    lookups, estimate = prepare_lookups(state, body, content_type, binary)
    return answer_prepared(state, lookups, estimate, binary, default_dtype)


def prepare_lookups(state: AppState, body: bytes, content_type: str, binary: bool) -> tuple[list[ParsedLookup], int]:
    """Parse and check a lookup body: the lookups and the answer's estimated bytes.  Raises
    every 4xx a lookup can get from its body; nothing is looked up and no metric moves, so a
    caller may still hand the request to another path after this (service/fasthttp.py does,
    for answers too large to write at once)."""
    lookups = parse_body(body, content_type)
    check_limits(state, lookups)
    estimate = check_lookup_response(state, lookups, binary)  # 413 before any row is decoded
    return lookups, estimate


def answer_prepared(state: AppState, lookups: list[ParsedLookup], estimate: int, binary: bool, default_dtype: DType | None = None) -> tuple[Answer, str]:
    """Run checked lookups (:func:`prepare_lookups`) and encode the answer."""
    if binary:
        return lookup_binary(state, lookups, default_dtype), BINARY_RESPONSE_TYPE
    outputs = run_lookups(state, lookups, default_dtype)
    if estimate > STREAM_MIN_BYTES:  # large: encoded a slice of rows at a time as it is sent
        return encode_json_parts(outputs), "application/json"
    return encode_json(outputs), "application/json"


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
    accept = request.headers.get("accept")
    binary = wants_binary(accept)
    dtype = accept_dtype(accept)
    if len(body) <= state.settings.inline_max_body_bytes and not batching_on(state):
        return handle_lookup(state, body, content_type, binary, dtype)  # cheaper than a thread hop (~0.3 ms)
    return await run_in_threadpool(handle_lookup, state, body, content_type, binary, dtype)


class LookupFastPath:
    """Outermost ASGI layer: answers ``POST /v1/lookup`` itself, before Starlette's stack.

    A batch-1 lookup is a few microseconds of decoding; FastAPI's routing, Starlette's error
    and exception middlewares, the Request/Response objects and prometheus' ``labels()`` calls
    were most of its server CPU (bench/results/profile_batch1.md).  So this layer does, for this
    one route, what those layers do - body-size limit (413), read-token check (401/403), the
    same error JSON, ``embserve_http_*`` metrics under the route's template, a 500 that hides
    internals - with nothing else in between.  Every other request passes through untouched.

    The checks and the metrics are methods shared with the HTTP-level fast path
    (:mod:`service.fasthttp`), which answers small lookups without ASGI at all: both paths
    must give the same answers, codes and counts."""

    PATH = "/v1/lookup"

    def __init__(self, app: ASGIApp, state: AppState, loop_thread: bool = False) -> None:
        """``loop_thread``: this instance is only ever called on one thread, the event loop's
        (service/fasthttp.py's protocols), so it counts into lock-free series
        (:meth:`ServiceMetrics.loop_series`) that a scrape adds to the locked ones."""
        self.app = app
        self.state = state
        self.loop_thread = loop_thread
        self.route = next((r for r in router.routes if getattr(r, "path", None) == self.PATH), None)
        metrics = state.metrics
        self._latency = self._child(metrics.http_latency, self.PATH, "POST")
        # status -> counter children, cached: labels() takes a lock and builds a key (microseconds)
        self._requests: dict[int, Any] = {}
        self._errors: dict[int, Any] = {}
        # settings read per request, fixed for the app's life (Settings is never changed at run
        # time, nor is the batching window): attribute reads a batch-1 lookup need not pay
        settings = state.settings
        self._read_token = settings.read_token
        self._max_ids = settings.max_ids_per_request
        self._inline_max = settings.inline_max_body_bytes
        self._max_response = settings.max_response_bytes
        self._batching = batching_on(state)
        self._granted: bytes | None = None  # the last Authorization value that passed the read check
        # body length -> the plan of the last batch-1-style binary request of that length
        self._plans: dict[int, _OnePlan] = {}

    def _child(self, metric: Any, *labelvalues: str) -> Any:
        """The series of ``metric`` this instance counts into: lock-free on the loop thread."""
        if self.loop_thread:
            return self.state.metrics.loop_series(metric, *labelvalues)
        return metric.labels(*labelvalues)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope["route"] = self.route
        status = 200
        extra: list[tuple[bytes, bytes]] = []
        try:
            headers = dict(scope["headers"])
            payload, media_type = await self._answer(headers, receive)
        except ApiError as exc:
            status, payload, media_type, extra = self.error_reply(exc)
        except Exception:  # noqa: BLE001 - an answer that says nothing about the internals, as for every route
            status, payload, media_type, extra = self.internal_error_reply()
        if status == 200 and is_large(payload):
            # sent in slices as the socket drains: the answer never exists twice (service/buffered.py)
            parts = [payload] if isinstance(payload, (bytes, bytearray)) else payload
            await BufferResponse(parts, media_type)(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", media_type.encode()), (b"content-length", str(len(payload)).encode()), *extra]})
            await send({"type": "http.response.body", "body": payload})
        self.record(status, started)

    def record(self, status: int, started: float) -> None:
        """Count and time one answered request (``embserve_http_*``, route template ``/v1/lookup``)."""
        counter = self._requests.get(status)
        if counter is None:
            counter = self._requests[status] = self._child(self.state.metrics.http_requests, self.PATH, "POST", str(status))
        counter.inc()
        self._latency.observe(time.perf_counter() - started)
        if status >= 400:
            errors = self._errors.get(status)
            if errors is None:
                errors = self._errors[status] = self._child(self.state.metrics.http_errors, self.PATH, str(status))
            errors.inc()

    @staticmethod
    def error_reply(exc: ApiError) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        """(status, body, media type, extra headers) of a refused lookup: the service's error JSON."""
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
        return exc.status, error_body(exc.status, exc.code, exc.message, exc.details), "application/json", extra

    def internal_error_reply(self) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        """The 500 of an unexpected error, logged with its traceback, saying nothing in the body."""
        log.exception("unhandled error on POST %s", self.PATH)
        return 500, error_body(500, "internal", "internal server error"), "application/json", []

    def check_head(self, headers: dict[bytes, bytes]) -> None:
        """What is refused before the body is read: a bad or too large Content-Length (400/413),
        a missing or wrong read token (401/403)."""
        state = self.state
        limit = state.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                raise ApiError(400, "bad_request", "bad Content-Length")
            if size > limit:
                raise ApiError(413, "too_large", f"body over the {limit}-byte limit")
        authorization = headers.get(b"authorization")
        check_reader(state, None if authorization is None else authorization.decode("latin-1"))

    @staticmethod
    def negotiate(headers: dict[bytes, bytes]) -> tuple[str, bool, DType | None]:
        """(request media type, binary answer?, asked dtype); 406 for a dtype we do not serve."""
        content_type = _media_type(headers.get(b"content-type", b"").decode("latin-1"))
        accept = headers.get(b"accept", b"").decode("latin-1")
        return content_type, wants_binary(accept), accept_dtype(accept)

    def inline(self, body_bytes: int) -> bool:
        """Answered on the event loop (else in the thread pool)."""
        return body_bytes <= self.state.settings.inline_max_body_bytes and not batching_on(self.state)

    def answer_now(self, headers: dict[bytes, bytes], body: bytes, started: float | None = None) -> Reply | None:
        """The whole answer to a lookup whose body is already here, computed right now, counted
        and timed; ``None`` (nothing counted, nothing looked up) when the request belongs on
        the ASGI path instead: a body for the thread pool, or an answer estimated large enough
        to be sent in slices.  The checks run in :meth:`__call__`'s order, so a request gets
        the same status, body and headers on either path.  ``started``: when the request's
        latency began (its headers' arrival), default now."""
        started = time.perf_counter() if started is None else started
        try:
            self.check_head(headers)
            content_type, binary, dtype = self.negotiate(headers)
            payload = self.answer_one_binary(body, content_type, binary, dtype)
            if payload is not None:
                self.record(200, started)
                return 200, payload, BINARY_RESPONSE_TYPE, []
            if not self.inline(len(body)):
                return None
            lookups, estimate = prepare_lookups(self.state, body, content_type, binary)
            if estimate > STREAM_MIN_BYTES:
                return None
            payload, media_type = answer_prepared(self.state, lookups, estimate, binary, dtype)
            reply: Reply = 200, payload, media_type, []  # type: ignore[assignment]  # small: bytes or bytearray
        except ApiError as exc:
            reply = self.error_reply(exc)
        except Exception:  # noqa: BLE001 - as in __call__
            reply = self.internal_error_reply()
        self.record(reply[0], started)
        return reply

    def answer_binary_now(self, authorization: bytes | None, body: bytes, started: float) -> bytes | bytearray | None:
        """:meth:`answer_now` for a head already known to ask exactly for a binary answer to a
        binary body (``Content-Type`` and ``Accept`` the two media types, nothing else) with a
        valid ``Content-Length`` under the body limit: the 200 answer's body, counted and timed,
        or None - nothing counted, nothing looked up - for :meth:`answer_now` to answer (a
        refused token, a request :meth:`answer_one_binary` does not take).  Why: at batch 1 the
        general checks and negotiation were a fifth of the request's Python."""
        # compare_digest: the remembered value is a valid token, so its comparison must not
        # say by its timing how much of a guess matched (as security.py compares tokens)
        granted = self._granted
        if self._read_token is not None and (authorization is None or granted is None or not hmac.compare_digest(authorization, granted)):
            try:
                check_reader(self.state, None if authorization is None else authorization.decode("latin-1"))
            except ApiError:
                return None
            self._granted = authorization  # tokens are settings, fixed: it will pass again
        payload = self.answer_one_binary(body)
        if payload is not None:
            self.record(200, started)
        return payload

    def answer_one_binary(self, body: bytes, content_type: str = BINARY_REQUEST_TYPE, binary: bool = True,
                          dtype: DType | None = None) -> bytes | bytearray | None:
        """The binary answer of the most common request - one table, no pooling, a small
        answer, float32 or 16-bit values - built with one C call
        (:meth:`CompressedTable.lookup_to_buffer`: IDs read from the body where they lie, rows
        and status bytes written into the answer; 16-bit values take one conversion pass more),
        or None for anything else, a malformed body included, which the general path then
        answers (and refuses) as it always did.  Same bytes, metrics and frequency feed as
        :func:`lookup_binary`; at batch 1 the general path's parse, checks and tensors were two
        thirds of the server's CPU for the request (bench/results/profile_batch1.md), and a
        16-bit answer, which asks for half the bytes, cost twice a float32 one there.

        ``content_type``, ``binary``, ``dtype``: the request's negotiation (:meth:`negotiate`);
        only a binary body asking for a binary answer is taken; ``dtype`` (the Accept header's)
        applies when the lookup's own dtype code is 0.

        The answer's layout (service/wire.py): ``EMR1`` u32 count=1 | u32 rows, dim, n, unknown |
        float32 rows [n, dim] | u8 status [n] | zero padding to 4 bytes; for f16/bf16 ``EMR2``,
        whose result head adds u32 dtype and whose rows are 2 bytes a value."""
        if not binary or content_type != BINARY_REQUEST_TYPE or len(body) < _ONE_HEAD.size:
            return None
        plan = self._plans.get(len(body))
        if (plan is None or plan.accept != dtype or not body.startswith(plan.prefix) or self.state.tables.get(plan.name) is not plan.hosted
                or plan.hosted.table is not plan.table):
            plan = self._plan_one(body, dtype)
            if plan is None:
                return None
        n = plan.n
        size = plan.size
        rows_at = plan.rows_at
        values_end = plan.values_end
        table = plan.table
        # not zero-filled (9 us at batch 1024): the head, the decoder's rows (unknown IDs' too)
        # and status bytes, and the padding are every byte of it
        answer = answer_buffer(size)
        answer[:rows_at] = plan.answer_head
        if plan.padding:
            answer[values_end + n :] = plan.padding  # zero padding to 4 bytes
        # 16-bit rows (plan.wide) are narrowed in C as they are decoded, rounded to nearest even
        # like the general path's torch conversion; that pass through a float32 scratch answer
        # and torch's copy_ made a batch-1024 fp16 answer cost 1.45x a float32 one, bf16 2.2x
        num_unknown = decode_into_answer(self.state, plan.name, table, plan.series, body, plan.ids_at, n, answer, rows_at, values_end,
                                         plan.wide or torch.float32)
        if num_unknown is None:
            return None
        if num_unknown:
            _ONE_UNKNOWN.pack_into(answer, _ONE_UNKNOWN_AT, num_unknown)  # the same field in EMR1 and EMR2 heads
        return bytes(answer) if size < _COPY_BELOW else answer  # type: ignore[return-value]  # as _lookup_binary_f32

    def _plan_one(self, body: bytes, accept: DType | None) -> _OnePlan | None:
        """The checks and sizes of :meth:`answer_one_binary` for ``body``'s head (all of the body
        but its IDs) and the Accept header's dtype, or None when it is not taken; remembered by
        the body's length, for the next request with the same head (the same table, number of
        IDs, dtype and settings give the same answer to every check)."""
        magic, count, name_len, pooling, dtype_code, n, n_offsets = _ONE_HEAD.unpack_from(body)
        ids_at = _ONE_HEAD.size + name_len
        if magic != REQUEST_MAGIC or count != 1 or pooling or dtype_code > 3 or n_offsets or len(body) != ids_at + 8 * n or not n:
            return None
        if n > self._max_ids or len(body) > self._inline_max or self._batching:
            return None
        try:
            name = body[_ONE_HEAD.size : ids_at].decode("utf-8")
        except UnicodeDecodeError:
            return None
        hosted = self.state.tables.get(name)
        if hosted is None:
            return None
        table = hosted.table
        dim = table.dim
        out_dtype = (accept or "f32") if dtype_code == 0 else _DTYPE_OF_CODE[dtype_code]
        if out_dtype == "f32":
            wide, rows_at = None, _ONE_ROWS_AT
            answer_head = _ONE_ANSWER_HEAD.pack(RESPONSE_MAGIC, 1, n, dim, n, 0)
        else:
            wide, rows_at = TORCH_DTYPES[out_dtype], _ONE_ROWS_AT_16
            answer_head = _ONE_ANSWER_HEAD_16.pack(RESPONSE_MAGIC_16, 1, n, dim, n, 0, DTYPE_CODES[out_dtype])
        value_bytes = DTYPE_ITEMSIZE[out_dtype] * n * dim
        values_end = rows_at + value_bytes
        size = values_end + n + (-(value_bytes + n) % 4)
        if size > STREAM_MIN_BYTES or value_bytes + n > self._max_response:
            return None
        metrics = self.state.metrics
        series = metrics.loop_table_children(name) if self.loop_thread else metrics.table_children(name)
        plan = _OnePlan(body[:ids_at], name, hosted, table, n, ids_at, size, rows_at, values_end, bytes(size - values_end - n),
                        answer_head, series, accept, wide)
        if len(self._plans) >= _PLANS_MAX:
            self._plans.clear()
        self._plans[len(body)] = plan
        return plan

    async def _answer(self, headers: dict[bytes, bytes], receive: Receive) -> tuple[Answer, str]:
        state = self.state
        self.check_head(headers)
        body = await _read_body(receive, state.settings.max_body_bytes)
        content_type, binary, dtype = self.negotiate(headers)
        payload = self.answer_one_binary(body, content_type, binary, dtype)  # granian, or the fast path off
        if payload is not None:
            return payload, BINARY_RESPONSE_TYPE
        if self.inline(len(body)):
            return answer_bytes(state, body, content_type, binary, dtype)  # cheaper than a thread hop (~0.3 ms)
        return await run_in_threadpool(answer_bytes, state, body, content_type, binary, dtype)


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes even when no Content-Length said so."""
    message = await receive()
    body = message.get("body", b"")
    if len(body) > limit:
        raise ApiError(413, "too_large", f"body over the {limit}-byte limit")
    if not message.get("more_body", False):
        if message["type"] == "http.disconnect":
            raise ApiError(400, "bad_request", "client disconnected")
        return body
    chunks = [body]
    seen = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "bad_request", "client disconnected")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise ApiError(413, "too_large", f"body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
