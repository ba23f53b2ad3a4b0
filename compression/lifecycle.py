"""Which IDs of a keyed table get a row: admission by count, capacity with eviction.

A keyed table fed by an online trainer meets new IDs forever.  Two rules bound it:

* **Admission** (``admit_min_count``): a new ID gets a row only once its count reaches the
  threshold; until then its upserts are *filtered* (counted, not stored) and its lookups get
  the table's unknown-ID policy (e.g. a binary-code hash tail).  Monolith's occurrence filter.
* **Capacity** (``max_ids``): when admitting a batch's new IDs would take the table past
  ``max_ids``, the held IDs with the lowest decayed counts are evicted first (deleted from the
  index, their slots freed); evicted IDs fall back to the unknown-ID policy like any other.

**Both are functions of the update log alone**, so a replay after a crash rebuilds the same
table.  That rules out the table's traffic sketch (fed by lookups, which are not in the log,
and decayed by wall-clock time).  The counts here are their own count-min sketch, fed only by
the upserts the applier takes from the log, in log order, as exact integers (an ``int32`` cell
per (row, column); integer adds do not depend on summation order) and decayed on the log's own
clock: every ``half_life_rows`` upserted rows every cell is halved (``>>= 1``).  The sketch
cells and the clock are saved with the table (tensors ``lifecycle.counts`` and
``lifecycle.clock``), at the log position of the snapshot, and count in the table's bytes.

**Eviction is sampled, O(batch)**: to evict ``k`` IDs, draw ``samples * k`` slots of the hash
index uniformly (a generator seeded from the log clock, so the draw is deterministic too), keep
the held IDs that are not in the batch, and evict the ``k`` with the lowest counts (ties: slot
order).  That evicts from about the lowest ``1 / samples`` quantile of counts - Redis's
approximated LFU makes the same trade (``maxmemory-samples``) - at ``samples * k`` probes and
sketch reads instead of a scan or a heap over every held ID.  The hash index layout it draws
from is itself a function of the log (inserts and backward-shift deletes in log order;
re-decisions repoint locators in place and never move keys).

Counting follows the *write* stream (the trainer's occurrences of an ID), not lookups: an ID
that is looked up a lot but never trained on is not protected from eviction by its lookups.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from .frequency import _MULTIPLIERS
from .hash_index import HashIndex

if TYPE_CHECKING:
    from .table import CompressedTable

_SEED_SALT = 0x5EED_1D5


@dataclass(frozen=True)
class LifecycleConfig:
    max_ids: int | None = None  # None: no capacity limit
    admit_min_count: int = 0  # 0 or 1: every ID is admitted on its first upsert
    half_life_rows: int = 1_000_000  # counts halve every this many upserted rows
    sketch_width: int = 1 << 18
    sketch_depth: int = 4
    eviction_samples: int = 8

    def __post_init__(self) -> None:
        if self.max_ids is not None and self.max_ids < 1:
            raise ValueError("max_ids must be >= 1")
        if self.admit_min_count < 0:
            raise ValueError("admit_min_count must be >= 0")
        if self.half_life_rows < 1:
            raise ValueError("half_life_rows must be >= 1")
        if self.sketch_width < 16 or not 1 <= self.sketch_depth <= len(_MULTIPLIERS):
            raise ValueError(f"sketch width must be >= 16 and depth 1..{len(_MULTIPLIERS)}")
        if self.eviction_samples < 1:
            raise ValueError("eviction_samples must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LifecycleConfig":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class GateResult:
    keep: torch.Tensor  # bool [n]: upserts (positions in the batch) that get a row
    filtered: int  # upserts refused by admission
    victims: torch.Tensor  # int64: held IDs (none of the batch's) to evict to make room

    @property
    def evicted(self) -> int:
        return int(self.victims.numel())


class IdLifecycle:
    """Admission counts and capacity of one keyed table (see the module docstring)."""

    def __init__(self, config: LifecycleConfig, counts: torch.Tensor | None = None, clock: torch.Tensor | None = None) -> None:
        self.config = config
        shape = (config.sketch_depth, config.sketch_width)
        self.counts = counts if counts is not None else torch.zeros(shape, dtype=torch.int32)
        if self.counts.dtype != torch.int32 or tuple(self.counts.shape) != shape:
            raise ValueError(f"lifecycle counts must be int32 {list(shape)}")
        # clock[0]: upserted rows counted so far; clock[1]: rows at which the next halving happens
        self.clock = clock if clock is not None else torch.tensor([0, config.half_life_rows], dtype=torch.int64)
        if self.clock.dtype != torch.int64 or tuple(self.clock.shape) != (2,):
            raise ValueError("lifecycle clock must be int64 [2]")
        self._mult = torch.tensor(_MULTIPLIERS[: config.sketch_depth], dtype=torch.int64)[:, None]
        self._mult_flat = self._mult.reshape(-1).contiguous()

    def _compiled(self) -> bool:
        """Whether kernels/sketch.c can count here (the same counts as the torch code below)."""
        from .kernels import cpu_c  # here: compression.kernels imports compression modules

        return cpu_c.SKETCH_OPS_AVAILABLE and self.counts.device.type == "cpu" and self.counts.is_contiguous()

    # ------------------------------------------------------------------ counts

    def _columns(self, ids: torch.Tensor) -> torch.Tensor:
        h = ids.to(torch.int64).cpu().reshape(1, -1) * self._mult
        return ((h >> 33) & 0x7FFFFFFF) % self.config.sketch_width

    def count(self, ids: torch.Tensor) -> None:
        """Count one occurrence per entry of ``ids`` and advance the log clock (halving the
        cells at each ``half_life_rows`` boundary it passes)."""
        if ids.numel() == 0:
            return
        if self._compiled():
            from .kernels import cpu_c

            cpu_c.sketch_add(self.counts, self._mult_flat, ids.to(device="cpu", dtype=torch.int64).reshape(-1).contiguous())
        else:
            cols = self._columns(ids)
            ones = torch.ones(ids.numel(), dtype=torch.int32)
            for r in range(self.config.sketch_depth):
                self.counts[r].index_add_(0, cols[r], ones)
        self.clock[0] += ids.numel()
        while int(self.clock[0]) >= int(self.clock[1]):
            self.counts >>= 1
            self.clock[1] += self.config.half_life_rows

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Decayed count of each ID (int32; never below the true decayed count)."""
        if self._compiled():
            from .kernels import cpu_c

            return cpu_c.sketch_min(self.counts, self._mult_flat, ids.to(device="cpu", dtype=torch.int64).reshape(-1).contiguous())
        cols = self._columns(ids)
        est = self.counts[0][cols[0]]
        for r in range(1, self.config.sketch_depth):
            est = torch.minimum(est, self.counts[r][cols[r]])
        return est

    # ------------------------------------------------------------------ the gate

    def gate(self, table: "CompressedTable", ids: torch.Tensor) -> GateResult:
        """Count an upsert batch, decide which of its upserts get a row, and choose the IDs to
        evict to make room (``victims``: the caller deletes them together with the batch's own
        writes, so that lookups see the entry all or nothing).  Reads the table and writes only
        these counts: call with the table's other writers held off (the service's write lock;
        lookups may go on), once per log entry, in log order."""
        index = table.index
        if not isinstance(index, HashIndex):
            raise ValueError("admission and capacity need a hash-indexed keyed table")
        ids = ids.to(torch.int64).cpu().reshape(-1)
        self.count(ids)
        cfg = self.config
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        uniq = torch.unique(ids)
        held = index.resolve(uniq).cpu() >= 0
        new = uniq[~held]
        if new.numel() and cfg.admit_min_count > 1:
            refused = new[self.estimate(new) < cfg.admit_min_count]
            if refused.numel():
                keep &= ~torch.isin(ids, refused)
                new = new[~torch.isin(new, refused)]
        victims = torch.empty(0, dtype=torch.int64)
        if cfg.max_ids is not None and new.numel():
            if new.numel() > cfg.max_ids:  # one batch brings more new IDs than the table holds
                order = torch.sort(self.estimate(new), descending=True, stable=True).indices
                refused = new[order[cfg.max_ids :]]
                keep &= ~torch.isin(ids, refused)
                new = new[order[: cfg.max_ids]]
            over = index.num_ids + new.numel() - cfg.max_ids
            if over > 0:
                victims = self._victims(index, over, uniq)
                short = over - victims.numel()  # the batch itself is (nearly) all the table holds
                if short > 0:
                    order = torch.sort(self.estimate(new), stable=True).indices
                    keep &= ~torch.isin(ids, new[order[:short]])
        return GateResult(keep, int((~keep).sum()), victims)

    def _victims(self, index: HashIndex, count: int, batch: torch.Tensor) -> torch.Tensor:
        """``count`` held IDs outside ``batch`` with the lowest counts among a sample."""
        gen = torch.Generator().manual_seed(int(self.clock[0]) ^ _SEED_SALT)
        draws = max(64, self.config.eviction_samples * count)
        for _ in range(4):
            cand, _ = index.sample(draws, gen)
            cand = cand.cpu()
            cand = cand[~torch.isin(cand, batch)]
            if cand.numel() >= count:
                break
            draws *= 4
        else:  # a table almost all of whose IDs are in this batch: take from all held IDs
            cand, _ = index.live_items()
            cand = cand.cpu()
            cand = cand[~torch.isin(cand, batch)]
        order = torch.sort(self.estimate(cand), stable=True).indices
        return cand[order[:count]]

    # ------------------------------------------------------------------ state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"lifecycle.counts": self.counts, "lifecycle.clock": self.clock}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "IdLifecycle":
        return cls(LifecycleConfig.from_dict(config), tensors["lifecycle.counts"].cpu(), tensors["lifecycle.clock"].cpu())

    def reconfigured(self, config: LifecycleConfig) -> "IdLifecycle":
        """The same counts under new limits (a new sketch shape starts counting afresh)."""
        same_shape = (config.sketch_depth, config.sketch_width) == (self.config.sketch_depth, self.config.sketch_width)
        clock = self.clock.clone()
        if config.half_life_rows != self.config.half_life_rows:
            clock[1] = clock[0] + config.half_life_rows
        return IdLifecycle(config, self.counts if same_shape else None, clock)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())
