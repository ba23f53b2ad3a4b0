"""The compressed embedding table: row classes with slabs, an ID index, rotation, fallback.

Memory picture of one table (every byte of it is counted in :attr:`CompressedTable.nbytes`):

    index      DenseIndex: int32 locator [N]          KeyedIndex: int64 keys + int32 locator
               HashIndex: [cap] packed 12-byte slots, int64 key + int32 locator, open addressing (compression.hash_index)
               RunIndex: int64 bounds [R+1] + int32 bases [R] (class-grouped dense IDs)
    class k    uint8 slab [capacity_k, row_bytes_k]   (layout: compression.layout)
               int32 free-slot stack [<= capacity_k]
               fp16 codebook [m, 2**k, dim/m]          product-quantization classes only
    rotation   fp16 [D, K]  (K = widest truncated class; older files: fp32 [D, D])
                                                       only when some class has 0 < dim < D
    lifecycle  int32 [depth, width] counts + int64 [2]  keyed tables with max_ids / admission

Rows of full-dimension classes are stored as they are; rows of truncated classes (0 < dim < D)
are stored in the rotated basis ``y = x @ R`` and keep their first ``dim`` coordinates, so
decoding them is ``y[:dim] @ R[:, :dim]^T`` - ``dim * D`` multiply-adds per row, paid only by
the rows that were truncated (rotating every row would cost ``D * D`` each).  Only the first
``K`` columns of ``R`` are ever read (``K`` = the widest truncated class), so only those are
stored, in fp16: at D = 384 and K = 192 that is 147 KB instead of the 590 KB of a full fp32
``R``, which matters when the whole budget is a few MB.
    unknown    by policy: fp32 [D] default, fp16 [K, D] hash buckets, or the fp16 tables of a
               QR / binary-code hash embedding (compression.unknown)

Rows move between classes (precision / dimension changes) by being written into a free slot
of the new class, the index repointed, and the old slot pushed on the old class's free stack.
Slabs grow by doubling.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from . import codecs, memory, pq
from .hash_index import HashIndex
from .index import DenseIndex, IdIndex, KeyedIndex, RunIndex
from .kernels import Decoder, cpu_c
from .lifecycle import IdLifecycle
from .layout import LOCATOR_CLASS_SHIFT, LOCATOR_SLOT_MASK, MAX_CLASSES, MAX_SLOTS_PER_CLASS, RowClass
from .pooling import PoolingMode, pool_bags, validate_offsets
from .unknown import UnknownPolicy

Backend = Literal["auto", "torch", "compiled", "triton"]


# Per-ID lookup status, as the binary wire format carries it (service.wire).
STATUS_UNKNOWN, STATUS_FOUND, STATUS_PRUNED = 0, 1, 2


_INT32 = torch.empty(0, dtype=torch.int32)  # new_empty's prototype for locator arrays
_BOOL = torch.empty(0, dtype=torch.bool)  # and for pruned masks


def locator_tensor(raw: bytearray) -> torch.Tensor:
    """The int32 locators the compiled entry returned as bytes (native order), as a tensor over
    the same memory (frombuffer keeps the bytearray alive; it rejects an empty one)."""
    return torch.frombuffer(raw, dtype=torch.int32) if raw else _INT32.new_empty(0)


class LookupResult:
    """What a lookup returns: the rows, which IDs had one, and how many did not.

    ``locators`` (int32 [n], -1 where the ID has no row) is made on first use when the lookup
    handed over raw bytes instead (``locator_bytes``: the compiled entry's bytearray of native
    int32s): most callers read only ``values`` and ``num_unknown``, and at batch 1 building the
    tensor up front was a quarter of ``CompressedTable.lookup``.  Slots: one is built per lookup."""

    __slots__ = ("values", "_locators", "_locator_bytes", "num_unknown", "pruned", "num_pruned")

    def __init__(self, values: torch.Tensor, locators: torch.Tensor | None, num_unknown: int, pruned: torch.Tensor | None = None,
                 num_pruned: int = 0, *, locator_bytes: bytearray | None = None) -> None:
        if locators is None and locator_bytes is None:
            raise ValueError("a LookupResult needs locators or locator_bytes")
        self.values = values  # [n, D], or [bags, D] when pooled; float32 unless a dtype was asked for
        self._locators = locators
        self._locator_bytes = locator_bytes
        self.num_unknown = num_unknown
        # bool [n]: the ID's row was pruned (a dim-0 class: stored nothing) and the unknown-ID
        # policy served it, like an unknown ID; None when the table has no dim-0 class
        self.pruned = pruned
        self.num_pruned = num_pruned

    @property
    def locators(self) -> torch.Tensor:
        """int32 [n]: each ID's locator (compression/layout.py), -1 where it has no row."""
        if self._locators is None:
            self._locators = locator_tensor(self._locator_bytes)  # type: ignore[arg-type]
            self._locator_bytes = None
        return self._locators

    def __repr__(self) -> str:
        return f"LookupResult(values={tuple(self.values.shape)}, num_unknown={self.num_unknown}, num_pruned={self.num_pruned})"

    @property
    def found(self) -> torch.Tensor:
        """bool [n]: the table served the ID's own row (not unknown, not pruned)."""
        found = self.locators >= 0
        return found if self.pruned is None else found & ~self.pruned

    @property
    def status(self) -> torch.Tensor:
        """uint8 [n]: 0 = unknown, 1 = found, 2 = pruned (served by the unknown-ID policy)."""
        status = (self.locators >= 0).to(torch.uint8)
        if self.pruned is not None:
            status[self.pruned] = STATUS_PRUNED
        return status


@dataclass
class ClassStats:
    row_class: RowClass
    rows: int
    capacity: int
    bytes: int


@dataclass
class TableStats:
    dim: int
    num_ids: int
    index_kind: str
    nbytes: int
    index_bytes: int
    row_bytes: int
    other_bytes: int
    classes: list[ClassStats] = field(default_factory=list)

    @property
    def bits_per_parameter(self) -> float:
        params = self.num_ids * self.dim
        return 8.0 * self.nbytes / params if params else 0.0

    @property
    def compression_ratio(self) -> float:
        """fp32 bytes of the same rows divided by what this table really holds."""
        return (4.0 * self.num_ids * self.dim) / self.nbytes if self.nbytes else 0.0


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite.  On the CPU through numpy: ``torch.isfinite(t).all()``
    took 2.1 ms for 10k x 64 float32 rows against numpy's 0.16 ms (torch 2.13, one thread) -
    about 5% of the applier's time on a stream of 10k-row updates."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for a GPU goes through pinned memory with a
    non-blocking copy, so the host does not wait for the device to drain its queue."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _stack_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class PutPlan:
    """A put planned before it is written (CompressedTable.plan_put): its distinct IDs (on the
    device) and their target classes, the IDs' old locators (on the device and downloaded),
    their old classes, and per target class (class, rows that stay in it, rows new to it, their
    positions in the put, their encoded bytes)."""

    ids_dev: torch.Tensor
    target: torch.Tensor
    old_dev: torch.Tensor
    old: torch.Tensor
    old_cls: torch.Tensor
    per_class: list[tuple[int, int, int, torch.Tensor, torch.Tensor]]


@dataclass
class _StagedPut:
    """A put written beside the lookups by a sole writer (CompressedTable._stage_put), waiting to
    be published under the lock: the slabs, counts and free lists it leaves (a grown slab is a
    new tensor; fresh rows are already in their slots, which no locator points at yet), the
    rewrites of rows that stay in their class (live rows: written under the lock), and a copy of
    the index pointing every ID where it now lives."""

    slabs: list[torch.Tensor]
    used: list[int]
    free: list[torch.Tensor]
    stays: list[tuple[int, torch.Tensor, torch.Tensor]]
    index: Any


class CompressedTable:
    """``ids -> float32 [n, D]`` over rows stored in mixed (dim, bits) classes."""

    def __init__(
        self,
        dim: int,
        classes: list[RowClass],
        slabs: list[torch.Tensor],
        used: list[int],
        index: IdIndex,
        free: list[torch.Tensor] | None = None,
        rotation: torch.Tensor | None = None,
        unknown: UnknownPolicy | None = None,
        backend: Backend = "auto",
        codebooks: list[torch.Tensor | None] | None = None,
        lifecycle: IdLifecycle | None = None,
    ) -> None:
        if not 0 < len(classes) <= MAX_CLASSES:
            raise ValueError(f"a table has 1..{MAX_CLASSES} row classes, got {len(classes)}")
        if len(set(classes)) != len(classes):
            raise ValueError("row classes must be distinct")
        for rc in classes:
            if rc.dim > dim:
                raise ValueError(f"class {rc.label()} is wider than the table ({dim})")
        for rc, slab in zip(classes, slabs, strict=True):
            if slab.dtype != torch.uint8 or slab.dim() != 2 or slab.shape[1] != rc.row_bytes:
                raise ValueError(f"slab of {rc.label()} must be uint8 [capacity, {rc.row_bytes}]")
        codebooks = [None if cb is None else cb.contiguous() for cb in codebooks] if codebooks is not None else [None] * len(classes)
        if len(codebooks) != len(classes):
            raise ValueError("one codebook entry (None for scalar classes) per row class")
        for rc, cb in zip(classes, codebooks, strict=True):
            pq.check_codebook(rc, cb)
        if rotation is not None:
            widest = max((rc.dim for rc in classes if 0 < rc.dim < dim), default=0)
            if rotation.dim() != 2 or rotation.shape[0] != dim or not widest <= rotation.shape[1] <= dim:
                raise ValueError(f"rotation must be [{dim}, K] with {widest} <= K <= {dim}")
            if rotation.dtype not in (torch.float16, torch.float32):
                raise ValueError("rotation must be fp16 (or fp32, as older files hold it)")
        for c, (slab, u) in enumerate(zip(slabs, used, strict=True)):
            if not 0 <= u <= slab.shape[0]:
                raise ValueError(f"class {classes[c].label()}: {u} slots used of a {slab.shape[0]}-row slab")
        self.dim = dim
        self.classes = list(classes)
        # a slab of 2 MiB or more lives on huge pages (compression.memory: random row reads
        # then rarely miss the TLB); one read from a file or built by torch ops is copied there once
        self.slabs = [memory.adopt(slab) for slab in slabs]
        self.used = list(used)
        self.free = free if free is not None else [torch.empty(0, dtype=torch.int32, device=s.device) for s in slabs]
        self.index = index
        if rotation is not None:
            # keep only the columns a truncated class reads, in fp16 (an old file's fp32 [D, D]
            # is narrowed here: what the process holds, and writes back, is the new form)
            widest = max((rc.dim for rc in classes if 0 < rc.dim < dim), default=0)
            rotation = rotation[:, :widest].to(torch.float16).contiguous() if widest else None
        self.rotation = rotation
        # fp16 [m, 2**k, dim/m] per PQ class, None for scalar classes; fixed once built (rows
        # upserted later are assigned to the nearest existing centroids)
        self.codebooks: list[torch.Tensor | None] = codebooks
        self.unknown = unknown if unknown is not None else UnknownPolicy("zero")
        if lifecycle is not None and not isinstance(index, HashIndex):
            raise ValueError("max_ids and admission need a hash-indexed keyed table")
        self.lifecycle = lifecycle  # admission and capacity (compression.lifecycle); saved with the table
        # what the allocator minimized when it built the table ("l2" / "cosine" / "knn"), kept in
        # the manifest so a rebuild can use the same; None when built otherwise
        self.objective: str | None = None
        self._check_locators()
        self.decoder = Decoder(self.slabs, self.classes, backend, rotation, self.codebooks)
        # which class indices are pruned (dim 0), looked up by locator; None when none is
        self._pruned_classes: torch.Tensor | None = None
        if any(rc.dim == 0 for rc in self.classes):
            flags = [rc.dim == 0 for rc in self.classes] + [False] * (MAX_CLASSES - len(self.classes))
            self._pruned_classes = torch.tensor(flags, dtype=torch.bool, device=self.device)
        # Writers hold this while they change slabs or the index; lookups take it too, so a
        # lookup sees a write batch all or nothing.  Decoding itself releases the GIL.
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(
        cls,
        dim: int,
        classes: list[RowClass],
        keyed: bool = True,
        device: torch.device | str = "cpu",
        rotation: torch.Tensor | None = None,
        unknown: UnknownPolicy | None = None,
        codebooks: list[torch.Tensor | None] | None = None,
    ) -> "CompressedTable":
        dev = torch.device(device)
        index: IdIndex
        if keyed:
            index = HashIndex.empty(device=dev)
        else:
            index = DenseIndex(torch.empty(0, dtype=torch.int32, device=dev))
        slabs = [torch.empty((0, rc.row_bytes), dtype=torch.uint8, device=dev) for rc in classes]
        return cls(dim, classes, slabs, [0] * len(classes), index, rotation=rotation, unknown=unknown, codebooks=codebooks)

    def _check_locators(self) -> None:
        """Every locator must name a used slot of an existing class: the compiled decoder reads
        slab memory at whatever a locator says, so a corrupt file must fail here, at load."""
        _, locs = self.index.live_items()
        if locs.numel():
            cls = (locs >> LOCATOR_CLASS_SHIFT).to(torch.int64)
            slots = (locs & LOCATOR_SLOT_MASK).to(torch.int64)
            if int(cls.max()) >= len(self.classes):
                raise ValueError("a locator names a row class the table does not have")
            limits = torch.tensor(self.used, dtype=torch.int64, device=locs.device)[cls]
            if bool((slots >= limits).any()):
                raise ValueError("a locator points past the used slots of its class")
        for c, free in enumerate(self.free):
            if free.numel() and (int(free.min()) < 0 or int(free.max()) >= self.used[c]):
                raise ValueError(f"free list of class {self.classes[c].label()} holds slots it never used")

    @property
    def device(self) -> torch.device:
        return self.slabs[0].device

    # ------------------------------------------------------------------ lookup

    @property
    def backend(self) -> str:
        return self.decoder.backend

    @backend.setter
    def backend(self, value: Backend) -> None:
        self.decoder.backend = value
        self.decoder.refresh(self.slabs)

    def lookup(self, ids: torch.Tensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> LookupResult:
        """Decode the rows of ``ids`` (int64 ``[n]``); unknown IDs get the fallback row.

        ``dtype`` (fp32, fp16, bf16): the Triton path writes it directly, others cast.
        ``out``: a float32 ``[n, D]`` contiguous tensor on the table's device to decode into (a
        view of a response buffer, so the service sends the rows without copying them)."""
        if (dtype is torch.float32 and (self._pruned_classes is None or cpu_c.ENTRY_PRUNED) and self.decoder.entry_classes is not None
                and ids.dtype is torch.int64 and ids.dim() == 1 and ids.is_cpu):
            # the common call through the compiled decoder's CPython entry (kernels/pyentry.c),
            # with nothing else around it: at batch 1 the Python and torch calls around the
            # decode were two thirds of the lookup (bench/results/lookup.md, the per-call row).
            # Falls through to the general way when the table is not on that path (checked
            # again under the lock) or ``out`` is bad (the general way says why).
            n = ids.shape[0]
            if out is None:
                values = torch.empty(n, self.dim)
            elif out.dtype is torch.float32 and out.is_cpu and out.is_contiguous() and out.shape == (n, self.dim):
                values = out
            else:
                values = None
            if values is not None:
                if not ids.is_contiguous():
                    ids = ids.contiguous()
                with self.lock:
                    # read under the lock: a writer growing a slab refreshes the decoder's class
                    # array, and a rehash replaces the index's arrays
                    classes_c = self.decoder.entry_classes
                    view = None if classes_c is None else self.index.c_view()
                    if view is not None:
                        # the decode, by addresses; the locators come back as a bytearray, a
                        # tensor only if asked for (LookupResult.locators)
                        num_unknown, loc_bytes = cpu_c.ENTRY.lookup_loc(
                            ids.data_ptr(), n, view.address, classes_c.address, values.data_ptr(), self.dim,
                            torch.get_num_threads() if n >= cpu_c.PARALLEL_MIN_ROWS else 1,
                        )
                if view is not None:
                    if self._pruned_classes is None and not (num_unknown and self.unknown.kind != "zero"):
                        return LookupResult(values, None, num_unknown, locator_bytes=loc_bytes)
                    loc = locator_tensor(loc_bytes)
                    pruned, num_pruned = None, 0
                    if self._pruned_classes is not None:
                        # a dim-0 row stores nothing: the decoder wrote zeros, the unknown-ID
                        # policy serves it (the mask in one C pass: as torch ops it cost as
                        # much as a 16x table's decode, bench/results/lookup.md)
                        pruned = _BOOL.new_empty(n)
                        num_pruned = cpu_c.ENTRY.pruned(loc.data_ptr(), n, classes_c.address, pruned.data_ptr())
                    if (num_unknown or num_pruned) and self.unknown.kind != "zero":  # the decoder wrote zeros for them
                        self.unknown.fill(values, ids, (loc < 0) if pruned is None else (loc < 0) | pruned)
                    return LookupResult(values, loc, num_unknown, pruned, num_pruned)
        # each torch op costs microseconds; at batch 1 they are the whole bill, so skip the no-ops
        device = self.slabs[0].device
        if ids.dtype is not torch.int64 or ids.device != device:
            ids = ids.to(device=device, dtype=torch.int64)
        if ids.dim() != 1:
            ids = ids.reshape(-1)
        if out is not None and (out.dtype is not torch.float32 or out.shape != (ids.shape[0], self.dim) or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous float32 [{ids.shape[0]}, {self.dim}] tensor")
        if out is not None and dtype is not torch.float32:
            raise ValueError("out is for float32 answers; other dtypes are returned")
        with self.lock:
            direct = out is None and self.decoder.writes(dtype)
            values = torch.empty((ids.shape[0], self.dim), dtype=dtype if direct else torch.float32, device=device) if out is None else out
            loc, num_unknown = self.decoder.lookup(values, ids, self.index, self.unknown)
        pruned, num_pruned = None, 0
        if self._pruned_classes is not None:
            # a dim-0 row stores nothing: the decoders wrote zeros, the unknown-ID policy serves it
            pruned = (loc >= 0) & self._pruned_classes[(loc >> LOCATOR_CLASS_SHIFT).clamp(min=0).long()]
            num_pruned = int(pruned.sum())
        fill_unknown = bool(num_unknown) and not self.decoder.fills_unknown
        if fill_unknown or num_pruned:
            mask = (loc < 0) if fill_unknown else torch.zeros_like(loc, dtype=torch.bool)
            self.unknown.fill(values, ids, mask if pruned is None else mask | pruned)
        if values.dtype != dtype:
            values = values.to(dtype)
        return LookupResult(values, loc, num_unknown, pruned, num_pruned)

    def lookup_to_buffer(self, ids: bytes | bytearray | memoryview, ids_offset: int, n: int, answer: bytearray, rows_offset: int,
                         status_offset: int, dtype: torch.dtype = torch.float32) -> int | None:
        """Decode the ``n`` int64 IDs (native byte order: little-endian on every host the C
        decoder builds for) at ``ids[ids_offset:]`` - a request body as it came - straight into
        ``answer``, a response buffer: rows ``[n, D]`` of ``dtype`` (float32, fp16 or bf16: the
        16-bit ones rounded to nearest even in C, as torch's conversion rounds finite values) at
        ``rows_offset`` and one status byte per ID at ``status_offset`` (1 the ID's row, 0
        unknown: its row is the unknown-ID policy's).  One C call, no tensor, no copy of the IDs:
        a server's small answers (service/routers/lookup.py).  Returns the unknown count, or None
        - nothing written - when the table is not on the compiled path, has a pruned class, or
        the compiled entry cannot write ``dtype`` (call :meth:`lookup`)."""
        if self._pruned_classes is not None or (dtype is not torch.float32 and not cpu_c.ENTRY_NARROW):
            return None
        with self.lock:
            classes_c = self.decoder.entry_classes
            view = None if classes_c is None else self.index.c_view()
            if view is None:
                return None
            num_unknown = cpu_c.lookup_answer(ids, ids_offset, n, view, classes_c, answer, rows_offset, self.dim, status_offset, dtype)
        if num_unknown:
            # the policy's rows, cast to dtype by torch (for 16 bits: the same rounding, once)
            values = torch.frombuffer(answer, dtype=dtype, count=n * self.dim, offset=rows_offset).view(n, self.dim)
            unknown = torch.frombuffer(answer, dtype=torch.uint8, count=n, offset=status_offset) == 0
            id_tensor = torch.tensor(memoryview(ids)[ids_offset : ids_offset + 8 * n].cast("q"), dtype=torch.int64)
            self.unknown.fill(values, id_tensor, unknown)
        return num_unknown

    def lookup_bags(self, ids: torch.Tensor, offsets: torch.Tensor, mode: PoolingMode, dtype: torch.dtype = torch.float32) -> LookupResult:
        """Pool rows into bags given by ``offsets`` (start of each bag, like ``nn.EmbeddingBag``).
        On the Triton path decode and pooling are one launch."""
        if self.decoder.fused_pooling and self._pruned_classes is None:  # pruned rows need the fallback, per row
            if mode not in ("sum", "mean"):
                raise ValueError(f"pooling must be one of ('sum', 'mean'), got {mode!r}")
            ids = ids.to(device=self.device, dtype=torch.int64).reshape(-1)
            offsets = offsets.to(torch.int64)
            validate_offsets(offsets, int(ids.shape[0]))
            with self.lock:
                values = torch.empty((offsets.numel(), self.dim), dtype=dtype, device=self.device)
                loc, num_unknown = self.decoder.lookup_pooled(values, ids, offsets.to(self.device), mode, self.index, self.unknown)
            return LookupResult(values, loc, num_unknown)
        result = self.lookup(ids)
        pooled = pool_bags(result.values, offsets.to(result.values.device), mode)
        return LookupResult(
            pooled if pooled.dtype == dtype else pooled.to(dtype), result.locators, result.num_unknown, result.pruned, result.num_pruned,
        )

    # ------------------------------------------------------------------ writes

    def _take_slots(self, c: int, k: int, slabs: list[torch.Tensor], used: list[int], free: list[torch.Tensor]) -> torch.Tensor:
        """Pop ``k`` free slots of class ``c`` from ``free`` / ``used``, growing its slab by
        doubling when needed (a new tensor in ``slabs``).  The lists are the table's own, or a
        staged put's copies of them."""
        lst = free[c]
        reuse = min(k, lst.numel())
        taken = lst[lst.numel() - reuse :]
        free[c] = lst[: lst.numel() - reuse].clone()
        fresh = k - reuse
        start = used[c]
        if start + fresh > MAX_SLOTS_PER_CLASS:
            raise ValueError(f"class {self.classes[c].label()} is full ({MAX_SLOTS_PER_CLASS} rows)")
        if start + fresh > slabs[c].shape[0]:
            slabs[c] = self._grown_slab(slabs[c], start, start + fresh)
        used[c] = start + fresh
        new = torch.arange(start, start + fresh, dtype=torch.int32, device=self.device)
        return torch.cat([taken.to(torch.int32), new])

    def _max_ids(self) -> int | None:
        """The ID count this table evicts at (its lifecycle's ``max_ids``), if any."""
        return None if self.lifecycle is None else self.lifecycle.config.max_ids

    def _grown_slab(self, slab: torch.Tensor, used: int, need: int) -> torch.Tensor:
        """A copy of ``slab``'s first ``used`` rows in a slab of at least ``need`` rows: doubling,
        and no more than ``max_ids`` rows where the table evicts there (it never holds more)."""
        capacity = min(MAX_SLOTS_PER_CLASS, max(need, 2 * slab.shape[0], 16))
        max_ids = self._max_ids()
        if max_ids is not None:
            capacity = min(capacity, max(need, max_ids))
        grown = memory.empty((capacity, slab.shape[1]), torch.uint8, slab.device)
        grown[:used] = slab[:used]
        return grown

    def reserve(self, plan: PutPlan, leaving: torch.Tensor | None = None) -> None:
        """Grow now, beside the lookups, the slabs and the index that committing ``plan`` would
        grow under :attr:`lock`, so that the commit's hold is the writes alone (a log entry that
        doubled a 30 MiB slab held lookups ~12 ms, bench/redecide_stall.py).  Between
        :meth:`plan_put` and :meth:`commit_put`, by the caller that keeps other writers out
        (as for the plan); takes :attr:`lock` only to swap the grown arrays in.

        ``leaving``: IDs the caller deletes before the commit (a log entry's evicted IDs), whose
        rows free slots, and whose overflow entries free room, that the commit takes first:
        counting them keeps a table at ``max_ids`` from growing for rows or index room it does
        not need.  Sizing is conservative (an evicted ID's static slot is not counted as room);
        should it still fall short, the commit grows whatever it must."""
        held_leaving = torch.empty(0, dtype=torch.int32)
        gone = torch.empty(0, dtype=torch.int64)
        if leaving is not None and leaving.numel():
            gone = torch.unique(leaving.to(device=self.device, dtype=torch.int64).reshape(-1))
            old = self.index.resolve(gone).cpu()
            held_leaving = old[old >= 0]
        freed = torch.bincount((held_leaving >> LOCATOR_CLASS_SHIFT).to(torch.int64), minlength=len(self.classes)).tolist()
        slabs: dict[int, torch.Tensor] = {}
        for c, _, n_fresh, _, _ in plan.per_class:
            need = self.used[c] + max(0, n_fresh - self.free[c].numel() - freed[c])
            if need > self.slabs[c].shape[0]:
                slabs[c] = self._grown_slab(self.slabs[c], self.used[c], need)
        index: Any = None
        if isinstance(self.index, HashIndex):
            # the IDs new at the commit (an ID that leaves and comes back in the same entry is
            # new again), less the overflow room the leaving IDs free first
            fresh = int((plan.old < 0).sum())
            if held_leaving.numel():
                back = plan.ids_dev[plan.old_dev >= 0]  # held now: new at the commit if they also leave (gone is sorted)
                at = torch.searchsorted(gone, back).clamp_(max=gone.numel() - 1)
                fresh += int((gone[at] == back).sum()) - (held_leaving.numel() - self.index.static_held(gone))
            index = self.index.grown(max(0, fresh), self._max_ids())
        elif type(self.index) is DenseIndex and plan.ids_dev.numel():
            index = self.index.grown(int(plan.ids_dev.max()) + 1)
        if not slabs and index is None:
            return
        with self.lock:
            for c, slab in slabs.items():
                self.slabs[c] = slab
            if index is not None:
                self.index.take(index)
            if slabs:
                self.decoder.refresh(self.slabs)

    @staticmethod
    def _release(locators: torch.Tensor, free: list[torch.Tensor]) -> None:
        """Append the slots of ``locators`` (``-1`` skipped) to the free lists ``free``."""
        locators = locators[locators >= 0]
        if locators.numel() == 0:
            return
        cls = locators >> LOCATOR_CLASS_SHIFT
        for c in torch.unique(cls).tolist():
            slots = (locators[cls == c] & LOCATOR_SLOT_MASK).to(torch.int32)
            free[c] = torch.cat([free[c], _upload(slots, free[c].device)])

    def rotation_columns(self, k: int) -> torch.Tensor:
        """The first ``k`` columns of the rotation as fp32 ``[D, k]`` (what encoding multiplies by)."""
        assert self.rotation is not None
        return self.rotation[:, :k].to(torch.float32)

    def truncated(self, c: int) -> bool:
        """Class ``c`` keeps some but not all coordinates, so it stores rows in the rotated basis."""
        return self.rotation is not None and 0 < self.classes[c].dim < self.dim

    def put(self, ids: torch.Tensor, rows: torch.Tensor, class_index: torch.Tensor | int, *, sole_writer: bool = False) -> None:
        """Upsert ``rows`` (float ``[n, D]``, original coordinates) for ``ids``, each into class
        ``class_index``.  A later duplicate ID in one call wins.

        The bookkeeping (which rows go where: shapes that depend on the data) is planned on the
        host from one download of the old locators; the device then gets, per class, one
        encode and one scatter of the whole batch into the slab, fed by non-blocking uploads.
        On a GPU that is one device sync per batch (plus the index's own), where planning with
        device tensors cost several per class (every boolean mask and ``.tolist()`` waits).

        ``sole_writer``: the caller guarantees that nothing else writes the table meanwhile (a
        service re-decision moving rows), so the plan, the encoding and (hash and dense indexes)
        the writing are done outside :attr:`lock`, with lookups going on: new rows go into slots
        no locator points at (a grown slab is a new tensor), the index is written in a copy, and
        the lock is held only to publish them (swap the slabs and the index, rewrite rows that
        stay in their class).  Lookups see every row of the put in its old place or every one in
        its new."""
        if sole_writer:
            plan = self.plan_put(ids, rows, class_index)
            staged = self._stage_put(plan) if self._index_copies() else None
            with self.lock:
                if staged is None:
                    self._commit_put(plan)
                else:
                    self._publish(staged)
        else:
            args = self._put_args(ids, rows, class_index)
            with self.lock:
                self._commit_put(self._plan_put(*args))

    def plan_put(self, ids: torch.Tensor, rows: torch.Tensor, class_index: torch.Tensor | int) -> PutPlan:
        """Everything of :meth:`put` that only reads the table: checks, duplicates, which rows go
        where, and the encoding, done with lookups going on; :meth:`commit_put` writes it.  The
        plan is valid while nothing else writes the table: the caller keeps other writers out
        from here to the commit (the service's per-table write lock does), or holds :attr:`lock`."""
        return self._plan_put(*self._put_args(ids, rows, class_index))

    def commit_put(self, plan: PutPlan) -> None:
        """Write a put planned by :meth:`plan_put` (under :attr:`lock`, which it takes: a caller
        holding it may make more writes part of the same change for lookups)."""
        with self.lock:
            self._commit_put(plan)

    def _put_args(self, ids: torch.Tensor, rows: torch.Tensor, class_index: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A put's checked arguments: its distinct IDs (the last occurrence wins) on the device,
        their float32 rows on the device and their target classes."""
        ids = ids.to(device="cpu", dtype=torch.int64).reshape(-1)
        if rows.shape != (ids.numel(), self.dim):
            raise ValueError(f"rows must be [{ids.numel()}, {self.dim}], got {list(rows.shape)}")
        if not all_finite(rows):
            raise ValueError("rows must be finite")
        target = torch.as_tensor(class_index, dtype=torch.int64).to("cpu").expand(ids.numel())
        if ids.numel() and (int(target.min()) < 0 or int(target.max()) >= len(self.classes)):
            raise ValueError("class index out of range")
        # keep the last occurrence of each ID
        uniq, inverse = torch.unique(ids, return_inverse=True)
        last = torch.full((uniq.numel(),), -1, dtype=torch.int64)
        last.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amax")
        ids, target = ids[last], target[last]
        rows = _upload(rows[last.to(rows.device)].to(torch.float32), self.device)
        return _upload(ids, self.device), rows, target

    def _plan_put(self, ids_dev: torch.Tensor, rows: torch.Tensor, target: torch.Tensor) -> PutPlan:
        """Where each row of a put goes and its encoded bytes (reads the table, writes nothing)."""
        old_dev = self.index.resolve(ids_dev)
        old = old_dev.cpu()  # the one download the plan needs
        old_cls = torch.where(old >= 0, old >> LOCATOR_CLASS_SHIFT, torch.full_like(old, -1))
        per_class = []
        for c in torch.unique(target).tolist():
            stay = torch.nonzero((target == c) & (old_cls == c)).flatten()
            fresh = torch.nonzero((target == c) & (old_cls != c)).flatten()
            sel = _upload(torch.cat([stay, fresh]), self.device)
            x = rows[sel] @ self.rotation_columns(self.classes[c].dim) if self.truncated(c) else rows[sel]
            encoded = codecs.encode_rows(x, self.classes[c], codebook=self.codebooks[c])
            per_class.append((c, int(stay.numel()), int(fresh.numel()), sel, encoded))
        return PutPlan(ids_dev, target, old_dev, old, old_cls, per_class)

    def _write_rows(self, plan: PutPlan, slabs: list[torch.Tensor], used: list[int], free: list[torch.Tensor],
                    stays: list[tuple[int, torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
        """The rows of a planned put into ``slabs``: rows new to a class into slots taken from
        ``free`` / ``used`` (:meth:`_take_slots`), rows that stay in their class into their own
        slots, or into ``stays`` when it is given (live rows, which a sole writer rewrites under
        the lock); the moved rows' old slots go back to ``free``.  Returns the new locators."""
        new_loc = plan.old_dev.clone()  # rows staying in their class keep their locator
        for c, n_stay, n_fresh, sel, encoded in plan.per_class:
            taken = self._take_slots(c, n_fresh, slabs, used, free)  # on the device, sized on the host
            if encoded.shape[1]:
                own = (plan.old_dev[sel[:n_stay]] & LOCATOR_SLOT_MASK).to(torch.int64)
                if stays is None:
                    slabs[c].index_copy_(0, torch.cat([own, taken.to(torch.int64)]), encoded)  # one scatter per class
                else:
                    if n_stay:
                        stays.append((c, own, encoded[:n_stay]))
                    slabs[c].index_copy_(0, taken.to(torch.int64), encoded[n_stay:])
            new_loc[sel[n_stay:]] = (c << LOCATOR_CLASS_SHIFT) | taken
        moved = (plan.old >= 0) & (plan.old_cls != plan.target)
        self._release(plan.old[moved], free)
        return new_loc

    def _commit_put(self, plan: PutPlan) -> None:
        """Write a planned put (under the lock)."""
        before = list(self.slabs)
        new_loc = self._write_rows(plan, self.slabs, self.used, self.free, stays=None)
        if any(new is not old for new, old in zip(self.slabs, before, strict=True)):
            self.decoder.refresh(self.slabs)  # a slab grew
        self._assign(self.index, plan.ids_dev, new_loc)

    def _index_copies(self) -> bool:
        """Whether the index can be written in a copy and swapped in (hash and plain dense)."""
        return isinstance(self.index, HashIndex) or type(self.index) is DenseIndex

    def _assign(self, index: Any, ids: torch.Tensor, locators: torch.Tensor) -> None:
        if isinstance(index, HashIndex) and self._max_ids() is not None:
            # a table that evicts at max_ids never holds more: growth stops at capacity_for(max_ids, CHURN_LOAD)
            index.assign(ids, locators, max_ids=self._max_ids())
        else:
            index.assign(ids, locators)

    def _stage_put(self, plan: PutPlan) -> _StagedPut:
        """Write a planned put beside the lookups (a sole writer, outside the lock): fresh rows
        into slots no locator points at (free ones, or past ``used``, in a grown copy of the slab
        when it must grow), the new locators into a copy of the index.  Rows that stay in their
        class are live: they are kept for :meth:`_publish`."""
        slabs, used, free = list(self.slabs), list(self.used), list(self.free)
        stays: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        new_loc = self._write_rows(plan, slabs, used, free, stays)
        index = self.index.copy()
        self._assign(index, plan.ids_dev, new_loc)
        return _StagedPut(slabs, used, free, stays, index)

    def _publish(self, staged: _StagedPut) -> None:
        """Make a staged write the table's (under the lock; nothing was written since it was staged)."""
        replaced = any(new is not old for new, old in zip(staged.slabs, self.slabs, strict=True))
        self.slabs[:] = staged.slabs
        self.used[:] = staged.used
        self.free[:] = staged.free
        for c, slots, encoded in staged.stays:
            self.slabs[c].index_copy_(0, slots, encoded)
        self.index.take(staged.index)
        if replaced:
            self.decoder.refresh(self.slabs)

    def delete(self, ids: torch.Tensor) -> int:
        """Remove ``ids``; returns how many were present."""
        ids = torch.unique(ids.to(device=self.device, dtype=torch.int64).reshape(-1))
        with self.lock:
            old = self.index.resolve(ids)
            present = old >= 0
            self._release(old[present], self.free)
            self.index.assign(ids[present], torch.full((int(present.sum()),), -1, dtype=torch.int32, device=self.device))
        return int(present.sum())

    def compact(self, *, sole_writer: bool = False) -> int:
        """Repack every class into a slab of exactly its live rows (raw bytes are copied, nothing
        is re-encoded) and drop the free lists; returns the bytes given back.  Moves and deletes
        leave free slots behind, and slabs only grow; this is how memory returns to the budget.

        ``sole_writer``: the caller guarantees that nothing else writes the table meanwhile (the
        service's re-decisions hold its write lock).  Each class's new slab is then copied, and
        its rows repointed in a copy of the index, outside :attr:`lock`, with lookups going on;
        the lock is held only to swap both in (1M IDs: the copies take 0.3-0.5 s, and
        repointing a class's rows under the lock held lookups up to 50-190 ms).
        Without it the whole compaction holds the lock."""
        # per class: an index written in a copy and swapped in (hash, dense); a sorted or run
        # index is rebuilt whole, so those compact under the lock throughout
        if not (sole_writer and self._index_copies()):
            with self.lock:
                return self._compact(per_class=False)
        return self._compact(per_class=True)

    def _compact(self, per_class: bool) -> int:
        before = self.nbytes
        ids, locs = self.index.live_items()
        cls = (locs >> LOCATOR_CLASS_SHIFT).to(torch.int64)
        slots = (locs & LOCATOR_SLOT_MASK).to(torch.int64)
        new_locs = torch.empty_like(locs)
        for c in range(len(self.classes)):
            members = torch.nonzero(cls == c).flatten()
            order = members[torch.argsort(slots[members])]  # keep slab order: sequential copy
            kept = slots[order]
            compacted = memory.empty((kept.numel(), self.slabs[c].shape[1]), torch.uint8, self.device)
            torch.index_select(self.slabs[c], 0, kept, out=compacted)
            new_locs[order] = (c << LOCATOR_CLASS_SHIFT) | torch.arange(order.numel(), dtype=torch.int32, device=self.device)
            repointed = None
            if per_class and order.numel():
                # this class's rows pointed into its new slab in a copy of the index, beside the
                # lookups; swapped in with the slab, the others' rows still into theirs: a lookup
                # between two swaps reads a consistent table
                repointed = self.index.copy()
                if isinstance(repointed, HashIndex):
                    repointed.repoint(ids[order], new_locs[order])  # held keys: no dedup or growth passes
                else:
                    repointed.assign(ids[order], new_locs[order])
            with self.lock:  # (held throughout unless per_class)
                self.slabs[c] = compacted
                self.used[c] = int(order.numel())
                self.free[c] = torch.empty(0, dtype=torch.int32, device=self.device)
                if repointed is not None:
                    self.index.take(repointed)
                self.decoder.refresh(self.slabs)
        if per_class and not isinstance(self.index, HashIndex):
            # a dense index already points every row into its new slab: rebuilt without the
            # locator slack that doubling left past the highest ID, beside the lookups
            trimmed = self._positional(ids, new_locs)
            with self.lock:
                self.index = trimmed
        elif not per_class:
            with self.lock:
                if isinstance(self.index, HashIndex):
                    self.index.repoint(ids, new_locs)  # the held keys, new slots: repointed in place
                elif isinstance(self.index, KeyedIndex):
                    self.index = KeyedIndex.build(ids, new_locs)
                else:
                    self.index = self._positional(ids, new_locs)
        return before - self.nbytes

    def _positional(self, ids: torch.Tensor, locs: torch.Tensor) -> IdIndex:
        """A dense (or run) index like this table's of exactly ``ids`` -> ``locs`` (every held ID),
        without the locator slack that doubling left past the highest."""
        size = int(ids.max()) + 1 if ids.numel() else 0
        locator = torch.full((size,), -1, dtype=torch.int32, device=self.device)
        locator[ids] = locs
        return RunIndex.from_locator(locator) if isinstance(self.index, RunIndex) else DenseIndex(locator)

    # ------------------------------------------------------------------ accounting

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the table holds, by its name in the file format."""
        out = dict(self.index.state_tensors())
        for k, (slab, free) in enumerate(zip(self.slabs, self.free, strict=True)):
            out[f"class.{k}.slab"] = slab
            out[f"class.{k}.free"] = free
            codebook = self.codebooks[k]
            if codebook is not None:
                out[f"class.{k}.codebook"] = codebook
        if self.rotation is not None:
            out["rotation"] = self.rotation
        out.update(self.unknown.state_tensors())
        if self.lifecycle is not None:
            out.update(self.lifecycle.state_tensors())
        return out

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """Everything the table holds in memory: its state plus derived index structures."""
        return {**self.state_tensors(), **self.index.held_tensors(), **self.decoder.held_tensors()}

    @property
    def nbytes(self) -> int:
        return sum(_stack_bytes(t) for t in self.held_tensors().values())

    def rows_per_class(self) -> list[int]:
        """Live rows per class: every slot ever handed out holds a live row unless it was freed
        (moves and deletes free their slot), so this is O(1), not a walk over the index."""
        return [u - int(f.numel()) for u, f in zip(self.used, self.free, strict=True)]

    def _class_bytes(self, k: int) -> int:
        """Slab, free list and (PQ) codebook of class ``k``."""
        codebook = self.codebooks[k]
        extra = 0 if codebook is None else _stack_bytes(codebook)
        return _stack_bytes(self.slabs[k]) + _stack_bytes(self.free[k]) + extra

    def stats(self) -> TableStats:
        with self.lock:
            rows = self.rows_per_class()
            classes = [
                ClassStats(rc, rows[k], int(self.slabs[k].shape[0]), self._class_bytes(k))
                for k, rc in enumerate(self.classes)
            ]
            index_bytes = self.index.nbytes
            row_bytes = sum(c.bytes for c in classes)
            total = self.nbytes
            return TableStats(
                dim=self.dim,
                num_ids=sum(rows),
                index_kind=self.index.kind,
                nbytes=total,
                index_bytes=index_bytes,
                row_bytes=row_bytes,
                other_bytes=total - index_bytes - row_bytes,
                classes=classes,
            )

    def to(self, device: torch.device | str) -> "CompressedTable":
        dev = torch.device(device)
        moved = CompressedTable(
            self.dim,
            self.classes,
            [s.to(dev) for s in self.slabs],
            self.used,
            self.index.to(dev),
            [f.to(dev) for f in self.free],
            None if self.rotation is None else self.rotation.to(dev),
            self.unknown.to(dev),
            self.decoder.backend,  # type: ignore[arg-type]
            [None if cb is None else cb.to(dev) for cb in self.codebooks],
            self.lifecycle,  # its counts stay on CPU: the applier reads them there
        )
        moved.objective = self.objective
        return moved
