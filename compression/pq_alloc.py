"""Product-quantization classes in the budget allocator (post-training PQ and its frequency-aware
MGQE form).

A PQ class differs from a ``(dim, bits)`` class in one way that matters to the knapsack: its
codebook is a fixed cost, paid once if any group uses the class.  So PQ plans are solved per
*subset* of PQ classes (each single class, and each pair - a pair is the MGQE shape: e.g. more
centroids or more sub-spaces for the frequent groups, fewer for the rare ones), with the subset's
codebook bytes taken off the budget first; a PQ class the solution leaves unused gives its
codebook bytes back and the plan is solved again.  Every plan competes with the scalar plans on
the same estimated error; the least wins.

Codebooks of the candidates are trained once, by frequency-weighted k-means on a sample of the
whole table (:func:`compression.pq.train_codebook`); after the plan is chosen each PQ class's
codebook is refined on the rows it actually holds (:func:`refine_codebooks`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from . import pq
from .allocation import BudgetTooSmall, GroupCosts, GroupErrorFn, estimate_costs, solve_knapsack
from .layout import MAX_CLASSES, MAX_PQ_BITS, RowClass
from .parallel import thread_map

DEFAULT_SUB_DIMS: tuple[int, ...] = (2, 4, 8, 16)
# 6-bit codes: at 8x a 64-dim row has 32 bytes, and d64pq32x6 (24 B, 64 centroids per 2-dim
# sub-space) next to int4 rows took the 100k-row clustered retrieval table from 0.822 (keep-top-K
# int4, the best plan without it) to 0.892 recall@10, past faiss PQ's 0.847 (bench/results/retrieval.md)
DEFAULT_PQ_BITS: tuple[int, ...] = (4, 6, 8)
MAX_CANDIDATES = 6
MAX_CENTROIDS = 2048
TRAIN_SAMPLE = 8192
REFINE_SAMPLE = 16384

# (estimated error, rotated, classes, choice per group, runs reserved) - compress()'s plan shape
Plan = tuple[float, bool, list[RowClass], list[int], int | None]


def pq_candidates(
    dim: int,
    budget_bytes: int,
    num_rows: int | None = None,
    sub_dims: Sequence[int] = DEFAULT_SUB_DIMS,
    bits: Sequence[int] = DEFAULT_PQ_BITS,
    max_codebook_share: float = 0.25,
    max_candidates: int = MAX_CANDIDATES,
    max_centroids: int = MAX_CENTROIDS,
) -> list[RowClass]:
    """PQ classes over all ``dim`` coordinates: sub-vectors of ``s`` coordinates (``s`` dividing
    ``dim``) with ``k``-bit codes, keeping those whose codebook takes at most
    ``max_codebook_share`` of the budget (a larger one leaves too little for rows) and with at
    most ``max_centroids`` centroids in all (``m * 2**k``: what encoding costs per row; e.g.
    ``d64pq32x8``, 256 centroids per 2-dim sub-space, costs 8x ``d64pq8x8`` to encode and stores
    about what int4 does).  With
    ``num_rows``, only the ``max_candidates`` whose row size is nearest (by ratio) to the
    budget's bytes per row are kept: each candidate costs a k-means run, and a class far from
    the average row size is rarely chosen."""
    out = set()
    for s in sub_dims:
        if s <= 0 or dim % s:
            continue
        for k in bits:
            if not 1 <= k <= MAX_PQ_BITS:
                raise ValueError(f"PQ code widths are 1..{MAX_PQ_BITS} bits, got {k}")
            rc = RowClass(dim, k, dim // s)
            if rc.codebook_bytes <= max_codebook_share * budget_bytes and rc.m << k <= max_centroids:
                out.add(rc)
    ranked = sorted(out, key=lambda rc: (rc.row_bytes, rc.codebook_bytes))
    if num_rows and len(ranked) > max_candidates:
        per_row = max(budget_bytes / num_rows, 1e-9)
        ranked = sorted(ranked, key=lambda rc: (abs(math.log(rc.row_bytes / per_row)), rc.codebook_bytes))[:max_candidates]
        ranked.sort(key=lambda rc: (rc.row_bytes, rc.codebook_bytes))
    return ranked


def train_candidate_codebooks(
    rows: torch.Tensor, weights: torch.Tensor, classes: Sequence[RowClass], sample: int = TRAIN_SAMPLE, seed: int = 0
) -> dict[RowClass, torch.Tensor]:
    """One fp16 codebook per PQ class, by frequency-weighted k-means on a sample of ``rows``."""
    picks, w = pq.training_sample(weights, sample, seed)
    x = rows[picks].to(torch.float32)
    # one class per task on parallel threads (compression.parallel; each k-means has its own seed)
    return dict(zip(classes, thread_map(lambda rc: pq.train_codebook(x, w, rc, seed=seed), classes)))


def refine_codebooks(
    rows: torch.Tensor,
    weights: torch.Tensor,
    class_of: torch.Tensor,
    classes: Sequence[RowClass],
    codebooks: dict[RowClass, torch.Tensor],
    iters: int = 6,
    seed: int = 0,
) -> list[torch.Tensor | None]:
    """Codebooks for a built table's classes: each PQ class's candidate codebook refined by a few
    weighted k-means steps on (a sample of) the rows the plan put in it."""
    out: list[torch.Tensor | None] = []
    for c, rc in enumerate(classes):
        if not rc.pq:
            out.append(None)
            continue
        members = torch.nonzero(class_of == c).flatten()
        picks, w = pq.training_sample(weights[members], REFINE_SAMPLE, seed)
        out.append(pq.train_codebook(rows[members[picks]], w, rc, iters=iters, seed=seed, init=codebooks[rc]))
    return out


def _restricted(errors: torch.Tensor, nbytes: torch.Tensor, columns: list[int], budget: int) -> list[int]:
    """Knapsack over the given columns only; returns choices as column indices of the full matrix."""
    choice = solve_knapsack(errors[:, columns], nbytes[:, columns], budget)
    return [columns[c] for c in choice]


def pq_plans(
    rows: torch.Tensor,
    weights: torch.Tensor,
    groups: list[torch.Tensor],
    scalar_classes: list[RowClass],
    pq_classes: list[RowClass],
    codebooks: dict[RowClass, torch.Tensor],
    sample_per_group: int,
    budget_bytes: int,
    fixed_bytes: Callable[[int | None], int],
    runs_start: int | None,
    owner: torch.Tensor | None,
    group_error: GroupErrorFn | None = None,
    max_subset: int = 2,
    scalar_costs: GroupCosts | None = None,
) -> list[Plan]:
    """Plans mixing ``scalar_classes`` (stored unrotated) with each subset of up to ``max_subset``
    PQ classes.  ``fixed_bytes(runs)`` is what the index, fallback etc. take with ``runs``
    index runs reserved (``None``: not a run index); ``owner`` maps row position -> group when
    the index is run-length encoded, so that the runs a plan needs can be counted.
    ``scalar_costs``: the costs of ``scalar_classes`` when the caller has them already."""
    if not pq_classes:
        return []
    variant = list(scalar_classes) + list(pq_classes)
    if scalar_costs is None:
        scalar_costs = estimate_costs(rows, weights, groups, list(scalar_classes), sample_per_group, None, group_error=group_error)
    pq_costs = estimate_costs(rows, weights, groups, list(pq_classes), sample_per_group, None, group_error=group_error, codebooks=codebooks)
    costs = GroupCosts(
        scalar_costs.sizes,
        torch.cat([scalar_costs.errors, pq_costs.errors], dim=1),
        torch.cat([scalar_costs.bytes, pq_costs.bytes], dim=1),
    )
    scalar_cols = list(range(len(scalar_classes)))
    pq_cols = list(range(len(scalar_classes), len(variant)))
    subsets = [list(s) for r in range(1, max_subset + 1) for s in itertools.combinations(pq_cols, r)]
    plans: list[Plan] = []
    seen: set[tuple[int, ...]] = set()
    for subset in subsets:
        runs = runs_start
        while subset:
            key = (*subset, -1 if runs is None else runs)
            if key in seen:
                break
            seen.add(key)
            columns = scalar_cols + subset
            reserved = fixed_bytes(runs) + sum(variant[c].codebook_bytes for c in subset)
            try:
                choice = _restricted(costs.errors, costs.bytes, columns, budget_bytes - reserved)
            except BudgetTooSmall:
                break
            used = set(choice)
            if runs is not None and owner is not None:
                by_id = torch.tensor(choice, dtype=torch.int64)[owner]
                actual = 1 + int((by_id[1:] != by_id[:-1]).sum()) if by_id.numel() else 0
                if actual > runs:
                    runs = actual
                    continue
            unused = [c for c in subset if c not in used]
            if unused:  # give those codebook bytes back to the rows and solve again
                subset = [c for c in subset if c in used]
                continue
            if len(used) > MAX_CLASSES:
                rows_in = {c: 0 for c in used}
                for g, c in enumerate(choice):
                    rows_in[c] += costs.sizes[g]
                keep = set(sorted(used, key=lambda c: -rows_in[c])[:MAX_CLASSES])
                scalar_cols = [c for c in scalar_cols if c in keep] or scalar_cols[:1]
                subset = [c for c in subset if c in keep]
                continue
            err = float(sum(costs.errors[g, c] for g, c in enumerate(choice)))
            kept = sorted(used)
            remap = {c: i for i, c in enumerate(kept)}
            plans.append((err, False, [variant[c] for c in kept], [remap[c] for c in choice], runs))
            break
        scalar_cols = list(range(len(scalar_classes)))
    return plans
