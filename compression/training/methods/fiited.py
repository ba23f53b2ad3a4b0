"""FIITED-style per-vector dimension, pruned during training by decayed utility (Luo et al.,
arXiv 2401.04408).  There is no public FIITED code; this follows the paper's abstract and
public summaries (``/work/shared/research/methods.md`` section 4) and says where it guesses.

What it does.  Every row is split into ``K`` chunks of ``D / K`` coordinates.  Each (row,
chunk) keeps a utility, updated every step as ``u <- gamma u + a g``: ``a`` = how many times
the ID was looked up in the batch, ``g`` = the L2 norm of the chunk's gradient (the paper's
"frequency x gradient" importance, decayed so it follows the data).  Every ``prune_every``
steps the number of live chunks is brought down to a target that falls from ``N K`` to the
budget's chunk count along a cubic schedule (gradual pruning) between ``start`` and ``end``
of training; the chunks pruned are the lowest-utility *last live* chunks of their rows, so a
row always keeps a prefix of its chunks (our guess at the paper's tail-first pruning) and is
stored as a truncated row.  Pruned chunks read as zero and do not come back.

What it stores (exported).  Each ID's live prefix of ``d = live * D / K`` coordinates in fp16
(row class ``(d, 16)``, ``d = 0`` stores nothing), one class per distinct ``d`` - the
physical pools of FIITED's virtually-hashed physically-indexed table - and a per-ID locator
(4 bytes per ID, or fewer as runs): FIITED's per-vector dimension needs a per-ID entry, and
that entry is charged to the budget.  Decode: the stored prefix, zeros after it; no rotation
(the mask trained the leading chunks to carry the row).
"""

from __future__ import annotations

import torch
from torch import nn

from ...allocation import BudgetTooSmall
from ...layout import MAX_CLASSES, RowClass
from ...table import CompressedTable
from .base import ServableEmbedding, dense_index_bytes, fp16_rounded, rows_table


class FIITEDEmbedding(ServableEmbedding):
    """Chunked rows with utility-driven, budget-bounded prefix pruning (module docstring)."""

    def __init__(
        self,
        num_ids: int,
        dim: int,
        budget_bytes: int,
        total_steps: int,
        chunks: int = 4,
        decay: float = 0.98,
        prune_every: int = 10,
        start: float = 0.1,
        end: float = 0.6,
        init_std: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dim % chunks or not 1 <= chunks < MAX_CLASSES:
            raise ValueError(f"dim {dim} must split into 1..{MAX_CLASSES - 1} equal chunks, got {chunks}")
        self.dim, self.chunks, self.chunk_dim = dim, chunks, dim // chunks
        self.decay, self.prune_every = decay, prune_every
        self.total_steps = max(1, total_steps)
        self.start_step, self.end_step = int(start * self.total_steps), max(1, int(end * self.total_steps))
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_ids, dim, generator=gen) * init_std)
        self.register_buffer("live", torch.full((num_ids,), chunks, dtype=torch.int64))
        self.register_buffer("utility", torch.zeros(num_ids, chunks))
        self.step = 0
        self.budget_bytes = int(budget_bytes)
        chunk_bytes = RowClass(self.chunk_dim, 16).row_bytes
        room = self.budget_bytes - dense_index_bytes(num_ids)
        if room < chunk_bytes:
            raise BudgetTooSmall(
                f"FIITED's per-ID locator takes {dense_index_bytes(num_ids)} bytes of the {budget_bytes}-byte budget, leaving no room for rows"
            )
        self.final_chunks = min(num_ids * chunks, room // chunk_bytes)

    @property
    def num_ids(self) -> int:
        return int(self.weight.shape[0])

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` 1 for live coordinates of each ID's row, 0 after its live prefix."""
        coord_chunk = torch.arange(self.dim, device=ids.device) // self.chunk_dim
        return (coord_chunk[None, :] < self.live[ids][:, None]).to(torch.float32)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return fp16_rounded(self.weight[ids]) * self.mask(ids)

    # ---------------------------------------------------------------- utility and pruning

    def target_chunks(self, step: int) -> int:
        total = self.num_ids * self.chunks
        if step <= self.start_step:
            return total
        if step >= self.end_step:
            return self.final_chunks
        t = (step - self.start_step) / max(1, self.end_step - self.start_step)
        return int(self.final_chunks + (total - self.final_chunks) * (1.0 - t) ** 3)

    def after_backward(self, ids: torch.Tensor) -> None:
        if self.weight.grad is None:
            return
        with torch.no_grad():
            flat = ids.reshape(-1)
            access = torch.bincount(flat[flat >= 0], minlength=self.num_ids).to(torch.float32)
            touched = torch.nonzero(access).flatten()
            grad = self.weight.grad[touched].reshape(-1, self.chunks, self.chunk_dim).norm(dim=2)
            self.utility.mul_(self.decay)
            self.utility[touched] += access[touched, None] * grad
            self.step += 1
            if self.step % self.prune_every == 0 or self.step >= self.end_step:
                self.prune_to(self.target_chunks(self.step))

    def prune_to(self, target: int) -> None:
        """Drop lowest-utility last live chunks until at most ``target`` chunks live."""
        with torch.no_grad():
            while int(self.live.sum()) > target:
                excess = int(self.live.sum()) - target
                rows = torch.nonzero(self.live > 0).flatten()
                last = self.utility[rows, self.live[rows] - 1]
                k = min(excess, rows.numel())
                drop = rows[torch.topk(last, k, largest=False).indices]
                self.live[drop] -= 1
                chunk = self.live[drop]
                cols = chunk[:, None] * self.chunk_dim + torch.arange(self.chunk_dim)[None, :]
                self.weight[drop[:, None], cols] = 0.0

    @property
    def ready(self) -> bool:
        return int(self.live.sum()) <= self.final_chunks

    # ---------------------------------------------------------------- export

    def export(self) -> CompressedTable:
        if not self.ready:
            self.prune_to(self.final_chunks)  # training stopped early: finish the schedule at once
        dims = sorted({int(v) for v in self.live.tolist()}, reverse=True)
        classes = [RowClass(d * self.chunk_dim, 16) if d else RowClass(0, 32) for d in dims]
        position = {d: k for k, d in enumerate(dims)}
        class_of_id = torch.tensor([position[int(v)] for v in self.live.tolist()], dtype=torch.int64)
        return rows_table(self.weight, class_of_id, classes)
