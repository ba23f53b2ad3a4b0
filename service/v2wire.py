"""The Open Inference Protocol ("KServe v2", Triton's HTTP API) as it applies to an embedding table.

A table is served as a *model* of the same name, version ``1``:

    inputs   ids        INT64 (or INT32/UINT32/UINT64)  any shape S (usually [n] or [n, 1])
             offsets    INT64 [B]        optional; with parameter "pooling": "sum" | "mean"
    outputs  embeddings FP32  S + [dim]  ([B, dim] when pooled); FP16 or BF16 when the request's
                                     parameter "embeddings_datatype" says so (half the bytes)
             found      BOOL  S          the table served the ID's own row (else the unknown-ID
                                             policy filled it: an unknown ID, or a pruned row)
    response parameters.pruned  int          how many IDs had a pruned (dim-0) row, filled by
                                             the unknown-ID policy (always present)

JSON tensors carry ``data`` as a flat row-major list (nested lists are accepted too).

Binary tensor extension (what ``tritonclient.http`` sends and asks for)::

    request  header  Inference-Header-Content-Length: J
             body    J bytes of JSON | the raw bytes of every input whose JSON entry has
                                       parameters.binary_data_size, in input order
    response header  Inference-Header-Content-Length: J   (only when an output is binary)
             body    J bytes of JSON | the raw bytes of every binary output, in output order

Raw tensor bytes are little-endian, row-major; BOOL is one byte per element.  An output is sent
binary when its request entry says ``parameters.binary_data: true`` or the request says
``parameters.binary_data_output: true``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from .errors import ApiError

HEADER_LENGTH = "inference-header-content-length"

# datatype -> little-endian numpy dtype; the ID types we accept
ID_DTYPES: dict[str, str] = {"INT64": "<i8", "INT32": "<i4", "UINT32": "<u4", "UINT64": "<u8"}
OUTPUT_NAMES = ("embeddings", "found")
# the protocol's datatype of the embeddings output -> the service's dtype name
EMBEDDING_DATATYPES: dict[str, str] = {"FP32": "f32", "FP16": "f16", "BF16": "bf16"}


def embedding_array(values: np.ndarray, datatype: str) -> np.ndarray:
    """The embeddings output as a little-endian array of its wire dtype.  BF16 arrives as
    float32 holding bf16-rounded values (numpy has no bf16), so its upper 16 bits are the
    value, exactly."""
    if datatype == "BF16":
        return (np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")
    return np.ascontiguousarray(values, dtype="<f2" if datatype == "FP16" else "<f4")


def embedding_bytes(values: np.ndarray, datatype: str) -> bytes:
    """Raw little-endian bytes of the embeddings output (see :func:`embedding_array`)."""
    return embedding_array(values, datatype).tobytes()


def embeddings_datatype(params: dict[str, Any]) -> str:
    """The request parameter ``embeddings_datatype`` (FP32 default, FP16, BF16)."""
    datatype = params.get("embeddings_datatype", "FP32")
    if datatype not in EMBEDDING_DATATYPES:
        raise _bad(f"parameter 'embeddings_datatype' must be one of {', '.join(EMBEDDING_DATATYPES)}, not {datatype!r}")
    return str(datatype)


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


@dataclass
class InferRequest:
    """A decoded infer request: the IDs (shape kept), optional bag offsets, what to send back."""

    request_id: str | None
    ids: np.ndarray  # int64, any shape
    offsets: np.ndarray | None
    pooling: str
    outputs: list[str]
    binary: dict[str, bool] = field(default_factory=dict)
    datatype: str = "FP32"  # of the embeddings output


def _shape(entry: dict[str, Any], name: str) -> list[int]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if len(shape) > 8:
        raise _bad(f"input {name!r}: at most 8 dimensions")
    return shape


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: 'data' must be a list")
    flat: list[Any] = []
    stack = [data]
    # depth-first, keeping row-major order; the depth is bounded by the body size
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _tensor(entry: dict[str, Any], name: str, raw: memoryview, pos: int) -> tuple[np.ndarray, int]:
    """One integer input tensor from JSON data or the binary section; returns it and the new position."""
    datatype = entry.get("datatype")
    if datatype not in ID_DTYPES:
        raise _bad(f"input {name!r}: datatype must be one of {', '.join(ID_DTYPES)}, not {datatype!r}")
    shape = _shape(entry, name)
    count = int(np.prod(shape)) if shape else 1
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        itemsize = np.dtype(ID_DTYPES[datatype]).itemsize
        if not isinstance(size, int) or isinstance(size, bool) or size != count * itemsize:
            raise _bad(f"input {name!r}: binary_data_size must be {count * itemsize} for shape {shape} {datatype}")
        if pos + size > len(raw):
            raise _bad(f"input {name!r}: the body ends inside its binary data")
        values = np.frombuffer(raw, dtype=ID_DTYPES[datatype], count=count, offset=pos)
        pos += size
    else:
        if "data" not in entry:
            raise _bad(f"input {name!r}: needs 'data' or parameters.binary_data_size")
        flat = _flatten(entry["data"], name)
        if len(flat) != count:
            raise _bad(f"input {name!r}: shape {shape} holds {count} elements, data has {len(flat)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise _bad(f"input {name!r}: data must be integers")
        try:
            values = np.asarray(flat, dtype=np.dtype(ID_DTYPES[datatype]).newbyteorder("="))
        except OverflowError:
            raise _bad(f"input {name!r}: a value does not fit {datatype}") from None
    if datatype == "UINT64" and values.size and int(values.max()) > np.iinfo(np.int64).max:
        raise _bad(f"input {name!r}: IDs above 2^63-1 are not supported")
    return values.astype(np.int64).reshape(shape), pos


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Decode a JSON or binary-extension infer request; every problem is a 400 with the reason."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise _bad("Inference-Header-Content-Length is not an integer") from None
        if not 0 < json_len <= len(body):
            raise _bad("Inference-Header-Content-Length is outside the body")
    else:
        json_len = len(body)
    try:
        head = orjson.loads(body[:json_len])
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the request header is not valid JSON: {exc}") from None
    if not isinstance(head, dict):
        raise _bad("the request must be a JSON object")
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(e, dict) for e in inputs):
        raise _bad("'inputs' must be a non-empty list of tensors")
    raw = memoryview(body)
    pos = json_len
    tensors: dict[str, np.ndarray] = {}
    for entry in inputs:
        name = entry.get("name")
        if name not in ("ids", "offsets"):
            raise _bad(f"unknown input {name!r}; this model takes 'ids' and optionally 'offsets'")
        if name in tensors:
            raise _bad(f"input {name!r} given twice")
        tensors[name], pos = _tensor(entry, name, raw, pos)
    if pos != len(body):
        raise _bad(f"{len(body) - pos} bytes after the last binary input")
    if "ids" not in tensors:
        raise _bad("input 'ids' is missing")
    params = head.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    pooling = params.get("pooling", "none")
    if pooling not in ("none", "sum", "mean"):
        raise _bad("parameter 'pooling' must be 'none', 'sum' or 'mean'")
    offsets = tensors.get("offsets")
    if offsets is not None:
        if offsets.ndim != 1:
            raise _bad("input 'offsets' must be 1-D")
        if pooling == "none":
            raise _bad("input 'offsets' needs parameter 'pooling': 'sum' or 'mean'")
    elif pooling != "none":
        raise _bad(f"pooling {pooling!r} needs the input 'offsets'")
    default_binary = params.get("binary_data_output") is True
    requested = head.get("outputs")
    outputs: list[str] = []
    binary: dict[str, bool] = {}
    if requested is None:
        outputs = list(OUTPUT_NAMES)
        binary = {name: default_binary for name in outputs}
    else:
        if not isinstance(requested, list) or not all(isinstance(e, dict) for e in requested):
            raise _bad("'outputs' must be a list of objects")
        for entry in requested:
            name = entry.get("name")
            if name not in OUTPUT_NAMES:
                raise _bad(f"unknown output {name!r}; this model has {', '.join(OUTPUT_NAMES)}")
            if name in binary:
                raise _bad(f"output {name!r} asked for twice")
            out_params = entry.get("parameters") or {}
            if not isinstance(out_params, dict):
                raise _bad(f"output {name!r}: 'parameters' must be an object")
            outputs.append(name)
            binary[name] = bool(out_params.get("binary_data", default_binary))
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    return InferRequest(request_id, tensors["ids"], offsets, pooling, outputs, binary, embeddings_datatype(params))


def infer_response_parts(
    model: str, request: InferRequest, embeddings: np.ndarray, found: np.ndarray, pruned: int = 0
) -> tuple[list[bytes | np.ndarray], int | None]:
    """The response body as buffers in order (JSON header, then each binary output's array,
    not copied where the values already have the wire dtype) and, when any output is binary,
    the length of the JSON header."""
    tensors = {"embeddings": (embeddings, request.datatype), "found": (found, "BOOL")}
    head_outputs: list[dict[str, Any]] = []
    blobs: list[np.ndarray] = []
    for name in request.outputs:
        values, datatype = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if request.binary.get(name):
            blob = embedding_array(values, datatype) if name == "embeddings" else np.ascontiguousarray(values, dtype="u1")
            entry["parameters"] = {"binary_data_size": blob.nbytes}
            blobs.append(blob)
        else:
            entry["data"] = values.reshape(-1)
        head_outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": "1", "parameters": {"pruned": pruned}, "outputs": head_outputs}
    if request.request_id is not None:
        head["id"] = request.request_id
    json_part = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    return [json_part, *blobs], (len(json_part) if blobs else None)
