"""How often each ID is used, in bounded memory: a count-min sketch of exponentially decayed
counts, fed by lookups and updates.

Tables can hold hundreds of millions of IDs and traffic meets IDs the table does not hold, so
exact per-ID counters would cost as much as the rows.  A count-min sketch of ``depth x width``
float32 cells over-estimates a count by at most ``e * total / width`` with probability
``1 - exp(-depth)``; frequent IDs, the ones whose storage class matters most, are estimated
well.  Decay (multiply every cell by ``0.5 ** (elapsed / half_life)``) makes the counts follow
what traffic does now rather than what it did last week, as SCALL's streaming setting needs.
"""

from __future__ import annotations

import math
import threading
import time

import torch

# distinct odd 64-bit multipliers (as signed int64) for the rows of the sketch
_MULTIPLIERS = (
    -7046029254386353131,  # 0x9E3779B97F4A7C15
    -4658895280553007687,  # 0xBF58476D1CE4E5B9
    -7723592293110705685,  # 0x94D049BB133111EB
    2870177450012600261,  # 0x27D4EB2F165667C5
    -3573116209616315251,  # 0xCE6A3F2D9C0B5C8D
    6808368508117087011,  # 0x5E7C1F3A2B4D6E23
)


class DecayedCountMinSketch:
    def __init__(self, width: int = 1 << 20, depth: int = 4, half_life_s: float = 3600.0) -> None:
        if not 1 <= depth <= len(_MULTIPLIERS):
            raise ValueError(f"depth must be 1..{len(_MULTIPLIERS)}")
        self.width = width
        self.depth = depth
        self.half_life_s = half_life_s
        self.cells = torch.zeros((depth, width), dtype=torch.float32)
        self._mult = torch.tensor(_MULTIPLIERS[:depth], dtype=torch.int64)[:, None]
        self._mult_flat = self._mult.reshape(-1).contiguous()
        self._last_decay = time.monotonic()
        self._lock = threading.Lock()
        self.total = 0.0

    def _columns(self, ids: torch.Tensor) -> torch.Tensor:
        h = ids.to(torch.int64).reshape(1, -1) * self._mult
        return ((h >> 33) & 0x7FFFFFFF) % self.width

    def decay(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = now - self._last_decay
        if elapsed <= 0 or self.half_life_s <= 0:
            return
        factor = 0.5 ** (elapsed / self.half_life_s)
        with self._lock:
            self.cells *= factor
            self.total *= factor
            self._last_decay = now

    def _compiled(self) -> torch.Tensor | None:
        """The row multipliers as the compiled sketch ops take them, when they can run here."""
        from .kernels import cpu_c  # here: compression.kernels imports compression modules

        if cpu_c.SKETCH_OPS_AVAILABLE and self.cells.device.type == "cpu" and self.cells.is_contiguous():
            return self._mult_flat
        return None

    def add(self, ids: torch.Tensor, weight: float = 1.0) -> None:
        if ids.numel() == 0:
            return
        mult = self._compiled()
        if mult is not None:  # kernels/sketch.c: the same sums, no [depth, n] temporaries
            from .kernels import cpu_c

            flat = ids.to(device="cpu", dtype=torch.int64).reshape(-1).contiguous()
            with self._lock:
                cpu_c.sketch_add(self.cells, mult, flat, weight)
                self.total += weight * ids.numel()
            return
        cols = self._columns(ids.cpu())
        ones = torch.full((ids.numel(),), weight, dtype=torch.float32)
        with self._lock:
            for r in range(self.depth):
                self.cells[r].index_add_(0, cols[r], ones)
            self.total += weight * ids.numel()

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Decayed count estimate per ID (never below the true decayed count)."""
        mult = self._compiled()
        if mult is not None:
            from .kernels import cpu_c

            with self._lock:
                return cpu_c.sketch_min(self.cells, mult, ids.to(device="cpu", dtype=torch.int64).reshape(-1).contiguous())
        cols = self._columns(ids.cpu())
        with self._lock:
            est = self.cells[0][cols[0]]
            for r in range(1, self.depth):
                est = torch.minimum(est, self.cells[r][cols[r]])
        return est

    @property
    def nbytes(self) -> int:
        return self.cells.numel() * 4

    @staticmethod
    def width_for(error: float) -> int:
        """Width giving an over-estimate of at most ``error`` x total traffic (with prob. 1-e^-depth)."""
        return 1 << max(8, math.ceil(math.log2(math.e / error)))
