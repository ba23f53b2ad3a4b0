"""The knn judge's recall estimate (``compression.knn.TrafficSample.recall``) against its
definition: sort every query's weighted candidates (sampled intruders first on ties, then the
true neighbours), walk down until ``k`` rows' worth of weight, count the true neighbours met.
The judge computes it from ranks and a top-few selection instead of the sort; these must agree
on any served table, ties (pruned rows, duplicates) included, with and without near rows."""

from __future__ import annotations

import pytest
import torch

from compression.knn import TrafficSample, _unit


def recall_by_sorting(ts: TrafficSample, served: torch.Tensor) -> float:
    """The definition, written as the full weighted sort: per query, its near rows (weight 1),
    the sampled rows that are neither the query, a true neighbour nor a near row (weight: the
    rows they stand for over how many there are), then its true neighbours (weight 1)."""
    vecs = _unit(served.to(torch.float32))
    total = 0.0
    far = ts.n - 1 - ts.k - ts.near
    for qi in range(ts.judge_queries.numel()):
        q = int(ts.judge_queries[qi])
        truth, near = ts.judge_truth[qi], ts.judge_near[qi]
        excluded = {q, *truth.tolist(), *near.tolist()}
        free = torch.tensor([int(s) for s in ts.sample.tolist() if int(s) not in excluded], dtype=torch.int64)
        w = far / free.numel() if free.numel() and far > 0 else 0.0
        cands = torch.cat([near, free, truth])
        weights = torch.cat([torch.ones(near.numel()), torch.full((free.numel(),), w), torch.ones(truth.numel())]).double()
        is_true = torch.cat([torch.zeros(near.numel() + free.numel()), torch.ones(truth.numel())])
        scores = vecs[cands] @ vecs[q]
        order = torch.argsort(scores, descending=True, stable=True)  # intruders listed first: ahead on ties
        w_sorted, hit_sorted = weights[order], is_true[order].double()
        before = torch.cumsum(w_sorted, 0) - w_sorted
        take = torch.minimum((ts.k - before).clamp(min=0), w_sorted) / w_sorted.clamp(min=1e-12)
        total += float((take * hit_sorted).sum())
    return total / (ts.judge_queries.numel() * ts.k)


@pytest.mark.parametrize(("n", "sample", "near"), [(300, 300, 20), (3000, 512, 100), (5000, 64, 30), (2000, 400, 0), (40, 40, 100)])
def test_rank_form_matches_the_sort(n: int, sample: int, near: int) -> None:
    gen = torch.Generator().manual_seed(n)
    centres = torch.randn(25, 8, generator=gen)
    rows = centres[torch.randint(0, 25, (n,), generator=gen)] + 0.3 * torch.randn(n, 8, generator=gen)
    freqs = torch.rand(n, generator=gen) ** 4
    ts = TrafficSample(rows, freqs, queries=40, k=10, sample=sample, near=near)
    noisy = rows + 0.4 * torch.randn(n, 8, generator=gen)
    pruned = noisy.clone()
    pruned[torch.rand(n, generator=gen) < 0.4] = 0  # many exact ties at score 0
    coarse = torch.round(noisy * 2) / 2  # duplicates: ties among true neighbours and intruders
    for served in (rows, noisy, pruned, coarse, torch.zeros_like(rows)):
        assert ts.recall(lambda p, v=served: v[p]) == pytest.approx(recall_by_sorting(ts, served), abs=1e-6)
