"""Index chosen by bytes, plans that never lose to simpler ones, pruned rows served by the
unknown-ID policy, fp16 rotation columns, the objective in the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compression import BudgetTooSmall, RowClass, build_table, compress, load_table, save_table
from compression.allocation import index_bytes, objective_weights
from compression.index import DenseIndex, KeyedIndex, RunIndex
from compression.rotation import rotation_bytes, weighted_pca_rotation
from compression.storage import MANIFEST_KEY
from compression.synthetic import synthetic_table, zipf_frequencies
from compression.table import STATUS_FOUND, STATUS_PRUNED, STATUS_UNKNOWN
from compression.unknown import build_unknown_policy


def _by_frequency(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A table whose IDs are numbered by descending frequency (a trainer's vocabulary)."""
    freqs = torch.sort(zipf_frequencies(n, seed=seed), descending=True).values
    return synthetic_table(n, dim, freqs, seed=seed), freqs


def test_auto_index_takes_runs_for_a_frequency_numbered_table_and_reaches_64x() -> None:
    rows, freqs = _by_frequency(4000, 16, seed=3)
    budget = 4000 * 16 * 4 // 64  # 4,000 B: a dense locator alone would be 16,000
    with pytest.raises(BudgetTooSmall):
        compress(rows, freqs, budget_bytes=budget, index="dense")
    table, report = compress(rows, freqs, budget_bytes=budget)
    assert report.index == "runs" and isinstance(table.index, RunIndex)
    assert table.nbytes <= budget
    assert table.stats().index_bytes == index_bytes("runs", 4000, 4000, table.index.num_runs)
    # at 3x every kind fits; auto's table holds no more index bytes than any forced kind
    auto, _ = compress(rows, freqs, ratio=3)
    for kind in ("dense", "runs", "keyed"):
        forced, rep = compress(rows, freqs, ratio=3, index=kind, keyed_index="sorted")  # type: ignore[arg-type]
        assert rep.index == kind and forced.index.kind == kind
        assert forced.nbytes <= 4000 * 16 * 4 / 3
        assert auto.stats().index_bytes <= forced.stats().index_bytes


def test_auto_index_over_sparse_ids_is_keyed_and_exact() -> None:
    rows = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.randperm(500, generator=torch.Generator().manual_seed(1)) * 7919 + 3
    table, report = compress(rows, None, ratio=1.5, ids=ids, keyed_index="sorted")  # keys cost 12.5 B per ID of the 21 B per row
    assert report.index == "keyed" and isinstance(table.index, KeyedIndex)
    got = table.lookup(ids).values
    assert float(((got - rows) ** 2).sum() / (rows**2).sum()) < 0.02
    with pytest.raises(ValueError, match="keyed"):
        compress(rows, None, ratio=1.5, ids=ids - 10_000, index="dense")


def test_positional_index_over_explicit_ids_in_range() -> None:
    rows = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(300) * 2  # even IDs only: dense spans 600 locators
    table, report = compress(rows, None, budget_bytes=300 * 8 * 2, ids=ids, index="dense")
    assert isinstance(table.index, DenseIndex) and table.index.size == 599
    res = table.lookup(torch.tensor([4, 5]))
    assert res.status.tolist() == [STATUS_FOUND, STATUS_UNKNOWN]


def test_a_table_whose_rows_would_all_be_pruned_is_refused() -> None:
    rows = torch.randn(100, 8)
    # room for the index, not for one row: every plan would prune everything
    with pytest.raises(BudgetTooSmall, match="prune every row"):
        compress(rows, None, budget_bytes=25)


def _objective(table, rows: torch.Tensor, freqs: torch.Tensor, objective: str) -> float:  # type: ignore[no-untyped-def]
    served = table.lookup(torch.arange(rows.shape[0])).values
    w = objective_weights(rows, freqs, objective)  # type: ignore[arg-type]
    return float((w * ((served - rows) ** 2).sum(1).double()).sum())


def _simple_plans(rows: torch.Tensor, freqs: torch.Tensor, budget: int):  # type: ignore[no-untyped-def]
    """What a user writes in ten lines: one width for every row, or the top K rows at one width."""
    n, dim = rows.shape
    order = torch.argsort(freqs, descending=True, stable=True)
    for bits in (32, 16, 8, 4, 2, 1):
        rc = RowClass(dim, bits)
        for index in ("runs", "dense"):
            t = build_table(rows, torch.zeros(n, dtype=torch.int64), [rc], index=index)
            if t.nbytes <= budget:
                yield f"uniform {rc.label()}", t
                break
        k = min(n - 1, budget // rc.row_bytes)
        while k > 0:
            cls = torch.ones(n, dtype=torch.int64)
            cls[order[:k]] = 0
            fits = [t for t in (build_table(rows, cls, [rc, RowClass(0, 32)], index=i) for i in ("runs", "dense")) if t.nbytes <= budget]
            if fits:
                yield f"top-{k} {rc.label()}", min(fits, key=lambda t: t.nbytes)
                break
            k = int(k * 0.9)


@pytest.mark.parametrize("objective", ["l2", "cosine"])  # knn's own objective is recall: judged on traffic
@pytest.mark.parametrize("numbered_by_frequency", [True, False])
def test_allocator_never_loses_to_a_simple_plan_on_its_objective(objective: str, numbered_by_frequency: bool) -> None:
    n, dim = 600, 8
    if numbered_by_frequency:
        rows, freqs = _by_frequency(n, dim, seed=5)
    else:
        freqs = zipf_frequencies(n, seed=6)
        rows = synthetic_table(n, dim, freqs, seed=6)
    rows[::7] *= 3.0  # norms that vary: the two objectives disagree
    for ratio in (3, 12, 40):
        budget = n * dim * 4 // ratio
        table, _ = compress(rows, freqs, budget_bytes=budget, objective=objective)  # type: ignore[arg-type]
        assert table.nbytes <= budget
        ours = _objective(table, rows, freqs, objective)
        for name, simple in _simple_plans(rows, freqs, budget):
            theirs = _objective(simple, rows, freqs, objective)
            assert ours <= theirs * (1 + 1e-3) + 1e-9, (ratio, name, ours, theirs)


def test_pruned_rows_are_served_by_the_unknown_policy_and_reported() -> None:
    rows, freqs = _by_frequency(2000, 8, seed=7)
    cls = torch.zeros(2000, dtype=torch.int64)
    cls[1000:] = 1  # the tail is pruned
    for kind in ("hashed", "default", "zero"):
        policy = build_unknown_policy(kind, rows, torch.arange(2000), freqs)  # type: ignore[arg-type]
        table = build_table(rows, cls, [RowClass(8, 8), RowClass(0, 32)], unknown=policy, index="runs")
        ids = torch.tensor([0, 1500, 5000, 999, 1000])
        for backend in ("torch", "compiled"):
            table.backend = backend  # type: ignore[assignment]
            res = table.lookup(ids)
            assert res.status.tolist() == [STATUS_FOUND, STATUS_PRUNED, STATUS_UNKNOWN, STATUS_FOUND, STATUS_PRUNED]
            assert res.found.tolist() == [True, False, False, True, False]
            assert res.num_pruned == 2 and res.num_unknown == 1
            expected = torch.zeros(3, 8)
            if kind != "zero":
                policy_rows = policy.rows(ids[[1, 2, 4]]) if kind == "hashed" else policy.default.expand(3, 8)  # type: ignore[union-attr]
                expected = policy_rows
            assert torch.equal(res.values[[1, 2, 4]], expected)
            pooled = table.lookup_bags(ids, torch.tensor([0, 2]), "sum")
            assert pooled.num_pruned == 2


def test_allocator_scores_pruning_against_the_fallback_it_will_serve() -> None:
    rows, freqs = _by_frequency(3000, 16, seed=8)
    rows += 1.0  # a common offset: the "default" fallback (the mean) serves a pruned row far better than zeros
    zero, rz = compress(rows, freqs, ratio=40, unknown="zero")
    default, rd = compress(rows, freqs, ratio=40, unknown="default")
    assert rd.estimated_error < rz.estimated_error
    assert _objective(default, rows, freqs, "l2") < _objective(zero, rows, freqs, "l2")


def test_rotation_is_stored_as_fp16_columns_and_old_files_still_load(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3000, 4, generator=gen) @ torch.randn(4, 64, generator=gen)
    rotation = weighted_pca_rotation(rows, torch.ones(3000))
    classes = [RowClass(64, 8), RowClass(16, 8), RowClass(8, 4)]
    cls = torch.randint(0, 3, (3000,), generator=gen)
    table = build_table(rows, cls, classes, rotation=rotation)
    assert table.rotation is not None and table.rotation.dtype == torch.float16
    assert tuple(table.rotation.shape) == (64, 16)  # only the columns the widest truncated class reads
    assert table.stats().other_bytes == 64 * 16 * 2 + 16 * 64 * 4 == rotation_bytes(64, 16)  # stored fp16 + the decoder's fp32 R^T
    ids = torch.arange(3000)
    expected = table.lookup(ids).values
    path = save_table(table, tmp_path / "t.safetensors")
    loaded, _ = load_table(path)
    assert torch.equal(loaded.lookup(ids).values, expected)
    # a file written before: fp32 [D, D] rotation (the rows were encoded with it)
    tensors = load_file(str(path))
    full = rotation.clone()
    full[:, :16] = table.rotation.to(torch.float32)
    tensors["rotation"] = full.contiguous()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={MANIFEST_KEY: meta[MANIFEST_KEY]})
    old, _ = load_table(tmp_path / "old.safetensors")
    assert old.rotation is not None and tuple(old.rotation.shape) == (64, 16)
    assert torch.equal(old.lookup(ids).values, expected)


def test_rotation_bytes_buy_truncation_on_a_small_wide_table() -> None:
    """The issue's case: at D = 384 a full fp32 rotation (590 KB) exceeded the whole budget of
    a 10k-row table at 32x; fp16 columns make truncated classes affordable."""
    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(2000, 16, generator=gen) @ torch.randn(16, 128, generator=gen)) / 16
    table, report = compress(rows, None, ratio=24, candidates=[RowClass(d, b) for d in (128, 32, 16, 0) for b in (8, 4)])
    assert report.rotation and table.rotation is not None
    assert table.rotation.numel() * 2 <= 128 * 32 * 2


def test_objective_is_kept_in_the_manifest(tmp_path: Path) -> None:
    rows, freqs = _by_frequency(2000, 8, seed=9)
    table, report = compress(rows, freqs, ratio=8, objective="cosine")
    assert report.objective == "cosine" and table.objective == "cosine"
    _, manifest = load_table(save_table(table, tmp_path / "c.safetensors"))
    assert manifest["objective"] == "cosine"
    with pytest.raises(ValueError, match="objective"):
        compress(rows, freqs, ratio=8, objective="dot")  # type: ignore[arg-type]


def test_cosine_objective_weighs_each_row_by_its_own_length() -> None:
    rows = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    w = objective_weights(rows, torch.ones(2), "cosine")
    assert torch.allclose(w, torch.tensor([1.0, 0.01], dtype=torch.float64), rtol=1e-6)
    assert np.allclose(objective_weights(rows, torch.ones(2), "l2").numpy(), 1.0)


def test_traffic_sample_estimates_recall_of_what_is_served() -> None:
    from compression.knn import TrafficSample, true_neighbours

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 16, generator=gen)
    rows = centres[torch.randint(0, 30, (1500,), generator=gen)] + 0.3 * torch.randn(1500, 16, generator=gen)
    freqs = torch.sort(zipf_frequencies(1500, seed=1), descending=True).values
    ts = TrafficSample(rows, freqs, queries=64, sample=1500)
    assert ts.recall(lambda p: rows[p]) == pytest.approx(1.0)
    assert ts.recall(lambda p: torch.zeros(p.numel(), 16)) < 0.05  # nothing can be told apart
    noisy = rows + 0.5 * torch.randn(1500, 16, generator=gen)
    # with the whole table as the sample the estimate is the true recall on the judge's queries
    truth = true_neighbours(noisy, ts.judge_queries, ts.k)
    exact = float((truth[:, :, None] == ts.judge_truth[:, None, :]).any(2).float().mean())
    assert ts.recall(lambda p: noisy[p]) == pytest.approx(exact, abs=0.03)
    table, report = compress(rows, freqs, ratio=12, objective="knn")
    assert table.objective == "knn" and report.estimated_recall is not None and 0 < report.estimated_recall <= 1


def test_knn_objective_judges_plans_with_product_quantization_classes() -> None:
    """``objective="knn"`` with ``pq=True``: the judge serves PQ columns through their codebooks
    (it raised "encodes against a codebook; none given" before); the plans are a superset of
    those without PQ, judged on the same sampled traffic, so the estimate can only rise."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=gen)
    rows = centres[torch.randint(0, 20, (800,), generator=gen)] + 0.5 * torch.randn(800, 16, generator=gen)
    freqs = torch.sort(zipf_frequencies(800, seed=1), descending=True).values
    plain, plain_report = compress(rows, freqs, ratio=16, objective="knn", num_groups=16)
    table, report = compress(rows, freqs, ratio=16, objective="knn", pq=True, num_groups=16)
    assert report.estimated_recall is not None and plain_report.estimated_recall is not None
    assert report.estimated_recall >= plain_report.estimated_recall
    assert any(rc.pq for rc in table.classes)
    assert table.nbytes <= 800 * 16 * 4 / 16


def test_keyed_tables_take_the_hash_index_by_default_and_pay_for_its_slots() -> None:
    rows = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randperm(500, generator=torch.Generator().manual_seed(1)) * 7919 - 10**9  # negative too: keyed only
    table, report = compress(rows, None, ratio=2, ids=ids)  # 1024 slots x 12 B of the 32 KB budget
    assert report.index == "hash" and table.index.kind == "hash"
    assert table.stats().index_bytes == index_bytes("hash", 500, 0, 0)
    assert table.nbytes <= 500 * 32 * 4 / 2
    got = table.lookup(ids).values
    assert float(((got - rows) ** 2).sum() / (rows**2).sum()) < 0.02
