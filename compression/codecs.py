"""Encode float rows into the bytes of a row class, and decode them back (pure torch).

This is the reference implementation of the layout documented in :mod:`compression.layout`.
It runs unchanged on CPU and CUDA; the compiled fast paths in :mod:`compression.kernels` are
tested against it.  Everything is vectorized over rows: no Python loop touches a row.
"""

from __future__ import annotations

import torch

from . import pq
from .layout import ROW_HEAD_BYTES, RowClass, packed_code_bytes

# Least-squares refits of (scale, bias) after the min/max start.  Each one can only lower a
# row's squared error (we keep the better of old and new per row), and it matters most at 1-2
# bits, where min/max puts both levels at the extremes instead of at the cluster means.
_REFIT_ROUNDS = 3
_CLIP_REFIT_ROUNDS = 2


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8 ``[n, dim]``, each ``< 2**bits``) into ``[n, stride]`` bytes, planar
    order (code ``j`` -> byte ``j % stride``, bit offset ``(j // stride) * bits``)."""
    n, dim = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per = 8 // bits
    stride = packed_code_bytes(dim, bits)
    if stride * per != dim:
        codes = torch.nn.functional.pad(codes, (0, stride * per - dim))
    planes = codes.to(torch.int32).reshape(n, per, stride)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32).reshape(1, per, 1)
    return (planes << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[n, stride]`` uint8 -> ``[n, dim]`` uint8 codes."""
    if bits == 8:
        return packed[:, :dim]
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8).reshape(1, per, 1)
    codes = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :dim]


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of each row (``[n, d]`` -> ``[n, 1]``) in one fixed order: pad with +0.0 to a power of
    two, then fold halves (column ``j`` += column ``j + h``, h = P/2, P/4, ..., 1).

    Why not ``t.sum(dim=1)``: torch's reduction order depends on the CPU's vector width (AVX2 vs
    AVX-512) and on the device, so the same row could encode to different bytes on two replicas
    (a scale one fp16 step apart, or a refit taken on one and not the other).  Every step here is
    one elementwise IEEE add, so the result is a function of the row alone - the compiled
    encoder (``kernels/encode.c``) folds in the same order and matches it bit for bit."""
    d = t.shape[1]
    p = 1 << max(0, (d - 1).bit_length())
    if p == 1:
        return t.clone()
    if p != d:
        t = torch.nn.functional.pad(t, (0, p - d))
    while p > 1:
        p //= 2
        t = t[:, :p] + t[:, p:]
    return t


def _quantize_with(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes for ``x`` under fp16-representable ``scale``/``bias``, and the rows' squared error
    (the decode's own arithmetic, ``bias + scale * code``).  In-place where possible: encoding
    calls this several times per row."""
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    codes = (x - bias).div_(safe).round_().clamp_(0, qmax)
    if not bool(positive.all()):
        codes.mul_(positive)  # a zero scale: every code 0 (a full pass, so only when needed)
    # (codes * scale) + (bias - x) as two rounded ops: addcmul may fuse them (FMA) on some builds
    err = _row_sum((codes * scale).add_(bias - x).square_())
    return codes, err


# Clipping ranges tried per bit width, as fractions of the way from the row's mean to its
# min and max (1.0 = min/max itself).  Fewer levels want tighter clipping: at 2 bits the best
# range of a Gaussian-like row is about +-1.7 sigma, far inside its extremes; at 8 bits
# clipping matters little.  Each try is one vectorized pass; the winner is then refit.
_CLIP_GRID: dict[int, tuple[float, ...]] = {
    8: (0.95,),
    4: (0.9, 0.8, 0.7, 0.6),
    2: (0.8, 0.65, 0.5, 0.4),
    1: (0.7, 0.5, 0.35),
}


def _clip_error(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, qmax: int) -> torch.Tensor:
    """Rows' squared error under ``scale``/``bias`` (codes clamped to ``[0, qmax]``), computed
    in the code domain with in-place ops: the search below calls it once per candidate."""
    positive = scale > 0
    safe = torch.where(positive, scale, torch.ones_like(scale))
    r = (x - bias) / safe
    q = torch.round(r).clamp_(0, qmax)
    err = _row_sum(r.sub_(q).square_()) * (safe * safe)
    if bool(positive.all()):
        return err
    # a zero scale decodes every code to the bias (two full passes, so only when needed)
    return torch.where(positive, err, _row_sum((x - bias).square_()))


def _refit(
    x: torch.Tensor, xc: torch.Tensor, x_mean: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
    err: torch.Tensor, qmax: int, rounds: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares refits of (scale, bias) on the current codes, re-quantizing after each;
    a row takes a refit only when its squared error goes down (so this never makes a row worse).
    ``xc`` is ``x - x_mean`` (the caller computes it once for both refits of a block)."""
    if x.shape[1] <= 1:
        return codes, scale, bias, err
    for _ in range(rounds):
        q_mean = _row_sum(codes) / codes.shape[1]
        qc = codes - q_mean
        var_q = _row_sum(qc * qc)
        cov = _row_sum(qc.mul_(xc))  # qc is not needed after this
        new_scale = torch.where(var_q > 0, cov / torch.where(var_q > 0, var_q, 1.0), scale)
        # not clamp(min=0): which zero clamp returns for -0.0 is not specified, and it is a byte
        new_scale = _fp16_round(torch.where(new_scale > 0, new_scale, 0.0))
        new_bias = _fp16_round(x_mean - new_scale * q_mean)
        new_codes, new_err = _quantize_with(x, new_scale, new_bias, qmax)
        better = torch.isfinite(new_err) & (new_err < err)
        if not bool(better.any()):
            break  # converged: a further round starts from the same codes
        scale = torch.where(better, new_scale, scale)
        bias = torch.where(better, new_bias, bias)
        codes = torch.where(better, new_codes, codes)
        err = torch.where(better, new_err, err)
    return codes, scale, bias, err


# Rows per block of the encoder: every pass over a block stays in the L2 cache (1024 x 64
# float32 = 256 KB), which makes encoding a large table about 3x faster than whole-tensor passes
# that stream from memory ~60 times.  Rows are independent, so blocking changes no result.
_BLOCK_ROWS = 1024


def quantize_rows(
    x: torch.Tensor, bits: int, refit: bool = True, clip: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric quantization: returns ``(codes uint8, scale f16, bias f16)``.

    Starts from min/max (FBGEMM's rule: every value in range, max error scale/2) and, when
    ``refit`` is set, refits scale and bias by least squares on the chosen codes, keeping the
    refit only for rows whose squared error it lowers.

    With ``clip`` (and ``refit``) it also searches a per-row clipping range: every range of
    :data:`_CLIP_GRID` is scored in one pass, each row's best is refit the same way, and each
    row keeps whichever of the two results (min/max + refit, best clip + refit) has the lower
    squared error - so no row is ever worse than without the search.  Clipping trades a larger
    error on the few extreme coordinates for a finer step on all the others, which is what
    minimizes the squared error at 1-4 bits.

    Works on blocks of :data:`_BLOCK_ROWS` rows (cache-sized; rows are independent).
    """
    x = x.to(torch.float32)
    n = x.shape[0]
    if n <= _BLOCK_ROWS:
        return _quantize_block(x, bits, refit, clip)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.empty((n, 1), dtype=torch.float16, device=x.device)
    bias = torch.empty((n, 1), dtype=torch.float16, device=x.device)
    for start in range(0, n, _BLOCK_ROWS):
        stop = min(n, start + _BLOCK_ROWS)
        codes[start:stop], scale[start:stop], bias[start:stop] = _quantize_block(x[start:stop], bits, refit, clip)
    return codes, scale, bias


def _quantize_block(x: torch.Tensor, bits: int, refit: bool, clip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` on one block of float32 rows."""
    qmax = (1 << bits) - 1
    # + 0.0 turns -0.0 into +0.0: min/max of a row holding both zeros may return either
    lo = x.min(dim=1, keepdim=True).values + 0.0
    hi = x.max(dim=1, keepdim=True).values + 0.0
    bias = _fp16_round(lo)
    scale = _fp16_round((hi - bias) / qmax)
    codes, err = _quantize_with(x, scale, bias, qmax)
    if not refit:
        return codes.to(torch.uint8), scale.to(torch.float16), bias.to(torch.float16)
    mean = _row_sum(x) / x.shape[1]
    xc = x - mean
    codes, scale, bias, err = _refit(x, xc, mean, codes, scale, bias, err, qmax, _REFIT_ROUNDS)
    grid = _CLIP_GRID.get(bits, ()) if clip and x.shape[1] > 1 else ()
    if grid:
        best_err = best_scale = best_bias = None
        for t in grid:
            b = _fp16_round(mean + t * (lo - mean))
            s = _fp16_round((mean + t * (hi - mean) - b) / qmax)
            e = _clip_error(x, s, b, qmax)
            if best_err is None:
                best_err, best_scale, best_bias = e, s, b
            else:
                win = e < best_err
                best_err = torch.where(win, e, best_err)
                best_scale = torch.where(win, s, best_scale)  # type: ignore[arg-type]
                best_bias = torch.where(win, b, best_bias)  # type: ignore[arg-type]
        assert best_scale is not None and best_bias is not None
        c_codes, c_err = _quantize_with(x, best_scale, best_bias, qmax)
        c_codes, c_scale, c_bias, c_err = _refit(x, xc, mean, c_codes, best_scale, best_bias, c_err, qmax, _CLIP_REFIT_ROUNDS)
        better = torch.isfinite(c_err) & (c_err < err)
        scale = torch.where(better, c_scale, scale)
        bias = torch.where(better, c_bias, bias)
        codes = torch.where(better, c_codes, codes)
    return codes.to(torch.uint8), scale.to(torch.float16), bias.to(torch.float16)


def encode_rows(
    x: torch.Tensor, row_class: RowClass, refit: bool = True, codebook: torch.Tensor | None = None, clip: bool = True
) -> torch.Tensor:
    """Encode float rows ``[n, >= dim]`` into ``[n, row_class.row_bytes]`` uint8 (layout above).

    Only the first ``row_class.dim`` coordinates are kept.  A PQ class needs its ``codebook``
    (rows go to their nearest centroids, :mod:`compression.pq`).  ``refit`` / ``clip``: see
    :func:`quantize_rows` (both on by default; off reproduces plain min/max).
    """
    n = x.shape[0]
    dim, bits = row_class.dim, row_class.bits
    if row_class.pq:
        if codebook is None:
            raise ValueError(f"class {row_class.label()} encodes against a codebook; none given")
        return pq.encode_pq(x, row_class, codebook)
    if dim == 0:
        return torch.empty((n, 0), dtype=torch.uint8, device=x.device)
    kept = x[:, :dim].to(torch.float32).contiguous()
    if bits == 32:
        return kept.view(torch.uint8).reshape(n, 4 * dim)
    if bits == 16:
        return kept.to(torch.float16).contiguous().view(torch.uint8).reshape(n, 2 * dim)
    if kept.device.type == "cpu" and n and bits in (1, 2, 4, 8):
        from .kernels import cpu_c  # here, not at the top: compression.kernels imports this module

        if cpu_c.ENCODER_AVAILABLE:
            grid = _CLIP_GRID.get(bits, ()) if clip and refit else ()
            encoded = cpu_c.encode_rows(kept, bits, refit, grid, row_class.row_bytes)
            if encoded is not None:
                return encoded
    codes, scale, bias = quantize_rows(kept, bits, refit=refit, clip=clip)
    head = torch.cat([scale, bias], dim=1).contiguous().view(torch.uint8)
    out = torch.empty((n, row_class.row_bytes), dtype=torch.uint8, device=x.device)
    out[:, :ROW_HEAD_BYTES] = head
    out[:, ROW_HEAD_BYTES:] = pack_codes(codes, bits)
    return out


def decode_rows(rows: torch.Tensor, row_class: RowClass, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Decode ``[n, row_bytes]`` uint8 rows of ``row_class`` into float32 ``[n, dim]``."""
    n = rows.shape[0]
    dim, bits = row_class.dim, row_class.bits
    if row_class.pq:
        if codebook is None:
            raise ValueError(f"class {row_class.label()} decodes through a codebook; none given")
        return pq.decode_pq(rows, row_class, codebook)
    if dim == 0:
        return torch.empty((n, 0), dtype=torch.float32, device=rows.device)
    # flatten before reinterpreting bytes: view() needs stride-1 memory even for one row
    if bits == 32:
        return rows.reshape(-1).view(torch.float32).reshape(n, dim)
    if bits == 16:
        return rows.reshape(-1).view(torch.float16).reshape(n, dim).to(torch.float32)
    head = rows[:, :ROW_HEAD_BYTES].reshape(-1).view(torch.float16).reshape(n, 2).to(torch.float32)
    scale, bias = head[:, 0:1], head[:, 1:2]
    codes = unpack_codes(rows[:, ROW_HEAD_BYTES : ROW_HEAD_BYTES + packed_code_bytes(dim, bits)], bits, dim)
    return torch.addcmul(bias, codes.to(torch.float32), scale)


def reconstruction_error(x: torch.Tensor, row_class: RowClass, full_dim: int, codebook: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row squared L2 error of storing ``x`` (``[n, full_dim]``) in ``row_class``."""
    decoded = decode_rows(encode_rows(x, row_class, codebook=codebook), row_class, codebook)
    err = ((decoded - x[:, : row_class.dim].to(torch.float32)) ** 2).sum(dim=1)
    if row_class.dim < full_dim:
        err = err + (x[:, row_class.dim :].to(torch.float32) ** 2).sum(dim=1)
    return err
