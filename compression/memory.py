"""CPU arrays on transparent huge pages: where a table's randomly read bytes live.

A lookup reads one row of a slab, and one slot of a hash index, at a random place.  With
4 KiB pages a table of tens of MiB spans thousands of pages, more than the TLB holds, so most of
those reads also walk the page table.  On a 2 MiB page they do not: the 1M x 64 8x table of
``bench/lookup.py`` (30 MiB of slabs) looked up 1.09x (1.04..1.13) faster dense and 1.08x-1.10x
keyed with its slabs on huge pages (raw C, 128 batches of 4096, 7 interleaved rounds; the
keyed/dense ratio is unchanged, both gain).

A huge page needs a 2 MiB-aligned address, and the kernel aligns an anonymous mapping only when
its length is a multiple of 2 MiB.  So :func:`empty` maps 2 MiB of address space more than the
array, starts the array at its first 2 MiB boundary and advises ``MADV_HUGEPAGE`` over the
array's whole 2 MiB chunks only: the slack before and after it is never touched, so never
resident, and the bytes the process holds stay the array's own to within a 4 KiB page (what
``nbytes`` reports).  Where the kernel has transparent huge pages off, or for ``madvise`` only
and no advice given, the same layout runs on ordinary pages.

``EMBSERVE_HUGE_PAGES=0`` turns this off (ordinary ``torch.empty``), for hosts where
huge-page compaction stalls matter more than lookup speed.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

HUGE_PAGE = 2 << 20  # arrays at least this large are mapped for huge pages on CPU


def huge_pages_enabled() -> bool:
    """Whether :func:`empty` maps for huge pages (``EMBSERVE_HUGE_PAGES``, default on)."""
    return os.environ.get("EMBSERVE_HUGE_PAGES", "1").strip().lower() not in ("0", "false", "no", "off")


def _mappable(nbytes: int) -> bool:
    return nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS") and huge_pages_enabled()


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialized contiguous tensor; on CPU, 2 MiB or more starts on a 2 MiB boundary of
    a mapping advised ``MADV_HUGEPAGE`` (module docstring).  The tensor keeps the mapping alive."""
    device = torch.device(device)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if device.type != "cpu" or not _mappable(nbytes):
        return torch.empty(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE  # to the first 2 MiB boundary
    try:  # only the array's whole 2 MiB chunks: a huge page past its end would be resident slack
        buf.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # THP disabled or unsupported: ordinary pages, same layout
        pass
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=start).view(shape)


def on_huge_mapping(t: torch.Tensor) -> bool:
    """Whether ``t`` already sits where :func:`empty` would put it (a CPU array of 2 MiB or more
    starting on a 2 MiB boundary), so :func:`adopt` leaves it as it is."""
    return t.device.type == "cpu" and t.data_ptr() % HUGE_PAGE == 0


def adopt(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy of it in :func:`empty` memory when it is a CPU array large enough
    for huge pages that is not on such a mapping yet (slabs read from a file or built by torch
    ops); the copy is made once, when a table takes the array."""
    if t.device.type != "cpu" or not _mappable(t.numel() * t.element_size()) or on_huge_mapping(t):
        return t
    out = empty(tuple(t.shape), t.dtype)
    out.copy_(t)
    return out
