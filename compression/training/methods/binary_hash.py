"""BH: binary-code hash embedding (Yan et al., CIKM 2021), and the hybrid that serves it as the
fixed-memory table behind explicit head rows.

:class:`BinaryHashEmbedding` stores only ``ceil(S / k)`` small sub-tables of ``2**k`` fp16 rows
each - nothing per ID.  An ID's code is the low ``S`` bits of the bijective 64-bit mix of the
ID (:func:`compression.unknown.mix64`); the code is cut into blocks of ``k`` consecutive bits,
block ``j`` with value ``v`` picks row ``v`` of sub-table ``j``, and the vector is the sum of the
picked rows (sum fusion).  Two IDs with different codes share some block rows but never all of
them, so, unlike modulo hashing, they never collide completely; an ID never seen in training
gets a vector made of trained block rows.  Memory: ``ceil(S/k) * 2**k * D * 2`` bytes plus 16
bytes of parameters; ``S`` and ``k`` pick the point between a few big sub-tables and many tiny
ones (:meth:`BinaryHashEmbedding.for_budget`).  Exported as a table with no rows and the
``binary_hash`` unknown-ID policy, whose decode is the same function this module calls.

:class:`HybridBinaryHashEmbedding` keeps the ``H`` most frequent IDs (``0..H-1`` in a
frequency-numbered vocabulary) as explicit rows of one row class (int8 by default, trained
with the serving codec) and sends every other ID - the tail and IDs never seen - to a BH
table.  Exported as rows for the head, one index run, and the BH policy as the fallback.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...allocation import BudgetTooSmall
from ...index import run_index_bytes
from ...layout import RowClass
from ...table import CompressedTable
from ...unknown import UnknownPolicy, binary_hash_blocks, binary_hash_rows
from .base import ServableEmbedding, codec_rounded, fp16_rounded, hash_only_table, rows_table

_PARAM_BYTES = 16  # the int64 [S, k] params tensor


class BinaryHashEmbedding(ServableEmbedding):
    """Binary-code hash embedding: ``S`` code bits in blocks of ``k``, separate sub-table per
    block, sum fusion, fp16 storage (see the module docstring)."""

    def __init__(self, dim: int, code_bits: int, block_bits: int, init_std: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= block_bits <= min(code_bits, 24) or code_bits > 64:
            raise ValueError(f"need 1 <= block bits <= min(code bits, 24) and code bits <= 64, got {block_bits}, {code_bits}")
        self.dim = dim
        self.code_bits, self.block_bits = code_bits, block_bits
        blocks = binary_hash_blocks(code_bits, block_bits)
        gen = torch.Generator().manual_seed(seed)
        # a row is a sum of `blocks` rows: scale the init so the sum has the usual spread
        self.weight = nn.Parameter(torch.randn(blocks << block_bits, dim, generator=gen) * init_std / math.sqrt(blocks))

    @staticmethod
    def table_bytes(dim: int, code_bits: int, block_bits: int) -> int:
        return (binary_hash_blocks(code_bits, block_bits) << block_bits) * dim * 2 + _PARAM_BYTES

    @classmethod
    def for_budget(cls, budget_bytes: int, dim: int, num_ids: int, **kwargs: object) -> "BinaryHashEmbedding":
        """The configuration for ``budget_bytes``: a code long enough that known IDs rarely share
        a whole code (``S >= 2 log2 N``, at most 64; shorter only when no such table fits), then
        the longest blocks that fit (few large sub-tables: ``k = 1`` would make every vector a
        linear function of its code bits), then the most bytes."""
        s_min = min(64, max(2, 2 * math.ceil(math.log2(max(num_ids, 2)))))
        best: tuple[bool, int, int, int] | None = None
        for s in range(1, 65):
            for k in range(1, min(s, 24) + 1):
                size = cls.table_bytes(dim, s, k)
                key = (s >= s_min, k, size, s)
                if size <= budget_bytes and (best is None or key > best):
                    best = key
        if best is None:
            raise BudgetTooSmall(f"no binary-hash table of dim {dim} fits {budget_bytes} bytes")
        return cls(dim, best[3], best[1], **kwargs)  # type: ignore[arg-type]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return binary_hash_rows(fp16_rounded(self.weight), ids, self.code_bits, self.block_bits)

    def policy(self) -> UnknownPolicy:
        params = torch.tensor([self.code_bits, self.block_bits], dtype=torch.int64)
        return UnknownPolicy("binary_hash", buckets=self.weight.detach().to(torch.float16).contiguous(), params=params)

    def export(self) -> CompressedTable:
        return hash_only_table(self.dim, self.policy())


class HybridBinaryHashEmbedding(ServableEmbedding):
    """Explicit rows for IDs ``0..H-1`` (the frequent head), BH for every other ID.

    Stores: ``H`` rows of class ``(D, head_bits)`` + one index run (20 bytes) + the BH tables.
    Decode: head IDs through the row codec, all others through the BH rule."""

    def __init__(self, num_head: int, tail: BinaryHashEmbedding, head_bits: int = 8, init_std: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.dim = tail.dim
        self.num_head = num_head
        self.head_class = RowClass(self.dim, head_bits)
        self.tail = tail
        gen = torch.Generator().manual_seed(seed + 1)
        self.weight = nn.Parameter(torch.randn(num_head, self.dim, generator=gen) * init_std)

    @classmethod
    def for_budget(
        cls, budget_bytes: int, dim: int, num_ids: int, tail_share: float = 0.5, head_bits: int = 8, **kwargs: object
    ) -> "HybridBinaryHashEmbedding":
        """``tail_share`` of the budget to the BH table, the rest to as many head rows as fit."""
        tail = BinaryHashEmbedding.for_budget(int(budget_bytes * tail_share), dim, num_ids, **kwargs)  # type: ignore[arg-type]
        left = budget_bytes - tail.served_bytes() - run_index_bytes(2)
        num_head = max(0, min(num_ids, left // RowClass(dim, head_bits).row_bytes))
        return cls(num_head, tail, head_bits, **kwargs)  # type: ignore[arg-type]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        head = (ids >= 0) & (ids < self.num_head)
        out = self.tail.rows(ids)
        sel = torch.nonzero(head).flatten()
        if sel.numel():
            w = self.weight[ids[sel]]
            q = fp16_rounded(w) if self.head_class.bits == 16 else codec_rounded(w, self.head_class)
            out = out.index_put((sel,), q)
        return out

    def export(self) -> CompressedTable:
        policy = self.tail.policy()
        if self.num_head == 0:
            return hash_only_table(self.dim, policy)
        return rows_table(self.weight, torch.zeros(self.num_head, dtype=torch.int64), [self.head_class], unknown=policy)
