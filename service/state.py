"""What the routers share: settings, hosted tables and metrics, hung on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from .metrics import ServiceMetrics
from .registry import TableRegistry
from .settings import Settings
from .updatelog import UpdateLog

if TYPE_CHECKING:
    from .applier import Applier
    from .batching import LookupBatching


@dataclass
class AppState:
    settings: Settings
    tables: TableRegistry
    metrics: ServiceMetrics
    update_log: UpdateLog | None = None
    applier: "Applier | None" = None
    batching: "LookupBatching | None" = None  # unpooled lookups go through it (service/batching.py)
    grpc_port: int | None = None  # where the v2 gRPC endpoint listens, once started


async def get_state(request: Request) -> AppState:
    """FastAPI dependency: the app's shared state.  ``async`` on purpose: FastAPI runs a plain
    ``def`` dependency in the thread pool, a hop that cost ~0.3 ms per request here."""
    state: AppState = request.app.state.embserve
    return state
