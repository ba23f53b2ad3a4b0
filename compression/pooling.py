"""Bag pooling over looked-up rows, with ``nn.EmbeddingBag``'s offset convention.

``offsets[b]`` is where bag ``b`` starts in ``ids``; bag ``b`` ends where bag ``b+1`` starts
(the last bag ends at ``len(ids)``).  Empty bags pool to zeros, for ``sum`` and ``mean`` alike.
"""

from __future__ import annotations

from typing import Literal

import torch

PoolingMode = Literal["sum", "mean"]
POOLING_MODES: tuple[str, ...] = ("sum", "mean")


def validate_offsets(offsets: torch.Tensor, num_ids: int) -> None:
    """Raise ``ValueError`` unless offsets start at 0, never decrease and stay within the IDs."""
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError("offsets must be a non-empty 1-D list")
    if int(offsets[0]) != 0:
        raise ValueError("offsets must start at 0")
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError("offsets must not decrease")
    if int(offsets[-1]) > num_ids:
        raise ValueError(f"offsets point past the {num_ids} IDs given")


def pool_bags(values: torch.Tensor, offsets: torch.Tensor, mode: PoolingMode) -> torch.Tensor:
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
    offsets = offsets.to(torch.int64)
    validate_offsets(offsets, values.shape[0])
    ends = torch.cat([offsets[1:], offsets.new_tensor([values.shape[0]])])
    lengths = ends - offsets
    bag_of_row = torch.repeat_interleave(torch.arange(offsets.numel(), device=values.device), lengths)
    pooled = torch.zeros((offsets.numel(), values.shape[1]), dtype=values.dtype, device=values.device)
    pooled.index_add_(0, bag_of_row, values[: bag_of_row.numel()])
    if mode == "mean":
        pooled /= lengths.clamp(min=1).to(values.dtype)[:, None]
    return pooled
