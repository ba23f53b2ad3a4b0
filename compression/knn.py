"""Judging a retrieval table's plans on sampled traffic: estimated cosine kNN recall@k.

Squared error is a proxy.  For a table searched by cosine similarity what matters is whether
each query's true neighbours stay its neighbours, and a row matters for that in two roles: as
a query (how often traffic asks for it) and as a neighbour of the queries traffic asks for -
a rare row next to a frequent one matters a lot, a rare row far from everything frequent
hardly at all.  Traffic-weighted error sees only the first role.

:class:`TrafficSample` draws queries by traffic, finds their true top-``k`` neighbours among all
rows (fp32 cosine), and keeps a uniform sample of the other rows.  Two uses:

* :meth:`TrafficSample.row_weights` - per-row weight for the allocator: the row's share of
  queries plus its share of neighbour slots, over its squared norm (a cosine-style error).
* :meth:`TrafficSample.recall` - the recall@k a plan would give on held-out sampled queries,
  from the served rows of the queries, their true neighbours and the row sample only: for query
  ``q`` the served scores of its ``k`` true neighbours (weight 1 each) and of the sampled rows
  (weight ``(N - k - 1) / S`` each, standing for all other rows) are sorted; walking down until
  ``k`` rows' worth of weight is passed, the recall is the share of true neighbours met.  A
  pruned row served as zeros scores 0 and never intrudes.

Cost: ``2Q x N x D`` multiply-adds for the truth (``Q = 512`` queries to fit, 512 to judge),
then ``Q x S x D`` per judged plan (``S = 32768`` sampled rows) and a top-few selection, no sort.  Smaller samples misjudged
close plans on a 100k-row table (8,192 rows and 256 queries picked a knapsack plan 0.03 recall
below keep-top-K int4, which 32,768 and 512 pick).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .parallel import thread_map

# How a plan is shown to the judge: the served rows at given row positions.
ServedFn = Callable[[torch.Tensor], torch.Tensor]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def true_neighbours(rows: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """``int64 [Q, k]``: the ``k`` nearest rows by cosine to each query row, itself excluded."""
    unit = _unit(rows.to(torch.float32))

    def search(s: int) -> torch.Tensor:
        q = queries[s : s + chunk]
        scores = unit[q] @ unit.T
        scores[torch.arange(q.numel()), q] = -float("inf")
        return torch.topk(scores, k, dim=1).indices

    # query chunks on parallel threads (compression.parallel): Q x N x D multiply-adds in all
    out = list(thread_map(search, range(0, queries.numel(), chunk)))
    return torch.cat(out) if out else torch.empty((0, k), dtype=torch.int64)


class TrafficSample:
    """Queries drawn by traffic, their true neighbours, and a uniform sample of rows."""

    def __init__(
        self, rows: torch.Tensor, frequencies: torch.Tensor, queries: int = 512, k: int = 10, sample: int = 32768, seed: int = 0
    ) -> None:
        n = rows.shape[0]
        self.n, self.k = n, min(k, max(n - 1, 1))
        gen = torch.Generator().manual_seed(seed)
        p = frequencies.to(torch.float64) + 1e-12
        # two disjoint draws: one shapes the weights, the other judges (no fitting to the judge)
        draws = torch.multinomial(p / p.sum(), 2 * queries, replacement=True, generator=gen)
        self.fit_queries, self.judge_queries = draws[:queries], draws[queries:]
        both = true_neighbours(rows, draws, self.k)
        self.fit_truth, self.judge_truth = both[:queries], both[queries:]
        self.sample = torch.randperm(n, generator=gen)[: min(sample, n)]
        self.rows = rows
        self.frequencies = frequencies

    def row_weights(self) -> torch.Tensor:
        """Per-row weight: share of query traffic + share of sampled neighbour slots, over the
        row's squared norm."""
        f = self.frequencies.to(torch.float64)
        query_share = f / f.sum().clamp(min=1e-300)
        slots = torch.bincount(self.fit_truth.reshape(-1), minlength=self.n).to(torch.float64)
        neighbour_share = slots / max(float(slots.sum()), 1.0)
        norms = (self.rows.to(torch.float64) ** 2).sum(dim=1)
        floor = float(norms.mean()) * 1e-6 + 1e-30
        return (query_share + neighbour_share + 1e-9 / self.n) / norms.clamp(min=floor)

    def positions(self) -> torch.Tensor:
        """Every row position :meth:`recall` reads (queries, truths, sample), unique, sorted."""
        return torch.unique(torch.cat([self.judge_queries, self.judge_truth.reshape(-1), self.sample]))

    def _clash(self) -> torch.Tensor:
        """[Q, S] bool: sampled row ``s`` is judge query ``q`` or one of its true neighbours, so
        not an intruder (the same for every plan: built once)."""
        if getattr(self, "_clash_mask", None) is None:
            clash = self.sample[None, :] == self.judge_queries[:, None]
            for j in range(self.judge_truth.shape[1]):  # k passes of [Q, S], not one [Q, k, S]
                clash |= self.sample[None, :] == self.judge_truth[:, j : j + 1]
            self._clash_mask = clash
        return self._clash_mask

    def recall(self, served: ServedFn) -> float:
        """Estimated recall@k of the plan whose served rows ``served`` returns (see module doc).

        Only the ranks of the true neighbours matter, so instead of sorting all ``k + S``
        scores per query: true neighbour ``j`` has above it ``w_s`` x (sampled intruders scoring
        at least as high: intruders first on ties, so an indistinguishable neighbour gets no
        credit) + (true neighbours scoring higher, or equal and listed before it), and counts
        ``clamp(k - above, 0, 1)``.  Intruders past ``ceil(k / w_s)`` can only push ``above``
        past ``k``, so the top ``ceil(k / w_s) + 1`` per query (``torch.topk``) decide it."""
        pos = self.positions()
        vecs = _unit(served(pos).to(torch.float32))
        where = torch.full((self.n,), -1, dtype=torch.int64)
        where[pos] = torch.arange(pos.numel())
        q = vecs[where[self.judge_queries]]  # [Q, D]
        t = vecs[where[self.judge_truth]]  # [Q, k, D]
        s = vecs[where[self.sample]]  # [S, D]
        t_scores = torch.einsum("qd,qkd->qk", q, t)
        others = max(self.n - self.k - 1, 0)
        w_s = others / max(self.sample.numel(), 1)
        kk = t_scores.shape[1]
        above = torch.zeros_like(t_scores, dtype=torch.float64)
        if w_s > 0 and self.sample.numel():
            s_scores = (q @ s.T).masked_fill_(self._clash(), -float("inf"))
            m = min(self.sample.numel(), int(self.k / w_s) + 1)
            top = torch.topk(s_scores, m, dim=1, sorted=False).values  # [Q, m]
            at_least = (top[:, None, :] >= t_scores[:, :, None]).sum(dim=2)  # [Q, k]
            above += w_s * at_least.to(torch.float64)
        # true neighbour i ranks above j: higher score, or equal and listed first
        ti, tj = t_scores[:, None, :], t_scores[:, :, None]  # [Q, j, i]
        first = torch.arange(kk)[None, :] < torch.arange(kk)[:, None]  # [j, i]: i < j
        above += ((ti > tj) | ((ti == tj) & first)).sum(dim=2).to(torch.float64)
        hits = (self.k - above).clamp(min=0, max=1).sum(dim=1)
        return float(hits.mean()) / self.k
