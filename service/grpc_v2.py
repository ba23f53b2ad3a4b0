"""KServe v2 (Open Inference Protocol) over gRPC, in the service's own process and event loop,
on ``EMBSERVE_GRPC_PORT``: what Triton's gRPC clients (``tritonclient.grpc``) call.

The messages and the service definition are the ones ``tritonclient[grpc]`` ships generated
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``): no hand-kept copy of the .proto.

Served: ``ServerLive``, ``ServerReady``, ``ServerMetadata``, ``ModelMetadata``, ``ModelReady``
and ``ModelInfer``.  A table is a model of the same name, version ``1``, with the tensors of
the HTTP form (``service/v2wire.py``): input ``ids`` (INT64/INT32/UINT32/UINT64, any shape),
optional ``offsets`` (INT64 [B]) with parameter ``pooling`` (``sum``/``mean``); outputs
``embeddings`` (FP32, or FP16/BF16 with parameter ``embeddings_datatype``) and ``found``
(BOOL).  Inputs come as ``raw_input_contents`` (what tritonclient sends) or typed
``contents``; outputs always go back as ``raw_output_contents``.

Same rules as HTTP: the read token in metadata ``authorization: Bearer <token>``, the same
limits (IDs, lookups, message size = ``max_body_bytes``), and the HTTP status of each refusal
mapped to its gRPC code (400/422 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
404 NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE), the response-size cap
(``EMBSERVE_MAX_RESPONSE_BYTES``, 2 bytes a value for FP16 / BF16).  A response carries parameter
``pruned`` (int64: IDs whose pruned row the unknown-ID policy filled), as over HTTP.  Calls are
counted in ``embserve_grpc_requests_total{method, code}`` and timed in
``embserve_grpc_request_duration_seconds{method}``.

Cost: ``ModelInfer`` takes the request's bytes (no deserializer) and answers bytes (no
serializer).  The common request - one INT64 ``ids`` input as raw contents, no pooling - is
answered by a *plan* worked out once per request head (every byte before the IDs, see
:class:`_InferPlan`): one C call decodes the rows and found flags straight into the response,
whose protobuf frame (service/grpc_wire.py) the plan holds.  Anything else - another ID type,
typed contents, pooling, a pruned table, an error - is parsed with ``ModelInferRequest`` and
answered by the general path, with the same answers and refusals as before.  A malformed
message is INVALID_ARGUMENT.  The rest of a call's cost is grpcio's own
(bench/results/grpc_cpu.md).
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from compression.kernels.cpu_c import answer_buffer

from . import __version__
from .errors import ApiError
from .grpc_wire import encode_infer_response, infer_response_frame, varint
from .response_size import check_infer_response
from .routers.lookup import TORCH_DTYPES, batching_on, check_limits, decode_into_answer, run_lookups
from .security import check_reader
from .state import AppState
from .v2wire import EMBEDDING_DATATYPES, ID_DTYPES, embedding_array
from .wire import DTYPE_ITEMSIZE, ParsedLookup

log = logging.getLogger("embserve")
MODEL_VERSION = "1"

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}
# typed contents field of each ID datatype
_CONTENTS = {"INT64": "int64_contents", "INT32": "int_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents"}


_Call = TypeVar("_Call", bound=Callable[..., Awaitable[Any]])


def _recorded(method: _Call) -> _Call:
    """Count the call by method and final status code and time it
    (``embserve_grpc_requests_total`` / ``embserve_grpc_request_duration_seconds``); an abort
    arrives here as the exception ``context.abort`` raises, with the code already set.  The
    series are looked up once per (method, code): ``labels()`` takes a lock and builds a key."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: "InferenceService", request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = "OK"
        try:
            return await method(self, request, context)
        except BaseException:
            status = context.code()
            code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
            raise
        finally:
            self.count(name, code, time.perf_counter() - started)

    return call  # type: ignore[return-value]


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def _param(params: Any, name: str, default: str) -> str:
    """A string parameter of the request (``InferParameter.string_param``)."""
    if name not in params:
        return default
    value = params[name]
    if value.WhichOneof("parameter_choice") != "string_param":
        raise _bad(f"parameter {name!r} must be a string")
    return str(value.string_param)


def _tensor(entry: Any, raw: bytes | None) -> np.ndarray:
    """One integer input as int64, its shape kept; from raw bytes or typed contents."""
    name, datatype = entry.name, entry.datatype
    if datatype not in ID_DTYPES:
        raise _bad(f"input {name!r}: datatype must be one of {', '.join(ID_DTYPES)}, not {datatype!r}")
    shape = [int(d) for d in entry.shape]
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise _bad(f"input {name!r}: shape must be at most 8 non-negative dimensions")
    count = int(np.prod(shape)) if shape else 1
    if raw is not None:
        itemsize = np.dtype(ID_DTYPES[datatype]).itemsize
        if len(raw) != count * itemsize:
            raise _bad(f"input {name!r}: {len(raw)} raw bytes, shape {shape} {datatype} needs {count * itemsize}")
        values = np.frombuffer(raw, dtype=ID_DTYPES[datatype], count=count)
    else:
        typed = list(getattr(entry.contents, _CONTENTS[datatype]))
        if len(typed) != count:
            raise _bad(f"input {name!r}: shape {shape} holds {count} elements, contents have {len(typed)}")
        values = np.asarray(typed, dtype=np.dtype(ID_DTYPES[datatype]).newbyteorder("="))
    if datatype == "UINT64" and values.size and int(values.max()) > np.iinfo(np.int64).max:
        raise _bad(f"input {name!r}: IDs above 2^63-1 are not supported")
    return values.astype(np.int64).reshape(shape)


# the ModelInferRequest field that carries raw input tensors: field 7, wire type 2 (bytes)
_RAW_INPUT_TAG = bytes([7 << 3 | 2])
# InferenceService keeps at most this many ModelInfer plans (one per request length seen); then starts over
_PLANS_MAX = 64


def _without_raw_inputs(head: bytes) -> bool:
    """``head`` is a whole message with no raw input contents: then ``head`` + one field-7
    entry parses as that message with exactly that one raw input."""
    try:
        return not pb.ModelInferRequest.FromString(head).raw_input_contents
    except DecodeError:
        return False


class _InferPlan(NamedTuple):
    """What :meth:`InferenceService.answer_planned` needs to answer a ``ModelInfer`` request of
    a given head: worked out once from a parsed request (:meth:`InferenceService.plan_infer`),
    valid for every request whose bytes are ``prefix`` followed by ``8 * n`` bytes of IDs,
    while the registry still hosts ``hosted`` holding ``table``.

    Why that is sound: a protobuf message's bytes parse as the merge of their parts, so a
    request ``prefix + ids`` parses as the message ``prefix`` ends in - every field the plan was
    checked against - plus one last ``raw_input_contents`` entry of exactly those IDs; only
    the IDs differ between two such requests, and the plan's checks do not depend on them."""

    prefix: bytes  # the request up to its IDs, the tag and length of its one raw input included
    name: str
    hosted: Any  # the HostedTable
    table: Any  # its CompressedTable when planned
    n: int  # IDs
    start: int  # where the response starts in the buffer (0..3 bytes: its float32 rows 4-aligned)
    size: int  # response bytes
    alloc: int  # buffer bytes: the response, then scratch for what the decoder writes but the response lacks
    pieces: tuple[tuple[int, bytes], ...]  # (buffer offset, bytes) of the response's protobuf frame
    rows_at: int  # where the decoder writes the rows (the response's, or scratch when it asks for none)
    status_at: int  # where it writes the found flags (1 found, 0 unknown)
    dtype: torch.dtype  # of the rows: float32, or fp16 / bf16 narrowed in C as they are decoded
    series: tuple[Any, Any, Any]  # the table's lookup latency, IDs and unknown-IDs series


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The endpoints; every refusal is an :class:`ApiError` turned into its gRPC status."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        settings = state.settings
        # settings read per call, fixed for the app's life
        self._read_token = settings.read_token
        self._inline_max = settings.inline_max_body_bytes
        self._granted: str | None = None  # the last authorization value that passed the read check
        self._plans: dict[int, _InferPlan] = {}  # request length -> plan of the last request of that length
        self._calls: dict[tuple[str, str], Any] = {}  # (method, code) -> counter series
        self._latency: dict[str, Any] = {}  # method -> histogram series

    def count(self, method: str, code: str, seconds: float) -> None:
        """One call in the gRPC metrics; the series cached (the handlers run on the event loop)."""
        counter = self._calls.get((method, code))
        if counter is None:
            counter = self._calls[(method, code)] = self.state.metrics.grpc_requests.labels(method, code)
        counter.inc()
        latency = self._latency.get(method)
        if latency is None:
            latency = self._latency[method] = self.state.metrics.grpc_latency.labels(method)
        latency.observe(seconds)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: ApiError) -> None:
        await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)

    def _auth(self, context: grpc.aio.ServicerContext) -> None:
        """The read check on metadata ``authorization`` (keys compared case-blind; the last one
        wins, as a dict of the metadata gave); a value that passed once passes again (tokens are
        settings, fixed), compared in constant time as security.py compares tokens."""
        if self._read_token is None:
            return
        token = None
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                token = value
        token = token if isinstance(token, str) else None
        granted = self._granted
        if token is not None and granted is not None and hmac.compare_digest(token.encode(), granted.encode()):
            return
        check_reader(self.state, token)
        self._granted = token

    def _hosted(self, name: str, version: str) -> Any:
        hosted = self.state.tables.get(name)
        if hosted is None or (version not in ("", MODEL_VERSION)):
            raise ApiError(404, "unknown_model", f"no model named {name!r}" + (f" with version {version!r}" if version else ""))
        return hosted

    def _ready(self) -> bool:
        applier = self.state.applier
        return bool(self.state.tables.ready) and (applier is None or (applier.caught_up and applier.gap is None))

    @_recorded
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    @_recorded
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self._ready())

    @_recorded
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerMetadataResponse(name="embserve", version=__version__, extensions=["binary_tensor_data"])

    @_recorded
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            self._auth(context)
            hosted = self._hosted(request.name, request.version)
        except ApiError as exc:
            await self._fail(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[MODEL_VERSION], platform="embserve",
            inputs=[tensor(name="ids", datatype="INT64", shape=[-1])],
            outputs=[tensor(name="embeddings", datatype="FP32", shape=[-1, hosted.table.dim]), tensor(name="found", datatype="BOOL", shape=[-1])],
        )

    @_recorded
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            self._auth(context)
            self._hosted(request.name, request.version)
        except ApiError as exc:
            await self._fail(context, exc)
        return pb.ModelReadyResponse(ready=self._ready())

    @_recorded
    async def ModelInfer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # noqa: N802
        """``request``: the serialized ``ModelInferRequest``; returns the serialized response."""
        try:
            self._auth(context)
            answer = self.answer_planned(request)
            if answer is not None:
                return answer
            if len(request) <= self._inline_max:
                return self.infer_bytes(request)  # small: cheaper than a thread hop, as on HTTP
            return await run_in_threadpool(self.infer_bytes, request)
        except ApiError as exc:
            await self._fail(context, exc)
        except Exception:  # noqa: BLE001 - as on HTTP: log it, say nothing about the internals
            log.exception("unhandled error in gRPC ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        raise AssertionError("unreachable: abort raises")

    def answer_planned(self, request: bytes) -> bytes | None:
        """The answer of a request a remembered plan covers (same length, same bytes up to the
        IDs, same table), or None: nothing looked up, nothing counted."""
        plan = self._plans.get(len(request))
        if plan is None or not request.startswith(plan.prefix) or self.state.tables.get(plan.name) is not plan.hosted or plan.hosted.table is not plan.table:
            return None
        return self._answer(plan, request, len(plan.prefix))

    def infer_bytes(self, raw: bytes) -> bytes:
        """Parse a serialized request (malformed: INVALID_ARGUMENT) and answer it: by a plan,
        remembered for the next request of that head, when it is the common request, else by
        :meth:`_infer`."""
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError as exc:
            raise _bad(f"malformed ModelInferRequest: {exc}") from None
        plan = self.plan_infer(request, raw)
        if plan is not None:
            ids = request.raw_input_contents[0]
            answer = self._answer(plan, ids, 0)
            if answer is not None:
                return answer
        return self._infer(request)

    def plan_infer(self, request: Any, raw: bytes) -> _InferPlan | None:
        """The plan of ``request`` (parsed from ``raw``), or None when the general path must
        answer it: anything but one INT64 ``ids`` input in raw contents with no pooling, on the
        event loop, with cross-request batching off; or any request the general path would
        refuse (it refuses it then, with its own message).  Remembered when ``raw`` ends with
        the IDs (what tritonclient sends: raw contents are the message's last field)."""
        state = self.state
        if len(raw) > self._inline_max or batching_on(state) or len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
            return None
        entry = request.inputs[0]
        if entry.name != "ids" or entry.datatype != "INT64":
            return None
        shape = [int(d) for d in entry.shape]
        if len(shape) > 8 or any(d < 0 for d in shape):
            return None
        n = int(np.prod(shape)) if shape else 1
        ids = request.raw_input_contents[0]
        if not n or len(ids) != 8 * n or n > state.settings.max_ids_per_request:
            return None
        name, version = request.model_name, request.model_version
        hosted = state.tables.get(name)
        if hosted is None or version not in ("", MODEL_VERSION):
            return None
        params = request.parameters  # others than these two the general path ignores too
        for key in ("pooling", "embeddings_datatype"):
            if key in params and params[key].WhichOneof("parameter_choice") != "string_param":
                return None
        if "pooling" in params and params["pooling"].string_param != "none":
            return None
        datatype = params["embeddings_datatype"].string_param if "embeddings_datatype" in params else "FP32"
        if datatype not in EMBEDDING_DATATYPES:
            return None
        wanted = [o.name for o in request.outputs] or ["embeddings", "found"]
        if sorted(wanted) not in (["embeddings"], ["found"], ["embeddings", "found"]):
            return None
        table = hosted.table
        dim = table.dim
        itemsize = DTYPE_ITEMSIZE[EMBEDDING_DATATYPES[datatype]]
        try:
            check_infer_response(state, dim, n, None, "none", dict.fromkeys(wanted, True), itemsize)
        except ApiError:
            return None
        sizes = {"embeddings": itemsize * n * dim, "found": n}
        shapes = {"embeddings": [*shape, dim], "found": shape}
        types = {"embeddings": datatype, "found": "BOOL"}
        frame = infer_response_frame(name, MODEL_VERSION, request.id, 0, [(o, types[o], shapes[o], sizes[o]) for o in wanted])
        offsets, at = [], 0  # of each piece and each content, in the response
        for piece, out_name in zip(frame, wanted, strict=True):
            offsets.append((at, at + len(piece)))
            at += len(piece) + sizes[out_name]
        size = at
        contents_at = {out_name: content for out_name, (_, content) in zip(wanted, offsets, strict=True)}
        # the response starts `start` bytes into the buffer, so that its rows sit at a multiple of
        # 4 (the decoder writes float32 rows only there; the buffer itself is malloc-aligned)
        start = -contents_at["embeddings"] % 4 if "embeddings" in contents_at else 0
        pieces = tuple((start + piece_at, piece) for (piece_at, _), piece in zip(offsets, frame, strict=True))
        alloc = start + size
        # what the response lacks the decoder still writes: into scratch after the response
        if "found" in contents_at:
            status_at = start + contents_at["found"]
        else:
            status_at, alloc = alloc, alloc + n
        if "embeddings" in contents_at:
            rows_at, dtype = start + contents_at["embeddings"], TORCH_DTYPES[EMBEDDING_DATATYPES[datatype]]
        else:
            rows_at, dtype = alloc + (-alloc % 4), torch.float32
            alloc = rows_at + 4 * n * dim
        # the tag and length of the one raw input sit right before its bytes when they end the message
        head = _RAW_INPUT_TAG + varint(len(ids))
        prefix = raw[: len(raw) - len(ids)]
        plan = _InferPlan(prefix, name, hosted, table, n, start, size, alloc, pieces, rows_at, status_at, dtype, state.metrics.table_children(name))
        if raw.endswith(ids) and prefix.endswith(head) and _without_raw_inputs(prefix[: len(prefix) - len(head)]):
            if len(self._plans) >= _PLANS_MAX:
                self._plans.clear()
            self._plans[len(raw)] = plan
        return plan

    def _answer(self, plan: _InferPlan, ids: bytes, ids_at: int) -> bytes | None:
        """Run a plan on the ``plan.n`` int64 IDs at ``ids[ids_at:]``: the serialized response,
        counted and timed as every lookup is, or None (nothing written, nothing counted) when
        the table cannot answer this way (a pruned class, no compiled decoder)."""
        n, table = plan.n, plan.table
        # not zero-filled: the frame, the decoder's rows and flags are every byte of the response
        answer = answer_buffer(plan.alloc)
        for at, piece in plan.pieces:
            answer[at : at + len(piece)] = piece
        # 16-bit rows are narrowed in C as they are decoded, rounded to nearest even like the
        # general path's conversion (a float32 copy and torch's copy_ cost more than the decode)
        if decode_into_answer(self.state, plan.name, table, plan.series, ids, ids_at, n, answer, plan.rows_at, plan.status_at, plan.dtype) is None:
            return None
        # grpc sends bytes: one copy, of the response alone when scratch surrounds it
        return bytes(answer) if plan.alloc == plan.size else bytes(memoryview(answer)[plan.start : plan.start + plan.size])

    def _infer(self, request: Any) -> bytes:
        name = request.model_name
        self._hosted(name, request.model_version)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise _bad("raw_input_contents must hold one entry per input")
        tensors: dict[str, np.ndarray] = {}
        for k, entry in enumerate(request.inputs):
            if entry.name not in ("ids", "offsets"):
                raise _bad(f"unknown input {entry.name!r}; this model takes 'ids' and optionally 'offsets'")
            if entry.name in tensors:
                raise _bad(f"input {entry.name!r} given twice")
            tensors[entry.name] = _tensor(entry, raw[k] if raw else None)
        if "ids" not in tensors:
            raise _bad("input 'ids' is missing")
        pooling = _param(request.parameters, "pooling", "none")
        if pooling not in ("none", "sum", "mean"):
            raise _bad("parameter 'pooling' must be 'none', 'sum' or 'mean'")
        datatype = _param(request.parameters, "embeddings_datatype", "FP32")
        if datatype not in EMBEDDING_DATATYPES:
            raise _bad(f"parameter 'embeddings_datatype' must be one of {', '.join(EMBEDDING_DATATYPES)}, not {datatype!r}")
        offsets = tensors.get("offsets")
        if offsets is not None and offsets.ndim != 1:
            raise _bad("input 'offsets' must be 1-D")
        if (offsets is not None) != (pooling != "none"):
            raise _bad("input 'offsets' and parameter 'pooling' ('sum' or 'mean') go together")
        wanted = [o.name for o in request.outputs] or ["embeddings", "found"]
        for out_name in wanted:
            if out_name not in ("embeddings", "found"):
                raise _bad(f"unknown output {out_name!r}; this model has embeddings, found")
        ids = tensors["ids"]
        lookup = ParsedLookup(name, ids.reshape(-1), offsets, pooling, EMBEDDING_DATATYPES[datatype])  # type: ignore[arg-type]
        try:
            check_limits(self.state, [lookup])
        except ApiError as exc:
            raise ApiError(exc.status if exc.status in (404, 413) else 400, exc.code, exc.message) from None
        bags = None if offsets is None else int(offsets.shape[0])
        hosted = self._hosted(name, request.model_version)
        outputs_sent = {out_name: True for out_name in wanted}  # raw_output_contents: always binary
        check_infer_response(
            self.state, hosted.table.dim, int(ids.size), bags, pooling, outputs_sent, DTYPE_ITEMSIZE[EMBEDDING_DATATYPES[datatype]]
        )
        output = run_lookups(self.state, [lookup])[0]
        dim = output.values.shape[1]
        embeddings = output.values if pooling != "none" else output.values.reshape(*ids.shape, dim)
        found = output.found.reshape(ids.shape)
        parts: list[tuple[str, str, list[int], Any]] = []
        for out_name in wanted:
            if out_name == "embeddings":
                parts.append((out_name, datatype, list(embeddings.shape), embedding_array(embeddings, datatype)))
            else:
                parts.append((out_name, "BOOL", list(found.shape), np.ascontiguousarray(found, dtype=np.uint8)))
        return encode_infer_response(name, MODEL_VERSION, request.id, output.pruned, parts)  # pruned: as HTTP's parameters.pruned


# the methods served, each with its handler's request and response types from the generated
# descriptor; every other method of the service is UNIMPLEMENTED (grpc answers that itself)
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_SERVED = ("ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata", "ModelReady", "ModelInfer")


def method_handlers(service: InferenceService) -> dict[str, grpc.RpcMethodHandler]:
    """The served methods' handlers: the generated messages for every method but ModelInfer,
    which takes and answers bytes (:meth:`InferenceService.ModelInfer`)."""
    handlers = {}
    for method in _SERVICE.methods:
        if method.name not in _SERVED:
            continue
        if method.name == "ModelInfer":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(service.ModelInfer)
        else:
            request_type, response_type = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(service, method.name), request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
            )
    return handlers


async def start(state: AppState) -> grpc.aio.Server:
    """Start the gRPC endpoint on ``settings.grpc_port`` in the running event loop."""
    settings = state.settings
    limit = settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)])
    handlers = method_handlers(InferenceService(state))
    # as the generated add_..._to_server does: registered (matched in the core) and generic
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind the gRPC port {settings.host}:{settings.grpc_port}")
    await server.start()
    state.grpc_port = port
    log.info("KServe v2 gRPC on %s:%d", settings.host, port)
    return server
