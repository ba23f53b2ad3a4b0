"""FBGEMM baseline for the embedding lookup benchmark.

Why this file exists: the service stores embedding tables compressed and
decodes rows on lookup. The obvious industrial reference point for "how fast
can quantized rows be fetched on CPU" is FBGEMM's inference Table-Batched
Embedding (TBE), ``IntNBitTableBatchedEmbeddingBagsCodegen``, which is what
TorchRec serves quantized tables with. This module wraps one such TBE so the
benchmark can compare against it on equal terms: same fp32 input table, same
int64 IDs in, same fp32 ``[n, D]`` rows out.

How FBGEMM is used (read from fbgemm_gpu 1.8.0, the version that loads with
torch 2.13.0; install with ``pip install fbgemm-gpu-cpu==1.8.0``):

* Quantization is FBGEMM's own row-wise op,
  ``torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, bit_rate)``,
  for every bit width (8, 4 and 2). It emits ``[packed codes | fp16 scale |
  fp16 bias]`` per row, computes the bias as fp16(min) and the scale as
  fp16((max - bias) / (2**bits - 1)), and quantizes against those rounded
  values, so the stored parameters are exactly the ones used for encoding.
  (FBGEMM's own tests build INT8 tables from ``FloatToFused8BitRowwiseQuantized``,
  which has fp32 scale/bias, and then cast them to fp16; that encodes against
  parameters that are not the ones stored, so the SBHalf op is used instead.)
* The TBE row layout is the other way round: ``[fp16 scale | fp16 bias |
  codes]`` (``reverse_qparam=False``). The codes and the scale/bias are copied
  into the two views that ``split_embedding_weights()`` returns, which is what
  ``assign_embedding_weights`` does as well.
* Lookups use ``PoolingMode.NONE`` ("sequence", or no-bag, embeddings), which
  is supported on CPU in 1.8.0 and returns one row per ID. For no-bag lookups the CPU kernel
  reads only the first and last entry of ``offsets``, so the offsets are the
  two-element ``[0, n]``. They are cached per (n, dtype). If a build of
  fbgemm_gpu rejects no-bag on CPU, the table falls back to
  ``PoolingMode.SUM`` with one ID per bag (``offsets = arange(n + 1)``), which
  returns the same rows. ``FbgemmIntNTable.pooling`` shows which mode is in
  use.
* Output dtype is set to FP32, because the TBE default is FP16.

Per-call overhead: ``IntNBitTableBatchedEmbeddingBagsCodegen.forward`` runs
Python bookkeeping on each call (input reporting, device moves, a
cache-location queue pop, optional bounds checks) before it calls
``torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function``. Without
a cache, pruning, or bounds checks, that work is no-ops, so the default fast
path calls the op overload directly with prebuilt positional arguments. That
saves several tens of microseconds per call. ``fast_path=False`` goes through
the public ``forward`` with ``BoundsCheckMode.FATAL`` instead. ``check()``
asserts that both paths return identical rows.

Storage: on CPU the TBE uses ``row_alignment=1``, so rows carry no padding
(INT8: D + 4 bytes, INT4: D/2 + 4, INT2: D/4 + 4). The only padding is that
the table's byte size is rounded up to a 128-byte cache line. On GPU the
default alignment is 16 bytes per row, e.g. 80 B instead of 68 B for INT8 at
D=64. ``nbytes`` reports the real size of the tensors the TBE holds.

Threading: in this FBGEMM version the CPU kernel loops over tables serially,
so a one-table lookup decodes on a single thread. Only the output allocation
and zero-fill can use more than one thread.

Importing this module never raises: ``AVAILABLE`` is False (and
``IMPORT_ERROR`` says why) when fbgemm_gpu cannot be imported. A torch/fbgemm
ABI mismatch shows up as an OSError or RuntimeError here, not as an
ImportError.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

AVAILABLE: bool
IMPORT_ERROR: str | None

try:
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        BoundsCheckMode,
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    AVAILABLE = True
    IMPORT_ERROR = None
except Exception as exc:  # ImportError, OSError (bad .so), RuntimeError (ABI)
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = ["AVAILABLE", "IMPORT_ERROR", "FbgemmIntNTable", "check", "time_lookup"]

#: Bytes of the fp16 scale + fp16 bias that FBGEMM stores with every row.
SCALE_BIAS_BYTES: int = 4

#: Rows quantized per call to the FBGEMM op while filling a table. The
#: quantized copy is made one chunk at a time, so filling never holds a second
#: full-size quantized table in memory.
_QUANT_CHUNK_ROWS: int = 1 << 18


def _sparse_type(bits: int) -> "SparseType":
    """Map a bit width to FBGEMM's SparseType. Kept in one place so that an
    unsupported width fails with a clear error instead of a KeyError deep
    inside FBGEMM."""
    table = {8: SparseType.INT8, 4: SparseType.INT4, 2: SparseType.INT2}
    if bits not in table:
        raise ValueError(f"bits must be one of {sorted(table)}, got {bits}")
    return table[bits]


def _make_tbe(
    num_rows: int, dim: int, bits: int, pooling: "PoolingMode", bounds_check: bool
) -> "IntNBitTableBatchedEmbeddingBagsCodegen":
    """Build an empty one-table CPU IntN TBE with fp32 output.

    The weights are allocated (``initialize_weights``) but left unfilled; the
    caller fills them through ``split_embedding_weights()``."""
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[("t0", num_rows, dim, _sparse_type(bits), EmbeddingLocation.HOST)],
        pooling_mode=pooling,
        device=torch.device("cpu"),
        bounds_check_mode=BoundsCheckMode.FATAL if bounds_check else BoundsCheckMode.NONE,
        output_dtype=SparseType.FP32,
        indices_dtype=torch.int64,
    )
    tbe.initialize_weights()
    return tbe


@functools.lru_cache(maxsize=None)
def _nobag_supported() -> bool:
    """Return True if this fbgemm_gpu build serves PoolingMode.NONE on CPU.

    Checked once on a tiny table instead of being assumed, because support for
    no-bag lookups on CPU has varied between FBGEMM releases. The probe must
    return the right rows, not merely run without error."""
    try:
        w = torch.arange(4 * 8, dtype=torch.float32).reshape(4, 8)
        tbe = _make_tbe(4, 8, 8, PoolingMode.NONE, bounds_check=False)
        q = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(w, 8)
        codes, scale_bias = tbe.split_embedding_weights()[0]
        codes.copy_(q[:, :-SCALE_BIAS_BYTES])
        assert scale_bias is not None
        scale_bias.copy_(q[:, -SCALE_BIAS_BYTES:])
        ids = torch.tensor([3, 0, 3], dtype=torch.int64)
        out = tbe(ids, torch.tensor([0, 3], dtype=torch.int64))
        return tuple(out.shape) == (3, 8) and torch.allclose(out, w[ids], atol=0.1)
    except Exception:
        return False


class FbgemmIntNTable:
    """One embedding table served by FBGEMM's CPU IntN TBE, one row per ID.

    Args:
        weights: float tensor ``[N, D]``. It is quantized with FBGEMM's
            row-wise SBHalf op (fp16 scale and bias per row) and then
            dropped: only the quantized TBE storage is kept.
        bits: 8, 4 or 2. ``D`` must be a multiple of ``8 // bits`` so codes
            pack into whole bytes.
        fast_path: if True (default), ``lookup`` calls the TBE's lookup op
            directly and skips ``forward``'s per-call Python bookkeeping and
            its bounds check (IDs must be in ``[0, N)``). If False, ``lookup``
            calls the public ``forward`` with ``BoundsCheckMode.FATAL``.

    Timing note: the op zero-fills its fp32 output before writing the rows.
    For outputs over 32768 floats, that fill uses torch's intra-op thread pool.
    On a 2-core machine that is shared with another busy process, the fill can
    stall for milliseconds, so time with ``torch.set_num_threads(1)`` (as
    ``main`` does by default) unless multi-threading is the point of the
    measurement.
    """

    def __init__(self, weights: torch.Tensor, bits: int = 8, *, fast_path: bool = True) -> None:
        if not AVAILABLE:
            raise RuntimeError(f"fbgemm_gpu is not importable: {IMPORT_ERROR}")
        if weights.dim() != 2:
            raise ValueError(f"weights must be [N, D], got shape {tuple(weights.shape)}")
        num_rows, dim = (int(s) for s in weights.shape)
        _sparse_type(bits)  # validates bits
        if dim % (8 // bits) != 0:
            raise ValueError(f"D={dim} must be a multiple of {8 // bits} for {bits}-bit codes")

        self.num_rows: int = num_rows
        self.dim: int = dim
        self.bits: int = bits
        self.fast_path: bool = fast_path
        self.nobag: bool = _nobag_supported()
        self.pooling: str = "none" if self.nobag else "sum (one id per bag)"
        self.tbe: IntNBitTableBatchedEmbeddingBagsCodegen = _make_tbe(
            num_rows,
            dim,
            bits,
            PoolingMode.NONE if self.nobag else PoolingMode.SUM,
            bounds_check=not fast_path,
        )
        self._fill(weights)

        # Bytes per stored row, as FBGEMM lays it out (after row alignment).
        padded_rows, _ = self.tbe.split_embedding_weights(split_scale_shifts=False)[0]
        self.row_bytes: int = int(padded_rows.shape[1])
        self.unpadded_row_bytes: int = dim * bits // 8 + SCALE_BIAS_BYTES

        self._offsets_cache: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._op: Callable[..., torch.Tensor] = (
            torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function.default
        )
        self._op_prefix: tuple[Any, ...] = self._build_op_prefix()
        self._op_suffix: tuple[Any, ...] = self._build_op_suffix()

    def _fill(self, weights: torch.Tensor) -> None:
        """Quantize ``weights`` chunk by chunk with FBGEMM's own op and copy
        the codes and scale/bias into the TBE's storage views.

        FBGEMM's quantize op emits ``[codes | scale | bias]``, but the TBE
        stores ``[scale | bias | codes]``, so the two pieces are copied
        separately. This is the same split that ``assign_embedding_weights``
        expects."""
        codes, scale_bias = self.tbe.split_embedding_weights()[0]
        assert scale_bias is not None and scale_bias.shape[1] == SCALE_BIAS_BYTES
        with torch.no_grad():
            for start in range(0, self.num_rows, _QUANT_CHUNK_ROWS):
                stop = min(start + _QUANT_CHUNK_ROWS, self.num_rows)
                chunk = weights[start:stop].detach().to(torch.float32).contiguous()
                q = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(chunk, self.bits)
                codes[start:stop].copy_(q[:, :-SCALE_BIAS_BYTES])
                scale_bias[start:stop].copy_(q[:, -SCALE_BIAS_BYTES:])

    def _build_op_prefix(self) -> tuple[Any, ...]:
        """Positional arguments of the lookup op that come before ``indices``.

        They are fixed for the life of the table, so they are built once
        rather than on every call. The order follows the op schema (dev
        weights, uvm weights, placements, offsets, types, D_offsets, total_D,
        max_int{2,4,8}_D, max_float{16,32}_D)."""
        t = self.tbe
        dev_weights = t.weights_host if t.host_size > 0 else t.weights_dev
        return (
            dev_weights,
            t.weights_uvm,
            t.weights_placements,
            t.weights_offsets,
            t.weights_tys,
            t.D_offsets,
            t.total_D,
            t.max_int2_D,
            t.max_int4_D,
            t.max_int8_D,
            t.max_float16_D,
            t.max_float32_D,
        )

    def _build_op_suffix(self) -> tuple[Any, ...]:
        """Positional arguments that come after ``offsets``: pooling mode, no
        per-sample weights, fp32 output, the (empty) cache, row alignment, and
        the FP8 parameters (unused for integer types)."""
        t = self.tbe
        return (
            int(t.pooling_mode),
            None,
            t.output_dtype,
            t.lxu_cache_weights,
            torch.empty(0, dtype=torch.int32),
            t.row_alignment,
            t.max_float8_D,
            t.fp8_exponent_bits,
            t.fp8_exponent_bias,
        )

    def _offsets(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Offsets for a batch of ``n`` IDs, cached by (n, dtype).

        For no-bag lookups only the first and last entries matter, so the
        offsets are ``[0, n]``. The SUM fallback needs one bag per ID,
        ``arange(n + 1)``. The offsets dtype must match the indices dtype."""
        key = (n, dtype)
        off = self._offsets_cache.get(key)
        if off is None:
            if self.nobag:
                off = torch.tensor([0, n], dtype=dtype)
            else:
                off = torch.arange(n + 1, dtype=dtype)
            self._offsets_cache[key] = off
        return off

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Return the dequantized rows for ``ids`` (int64 or int32 ``[n]``)
        as float32 ``[n, D]``.

        On the fast path, IDs are not bounds-checked, because the benchmark
        passes only valid IDs and a check would add a pass over the IDs that
        the system under test does not pay."""
        n = ids.shape[0]
        if n == 0:
            return torch.empty((0, self.dim), dtype=torch.float32)
        offsets = self._offsets(n, ids.dtype)
        if self.fast_path:
            return self._op(*self._op_prefix, ids, offsets, *self._op_suffix)
        return self.tbe(ids, offsets)

    __call__ = lookup

    @property
    def nbytes(self) -> int:
        """Bytes of weight storage held by the TBE: the real sizes of its
        host, device and UVM weight tensors and its (empty) cache. This
        includes any row alignment padding and the 128-byte rounding of the
        table's end."""
        t = self.tbe
        return int(
            t.weights_host.nbytes
            + t.weights_dev.nbytes
            + t.weights_uvm.nbytes
            + t.lxu_cache_weights.nbytes
        )

    @property
    def bytes_per_row(self) -> float:
        """``nbytes / N``: the storage cost per row, padding included."""
        return self.nbytes / self.num_rows

    def dequantized_reference(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantize rows ``ids`` from the stored bytes with FBGEMM's
        standalone dequantize op. This does not use the TBE lookup kernel, so
        it can serve as an independent check of it."""
        codes, scale_bias = self.tbe.split_embedding_weights()[0]
        assert scale_bias is not None
        fused = torch.cat([codes[ids], scale_bias[ids]], dim=1).contiguous()
        return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, self.bits)

    def __repr__(self) -> str:
        return (
            f"FbgemmIntNTable(N={self.num_rows}, D={self.dim}, bits={self.bits}, "
            f"pooling={self.pooling}, row_bytes={self.row_bytes}, nbytes={self.nbytes})"
        )


def _error_bound(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row bound on ``|dequant(quant(x)) - x|`` for FBGEMM's SBHalf
    row-wise quantization.

    With step = (max - min) / (2**bits - 1): rounding to the nearest code
    costs at most step/2. Storing the scale in fp16 (relative error <= 2**-11)
    shifts the top code by up to (2**bits - 1) * step * 2**-11. Storing the
    bias (the row min) in fp16 shifts everything by up to |min| * 2**-11.
    Margins are added for the fp32 arithmetic."""
    lo = rows.min(dim=1).values
    hi = rows.max(dim=1).values
    levels = (1 << bits) - 1
    step = (hi - lo) / levels
    fp16_rel = 2.0**-11
    return step * (0.5 + (levels + 1) * fp16_rel) + lo.abs() * 2 * fp16_rel + 1e-6


def check(n: int = 10000, d: int = 64, bits_list: tuple[int, ...] = (8, 4, 2)) -> None:
    """Build small tables and check FBGEMM lookups against the fp32 rows.

    For each bit width, this asserts that:
      * the output is float32 ``[n_ids, D]``;
      * every row is within the quantization error bound of the fp32 row;
      * the TBE kernel matches FBGEMM's standalone dequantize op bit for bit;
      * the fast path and the public ``forward`` path return identical rows,
        for int64 and int32 IDs;
      * storage is exactly N * row_bytes rounded up to 128 bytes.
    It then prints bytes per row."""
    if not AVAILABLE:
        raise RuntimeError(f"fbgemm_gpu is not importable: {IMPORT_ERROR}")
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(n, d, generator=gen) * 0.5
    weights[: n // 10] *= 8.0  # mix of small- and large-range rows
    ids = torch.randint(0, n, (4096,), generator=gen, dtype=torch.int64)
    ids[:3] = torch.tensor([0, n - 1, 0])  # both ends, and a repeat
    for bits in bits_list:
        table = FbgemmIntNTable(weights, bits)
        safe = FbgemmIntNTable(weights, bits, fast_path=False)
        out = table.lookup(ids)
        assert out.dtype == torch.float32 and tuple(out.shape) == (ids.numel(), d), out.shape
        ref = weights[ids]
        err = (out - ref).abs().max(dim=1).values
        bound = _error_bound(ref, bits)
        worst = int(torch.argmax(err / bound))
        assert bool((err <= bound).all()), (
            f"INT{bits}: row {int(ids[worst])} error {float(err[worst]):.3g} "
            f"exceeds bound {float(bound[worst]):.3g}"
        )
        assert torch.equal(out, table.dequantized_reference(ids)), f"INT{bits}: kernel != dequant op"
        assert torch.equal(out, safe.lookup(ids)), f"INT{bits}: fast path != forward()"
        assert torch.equal(out, table.lookup(ids.to(torch.int32))), f"INT{bits}: int32 ids differ"
        assert table.lookup(ids[:0]).shape == (0, d)
        expected_nbytes = -(-n * table.row_bytes // 128) * 128
        assert table.nbytes == expected_nbytes, (table.nbytes, expected_nbytes)
        step = (ref.max(dim=1).values - ref.min(dim=1).values) / ((1 << bits) - 1)
        print(
            f"check INT{bits}: ok  pooling={table.pooling}  max|err|={float(err.max()):.4f}  "
            f"max err/step={float((err / step).max()):.3f}  "
            f"row_bytes={table.row_bytes} (unpadded {table.unpadded_row_bytes})  "
            f"bytes/row={table.bytes_per_row:.3f}  (fp32: {4 * d})"
        )


def time_lookup(
    table: FbgemmIntNTable,
    batch: int,
    *,
    repeats: int = 7,
    min_seconds: float = 0.15,
    seed: int = 1,
) -> float:
    """Return the median lookups/s of ``table.lookup`` at batch size ``batch``.

    Each repeat runs as many calls as fit in ``min_seconds`` and gives one
    throughput figure; the median over repeats is returned. The calls cycle
    through a pool of pre-generated uniform random ID batches (about 2M IDs in
    total), so that small batches do not keep hitting the same few
    cache-resident rows. Generating IDs is not timed."""
    gen = torch.Generator().manual_seed(seed)
    pool_size = max(2, (1 << 21) // batch)
    pool = [
        torch.randint(0, table.num_rows, (batch,), generator=gen, dtype=torch.int64)
        for _ in range(pool_size)
    ]
    for ids in pool[: min(pool_size, 3)]:  # warm-up: offsets cache, allocator
        table.lookup(ids)
    rates: list[float] = []
    k = 0
    for _ in range(repeats):
        calls = 0
        t0 = time.perf_counter()
        while True:
            table.lookup(pool[k])
            k = (k + 1) % pool_size
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        rates.append(calls * batch / elapsed)
    return statistics.median(rates)


def _per_call_overhead_us(table: FbgemmIntNTable, calls: int = 2000) -> float:
    """Median wall time in microseconds of a one-ID lookup. This is
    approximately the fixed cost per call (Python dispatch, output allocation,
    and the kernel's internal ``arange`` and zero-fill)."""
    ids = torch.zeros(1, dtype=torch.int64)
    table.lookup(ids)
    samples: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        table.lookup(ids)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main(
    rows: int = 1_000_000,
    dim: int = 64,
    batches: tuple[int, ...] = (512, 4096, 65536),
    threads: int = 1,
) -> None:
    """Run ``check()``, then time lookups on a random ``rows x dim`` table for
    INT8 and INT4 (and INT2, which is cheap to add).

    ``threads`` sets torch's intra-op thread count; 0 keeps torch's default.
    The default is 1 because the FBGEMM kernel decodes a single table on one
    thread anyway, and only the zero-fill of the output (for outputs over
    32768 floats, i.e. batch > 512 at D=64) goes parallel. When another
    process is busy on the same cores, that parallel fill stalls at an OpenMP
    barrier and a 4096-ID call goes from ~0.4 ms to ~8 ms. So the default
    measures the kernel, not scheduler noise. The load average is printed so
    that contaminated runs can be spotted."""
    if not AVAILABLE:
        print(f"fbgemm_gpu unavailable: {IMPORT_ERROR}")
        sys.exit(1)
    if threads > 0:
        torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}  fbgemm_gpu {getattr(fbgemm_gpu, '__version__', '?')}  "
        f"intra-op threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
        f"loadavg(1m) {os.getloadavg()[0]:.2f}"
    )
    check()
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(rows, dim, generator=gen)
    print(f"\ntable {rows:,} x {dim} fp32 = {weights.nbytes / 2**20:.1f} MiB; uniform random ids")
    for bits in (8, 4, 2):
        t0 = time.perf_counter()
        table = FbgemmIntNTable(weights, bits)
        build_s = time.perf_counter() - t0
        safe = FbgemmIntNTable(weights[:1024], bits, fast_path=False)
        print(
            f"INT{bits}: nbytes={table.nbytes:,} ({table.nbytes / 2**20:.1f} MiB)  "
            f"bytes/row={table.bytes_per_row:.3f}  build={build_s:.2f}s  "
            f"1-id call: fast={_per_call_overhead_us(table):.1f}us "
            f"forward()={_per_call_overhead_us(safe):.1f}us"
        )
        del safe
        for batch in batches:
            rate = time_lookup(table, batch)
            print(f"  batch {batch:>6}: {rate / 1e6:7.2f} M lookups/s  ({batch / rate * 1e6:8.1f} us/call)")
        del table
    print(f"loadavg(1m) at end {os.getloadavg()[0]:.2f}")


def _parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options for the standalone run."""
    parser = argparse.ArgumentParser(description="FBGEMM IntN TBE lookup baseline")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[512, 4096, 65536], help="batch sizes to time"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    _args = _parse_args(sys.argv[1:])
    main(rows=_args.rows, dim=_args.dim, batches=tuple(_args.batches), threads=_args.threads)
