"""On-wire formats of ``POST /v1/lookup``: the JSON request/response models and the binary
request and response bodies.  Everything is little-endian.

Binary request (``Content-Type: application/x-embserve-lookup``)::

    magic      4 bytes   b"EMQ1"
    u32        T         number of lookups
    T times:
      u16      L         table name length in bytes
      u8       pooling   0 = none, 1 = sum, 2 = mean
      u8       dtype     values in the answer: 0 = the default (f32, or the Accept header's
                         ``dtype=`` parameter), 1 = f32, 2 = f16, 3 = bf16
      u32      n         number of IDs
      u32      B         number of bag offsets (0 when pooling is none)
      L bytes            table name, UTF-8
      n x i64            IDs
      B x i64            bag offsets (start of each bag, as nn.EmbeddingBag)

Binary response (``Accept: application/x-embserve-tensor``, or ``application/octet-stream``)::

    magic      4 bytes   b"EMR1"
    u32        T         number of results, in request order
    T times:
      u32      rows      n, or B when pooled
      u32      dim       D
      u32      n         number of IDs looked up
      u32      unknown   how many of them the table does not hold
      rows x dim f32     embeddings, row-major
      n x u8             status per ID: 0 = unknown (the table has no row: the unknown-ID
                         policy filled it), 1 = found, 2 = pruned (the table keeps the ID
                         but stored no row for it, a dim-0 class; the unknown-ID policy
                         filled it).  Before pruned rows existed this byte was a found flag;
                         ``byte == 1`` still means found.
      0-3 bytes          zero padding to a multiple of 4

When any lookup asked for 16-bit values the answer is ``EMR2`` instead, which differs only in
one more header field per result and the width of the values::

    magic      4 bytes   b"EMR2"
    u32        T
    T times:
      u32 rows | u32 dim | u32 n | u32 unknown
      u32      dtype     1 = f32, 2 = f16 (IEEE half), 3 = bf16 (upper half of an f32)
      rows x dim values  4 or 2 bytes each, little-endian, row-major
      n x u8             status per ID, as in EMR1
      0-3 bytes          zero padding: the result ends at a multiple of 4

An all-f32 answer is always ``EMR1``, byte for byte what it was before dtypes existed.

JSON responses carry the same fields (see :class:`LookupResponse`): ``found`` per ID (true only
for status 1), ``unknown`` and ``pruned`` counts.

Binary update body (``POST /v1/tables/{name}/updates``, ``Content-Type: application/x-embserve-updates``)::

    magic      4 bytes   b"EMU1"
    u32        n         upserted IDs
    u32        dim       vector length (the table's dim; anything when n = 0)
    u32        m         deleted IDs
    n x i64              upsert IDs
    n*dim x f32          vectors, row-major
    m x i64              delete IDs

This module needs only numpy and pydantic: the client (``service/client.py``) imports it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

BINARY_REQUEST_TYPE = "application/x-embserve-lookup"
BINARY_RESPONSE_TYPE = "application/x-embserve-tensor"
BINARY_UPDATE_TYPE = "application/x-embserve-updates"
OCTET_STREAM = "application/octet-stream"
REQUEST_MAGIC = b"EMQ1"
RESPONSE_MAGIC = b"EMR1"

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
RESPONSE_MAGIC_16 = b"EMR2"
Pooling = Literal["none", "sum", "mean"]
DType = Literal["f32", "f16", "bf16"]
_POOLING_CODES: dict[int, Pooling] = {0: "none", 1: "sum", 2: "mean"}
DTYPE_CODES: dict[str, int] = {"f32": 1, "f16": 2, "bf16": 3}  # 0 on the wire = the request's default
_DTYPE_NAMES: dict[int, DType] = {1: "f32", 2: "f16", 3: "bf16"}
DTYPE_ITEMSIZE: dict[str, int] = {"f32": 4, "f16": 2, "bf16": 2}
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct("<HBBII")
_RESULT = struct.Struct("<IIII")
_RESULT_16 = struct.Struct("<IIIII")
_UPDATE_HEAD = struct.Struct("<4sIII")


class WireError(ValueError):
    """A request body that cannot be decoded."""


class LookupItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str = Field(..., min_length=1, max_length=128, description="table name")
    ids: list[Int64] = Field(..., description="int64 IDs to look up")
    offsets: list[Int64] | None = Field(None, description="bag start offsets; needs pooling sum or mean")
    pooling: Pooling = Field("none", description="pool each bag's rows: none, sum or mean")
    dtype: DType | None = Field(
        None, description="precision of the returned values: f32 (default), f16 or bf16 (rounded to nearest; half the bytes in binary answers)"
    )


class LookupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lookups: list[LookupItem] = Field(..., min_length=1, description="one entry per table lookup")


class LookupResultModel(BaseModel):
    table: str
    shape: list[int]
    embeddings: list[list[float]]
    found: list[bool]
    unknown: int
    pruned: int = Field(0, description="IDs whose row was pruned (dim 0) and filled by the unknown-ID policy")


class LookupResponse(BaseModel):
    results: list[LookupResultModel]


@dataclass
class ParsedLookup:
    """One lookup after decoding, whatever the wire format was."""

    table: str
    ids: np.ndarray  # int64 [n]
    offsets: np.ndarray | None  # int64 [B]
    pooling: Pooling
    dtype: DType | None = None  # None = the request's default (f32 unless the Accept header says otherwise)


def parse_binary_request(body: bytes) -> list[ParsedLookup]:
    if len(body) < _HEAD.size:
        raise WireError("binary body shorter than its header")
    magic, count = _HEAD.unpack_from(body, 0)
    if magic != REQUEST_MAGIC:
        raise WireError("binary body does not start with b'EMQ1'")
    if count == 0:
        raise WireError("binary body holds no lookups")
    pos = _HEAD.size
    out: list[ParsedLookup] = []
    for _ in range(count):
        if pos + _ENTRY.size > len(body):
            raise WireError("binary body ends inside a lookup header")
        name_len, pooling_code, dtype_code, n_ids, n_offsets = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        if pooling_code not in _POOLING_CODES:
            raise WireError(f"bad pooling code {pooling_code} in a lookup header")
        if dtype_code != 0 and dtype_code not in _DTYPE_NAMES:
            raise WireError(f"bad dtype code {dtype_code} in a lookup header (0 default, 1 f32, 2 f16, 3 bf16)")
        end = pos + name_len + 8 * (n_ids + n_offsets)
        if end > len(body):
            raise WireError("binary body is shorter than its lookup headers declare")
        try:
            name = body[pos : pos + name_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError("table name is not UTF-8") from exc
        pos += name_len
        ids = np.frombuffer(body, dtype="<i8", count=n_ids, offset=pos).astype(np.int64, copy=True)
        pos += 8 * n_ids
        offsets = None
        if n_offsets:
            offsets = np.frombuffer(body, dtype="<i8", count=n_offsets, offset=pos).astype(np.int64, copy=True)
            pos += 8 * n_offsets
        out.append(ParsedLookup(name, ids, offsets, _POOLING_CODES[pooling_code], _DTYPE_NAMES.get(dtype_code)))
    if pos != len(body):
        raise WireError(f"{len(body) - pos} trailing bytes after the last lookup")
    return out


def encode_binary_request(lookups: list[ParsedLookup]) -> bytes:
    """Client side of :func:`parse_binary_request` (used by tests, benchmarks and the client)."""
    codes = {v: k for k, v in _POOLING_CODES.items()}
    parts = [_HEAD.pack(REQUEST_MAGIC, len(lookups))]
    for item in lookups:
        name = item.table.encode("utf-8")
        offsets = item.offsets if item.offsets is not None else np.empty(0, dtype=np.int64)
        dtype_code = DTYPE_CODES[item.dtype] if item.dtype is not None else 0
        parts.append(_ENTRY.pack(len(name), codes[item.pooling], dtype_code, len(item.ids), len(offsets)))
        parts.append(name)
        parts.append(np.ascontiguousarray(item.ids, dtype="<i8").tobytes())
        parts.append(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return b"".join(parts)


@dataclass
class LookupOutput:
    table: str
    values: np.ndarray  # float32 [rows, D]
    found: np.ndarray  # bool [n]
    unknown: int
    pruned: int = 0
    status: np.ndarray | None = None  # uint8 [n] (0 unknown, 1 found, 2 pruned); None: found as 0/1


STATUS_UNKNOWN, STATUS_FOUND, STATUS_PRUNED = 0, 1, 2


def binary_response_parts(results: list[LookupOutput]) -> list[bytes | np.ndarray]:
    """The binary response as a list of buffers, in order, not joined: the values arrays are
    the lookup's own (no copy), so a large answer can be sent without ever existing twice."""
    parts: list[bytes | np.ndarray] = [_HEAD.pack(RESPONSE_MAGIC, len(results))]
    for r in results:
        rows, dim = r.values.shape
        n = r.found.shape[0]
        parts.append(_RESULT.pack(rows, dim, n, r.unknown))
        parts.append(np.ascontiguousarray(r.values, dtype="<f4"))
        parts.append(r.status if r.status is not None else r.found.astype(np.uint8))
        parts.append(b"\0" * (-n % 4))
    return parts


def encode_binary_response(results: list[LookupOutput]) -> bytes:
    return b"".join(binary_response_parts(results))  # numpy arrays join through the buffer protocol


def binary_response_size(shapes: list[tuple[int, int, int, str]]) -> int:
    """Bytes of the binary answer for results ``(rows, dim, n, dtype)``: the writer allocates
    this once and decodes every table's rows straight into it."""
    wide = any(dtype != "f32" for _, _, _, dtype in shapes)
    head = _RESULT_16.size if wide else _RESULT.size
    total = _HEAD.size
    for rows, dim, n, dtype in shapes:
        payload = DTYPE_ITEMSIZE[dtype] * rows * dim + n
        total += head + payload + (-payload % 4)
    return total


def write_response_head(buf: bytearray, count: int, wide: bool) -> int:
    """Write the answer's magic and count; returns where the first result starts."""
    _HEAD.pack_into(buf, 0, RESPONSE_MAGIC_16 if wide else RESPONSE_MAGIC, count)
    return _HEAD.size


def write_result_head(buf: bytearray, pos: int, rows: int, dim: int, n: int, unknown: int, dtype: str, wide: bool) -> int:
    """Write one result's header at ``pos``; returns where its values start."""
    if wide:
        _RESULT_16.pack_into(buf, pos, rows, dim, n, unknown, DTYPE_CODES[dtype])
        return pos + _RESULT_16.size
    _RESULT.pack_into(buf, pos, rows, dim, n, unknown)
    return pos + _RESULT.size


def decode_binary_response(body: bytes) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Client side of the binary answer (EMR1 or EMR2): ``[(values, found, unknown), ...]``
    (``found`` = status 1; :func:`decode_binary_statuses` keeps the status bytes).

    ``values`` is a read-only view of ``body``: float32, float16, or - for bf16, which numpy
    lacks - float32 widened from the bf16 bits (exact)."""
    return [(values, status == STATUS_FOUND, unknown) for values, status, unknown in decode_binary_statuses(body)]


def decode_binary_statuses(body: bytes) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Client side of the binary answer: ``[(values, status uint8, unknown), ...]``."""
    magic, count = _HEAD.unpack_from(body, 0)
    if magic not in (RESPONSE_MAGIC, RESPONSE_MAGIC_16):
        raise WireError("response does not start with b'EMR1' or b'EMR2'")
    wide = magic == RESPONSE_MAGIC_16
    pos = _HEAD.size
    out = []
    for _ in range(count):
        if wide:
            rows, dim, n, unknown, code = _RESULT_16.unpack_from(body, pos)
            pos += _RESULT_16.size
            if code not in _DTYPE_NAMES:
                raise WireError(f"unknown dtype code {code} in the response")
            dtype = _DTYPE_NAMES[code]
        else:
            rows, dim, n, unknown = _RESULT.unpack_from(body, pos)
            pos += _RESULT.size
            dtype = "f32"
        if dtype == "f32":
            values = np.frombuffer(body, dtype="<f4", count=rows * dim, offset=pos).reshape(rows, dim)
        elif dtype == "f16":
            values = np.frombuffer(body, dtype="<f2", count=rows * dim, offset=pos).reshape(rows, dim)
        else:
            bits = np.frombuffer(body, dtype="<u2", count=rows * dim, offset=pos).astype(np.uint32) << 16
            values = bits.view(np.float32).reshape(rows, dim)
        payload = DTYPE_ITEMSIZE[dtype] * rows * dim + n
        pos += DTYPE_ITEMSIZE[dtype] * rows * dim
        status = np.frombuffer(body, dtype=np.uint8, count=n, offset=pos)
        pos += n + (-payload % 4)
        out.append((values, status, unknown))
    return out


def encode_binary_updates(upsert_ids: np.ndarray, vectors: np.ndarray, delete_ids: np.ndarray) -> bytes:
    """Client side of :func:`parse_binary_updates`."""
    dim = int(vectors.shape[1]) if vectors.ndim == 2 else 0
    return b"".join(
        [
            _UPDATE_HEAD.pack(b"EMU1", len(upsert_ids), dim, len(delete_ids)),
            np.ascontiguousarray(upsert_ids, dtype="<i8").tobytes(),
            np.ascontiguousarray(vectors, dtype="<f4").tobytes(),
            np.ascontiguousarray(delete_ids, dtype="<i8").tobytes(),
        ]
    )


def parse_binary_updates(body: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(upsert_ids int64 [n], vectors float32 [n, dim], delete_ids int64 [m])``; sizes are checked
    against the header before anything is read."""
    if len(body) < _UPDATE_HEAD.size:
        raise WireError("binary body shorter than its header")
    magic, n, dim, m = _UPDATE_HEAD.unpack_from(body, 0)
    if magic != b"EMU1":
        raise WireError("binary body does not start with b'EMU1'")
    expected = _UPDATE_HEAD.size + 8 * n + 4 * n * dim + 8 * m
    if len(body) != expected:
        raise WireError(f"binary body is {len(body)} bytes; its header says {expected}")
    # Read-only views of ``body``, not copies: the request path only checks them and hands them
    # to the update log, which stores their bytes (a 10k x 64 request is 2.6 MB; each copy of
    # it was a fresh allocation, page faults included).  On little-endian hosts "<i8"/"<f4"
    # are the native types, so astype(copy=False) copies only on a big-endian one.
    pos = _UPDATE_HEAD.size
    ids = np.frombuffer(body, "<i8", n, pos).astype(np.int64, copy=False)
    pos += 8 * n
    vectors = np.frombuffer(body, "<f4", n * dim, pos).astype(np.float32, copy=False).reshape(n, dim)
    pos += 4 * n * dim
    deletes = np.frombuffer(body, "<i8", m, pos).astype(np.int64, copy=False)
    return ids, vectors, deletes
