"""Post-training compression of a trained fp32 table, by name, within a byte budget.

Thin wrappers over :mod:`compression.allocation` (nothing is re-implemented here), so the
quality benchmark and users call every post-training method the same way:

* ``fp16``, ``int8``, ``int4``, ``int2``, ``int1`` - every row in one class (row-wise, FBGEMM
  style: codes + fp16 scale and bias per row); a uniform table reaches one ratio only, so a
  budget it does not fit raises :class:`~compression.allocation.BudgetTooSmall`;
* ``uniform`` - the widest of those that fits the budget;
* ``knapsack`` - mixed precision: one width per frequency group, ``{32..1}`` bits or pruned
  (dim 0), chosen by the multiple-choice knapsack on frequency-weighted error (the
  post-training form of MPE);
* ``knapsack_dims`` - the same with truncated dimensions ``D/2 .. 1`` allowed, stored in the
  frequency-weighted PCA basis (:mod:`compression.rotation`) or as they are: precision,
  dimension and rotation combined;
* ``knapsack_model`` - ``knapsack_dims`` scored by what each choice does to the model
  (``group_error``, e.g. :func:`compression.training.sensitivity.output_error`) instead of by
  frequency-weighted reconstruction error;
* ``pq`` - ``knapsack_dims`` plus product-quantization classes (frequency-weighted k-means
  codebooks, :mod:`compression.pq_alloc`): per group the allocator may pick a codebook class,
  and two PQ classes of different sizes can serve the frequent and the rare groups (MGQE's
  shape, post-training);
* ``pq_model`` - ``pq`` scored by ``group_error`` like ``knapsack_model``.

IDs are ``0..N-1``; the index is the run-length encoded locator (``index="runs"``), which is
cheap when the vocabulary is numbered by frequency.
"""

from __future__ import annotations

import torch

from ...allocation import BudgetTooSmall, DenseKind, GroupErrorFn, candidate_classes, compress, compress_uniform
from ...layout import RowClass
from ...table import CompressedTable

UNIFORM_BITS = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2, "int1": 1}
POST_TRAINING: tuple[str, ...] = (*UNIFORM_BITS, "uniform", "knapsack", "knapsack_dims", "knapsack_model", "pq", "pq_model")


def post_training_table(
    method: str,
    rows: torch.Tensor,
    frequencies: torch.Tensor,
    budget_bytes: int,
    index: DenseKind = "runs",
    num_groups: int = 64,
    group_error: GroupErrorFn | None = None,
) -> CompressedTable:
    """Compress ``rows`` (fp32 ``[N, D]``) with ``method`` into at most ``budget_bytes``
    (``knapsack_model`` needs ``group_error``)."""
    dim = rows.shape[1]
    if method in UNIFORM_BITS:
        table = compress_uniform(rows, RowClass(dim, UNIFORM_BITS[method]), index=index)
        if table.nbytes > budget_bytes:
            raise BudgetTooSmall(f"{method} needs {table.nbytes} bytes, budget is {budget_bytes}")
        return table
    if method == "uniform":
        for name in UNIFORM_BITS:
            try:
                return post_training_table(name, rows, frequencies, budget_bytes, index)
            except BudgetTooSmall:
                continue
        raise BudgetTooSmall(f"no uniform width fits {budget_bytes} bytes")
    if method == "knapsack":
        cands = candidate_classes(dim, dims=[dim, 0])
        return compress(rows, frequencies, budget_bytes=budget_bytes, candidates=cands, index=index, num_groups=num_groups)[0]
    if method in ("knapsack_dims", "knapsack_model", "pq", "pq_model"):
        if method.endswith("_model") and group_error is None:
            raise ValueError(f"{method} needs a group_error (compression.training.sensitivity.output_error)")
        dims = sorted({d for d in (dim, dim // 2, dim // 4, dim // 8, dim // 16, 1, 0) if 0 <= d <= dim}, reverse=True)
        cands = candidate_classes(dim, dims=dims)
        return compress(
            rows, frequencies, budget_bytes=budget_bytes, candidates=cands, index=index, num_groups=num_groups,
            group_error=group_error if method.endswith("_model") else None, pq=method.startswith("pq"),
        )[0]
    raise ValueError(f"unknown post-training method {method!r}; one of {POST_TRAINING}")
