"""Dimension policies: which of a table's row classes each ID should live in, given how often
IDs are used and the table's byte budget - re-decided as the stream goes (SCALL's idea: storage
follows frequency rank, within a fixed memory budget).

* :class:`ScallPolicy` - bytes per ID follow a power law of the ID's frequency rank,
  ``t(r) = c * r**-alpha``; each ID takes the largest class whose row fits ``t(r)`` (clipped to
  the smallest class), and ``c`` is found by bisection so that all rows fit the budget.
* :class:`KnapsackPolicy` - the error-based allocator of :mod:`compression.allocation`: groups by
  frequency rank, frequency-weighted reconstruction error per (group, class) measured on a sample
  of the live rows, multiple-choice knapsack under the budget.

Both choose among the table's existing classes and return a class per ID plus a
:class:`RankClassMap`, which places IDs that arrive before the next re-decision by the rank
their frequency would have had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .allocation import BudgetTooSmall, estimate_costs, frequency_groups, solve_knapsack
from .layout import LOCATOR_CLASS_SHIFT
from .table import CompressedTable


@dataclass
class RankClassMap:
    """Decision-time frequency cut points, descending, and the class of each segment."""

    thresholds: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # float, descending, [S-1]
    classes: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # [S]

    def class_for(self, freqs: torch.Tensor, default: int) -> torch.Tensor:
        if self.classes.numel() == 0:
            return torch.full(freqs.shape, default, dtype=torch.int64)
        # number of thresholds strictly above f = index of the segment f falls in
        segment = torch.searchsorted(-self.thresholds, -freqs.to(self.thresholds.dtype), right=False)
        return self.classes[segment.clamp(max=self.classes.numel() - 1)]

    @classmethod
    def from_ranked(cls, sorted_freqs: torch.Tensor, classes_by_rank: torch.Tensor, max_segments: int = 4096) -> "RankClassMap":
        """Cut points where the class changes (and at most ``max_segments`` quantiles)."""
        n = sorted_freqs.numel()
        if n == 0:
            return cls()
        change = torch.nonzero(classes_by_rank[1:] != classes_by_rank[:-1]).flatten() + 1
        quantiles = torch.linspace(0, n - 1, min(n, max_segments)).long()
        starts = torch.unique(torch.cat([torch.tensor([0]), change, quantiles]))
        return cls(sorted_freqs[starts[1:]].clone(), classes_by_rank[starts].clone())


@dataclass
class Decision:
    class_of: torch.Tensor  # int64 [N], class index per live ID (same order as the ids given)
    rank_map: RankClassMap


class DimensionPolicy(Protocol):
    name: str

    def decide(self, table: CompressedTable, ids: torch.Tensor, freqs: torch.Tensor, row_budget: int) -> Decision: ...


def _row_bytes(table: CompressedTable) -> torch.Tensor:
    return torch.tensor([rc.row_bytes for rc in table.classes], dtype=torch.int64)


@dataclass
class ScallPolicy:
    alpha: float = 0.6
    name: str = "scall"

    def decide(self, table: CompressedTable, ids: torch.Tensor, freqs: torch.Tensor, row_budget: int) -> Decision:
        n = ids.numel()
        order = torch.argsort(freqs, descending=True, stable=True)
        sizes = _row_bytes(table)
        by_size = torch.argsort(sizes)  # class indices, smallest row first
        sorted_sizes = sizes[by_size].to(torch.float64)
        ranks = torch.arange(1, n + 1, dtype=torch.float64)
        profile = ranks.pow(-self.alpha)

        def classes_for(scale: float) -> torch.Tensor:
            # largest class whose row fits the target; the smallest when none does
            pos = torch.searchsorted(sorted_sizes, scale * profile, right=True) - 1
            return by_size[pos.clamp(min=0)]

        if int(sizes.min()) * n > row_budget:
            raise BudgetTooSmall(f"{n} rows need at least {int(sizes.min()) * n} bytes, the budget leaves {row_budget}")
        lo, hi = 0.0, float(sizes.max()) * float(n) ** self.alpha + 1.0  # hi: everyone gets the largest class
        if int(sizes[classes_for(hi)].sum()) <= row_budget:
            lo = hi
        for _ in range(60):
            mid = (lo + hi) / 2
            if int(sizes[classes_for(mid)].sum()) <= row_budget:
                lo = mid
            else:
                hi = mid
        by_rank = classes_for(lo)
        class_of = torch.empty(n, dtype=torch.int64)
        class_of[order] = by_rank
        return Decision(class_of, RankClassMap.from_ranked(freqs[order], by_rank))


@dataclass
class KnapsackPolicy:
    num_groups: int = 64
    sample_per_group: int = 256
    name: str = "knapsack"

    def decide(self, table: CompressedTable, ids: torch.Tensor, freqs: torch.Tensor, row_budget: int) -> Decision:
        order = torch.argsort(freqs, descending=True, stable=True)
        groups = frequency_groups(order, self.num_groups)
        weights = freqs.to(torch.float64) + 1e-9

        def fetch(positions: torch.Tensor) -> torch.Tensor:
            return table.lookup(ids[positions]).values.cpu()

        costs = estimate_costs(fetch, weights, groups, table.classes, self.sample_per_group, table.rotation)
        choice = solve_knapsack(costs.errors, costs.bytes, row_budget)
        class_of = torch.empty(ids.numel(), dtype=torch.int64)
        for g, members in enumerate(groups):
            class_of[members] = choice[g]
        return Decision(class_of, RankClassMap.from_ranked(freqs[order], class_of[order]))


_DECODE_CHUNK = 16384  # rows a sole writer's move decodes per lookup (about 1-3 ms of the lock each)


def apply_decision(table: CompressedTable, ids: torch.Tensor, decision: Decision, *, sole_writer: bool = False) -> dict[str, int]:
    """Move every row whose class changed (decode, re-encode in the new class; rows that grow are
    zero-padded until the trainer sends their new coordinates), then compact.  Runs under the
    table's lock: lookups see the table before or after, never half-moved.  ``sole_writer``
    (nothing else writes the table meanwhile): the rows to move are decoded and re-encoded
    outside the lock and written in one step under it (:meth:`CompressedTable.put`), and the
    compaction copies each slab outside it (:meth:`CompressedTable.compact`).  Returns rows
    moved into each class, by label."""
    target = decision.class_of

    def move() -> dict[str, int]:
        current = (table.index.resolve(ids.to(table.device)) >> LOCATOR_CLASS_SHIFT).cpu().to(torch.int64)
        moving = torch.nonzero(current != target).flatten()
        if not moving.numel():
            return {}
        move_ids = ids[moving]
        if sole_writer:
            # decoded a chunk per lookup: each holds the lock for one chunk, not for all the
            # moved rows (531k at 1M IDs: 140 ms in one call)
            rows = torch.cat([table.lookup(part).values for part in move_ids.split(_DECODE_CHUNK)])
        else:
            rows = table.lookup(move_ids).values
        # one put: lookups see every moved row in its old class or every one in its new
        table.put(move_ids, rows, target[moving].to(table.device), sole_writer=sole_writer)
        counts = torch.bincount(target[moving], minlength=len(table.classes)).tolist()
        return {rc.label(): k for rc, k in zip(table.classes, counts, strict=True) if k}

    if sole_writer:  # nothing else writes: read, decode and encode beside the lookups
        moved_into = move()
        table.compact(sole_writer=True)
    else:
        with table.lock:
            moved_into = move()
            table.compact()
    return moved_into


POLICIES = {"scall": ScallPolicy, "knapsack": KnapsackPolicy}
