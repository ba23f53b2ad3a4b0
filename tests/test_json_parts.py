"""The sliced JSON encoder of large lookup answers is byte-for-byte the one-shot encoder."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.routers import lookup
from service.wire import LookupOutput

output = st.integers(0, 40).flatmap(
    lambda rows: st.builds(
        LookupOutput,
        st.text(min_size=1, max_size=8),
        arrays(np.float32, st.tuples(st.just(rows), st.integers(0, 9)), elements=st.floats(width=32, allow_nan=False)),
        arrays(np.bool_, st.just(rows)),
        st.integers(0, rows),
    )
)


@given(st.lists(output, min_size=1, max_size=4), st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_sliced_json_is_the_one_shot_json(outputs: list[LookupOutput], slice_bytes: int) -> None:
    original = lookup.SLICE_BYTES
    lookup.SLICE_BYTES = slice_bytes  # tiny slices: many row slices per result
    try:
        assert b"".join(lookup.encode_json_parts(outputs)) == lookup.encode_json(outputs)
    finally:
        lookup.SLICE_BYTES = original


def test_the_fastapi_route_applies_the_response_cap_too() -> None:
    """``POST /v1/lookup`` normally goes through LookupFastPath; the documented FastAPI route
    (what answers without it) refuses the same oversized request before decoding."""
    import torch
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from compression.allocation import compress_uniform
    from compression.layout import RowClass
    from service.errors import install_error_handlers
    from service.metrics import ServiceMetrics
    from service.registry import TableRegistry
    from service.settings import Settings
    from service.state import AppState

    registry = TableRegistry("cpu")
    registry.add("wide", compress_uniform(torch.randn(100, 256), RowClass(256, 8)))
    app = FastAPI()
    app.state.embserve = AppState(Settings(max_response_bytes=4096), registry, ServiceMetrics(registry))
    install_error_handlers(app)
    app.include_router(lookup.router)
    with TestClient(app) as client:
        refused = client.post("/v1/lookup", json={"lookups": [{"table": "wide", "ids": list(range(5))}]})
        assert refused.status_code == 413 and "4,096" in refused.json()["error"]["message"]
        assert client.post("/v1/lookup", json={"lookups": [{"table": "wide", "ids": [1]}]}).status_code == 200
