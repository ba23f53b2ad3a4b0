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
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from starlette.concurrency import run_in_threadpool
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from . import __version__
from .errors import ApiError
from .response_size import check_infer_response
from .routers.lookup import check_limits, run_lookups
from .security import check_reader
from .state import AppState
from .v2wire import EMBEDDING_DATATYPES, ID_DTYPES, embedding_bytes
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
    arrives here as the exception ``context.abort`` raises, with the code already set."""

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
            m = self.state.metrics
            m.grpc_requests.labels(method.__name__, code).inc()
            m.grpc_latency.labels(method.__name__).observe(time.perf_counter() - started)

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


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The endpoints; every refusal is an :class:`ApiError` turned into its gRPC status."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def _fail(self, context: grpc.aio.ServicerContext, exc: ApiError) -> None:
        await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)

    def _auth(self, context: grpc.aio.ServicerContext) -> None:
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        token = metadata.get("authorization")
        check_reader(self.state, token if isinstance(token, str) else None)

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
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            self._auth(context)
            if request.ByteSize() <= self.state.settings.inline_max_body_bytes:
                return self._infer(request)  # small: cheaper than a thread hop, as on HTTP
            return await run_in_threadpool(self._infer, request)
        except ApiError as exc:
            await self._fail(context, exc)
        except Exception:  # noqa: BLE001 - as on HTTP: log it, say nothing about the internals
            log.exception("unhandled error in gRPC ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    def _infer(self, request: Any) -> Any:
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
        response = pb.ModelInferResponse(model_name=name, model_version=MODEL_VERSION, id=request.id)
        response.parameters["pruned"].int64_param = output.pruned  # as HTTP's parameters.pruned
        for out_name in wanted:
            if out_name == "embeddings":
                response.outputs.add(name=out_name, datatype=datatype, shape=list(embeddings.shape))
                response.raw_output_contents.append(embedding_bytes(embeddings, datatype))
            else:
                response.outputs.add(name=out_name, datatype="BOOL", shape=list(found.shape))
                response.raw_output_contents.append(np.ascontiguousarray(found, dtype=np.uint8).tobytes())
        return response


async def start(state: AppState) -> grpc.aio.Server:
    """Start the gRPC endpoint on ``settings.grpc_port`` in the running event loop."""
    settings = state.settings
    limit = settings.max_body_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", -1)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind the gRPC port {settings.host}:{settings.grpc_port}")
    await server.start()
    state.grpc_port = port
    log.info("KServe v2 gRPC on %s:%d", settings.host, port)
    return server
