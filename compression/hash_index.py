"""Hash index for keyed tables: exact, O(1) expected probes, updated in place; a static part
(one slot per ID) over open-addressing overflow slots.

Layout (shared with the C kernel in ``kernels/hashslot.h`` - ``decode.c`` / ``hashindex.c`` -
and the Triton kernel; keep it exactly):

    index.slots    int32 [cap, 3]: one packed 12-byte slot per row (slot s at byte 12 * s)
                     words 0, 1   the ID held in the slot as an int64, little-endian (low word
                                  first); EMPTY = INT64_MIN = -2**63 marks a free slot
                     word 2       the locator of that ID (compression/layout.py); -1 in free slots
    cap            any integer, MIN_CAPACITY <= cap <= MAX_CAPACITY (a multiple of 16 when this
                   code sizes it: :func:`capacity_for`)

    home(id) = ((fmix64(uint64(id)) >> 32) * cap) >> 32   (uint64 arithmetic; cap < 2**31, so
               the product fits: the top 32 bits of the hash scaled onto [0, cap))
    fmix64(x): x ^= x >> 33; x *= 0xFF51AFD7ED558CCD; x ^= x >> 33; x *= 0xC4CEB9FE1A85EC53;
               x ^= x >> 33   (MurmurHash3's 64-bit finalizer, arithmetic mod 2**64)

Lookup probes ``home, home+1, ...`` (``s + 1 == cap ? 0 : s + 1``) until the ID or an EMPTY
slot.  Deletion shifts the rest of the cluster back (no tombstones; cyclic distances taken mod
cap), so a miss always stops at the first free slot and a table that churns does not fill with
dead entries.  The table grows by about 1.5x (rehash in slot order) before an insert would take
its load past :data:`MAX_LOAD`.  ID ``INT64_MIN`` cannot be
held (it marks free slots); the service refuses it with a 422.

Why the key and its locator share a slot (format 3; format 2 kept ``keys int64[cap]`` and
``locator int32[cap]`` apart): a hit is one cache line (two for the 2 slots in 16 that straddle
a line) instead of a line in each array, and that second line was most of the gap to dense
lookups (bench/results/keyed.md).  Why fmix64 and not format 2's single multiply (Fibonacci
hashing): IDs in an arithmetic progression (strided or shard-interleaved IDs) land on a lattice
under one multiply, with about a third of them in their home slot at load 0.48 against about
three in four for random-like homes, and every miss of the home slot is a mispredicted branch
in the probe.  Files of format 2 are rebuilt into this layout when they load
(:meth:`HashIndex.from_state`).

Why any capacity and not a power of two (format 3 up to this change required one): rounding
up to a power of two left the index at load 0.35-0.7, and at 1M IDs that was 2**21 slots = 24
MiB (load 0.48) where 0.7 needs 17 MiB; a keyed table's budget pays for those bytes with pruned
rows.  The multiply-high home equals the old ``fmix64 >> (64 - log2(cap))`` when ``cap = 2**k``
(``(h32 * 2**k) >> 32 = h32 >> (32 - k) = h >> (64 - k)``), so files with power-of-two
capacities read unchanged; code from before this change refuses a file with any other capacity
with its "capacity must be a power of two" error.  bench/results/keyed.md measured lookups at
loads 0.6-0.9 as fast as at 0.48.

Memory: on CPU, slot arrays of 2 MiB or more are mapped for transparent huge pages
(:mod:`compression.memory`, as a table's slabs are): a probe is a random access over the whole
array and with 4 KiB pages most of them also miss the TLB.  The array starts on a 2 MiB
boundary of a slightly larger mapping (a 16.3 MiB array at 1M IDs, mapped as it came, started
mid-page and had only 14 MiB in huge pages), and the resident bytes stay ``12 * cap``
(:attr:`HashIndex.nbytes`, what the process holds) to within a 4 KiB page.

Why this replaces the sorted :class:`compression.index.KeyedIndex` for new keyed tables: a
lookup is one hash and (at load <= MAX_LOAD) usually one cache line, prefetched a block ahead
in the decode pipeline, instead of a fence search plus a run of 16 keys; an insert or delete
touches a few slots instead of merging a delta part into the whole sorted array.  It costs
``12 * cap`` bytes: 12 / load bytes per ID (17 B at load 0.7 when built in one go, 17-26 B at
load 0.47-0.7 as it grows) against 12.5 for the sorted index; with ``max_ids`` set the capacity stops at
``capacity_for(max_ids, CHURN_LOAD)`` (24 B per ID: such a table churns, see CHURN_LOAD).

The static part (format 4).  A hash index built in one go (``build``; ``compress`` and
``build_table`` build keyed tables so), or rebuilt at a re-decision (``rebuild``), keeps its IDs
in a second slot array where each has exactly one slot, found without probing:

    index.static_slots  int32 [m, 3]   slots of the layout above; m = ceil(IDs / STATIC_LOAD)
    index.pilots        int16 [nb]     uint16 bits; nb = ceil(IDs / BUCKET_IDS)
    h = fmix64(uint64(id)); bucket = (((h >> 32) * nb) >> 32)
    x = ((h & 0xFFFFFFFF) ^ (pilot[bucket] * 0x9E3779B1)) * 0x85EBCA6B   (uint32 arithmetic)
    static slot = (x * m) >> 32

The build (``kernels/hashindex.c``, PTHash's / CHD's search) takes the buckets largest first and
gives each the first pilot that lands all its IDs on distinct free slots; an ID whose bucket no
pilot in [0, 65536) can seat (none in 1M, in practice) goes to the overflow, which is the
open-addressing slots above (``index.slots``).  An ID is held in its static slot or in the
overflow, never both: a lookup reads the static slot (the pilot before it is an L2-sized array;
the C decoder reads the pilots and computes the batch's slot positions in a first pass, then
runs dense's pipeline over the slots: kernels/decode.c's static_positions) and probes the
overflow only when that slot holds another key.  Writes keep it so: an upsert repoints a held
ID where it is, puts a new ID in its static slot when that slot is free (an ID deleted there,
or never used) and otherwise in the overflow; a delete frees a static slot (no shifting) or
shifts the overflow back.  The overflow grows as before; ``rebuild`` merges it into a new static
part.

Why (bench/results/keyed_probe_ab.md, the 8x table, raw C, interleaved): 13.2 bytes per ID
instead of 17.1 (load 0.94 instead of 0.7; 0.4 of pilots), and one slot read per ID, so uniform
IDs, ~13% of which lie past the 3 slots the open-addressing probe prefetches, ran 1.20x
(1.17..1.25) faster.  The pilot is one more dependent load for every ID, so Zipf IDs, whose hot
home slots were already in cache, ran 0.96x (0.95..0.97).  A keyed table's index bytes come out
of its budget, so at 8x and 64 dims the 3.9 bytes per ID go to rows.

Writes and the serial find run in C (``kernels/hashindex.c``) on CPU tables when the library
was built; the torch code below is the reference (any device) and the fallback without a
compiler.  Its delete removes the IDs and re-inserts the rest of each touched cluster, which
keeps the same invariant as the backward shift (every held ID is reachable from its home slot
without crossing a free slot), though the slots it leaves may differ.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import memory
from .kernels import cpu_c

EMPTY = -(2**63)  # INT64_MIN: the key of a free slot
# fmix64's multipliers as signed int64 (torch multiplies int64 mod 2**64)
MIX_1 = 0xFF51AFD7ED558CCD - 2**64
MIX_2 = 0xC4CEB9FE1A85EC53 - 2**64
MIN_CAPACITY = 16
MAX_CAPACITY = 1 << 30  # slots fit the int32 the C pipeline parks them in
# Grow (by about 1.5x: GROWTH) before an insert would pass this load.  Measured (bench/results/keyed.md):
# lookups at 0.5-0.8 load differ little at batch 4096; 0.7 keeps probe runs short (expected
# 2.2 slots for a hit, 6 for a miss with linear probing) at 17 bytes per ID (built in one go; 17-26 while it grows).
MAX_LOAD = 0.7
SLOT_BYTES = 12  # int64 key + int32 locator, packed
SLOT_WORDS = 3  # int32 words per slot: key low, key high, locator
_LOW31 = (1 << 31) - 1
_LOW32 = (1 << 32) - 1
CAPACITY_STEP = 16  # capacity_for rounds up to a multiple of this (any capacity is valid)
# Growth factor of an index that fills up: geometric, so a stream of small upsert batches costs
# amortized O(1) rehash work per ID; 1.5 leaves the grown index at load ~0.47 (2x: ~0.35).
GROWTH = 1.5
# The load a table with ``max_ids`` is sized for: it sits at max_ids for good, and its traffic is
# mostly IDs it does not hold (finds that miss: (1 + 1/(1-a)^2) / 2 slots, 6.1 at 0.7, 2.5 at
# 0.5) and evictions (backward shifts over clusters that grow like 1/(1-a)^2).  At 0.7 a real
# server took 66k update rows/s of a Zipf stream over 100M IDs into a 1M-ID table, 85% of its CPU
# in the index (bench/streaming_scale.py); sized at 0.5 it holds 24 MiB instead of 16.3 at 1M.
CHURN_LOAD = 0.5
# The static part (module docstring): its slots' load and the IDs per pilot.  0.94 / 5 placed every
# one of 1M IDs with pilots up to 9839 of 65535 in 0.35 s (C); 0.97 / 6 left 75 IDs to the overflow
# and took 1.2 s; 0.9 / 4 holds 5% more bytes and looked up no faster (bench/results/keyed_probe_ab.md).
STATIC_LOAD = 0.94
BUCKET_IDS = 5
PILOT_MULT = 0x9E3779B1  # x = ((low32(h) ^ (pilot * PILOT_MULT)) * POS_MULT) mod 2**32
POS_MULT = 0x85EBCA6B  # pos = (x * m) >> 32
PILOT_BYTES = 2  # uint16, held as int16
MAX_STATIC = (1 << 31) - 1  # static slots: the C pipeline parks a slot number in an int32


def capacity_for(num_ids: int, max_load: float = MAX_LOAD) -> int:
    """Smallest capacity, a multiple of :data:`CAPACITY_STEP` (at least MIN_CAPACITY), that holds
    ``num_ids`` at or below ``max_load`` (the same float test the growth check makes)."""
    need = max(MIN_CAPACITY, math.ceil(num_ids / max_load) if num_ids else MIN_CAPACITY)
    cap = -(-need // CAPACITY_STEP) * CAPACITY_STEP
    while cap * max_load < num_ids:  # float rounding of num_ids / max_load
        cap += CAPACITY_STEP
    if cap > MAX_CAPACITY:
        raise ValueError(f"a hash index holds at most {int(MAX_CAPACITY * max_load)} IDs")
    return cap


def static_shape(num_ids: int) -> tuple[int, int]:
    """(static slots, pilots) of a static part over ``num_ids`` IDs; (0, 0) for none."""
    if num_ids <= 0:
        return 0, 0
    m = math.ceil(num_ids / STATIC_LOAD)
    if m > MAX_STATIC:
        raise ValueError(f"a hash index's static part holds at most {int(MAX_STATIC * STATIC_LOAD)} IDs")
    return m, math.ceil(num_ids / BUCKET_IDS)


def static_available() -> bool:
    """Whether this process builds static parts: the compiled library has them (and its hash
    writes are switched on; tests switch them off to run the torch paths)."""
    return cpu_c.HASH_OPS_AVAILABLE and cpu_c.STATIC_OPS_AVAILABLE


def hash_index_bytes(num_ids: int) -> int:
    """Bytes a hash index of ``num_ids`` IDs built in one go holds: with the compiled library, a
    static part over all of them (12 bytes per static slot, 2 per pilot) and an empty overflow of
    MIN_CAPACITY slots (13.2 bytes per ID at 1M); without it, the open-addressing slots at
    MAX_LOAD (17.1)."""
    if static_available() and num_ids > 0:
        m, nb = static_shape(num_ids)
        return SLOT_BYTES * (m + MIN_CAPACITY) + PILOT_BYTES * nb
    return SLOT_BYTES * capacity_for(num_ids)


def _shr33(x: torch.Tensor) -> torch.Tensor:
    """Logical ``x >> 33`` of int64 bits (torch's shift is arithmetic: mask the sign copies)."""
    return (x >> 33) & _LOW31


def mix(ids: torch.Tensor) -> torch.Tensor:
    """fmix64 of each ID, as int64 bits (the module docstring's formula)."""
    x = ids.to(torch.int64)
    x = x ^ _shr33(x)
    x = x * MIX_1
    x = x ^ _shr33(x)
    x = x * MIX_2
    return x ^ _shr33(x)


def home_slots(ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """``int64`` home slot of each ID (the formula in the module docstring): the hash's top 32
    bits times ``capacity``, top half of the product.  Torch's ``>>`` is arithmetic, so the mask
    makes the first shift logical; the product is below 2**63 (capacity <= 2**31), so the second
    shift sees no sign."""
    if not 1 <= capacity <= 1 << 31:
        raise ValueError(f"hash index capacity must be in [1, 2**31], got {capacity}")
    return (((mix(ids) >> 32) & _LOW32) * capacity) >> 32


def next_slot(slot: torch.Tensor, capacity: int) -> torch.Tensor:
    """The probe's next slot: ``slot + 1``, wrapping to 0 at ``capacity`` (no mask: any capacity)."""
    step = slot + 1
    return torch.where(step == capacity, torch.zeros_like(step), step)


def split_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 keys as the (low, high) int32 words of a slot."""
    low = ((keys & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000  # the low 32 bits, as a signed value
    return low.to(torch.int32), (keys >> 32).to(torch.int32)


def join_keys(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """int64 keys from a slot's (low, high) int32 words."""
    return (high.to(torch.int64) << 32) | (low.to(torch.int64) & 0xFFFFFFFF)


def slot_keys(slots: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
    """The int64 key of each slot (or of the slots ``at``)."""
    if at is None:
        return join_keys(slots[:, 0], slots[:, 1])
    return join_keys(slots[at, 0], slots[at, 1])


def _write(slots: torch.Tensor, at: torch.Tensor, keys: torch.Tensor, locs: torch.Tensor) -> None:
    low, high = split_keys(keys)
    slots[at, 0] = low
    slots[at, 1] = high
    slots[at, 2] = locs.to(torch.int32)


def new_slots(capacity: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An all-free slot array.  On CPU, 2 MiB or more start on a 2 MiB boundary of a mapping
    advised MADV_HUGEPAGE (:mod:`compression.memory`); what is resident stays ``12 * capacity``
    bytes, so the index's byte count stays honest."""
    slots = memory.empty((capacity, SLOT_WORDS), torch.int32, device)
    slots[:, 0] = 0
    slots[:, 1] = -(2**31)  # (0, -2**31) are the words of INT64_MIN
    slots[:, 2] = -1
    return slots


def pack_slots(keys: torch.Tensor, locator: torch.Tensor) -> torch.Tensor:
    """The int32 ``[cap, 3]`` slot array holding ``keys[s]`` / ``locator[s]`` in slot ``s`` (the
    arrays as given: no placement, no check)."""
    slots = new_slots(keys.numel(), keys.device)
    _write(slots, torch.arange(keys.numel(), device=keys.device), keys.to(torch.int64), locator)
    return slots


def _torch_slots(slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Slot holding each ID, or -1 (vectorized linear probing: one round per probe step)."""
    cap = slots.shape[0]
    out = torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
    pending = torch.nonzero(ids != EMPTY).flatten()
    slot = home_slots(ids[pending], cap)
    want = ids[pending]
    while pending.numel():
        k = slot_keys(slots, slot)
        hit = k == want
        out[pending[hit]] = slot[hit]
        go_on = ~hit & (k != EMPTY)
        pending, slot, want = pending[go_on], next_slot(slot[go_on], cap), want[go_on]
    return out


def _torch_upsert(slots: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor) -> int:
    """Upsert unique ``ids``; returns how many were new.  Several new IDs reaching one free slot
    in a round: the first in batch order takes it, the others probe on."""
    cap = slots.shape[0]
    order = torch.arange(ids.numel(), device=ids.device)
    slot = home_slots(ids, cap)
    claim = torch.full((cap,), ids.numel(), dtype=torch.int64, device=ids.device)
    added = 0
    while order.numel():
        k = slot_keys(slots, slot)
        hit = k == ids[order]
        slots[slot[hit], 2] = locs[order[hit]].to(torch.int32)
        free = k == EMPTY
        won = torch.zeros_like(free)
        if bool(free.any()):
            fs, fo = slot[free], order[free]
            claim.scatter_reduce_(0, fs, fo, reduce="amin")
            first = claim[fs] == fo
            _write(slots, fs[first], ids[fo[first]], locs[fo[first]])
            claim[fs] = ids.numel()
            added += int(first.sum())
            won[torch.nonzero(free).flatten()[first]] = True
        done = hit | won
        step = ~done & ~free  # a loser of a claim looks at the same slot again (now taken)
        slot = torch.where(step, next_slot(slot, cap), slot)[~done]
        order = order[~done]
    return added


def _torch_delete(slots: torch.Tensor, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    cap = slots.shape[0]
    found = _torch_slots(slots, ids)
    held = found >= 0
    old = torch.full(ids.shape, -1, dtype=torch.int32, device=ids.device)
    if not bool(held.any()):
        return 0, old
    hs = found[held]
    old[held] = slots[hs, 2]
    _write(slots, hs, torch.full_like(hs, EMPTY), torch.full_like(hs, -1))
    # the rest of each cluster after a hole may have probed across it: take it out, insert again
    tail = []
    cur = torch.unique(next_slot(hs, cap))
    while cur.numel():
        cur = cur[slot_keys(slots, cur) != EMPTY]
        tail.append(cur)
        cur = torch.unique(next_slot(cur, cap))
    moved = torch.unique(torch.cat(tail)) if tail else hs.new_empty(0)
    if moved.numel():
        mk, ml = slot_keys(slots, moved), slots[moved, 2].clone()
        _write(slots, moved, torch.full_like(moved, EMPTY), torch.full_like(moved, -1))
        _torch_upsert(slots, mk, ml)
    return int(held.sum()), old


def static_positions(ids: torch.Tensor, pilots: torch.Tensor, m: int) -> torch.Tensor:
    """``int64`` static slot of each ID (the formula in the module docstring; ``m`` > 0)."""
    h = mix(ids)
    nb = pilots.numel()
    bucket = (((h >> 32) & _LOW32) * nb) >> 32
    pilot = pilots[bucket].to(torch.int64) & 0xFFFF  # uint16 bits held as int16
    x = (((h & _LOW32) ^ ((pilot * PILOT_MULT) & _LOW32)) * POS_MULT) & _LOW32
    return (x * m) >> 32


def _torch_static_find(static: torch.Tensor, pilots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Static slot holding each ID, or -1."""
    if static.shape[0] == 0:
        return torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
    pos = static_positions(ids, pilots, static.shape[0])
    return torch.where((slot_keys(static, pos) == ids) & (ids != EMPTY), pos, -1)


def _torch_two_find(static: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Locator of each ID (-1 = absent): its static slot, else the overflow."""
    out = torch.full(ids.shape, -1, dtype=torch.int32, device=ids.device)
    sp = _torch_static_find(static, pilots, ids)
    ins = sp >= 0
    out[ins] = static[sp[ins], 2]
    rest = torch.nonzero(~ins).flatten()
    found = _torch_slots(slots, ids[rest])
    held = found >= 0
    out[rest[held]] = slots[found[held], 2]
    return out


def _torch_two_upsert(static: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor) -> tuple[int, int]:
    """Upsert unique ``ids`` (kernels/hashindex.c's embserve_hidx_upsert, batched): IDs held in
    either part are repointed where they are; a new ID takes its static slot when that is free
    (the first in batch order, when several new IDs share one), else an overflow slot.  Returns
    the new IDs (in the static part, in the overflow)."""
    sp = _torch_static_find(static, pilots, ids)
    ins = sp >= 0
    static[sp[ins], 2] = locs[ins].to(torch.int32)
    rest = torch.nonzero(~ins).flatten()
    if rest.numel() == 0:
        return 0, 0
    rid, rloc = ids[rest], locs[rest]
    to_static = torch.zeros(rid.shape, dtype=torch.bool, device=ids.device)
    if static.shape[0]:
        new = _torch_slots(slots, rid) < 0
        pos = static_positions(rid, pilots, static.shape[0])
        free = new & (slot_keys(static, pos) == EMPTY)
        if bool(free.any()):
            order = torch.arange(rid.numel(), device=ids.device)
            claim = torch.full((static.shape[0],), rid.numel(), dtype=torch.int64, device=ids.device)
            claim.scatter_reduce_(0, pos[free], order[free], reduce="amin")
            to_static = free & (claim[pos] == order)
            _write(static, pos[to_static], rid[to_static], rloc[to_static])
    return int(to_static.sum()), _torch_upsert(slots, rid[~to_static], rloc[~to_static])


def _last_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct ID, in first-seen-last order."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=ids.device)
    last.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amax")
    return torch.sort(last).values


def _hottest_first(ids: torch.Tensor, locators: torch.Tensor, frequencies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and their ``locators`` in descending ``frequencies`` (aligned with ``ids``; ties in
    their order): the insertion order that puts the hot IDs in their home slots."""
    frequencies = frequencies.reshape(-1)
    if frequencies.numel() != ids.numel():
        raise ValueError(f"{frequencies.numel()} frequencies for {ids.numel()} IDs")
    order = torch.argsort(frequencies.to(device=ids.device, dtype=torch.float64), descending=True, stable=True)
    return ids[order], locators[order]


def _held_items(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys held in ``slots`` (either part's) and their locators, in slot order."""
    keys = slot_keys(slots)
    held = keys != EMPTY
    return keys[held], slots[held, 2]


class _Parts:
    """The arrays of one :class:`HashIndex` state, replaced as one object (a reader that takes
    ``index.parts`` once sees a static part and the overflow that go together)."""

    __slots__ = ("static", "pilots", "slots", "__weakref__")

    def __init__(self, static: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor) -> None:
        self.static, self.pilots, self.slots = static, pilots, slots


def _no_static(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((0, SLOT_WORDS), dtype=torch.int32, device=device), torch.empty(0, dtype=torch.int16, device=device)


class HashIndex:
    """ID -> locator map: a static part (one slot per ID, pilots) and open-addressing overflow
    slots (layout in the module docstring)."""

    kind = "hash"
    positional = False

    def __init__(self, slots: torch.Tensor, static: torch.Tensor | None = None, pilots: torch.Tensor | None = None) -> None:
        if slots.dtype != torch.int32 or slots.dim() != 2 or slots.shape[1] != SLOT_WORDS or not slots.is_contiguous():
            raise ValueError("a hash index needs a contiguous int32 [capacity, 3] slot array")
        cap = slots.shape[0]
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY:
            raise ValueError(f"hash index capacity must be in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {cap}")
        if static is None or pilots is None:
            if static is not None or pilots is not None:
                raise ValueError("a hash index's static part needs both its slots and its pilots")
            static, pilots = _no_static(slots.device)
        if static.dtype != torch.int32 or static.dim() != 2 or static.shape[1] != SLOT_WORDS or not static.is_contiguous():
            raise ValueError("a hash index's static part needs a contiguous int32 [m, 3] slot array")
        if pilots.dtype != torch.int16 or pilots.dim() != 1 or not pilots.is_contiguous():
            raise ValueError("a hash index's pilots must be a contiguous int16 [buckets] array")
        m = static.shape[0]
        if m > MAX_STATIC or (m > 0) != (pilots.numel() > 0):
            raise ValueError(f"a hash index's static part needs 1..{MAX_STATIC} slots and at least one pilot, or neither")
        keys = slot_keys(slots)
        occupied = keys != EMPTY
        self.overflow_count = int(occupied.sum())
        if self.overflow_count > cap * MAX_LOAD + 1:
            raise ValueError("hash index is fuller than its maximum load")
        if bool((slots[~occupied, 2] != -1).any()):
            raise ValueError("a free hash slot has a locator")
        if self.overflow_count and not bool((_torch_slots(slots, keys[occupied]) == torch.nonzero(occupied).flatten()).all()):
            raise ValueError("hash index keys are not where probing finds them (duplicate or misplaced key)")
        static_count = 0
        if m:
            skeys = slot_keys(static)
            held = skeys != EMPTY
            static_count = int(held.sum())
            if bool((static[~held, 2] != -1).any()):
                raise ValueError("a free static slot has a locator")
            if not bool((static_positions(skeys[held], pilots, m) == torch.nonzero(held).flatten()).all()):
                raise ValueError("hash index keys are not in their static slots (misplaced key, or pilots of another build)")
            if self.overflow_count and bool(torch.isin(keys[occupied], skeys[held]).any()):
                raise ValueError("hash index holds an ID in both its static part and its overflow")
        self.parts = _Parts(static, pilots, slots)
        self.count = static_count + self.overflow_count

    @property
    def slots(self) -> torch.Tensor:
        """The overflow's open-addressing slots (all of the index when it has no static part)."""
        return self.parts.slots

    @slots.setter
    def slots(self, slots: torch.Tensor) -> None:  # a rehash: same static part, one store
        self.parts = _Parts(self.parts.static, self.parts.pilots, slots)

    @property
    def static(self) -> torch.Tensor:
        """The static part's int32 [m, 3] slots (m = 0: none)."""
        return self.parts.static

    @property
    def pilots(self) -> torch.Tensor:
        """The static part's pilots, uint16 bits held as int16 [buckets]."""
        return self.parts.pilots

    @classmethod
    def empty(cls, capacity: int = MIN_CAPACITY, device: torch.device | str = "cpu") -> "HashIndex":
        return cls(new_slots(capacity, device))

    @classmethod
    def build(
        cls,
        ids: torch.Tensor,
        locators: torch.Tensor,
        capacity: int | None = None,
        frequencies: torch.Tensor | None = None,
        static: bool | None = None,
    ) -> "HashIndex":
        """Index ``ids`` (unique).

        ``static`` (default: when the compiled library has the static part and no ``capacity``
        is given): every ID gets a slot of its own in a static part (module docstring), built on
        CPU (and copied to the IDs' device); IDs no pilot can seat go to the overflow.  Otherwise
        all IDs go to open-addressing slots: ``capacity`` defaults to the smallest that keeps
        MAX_LOAD.

        ``frequencies`` (expected lookups per ID, any scale, aligned with ``ids``): insert the
        hottest IDs first into the open-addressing slots.  Linear probing puts a key in its home
        slot exactly when that slot is free at its insertion, so the IDs inserted first take their
        home slots and the probe lengths (their sum is the same in any order) fall on the cold
        ones.  Under skewed traffic nearly every lookup then resolves in its home slot: at load
        0.7, 97% of a Zipf(1.05) stream's lookups against 65% in ID order, and the 8x table's
        keyed lookups ran 1.24x (1.15..1.32) faster (bench/results/keyed_probe_ab.md).  Readers
        are unchanged: this is only an insertion order.  The compiled writes insert strictly in
        order; the torch fallback's rounds let the first in order win each contested slot, which
        places the hottest IDs first too, less strictly.  (A static slot is one read whatever the
        order, so the static part ignores them.)"""
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() > 1 and torch.unique(ids).numel() != ids.numel():
            raise ValueError("IDs must be unique")
        if bool((ids == EMPTY).any()):
            raise ValueError("ID -2**63 (INT64_MIN) marks free slots of a hash index and cannot be stored")
        locators = locators.to(torch.int32).reshape(-1).to(ids.device)
        if frequencies is not None and frequencies.numel() != ids.numel():
            raise ValueError(f"{frequencies.numel()} frequencies for {ids.numel()} IDs")
        if static is None:
            static = capacity is None and static_available()
        if static and ids.numel():
            if not static_available():
                raise ValueError("building a hash index's static part needs the compiled library (python setup.py build_ext --inplace)")
            return cls._build_static(ids, locators, frequencies)
        if frequencies is not None:
            ids, locators = _hottest_first(ids, locators, frequencies)
        index = cls.empty(capacity or capacity_for(ids.numel()), ids.device)
        index.assign(ids, locators)
        return index

    @classmethod
    def _build_static(cls, ids: torch.Tensor, locators: torch.Tensor, frequencies: torch.Tensor | None) -> "HashIndex":
        device = ids.device
        ids_c, locs_c = ids.cpu().contiguous(), locators.cpu().contiguous()
        m, nb = static_shape(ids_c.numel())
        static, pilots = new_slots(m), torch.zeros(nb, dtype=torch.int16)
        placed = cpu_c.static_build(ids_c, locs_c, static, pilots)
        rest_ids, rest_locs = ids_c[~placed], locs_c[~placed]
        if frequencies is not None and rest_ids.numel() > 1:
            rest_ids, rest_locs = _hottest_first(rest_ids, rest_locs, frequencies.reshape(-1).cpu()[~placed])
        slots = new_slots(capacity_for(rest_ids.numel()))
        if rest_ids.numel():
            cpu_c.hash_upsert(slots, rest_ids.contiguous(), rest_locs.contiguous())
        index = cls(slots, static, pilots)
        return index if device.type == "cpu" else index.to(device)

    @property
    def capacity(self) -> int:
        """All slots: static and overflow."""
        return int(self.parts.static.shape[0] + self.parts.slots.shape[0])

    @property
    def overflow_capacity(self) -> int:
        return int(self.parts.slots.shape[0])

    @property
    def load(self) -> float:
        return self.count / self.capacity

    @property
    def keys(self) -> torch.Tensor:
        """The int64 key of every overflow slot (a copy: the slots hold it as two int32 words)."""
        return slot_keys(self.slots)

    @property
    def locator(self) -> torch.Tensor:
        """The locator of every overflow slot (a strided view into the slots: writes go through)."""
        return self.slots[:, 2]

    def _compiled(self) -> bool:
        parts = self.parts
        if parts.slots.device.type != "cpu" or not cpu_c.HASH_OPS_AVAILABLE:
            return False
        return parts.static.shape[0] == 0 or cpu_c.STATIC_OPS_AVAILABLE

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        ids = ids.to(device=parts.slots.device, dtype=torch.int64).reshape(-1)
        if self._compiled():
            if parts.static.shape[0]:
                return cpu_c.hidx_find(parts.static, parts.pilots, parts.slots, ids.contiguous())
            return cpu_c.hash_find(parts.slots, ids.contiguous())
        return _torch_two_find(parts.static, parts.pilots, parts.slots, ids)

    def static_held(self, ids: torch.Tensor) -> int:
        """How many of the distinct ``ids`` sit in the static part; the rest of those held are in
        the overflow, and deleting them frees room there for new IDs (a freed static slot takes
        only a new ID whose pilot lands on it).  What lets a writer that evicts before it inserts
        size the overflow's growth beside the lookups (CompressedTable.reserve)."""
        parts = self.parts
        ids = ids.to(device=parts.slots.device, dtype=torch.int64).reshape(-1)
        return int((_torch_static_find(parts.static, parts.pilots, ids) >= 0).sum())

    def _grow_for(self, extra: int, max_ids: int | None = None) -> None:
        """Rehash the overflow into a larger slot array when ``extra`` new IDs would pass MAX_LOAD
        (CHURN_LOAD with ``max_ids``): to ``capacity_for(max(count + extra, GROWTH * count))``
        (counts of the overflow), geometric so that many small batches cost amortized O(1) per ID;
        with ``max_ids`` (a table that evicts there, so never holds more) no larger than
        ``capacity_for(max_ids, CHURN_LOAD)`` unless this batch itself needs it, and sized at
        CHURN_LOAD on the way there."""
        slots = self._grown_slots(extra, max_ids)
        if slots is not None:
            self.slots = slots

    def _grown_slots(self, extra: int, max_ids: int | None) -> torch.Tensor | None:
        """The overflow rehashed into the slot array :meth:`_grow_for` sizes, or None when
        ``extra`` new IDs fit (reads this index only)."""
        need = self.overflow_count + extra
        load = MAX_LOAD if max_ids is None else CHURN_LOAD  # a table that will churn at max_ids: see CHURN_LOAD
        if need <= self.overflow_capacity * load:
            return None
        target = max(need, math.ceil(GROWTH * self.overflow_count))
        if max_ids is not None:
            target = min(target, max(need, max_ids))
        slots = new_slots(capacity_for(target, load), self.slots.device)
        if self._compiled():
            cpu_c.hash_rehash(self.slots, slots)
        else:
            keys, locs = _held_items(self.slots)
            _torch_upsert(slots, keys, locs)
        return slots

    def grown(self, extra: int, max_ids: int | None = None) -> HashIndex | None:
        """This index with its overflow grown as :meth:`assign` of ``extra`` new IDs would grow it,
        or None when they fit: a sole writer rehashes beside the lookups and takes (:meth:`take`)
        the result under their lock, so that the assign then finds room.  The static part and the
        pilots are shared: nothing writes this index between the two."""
        slots = self._grown_slots(extra, max_ids)
        if slots is None:
            return None
        dup = HashIndex.__new__(HashIndex)  # the arrays are this index's, checked when it was made
        dup.parts, dup.count, dup.overflow_count = _Parts(self.parts.static, self.parts.pilots, slots), self.count, self.overflow_count
        return dup

    def assign(self, ids: torch.Tensor, locators: torch.Tensor, max_ids: int | None = None) -> None:
        """Point ``ids`` at ``locators``; ``-1`` deletes.  A later duplicate wins.  In place: a
        write touches an ID's static slot and the probed overflow slots only (plus a rehash of the
        overflow when its load would pass MAX_LOAD; ``max_ids`` caps how far that grows,
        :meth:`_grow_for`)."""
        if ids.numel() == 0:
            return
        ids = ids.to(device=self.slots.device, dtype=torch.int64).reshape(-1)
        locators = locators.to(device=self.slots.device, dtype=torch.int32).reshape(-1)
        if bool((ids == EMPTY).any()):
            raise ValueError("ID -2**63 (INT64_MIN) marks free slots of a hash index and cannot be stored")
        keep = _last_occurrence(ids)
        ids, locators = ids[keep].contiguous(), locators[keep].contiguous()
        live = locators >= 0
        if bool((~live).any()):
            self.delete(ids[~live])
        ids, locators = ids[live].contiguous(), locators[live].contiguous()
        if ids.numel() == 0:
            return
        new = int((self.resolve(ids) < 0).sum())  # room for all of them in the overflow: some may take static slots
        self._grow_for(new, max_ids)
        self._upsert(ids, locators)

    def repoint(self, ids: torch.Tensor, locators: torch.Tensor) -> None:
        """Point held, distinct ``ids`` at new ``locators`` (>= 0) where they are: a compaction's
        repointing, without :meth:`assign`'s dedup, delete and growth passes (a third of its time
        at 1M IDs).  Raises if an ID was not held (it would have been inserted)."""
        device = self.parts.slots.device
        added = self._upsert(ids.to(device=device, dtype=torch.int64).reshape(-1).contiguous(),
                             locators.to(device=device, dtype=torch.int32).reshape(-1).contiguous())
        if added:
            raise ValueError(f"repoint of {added} IDs the index did not hold")

    def _upsert(self, ids: torch.Tensor, locators: torch.Tensor) -> int:
        """Write distinct ``ids`` -> ``locators`` (>= 0) in place, the overflow having room for
        any new ones; counts them and returns how many were new."""
        parts = self.parts
        if self._compiled() and parts.static.shape[0]:
            to_static, to_overflow = cpu_c.hidx_upsert(parts.static, parts.pilots, parts.slots, ids, locators)
        elif self._compiled():
            to_static, to_overflow = 0, cpu_c.hash_upsert(parts.slots, ids, locators)
        else:
            to_static, to_overflow = _torch_two_upsert(parts.static, parts.pilots, parts.slots, ids, locators)
        self.count += to_static + to_overflow
        self.overflow_count += to_overflow
        return to_static + to_overflow

    def delete(self, ids: torch.Tensor) -> torch.Tensor:
        """Remove ``ids`` (a static slot is freed; the overflow shifts back); returns the locators
        they had (-1 = not held)."""
        parts = self.parts
        ids = ids.to(device=parts.slots.device, dtype=torch.int64).reshape(-1).contiguous()
        if self._compiled() and parts.static.shape[0]:
            from_static, from_overflow, old = cpu_c.hidx_delete(parts.static, parts.pilots, parts.slots, ids)
        elif self._compiled():
            from_overflow, old = cpu_c.hash_delete(parts.slots, ids)
            from_static = 0
        else:
            old = torch.full(ids.shape, -1, dtype=torch.int32, device=ids.device)
            sp = _torch_static_find(parts.static, parts.pilots, ids)
            ins = sp >= 0
            old[ins] = parts.static[sp[ins], 2]
            _write(parts.static, sp[ins], torch.full_like(sp[ins], EMPTY), torch.full_like(sp[ins], -1))
            from_static = int(ins.sum())
            rest = torch.nonzero(~ins).flatten()
            from_overflow, old_rest = _torch_delete(parts.slots, ids[rest])
            old[rest] = old_rest
        self.count -= from_static + from_overflow
        self.overflow_count -= from_overflow
        return old

    def rebuild(self, frequency_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Lay the held IDs out again: a new static part over all of them (their overflow merged
        into it), or, without the compiled static part, the same slots inserted hottest first (see
        :meth:`build`).

        An index that lives on a stream adds its new IDs to the overflow (or to static slots
        that deletions freed), so its overflow grows between re-decisions, which call this; and
        arrival order and rehashes scatter the hot IDs of open-addressing slots.
        ``frequency_of(ids)`` gives each held ID's expected lookups (the service passes its traffic
        sketch's estimates).  O(N) (plus a sort for the hottest-first order) once per call; the
        IDs, their locators and every lookup stay as they were.  ``rebuild`` is
        :meth:`rebuilt` then :meth:`take`: a caller whose readers hold a lock while they read
        builds outside it and takes the new arrays under it."""
        self.take(self.rebuilt(frequency_of))

    def rebuilt(self, frequency_of: Callable[[torch.Tensor], torch.Tensor] | None = None) -> HashIndex | None:
        """The index :meth:`rebuild` would leave, built beside this one (which it only reads:
        lookups may go on meanwhile, writes may not); None when there is nothing to redo."""
        ids, locs = self.live_items()
        if ids.numel() < 2:
            return None
        freqs = None if frequency_of is None else frequency_of(ids)
        if static_available():
            return HashIndex.build(ids, locs, frequencies=freqs, static=True)
        if freqs is None:
            return None
        ids, locs = _hottest_first(ids, locs, freqs)
        rebuilt = HashIndex(new_slots(self.overflow_capacity, self.slots.device))
        rebuilt.assign(ids.contiguous(), locs.contiguous())
        return rebuilt

    def copy(self) -> HashIndex:
        """This index with arrays of its own (the pilots, which no write changes, shared): what a
        sole writer writes beside the lookups, reading this one, and then takes (:meth:`take`) in one
        step under their lock (compression/table.py's staged puts and compaction)."""
        parts = self.parts
        device = parts.slots.device
        slots, static = new_slots(parts.slots.shape[0], device), new_slots(parts.static.shape[0], device)
        slots.copy_(parts.slots)
        static.copy_(parts.static)
        dup = HashIndex.__new__(HashIndex)  # the arrays are this index's, checked when it was made
        dup.parts, dup.count, dup.overflow_count = _Parts(static, parts.pilots, slots), self.count, self.overflow_count
        return dup

    def take(self, rebuilt: HashIndex | None) -> None:
        """Serve ``rebuilt``'s arrays from now on (from :meth:`rebuilt` or :meth:`copy` of this
        index, with no write to this one in between); readers take them at their next view
        (:meth:`c_view`)."""
        if rebuilt is not None:
            self.parts, self.count, self.overflow_count = rebuilt.parts, rebuilt.count, rebuilt.overflow_count

    def live_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held IDs and their locators: the static part's in slot order, then the overflow's."""
        parts = self.parts
        skeys, slocs = _held_items(parts.static)
        okeys, olocs = _held_items(parts.slots)
        return torch.cat([skeys, okeys]), torch.cat([slocs, olocs])

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Held IDs (and locators) at ``count`` slots drawn uniformly over both parts with
        ``generator``: the candidates of sampled eviction.  Free slots drawn are dropped; a slot
        drawn twice gives its ID once."""
        parts = self.parts
        m = parts.static.shape[0]
        drawn = torch.unique(torch.randint(0, self.capacity, (count,), generator=generator)).to(parts.slots.device)
        in_static = drawn < m
        s_at, o_at = drawn[in_static], drawn[~in_static] - m
        keys = torch.cat([slot_keys(parts.static, s_at), slot_keys(parts.slots, o_at)])
        locs = torch.cat([parts.static[s_at, 2], parts.slots[o_at, 2]])
        held = keys != EMPTY
        return keys[held], locs[held]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``index.slots`` (the overflow), and the static part when there is one:
        ``index.static_slots`` / ``index.pilots`` (format 4, compression/storage.py)."""
        parts = self.parts
        if parts.static.shape[0] == 0:
            return {"index.slots": parts.slots}
        return {"index.slots": parts.slots, "index.static_slots": parts.static, "index.pilots": parts.pilots}

    @property
    def has_static(self) -> bool:
        return self.parts.static.shape[0] > 0

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "HashIndex":
        """From a table file's tensors: ``index.slots`` (format 3), with ``index.static_slots`` /
        ``index.pilots`` (format 4), or format 2's ``index.keys`` / ``index.locator`` (the old
        hash, separate arrays), whose IDs are re-inserted into slots of the same capacity."""
        if "index.slots" in tensors:
            loaded = tensors["index.slots"]
            if loaded.dtype != torch.int32 or loaded.dim() != 2 or loaded.shape[1] != SLOT_WORDS:
                raise ValueError(f"index.slots must be int32 [capacity, {SLOT_WORDS}], got {loaded.dtype} {list(loaded.shape)}")
            slots = new_slots(loaded.shape[0], loaded.device)
            slots.copy_(loaded)  # on CPU into huge-page backed memory (new_slots)
            if ("index.static_slots" in tensors) != ("index.pilots" in tensors):
                raise ValueError("a hash index's static part needs both index.static_slots and index.pilots")
            if "index.static_slots" not in tensors:
                return cls(slots)
            loaded_static = tensors["index.static_slots"]
            if loaded_static.dtype != torch.int32 or loaded_static.dim() != 2 or loaded_static.shape[1] != SLOT_WORDS:
                raise ValueError(f"index.static_slots must be int32 [m, {SLOT_WORDS}], got {loaded_static.dtype} {list(loaded_static.shape)}")
            static = new_slots(loaded_static.shape[0], loaded_static.device)
            static.copy_(loaded_static)
            return cls(slots, static, tensors["index.pilots"].contiguous())
        keys, locator = tensors["index.keys"], tensors["index.locator"]
        if keys.dtype != torch.int64 or locator.dtype != torch.int32 or keys.dim() != 1 or keys.shape != locator.shape:
            raise ValueError("a format-2 hash index needs int64 keys and int32 locators of one length")
        held = keys != EMPTY
        if bool((locator[held] < 0).any()):
            raise ValueError("a held hash slot has no locator")
        if torch.unique(keys[held]).numel() != int(held.sum()):
            raise ValueError("hash index holds an ID twice")
        index = cls.empty(keys.numel(), keys.device)
        index.assign(keys[held], locator[held])  # the new home slots; IDs unique, so nothing is lost
        return index

    def to(self, device: torch.device) -> "HashIndex":
        device = torch.device(device)
        parts = self.parts
        if device == parts.slots.device:
            return HashIndex(parts.slots, parts.static, parts.pilots)
        slots, static = new_slots(parts.slots.shape[0], device), new_slots(parts.static.shape[0], device)
        slots.copy_(parts.slots)
        static.copy_(parts.static)
        return HashIndex(slots, static, parts.pilots.to(device))

    def c_view(self) -> Any:
        """The compiled decoder's view of the index (None off the C path), rebuilt when a rehash or
        a rebuild replaces the arrays.  The check is one weak reference (per lookup: a batch-1
        lookup is a few microseconds), which also lets replaced arrays be freed at once."""
        parts = self.parts
        ref = getattr(self, "_c_of", None)
        if ref is not None and ref() is parts:
            return self._c_view
        if not self._compiled():
            return None
        if parts.static.shape[0]:
            view = cpu_c.static_hash_index(parts.static, parts.pilots, parts.slots)
        else:
            view = cpu_c.hash_index(parts.slots)
        self._c_view, self._c_of = view, weakref.ref(parts)
        return self._c_view

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()

    @property
    def nbytes(self) -> int:
        parts = self.parts
        return SLOT_BYTES * (parts.slots.shape[0] + parts.static.shape[0]) + PILOT_BYTES * parts.pilots.numel()

    @property
    def num_ids(self) -> int:
        return self.count
