"""Liveness (the process answers) and readiness (tables loaded)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..errors import ApiError
from ..state import AppState, get_state

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: tables are loaded", responses={503: {"description": "not ready yet"}})
def readyz(state: AppState = Depends(get_state)) -> dict[str, Any]:
    if not state.tables.ready:
        raise ApiError(503, "not_ready", "tables are still loading")
    return {"status": "ready", "tables": state.tables.names(), "load_errors": state.tables.load_errors}
