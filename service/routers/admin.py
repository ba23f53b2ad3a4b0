"""Admin endpoints: create and drop tables, set a table's budget and dimension policy, force a
re-decision or a snapshot.  They need the write token (see ``service/security.py``)."""

from __future__ import annotations

import threading
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from compression import CompressedTable, RowClass
from compression.allocation import BudgetTooSmall
from compression.hash_index import MAX_CAPACITY, MAX_LOAD
from compression.lifecycle import IdLifecycle, LifecycleConfig
from compression.unknown import UnknownPolicy

from ..errors import ApiError
from .. import tablefiles
from ..registry import TABLE_NAME_PATTERN, HostedTable, policy_config, policy_from_config, valid_table_name
from ..security import require_writer
from ..state import AppState, get_state
from ..updatelog import format_position
from .tables import TableInfo, describe
from .updates import log_unavailable


MAX_IDS_LIMIT = int(MAX_CAPACITY * MAX_LOAD)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_writer)])

# create and drop run one at a time: two creates of one name must not both succeed, and a drop
# and a create of one name must not interleave (admin calls are rare; a table write is short)
_catalogue_lock = threading.Lock()


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["none", "scall", "knapsack"] = "none"
    alpha: float | None = Field(None, gt=0, le=4, description="scall: power-law exponent of bytes over rank")
    num_groups: int | None = Field(None, ge=1, le=1024, description="knapsack: frequency groups")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class CreateTable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=TABLE_NAME_PATTERN)
    dim: int = Field(..., ge=1, le=4096)
    classes: list[str] = Field(
        ...,
        min_length=1,
        max_length=8,
        description="row classes as labels, e.g. d64b16, d32b8, d0b32; a class with fewer dims keeps the leading"
        " coordinates as sent (for trainers that order coordinates by importance, SCALL/FIITED-style)",
    )
    index: Literal["keyed", "dense"] = "keyed"
    unknown: Literal["zero"] = "zero"
    budget_bytes: int | None = Field(None, ge=1)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    max_ids: int | None = Field(None, ge=1, le=MAX_IDS_LIMIT, description="keyed: most IDs with a row; past it the lowest counts are evicted")
    admit_min_count: int | None = Field(None, ge=1, description="keyed: upserts an ID needs (decayed count) before it gets a row")
    count_half_life_rows: int | None = Field(None, ge=1, description="keyed: admission/eviction counts halve every this many upserted rows")
    count_sketch_width: int | None = Field(None, ge=16, le=1 << 26, description="keyed: columns of the admission/eviction count sketch (x4 rows x 4 bytes)")

    def lifecycle(self) -> LifecycleConfig | None:
        return lifecycle_config(None, self.max_ids, self.admit_min_count, self.count_half_life_rows, self.count_sketch_width)

    @field_validator("name")
    @classmethod
    def _no_dot_dot(cls, name: str) -> str:
        if not valid_table_name(name):
            raise ValueError(f"a table name matches {TABLE_NAME_PATTERN} and holds no '..'")
        return name


class SetCapacity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_ids: int | None = Field(None, ge=1, le=MAX_IDS_LIMIT, description="most IDs with a row (omit: unchanged)")
    admit_min_count: int | None = Field(None, ge=0, description="upserts before an ID gets a row; 0 = admit all (omit: unchanged)")
    count_half_life_rows: int | None = Field(None, ge=1, description="counts halve every this many upserted rows (omit: unchanged)")
    unlimited: bool = Field(False, description="drop max_ids (no capacity limit)")


def lifecycle_config(
    base: LifecycleConfig | None, max_ids: int | None, admit: int | None, half_life: int | None, width: int | None = None, unlimited: bool = False
) -> LifecycleConfig | None:
    """The new admission/capacity settings, or None when the table needs none."""
    cfg = base or LifecycleConfig()
    changes: dict[str, Any] = {}
    if max_ids is not None or unlimited:
        changes["max_ids"] = None if unlimited else max_ids
    if admit is not None:
        changes["admit_min_count"] = admit
    if half_life is not None:
        changes["half_life_rows"] = half_life
    if width is not None:
        changes["sketch_width"] = width
    cfg = LifecycleConfig(**{**cfg.as_dict(), **changes})
    if base is None and cfg.max_ids is None and cfg.admit_min_count <= 1:
        return None
    return cfg


class SetPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: PolicyConfig
    budget_bytes: int | None = Field(None, ge=1)
    redecide: bool = Field(False, description="re-decide classes now instead of at the next segment")


def _hosted(state: AppState, name: str) -> HostedTable:
    hosted = state.tables.get(name)
    if hosted is None:
        raise ApiError(404, "unknown_table", f"no table named {name!r}")
    return hosted


def _applier(state: AppState):  # type: ignore[no-untyped-def]
    if state.applier is None:
        raise ApiError(503, "no_update_log", "this server runs without an update log")
    return state.applier


@router.post("/tables", response_model=TableInfo, status_code=201, summary="Create an empty table that updates fill")
def create_table(body: CreateTable, state: AppState = Depends(get_state)) -> TableInfo:
    with _catalogue_lock:
        return _create_table(body, state)


def _create_table(body: CreateTable, state: AppState) -> TableInfo:
    applier = _applier(state)
    if state.tables.get(body.name) is not None:
        raise ApiError(409, "exists", f"table {body.name!r} exists")
    try:
        classes = [RowClass.parse(label) for label in body.classes]
        policy_from_config(body.policy.as_dict())
        for rc in classes:
            if rc.dim > body.dim:
                raise ValueError(f"class {rc.label()} is wider than dim {body.dim}")
        lifecycle = body.lifecycle()
        if lifecycle is not None and body.index != "keyed":
            raise ValueError("max_ids and admit_min_count apply to keyed tables only")
        table = CompressedTable.empty(body.dim, classes, keyed=body.index == "keyed", device=state.tables.device, unknown=UnknownPolicy(body.unknown))
        table.lifecycle = None if lifecycle is None else IdLifecycle(lifecycle)
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc
    # The new table starts at the log's end, not at the applier's position: entries still
    # waiting there for an earlier table of this name (dropped) are not this table's.
    try:
        last = state.update_log.last_position() if state.update_log is not None else None
    except state.update_log.unavailable as exc:  # type: ignore[union-attr]
        raise log_unavailable(exc) from exc
    start = max((p for p in (applier.position, last) if p is not None), default=None)
    manifest = {"log_position": format_position(start), "extra": {"budget_bytes": body.budget_bytes, "policy": body.policy.as_dict()}}
    tablefiles.clear_dropped(state.settings.tables_dir, body.name)
    hosted = state.tables.add(body.name, table, manifest)
    try:
        applier.snapshot(hosted)
    except BaseException:
        state.tables.remove(body.name)  # not acknowledged: not served either
        raise
    return describe(hosted)


@router.delete("/tables/{name}", status_code=204, summary="Stop serving a table and delete its file, for good")
def drop_table(name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> None:
    with _catalogue_lock:
        hosted = _hosted(state, name)
        position = state.applier.position if state.applier is not None else None
        # waits for a snapshot of the table in flight; recorded so a restart does not bring it back
        if not tablefiles.drop(state.tables, hosted, state.settings.tables_dir, position):
            raise ApiError(404, "unknown_table", f"no table named {name!r}")


@router.put("/tables/{name}/policy", summary="Set a table's byte budget and dimension policy")
async def set_policy(body: SetPolicy, name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> dict[str, Any]:
    hosted = _hosted(state, name)
    try:
        policy = policy_from_config(body.policy.as_dict())
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc
    if policy is not None and (body.budget_bytes or hosted.budget_bytes) is None:
        raise ApiError(422, "invalid_request", "a policy needs a budget_bytes")
    hosted.policy = policy
    if body.budget_bytes is not None:
        hosted.budget_bytes = body.budget_bytes
    hosted.over_budget = None  # decided again under the new settings
    hosted.dirty = True
    result: dict[str, Any] = {"policy": policy_config(policy), "budget_bytes": hosted.budget_bytes}
    if body.redecide and policy is not None:
        result["redecision"] = await _redecide(state, hosted)
    return result


async def _redecide(state: AppState, hosted: HostedTable) -> dict[str, Any]:
    applier = _applier(state)
    try:
        return await run_in_threadpool(applier.redecide, hosted)
    except BudgetTooSmall as exc:
        raise ApiError(422, "budget_too_small", str(exc)) from exc
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc


@router.post("/tables/{name}/redecide", summary="Re-decide every row's class now")
async def redecide(name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> dict[str, Any]:
    return await _redecide(state, _hosted(state, name))


@router.post("/tables/{name}/snapshot", summary="Write the table to disk now")
async def snapshot(name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> dict[str, Any]:
    hosted = _hosted(state, name)
    applier = _applier(state)
    position = await run_in_threadpool(applier.snapshot, hosted)
    if hosted.dropped:
        raise ApiError(404, "unknown_table", f"table {name!r} was dropped")
    try:
        trimmed = await run_in_threadpool(applier.trim)
    except state.update_log.unavailable as exc:  # type: ignore[union-attr]
        raise log_unavailable(exc) from exc  # the file is written; the trim runs again later
    return {"log_position": format_position(position), "trimmed_entries": trimmed}


@router.put("/tables/{name}/capacity", summary="Set a keyed table's max_ids and admission count")
def set_capacity(body: SetCapacity, name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> dict[str, Any]:
    """The change takes effect at the table's current log position and is snapshotted at once
    (the snapshot includes every entry applied under the new settings): a restart replays later
    entries under the settings they were applied with (eviction and admission stay functions of
    the log)."""
    hosted = _hosted(state, name)
    applier = _applier(state)
    table = hosted.table
    if table.index.kind != "hash":
        raise ApiError(422, "invalid_request", f"table {name!r} has a {table.index.kind} index; capacity and admission need a hash-indexed keyed table")
    with hosted.write_lock, table.lock:  # a writer: snapshots copy the table under the write lock alone
        base = table.lifecycle.config if table.lifecycle is not None else None
        try:
            cfg = lifecycle_config(base, body.max_ids, body.admit_min_count, body.count_half_life_rows, unlimited=body.unlimited)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from exc
        if cfg is not None:
            table.lifecycle = IdLifecycle(cfg) if table.lifecycle is None else table.lifecycle.reconfigured(cfg)
        hosted.dirty = True
    # outside the table's locks: a snapshot takes the snapshot lock, then the write lock (tablefiles.py);
    # entries applied in between ran under the new settings and the snapshot includes them
    applier.snapshot(hosted)
    return {"lifecycle": None if table.lifecycle is None else table.lifecycle.config.as_dict(), "ids": table.index.num_ids}
