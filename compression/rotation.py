"""Frequency-weighted PCA rotation, so that keeping a row's first ``d`` coordinates keeps the
most of what lookups see.

A table imported from an ordinary trained model spreads energy evenly over its coordinates;
truncating it would throw away signal at random.  We store ``y = x @ R`` where the columns of
the orthogonal ``R`` are the eigenvectors of the frequency-weighted second-moment matrix
``sum_i f_i x_i x_i^T``, in decreasing eigenvalue order, and decode ``x = y @ R^T``.  No
centering: an all-zero stored row (dim 0, or an unknown ID) must still decode to zero.
"""

from __future__ import annotations

import torch


def weighted_pca_rotation(rows: torch.Tensor, weights: torch.Tensor, max_rows: int = 262_144) -> torch.Tensor:
    """Orthogonal ``[D, D]`` rotation; uses at most ``max_rows`` rows (largest weights first)."""
    x = rows.to(torch.float64)
    w = weights.to(torch.float64).clamp(min=0)
    if x.shape[0] > max_rows:
        keep = torch.topk(w, max_rows).indices
        x, w = x[keep], w[keep]
    w = w + 1e-12
    moment = (x * w[:, None]).T @ x / w.sum()
    eigvals, eigvecs = torch.linalg.eigh(moment)
    order = torch.argsort(eigvals, descending=True)
    return eigvecs[:, order].to(torch.float32).contiguous()


def stored_rotation(rotation: torch.Tensor, columns: int) -> torch.Tensor:
    """What a table keeps of ``rotation``: its first ``columns`` columns in fp16 (the ones the
    widest truncated class reads; the rest are never used)."""
    return rotation[:, :columns].to(torch.float16).contiguous()


def rotation_bytes(dim: int, columns: int) -> int:
    """Bytes a ``[dim, columns]`` rotation costs in memory: :func:`stored_rotation` (fp16) plus
    the compiled decoder's fp32 ``R^T`` (kernels/__init__.py: made on the CPU path, which most
    tables take; a budget that holds with it holds without)."""
    return 2 * dim * columns + 4 * columns * dim
