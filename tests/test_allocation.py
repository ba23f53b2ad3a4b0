"""Budget allocation: within budget, index counted, better than uniform quantization."""

from __future__ import annotations

import pytest
import torch

from compression import BudgetTooSmall, RowClass, candidate_classes, compress, compress_uniform
from compression.allocation import solve_knapsack
from compression.kernels.cpu_c import FENCE
from compression.hash_index import static_available
from compression.synthetic import sample_ids


def weighted_error(table, rows: torch.Tensor, freqs: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    """Expected squared error of a lookup drawn from the traffic (frequency-weighted)."""
    decoded = table.lookup(torch.arange(rows.shape[0])).values
    per_row = ((decoded - rows) ** 2).sum(1).double()
    return float((per_row * freqs).sum() / freqs.sum())


@pytest.mark.parametrize("ratio", [4, 8, 16, 32])
def test_table_bytes_stay_within_budget(zipf_rows, ratio: float) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    table, report = compress(rows, freqs, ratio=ratio)
    budget = int(rows.numel() * 4 / ratio)
    assert report.budget_bytes == budget
    assert table.nbytes <= budget
    assert table.nbytes >= 0.9 * budget  # and it uses what it was given
    assert table.stats().num_ids == rows.shape[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_mixed_precision_beats_uniform_quantization_at_equal_bytes(zipf_rows, bits: int) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    uniform = compress_uniform(rows, RowClass(rows.shape[1], bits))
    mixed, _ = compress(rows, freqs, budget_bytes=uniform.nbytes)
    assert mixed.nbytes <= uniform.nbytes
    assert weighted_error(mixed, rows, freqs) < 0.7 * weighted_error(uniform, rows, freqs)


def test_precision_only_candidates_never_rotate(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    cands = candidate_classes(rows.shape[1], dims=[rows.shape[1], 0])
    table, report = compress(rows, freqs, ratio=12, candidates=cands)
    assert table.rotation is None and not report.rotation
    assert {rc.dim for rc in table.classes} <= {rows.shape[1], 0}


def test_frequent_ids_get_more_bytes(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    table, _ = compress(rows, freqs, ratio=16)
    order = torch.argsort(freqs, descending=True)
    loc = table.index.resolve(order)
    row_bytes = torch.tensor([rc.row_bytes for rc in table.classes])[(loc >> 28).long()]
    head, tail = row_bytes[:200].float().mean(), row_bytes[-5000:].float().mean()
    assert head > 2 * tail


def test_rotation_recovers_low_rank_tables_under_truncation() -> None:
    torch.manual_seed(0)
    rows = torch.randn(4000, 4) @ torch.randn(4, 32)  # rank 4: truncating to 8 dims loses nothing
    freqs = torch.ones(4000)
    cands = [RowClass(8, 32), RowClass(32, 32), RowClass(32, 8)]
    table, report = compress(rows, freqs, ratio=3, candidates=cands)
    assert report.rotation
    assert any(rc.dim == 8 for rc in table.classes)
    err = weighted_error(table, rows, freqs)
    assert err < 1e-6 * float((rows**2).sum(1).mean())


def test_keyed_tables_pay_for_their_keys(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    ids = torch.arange(rows.shape[0]) * 1_000_003 - 77
    keyed, _ = compress(rows, freqs, ratio=8, ids=ids, keyed_index="sorted")
    dense, _ = compress(rows, freqs, ratio=8)
    assert keyed.nbytes <= rows.numel() * 4 / 8
    n = rows.shape[0]
    assert keyed.stats().index_bytes == 12 * n + 8 * -(-n // FENCE)  # key + locator per ID, plus the fence
    assert dense.stats().index_bytes == 4 * n
    hashed, _ = compress(rows, freqs, ratio=4, ids=ids)  # the default: the hash index
    assert hashed.nbytes <= rows.numel() * 4 / 4
    if static_available():
        # a static part: ceil(20000 / 0.94) = 21277 slots, 4000 pilots, and 16 overflow slots
        assert hashed.stats().index_bytes == 12 * (21277 + 16) + 2 * 4000 and hashed.index.kind == "hash"
    else:
        # 20000 IDs at load <= 0.7: ceil(20000 / 0.7) = 28572 slots, rounded up to a multiple of 16
        assert hashed.stats().index_bytes == 12 * 28576 and hashed.index.kind == "hash"
    assert bool(hashed.lookup(ids[:10]).found.all())
    res = keyed.lookup(ids[:10])
    assert bool((res.found | res.pruned).all()) and res.num_unknown == 0  # held: a row, or pruned
    assert not bool(keyed.lookup(torch.tensor([5])).found.any())


def test_budget_too_small_is_a_clear_error(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    with pytest.raises(BudgetTooSmall, match="index"):
        compress(rows, freqs, budget_bytes=rows.shape[0] * 2, index="dense")  # less than the 4-byte locators


def test_bad_inputs_are_rejected(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    with pytest.raises(ValueError):
        compress(rows, freqs)  # neither budget nor ratio
    with pytest.raises(ValueError):
        compress(rows, -freqs, ratio=8)
    bad = rows.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError):
        compress(bad, freqs, ratio=8)


def test_knapsack_takes_best_error_per_byte() -> None:
    # group 0: options 10B err 100, 20B err 10; group 1: 10B err 50, 20B err 45
    errors = torch.tensor([[100.0, 10.0], [50.0, 45.0]], dtype=torch.float64)
    nbytes = torch.tensor([[10, 20], [10, 20]])
    assert solve_knapsack(errors, nbytes, 30) == [1, 0]
    assert solve_knapsack(errors, nbytes, 40) == [1, 1]
    with pytest.raises(BudgetTooSmall):
        solve_knapsack(errors, nbytes, 15)


def test_sample_ids_follow_frequencies(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    _, freqs = zipf_rows
    ids = sample_ids(freqs, 50_000)
    top = int(torch.argmax(freqs))
    assert abs(float((ids == top).float().mean()) - float(freqs[top])) < 0.01


def test_tables_do_not_depend_on_threads_and_compress_restores_the_callers_count(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    """compress() encodes on worker threads (compression.parallel): one worker or two must give
    the same bytes, and the caller's torch thread count must survive the call."""
    from compression.parallel import thread_map

    rows, freqs = zipf_rows
    own = torch.get_num_threads()
    tables = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            table, report = compress(rows, freqs, ratio=12)
            assert torch.get_num_threads() == threads
            tables.append((table, report))
    finally:
        torch.set_num_threads(own)
    (a, ra), (b, rb) = tables
    assert ra.plan == rb.plan and [rc.label() for rc in a.classes] == [rc.label() for rc in b.classes]
    ids = torch.arange(rows.shape[0])
    assert torch.equal(a.lookup(ids).values, b.lookup(ids).values)
    # results come back in input order, whatever finishes first
    assert list(thread_map(lambda k: k * k, range(50), workers=2)) == [k * k for k in range(50)]


def test_group_error_costs_serve_each_column_as_the_table_will() -> None:
    """With a caller's ``group_error`` (the model-aware knapsack), a truncated class stored
    without the rotation is scored without it, and a dim-0 class as the unknown-ID policy's rows:
    the costs equal the sampled estimate's when the error is plain squared error.  (Plain
    truncated columns were scored through the rotation, so the model-aware knapsack picked them
    as if rotated and the table served raw first coordinates: MovieLens D = 64 at 1/16 lost
    2 AUC points.)"""
    from compression.allocation import estimate_costs
    from compression.rotation import weighted_pca_rotation

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(240, 4, generator=gen) @ torch.randn(4, 16, generator=gen) + 0.05 * torch.randn(240, 16, generator=gen)
    weights = torch.ones(240, dtype=torch.float64)
    groups = [torch.arange(0, 80), torch.arange(80, 240)]
    classes = [RowClass(16, 8), RowClass(4, 8), RowClass(4, 8), RowClass(0, 32)]
    rotated = [False, False, True, False]
    rotation = weighted_pca_rotation(rows, weights)
    default = rows.mean(0)

    def fallback(pos: torch.Tensor) -> torch.Tensor:
        return default.expand(pos.numel(), 16)

    def squared(group: int, positions: torch.Tensor, approx: torch.Tensor) -> float:
        return float(((approx - rows[positions]) ** 2).sum())

    kwargs = dict(rotation=rotation, rotated=rotated, fallback=fallback)
    sampled = estimate_costs(rows, weights, groups, classes, 1000, **kwargs)  # type: ignore[arg-type]
    by_group = estimate_costs(rows, weights, groups, classes, 1000, group_error=squared, **kwargs)  # type: ignore[arg-type]
    assert torch.allclose(by_group.errors, sampled.errors, rtol=1e-4)
    assert float(by_group.errors[:, 1].sum()) > 2 * float(by_group.errors[:, 2].sum())  # rotation matters here
