"""What a lookup returns for an ID the table does not hold.

Three policies, chosen per table:

* ``zero``    - the zero vector (the ID is still reported as not found).
* ``default`` - one stored fp32 vector ``[D]``, e.g. the mean of the tail rows or a learned
  "unknown" embedding.
* ``hashed``  - a small fp16 bucket table ``[K, D]``; an unknown ID reads bucket
  :func:`bucket_of` ``(id) % K``.  Fixed memory, defined for every ID: the cold-tail fallback
  that hash embeddings (BH, QR) are trained to fill.  Built post-training as the
  frequency-weighted mean of the known rows that fall in each bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

UnknownKind = Literal["zero", "default", "hashed"]
UNKNOWN_KINDS: tuple[str, ...] = ("zero", "default", "hashed")

# 64-bit multiplicative hash (Fibonacci hashing constant 0x9E3779B97F4A7C15 as signed int64);
# int64 multiplication wraps modulo 2**64 in torch on CPU and CUDA.
_GOLDEN = -7046029254386353131


def bucket_of(ids: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of each int64 ID: the high 31 bits of ``id * 0x9E3779B97F4A7C15 mod 2**64``, mod K."""
    h = ids.to(torch.int64) * _GOLDEN
    high = (h >> 33) & 0x7FFFFFFF  # mask turns the arithmetic shift into a logical one
    return high % num_buckets


@dataclass
class UnknownPolicy:
    kind: UnknownKind = "zero"
    default: torch.Tensor | None = None  # fp32 [D] for "default"
    buckets: torch.Tensor | None = None  # fp16 [K, D] for "hashed"

    def __post_init__(self) -> None:
        if self.kind not in UNKNOWN_KINDS:
            raise ValueError(f"unknown-ID policy must be one of {UNKNOWN_KINDS}, got {self.kind!r}")
        if self.kind == "default" and self.default is None:
            raise ValueError("the 'default' policy needs a default vector")
        if self.kind == "hashed" and (self.buckets is None or self.buckets.shape[0] == 0):
            raise ValueError("the 'hashed' policy needs a non-empty bucket table")

    def fill(self, values: torch.Tensor, ids: torch.Tensor, unknown: torch.Tensor) -> None:
        """Write the fallback rows into ``values`` where ``unknown`` is set (in place)."""
        if self.kind == "zero":
            return  # decoders already wrote zeros for rows without a locator
        rows = torch.nonzero(unknown).flatten()
        if rows.numel() == 0:
            return
        if self.kind == "default":
            assert self.default is not None
            values[rows] = self.default.to(values.device)
        else:
            assert self.buckets is not None
            b = bucket_of(ids[rows], self.buckets.shape[0])
            values[rows] = self.buckets[b].to(torch.float32)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.default is not None:
            out["unknown.default"] = self.default
        if self.buckets is not None:
            out["unknown.buckets"] = self.buckets
        return out

    @classmethod
    def from_state(cls, kind: str, tensors: dict[str, torch.Tensor]) -> "UnknownPolicy":
        return cls(kind, tensors.get("unknown.default"), tensors.get("unknown.buckets"))  # type: ignore[arg-type]

    def to(self, device: torch.device) -> "UnknownPolicy":
        return UnknownPolicy(
            self.kind,
            None if self.default is None else self.default.to(device),
            None if self.buckets is None else self.buckets.to(device),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())


def build_unknown_policy(
    kind: UnknownKind,
    rows: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_buckets: int = 1024,
) -> UnknownPolicy:
    """Fit the fallback from the table's own rows (frequency-weighted means)."""
    if kind == "zero":
        return UnknownPolicy("zero")
    w = weights.to(torch.float32).clamp(min=0) + 1e-12
    if kind == "default":
        mean = (rows.to(torch.float32) * w[:, None]).sum(0) / w.sum()
        return UnknownPolicy("default", default=mean.contiguous())
    dim = rows.shape[1]
    b = bucket_of(ids, num_buckets)
    sums = torch.zeros((num_buckets, dim), dtype=torch.float32, device=rows.device)
    sums.index_add_(0, b, rows.to(torch.float32) * w[:, None])
    mass = torch.zeros(num_buckets, dtype=torch.float32, device=rows.device).index_add_(0, b, w)
    buckets = sums / mass.clamp(min=1e-12)[:, None]
    return UnknownPolicy("hashed", buckets=buckets.to(torch.float16).contiguous())
