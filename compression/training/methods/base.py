"""What every training-time compression method shares: the module contract, straight-through
rounding, and the export into a :class:`~compression.table.CompressedTable`.

The contract (:class:`ServableEmbedding`): ``forward(ids)`` maps int64 IDs of any shape to
``[..., D]`` float32 vectors, and in eval mode it computes *exactly* what the exported table's
``lookup`` returns for the same IDs.  That holds by construction, not by tolerance: a module's
forward decodes its parameters with the same functions the table uses (the row codec of
:mod:`compression.codecs`, fp16 storage, the hash rules of :mod:`compression.unknown`), and the
gradient passes through the rounding unchanged (straight-through estimator).
"""

from __future__ import annotations

import torch
from torch import nn

from ... import codecs
from ...allocation import build_table
from ...index import RunIndex
from ...layout import RowClass
from ...table import CompressedTable
from ...unknown import UnknownPolicy


class _StraightThrough(torch.autograd.Function):
    """Forward: the rounded value ``q`` exactly; backward: the gradient goes to ``x`` as is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return q.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass (bit for bit), identity gradient to ``x``.  (``x + (q - x).detach()``
    is not always bit-exact in float arithmetic; this is.)"""
    return _StraightThrough.apply(x, q.detach())


def fp16_rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to fp16 and back, straight-through: what an fp16 slab or bucket table serves."""
    return straight_through(x, x.detach().to(torch.float16).to(torch.float32))


def codec_rounded(x: torch.Tensor, row_class: RowClass) -> torch.Tensor:
    """Rows ``[n, D]`` as a table stores and decodes them in ``row_class`` (first ``dim``
    coordinates kept, the rest zero), straight-through."""
    with torch.no_grad():
        out = torch.zeros_like(x, dtype=torch.float32)
        if row_class.dim:
            out[:, : row_class.dim] = codecs.decode_rows(codecs.encode_rows(x.detach(), row_class), row_class)
    return straight_through(x, out)


class ServableEmbedding(nn.Module):
    """An embedding trained inside a model and served as a :class:`CompressedTable`.

    Subclasses implement :meth:`rows` (vectors of unique 1-D IDs) and :meth:`export`; they may
    add a loss term (:meth:`penalty`), watch gradients (:meth:`after_backward`, called after
    ``loss.backward()`` and before the optimizer step), and say when their structure is final
    (:attr:`ready`: a trainer should only keep checkpoints taken when it is True).
    """

    dim: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        uniq, inverse = torch.unique(flat, return_inverse=True)  # each row's codec/hash work once
        return self.rows(uniq)[inverse].reshape(*ids.shape, self.dim)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def export(self) -> CompressedTable:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_backward(self, ids: torch.Tensor) -> None:
        return None

    @property
    def ready(self) -> bool:
        return True

    def served_bytes(self) -> int:
        """Bytes the exported table holds (index and metadata included)."""
        return self.export().nbytes


def rows_table(
    rows: torch.Tensor, class_of_id: torch.Tensor, classes: list[RowClass], unknown: UnknownPolicy | None = None
) -> CompressedTable:
    """A table for IDs ``0..N-1``: row ``i`` encoded into ``classes[class_of_id[i]]`` (``-1``: the
    ID has no row and is served by ``unknown``).  Indexed by whichever of a dense locator or its
    run-length encoding (:class:`RunIndex`) holds fewer bytes."""
    table = build_table(rows.detach().to(torch.float32), class_of_id, classes, unknown=unknown, index="dense")
    runs = RunIndex.from_locator(table.index.locator)  # type: ignore[attr-defined]
    if runs.nbytes < table.index.nbytes:
        table = CompressedTable(table.dim, table.classes, table.slabs, table.used, runs, unknown=table.unknown)
    return table


def hash_only_table(dim: int, unknown: UnknownPolicy) -> CompressedTable:
    """A table with no explicit rows: every ID is served by the hash-family ``unknown`` policy."""
    return CompressedTable.empty(dim, [RowClass(0, 32)], keyed=False, unknown=unknown)


def dense_index_bytes(num_ids: int) -> int:
    return 4 * num_ids


class FullEmbedding(ServableEmbedding):
    """The uncompressed baseline: an fp32 ``[N, D]`` table (what ``nn.Embedding`` holds).

    Stores: fp32 rows, one class ``d{D}b32``, one index run.  Decode: the row as stored."""

    def __init__(self, num_ids: int, dim: int, init_std: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(num_ids, dim, generator=gen) * init_std)

    @property
    def num_ids(self) -> int:
        return int(self.weight.shape[0])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def export(self) -> CompressedTable:
        n = self.num_ids
        return rows_table(self.weight, torch.zeros(n, dtype=torch.int64), [RowClass(self.dim, 32)])
