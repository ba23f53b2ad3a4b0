"""What the routers share: settings, hosted tables and metrics, hung on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from .metrics import ServiceMetrics
from .registry import TableRegistry
from .settings import Settings


@dataclass
class AppState:
    settings: Settings
    tables: TableRegistry
    metrics: ServiceMetrics


def get_state(request: Request) -> AppState:
    """FastAPI dependency: the app's shared state."""
    state: AppState = request.app.state.embserve
    return state
