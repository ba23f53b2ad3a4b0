"""Fused GPU lookup in Triton: one launch takes a batch of raw IDs through the index probe,
the row-class dispatch, the dequantization, the unknown-ID policy and the output cast.

Why one kernel: the torch reference runs one op chain per row class with a ``nonzero`` per
class, so a lookup is tens of launches and several device syncs.  Here each program owns a
tile of ``BLOCK_N`` IDs x ``BLOCK_D`` output columns and writes every element once.

What a program does with its IDs (byte layouts: :mod:`compression.layout`):

1. **Probe** (``INDEX``, a compile-time constant):
   ``RESOLVED`` the IDs are locators already; ``DENSE`` ``locator[id]``; ``RUNS`` a branch-free
   binary search of the run bounds, locator ``bases[r] + id - bounds[r]``; ``SORTED`` binary
   search of the sorted main keys, then of the sorted delta keys (a delta hit, tombstone
   included, overrides the main part, as :class:`~compression.index.KeyedIndex` does);
   ``HASH`` an open-addressing table of packed 12-byte slots (``slots int32[cap, 3]``: words 0-1
   the int64 key, low word first, word 2 the locator; any ``cap`` in ``[1, 2**31)``; empty slot
   = key ``INT64_MIN``; home slot = ``((fmix64(uint64(key)) >> 32) * cap) >> 32``, which for
   ``cap = 2**L`` is the older ``fmix64 >> (64 - L)``; linear probing ``slot + 1``, wrapping to 0
   at ``cap``, until the key or an empty slot; compression/hash_index.py).  The
   key is read as two aligned 32-bit words: a slot is only 4-byte aligned.  ``STATIC_HASH`` the
   same slots as the overflow of a static part: the ID's static slot first (``static int32[m,
   3]``, uint16 pilots; position formula in compression/hash_index.py), the overflow only for
   IDs not there.
2. **Decode** (the table's classes are compile-time constants, so the dispatch is unrolled
   and a class absent from the tile costs one reduction).  fp32 / fp16 and rotated classes get
   a pass each; the unrotated int8/4/2/1 classes share one pass (``GENERIC``: per row the slab
   address, dim and bits are selected, and per column the code's byte and shift come from a
   small table) or get a pass each (``GENERIC=0``); ``bench/gpu.py`` measures which is faster.
   fp32 / fp16 rows are read as typed elements; ``bits <= 8`` rows as bytes: the fp16 scale and
   bias are assembled from bytes (a row may start at any byte, and a 2-byte load there would
   be misaligned on the GPU), code ``j`` is byte ``4 + j % stride`` shifted right by
   ``(j // stride) * bits`` (planar order); ``x = code * scale + bias``.  ``code * scale`` is
   exact in fp32 (8-bit integer times 11-bit mantissa), so fused or not the result is the
   same float as the torch reference and the C kernel.  Rows of a truncated class of a
   rotated table are rotated back, ``x = sum_k y[k] * R^T[k, :]`` (rounding differs from the
   reference's matmul: tested with allclose).
3. **Unknown IDs** (``UNK``): zero, the default vector, the hashing trick, QR or the
   binary-code hash, with the hash functions of :mod:`compression.unknown` in int64 / uint64
   wrapping arithmetic.
4. **Store** as fp32, fp16 or bf16 (round to nearest even, like ``Tensor.to``), plus each ID's
   locator (``-1`` = no row) for the caller's found mask.

The pooled kernel runs one program per bag, looping over the bag's IDs a tile at a time and
summing in fp32 (then dividing by the bag length for ``mean``): ``[bags, D]`` is written, the
``[n, D]`` rows never are.  Tile sums are tree-reduced, so pooled results match the reference
to rounding (allclose), not bit for bit.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it).
Checked with Triton 3.6 (the lent GPU's) and 3.9: the interpreter tests pass with both, and
``bench/triton_aot.py`` compiles every variant for sm_90 with both.  Loops over runtime
bounds are ``while`` loops because 3.6's interpreter cannot ``range()`` over a runtime scalar.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from ..layout import MAX_CLASSES, RowClass, packed_code_bytes

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# index kinds (kernel constants)
RESOLVED, DENSE, RUNS, SORTED, HASH, STATIC_HASH = 0, 1, 2, 3, 4, 5
# unknown-ID policies
UNK_CODES = {"zero": 0, "default": 1, "hashed": 2, "qr": 3, "binary_hash": 4}
# output dtypes
OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HASH_EMPTY_KEY = -(2**63)  # INT64_MIN marks an empty slot of the open-addressing index


# ---------------------------------------------------------------------------------- helpers


@triton.jit
def _count_le(arr, n, key, mask):
    """Per lane: how many of sorted ``arr[0..n)`` are ``<= key`` (branch-free binary search:
    every lane takes the same number of steps, ceil(log2 n) + 1 loads)."""
    base = tl.zeros(key.shape, dtype=tl.int64)
    length = n.to(tl.int64)
    while length > 1:
        half = length // 2
        v = tl.load(arr + base + half, mask=mask, other=0)
        base = tl.where(v <= key, base + half, base)
        length -= half
    last = tl.load(arr + base, mask=mask, other=0)  # n == 0: arr is a 1-element stand-in
    found = tl.where(n > 0, (last <= key).to(tl.int64), 0)
    return base + found


@triton.jit
def _find_sorted(keys, locs, n, key, mask):
    """(locator, hit) of ``key`` in sorted ``keys[0..n)``."""
    pos = _count_le(keys, n, key, mask) - 1
    inside = mask & (pos >= 0)
    k = tl.load(keys + pos, mask=inside, other=0)
    hit = inside & (k == key)
    loc = tl.load(locs + pos, mask=hit, other=-1)
    return loc, hit


@triton.jit
def _fmix64(key):
    """MurmurHash3's 64-bit finalizer of int64 keys, as uint64: the hash index's hash (its home
    slot, its static part's bucket and slot; compression/hash_index.py)."""
    h = key.to(tl.uint64, bitcast=True)
    h = h ^ (h >> 33)
    h = h * 0xFF51AFD7ED558CCD
    h = h ^ (h >> 33)
    h = h * 0xC4CEB9FE1A85EC53
    return h ^ (h >> 33)


@triton.jit
def _probe_hash(slots, capacity, key, mask):
    """Open addressing with linear probing (layout in the module docstring).  Every lane probes
    until its key or an empty slot; at most ``cap`` probes, so a full table cannot loop."""
    h = _fmix64(key)
    cap = tl.zeros(key.shape, dtype=tl.int64) + capacity  # an int or a scalar (Triton makes 1 a constexpr)
    slot = (((h >> 32) * cap.to(tl.uint64)) >> 32).to(tl.int64)  # < 2**63: cap < 2**31
    empty_bits = 0x8000000000000000
    query_ok = key.to(tl.uint64, bitcast=True) != empty_bits  # INT64_MIN is reserved, never stored
    active = mask & query_ok
    loc = tl.full(key.shape, -1, dtype=tl.int32)
    probes = tl.zeros(key.shape, dtype=tl.int64)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        low = tl.load(slots + 3 * slot, mask=active, other=0)
        high = tl.load(slots + 3 * slot + 1, mask=active, other=0)
        k = (high.to(tl.int64) << 32) | (low.to(tl.uint32, bitcast=True).to(tl.int64))
        hit = active & (k == key)
        loc = tl.where(hit, tl.load(slots + 3 * slot + 2, mask=hit, other=-1), loc)
        probes += 1
        active = active & (k != key) & (k.to(tl.uint64, bitcast=True) != empty_bits) & (probes < cap)
        slot = tl.where(slot + 1 == cap, 0, slot + 1)
    return loc


@triton.jit
def _probe_static(slots, capacity, static, pilots, packed, key, mask):
    """A hash index with a static part (compression/hash_index.py): the ID's static slot, then
    the overflow ``slots`` for the lanes whose static slot holds another key.  ``packed`` is
    ``m | buckets << 32`` (static slots, pilots)."""
    h = _fmix64(key)
    both = tl.zeros(key.shape, dtype=tl.int64) + packed
    m = (both & 0x7FFFFFFF).to(tl.uint64)
    buckets = (both >> 32).to(tl.uint64)
    bucket = (((h >> 32) * buckets) >> 32).to(tl.int64)
    pilot = (tl.load(pilots + bucket, mask=mask, other=0).to(tl.int32) & 0xFFFF).to(tl.uint32)
    mixed = pilot * 0x9E3779B1  # uint32: wraps mod 2**32, as in C
    x = ((h & 0xFFFFFFFF).to(tl.uint32) ^ mixed) * 0x85EBCA6B
    pos = ((x.to(tl.uint64) * m) >> 32).to(tl.int64)
    low = tl.load(static + 3 * pos, mask=mask, other=0)
    high = tl.load(static + 3 * pos + 1, mask=mask, other=0)
    k = (high.to(tl.int64) << 32) | (low.to(tl.uint32, bitcast=True).to(tl.int64))
    hit = mask & (k == key)  # a query of INT64_MIN "hits" a free slot, whose locator is -1
    loc = tl.load(static + 3 * pos + 2, mask=hit, other=-1)
    rest = _probe_hash(slots, capacity, key, mask & ~hit)
    return tl.where(hit, loc, rest)


@triton.jit
def _resolve(ids, mask, ia, ib, ic, idd, na, nb, INDEX: tl.constexpr):
    """int32 locator of each ID (``-1``: no row)."""
    if INDEX == 0:
        loc = tl.where(mask, ids, -1).to(tl.int32)
    elif INDEX == 1:
        inside = mask & (ids >= 0) & (ids < na)
        loc = tl.load(ia + ids, mask=inside, other=-1)
    elif INDEX == 2:
        size = tl.load(ia + na - 1)  # bounds[R] = N
        inside = mask & (ids >= 0) & (ids < size)
        run = _count_le(ia, na, ids, inside) - 1
        base = tl.load(ib + run, mask=inside, other=-1)
        start = tl.load(ia + run, mask=inside, other=0)
        loc = tl.where(inside & (base >= 0), base.to(tl.int64) + (ids - start), -1).to(tl.int32)
    elif INDEX == 3:
        main, _ = _find_sorted(ia, ib, na, ids, mask)
        delta, dhit = _find_sorted(ic, idd, nb, ids, mask)
        loc = tl.where(dhit, delta, main)
    elif INDEX == 4:
        loc = _probe_hash(ia, na, ids, mask)
    else:
        loc = _probe_static(ia, na, ib, ic, nb, ids, mask)
    return loc


@triton.jit
def _load_half(ptr, mask):
    """fp16 at a byte address of any alignment, as fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _decode_class(acc, slab, slot, is_c, cols, rot, D: tl.constexpr, SPEC: tl.constexpr, GENERIC: tl.constexpr):
    """Write the rows of one class (``is_c``) of the tile into ``acc`` [BLOCK_N, BLOCK_D].
    ``SPEC`` packs the class: dim (bits 0-15), bits (16-23), rotated (24).  With ``GENERIC``
    the unrotated quantized classes are left to :func:`_decode_quantized`."""
    DIM: tl.constexpr = SPEC & 0xFFFF
    BITS: tl.constexpr = (SPEC >> 16) & 0xFF
    ROT: tl.constexpr = (SPEC >> 24) & 1
    SKIP: tl.constexpr = GENERIC * (BITS <= 8) * (ROT == 0)
    if DIM > 0 and SKIP == 0:
        if tl.max(is_c.to(tl.int32), axis=0) > 0:
            STRIDE: tl.constexpr = (DIM * BITS + 7) // 8  # code bytes (used for bits <= 8 only)
            RB: tl.constexpr = 4 + STRIDE
            if BITS <= 8:
                row = slab + slot * RB
                scale = _load_half(row, is_c)
                bias = _load_half(row + 2, is_c)
            if ROT == 0:
                m = is_c[:, None] & (cols[None, :] < DIM)
                if BITS == 32 or BITS == 16:
                    v = tl.load(slab + slot[:, None] * DIM + cols[None, :], mask=m, other=0.0).to(tl.float32)
                else:
                    if BITS == 8:
                        code = tl.load(row[:, None] + 4 + cols[None, :], mask=m, other=0)
                    else:
                        byte = tl.load(row[:, None] + 4 + (cols % STRIDE)[None, :], mask=m, other=0)
                        code = (byte >> ((cols // STRIDE) * BITS).to(tl.uint8)[None, :]) & ((1 << BITS) - 1)
                    v = code.to(tl.float32) * scale[:, None] + bias[:, None]
                acc = tl.where(m, v, acc)
            else:
                # x = sum_k y[k] R^T[k, :]: one coordinate of every row of the tile per step
                cmask = cols < D
                rot_acc = tl.zeros(acc.shape, dtype=tl.float32)
                for k in range(DIM):
                    if BITS == 32 or BITS == 16:
                        y = tl.load(slab + slot * DIM + k, mask=is_c, other=0.0).to(tl.float32)
                    else:
                        byte = tl.load(row + 4 + (k % STRIDE), mask=is_c, other=0)
                        code = (byte >> ((k // STRIDE) * BITS)) & ((1 << BITS) - 1)
                        y = code.to(tl.float32) * scale + bias
                    r = tl.load(rot + k * D + cols, mask=cmask, other=0.0)
                    rot_acc += y[:, None] * r[None, :]
                acc = tl.where(is_c[:, None], rot_acc, acc)
    return acc


@triton.jit
def _qsel(ptr, qinfo, cls, slot, c: tl.constexpr, slab, SPEC: tl.constexpr):
    """Per row of class ``c`` (if it is an unrotated quantized class): its row address and
    ``dim | bits << 16``, for the shared quantized path."""
    DIM: tl.constexpr = SPEC & 0xFFFF
    BITS: tl.constexpr = (SPEC >> 16) & 0xFF
    ROT: tl.constexpr = (SPEC >> 24) & 1
    if DIM > 0 and BITS <= 8 and ROT == 0:
        RB: tl.constexpr = 4 + (DIM * BITS + 7) // 8
        here = cls == c
        ptr = tl.where(here, slab + slot * RB, ptr)
        qinfo = tl.where(here, DIM | (BITS << 16), qinfo)
    return ptr, qinfo


@triton.jit
def _decode_quantized(
    acc, cls, slot, cols, qbase, qtab, s0, s1, s2, s3, s4, s5, s6, s7, BLOCK_D: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
):
    """Every unrotated int8/4/2/1 class in one pass: the row's address, dim and bits are picked
    per row, and where column ``j``'s code sits (byte ``4 + j % stride``, shift
    ``(j // stride) * bits``) is read from ``qtab[class, j]`` (packed ``offset | shift << 24``,
    a small table the L1 cache holds) instead of dividing by a per-row stride.  Costs one pass
    over the tile however many quantized classes the table has (the per-class path costs one
    pass per class)."""
    ptr = qbase + slot * 0
    qinfo = tl.zeros(cls.shape, dtype=tl.int32)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 0, s0, C0)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 1, s1, C1)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 2, s2, C2)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 3, s3, C3)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 4, s4, C4)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 5, s5, C5)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 6, s6, C6)
    ptr, qinfo = _qsel(ptr, qinfo, cls, slot, 7, s7, C7)
    isq = qinfo > 0
    if tl.max(isq.to(tl.int32), axis=0) > 0:
        dim = qinfo & 0xFFFF
        bits = qinfo >> 16
        scale = _load_half(ptr, isq)
        bias = _load_half(ptr + 2, isq)
        m = isq[:, None] & (cols[None, :] < dim[:, None])
        e = tl.load(qtab + cls[:, None] * BLOCK_D + cols[None, :], mask=m, other=0)
        byte = tl.load(ptr[:, None] + (e & 0xFFFFFF), mask=m, other=0)
        mask = ((1 << bits) - 1).to(tl.uint8)
        code = (byte >> (e >> 24).to(tl.uint8)) & mask[:, None]
        v = code.to(tl.float32) * scale[:, None] + bias[:, None]
        acc = tl.where(m, v, acc)
    return acc


@triton.jit
def _mix64(x):
    """splitmix64's finalizer on uint64 (== compression.unknown.mix64)."""
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _fallback(acc, ids, unknown, cols, up, u0, u1, D: tl.constexpr, UNK: tl.constexpr):
    """Rows of the unknown IDs by the table's policy (compression.unknown)."""
    cmask = cols < D
    m = unknown[:, None] & cmask[None, :]
    if UNK == 1:
        v = tl.load(up + cols, mask=cmask, other=0.0)
        acc = tl.where(m, v[None, :], acc)
    elif UNK == 2:
        b = ((ids * -7046029254386353131) >> 33) & 0x7FFFFFFF
        b = b % u0
        v = tl.load(up + b[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc = tl.where(m, v, acc)
    elif UNK == 3:
        p = u0.to(tl.int64) * u1  # M * Q
        h = ids % p
        h = tl.where(h < 0, h + p, h)
        q = h // u0
        r = h % u0
        vq = tl.load(up + q[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        vr = tl.load(up + (u1 + r)[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc = tl.where(m, vq * vr, acc)
    elif UNK == 4:
        code = _mix64(ids.to(tl.uint64, bitcast=True))
        blocks = (u0 + u1 - 1) // u1  # ceil(S / k)
        total = tl.zeros(acc.shape, dtype=tl.float32)
        j = 0
        while j < blocks:  # a while, not range(): Triton 3.6's interpreter cannot range() over a runtime scalar
            shift = j * u1
            width = tl.minimum(u1, u0 - shift)
            value = (code >> shift.to(tl.uint64)) & (0xFFFFFFFFFFFFFFFF >> (64 - width).to(tl.uint64))
            row = value.to(tl.int64) + j * (1 << u1.to(tl.int64))
            total += tl.load(up + row[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
            j += 1
        acc = tl.where(m, total, acc)
    return acc


@triton.jit
def _tile(
    ids, valid, cols, ia, ib, ic, idd, na, nb,
    s0, s1, s2, s3, s4, s5, s6, s7, rot, up, u0, u1, qbase, qtab,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INDEX: tl.constexpr, UNK: tl.constexpr,
    GENERIC: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
):
    """Locators and decoded fp32 rows of one tile of IDs."""
    loc = _resolve(ids, valid, ia, ib, ic, idd, na, nb, INDEX)
    found = loc >= 0
    cls = tl.where(found, loc >> 28, -1)
    slot = (loc & 0x0FFFFFFF).to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc = _decode_class(acc, s0, slot, cls == 0, cols, rot, D, C0, GENERIC)
    acc = _decode_class(acc, s1, slot, cls == 1, cols, rot, D, C1, GENERIC)
    acc = _decode_class(acc, s2, slot, cls == 2, cols, rot, D, C2, GENERIC)
    acc = _decode_class(acc, s3, slot, cls == 3, cols, rot, D, C3, GENERIC)
    acc = _decode_class(acc, s4, slot, cls == 4, cols, rot, D, C4, GENERIC)
    acc = _decode_class(acc, s5, slot, cls == 5, cols, rot, D, C5, GENERIC)
    acc = _decode_class(acc, s6, slot, cls == 6, cols, rot, D, C6, GENERIC)
    acc = _decode_class(acc, s7, slot, cls == 7, cols, rot, D, C7, GENERIC)
    if GENERIC:
        acc = _decode_quantized(acc, cls, slot, cols, qbase, qtab, s0, s1, s2, s3, s4, s5, s6, s7, BLOCK_D, C0, C1, C2, C3, C4, C5, C6, C7)
    if UNK != 0:
        acc = _fallback(acc, ids, valid & ~found, cols, up, u0, u1, D, UNK)
    return loc, acc


@triton.jit
def _cast_out(acc, OUT: tl.constexpr):
    if OUT == 1:
        return acc.to(tl.float16)
    elif OUT == 2:
        # round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates, the GPU's
        # rounds; doing it in integers gives the same bits on both (inputs are finite)
        bits = acc.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return acc


# ---------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["n", "na", "nb", "u0", "u1"])
def _lookup_kernel(
    ids_ptr, n, out_ptr, loc_ptr,
    ia, ib, ic, idd, na, nb,
    s0, s1, s2, s3, s4, s5, s6, s7, rot, up, u0, u1, qbase, qtab,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INDEX: tl.constexpr, UNK: tl.constexpr, OUT: tl.constexpr,
    GENERIC: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = rows < n
    cols = tl.arange(0, BLOCK_D)
    ids = tl.load(ids_ptr + rows, mask=valid, other=0)
    loc, acc = _tile(
        ids, valid, cols, ia, ib, ic, idd, na, nb, s0, s1, s2, s3, s4, s5, s6, s7, rot, up, u0, u1, qbase, qtab,
        D, BLOCK_N, BLOCK_D, INDEX, UNK, GENERIC, C0, C1, C2, C3, C4, C5, C6, C7,
    )
    tl.store(loc_ptr + rows, loc, mask=valid)
    omask = valid[:, None] & (cols[None, :] < D)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], _cast_out(acc, OUT), mask=omask)


@triton.jit(do_not_specialize=["n", "na", "nb", "u0", "u1"])
def _pooled_kernel(
    ids_ptr, n, starts_ptr, ends_ptr, out_ptr, loc_ptr,
    ia, ib, ic, idd, na, nb,
    s0, s1, s2, s3, s4, s5, s6, s7, rot, up, u0, u1, qbase, qtab,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INDEX: tl.constexpr, UNK: tl.constexpr, OUT: tl.constexpr,
    GENERIC: tl.constexpr,
    MEAN: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr,
    C4: tl.constexpr, C5: tl.constexpr, C6: tl.constexpr, C7: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + bag)
    end = tl.load(ends_ptr + bag)
    cols = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    steps = (end - start + BLOCK_N - 1) // BLOCK_N
    step = 0
    while step < steps:  # (see _fallback on range())
        rows = start + step * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = rows < end
        ids = tl.load(ids_ptr + rows, mask=valid, other=0)
        loc, acc = _tile(
            ids, valid, cols, ia, ib, ic, idd, na, nb, s0, s1, s2, s3, s4, s5, s6, s7, rot, up, u0, u1, qbase, qtab,
            D, BLOCK_N, BLOCK_D, INDEX, UNK, GENERIC, C0, C1, C2, C3, C4, C5, C6, C7,
        )
        tl.store(loc_ptr + rows, loc, mask=valid)
        total += tl.sum(tl.where(valid[:, None], acc, 0.0), axis=0)
        step += 1
    if MEAN:
        total = total / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + bag * D + cols, _cast_out(total, OUT), mask=cols < D)


# ---------------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class HashIndexView:
    """Raw slots of an open-addressing hash index (the structure the C kernel probes too):
    ``slots int32[cap, 3]`` (12-byte slots, layout in compression/hash_index.py), any ``cap``
    in ``[1, 2**31)`` (1 allowed here, unlike :class:`~compression.hash_index.HashIndex`): the
    home slot's product ``(hash >> 32) * cap`` must fit 64 bits."""

    slots: torch.Tensor
    kind: str = "hash"

    @property
    def capacity(self) -> int:
        cap = int(self.slots.shape[0])
        if not 1 <= cap < 1 << 31:
            raise ValueError(f"hash index capacity must be in [1, 2**31), got {cap}")
        return cap


def _dummy(device: torch.device, dtype: torch.dtype, cache: dict[Any, torch.Tensor]) -> torch.Tensor:
    key = (device, dtype)
    if key not in cache:
        cache[key] = torch.zeros(1, dtype=dtype, device=device)
    return cache[key]


_DUMMIES: dict[Any, torch.Tensor] = {}


def _arg(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A kernel pointer argument: the tensor, or a 1-element stand-in (never read) when empty."""
    if t is None or t.numel() == 0:
        return _dummy(device, dtype, _DUMMIES)
    return t


def index_args(index: Any, device: torch.device) -> tuple[int, tuple[Any, ...]]:
    """``(INDEX kind, (ia, ib, ic, idd, na, nb))`` for an index object, by its ``kind``."""
    i64, i32 = torch.int64, torch.int32
    kind = getattr(index, "kind", None)
    if index is None:
        return RESOLVED, (_arg(None, device, i32),) * 4 + (0, 0)
    if kind == "dense":
        return DENSE, (_arg(index.locator, device, i32), _arg(None, device, i32), _arg(None, device, i64), _arg(None, device, i32), index.locator.numel(), 0)
    if kind == "runs":
        return RUNS, (_arg(index.bounds, device, i64), _arg(index.bases, device, i32), _arg(None, device, i64), _arg(None, device, i32), index.bounds.numel(), 0)
    if kind == "keyed":
        return SORTED, (
            _arg(index.keys, device, i64), _arg(index.locator, device, i32),
            _arg(index.delta_keys, device, i64), _arg(index.delta_locator, device, i32),
            index.keys.numel(), index.delta_keys.numel(),
        )
    if kind == "hash" and getattr(index, "has_static", False):
        parts = index.parts  # one read: a static part and the overflow that go with it
        capacity = HashIndexView(parts.slots).capacity
        packed = parts.static.shape[0] | (parts.pilots.numel() << 32)
        return STATIC_HASH, (_arg(parts.slots, device, i32), _arg(parts.static, device, i32), _arg(parts.pilots, device, torch.int16), _arg(None, device, i32), capacity, packed)
    if kind == "hash":
        capacity = HashIndexView(index.slots).capacity
        return HASH, (_arg(index.slots, device, i32), _arg(None, device, i32), _arg(None, device, i64), _arg(None, device, i32), capacity, 0)
    raise ValueError(f"the Triton decoder has no probe for index kind {kind!r}")


def class_spec(rc: RowClass, rotated: bool) -> int:
    return rc.dim | (rc.bits << 16) | (int(rotated) << 24)


@dataclass
class ClassArgs:
    """The per-table launch arguments that change only when a slab is reallocated."""

    slabs: tuple[torch.Tensor, ...]
    specs: tuple[int, ...]
    rotation_t: torch.Tensor
    classes: tuple[RowClass, ...] = ()
    qtabs: dict[int, torch.Tensor] = field(default_factory=dict)  # by BLOCK_D

    def qtab(self, block_d: int) -> torch.Tensor:
        """``int32 [8, block_d]``: for class ``c`` and column ``j`` of a quantized class, the
        code's byte offset in the row (``4 + j % stride``) | its shift (``(j // stride) * bits``) << 24."""
        if block_d not in self.qtabs:
            tab = torch.zeros((MAX_CLASSES, block_d), dtype=torch.int32)
            j = torch.arange(block_d)
            for c, rc in enumerate(self.classes):
                if rc.quantized:
                    stride = packed_code_bytes(rc.dim, rc.bits)
                    tab[c] = (4 + j % stride) | (((j // stride) * rc.bits) << 24)
            self.qtabs[block_d] = tab.to(self.rotation_t.device)
        return self.qtabs[block_d]


def class_args(slabs: list[torch.Tensor], classes: list[RowClass], rotation: torch.Tensor | None) -> ClassArgs:
    """Typed views of the slabs (fp32 / fp16 element views for 32/16-bit classes, raw bytes
    for quantized ones) and the packed class constants."""
    device = slabs[0].device
    views, specs = [], []
    width = None if rotation is None else rotation.shape[0]
    for slab, rc in zip(slabs, classes, strict=True):
        if rc.dim >= 1 << 16:
            raise ValueError("the Triton decoder takes classes of dim < 65536")
        if slab.numel() == 0 or rc.dim == 0:
            dtype = {32: torch.float32, 16: torch.float16}.get(rc.bits, torch.uint8)
            views.append(_arg(None, device, dtype))
        elif rc.bits == 32:
            views.append(slab.view(torch.float32))
        elif rc.bits == 16:
            views.append(slab.view(torch.float16))
        else:
            assert slab.shape[1] == 4 + packed_code_bytes(rc.dim, rc.bits)
            views.append(slab)
        specs.append(class_spec(rc, width is not None and 0 < rc.dim < width))
    while len(views) < MAX_CLASSES:
        views.append(_arg(None, device, torch.uint8))
        specs.append(0)
    rot_t = _arg(None, device, torch.float32) if rotation is None else rotation.T.to(torch.float32).contiguous()  # fp16 [D, K] -> fp32 R^T [K, D]
    return ClassArgs(tuple(views), tuple(specs), rot_t, tuple(classes))


def unknown_args(unknown: Any, device: torch.device) -> tuple[int, tuple[Any, ...]]:
    """``(UNK code, (tensor, u0, u1))`` for an :class:`~compression.unknown.UnknownPolicy`."""
    kind = "zero" if unknown is None else unknown.kind
    code = UNK_CODES[kind]
    if code == 0:
        return 0, (_arg(None, device, torch.float32), 0, 0)
    if code == 1:
        return 1, (unknown.default.to(device=device, dtype=torch.float32).contiguous(), 0, 0)
    buckets = unknown.buckets.contiguous()
    if code == 2:
        return 2, (buckets, int(buckets.shape[0]), 0)
    a, b = (int(v) for v in unknown.params.tolist())
    return code, (buckets, a, b)


# Tile size (values per program) and warps: defaults chosen so the dense variant compiles
# without register spills for sm_90 (bench/triton_aot.py); bench/gpu.py sweeps them on a GPU.
TILE_VALUES = int(os.environ.get("EMBSERVE_TRITON_TILE", "1024"))
NUM_WARPS = int(os.environ.get("EMBSERVE_TRITON_WARPS", "4"))
# 1: one shared pass for all unrotated quantized classes (_decode_quantized); 0: one pass per class
GENERIC_QUANTIZED = int(os.environ.get("EMBSERVE_TRITON_GENERIC", "1"))


def block_sizes(dim: int, block_n: int | None = None, tile: int | None = None) -> tuple[int, int]:
    """Tile shape: all of the row's columns (next power of two), and enough rows that a tile
    holds about ``tile`` values (registers), at least 2 and at most 64."""
    block_d = max(2, triton.next_power_of_2(dim))
    if block_n is None:
        block_n = max(2, min(64, (tile or TILE_VALUES) // block_d))
    return block_n, block_d


def lookup(
    out: torch.Tensor,
    ids: torch.Tensor,
    index: Any,
    cargs: ClassArgs,
    unknown: Any = None,
    loc: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    generic: bool | None = None,
) -> torch.Tensor:
    """Decode ``ids`` into ``out`` ([n, D] fp32 / fp16 / bf16, contiguous) in one launch and
    return the int32 locators (``-1``: no row; its output row is the unknown policy's).
    ``index`` None means ``ids`` are locators already."""
    n, dim = out.shape
    device = out.device
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    if loc is None:
        loc = torch.empty(n, dtype=torch.int32, device=device)
    if n == 0:
        return loc
    kind, iargs = index_args(index, device)
    ukind, uargs = unknown_args(unknown, device)
    bn, bd = block_sizes(dim, block_n)
    grid = (triton.cdiv(n, bn),)
    with _on(device):
        _lookup_kernel[grid](
            ids, n, out, loc, *iargs, *cargs.slabs, cargs.rotation_t, *uargs, _arg(None, device, torch.uint8), cargs.qtab(bd),
            D=dim, BLOCK_N=bn, BLOCK_D=bd, INDEX=kind, UNK=ukind, OUT=OUT_CODES[out.dtype],
            GENERIC=GENERIC_QUANTIZED if generic is None else int(generic),
            C0=cargs.specs[0], C1=cargs.specs[1], C2=cargs.specs[2], C3=cargs.specs[3],
            C4=cargs.specs[4], C5=cargs.specs[5], C6=cargs.specs[6], C7=cargs.specs[7],
            num_warps=num_warps or NUM_WARPS,
        )
    return loc


def lookup_pooled(
    out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    mode: str,
    index: Any,
    cargs: ClassArgs,
    unknown: Any = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    generic: bool | None = None,
) -> torch.Tensor:
    """Pool the decoded rows of ``ids`` into ``out [bags, D]`` by ``offsets`` (start of each
    bag, ``nn.EmbeddingBag`` style; offsets checked by the caller); returns the locators."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"pooling must be sum or mean, got {mode!r}")
    bags, dim = out.shape
    device = out.device
    n = ids.numel()
    if ids.dtype != torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    starts = offsets.to(device=device, dtype=torch.int64).contiguous()
    ends = torch.cat([starts[1:], torch.full((1,), n, dtype=torch.int64, device=device)])
    loc = torch.empty(n, dtype=torch.int32, device=device)
    if bags == 0:
        return loc
    kind, iargs = index_args(index, device)
    ukind, uargs = unknown_args(unknown, device)
    bn, bd = block_sizes(dim, block_n)
    with _on(device):
        _pooled_kernel[(bags,)](
            ids if n else _arg(None, device, torch.int64), n, starts, ends, out, loc, *iargs, *cargs.slabs, cargs.rotation_t, *uargs,
            _arg(None, device, torch.uint8), cargs.qtab(bd),
            D=dim, BLOCK_N=bn, BLOCK_D=bd, INDEX=kind, UNK=ukind, OUT=OUT_CODES[out.dtype], MEAN=mode == "mean",
            GENERIC=GENERIC_QUANTIZED if generic is None else int(generic),
            C0=cargs.specs[0], C1=cargs.specs[1], C2=cargs.specs[2], C3=cargs.specs[3],
            C4=cargs.specs[4], C5=cargs.specs[5], C6=cargs.specs[6], C7=cargs.specs[7],
            num_warps=num_warps or NUM_WARPS,
        )
    return loc


def _on(device: torch.device) -> Any:
    """Triton launches on the calling thread's current CUDA device: make it the tensors' one
    (a table on ``cuda:1`` looked up from a thread whose current device is 0)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def runs_here(device: torch.device) -> bool:
    """The kernels run on CUDA tensors, and on CPU tensors only under the interpreter."""
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")
