"""The run-length encoded index and the model-aware allocator error: same lookups as a dense
locator for a fraction of its bytes, exact byte accounting, files that round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import CompressedTable, RowClass, RunIndex, build_table, compress, load_table, save_table
from compression.allocation import served_rows
from compression.index import DenseIndex, run_index_bytes
from compression.training.sensitivity import output_error
from compression.synthetic import synthetic_table, zipf_frequencies

CLASSES = [RowClass(8, 32), RowClass(8, 4), RowClass(4, 16), RowClass(0, 32)]


@given(st.lists(st.integers(min_value=-1, max_value=len(CLASSES) - 1), min_size=0, max_size=200))
@settings(max_examples=80, deadline=None)
def test_runs_resolve_exactly_like_the_dense_locator(class_of: list[int]) -> None:
    n = len(class_of)
    rows = torch.randn(n, 8, generator=torch.Generator().manual_seed(n))
    dense = build_table(rows, torch.tensor(class_of, dtype=torch.int64), CLASSES, index="dense")
    runs = build_table(rows, torch.tensor(class_of, dtype=torch.int64), CLASSES, index="runs")
    assert isinstance(runs.index, RunIndex)
    assert torch.equal(runs.index.to_locator(), dense.index.locator)  # type: ignore[attr-defined]
    query = torch.arange(-3, n + 3)
    a, b = dense.lookup(query), runs.lookup(query)
    assert torch.equal(a.values, b.values) and torch.equal(a.locators, b.locators)
    changes = sum(1 for i in range(1, n) if class_of[i] != class_of[i - 1])
    assert runs.index.num_runs <= (1 + changes if n else 0)
    assert runs.index.nbytes == run_index_bytes(runs.index.num_runs)
    assert runs.nbytes == sum(t.numel() * t.element_size() for t in runs.held_tensors().values())


def test_writes_to_a_run_indexed_table_keep_it_consistent() -> None:
    rows = torch.randn(100, 8)
    table = build_table(rows, torch.zeros(100, dtype=torch.int64), CLASSES[:2], index="runs")
    assert table.index.num_runs == 1 and table.index.nbytes == 20  # type: ignore[attr-defined]
    new = torch.randn(3, 8)
    table.put(torch.tensor([5, 150, 6]), new, 1)  # move two rows to class 1, add ID 150
    table.delete(torch.tensor([7]))
    got = table.lookup(torch.tensor([5, 6, 7, 8, 150, 149]))
    assert got.found.tolist() == [True, True, False, True, True, False]
    assert torch.equal(got.values[3], rows[8])
    freed = table.compact()
    assert freed > 0 and isinstance(table.index, RunIndex)
    assert torch.equal(table.lookup(torch.tensor([8])).values[0], rows[8])


def test_run_indexed_tables_round_trip_through_files(tmp_path: Path) -> None:
    rows = torch.randn(50, 8)
    cls = torch.tensor([0] * 20 + [1] * 20 + [-1] * 10)
    table = build_table(rows, cls, CLASSES, index="runs")
    loaded, manifest = load_table(save_table(table, tmp_path / "r.safetensors"))
    assert manifest["index"] == "runs" and manifest["format_version"] == 1
    ids = torch.arange(-2, 55)
    assert torch.equal(table.lookup(ids).values, loaded.lookup(ids).values)
    assert loaded.nbytes == table.nbytes


def test_run_index_rejects_malformed_state() -> None:
    with pytest.raises(ValueError):
        RunIndex(torch.tensor([1, 5]), torch.tensor([0], dtype=torch.int32))  # must start at 0
    with pytest.raises(ValueError):
        RunIndex(torch.tensor([0, 5, 5]), torch.tensor([0, 5], dtype=torch.int32))  # empty run
    assert RunIndex.from_locator(DenseIndex(torch.empty(0, dtype=torch.int32)).locator).num_runs == 0


def test_compress_with_runs_reserves_only_what_its_runs_need() -> None:
    n, d = 2000, 16
    freqs = torch.sort(zipf_frequencies(n, seed=2), descending=True).values
    rows = synthetic_table(n, d, freqs, seed=2)
    for ratio in (16, 128):
        budget = n * d * 4 // ratio
        runs, _ = compress(rows, freqs, budget_bytes=budget, index="runs")
        assert runs.nbytes <= budget and isinstance(runs.index, RunIndex)
        assert runs.nbytes >= 0.9 * budget  # the reservation is not wasted
    with pytest.raises(ValueError):
        compress(rows, freqs, ratio=8, unknown="qr")  # trained fallbacks are not fitted here


def test_model_aware_error_sees_what_pruning_does_to_the_model() -> None:
    torch.manual_seed(0)
    n, d = 60, 4
    weight = torch.randn(n, d)
    ids = torch.randint(0, n, (500, 3))

    class Dot(torch.nn.Module):  # logit = <e_a, e_b> + sum(e_c): every coordinate matters
        def forward(self, batch: torch.Tensor, dense: object = None) -> tuple[torch.Tensor, torch.Tensor]:
            e = weight[batch]
            logit = (e[:, 0] * e[:, 1]).sum(1) + e[:, 2].sum(1)
            return logit, logit

    error = output_error(Dot(), weight, ids, rows_per_group=1000)
    group = torch.arange(10)
    assert error(0, group, weight[group].clone()) == 0.0
    zeroed = error(0, group, torch.zeros(10, d))
    coarse = error(0, group, served_rows(weight[group], RowClass(d, 8)))
    assert zeroed > coarse > 0.0
    before = weight.clone()
    error(1, torch.arange(10, 20), torch.zeros(10, d))
    assert torch.equal(weight, before)  # the patched rows are put back
    table, _ = compress(weight, torch.ones(n), budget_bytes=n * d * 4 // 4, index="runs", group_error=error, num_groups=6)
    assert table.nbytes <= n * d * 4 // 4


def test_served_rows_is_what_the_table_serves() -> None:
    rows = synthetic_table(300, 16, seed=6)
    rotation = torch.linalg.qr(torch.randn(16, 16))[0]
    for rc in (RowClass(16, 4), RowClass(4, 8), RowClass(1, 16), RowClass(0, 32)):
        table = build_table(rows, torch.zeros(300, dtype=torch.int64), [rc], rotation=rotation if 0 < rc.dim < 16 else None)
        table.backend = "torch"  # type: ignore[assignment]
        expected = served_rows(rows, rc, rotation if 0 < rc.dim < 16 else None)
        assert torch.allclose(table.lookup(torch.arange(300)).values, expected, atol=1e-6)


def test_empty_table_of_a_hash_family_policy_costs_only_its_tensors() -> None:
    table = CompressedTable.empty(4, [RowClass(0, 32)], keyed=False)
    assert table.nbytes == 0
