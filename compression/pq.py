"""Product quantization: the codec of codebook row classes, and frequency-weighted k-means.

Byte layout of a PQ row and of its codebook: :mod:`compression.layout`.  This is the torch
reference; ``compression/kernels/decode.c`` decodes the same bytes and is tested bit-exact
against :func:`decode_pq`.

Codebooks are trained by k-means in every sub-space at once (one batched distance computation
per Lloyd step, no Python loop over sub-spaces or rows), weighted by ID frequency: the head of a
Zipf vocabulary pulls centroids towards its rows, which is where the served error is paid.  A
1M-row table is not clustered whole: :func:`train_codebook` clusters a sample (the most frequent
rows plus a uniform draw of the rest, reweighted to stand for it), and :func:`encode_pq` then
assigns every row to its nearest fp16 centroids.
"""

from __future__ import annotations

import torch

from .layout import RowClass

_ASSIGN_FLOATS = 1 << 23  # distances per block of rows ([m, rows, 2**k] floats): 32 MB


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (integer ``[n, m]``, each ``< 2**bits``) -> ``[n, ceil(m*bits/8)]`` uint8, one
    little-endian bit stream per row (code ``j`` at bits ``j*bits ..``)."""
    n, m = codes.shape
    nbytes = (m * bits + 7) // 8
    pos = torch.arange(m, device=codes.device) * bits
    shifted = codes.to(torch.int32) << (pos % 8).to(torch.int32)  # < 2**15: spans <= 2 bytes
    out = torch.zeros((n, nbytes + 1), dtype=torch.int32, device=codes.device)
    byte = (pos // 8).expand(n, m)
    out.scatter_add_(1, byte, shifted & 0xFF)  # bits of different codes never overlap: add == or
    out.scatter_add_(1, byte + 1, shifted >> 8)
    return out[:, :nbytes].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[n, ceil(m*bits/8)]`` uint8 -> int64 ``[n, m]``."""
    n = packed.shape[0]
    pos = torch.arange(m, device=packed.device) * bits
    wide = torch.nn.functional.pad(packed.to(torch.int64), (0, 1))  # a code may end in the next byte
    lo = wide[:, pos // 8]
    hi = wide[:, pos // 8 + 1]
    return (((hi << 8) | lo) >> (pos % 8)) & ((1 << bits) - 1) if n else torch.empty((0, m), dtype=torch.int64, device=packed.device)


def _sub_vectors(x: torch.Tensor, row_class: RowClass) -> torch.Tensor:
    """``[n, >= dim]`` -> float32 ``[m, n, s]`` (sub-space major, for batched matmuls)."""
    n = x.shape[0]
    kept = x[:, : row_class.dim].to(torch.float32)
    return kept.reshape(n, row_class.m, row_class.sub_dim).transpose(0, 1)


def _assign(sub: torch.Tensor, cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every sub-vector: ``sub [m, n, s]``, ``cb [m, K, s]`` float32 ->
    (``||c||^2 - 2 x.c`` of the winner ``[m, n]``, code int64 ``[m, n]``).  ``||x||^2`` does not
    change the argmin, so it is left out; blocks of rows bound the ``[m, b, K]`` distances."""
    m, n, _ = sub.shape
    k = cb.shape[1]
    c_sq = (cb * cb).sum(dim=2).unsqueeze(1)  # [m, 1, K]
    cb_t = cb.transpose(1, 2)
    best = torch.empty((m, n), dtype=torch.float32, device=sub.device)
    codes = torch.empty((m, n), dtype=torch.int64, device=sub.device)
    block = max(1, _ASSIGN_FLOATS // (m * k))
    for start in range(0, n, block):
        dist = torch.baddbmm(c_sq, sub[:, start : start + block], cb_t, alpha=-2.0)  # [m, b, K]
        best[:, start : start + block], codes[:, start : start + block] = dist.min(dim=2)
    return best, codes


def nearest_codes(x: torch.Tensor, codebook: torch.Tensor, row_class: RowClass) -> torch.Tensor:
    """Nearest centroid per sub-vector (squared L2): int64 ``[n, m]``."""
    cb = codebook.to(device=x.device, dtype=torch.float32)  # [m, K, s]
    return _assign(_sub_vectors(x, row_class), cb)[1].T


def encode_pq(x: torch.Tensor, row_class: RowClass, codebook: torch.Tensor) -> torch.Tensor:
    """Rows ``[n, >= dim]`` -> ``[n, row_bytes]`` uint8: each sub-vector's nearest centroid."""
    return pack_codes(nearest_codes(x, codebook, row_class), row_class.bits)


def decode_codes(codes: torch.Tensor, row_class: RowClass, codebook: torch.Tensor) -> torch.Tensor:
    """int ``[n, m]`` codes -> float32 ``[n, dim]`` (``m`` gathers from the fp16 codebook)."""
    n, m = codes.shape
    cb = codebook.to(torch.float32)  # fp16 -> fp32 is exact
    sub = torch.arange(m, device=codes.device)
    return cb[sub.expand(n, m), codes.to(torch.int64)].reshape(n, row_class.dim)


def decode_pq(rows: torch.Tensor, row_class: RowClass, codebook: torch.Tensor) -> torch.Tensor:
    """``[n, row_bytes]`` uint8 -> float32 ``[n, dim]``."""
    codes = unpack_codes(rows, row_class.bits, row_class.m)
    return decode_codes(codes, row_class, codebook.to(rows.device))


def check_codebook(row_class: RowClass, codebook: torch.Tensor | None) -> None:
    """A PQ class needs an fp16 codebook of exactly its shape; other classes have none."""
    shape = row_class.codebook_shape
    if shape is None:
        if codebook is not None:
            raise ValueError(f"class {row_class.label()} is not a PQ class and has no codebook")
        return
    if codebook is None or codebook.dtype != torch.float16 or tuple(codebook.shape) != shape:
        raise ValueError(f"class {row_class.label()} needs an fp16 codebook of shape {list(shape)}")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"codebook of class {row_class.label()} holds non-finite values")


def training_sample(weights: torch.Tensor, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions to train a codebook on, and the weight each stands for.

    The ``size // 2`` most frequent rows are taken as they are (they carry most of the traffic
    of a skewed vocabulary); the rest of the sample is a uniform draw from the remaining rows,
    each weighted up by ``remaining / drawn`` so the sample's weight sums match the table's."""
    n = weights.numel()
    w = weights.to(torch.float64)
    if n <= size:
        return torch.arange(n), w
    head = size // 2
    order = torch.argsort(w, descending=True, stable=True)
    top, rest = order[:head], order[head:]
    gen = torch.Generator().manual_seed(seed)
    drawn = rest[torch.randperm(rest.numel(), generator=gen)[: size - head]]
    scale = rest.numel() / drawn.numel()
    return torch.cat([top, drawn]), torch.cat([w[top], w[drawn] * scale])


def train_codebook(
    x: torch.Tensor,
    weights: torch.Tensor,
    row_class: RowClass,
    iters: int = 8,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted k-means in each of the ``m`` sub-spaces of rows ``x`` (``[n, >= dim]``, already a
    sample): returns the fp16 codebook ``[m, 2**k, s]`` minimizing ``sum_i w_i ||x_i - c(x_i)||^2``
    (to a local optimum).

    Start: ``init`` when given (e.g. a codebook to refine), else ``K`` distinct rows drawn with
    probability proportional to weight (every sub-space takes the same rows' pieces).  A
    centroid that loses all its rows is moved to the sub-vector with the largest weighted error,
    so no code is wasted.  Final centroids are rounded to fp16, as they are stored."""
    rc = row_class
    n = x.shape[0]
    k = 1 << rc.bits
    sub = _sub_vectors(x, rc).contiguous()  # [m, n, s]
    w = weights.to(torch.float32).clamp(min=0) + 1e-12
    if init is not None:
        cb = init.to(torch.float32).clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        if n >= k:
            picks = torch.multinomial(w.double(), k, replacement=False, generator=gen)
        else:  # fewer rows than centroids: every row is a centroid, the rest repeat them
            picks = torch.arange(k) % max(n, 1)
        cb = sub[:, picks, :].clone() if n else torch.zeros((rc.m, k, rc.sub_dim))
    if n == 0:
        return cb.to(torch.float16)
    flat_idx_base = (torch.arange(rc.m) * k).unsqueeze(1)  # [m, 1]
    for _ in range(iters):
        best, codes = _assign(sub, cb)  # [m, n]
        flat = (codes + flat_idx_base).reshape(-1)
        wsum = torch.zeros(rc.m * k).index_add_(0, flat, w.repeat(rc.m))
        xsum = torch.zeros(rc.m * k, rc.sub_dim).index_add_(0, flat, (sub * w.view(1, n, 1)).reshape(-1, rc.sub_dim))
        filled = wsum > 0
        new = cb.reshape(-1, rc.sub_dim).clone()
        new[filled] = xsum[filled] / wsum[filled].unsqueeze(1)
        cb = new.reshape(rc.m, k, rc.sub_dim)
        empty = (~filled).reshape(rc.m, k)
        if bool(empty.any()):
            # re-seed empty centroids at the worst-served sub-vectors of their sub-space
            err = (best + (sub * sub).sum(dim=2)) * w.unsqueeze(0)  # [m, n]
            for j in torch.nonzero(empty.any(dim=1)).flatten().tolist():
                slots = torch.nonzero(empty[j]).flatten()
                worst = torch.topk(err[j], min(slots.numel(), n)).indices
                cb[j, slots[: worst.numel()]] = sub[j, worst]
    return cb.to(torch.float16)
