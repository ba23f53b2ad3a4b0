"""Judging a retrieval table's plans on sampled traffic: estimated cosine kNN recall@k.

Squared error is a proxy.  For a table searched by cosine similarity what matters is whether
each query's true neighbours stay its neighbours, and a row matters for that in two roles: as
a query (how often traffic asks for it) and as a neighbour of the queries traffic asks for -
a rare row next to a frequent one matters a lot, a rare row far from everything frequent
hardly at all.  Traffic-weighted error sees only the first role.

:class:`TrafficSample` draws queries by traffic, finds their true top-``k`` neighbours among all
rows (fp32 cosine) and the ``near`` rows ranked right after them, and keeps a uniform sample of
all rows.  Two uses:

* :meth:`TrafficSample.row_weights` - per-row weight for the allocator: the row's share of
  queries plus its share of neighbour slots, over its squared norm (a cosine-style error).
* :meth:`TrafficSample.recall` - the recall@k a plan would give on held-out sampled queries:
  for query ``q`` the served scores of its ``k`` true neighbours (weight 1 each), of its
  ``near`` next-nearest rows (weight 1 each: counted exactly, they are the likeliest intruders)
  and of the sampled rows outside those (weight ``w_q = (N - 1 - k - near) / (sampled far rows)``
  each, standing for all other rows) are sorted; walking down until ``k`` rows' worth of weight
  is passed, the recall is the share of true neighbours met.

Why the near rows: with a uniform sample alone each sampled row stands for ``N / S`` rows (30 at
1M rows), so one sampled intruder above a neighbour already pushes it out and the estimate is
coarse exactly where plans differ: on the 1M-row clustered table at 8x it preferred a plan
0.02 recall below keep-top-K int4.  Compression noise mostly reorders rows near the boundary;
counting the 100 next-nearest exactly resolves that.

Cost: ``2Q x N x D`` multiply-adds for the truth (``Q = 512`` queries to fit, 512 to judge),
then ``Q x (S + near) x D`` per judged plan (``S = 32768`` sampled rows) and a top-few
selection, no sort.  Smaller samples misjudged close plans on a 100k-row table (8,192 rows and
256 queries picked a knapsack plan 0.03 recall below keep-top-K int4, which 32,768 and 512 pick).
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
    """Queries drawn by traffic, their true neighbours, the next-nearest rows after them, and a
    uniform sample of the rest."""

    def __init__(
        self,
        rows: torch.Tensor,
        frequencies: torch.Tensor,
        queries: int = 512,
        k: int = 10,
        sample: int = 32768,
        seed: int = 0,
        near: int = 100,
    ) -> None:
        n = rows.shape[0]
        self.n, self.k = n, min(k, max(n - 1, 1))
        self.near = max(0, min(near, n - 1 - self.k))
        gen = torch.Generator().manual_seed(seed)
        p = frequencies.to(torch.float64) + 1e-12
        # two disjoint draws: one shapes the weights, the other judges (no fitting to the judge)
        draws = torch.multinomial(p / p.sum(), 2 * queries, replacement=True, generator=gen)
        self.fit_queries, self.judge_queries = draws[:queries], draws[queries:]
        both = true_neighbours(rows, draws, self.k + self.near)
        self.fit_truth, self.judge_truth = both[:queries, : self.k], both[queries:, : self.k]
        # the rows ranked just after the true neighbours: the likeliest intruders, judged exactly
        self.judge_near = both[queries:, self.k :]
        self.sample = torch.randperm(n, generator=gen)[: min(sample, n)]
        self.rows = rows
        self.frequencies = frequencies
        self._clash_mask: torch.Tensor | None = None

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
        """Every row position :meth:`recall` reads (queries, truths, near rows, sample), unique, sorted."""
        return torch.unique(torch.cat([self.judge_queries, self.judge_truth.reshape(-1), self.judge_near.reshape(-1), self.sample]))

    def _clash(self) -> torch.Tensor:
        """[Q, S] bool: sampled row ``s`` is judge query ``q``, one of its true neighbours or one of
        its near rows, so not a *far* intruder (the same for every plan: built once, from
        ``Q x (1 + k + near)`` lookups of where each such row sits in the sample)."""
        if self._clash_mask is None:
            excluded = torch.cat([self.judge_queries[:, None], self.judge_truth, self.judge_near], dim=1)
            col_of = torch.full((self.n,), -1, dtype=torch.int64)
            col_of[self.sample] = torch.arange(self.sample.numel())
            cols = col_of[excluded]
            hit = cols >= 0
            clash = torch.zeros((excluded.shape[0], self.sample.numel()), dtype=torch.bool)
            clash[torch.arange(excluded.shape[0])[:, None].expand_as(cols)[hit], cols[hit]] = True
            self._clash_mask = clash
        return self._clash_mask

    def recall(self, served: ServedFn) -> float:
        """Estimated recall@k of the plan whose served rows ``served`` returns (see module doc).

        Only the ranks of the true neighbours matter, so instead of sorting every candidate per
        query: true neighbour ``j`` has above it (near rows scoring at least as high) + ``w_q`` x
        (sampled far rows scoring at least as high) + (true neighbours scoring higher, or equal
        and listed before it) - intruders first on ties, so an indistinguishable neighbour gets
        no credit - and counts ``clamp(k - above, 0, 1)``.  Far rows past ``ceil(k / w_q)`` can
        only push ``above`` past ``k``, so each query's top few (``torch.topk``) decide it."""
        pos = self.positions()
        vecs = _unit(served(pos).to(torch.float32))
        where = torch.full((self.n,), -1, dtype=torch.int64)
        where[pos] = torch.arange(pos.numel())
        q = vecs[where[self.judge_queries]]  # [Q, D]
        t_scores = torch.einsum("qd,qkd->qk", q, vecs[where[self.judge_truth]])  # [Q, k]
        above = torch.zeros_like(t_scores, dtype=torch.float64)
        if self.near:
            near_scores = torch.einsum("qd,qmd->qm", q, vecs[where[self.judge_near]])  # [Q, near]
            above += (near_scores[:, None, :] >= t_scores[:, :, None]).sum(dim=2).to(torch.float64)
        far = max(self.n - 1 - self.k - self.near, 0)  # rows the sample stands for
        clash = self._clash()
        free = self.sample.numel() - clash.sum(dim=1)  # [Q] sampled far rows per query
        if far and bool((free > 0).any()):
            w_q = torch.where(free > 0, far / free.clamp(min=1).to(torch.float64), torch.zeros_like(free, dtype=torch.float64))
            s_scores = (q @ vecs[where[self.sample]].T).masked_fill_(clash, -float("inf"))
            m = min(self.sample.numel(), int(self.k / float(w_q[w_q > 0].min())) + 1)
            top = torch.topk(s_scores, m, dim=1, sorted=False).values  # [Q, m]
            at_least = (top[:, None, :] >= t_scores[:, :, None]).sum(dim=2)  # [Q, k]
            above += w_q[:, None] * at_least.to(torch.float64)
        # true neighbour i ranks above j: higher score, or equal and listed first
        kk = t_scores.shape[1]
        ti, tj = t_scores[:, None, :], t_scores[:, :, None]  # [Q, j, i]
        first = torch.arange(kk)[None, :] < torch.arange(kk)[:, None]  # [j, i]: i < j
        above += ((ti > tj) | ((ti == tj) & first)).sum(dim=2).to(torch.float64)
        hits = (self.k - above).clamp(min=0, max=1).sum(dim=1)
        return float(hits.mean()) / self.k
