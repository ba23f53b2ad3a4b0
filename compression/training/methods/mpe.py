"""MPE: mixed-precision embeddings (Li et al., arXiv 2409.20305), adapted to the serving codec.

What it does.  IDs are sorted by training frequency and cut into ``G`` equal-size groups; each
group learns a distribution over candidate bit widths ``B = {0, 1, 2, 4, 8, 16}`` (0 = the
group is pruned: its IDs decode to the zero vector).  The recipe is MPE's:

1. **search** - ``p_g = softmax(logits_g / tau)``; a row of group ``g`` is the mixture
   ``sum_b p_gb Q_b(w)``; the loss adds ``lam * sum_g sum_b p_gb bytes_gb / (B f_g)``: the expected
   bytes, pushed harder on rare groups (``f_g`` = the group's traffic relative to the rarest).
   Where the paper fixes ``lam`` by hand per dataset, here ``lam`` follows the budget: after
   every step it is multiplied by ``exp(eta (E[bytes] / budget - 1))`` (dual ascent), so the
   search ends near the byte budget instead of wherever a hand-set ``lam`` lands.
2. **choose** - the paper's rule: ``b_g = max{b : p_gb >= 1 / (2 |B|)}``; then, if the table
   would exceed the budget, groups step down one width at a time, the step that gives up the
   least ``f_g * P_g(>= b_g)`` per byte saved first; then whatever budget is left buys one-step
   upgrades, the most ``f_g * P_g(>= b)`` per byte first (an addition to the paper, so that
   methods compare at equal bytes).  The result always fits the budget.
3. **retrain** - embedding weights reset to their pre-search values (the rest of the model
   keeps its searched weights), then quantization-aware training at the chosen widths.

Adaptation to the serving format.  MPE's quantizer has one learned step size per width and
one offset vector for the whole table; the serving table stores a per-row fp16 scale and bias
instead (:mod:`compression.layout`), so ``Q_b`` here is that row codec (min/max start plus
least-squares refit), with a straight-through gradient, and ``Q_16`` is fp16 rounding.

What it stores (exported).  Per group one row class ``(D, b_g)``: ``b_g * D`` bits of codes and
a 4-byte fp16 head per row (``b <= 8``), ``2 D`` bytes per row at 16 bits, nothing at 0 bits.
The ID -> group map is the frequency order, so with a frequency-numbered vocabulary the index
is the run-length encoded locator: 12 bytes per group, not 4 bytes per ID.  Decode: one
fused multiply-add per coordinate (``bias + scale * code``), or zeros for a pruned group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ...allocation import BudgetTooSmall
from ...index import run_index_bytes
from ...layout import RowClass
from ...table import CompressedTable
from .base import ServableEmbedding, codec_rounded, dense_index_bytes, fp16_rounded, rows_table

DEFAULT_BITS: tuple[int, ...] = (0, 1, 2, 4, 8, 16)

Stage = Literal["search", "fixed"]


def _row_class(dim: int, bits: int) -> RowClass:
    return RowClass(0, 32) if bits == 0 else RowClass(dim, bits)


class MPEEmbedding(ServableEmbedding):
    """Per-frequency-group learned precision; see the module docstring for the recipe."""

    def __init__(
        self,
        num_ids: int,
        dim: int,
        frequencies: torch.Tensor,
        budget_bytes: int,
        num_groups: int = 64,
        bits: Sequence[int] = DEFAULT_BITS,
        tau: float = 0.1,
        lam: float = 1e-3,
        eta: float = 0.05,
        init_std: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if frequencies.numel() != num_ids:
            raise ValueError("one frequency per ID")
        self.dim = dim
        self.bits = tuple(sorted(set(bits)))
        self.budget_bytes = int(budget_bytes)
        self.tau, self.eta = tau, eta
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_ids, dim, generator=gen) * init_std)
        self.logits = nn.Parameter(torch.zeros(num_groups, len(self.bits)))
        # equal-size groups over the frequency order (group 0 = most frequent)
        order = torch.argsort(frequencies.to(torch.float64), descending=True, stable=True)
        group_of = torch.empty(num_ids, dtype=torch.int64)
        group_of[order] = torch.arange(num_ids) * num_groups // num_ids
        self.register_buffer("group_of", group_of)
        sizes = torch.bincount(group_of, minlength=num_groups)
        self.register_buffer("group_sizes", sizes)
        traffic = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_of, frequencies.to(torch.float64))
        self.register_buffer("group_weight", ((traffic + 1.0) / (traffic.min() + 1.0)).to(torch.float32))
        row_bytes = torch.tensor([_row_class(dim, b).row_bytes for b in self.bits], dtype=torch.float64)
        self.register_buffer("option_bytes", sizes.to(torch.float64)[:, None] * row_bytes[None, :])  # [G, |B|]
        self.register_buffer("choice", torch.full((num_groups,), -1, dtype=torch.int64))
        self.lam = lam
        self.stage: Stage = "search"
        # the groups in ID order, one entry per maximal ID range of one group: with a
        # frequency-numbered vocabulary that is just 0..G-1 and the index is a few runs
        changes = torch.nonzero(group_of[1:] != group_of[:-1]).flatten() + 1
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), changes]) if num_ids else changes
        self.register_buffer("group_sequence", group_of[starts])
        cheapest = self.chosen_bytes(torch.zeros(num_groups, dtype=torch.int64))
        if cheapest > self.budget_bytes:
            raise BudgetTooSmall(f"MPE needs at least {cheapest} bytes, budget is {self.budget_bytes}")

    @property
    def num_ids(self) -> int:
        return int(self.weight.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.logits.shape[0])

    def index_bytes(self, choice: torch.Tensor | None = None) -> int:
        """Index bytes of the export for a choice of widths: the run-length locator (one run per
        stretch of consecutive IDs whose groups got the same width), or 4 bytes per ID when
        that is smaller (the export picks the same way)."""
        c = self.choice if choice is None else choice
        seq = c[self.group_sequence]
        runs = 1 + int((seq[1:] != seq[:-1]).sum()) if seq.numel() else 0
        return min(run_index_bytes(runs), dense_index_bytes(self.num_ids))

    # ---------------------------------------------------------------- forward

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits / self.tau, dim=1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight[ids]
        group = self.group_of[ids]
        if self.stage == "fixed":
            return self._quantized(w, self.choice[group])
        p = self.probabilities()[group]  # [n, |B|]
        out = torch.zeros_like(w)
        for k, b in enumerate(self.bits):
            if b:
                out = out + p[:, k : k + 1] * self._as_bits(w, b)
        return out

    def _as_bits(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == 32:
            return w
        if bits == 16:
            return fp16_rounded(w)
        return codec_rounded(w, RowClass(self.dim, bits))

    def _quantized(self, w: torch.Tensor, option: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(w)
        for k, b in enumerate(self.bits):
            sel = torch.nonzero(option == k).flatten()
            if b and sel.numel():
                out = out.index_put((sel,), self._as_bits(w[sel], b))
        return out

    # ---------------------------------------------------------------- search

    def expected_bytes(self) -> torch.Tensor:
        """Expected row bytes under the searched distribution, plus an index of a few runs."""
        return (self.probabilities().to(torch.float64) * self.option_bytes).sum() + run_index_bytes(len(self.bits))

    def penalty(self) -> torch.Tensor | None:
        if self.stage != "search":
            return None
        p = self.probabilities()
        cost = (p * self.option_bytes.to(torch.float32)).sum(dim=1) / self.group_weight
        return self.lam * cost.sum() / self.budget_bytes

    def after_backward(self, ids: torch.Tensor) -> None:
        if self.stage == "search":  # dual ascent: lam grows while the expected table is over budget
            with torch.no_grad():
                excess = float(self.expected_bytes()) / self.budget_bytes - 1.0
            self.lam = float(min(max(self.lam * math.exp(self.eta * max(min(excess, 1.0), -1.0)), 1e-8), 1e4))

    @property
    def ready(self) -> bool:
        return self.stage == "fixed"

    # ---------------------------------------------------------------- choose

    def chosen_bytes(self, choice: torch.Tensor | None = None) -> int:
        """Bytes of the exported table for a choice (default: the current one), index included."""
        c = self.choice if choice is None else choice
        return int(self.option_bytes.gather(1, c[:, None]).sum()) + self.index_bytes(c)

    def choose(self) -> list[int]:
        """Fix each group's width (paper's threshold rule, then fit the budget); returns the bits."""
        with torch.no_grad():
            p = self.probabilities().to(torch.float64)
            threshold = 1.0 / (2 * len(self.bits))
            ok = p >= threshold
            idx = torch.arange(len(self.bits)).expand_as(ok)
            choice = torch.where(ok, idx, torch.full_like(idx, -1)).max(dim=1).values.clamp(min=0)
            mass_at_or_above = p.flip(1).cumsum(1).flip(1)  # P(width >= option k)
            while self.chosen_bytes(choice) > self.budget_bytes:
                best, best_score = -1, math.inf
                for g in range(self.num_groups):
                    k = int(choice[g])
                    if k == 0:
                        continue
                    saved = float(self.option_bytes[g, k] - self.option_bytes[g, k - 1])
                    if saved <= 0:
                        continue
                    score = float(self.group_weight[g]) * float(mass_at_or_above[g, k]) / saved
                    if score < best_score:
                        best, best_score = g, score
                if best < 0:
                    raise BudgetTooSmall("every group is at its cheapest width and the table is still over budget")
                choice[best] -= 1
            self._fill(choice, mass_at_or_above)
            self.choice.copy_(choice)
            one_hot = torch.full_like(self.logits, -1e4)
            one_hot[torch.arange(self.num_groups), choice] = 0.0
            self.logits.copy_(one_hot)
            self.logits.requires_grad_(False)
        self.stage = "fixed"
        return [self.bits[int(k)] for k in choice]

    def _fill(self, choice: torch.Tensor, mass_at_or_above: torch.Tensor) -> None:
        """Spend what the budget has left: raise widths one step at a time, the step with the
        most ``f_g * P_g(>= b)`` per extra byte first, while it fits (so methods compare at
        equal bytes; the paper stops at its threshold rule)."""
        last = len(self.bits) - 1
        while True:
            best, best_score = -1, 0.0
            for g in range(self.num_groups):
                k = int(choice[g])
                if k == last:
                    continue
                extra = float(self.option_bytes[g, k + 1] - self.option_bytes[g, k])
                choice[g] += 1
                fits = self.chosen_bytes(choice) <= self.budget_bytes  # the index may grow a run too
                choice[g] -= 1
                if not fits:
                    continue
                # + 1e-12: a width the search drove to probability 0 is still worth its bytes
                score = float(self.group_weight[g]) * (float(mass_at_or_above[g, k + 1]) + 1e-12) / max(extra, 1e-9)
                if score > best_score:
                    best, best_score = g, score
            if best < 0:
                return
            choice[best] += 1

    def group_bits(self) -> list[int]:
        return [self.bits[int(k)] for k in self.choice]

    # ---------------------------------------------------------------- export

    def export(self) -> CompressedTable:
        if self.stage != "fixed":
            raise RuntimeError("choose() the widths before exporting")
        classes = [_row_class(self.dim, b) for b in self.bits]
        used = sorted(set(int(k) for k in self.choice))
        remap = torch.full((len(self.bits),), -1, dtype=torch.int64)
        remap[torch.tensor(used)] = torch.arange(len(used))
        class_of_id = remap[self.choice[self.group_of]]
        return rows_table(self.weight, class_of_id, [classes[k] for k in used])


def search_then_retrain(
    model: nn.Module,
    embedding: MPEEmbedding,
    train: Callable[[nn.Module, int], Any],
    search_epochs: int,
    retrain_epochs: int,
) -> list[int]:
    """MPE's two stages around any training function ``train(model, epochs)``; returns the bits
    per group.  The embedding weights go back to their pre-search values before retraining."""
    init = embedding.weight.detach().clone()
    embedding.stage = "search"
    train(model, search_epochs)
    bits = embedding.choose()
    with torch.no_grad():
        embedding.weight.copy_(init)
    train(model, retrain_epochs)
    return bits
