"""The Open Inference Protocol (KServe v2 / Triton HTTP) over the hosted tables, so Triton and
KServe clients call the service unchanged.  Tensors and the binary extension: ``service/v2wire.py``.

Lookups go through the same checks, limits and decoder as ``POST /v1/lookup``; errors use the
protocol's ``{"error": "<message>"}`` shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from .. import __version__
from ..buffered import STREAM_MIN_BYTES, BufferResponse
from ..errors import ApiError
from ..registry import TABLE_NAME_PATTERN, HostedTable
from ..response_size import check_infer_response
from ..security import require_reader
from ..state import AppState, get_state
from ..v2wire import EMBEDDING_DATATYPES, HEADER_LENGTH, ID_DTYPES, infer_response_parts, parse_infer_request
from ..wire import DTYPE_ITEMSIZE, ParsedLookup
from .lookup import batching_on, check_limits, run_lookups

router = APIRouter(prefix="/v2", tags=["v2 inference protocol"])
MODEL_VERSION = "1"
TableName = Path(..., pattern=TABLE_NAME_PATTERN, description="table name (the model's name)")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestModel(BaseModel):
    """Schema of the JSON form (documentation; the handler parses the body itself)."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(..., min_length=1)
    outputs: list[dict[str, Any]] | None = None


def _hosted(state: AppState, name: str, version: str | None) -> HostedTable:
    hosted = state.tables.get(name)
    if hosted is None or (version is not None and version != MODEL_VERSION):
        raise ApiError(404, "unknown_model", f"no model named {name!r}" + (f" with version {version!r}" if version else ""))
    return hosted


def _metadata(hosted: HostedTable, name: str) -> ModelMetadata:
    dim = hosted.table.dim
    return ModelMetadata(
        name=name,
        versions=[MODEL_VERSION],
        platform="embserve",
        inputs=[TensorMetadata(name="ids", datatype="INT64", shape=[-1])],
        outputs=[TensorMetadata(name="embeddings", datatype="FP32", shape=[-1, dim]), TensorMetadata(name="found", datatype="BOOL", shape=[-1])],
    )


@router.get("", summary="Server metadata")
def server_metadata() -> dict[str, Any]:
    return {"name": "embserve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: tables loaded and the update log replayed", responses={503: {"description": "not ready"}})
def ready(state: AppState = Depends(get_state)) -> dict[str, bool]:
    applier = state.applier
    if not state.tables.ready or (applier is not None and (not applier.caught_up or applier.gap is not None)):
        raise ApiError(503, "not_ready", "not ready")  # a gap: /readyz says which entries and how to recover
    return {"ready": True}


@router.get("/models/{name}", response_model=ModelMetadata, dependencies=[Depends(require_reader)], summary="Model (table) metadata",
            responses={404: {"description": "no such model"}})
def model_metadata(name: str = TableName, state: AppState = Depends(get_state)) -> ModelMetadata:
    return _metadata(_hosted(state, name, None), name)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, dependencies=[Depends(require_reader)],
            summary="Model (table) metadata, versioned", responses={404: {"description": "no such model or version"}})
def model_version_metadata(name: str = TableName, version: str = Path(..., max_length=32), state: AppState = Depends(get_state)) -> ModelMetadata:
    return _metadata(_hosted(state, name, version), name)


def _model_ready(state: AppState, name: str, version: str | None) -> dict[str, Any]:
    _hosted(state, name, version)
    applier = state.applier
    if applier is not None and applier.gap is not None:
        raise ApiError(503, "not_ready", "entries this replica needs were trimmed from the update log: see /readyz")
    if applier is not None and not applier.caught_up:
        raise ApiError(503, "not_ready", "replaying the update log")
    return {"name": name, "ready": True}


@router.get("/models/{name}/ready", dependencies=[Depends(require_reader)], summary="Model readiness",
            responses={404: {"description": "no such model"}, 503: {"description": "not ready"}})
def model_ready(name: str = TableName, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return _model_ready(state, name, None)


@router.get("/models/{name}/versions/{version}/ready", dependencies=[Depends(require_reader)], summary="Model readiness, versioned",
            responses={404: {"description": "no such model or version"}, 503: {"description": "not ready"}})
def model_version_ready(name: str = TableName, version: str = Path(..., max_length=32), state: AppState = Depends(get_state)) -> dict[str, Any]:
    return _model_ready(state, name, version)


def _infer(state: AppState, name: str, version: str | None, body: bytes, header_length: str | None) -> Response:
    hosted = _hosted(state, name, version)
    request = parse_infer_request(body, header_length)
    ids = request.ids
    lookup = ParsedLookup(name, ids.reshape(-1), request.offsets, request.pooling, EMBEDDING_DATATYPES[request.datatype])  # type: ignore[arg-type]
    try:
        check_limits(state, [lookup])
    except ApiError as exc:
        raise ApiError(exc.status if exc.status == 413 else 400, exc.code, exc.message) from None
    bags = None if request.offsets is None else int(request.offsets.shape[0])
    estimate = check_infer_response(
        state, hosted.table.dim, int(ids.size), bags, request.pooling, request.binary, DTYPE_ITEMSIZE[EMBEDDING_DATATYPES[request.datatype]]
    )
    output = run_lookups(state, [lookup])[0]
    dim = output.values.shape[1]
    embeddings = output.values if request.pooling != "none" else output.values.reshape(*ids.shape, dim)
    found = output.found.reshape(ids.shape)
    parts, json_length = infer_response_parts(name, request, embeddings, found, output.pruned)
    headers = None if json_length is None else {"Inference-Header-Content-Length": str(json_length)}
    media_type = "application/json" if json_length is None else "application/octet-stream"
    if estimate > STREAM_MIN_BYTES:  # large: sent in slices, never joined (service/buffered.py)
        return BufferResponse(parts, media_type, headers)
    return Response(b"".join(parts), media_type=media_type, headers=headers)


_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferRequestModel.model_json_schema()},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False, "schema": {"type": "integer", "minimum": 1},
         "description": "binary extension: bytes of JSON before the raw input tensors"}
    ],
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed request"}, 404: {"description": "no such model"}, 413: {"description": "over a size limit"}
}


@router.post("/models/{name}/infer", dependencies=[Depends(require_reader)], openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES,
             summary=f"Look up embeddings (JSON or the binary tensor extension); input ids: {'/'.join(ID_DTYPES)}")
async def infer(request: Request, name: str = TableName, state: AppState = Depends(get_state)) -> Response:
    body = await request.body()
    return await _answer_infer(state, name, None, body, request.headers.get(HEADER_LENGTH))


@router.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(require_reader)], openapi_extra=_INFER_DOC,
             responses=_INFER_RESPONSES, summary="Look up embeddings, versioned")
async def infer_version(request: Request, name: str = TableName, version: str = Path(..., max_length=32),
                        state: AppState = Depends(get_state)) -> Response:
    body = await request.body()
    return await _answer_infer(state, name, version, body, request.headers.get(HEADER_LENGTH))


async def _answer_infer(state: AppState, name: str, version: str | None, body: bytes, header_length: str | None) -> Response:
    """Small bodies are answered on the event loop, as ``POST /v1/lookup`` does: their lookup
    takes tens of microseconds, less than the hand-off to a worker thread; larger ones (and
    every request when batching merges lookups) go to the thread pool."""
    if len(body) <= state.settings.inline_max_body_bytes and not batching_on(state):
        return _infer(state, name, version, body, header_length)
    return await run_in_threadpool(_infer, state, name, version, body, header_length)
