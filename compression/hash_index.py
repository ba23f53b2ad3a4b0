"""Open-addressing hash index for keyed tables: exact, O(1) expected probes, updated in place.

Layout (shared with the C kernel in ``kernels/decode.c`` / ``kernels/hashindex.c`` and the GPU
kernel; keep it exactly):

    index.keys     int64 [cap]   the ID held in each slot; EMPTY = INT64_MIN = -2**63 (free)
    index.locator  int32 [cap]   the locator of that ID (compression/layout.py); -1 in free slots
    cap            a power of two, MIN_CAPACITY <= cap <= MAX_CAPACITY

    home(id) = ((uint64(id) * 0x9E3779B97F4A7C15) mod 2**64) >> (64 - log2(cap))

Lookup probes ``home, home+1, ...`` (mod cap) until the ID or an EMPTY slot.  Deletion shifts
the rest of the cluster back (no tombstones), so a miss always stops at the first free slot
and a table that churns does not fill with dead entries.  The table doubles (rehash in slot
order) before an insert would take its load past :data:`MAX_LOAD`.  ID ``INT64_MIN`` cannot be
held (it marks free slots); the service refuses it with a 422.

Why this replaces the sorted :class:`compression.index.KeyedIndex` for new keyed tables: a
lookup is one hash and (at load <= MAX_LOAD) usually one cache line, prefetched a block ahead
in the decode pipeline, instead of a fence search plus a run of 16 keys; an insert or delete
touches a few slots instead of merging a delta part into the whole sorted array.  It costs
``12 * cap`` bytes: 12 / load bytes per ID (17-34 B at load 0.35-0.7 as it doubles) against
12.5 for the sorted index; with ``max_ids`` set the capacity stops at
``capacity_for(max_ids)``.

Writes and the serial find run in C (``kernels/hashindex.c``) on CPU tables when the library
was built; the torch code below is the reference (any device) and the fallback without a
compiler.  Its delete removes the IDs and re-inserts the rest of each touched cluster, which
keeps the same invariant as the backward shift (every held ID is reachable from its home slot
without crossing a free slot), though the slots it leaves may differ.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .kernels import cpu_c

EMPTY = -(2**63)  # INT64_MIN: the key of a free slot
HASH_MULTIPLIER = -7046029254386353131  # 0x9E3779B97F4A7C15 as signed int64 (torch wraps mod 2**64)
MIN_CAPACITY = 16
MAX_CAPACITY = 1 << 30  # slots fit the int32 the C pipeline parks them in
# Grow (double) before an insert would pass this load.  Measured (bench/results/keyed.md):
# lookups at 0.5-0.8 load differ little at batch 4096; 0.7 keeps probe runs short (expected
# 2.2 slots for a hit, 6 for a miss with linear probing) at 17-34 bytes per ID.
MAX_LOAD = 0.7
SLOT_BYTES = 12  # int64 key + int32 locator


def capacity_for(num_ids: int, max_load: float = MAX_LOAD) -> int:
    """Smallest power-of-two capacity that holds ``num_ids`` at or below ``max_load``."""
    need = max(MIN_CAPACITY, math.ceil(num_ids / max_load) if num_ids else MIN_CAPACITY)
    cap = 1 << (need - 1).bit_length()
    if cap > MAX_CAPACITY:
        raise ValueError(f"a hash index holds at most {int(MAX_CAPACITY * max_load)} IDs")
    return cap


def hash_index_bytes(num_ids: int) -> int:
    """Bytes a hash index of ``num_ids`` IDs built in one go holds."""
    return SLOT_BYTES * capacity_for(num_ids)


def home_slots(ids: torch.Tensor, capacity: int) -> torch.Tensor:
    """``int64`` home slot of each ID (the formula in the module docstring)."""
    shift = 64 - (capacity.bit_length() - 1)
    h = ids.to(torch.int64) * HASH_MULTIPLIER
    return (h >> shift) & (capacity - 1)  # the mask makes torch's arithmetic shift a logical one


def _torch_slots(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Slot holding each ID, or -1 (vectorized linear probing: one round per probe step)."""
    cap = keys.numel()
    out = torch.full(ids.shape, -1, dtype=torch.int64, device=ids.device)
    pending = torch.nonzero(ids != EMPTY).flatten()
    slot = home_slots(ids[pending], cap)
    want = ids[pending]
    while pending.numel():
        k = keys[slot]
        hit = k == want
        out[pending[hit]] = slot[hit]
        go_on = ~hit & (k != EMPTY)
        pending, slot, want = pending[go_on], (slot[go_on] + 1) & (cap - 1), want[go_on]
    return out


def _torch_upsert(keys: torch.Tensor, locator: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor) -> int:
    """Upsert unique ``ids``; returns how many were new.  Several new IDs reaching one free slot
    in a round: the first in batch order takes it, the others probe on."""
    cap = keys.numel()
    order = torch.arange(ids.numel(), device=ids.device)
    slot = home_slots(ids, cap)
    claim = torch.full((cap,), ids.numel(), dtype=torch.int64, device=ids.device)
    added = 0
    while order.numel():
        k = keys[slot]
        hit = k == ids[order]
        locator[slot[hit]] = locs[order[hit]]
        free = k == EMPTY
        won = torch.zeros_like(free)
        if bool(free.any()):
            fs, fo = slot[free], order[free]
            claim.scatter_reduce_(0, fs, fo, reduce="amin")
            first = claim[fs] == fo
            keys[fs[first]] = ids[fo[first]]
            locator[fs[first]] = locs[fo[first]]
            claim[fs] = ids.numel()
            added += int(first.sum())
            won[torch.nonzero(free).flatten()[first]] = True
        done = hit | won
        step = ~done & ~free  # a loser of a claim looks at the same slot again (now taken)
        slot = torch.where(step, (slot + 1) & (cap - 1), slot)[~done]
        order = order[~done]
    return added


def _torch_delete(keys: torch.Tensor, locator: torch.Tensor, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    cap = keys.numel()
    slots = _torch_slots(keys, ids)
    held = slots >= 0
    old = torch.full(ids.shape, -1, dtype=torch.int32, device=ids.device)
    if not bool(held.any()):
        return 0, old
    hs = slots[held]
    old[held] = locator[hs]
    keys[hs] = EMPTY
    locator[hs] = -1
    # the rest of each cluster after a hole may have probed across it: take it out, insert again
    tail = []
    cur = torch.unique((hs + 1) & (cap - 1))
    while cur.numel():
        cur = cur[keys[cur] != EMPTY]
        tail.append(cur)
        cur = torch.unique((cur + 1) & (cap - 1))
    moved = torch.unique(torch.cat(tail)) if tail else hs.new_empty(0)
    if moved.numel():
        mk, ml = keys[moved].clone(), locator[moved].clone()
        keys[moved] = EMPTY
        locator[moved] = -1
        _torch_upsert(keys, locator, mk, ml)
    return int(held.sum()), old


def _last_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the last occurrence of each distinct ID, in first-seen-last order."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=ids.device)
    last.scatter_reduce_(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amax")
    return torch.sort(last).values


class HashIndex:
    """Open-addressing ID -> locator map (layout in the module docstring)."""

    kind = "hash"
    positional = False

    def __init__(self, keys: torch.Tensor, locator: torch.Tensor) -> None:
        if keys.dtype != torch.int64 or locator.dtype != torch.int32 or keys.dim() != 1 or keys.shape != locator.shape:
            raise ValueError("hash index needs int64 keys and int32 locators of one length")
        cap = keys.numel()
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY or cap & (cap - 1):
            raise ValueError(f"hash index capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {cap}")
        self.keys = keys
        self.locator = locator
        occupied = keys != EMPTY
        self.count = int(occupied.sum())
        if self.count > cap * MAX_LOAD + 1:
            raise ValueError("hash index is fuller than its maximum load")
        if bool((self.locator[~occupied] != -1).any()):
            raise ValueError("a free hash slot has a locator")
        if self.count and not bool((_torch_slots(keys, keys[occupied]) == torch.nonzero(occupied).flatten()).all()):
            raise ValueError("hash index keys are not where probing finds them (duplicate or misplaced key)")

    @classmethod
    def empty(cls, capacity: int = MIN_CAPACITY, device: torch.device | str = "cpu") -> "HashIndex":
        return cls(
            torch.full((capacity,), EMPTY, dtype=torch.int64, device=device),
            torch.full((capacity,), -1, dtype=torch.int32, device=device),
        )

    @classmethod
    def build(cls, ids: torch.Tensor, locators: torch.Tensor, capacity: int | None = None) -> "HashIndex":
        """Index ``ids`` (unique); ``capacity`` defaults to the smallest that keeps MAX_LOAD."""
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() > 1 and torch.unique(ids).numel() != ids.numel():
            raise ValueError("IDs must be unique")
        index = cls.empty(capacity or capacity_for(ids.numel()), ids.device)
        index.assign(ids, locators.to(torch.int32))
        return index

    @property
    def capacity(self) -> int:
        return int(self.keys.numel())

    @property
    def load(self) -> float:
        return self.count / self.capacity

    def _compiled(self) -> bool:
        return self.keys.device.type == "cpu" and cpu_c.HASH_OPS_AVAILABLE

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device=self.keys.device, dtype=torch.int64).reshape(-1)
        if self._compiled():
            return cpu_c.hash_find(self.keys, self.locator, ids.contiguous())
        slots = _torch_slots(self.keys, ids)
        out = torch.full(ids.shape, -1, dtype=torch.int32, device=ids.device)
        held = slots >= 0
        out[held] = self.locator[slots[held]]
        return out

    def _grow_for(self, extra: int) -> None:
        if self.count + extra <= self.capacity * MAX_LOAD:
            return
        cap = capacity_for(self.count + extra)
        keys = torch.full((cap,), EMPTY, dtype=torch.int64, device=self.keys.device)
        locator = torch.full((cap,), -1, dtype=torch.int32, device=self.keys.device)
        if self._compiled():
            cpu_c.hash_rehash(self.keys, self.locator, keys, locator)
        else:
            held = self.keys != EMPTY
            _torch_upsert(keys, locator, self.keys[held], self.locator[held])
        self.keys, self.locator = keys, locator

    def assign(self, ids: torch.Tensor, locators: torch.Tensor) -> None:
        """Point ``ids`` at ``locators``; ``-1`` deletes.  A later duplicate wins.  In place: a
        write touches the probed slots only (plus a rehash when the load would pass MAX_LOAD)."""
        if ids.numel() == 0:
            return
        ids = ids.to(device=self.keys.device, dtype=torch.int64).reshape(-1)
        locators = locators.to(device=self.keys.device, dtype=torch.int32).reshape(-1)
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
        new = int((self.resolve(ids) < 0).sum())
        self._grow_for(new)
        if self._compiled():
            added = cpu_c.hash_upsert(self.keys, self.locator, ids, locators)
        else:
            added = _torch_upsert(self.keys, self.locator, ids, locators)
        self.count += added

    def delete(self, ids: torch.Tensor) -> torch.Tensor:
        """Remove ``ids`` (backward shift); returns the locators they had (-1 = not held)."""
        ids = ids.to(device=self.keys.device, dtype=torch.int64).reshape(-1).contiguous()
        if self._compiled():
            removed, old = cpu_c.hash_delete(self.keys, self.locator, ids)
        else:
            removed, old = _torch_delete(self.keys, self.locator, ids)
        self.count -= removed
        return old

    def live_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held IDs and their locators, in slot order."""
        held = self.keys != EMPTY
        return self.keys[held], self.locator[held]

    def sample(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Held IDs (and locators) at ``count`` slots drawn uniformly with ``generator``: the
        candidates of sampled eviction.  Free slots drawn are dropped; a slot drawn twice
        gives its ID once."""
        slots = torch.unique(torch.randint(0, self.capacity, (count,), generator=generator)).to(self.keys.device)
        keys = self.keys[slots]
        held = keys != EMPTY
        return keys[held], self.locator[slots[held]]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"index.keys": self.keys, "index.locator": self.locator}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "HashIndex":
        return cls(tensors["index.keys"], tensors["index.locator"])

    def to(self, device: torch.device) -> "HashIndex":
        return HashIndex(self.keys.to(device), self.locator.to(device))

    def c_view(self) -> Any:
        if not self._compiled():
            return None
        key = (self.keys.data_ptr(), self.locator.data_ptr(), self.keys.numel())
        if getattr(self, "_c_key", None) != key:
            self._c_view, self._c_key = cpu_c.hash_index(self.keys, self.locator), key
        return self._c_view

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()

    @property
    def nbytes(self) -> int:
        return SLOT_BYTES * self.capacity

    @property
    def num_ids(self) -> int:
        return self.count
