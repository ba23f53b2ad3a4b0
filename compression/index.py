"""ID -> locator maps.  A locator (one int32, see :mod:`compression.layout`) names a row's
class and slot; ``-1`` means the ID has no row.

Two kinds:

* :class:`DenseIndex` - IDs are ``0..N-1`` (a trainer's own vocabulary).  Stores only the
  locator array, 4 bytes per ID, no keys.
* :class:`KeyedIndex` - arbitrary int64 IDs (hashed features, user IDs).  A sorted key array
  with a parallel locator array, searched with ``torch.searchsorted`` (same code on CPU and
  GPU), plus a small sorted *delta* part that takes inserts.  The delta is merged into the main
  part once it outgrows a fraction of it (LSM style), so an insert never re-sorts the whole
  index.  12.5 bytes per ID (8 key + 4 locator + 1/16 of a key for the fence).
* :class:`compression.hash_index.HashIndex` - arbitrary int64 IDs in an open-addressing hash
  table, updated in place: the default for new keyed tables (see its module).
* :class:`RunIndex` - IDs are ``0..N-1`` *and* their locators come in runs (consecutive IDs in
  consecutive slots of one class), as they do when a trainer numbers its vocabulary by
  frequency and rows are laid out grouped by class: then the locator shrinks to the class
  boundaries, 12 bytes per run instead of 4 per ID.  This is what lets a pruned / mixed
  precision table reach 64x-128x with its index counted.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch

from .hash_index import HashIndex
from .kernels import cpu_c
from .layout import NO_ROW

# Merge the delta part once it holds more than max(_DELTA_MIN, main/_DELTA_FRACTION) keys.
_DELTA_MIN = 4096
_DELTA_FRACTION = 16


class IdIndex(Protocol):
    kind: str
    positional: bool  # IDs are positions 0..N-1 (no keys stored); negative IDs can never be held

    def resolve(self, ids: torch.Tensor) -> torch.Tensor: ...
    def assign(self, ids: torch.Tensor, locators: torch.Tensor) -> None: ...
    def live_items(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def to(self, device: torch.device) -> "IdIndex": ...
    def c_view(self) -> Any: ...
    def held_tensors(self) -> dict[str, torch.Tensor]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def num_ids(self) -> int: ...


class DenseIndex:
    """Locators for IDs ``0..N-1``; an ID outside that range is unknown."""

    kind = "dense"
    positional = True

    def __init__(self, locator: torch.Tensor) -> None:
        if locator.dtype != torch.int32 or locator.dim() != 1:
            raise ValueError("dense locator must be a 1-D int32 tensor")
        self.locator = locator

    @property
    def size(self) -> int:
        return int(self.locator.shape[0])

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.size
        if n == 0:
            return torch.full(ids.shape, NO_ROW, dtype=torch.int32, device=ids.device)
        inside = (ids >= 0) & (ids < n)
        loc = self.locator[ids.clamp(0, n - 1)]
        return torch.where(inside, loc, torch.full_like(loc, NO_ROW))

    def assign(self, ids: torch.Tensor, locators: torch.Tensor) -> None:
        """Point ``ids`` at ``locators`` (``-1`` deletes).  Grows by doubling for new high IDs."""
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0:
            raise ValueError("a dense table takes only IDs >= 0")
        grown = self.grown(int(ids.max()) + 1)
        if grown is not None:
            self.locator = grown.locator
        self.locator[ids] = locators.to(torch.int32)

    def grown(self, need: int) -> "DenseIndex | None":
        """This index with room for IDs below ``need``, doubling (what :meth:`assign` grows to), or
        None when it has it: a sole writer grows beside the lookups and takes (:meth:`take`) the
        result under their lock."""
        if need <= self.size:
            return None
        locator = torch.full((max(need, 2 * self.size),), NO_ROW, dtype=torch.int32, device=self.locator.device)
        locator[: self.size] = self.locator
        return DenseIndex(locator)

    def copy(self) -> "DenseIndex":
        """This index with a locator array of its own: what a sole writer writes beside the
        lookups and then takes (:meth:`take`) under their lock (compression/table.py)."""
        return DenseIndex(self.locator.clone())

    def take(self, other: "DenseIndex") -> None:
        """Serve ``other``'s locators from now on (a :meth:`copy` of this index, with no write to
        this one in between); readers take them at their next view (:meth:`c_view`)."""
        self.locator = other.locator

    def live_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.nonzero(self.locator >= 0).flatten()
        return ids.to(torch.int64), self.locator[ids]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"index.locator": self.locator}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "DenseIndex":
        return cls(tensors["index.locator"])

    def to(self, device: torch.device) -> "DenseIndex":
        return DenseIndex(self.locator.to(device))

    def c_view(self) -> Any:
        """The compiled decoder's view of this index (None off CPU); rebuilt when the locator
        array is replaced."""
        locator = self.locator
        ref = getattr(self, "_c_of", None)
        if ref is not None and ref() is locator:  # one weak reference per lookup (see HashIndex.c_view)
            return self._c_view
        if locator.device.type != "cpu" or not cpu_c.AVAILABLE:
            return None
        self._c_view, self._c_of = cpu_c.dense_index(locator), weakref.ref(locator)
        return self._c_view

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()

    @property
    def nbytes(self) -> int:
        return self.locator.numel() * self.locator.element_size()

    @property
    def num_ids(self) -> int:
        return int((self.locator >= 0).sum())


def _probe(keys: torch.Tensor, locs: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``ids`` in sorted ``keys`` and whether each was found there."""
    if keys.numel() == 0:
        return torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    pos = torch.searchsorted(keys, ids).clamp_(max=keys.numel() - 1)
    return pos, keys[pos] == ids


class KeyedIndex:
    """Sorted int64 keys + locators, with a delta part for inserts (see module docstring)."""

    kind = "keyed"
    positional = False

    def __init__(
        self,
        keys: torch.Tensor,
        locator: torch.Tensor,
        delta_keys: torch.Tensor | None = None,
        delta_locator: torch.Tensor | None = None,
    ) -> None:
        if keys.dtype != torch.int64 or locator.dtype != torch.int32 or keys.shape != locator.shape:
            raise ValueError("keyed index needs int64 keys and int32 locators of one length")
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("keys must be strictly increasing")
        self.keys = keys
        self.locator = locator
        self.delta_keys = delta_keys if delta_keys is not None else keys.new_empty(0)
        self.delta_locator = delta_locator if delta_locator is not None else locator.new_empty(0)
        self._refence()

    def _refence(self) -> None:
        # every FENCE-th key: a sparse copy (1/16 of the keys, mostly cache-resident), so the
        # compiled lookup touches one run of 16 keys per ID instead of ~log2(N) scattered ones
        self.fence = self.keys[:: cpu_c.FENCE].contiguous()

    @classmethod
    def build(cls, ids: torch.Tensor, locators: torch.Tensor) -> "KeyedIndex":
        order = torch.argsort(ids)
        keys = ids[order].to(torch.int64)
        if keys.numel() > 1 and not bool((keys[1:] != keys[:-1]).all()):
            raise ValueError("IDs must be unique")
        return cls(keys.contiguous(), locators[order].to(torch.int32).contiguous())

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        pos, hit = _probe(self.keys, self.locator, ids)
        if self.keys.numel():
            loc = torch.where(hit, self.locator[pos], torch.full(ids.shape, NO_ROW, dtype=torch.int32, device=ids.device))
        else:
            loc = torch.full(ids.shape, NO_ROW, dtype=torch.int32, device=ids.device)
        if self.delta_keys.numel():
            dpos, dhit = _probe(self.delta_keys, self.delta_locator, ids)
            loc = torch.where(dhit, self.delta_locator[dpos], loc)
        return loc

    def assign(self, ids: torch.Tensor, locators: torch.Tensor) -> None:
        """Point ``ids`` at ``locators``; ``-1`` deletes (a tombstone until the next merge)."""
        if ids.numel() == 0:
            return
        ids = ids.to(torch.int64)
        locators = locators.to(torch.int32)
        pos, hit = _probe(self.keys, self.locator, ids)
        if bool(hit.any()):
            self.locator[pos[hit]] = locators[hit]
        rest_ids, rest_locs = ids[~hit], locators[~hit]
        if rest_ids.numel() == 0:
            return
        dpos, dhit = _probe(self.delta_keys, self.delta_locator, rest_ids)
        if bool(dhit.any()):
            self.delta_locator[dpos[dhit]] = rest_locs[dhit]
        new_ids, new_locs = rest_ids[~dhit], rest_locs[~dhit]
        live = new_locs >= 0
        new_ids, new_locs = new_ids[live], new_locs[live]
        if new_ids.numel():
            keys = torch.cat([self.delta_keys, new_ids])
            locs = torch.cat([self.delta_locator, new_locs])
            order = torch.argsort(keys, stable=True)
            self.delta_keys, self.delta_locator = keys[order], locs[order]
        if self.delta_keys.numel() > max(_DELTA_MIN, self.keys.numel() // _DELTA_FRACTION):
            self.merge()

    def merge(self) -> None:
        """Fold the delta part into the sorted main part and drop tombstones."""
        keys = torch.cat([self.keys, self.delta_keys])
        locs = torch.cat([self.locator, self.delta_locator])
        live = locs >= 0
        keys, locs = keys[live], locs[live]
        order = torch.argsort(keys)
        self.keys = keys[order].contiguous()
        self.locator = locs[order].contiguous()
        self.delta_keys = self.keys.new_empty(0)
        self.delta_locator = self.locator.new_empty(0)
        self._refence()

    def live_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self.keys, self.delta_keys])
        locs = torch.cat([self.locator, self.delta_locator])
        live = locs >= 0
        return keys[live], locs[live]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "index.keys": self.keys,
            "index.locator": self.locator,
            "index.delta_keys": self.delta_keys,
            "index.delta_locator": self.delta_locator,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "KeyedIndex":
        return cls(
            tensors["index.keys"],
            tensors["index.locator"],
            tensors.get("index.delta_keys"),
            tensors.get("index.delta_locator"),
        )

    def to(self, device: torch.device) -> "KeyedIndex":
        return KeyedIndex(
            self.keys.to(device), self.locator.to(device), self.delta_keys.to(device), self.delta_locator.to(device)
        )

    def c_view(self) -> Any:
        if self.keys.device.type != "cpu" or not cpu_c.AVAILABLE:
            return None
        tensors = (self.keys, self.locator, self.fence, self.delta_keys, self.delta_locator)
        key = tuple((t.data_ptr(), t.numel()) for t in tensors)
        if getattr(self, "_c_key", None) != key:
            self._c_view, self._c_key = cpu_c.keyed_index(*tensors), key
        return self._c_view

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """State plus what is derived from it at load (the fence): what the process holds."""
        return {**self.state_tensors(), "index.fence": self.fence}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.held_tensors().values())

    @property
    def num_ids(self) -> int:
        return int((self.locator >= 0).sum()) + int((self.delta_locator >= 0).sum())


class RunIndex:
    """A dense locator array, run-length encoded.

    Stored: ``bounds`` int64 ``[R + 1]`` (strictly increasing, ``bounds[0] = 0``) and ``bases``
    int32 ``[R]``.  ID ``i`` with ``bounds[r] <= i < bounds[r + 1]`` has locator
    ``bases[r] + (i - bounds[r])`` (the slot part counts up inside the run), or no row when
    ``bases[r] == -1``; IDs outside ``[0, bounds[R])`` have no row.  ``8 (R + 1) + 4 R`` bytes.

    Writes decode the runs to a dense locator, assign, and encode again: O(N) per batch, fine
    for the exported, read-mostly tables this index is for (a table that takes a stream of
    writes should use :class:`DenseIndex`).  The compiled decoder has no view of it; lookups
    resolve with ``torch.searchsorted`` and then decode on whatever backend the table uses.
    """

    kind = "runs"
    positional = True

    def __init__(self, bounds: torch.Tensor, bases: torch.Tensor) -> None:
        if bounds.dtype != torch.int64 or bases.dtype != torch.int32 or bounds.dim() != 1 or bases.dim() != 1:
            raise ValueError("run index needs int64 bounds and int32 bases")
        if bounds.numel() != bases.numel() + 1 or int(bounds[0]) != 0:
            raise ValueError("run index bounds must be [R + 1] starting at 0")
        if bases.numel() and not bool((bounds[1:] > bounds[:-1]).all()):
            raise ValueError("run bounds must be strictly increasing")
        self.bounds = bounds
        self.bases = bases

    @classmethod
    def from_locator(cls, locator: torch.Tensor) -> "RunIndex":
        """Run-length encode a dense locator array (``int32 [N]``, ``-1`` = no row)."""
        loc = locator.to(torch.int64)
        n = loc.numel()
        if n == 0:
            return cls(torch.zeros(1, dtype=torch.int64, device=locator.device), torch.empty(0, dtype=torch.int32, device=locator.device))
        both_missing = (loc[1:] < 0) & (loc[:-1] < 0)
        steps = (loc[1:] >= 0) & (loc[:-1] >= 0) & (loc[1:] == loc[:-1] + 1)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=loc.device), torch.nonzero(~(both_missing | steps)).flatten() + 1])
        bounds = torch.cat([starts, torch.tensor([n], dtype=torch.int64, device=loc.device)])
        bases = torch.where(loc[starts] >= 0, loc[starts], torch.full_like(starts, NO_ROW)).to(torch.int32)
        return cls(bounds.contiguous(), bases.contiguous())

    @property
    def size(self) -> int:
        return int(self.bounds[-1])

    @property
    def num_runs(self) -> int:
        return int(self.bases.numel())

    def to_locator(self) -> torch.Tensor:
        """The dense ``int32 [N]`` locator array these runs encode."""
        lengths = self.bounds[1:] - self.bounds[:-1]
        run = torch.repeat_interleave(torch.arange(self.num_runs, device=self.bounds.device), lengths)
        offset = torch.arange(self.size, device=self.bounds.device) - self.bounds[run]
        base = self.bases[run].to(torch.int64)
        return torch.where(base >= 0, base + offset, torch.full_like(base, NO_ROW)).to(torch.int32)

    def resolve(self, ids: torch.Tensor) -> torch.Tensor:
        if self.num_runs == 0:
            return torch.full(ids.shape, NO_ROW, dtype=torch.int32, device=ids.device)
        inside = (ids >= 0) & (ids < self.bounds[-1])
        run = (torch.searchsorted(self.bounds, ids, right=True) - 1).clamp_(0, self.num_runs - 1)
        base = self.bases[run].to(torch.int64)
        loc = base + (ids - self.bounds[run])
        return torch.where(inside & (base >= 0), loc, torch.full_like(loc, NO_ROW)).to(torch.int32)

    def assign(self, ids: torch.Tensor, locators: torch.Tensor) -> None:
        if ids.numel() == 0:
            return
        dense = DenseIndex(self.to_locator().clone())
        dense.assign(ids, locators)
        fresh = RunIndex.from_locator(dense.locator)
        self.bounds, self.bases = fresh.bounds, fresh.bases

    def live_items(self) -> tuple[torch.Tensor, torch.Tensor]:
        locator = self.to_locator()
        ids = torch.nonzero(locator >= 0).flatten()
        return ids.to(torch.int64), locator[ids]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"index.bounds": self.bounds, "index.bases": self.bases}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "RunIndex":
        return cls(tensors["index.bounds"], tensors["index.bases"])

    def to(self, device: torch.device) -> "RunIndex":
        return RunIndex(self.bounds.to(device), self.bases.to(device))

    def c_view(self) -> Any:
        return None  # resolved in torch; the decode itself still takes the compiled path

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_tensors()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    @property
    def num_ids(self) -> int:
        lengths = self.bounds[1:] - self.bounds[:-1]
        return int(lengths[self.bases >= 0].sum())


def run_index_bytes(num_runs: int) -> int:
    """Bytes a :class:`RunIndex` of ``num_runs`` runs holds."""
    return 8 * (num_runs + 1) + 4 * num_runs


def index_from_state(kind: str, tensors: dict[str, torch.Tensor]) -> IdIndex:
    if kind == DenseIndex.kind:
        return DenseIndex.from_state(tensors)
    if kind == KeyedIndex.kind:
        return KeyedIndex.from_state(tensors)
    if kind == RunIndex.kind:
        return RunIndex.from_state(tensors)
    if kind == HashIndex.kind:
        return HashIndex.from_state(tensors)
    raise ValueError(f"unknown index kind {kind!r}")
