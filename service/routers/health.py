"""Liveness (the process answers) and readiness (lookups can be served; writes stated apart)."""

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


@router.get(
    "/readyz",
    summary="Readiness: lookups can be served (writes may be degraded; the body says)",
    responses={503: {"description": "not ready yet: tables loading or the update log replaying"}},
)
def readyz(state: AppState = Depends(get_state)) -> dict[str, Any]:
    """200 once lookups can be served.  An update-log outage after that degrades writes only:
    lookups go on from memory, so the answer stays 200 (an orchestrator must not pull every
    replica because Redis is down) and the body says ``"writes": "degraded"`` and why."""
    if not state.tables.ready:
        raise ApiError(503, "not_ready", "tables are still loading")
    applier = state.applier
    if applier is not None and not applier.caught_up:
        raise ApiError(503, "not_ready", "replaying the update log")
    body: dict[str, Any] = {"status": "ready", "lookups": "ready", "writes": "ready", "tables": state.tables.names(),
                            "load_errors": state.tables.load_errors}
    if applier is not None and state.update_log is not None:
        error = applier.error  # the applier's last read failed: the log is not reachable
        warnings: list[str] = []
        if error is None:
            try:
                warnings = state.update_log.check_durability()
            except Exception as exc:  # noqa: BLE001 - an unreachable log degrades writes, not readiness
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            body["writes"] = "degraded"
        body["update_log"] = {
            "kind": state.update_log.kind,
            "applied_position": format_position(applier.position),
            "error": error,
            "durability_warnings": warnings,
        }
    body["over_budget"] = [n for n in state.tables.names() if (h := state.tables.get(n)) is not None and h.over_budget is not None]
    return body
