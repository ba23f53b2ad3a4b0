"""The hash-family baselines of the VLDB 2024 benchmark: the hashing trick and QR.

:class:`HashingTrickEmbedding` (Weinberger et al.): ``K`` fp16 rows shared by all IDs; ID ``x``
reads row :func:`compression.unknown.bucket_of` ``(x, K)``.  Colliding IDs share their whole
vector.  Memory ``K * D * 2`` bytes.  Exported as a table with no rows and the ``hashed``
unknown-ID policy.

:class:`QREmbedding` (Shi et al., KDD 2020, "compositional embeddings"): a quotient table of
``Q`` rows and a remainder table of ``M`` rows, fp16; with ``h = x mod (Q M)`` the vector is
``quotient[h // M] * remainder[h % M]`` (element-wise product, the paper's default ``mult``
operation).  IDs ``0..QM-1`` get distinct pairs of rows, so ``Q + M`` rows (about ``2 sqrt N``)
give every ID of a vocabulary a distinct vector; with fewer rows, IDs share pairs.  Memory
``(Q + M) * D * 2 + 16`` bytes.  Exported with the ``qr`` unknown-ID policy.

Both compute their rows with the decode functions of :mod:`compression.unknown`, from fp16
rounded weights, so the served table returns exactly the module's output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...allocation import BudgetTooSmall
from ...table import CompressedTable
from ...unknown import UnknownPolicy, hashed_rows, qr_rows
from .base import ServableEmbedding, fp16_rounded, hash_only_table


class HashingTrickEmbedding(ServableEmbedding):
    """``K`` shared fp16 rows, ID -> ``bucket_of(id, K)``."""

    def __init__(self, num_buckets: int, dim: int, init_std: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        if num_buckets < 1:
            raise ValueError("need at least one bucket")
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_buckets, dim, generator=gen) * init_std)

    @classmethod
    def for_budget(cls, budget_bytes: int, dim: int, num_ids: int, **kwargs: object) -> "HashingTrickEmbedding":
        buckets = min(num_ids, budget_bytes // (2 * dim))
        if buckets < 1:
            raise BudgetTooSmall(f"not one fp16 row of dim {dim} fits {budget_bytes} bytes")
        return cls(buckets, dim, **kwargs)  # type: ignore[arg-type]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return hashed_rows(fp16_rounded(self.weight), ids)

    def export(self) -> CompressedTable:
        return hash_only_table(self.dim, UnknownPolicy("hashed", buckets=self.weight.detach().to(torch.float16).contiguous()))


class QREmbedding(ServableEmbedding):
    """Quotient-remainder embedding with the element-wise product (see the module docstring).

    ``weight`` holds the ``Q`` quotient rows followed by the ``M`` remainder rows, the same order
    as the exported bucket table.  The remainder rows start near 1, so at init a vector is about
    its quotient row and training moves both."""

    def __init__(self, num_remainders: int, num_quotients: int, dim: int, init_std: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        if num_remainders < 1 or num_quotients < 1:
            raise ValueError("need at least one quotient and one remainder row")
        self.dim = dim
        self.num_remainders, self.num_quotients = num_remainders, num_quotients
        gen = torch.Generator().manual_seed(seed)
        quotient = torch.randn(num_quotients, dim, generator=gen) * init_std
        remainder = 1.0 + 0.1 * torch.randn(num_remainders, dim, generator=gen)
        self.weight = nn.Parameter(torch.cat([quotient, remainder]))

    @classmethod
    def for_budget(cls, budget_bytes: int, dim: int, num_ids: int, **kwargs: object) -> "QREmbedding":
        """Fill the budget: the largest remainder table ``M`` with ``M + ceil(N / M)`` rows
        fitting (all IDs distinct); below ``2 sqrt N`` rows, an even split (IDs share pairs)."""
        rows = (budget_bytes - 16) // (2 * dim)
        if rows < 2:
            raise BudgetTooSmall(f"QR needs two fp16 rows of dim {dim}; {budget_bytes} bytes hold {max(rows, 0)}")
        best = None
        for m in range(1, min(num_ids, rows - 1) + 1):
            if m + math.ceil(num_ids / m) <= rows:
                best = m
        if best is None:
            m, q = rows // 2, rows - rows // 2
        else:
            m, q = best, rows - best
        return cls(m, q, dim, **kwargs)  # type: ignore[arg-type]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return qr_rows(fp16_rounded(self.weight), ids, self.num_remainders, self.num_quotients)

    def export(self) -> CompressedTable:
        params = torch.tensor([self.num_remainders, self.num_quotients], dtype=torch.int64)
        return hash_only_table(self.dim, UnknownPolicy("qr", buckets=self.weight.detach().to(torch.float16).contiguous(), params=params))
