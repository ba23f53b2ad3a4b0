"""The response-size cap (``EMBSERVE_MAX_RESPONSE_BYTES``): a lookup's answer is sized from the
request alone (rows x dim x bytes per value, plus the found flags) and refused with 413 before
any row is decoded.

Why before: the ID limit alone lets one request ask for 10^6 IDs of a 384-dim table, 1.5 GB of
float32 and several times that as JSON; building such an answer took the process past 4 GB and
stalled every other request.  The estimate needs only the table's dim and the request's counts.

JSON costs far more per value than the 4 bytes of the binary format: ``orjson`` writes a float32
in its shortest form, 11-13 characters plus the comma for trained-like embeddings (measured on
``compression.synthetic`` tables: 12.5 bytes a value; ``N(0,1)`` values 10.9), so JSON counts
:data:`JSON_BYTES_PER_VALUE`.  A found flag is ``true,``/``false,`` in JSON and one byte in binary.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ApiError
from .state import AppState
from .wire import DTYPE_ITEMSIZE, ParsedLookup

BINARY_BYTES_PER_VALUE = 4  # float32
BINARY_BYTES_PER_FLAG = 1
JSON_BYTES_PER_VALUE = 13
JSON_BYTES_PER_FLAG = 6


def output_rows(ids: int, bags: int | None, pooling: str) -> int:
    """Rows of the answer: one per ID, or one per bag when pooled."""
    return ids if pooling == "none" or bags is None else bags


def refuse_over_limit(limit: int, nbytes: int, rows: int, binary: bool, value_bytes: int = BINARY_BYTES_PER_VALUE) -> None:
    """413 with the estimate, the limit and the setting's name when ``nbytes`` is over ``limit``."""
    if nbytes <= limit:
        return
    form = f"binary, {value_bytes}" if binary else f"JSON, about {JSON_BYTES_PER_VALUE}"
    hint = "" if binary else ", or ask for the binary format"
    raise ApiError(
        413,
        "too_large",
        f"the response would take about {nbytes:,} bytes ({rows:,} rows; {form} bytes a value); the limit is"
        f" {limit:,} bytes (EMBSERVE_MAX_RESPONSE_BYTES): ask for fewer IDs per request{hint}",
    )


def response_bytes(items: Iterable[tuple[int, int, int]], value_bytes: int, flag_bytes: int) -> int:
    """Estimated body bytes for ``(rows, dim, ids)`` per result."""
    return sum(rows * dim * value_bytes + ids * flag_bytes for rows, dim, ids in items)


def check_lookup_response(state: AppState, lookups: list[ParsedLookup], binary: bool) -> int:
    """Refuse a ``POST /v1/lookup`` whose answer would exceed the cap; the estimate otherwise.
    Call after :func:`~service.routers.lookup.check_limits` (tables known, offsets valid).
    Binary values count their own width: 2 bytes for ``f16`` / ``bf16``, 4 otherwise (a
    request-wide default dtype is not known here, so it counts as float32: never under)."""
    nbytes = 0
    rows_total = 0
    widest = 0
    for item in lookups:
        hosted = state.tables.get(item.table)
        dim = hosted.table.dim if hosted is not None else 0
        bags = None if item.offsets is None else int(item.offsets.shape[0])
        ids = int(item.ids.shape[0])
        rows = output_rows(ids, bags, item.pooling)
        value_bytes = DTYPE_ITEMSIZE[item.dtype or "f32"] if binary else JSON_BYTES_PER_VALUE
        widest = max(widest, value_bytes)
        nbytes += response_bytes([(rows, dim, ids)], value_bytes, BINARY_BYTES_PER_FLAG if binary else JSON_BYTES_PER_FLAG)
        rows_total += rows
    refuse_over_limit(state.settings.max_response_bytes, nbytes, rows_total, binary, widest or BINARY_BYTES_PER_VALUE)
    return nbytes


def check_infer_response(
    state: AppState, dim: int, ids: int, bags: int | None, pooling: str, outputs: dict[str, bool], value_bytes: int = BINARY_BYTES_PER_VALUE
) -> int:
    """The same cap for a v2 infer request (HTTP or gRPC); ``outputs`` maps each requested
    output to whether it is sent binary, ``value_bytes`` is the width of a binary embedding
    value (2 for FP16 / BF16)."""
    rows = output_rows(ids, bags, pooling)
    nbytes = 0
    if "embeddings" in outputs:
        nbytes += rows * dim * (value_bytes if outputs["embeddings"] else JSON_BYTES_PER_VALUE)
    if "found" in outputs:
        nbytes += ids * (BINARY_BYTES_PER_FLAG if outputs["found"] else JSON_BYTES_PER_FLAG)
    refuse_over_limit(state.settings.max_response_bytes, nbytes, rows, outputs.get("embeddings", True), value_bytes)
    return nbytes
