"""A small DeepFM-style CTR model whose embedding table is a pluggable module.

The point of the model is to measure embedding compression, so every per-ID parameter lives
in the one embedding module (any :class:`~compression.training.methods.ServableEmbedding`, or a
:class:`ServedEmbedding` wrapping an exported table); the dense part - a first-order linear
term on the field vectors, the FM pairwise interaction, an MLP - is small and identical for
every method.  (Classic DeepFM also keeps a per-ID scalar weight table; it is left out so that
the memory being compared is all in one table.)

Two heads on shared features: the CTR logit (label ``rating >= 4`` on MovieLens) and a rating
regression (the "rating variant", scored by RMSE).  All fields share one global ID space
(:class:`compression.training.datasets.Vocabulary`); a multi-valued field (genres) is the mean of its
IDs' vectors, and ``-1`` marks an empty slot.
"""

from __future__ import annotations

import torch
from torch import nn

from ..table import CompressedTable


class ServedEmbedding(nn.Module):
    """An exported table behind the embedding interface: ``ids -> table.lookup(ids)``.  No
    gradients; this is how the benchmark scores what the service would serve."""

    def __init__(self, table: CompressedTable) -> None:
        super().__init__()
        self.table = table
        self.dim = table.dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(ids.reshape(-1)).values.reshape(*ids.shape, self.dim)


class DeepFM(nn.Module):
    """``logit = b + w . v + FM(v) + MLP(v)[0]``, ``rating = mu + u . v + s FM(v) + MLP(v)[1]``
    over the field vectors ``v [B, F, D]`` (and optional dense features into the MLP)."""

    def __init__(
        self,
        embedding: nn.Module,
        column_field: torch.Tensor,
        dim: int,
        dense_dim: int = 0,
        hidden: tuple[int, ...] = (64, 32),
        dropout: float = 0.1,
        rating_mean: float = 3.5,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        num_fields = int(column_field.max()) + 1
        pool = torch.zeros(num_fields, column_field.numel())
        pool[column_field, torch.arange(column_field.numel())] = 1.0
        self.register_buffer("pool", pool)  # [F, C]: which columns make up each field
        self.num_fields, self.dim = num_fields, dim
        width = num_fields * dim
        self.linear = nn.Linear(width, 2)
        layers: list[nn.Module] = []
        last = width + dense_dim
        for h in hidden:
            layers += [nn.Linear(last, h), nn.ReLU(), nn.Dropout(dropout)]
            last = h
        layers.append(nn.Linear(last, 2))
        self.mlp = nn.Sequential(*layers)
        self.fm_scale = nn.Parameter(torch.ones(2))
        self.register_buffer("rating_mean", torch.tensor(float(rating_mean)))

    def field_vectors(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, F, D]``: per field the mean of its non-empty columns' vectors; and the summed
        squared norm of the looked-up vectors (for L2 on the rows a batch touches)."""
        present = (ids >= 0).to(torch.float32)
        vectors = self.embedding(ids.clamp(min=0)) * present[..., None]
        sums = torch.einsum("fc,bcd->bfd", self.pool, vectors)
        counts = present @ self.pool.T
        return sums / counts.clamp(min=1.0)[..., None], vectors.pow(2).sum()

    def forward(self, ids: torch.Tensor, dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logit [B], rating [B])``."""
        logit, rating, _ = self.forward_with_l2(ids, dense)
        return logit, rating

    def forward_with_l2(self, ids: torch.Tensor, dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logit, rating, sum of squared looked-up vectors)``: one embedding pass for both."""
        v, l2 = self.field_vectors(ids)
        flat = v.reshape(v.shape[0], -1)
        fm = 0.5 * (v.sum(dim=1).pow(2) - v.pow(2).sum(dim=1)).sum(dim=1)
        deep_in = flat if dense is None else torch.cat([flat, dense], dim=1)
        out = self.linear(flat) + self.mlp(deep_in) + self.fm_scale[None, :] * fm[:, None]
        return out[:, 0], out[:, 1] + self.rating_mean, l2
