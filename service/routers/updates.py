"""``POST /v1/tables/{name}/updates``: upserts and deletes from an online trainer.

The request is checked whole, appended to the update log as one entry, and acknowledged only
once the log holds it durably.  The applier thread applies it; ``wait=true`` holds the answer
until then (read-your-writes).  Nothing of a rejected request reaches the log.

The binary body (``application/x-embserve-updates``) is laid out in ``service/wire.py``.
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from compression.hash_index import EMPTY as KEY_EMPTY

from .. import budget
from ..errors import ApiError, parse_json_body
from ..registry import TABLE_NAME_PATTERN
from ..security import require_writer
from ..state import AppState, get_state
from ..updatelog import UpdateBatch, UpdateLog, format_position
from ..wire import BINARY_UPDATE_TYPE, Int64, WireError, encode_binary_updates, parse_binary_updates

__all__ = ["BINARY_UPDATE_TYPE", "encode_binary_updates", "router"]

router = APIRouter(prefix="/v1", tags=["updates"], dependencies=[Depends(require_writer)])

# seconds a client should wait before retrying a write the log could not take
RETRY_AFTER_S = 1


def log_unavailable(exc: Exception) -> ApiError:
    """The answer to a write the update log cannot take now (Redis down or restarting, SQLite
    locked or out of disk): nothing was acknowledged, so the client retries after a while."""
    return ApiError(
        503, "log_unavailable", f"the update log cannot take writes now ({type(exc).__name__}); retry later",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upsert_ids: list[Int64] = Field(default_factory=list, description="IDs to insert or overwrite")
    vectors: list[list[float]] = Field(default_factory=list, description="one vector of the table's dim per upsert ID")
    delete_ids: list[Int64] = Field(default_factory=list, description="IDs to delete")


class UpdateResponse(BaseModel):
    position: str
    applied: bool
    upserts: int
    deletes: int


def _parse(body: bytes, content_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    if content_type == BINARY_UPDATE_TYPE:
        try:
            ids, vectors, deletes = parse_binary_updates(body)
        except WireError as exc:
            raise ApiError(400, "malformed_body", str(exc)) from exc
        return ids, vectors, deletes, int(vectors.shape[1]) if ids.shape[0] else None
    if content_type not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", f"send application/json or {BINARY_UPDATE_TYPE}")
    req = parse_json_body(body, UpdateRequest)
    ids = np.asarray(req.upsert_ids, dtype=np.int64).reshape(-1)
    dims = {len(v) for v in req.vectors}
    if len(dims) > 1:
        raise ApiError(422, "invalid_request", "vectors have different lengths")
    dim = dims.pop() if dims else None
    with np.errstate(over="ignore"):  # values past float32's range become inf and are refused below
        vectors = np.asarray(req.vectors, dtype=np.float32).reshape(len(req.vectors), dim or 0)
    return ids, vectors, np.asarray(req.delete_ids, dtype=np.int64).reshape(-1), dim


def refuse_if_behind(state: AppState, log_: UpdateLog) -> None:
    """503 ``apply_lag`` with Retry-After while the oldest update this replica has not applied
    was logged more than ``max_apply_lag_s`` ago.  Why: the log takes appends faster than the
    applier encodes and indexes them (bench/results/streaming_scale.md: 422k rows/s acknowledged
    against 262k applied), so a writer that never waits would grow the lag - how stale lookups
    are, and the log on disk - without bound.  Refusing before the append keeps every
    acknowledged update, and tells the writer to slow down to what is applied."""
    limit = state.settings.max_apply_lag_s
    applier = state.applier
    if not limit or applier is None:
        return
    try:
        oldest = log_.oldest_after(applier.position)
    except log_.unavailable as exc:
        raise log_unavailable(exc) from exc
    if oldest is not None and time.time() - oldest > limit:
        lag = time.time() - oldest
        raise ApiError(
            503, "apply_lag",
            f"updates logged {lag:.0f} s ago are not applied yet (EMBSERVE_MAX_APPLY_LAG_S={limit:g}); retry later, or send less",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def handle_update(state: AppState, name: str, body: bytes, content_type: str, wait: bool) -> UpdateResponse:
    hosted = state.tables.get(name)
    if hosted is None:
        raise ApiError(404, "unknown_table", f"no table named {name!r}")
    if state.applier is None:
        raise ApiError(503, "no_update_log", "this server runs without an update log")
    ids, vectors, deletes, dim = _parse(body, content_type)
    table = hosted.table
    total = int(ids.shape[0] + deletes.shape[0])
    if total == 0:
        raise ApiError(422, "invalid_request", "no upserts and no deletes")
    if total > state.settings.max_updates_per_request:
        raise ApiError(413, "too_large", f"{total} IDs in one update; the limit is {state.settings.max_updates_per_request}")
    if vectors.shape[0] != ids.shape[0]:
        raise ApiError(422, "invalid_request", f"{ids.shape[0]} upsert IDs but {vectors.shape[0]} vectors")
    if ids.shape[0] and dim != table.dim:
        raise ApiError(422, "wrong_dim", f"vectors have dim {dim}; table {name!r} has dim {table.dim}")
    if not np.isfinite(vectors).all():
        raise ApiError(422, "not_finite", "vectors hold NaN or Inf")
    if table.index.positional and ids.shape[0] and int(ids.min()) < 0:
        raise ApiError(422, "invalid_request", "a table indexed by position (dense or runs) takes only IDs >= 0")
    if not table.index.positional and (bool((ids == KEY_EMPTY).any()) or bool((deletes == KEY_EMPTY).any())):
        raise ApiError(422, "invalid_request", "ID -9223372036854775808 (-2**63) is reserved: it marks free slots of the hash index")
    why = budget.refusal(hosted, ids, deletes)
    if why is not None:
        raise ApiError(422, "budget_too_small", why)
    log_ = state.update_log
    assert log_ is not None
    refuse_if_behind(state, log_)
    try:
        position = log_.append(UpdateBatch(name, ids, vectors.reshape(ids.shape[0], table.dim), deletes))
    except log_.unavailable as exc:
        raise log_unavailable(exc) from exc
    state.metrics.updates_appended.labels(name).inc()
    applied = state.applier.wait_for(position, state.settings.wait_timeout_s) if wait else False
    return UpdateResponse(position=format_position(position) or "", applied=applied, upserts=int(ids.shape[0]), deletes=int(deletes.shape[0]))


@router.post(
    "/tables/{name}/updates",
    response_model=UpdateResponse,
    summary="Upsert and delete rows (durably logged, then applied)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": UpdateRequest.model_json_schema()},
                BINARY_UPDATE_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    responses={
        404: {"description": "no such table"},
        413: {"description": "too many IDs"},
        422: {"description": "bad vectors or IDs, or rows that can never fit the table's budget (code budget_too_small)"},
        503: {"description": "the update log cannot take writes now (code log_unavailable), or this replica's applier is"
              " behind by more than EMBSERVE_MAX_APPLY_LAG_S (code apply_lag); retry after Retry-After seconds"},
    },
)
async def post_updates(
    request: Request,
    name: str = Path(..., pattern=TABLE_NAME_PATTERN),
    wait: bool = Query(False, description="answer only once the update is applied (read-your-writes)"),
    state: AppState = Depends(get_state),
) -> UpdateResponse:
    body = await request.body()
    content_type = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    return await run_in_threadpool(handle_update, state, name, body, content_type, wait)
