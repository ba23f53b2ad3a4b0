"""Liveness (the process answers) and readiness (lookups can be served; writes stated apart)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..errors import ApiError
from ..state import AppState, get_state
from ..updatelog import format_position
from ..updatelog.trim_coordinator import TrimGap

router = APIRouter(tags=["health"])


def gap_error(gap: TrimGap) -> ApiError:
    """The 503 of a replica that missed trimmed entries: which ones, and the two ways back."""
    needed = format_position(gap.needed)
    first = format_position(gap.first_entry)
    message = (
        f"update log gap: this replica needs every stream entry after {needed or 'the stream start (it has no snapshot position)'}, "
        f"but entries through {format_position(gap.trimmed_through)} were trimmed while it was away "
        f"(the stream now starts at {first or 'nothing: it is empty'}), so its tables lack acknowledged updates. "
        "Recover: stop it and re-seed its tables folder from a fresh snapshot of another replica (copy that replica's "
        "table files), then start it; or, only if the stream still holds every entry after the seed, delete its tables "
        "so it starts over from the seed"
    )
    details = [{"needed_position": needed, "trimmed_through": format_position(gap.trimmed_through), "stream_first_position": first}]
    return ApiError(503, "update_log_gap", message, details)


@router.get("/healthz", summary="Liveness: the process is up")
def healthz() -> dict[str, str]:
    """200 whenever the process answers, update-log gap included: a restart would not fix that."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: lookups can be served (writes may be degraded; the body says)",
    responses={503: {"description": "not ready: tables loading, the update log replaying, or (code update_log_gap, until "
                                    "an operator re-seeds the replica) entries it needed were trimmed from the stream"}},
)
def readyz(state: AppState = Depends(get_state)) -> dict[str, Any]:
    """200 once lookups can be served.  An update-log outage after that degrades writes only:
    lookups go on from memory, so the answer stays 200 (an orchestrator must not pull every
    replica because Redis is down) and the body says ``"writes": "degraded"`` and why.

    A replica that came back after the shared stream was trimmed past what it needed answers 503
    for good: its tables lack acknowledged updates, which no replay or restart brings back."""
    if not state.tables.ready:
        raise ApiError(503, "not_ready", "tables are still loading")
    applier = state.applier
    if applier is not None and applier.gap is not None:
        raise gap_error(applier.gap)
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
