"""Admin endpoints: create and drop tables, set a table's budget and dimension policy, force a
re-decision or a snapshot.  They need the write token (see ``service/security.py``)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from compression import CompressedTable, RowClass
from compression.allocation import BudgetTooSmall
from compression.storage import TABLE_SUFFIX
from compression.unknown import UnknownPolicy

from ..errors import ApiError
from ..registry import TABLE_NAME_PATTERN, HostedTable, policy_config, policy_from_config
from ..security import require_writer
from ..state import AppState, get_state
from ..updatelog import format_position
from .tables import TableInfo, describe


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_writer)])


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
    applier = _applier(state)
    if state.tables.get(body.name) is not None:
        raise ApiError(409, "exists", f"table {body.name!r} exists")
    try:
        classes = [RowClass.parse(label) for label in body.classes]
        policy_from_config(body.policy.as_dict())
        for rc in classes:
            if rc.dim > body.dim:
                raise ValueError(f"class {rc.label()} is wider than dim {body.dim}")
        table = CompressedTable.empty(body.dim, classes, keyed=body.index == "keyed", device=state.tables.device, unknown=UnknownPolicy(body.unknown))
    except ValueError as exc:
        raise ApiError(422, "invalid_request", str(exc)) from exc
    manifest = {"log_position": format_position(applier.position), "extra": {"budget_bytes": body.budget_bytes, "policy": body.policy.as_dict()}}
    hosted = state.tables.add(body.name, table, manifest)
    applier.snapshot(hosted)
    return describe(hosted)


@router.delete("/tables/{name}", status_code=204, summary="Stop serving a table and delete its file")
def drop_table(name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> None:
    _hosted(state, name)
    state.tables.remove(name)
    (state.settings.tables_dir / f"{name}{TABLE_SUFFIX}").unlink(missing_ok=True)


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
    trimmed = await run_in_threadpool(applier.trim)
    return {"log_position": format_position(position), "trimmed_entries": trimmed}
