"""Admission and capacity of keyed tables: the gate is a function of the upserts alone, evicts
the lowest counts first, keeps ``max_ids``, survives a save/load; through the service: admin
settings, filtered / evicted counters, the reserved ID refused with a 422."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from compression import CompressedTable, RowClass, load_table, save_table
from compression.hash_index import CHURN_LOAD, EMPTY, capacity_for
from compression.lifecycle import IdLifecycle, LifecycleConfig
from service.app import create_app
from service.settings import Settings

LOOPBACK = ("127.0.0.1", 50000)


def _table(**cfg: int) -> CompressedTable:
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    table.lifecycle = IdLifecycle(LifecycleConfig(**cfg))
    return table


def _apply(table: CompressedTable, ids: torch.Tensor) -> tuple[int, int]:
    assert table.lifecycle is not None
    gate = table.lifecycle.gate(table, ids)
    kept = ids[gate.keep]
    table.delete(gate.victims)  # as the applier does, before the entry's rows
    if kept.numel():
        table.put(kept, kept.to(torch.float32)[:, None].expand(-1, 4), 0)
    return gate.filtered, gate.evicted


def _stream(seed: int, batches: int = 60, size: int = 200) -> list[torch.Tensor]:
    """Zipf-like: a hot head of 50 IDs in every batch, then a tail of mostly new IDs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(batches):
        head = torch.arange(50)
        tail = torch.randint(1000, 10**9, (size - 50,), generator=g)
        out.append(torch.cat([head, tail])[torch.randperm(size, generator=g)])
    return out


def test_capacity_keeps_max_ids_and_evicts_the_cold_tail_not_the_head() -> None:
    table = _table(max_ids=1000, half_life_rows=5000)
    evicted_total = 0
    for ids in _stream(1):
        _, evicted = _apply(table, ids)
        evicted_total += evicted
        assert table.index.num_ids <= 1000
    assert evicted_total > 5000
    head = table.lookup(torch.arange(50))
    assert bool(head.found.all()), "the hot head was evicted"
    assert torch.equal(head.values[:, 0], torch.arange(50, dtype=torch.float32))


def test_slabs_do_not_grow_past_max_ids() -> None:
    table = _table(max_ids=1000, half_life_rows=5000)
    for ids in _stream(1, batches=30, size=300):
        _apply(table, ids)
    assert table.index.num_ids == 1000
    assert table.slabs[0].shape[0] == 1000  # doubling would have stopped at 16 * 2**k >= 1000 rows: 1024+ (measured 2x overshoot at 1M)
    # the hash index grows geometrically (1.5x) but stops at the capacity max_ids needs at the
    # churn load (2000 slots)
    assert table.index.capacity == capacity_for(1000, CHURN_LOAD)  # type: ignore[attr-defined]


def test_admission_filters_ids_below_the_count() -> None:
    table = _table(admit_min_count=3)
    assert _apply(table, torch.tensor([7, 8])) == (2, 0)
    assert _apply(table, torch.tensor([7])) == (1, 0)
    assert not bool(table.lookup(torch.tensor([7, 8])).found.any())
    assert _apply(table, torch.tensor([7, 8])) == (1, 0)  # 7 reaches 3 upserts, 8 has 2
    found = table.lookup(torch.tensor([7, 8])).found.tolist()
    assert found == [True, False]


def test_the_gate_is_a_function_of_the_upserts_and_survives_a_save(tmp_path: Path) -> None:
    stream = _stream(2)
    a = _table(max_ids=700, admit_min_count=2, half_life_rows=3000)
    b = _table(max_ids=700, admit_min_count=2, half_life_rows=3000)
    for ids in stream[:30]:
        _apply(a, ids)
        _apply(b, ids)
    # b goes through a file halfway (what a snapshot and a restart do)
    b, manifest = load_table(save_table(b, tmp_path / "b.safetensors"))
    assert manifest["lifecycle"]["max_ids"] == 700 and b.lifecycle is not None
    for ids in stream[30:]:
        assert _apply(a, ids) == _apply(b, ids)
    ka, la = a.index.live_items()
    kb, lb = b.index.live_items()
    assert torch.equal(ka, kb) and torch.equal(la, lb)
    assert a.nbytes == b.nbytes and a.stats().other_bytes >= a.lifecycle.nbytes  # type: ignore[union-attr]


def test_lifecycle_needs_a_hash_index() -> None:
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=False)
    with pytest.raises(ValueError, match="hash"):
        CompressedTable(4, table.classes, table.slabs, table.used, table.index, lifecycle=IdLifecycle(LifecycleConfig(max_ids=3)))


def test_service_admin_capacity_metrics_and_reserved_id(tmp_path: Path) -> None:
    settings = Settings(tables_dir=tmp_path / "tables", segment_seconds=3600, segment_updates=10**9, snapshot_interval_s=3600)
    with TestClient(create_app(settings), client=LOOPBACK) as client:
        body = {"name": "k", "dim": 4, "classes": ["d4b32"], "max_ids": 100, "admit_min_count": 2}
        assert client.post("/v1/admin/tables", json=body).status_code == 201
        bad = client.post("/v1/admin/tables", json={**body, "name": "d", "index": "dense"})
        assert bad.status_code == 422 and "keyed" in bad.json()["error"]["message"]
        info = client.get("/v1/tables/k").json()
        assert info["index"] == "hash" and info["lifecycle"]["max_ids"] == 100 and info["index_slots"] == 16
        ids = list(range(300))
        vec = np.ones((300, 4), dtype=np.float32)
        for _ in range(2):
            r = client.post("/v1/tables/k/updates?wait=true", json={"upsert_ids": ids, "vectors": vec.tolist()})
            assert r.status_code == 200 and r.json()["applied"]
        assert client.get("/v1/tables/k").json()["ids"] == 100
        metrics = client.get("/metrics").text
        # round 1: every ID below 2 upserts; round 2: 300 new IDs for 100 places, the 200 lowest refused
        assert 'embserve_updates_filtered_total{table="k"} 500.0' in metrics
        assert 'embserve_table_max_ids{table="k"} 100.0' in metrics and "embserve_table_index_slots" in metrics
        r = client.post("/v1/tables/k/updates", json={"upsert_ids": [EMPTY], "vectors": [[0, 0, 0, 0]]})
        assert r.status_code == 422 and "reserved" in r.json()["error"]["message"]
        r = client.put("/v1/admin/tables/k/capacity", json={"max_ids": 50})
        assert r.status_code == 200 and r.json()["lifecycle"]["max_ids"] == 50
        client.post("/v1/tables/k/updates?wait=true", json={"upsert_ids": [1000, 1000], "vectors": [[1, 1, 1, 1]] * 2})
        assert client.get("/v1/tables/k").json()["ids"] == 50
        assert 'embserve_evicted_ids_total{table="k"} 51.0' in client.get("/metrics").text  # 100 held + 1 new - 50
        assert client.put("/v1/admin/tables/k/capacity", json={"max_ids": 0}).status_code == 422
    # the settings and counts were snapshotted with the table
    table, manifest = load_table(tmp_path / "tables" / "k.safetensors")
    assert manifest["lifecycle"]["max_ids"] == 50 and table.index.num_ids == 50




# ---------------------------------------------------------------- compiled sketch ops == torch

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from compression.frequency import DecayedCountMinSketch  # noqa: E402
from compression.kernels import cpu_c as _cpu_c  # noqa: E402


@pytest.mark.skipif(not _cpu_c.SKETCH_OPS_AVAILABLE, reason="compiled sketch ops not built (python setup.py build_ext --inplace)")
@settings(max_examples=60, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=300), min_size=1, max_size=4),
    weights=st.lists(st.floats(0.0625, 1000.0, width=32), min_size=4, max_size=4),
    width=st.sampled_from([16, 97, 4096]),
    depth=st.integers(1, 4),
)
def test_compiled_sketch_ops_equal_torch(batches: list[list[int]], weights: list[float], width: int, depth: int) -> None:
    """kernels/sketch.c gives the torch code's cells and estimates exactly: the int32 lifecycle
    counts (halvings included) and the float32 traffic sketch with fractional weights (adds in
    the same order, so the same roundings) - repeated IDs, any int64 (negatives, INT64_MIN)."""
    saved = _cpu_c.SKETCH_OPS_AVAILABLE
    results = []
    try:
        for compiled in (True, False):
            _cpu_c.SKETCH_OPS_AVAILABLE = compiled
            sketch = DecayedCountMinSketch(width=width, depth=depth)
            life = IdLifecycle(LifecycleConfig(sketch_width=width, sketch_depth=depth, half_life_rows=250))
            for batch, weight in zip(batches, weights):
                ids = torch.tensor(batch + batch[:7], dtype=torch.int64)
                sketch.add(ids, weight)
                life.count(ids)
            probe = torch.tensor(sum(batches, []) + [0, -1], dtype=torch.int64)
            results.append((sketch.cells.clone(), sketch.estimate(probe), life.counts.clone(), life.estimate(probe), life.clock.clone()))
    finally:
        _cpu_c.SKETCH_OPS_AVAILABLE = saved
    for got, want in zip(*results):
        assert got.dtype == want.dtype and torch.equal(got, want)
