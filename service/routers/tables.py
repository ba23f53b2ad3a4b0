"""Read-only table catalogue: schema, rows per class, bytes, ratio."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel

from ..errors import ApiError
from ..registry import TABLE_NAME_PATTERN, HostedTable, policy_config
from ..updatelog import format_position
from ..security import require_reader
from ..state import AppState, get_state

router = APIRouter(prefix="/v1", tags=["tables"], dependencies=[Depends(require_reader)])


class RowClassInfo(BaseModel):
    row_class: str
    dim: int
    bits: int
    rows: int
    capacity: int
    bytes: int


class TableInfo(BaseModel):
    name: str
    dim: int
    ids: int
    index: str
    device: str
    bytes: int
    index_bytes: int
    row_bytes: int
    other_bytes: int
    bits_per_parameter: float
    compression_ratio: float
    rotation: bool
    unknown_policy: str
    classes: list[RowClassInfo]
    format_version: int | None
    log_position: str | None
    snapshot_position: str | None
    budget_bytes: int | None
    over_budget: str | None = None  # why the policy cannot fit the rows in budget_bytes; None = fits
    policy: dict[str, Any]
    lifecycle: dict[str, Any] | None = None  # keyed tables: max_ids, admit_min_count, ... (compression/lifecycle.py)
    index_slots: int | None = None  # hash index capacity (ids / index_slots = its load)
    loaded_at: float


class TableList(BaseModel):
    tables: list[TableInfo]


def describe(hosted: HostedTable) -> TableInfo:
    table = hosted.table
    stats = table.stats()
    manifest: dict[str, Any] = hosted.manifest
    return TableInfo(
        name=hosted.name,
        dim=stats.dim,
        ids=stats.num_ids,
        index=stats.index_kind,
        device=str(table.device),
        bytes=stats.nbytes,
        index_bytes=stats.index_bytes,
        row_bytes=stats.row_bytes,
        other_bytes=stats.other_bytes,
        bits_per_parameter=stats.bits_per_parameter,
        compression_ratio=stats.compression_ratio,
        rotation=table.rotation is not None,
        unknown_policy=table.unknown.kind,
        classes=[
            RowClassInfo(row_class=c.row_class.label(), dim=c.row_class.dim, bits=c.row_class.bits, rows=c.rows, capacity=c.capacity, bytes=c.bytes)
            for c in stats.classes
        ],
        format_version=manifest.get("format_version"),
        log_position=format_position(hosted.log_position),
        snapshot_position=format_position(hosted.snapshot_position),
        budget_bytes=hosted.budget_bytes,
        over_budget=hosted.over_budget,
        policy=policy_config(hosted.policy),
        lifecycle=None if table.lifecycle is None else table.lifecycle.config.as_dict(),
        index_slots=getattr(table.index, "capacity", None),
        loaded_at=hosted.loaded_at,
    )


@router.get("/tables", response_model=TableList, summary="All hosted tables")
def list_tables(state: AppState = Depends(get_state)) -> TableList:
    hosted = [state.tables.get(n) for n in state.tables.names()]
    return TableList(tables=[describe(h) for h in hosted if h is not None])


@router.get("/tables/{name}", response_model=TableInfo, summary="One table", responses={404: {"description": "no such table"}})
def get_table(name: str = Path(..., pattern=TABLE_NAME_PATTERN), state: AppState = Depends(get_state)) -> TableInfo:
    hosted = state.tables.get(name)
    if hosted is None:
        raise ApiError(404, "unknown_table", f"no table named {name!r}")
    return describe(hosted)
