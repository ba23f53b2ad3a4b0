"""Liveness (the process answers) and readiness (tables loaded)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..errors import ApiError
from ..state import AppState, get_state
from ..updatelog import format_position

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: tables are loaded", responses={503: {"description": "not ready yet"}})
def readyz(state: AppState = Depends(get_state)) -> dict[str, Any]:
    if not state.tables.ready:
        raise ApiError(503, "not_ready", "tables are still loading")
    applier = state.applier
    if applier is not None and not applier.caught_up:
        raise ApiError(503, "not_ready", "replaying the update log")
    body: dict[str, Any] = {"status": "ready", "tables": state.tables.names(), "load_errors": state.tables.load_errors}
    if applier is not None and state.update_log is not None:
        body["update_log"] = {
            "kind": state.update_log.kind,
            "applied_position": format_position(applier.position),
            "error": applier.error,
            "durability_warnings": state.update_log.check_durability(),
        }
    return body
