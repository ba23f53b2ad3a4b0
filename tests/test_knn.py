"""The knn judge's recall estimate (``compression.knn.TrafficSample.recall``) against its
definition: sort every query's weighted candidates (sampled intruders first on ties, then the
true neighbours), walk down until ``k`` rows' worth of weight, count the true neighbours met.
The judge computes it from ranks and a top-few selection instead of the sort; these must agree
on any served table, ties (pruned rows, duplicates) included."""

from __future__ import annotations

import pytest
import torch

from compression.knn import TrafficSample, _unit


def recall_by_sorting(ts: TrafficSample, served: torch.Tensor) -> float:
    """The definition, written as the full weighted sort."""
    vecs = _unit(served.to(torch.float32))
    q, t, s = vecs[ts.judge_queries], vecs[ts.judge_truth], vecs[ts.sample]
    t_scores = torch.einsum("qd,qkd->qk", q, t)
    s_scores = q @ s.T
    clash = (ts.sample[None, :] == ts.judge_queries[:, None]) | (ts.sample[None, None, :] == ts.judge_truth[:, :, None]).any(dim=1)
    s_scores = s_scores.masked_fill(clash, -float("inf"))
    w_s = max(ts.n - ts.k - 1, 0) / max(ts.sample.numel(), 1)
    scores = torch.cat([s_scores, t_scores], dim=1)
    weights = torch.cat([torch.full_like(s_scores, w_s), torch.ones_like(t_scores)], dim=1)
    is_true = torch.cat([torch.zeros_like(s_scores), torch.ones_like(t_scores)], dim=1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    w_sorted, hit_sorted = torch.gather(weights, 1, order), torch.gather(is_true, 1, order)
    before = torch.cumsum(w_sorted, dim=1) - w_sorted
    take = torch.minimum((ts.k - before).clamp(min=0), w_sorted) / w_sorted.clamp(min=1e-12)
    return float((take * hit_sorted).sum(dim=1).mean()) / ts.k


@pytest.mark.parametrize(("n", "sample"), [(300, 300), (3000, 512), (5000, 64)])
def test_rank_form_matches_the_sort(n: int, sample: int) -> None:
    gen = torch.Generator().manual_seed(n)
    centres = torch.randn(25, 8, generator=gen)
    rows = centres[torch.randint(0, 25, (n,), generator=gen)] + 0.3 * torch.randn(n, 8, generator=gen)
    freqs = torch.rand(n, generator=gen) ** 4
    ts = TrafficSample(rows, freqs, queries=40, k=10, sample=sample)
    noisy = rows + 0.4 * torch.randn(n, 8, generator=gen)
    pruned = noisy.clone()
    pruned[torch.rand(n, generator=gen) < 0.4] = 0  # many exact ties at score 0
    coarse = torch.round(noisy * 2) / 2  # duplicates: ties among true neighbours and intruders
    for served in (rows, noisy, pruned, coarse, torch.zeros_like(rows)):
        assert ts.recall(lambda p, v=served: v[p]) == pytest.approx(recall_by_sorting(ts, served), abs=1e-6)
