"""What a lookup returns for an ID the table does not hold.

Five policies, chosen per table.  The last three compute a row from the ID itself with a few
gathers from small fp16 tables: fixed memory, defined for every int64 ID (seen or not), no
per-ID entry.  A table with *no* explicit rows and one of them is a pure hash embedding; a
table with the frequent IDs as explicit rows and one of them behind is the hybrid where the
hash embedding serves the tail and never-seen IDs.

* ``zero``        - the zero vector (the ID is still reported as not found).
* ``default``     - one stored fp32 vector ``[D]``, e.g. the mean of the tail rows or a learned
  "unknown" embedding.
* ``hashed``      - the hashing trick: an fp16 bucket table ``[K, D]``; ID ``x`` reads bucket
  :func:`bucket_of` ``(x, K)``.  Built post-training as the frequency-weighted mean of the
  known rows in each bucket, or trained (:class:`compression.training.methods.HashingTrickEmbedding`).
* ``qr``          - quotient-remainder embedding (Shi et al. 2020).  ``buckets`` is fp16
  ``[Q + M, D]``: Q quotient rows, then M remainder rows; ``params = [M, Q]``.  With
  ``h = x mod (Q * M)`` (non-negative): ``row = buckets[h // M] * buckets[Q + h % M]``
  (element-wise product, computed in fp32).  IDs ``0 .. Q*M-1`` get distinct pairs.
* ``binary_hash`` - BH, binary-code hash embedding (Yan et al., CIKM 2021).
  ``params = [S, k]``; ``buckets`` is fp16 ``[B * 2**k, D]`` with ``B = ceil(S / k)`` blocks.
  The ID is mixed by the bijective 64-bit :func:`mix64`; its low ``S`` bits are the binary
  code, cut into blocks of ``k`` consecutive bits ("succession"); block ``j`` with value ``v``
  reads row ``j * 2**k + v`` of its own sub-table; the row is the fp32 sum of the ``B`` block
  rows.  Two IDs whose codes differ share some block rows but never all of them.

Byte cost: the tensors above, nothing else (``params`` is a 2-entry int64 tensor, counted).
The functions :func:`hashed_rows`, :func:`qr_rows` and :func:`binary_hash_rows` are the decode
rule; the training modules in :mod:`compression.training.methods` call the same functions, which is why
an exported table serves exactly what the module computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

UnknownKind = Literal["zero", "default", "hashed", "qr", "binary_hash"]
UNKNOWN_KINDS: tuple[str, ...] = ("zero", "default", "hashed", "qr", "binary_hash")
# kinds whose row is computed from the ID out of the bucket table and two int64 parameters
_PARAM_KINDS = ("qr", "binary_hash")

# 64-bit multiplicative hash (Fibonacci hashing constant 0x9E3779B97F4A7C15 as signed int64);
# int64 multiplication wraps modulo 2**64 in torch on CPU and CUDA.
_GOLDEN = -7046029254386353131


def bucket_of(ids: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of each int64 ID: the high 31 bits of ``id * 0x9E3779B97F4A7C15 mod 2**64``, mod K."""
    h = ids.to(torch.int64) * _GOLDEN
    high = (h >> 33) & 0x7FFFFFFF  # mask turns the arithmetic shift into a logical one
    return high % num_buckets


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(ids: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping arithmetic): a bijection of the 64-bit IDs, so
    distinct IDs get distinct 64-bit codes, with every output bit depending on every input bit."""
    z = ids.to(torch.int64) + _GOLDEN
    z = (z ^ _shr(z, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ _shr(z, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return z ^ _shr(z, 31)


def hashed_rows(buckets: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Hashing-trick decode: ``float32 buckets[bucket_of(id, K)]``."""
    return buckets[bucket_of(ids, buckets.shape[0])].to(torch.float32)


def qr_slots(ids: torch.Tensor, num_remainders: int, num_quotients: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(quotient row, remainder row) of each ID, both zero-based in their own table."""
    h = torch.remainder(ids.to(torch.int64), num_remainders * num_quotients)
    return h // num_remainders, h % num_remainders


def qr_rows(buckets: torch.Tensor, ids: torch.Tensor, num_remainders: int, num_quotients: int) -> torch.Tensor:
    """QR decode: ``quotient[h // M] * remainder[h % M]`` in fp32 (layout in the module doc)."""
    q, r = qr_slots(ids, num_remainders, num_quotients)
    return buckets[q].to(torch.float32) * buckets[num_quotients + r].to(torch.float32)


def binary_hash_blocks(code_bits: int, block_bits: int) -> int:
    return -(-code_bits // block_bits)


def binary_hash_slots(ids: torch.Tensor, code_bits: int, block_bits: int) -> torch.Tensor:
    """``int64 [n, B]``: the bucket row each of an ID's ``B`` code blocks reads."""
    if not 1 <= block_bits <= code_bits <= 64:
        raise ValueError(f"binary hash needs 1 <= block bits <= code bits <= 64, got {block_bits}, {code_bits}")
    code = mix64(ids.reshape(-1))
    blocks = binary_hash_blocks(code_bits, block_bits)
    shifts = torch.arange(blocks, device=code.device, dtype=torch.int64) * block_bits
    width = torch.clamp(code_bits - shifts, max=block_bits)  # the last block may be shorter
    values = _shr_vec(code[:, None], shifts[None, :]) & ((torch.ones_like(width) << width) - 1)
    return values + shifts[None, :] // block_bits * (1 << block_bits)


def _shr_vec(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Logical right shift by a tensor of shift counts in ``[0, 63]``."""
    keep = torch.where(s == 0, torch.full_like(s, -1), (torch.ones_like(s) << (64 - s)) - 1)
    return (x >> s) & keep


def binary_hash_rows(buckets: torch.Tensor, ids: torch.Tensor, code_bits: int, block_bits: int) -> torch.Tensor:
    """BH decode: fp32 sum of the ``B`` block rows (sum fusion), ``[n, D]`` for ``n`` IDs."""
    slots = binary_hash_slots(ids, code_bits, block_bits)
    return buckets[slots].to(torch.float32).sum(dim=1)


@dataclass
class UnknownPolicy:
    kind: UnknownKind = "zero"
    default: torch.Tensor | None = None  # fp32 [D] for "default"
    buckets: torch.Tensor | None = None  # fp16 [K, D] for "hashed", "qr", "binary_hash"
    params: torch.Tensor | None = None  # int64 [2]: [M, Q] for "qr", [S, k] for "binary_hash"

    def __post_init__(self) -> None:
        if self.kind not in UNKNOWN_KINDS:
            raise ValueError(f"unknown-ID policy must be one of {UNKNOWN_KINDS}, got {self.kind!r}")
        if self.kind == "default" and self.default is None:
            raise ValueError("the 'default' policy needs a default vector")
        if self.kind in ("hashed", *_PARAM_KINDS) and (self.buckets is None or self.buckets.dim() != 2 or self.buckets.shape[0] == 0):
            raise ValueError(f"the {self.kind!r} policy needs a non-empty [K, D] bucket table")
        if self.kind in _PARAM_KINDS:
            if self.params is None or self.params.dtype != torch.int64 or tuple(self.params.shape) != (2,):
                raise ValueError(f"the {self.kind!r} policy needs int64 params [2]")
            a, b = (int(v) for v in self.params.tolist())
            assert self.buckets is not None
            if self.kind == "qr" and (a < 1 or b < 1 or a + b != self.buckets.shape[0]):
                raise ValueError("qr params [M, Q] must be positive and M + Q must equal the bucket rows")
            if self.kind == "binary_hash" and (
                not 1 <= b <= a <= 64 or binary_hash_blocks(a, b) * (1 << b) != self.buckets.shape[0]
            ):
                raise ValueError("binary_hash params [S, k] need 1 <= k <= S <= 64 and ceil(S/k) * 2**k bucket rows")

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The fallback rows of ``ids`` (float32 ``[n, D]``) for the bucket-table kinds."""
        assert self.buckets is not None
        if self.kind == "hashed":
            return hashed_rows(self.buckets, ids)
        assert self.params is not None
        a, b = (int(v) for v in self.params.tolist())
        if self.kind == "qr":
            return qr_rows(self.buckets, ids, a, b)
        return binary_hash_rows(self.buckets, ids, a, b)

    def fill(self, values: torch.Tensor, ids: torch.Tensor, unknown: torch.Tensor) -> None:
        """Write the fallback rows into ``values`` where ``unknown`` is set (in place)."""
        if self.kind == "zero":
            return  # decoders already wrote zeros for rows without a locator
        rows = torch.nonzero(unknown).flatten()
        if rows.numel() == 0:
            return
        # values may be fp16 / bf16 (the Triton path writes the asked dtype): cast, rounding once
        if self.kind == "default":
            assert self.default is not None
            values[rows] = self.default.to(values.device, values.dtype)
        else:
            values[rows] = self.rows(ids[rows]).to(values.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.default is not None:
            out["unknown.default"] = self.default
        if self.buckets is not None:
            out["unknown.buckets"] = self.buckets
        if self.params is not None:
            out["unknown.params"] = self.params
        return out

    @classmethod
    def from_state(cls, kind: str, tensors: dict[str, torch.Tensor]) -> "UnknownPolicy":
        return cls(kind, tensors.get("unknown.default"), tensors.get("unknown.buckets"), tensors.get("unknown.params"))  # type: ignore[arg-type]

    def to(self, device: torch.device) -> "UnknownPolicy":
        return UnknownPolicy(
            self.kind,
            None if self.default is None else self.default.to(device),
            None if self.buckets is None else self.buckets.to(device),
            None if self.params is None else self.params.to(device),
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
    if kind not in ("default", "hashed"):
        raise ValueError(f"only zero, default and hashed fallbacks are fitted from rows; {kind!r} is trained (compression.training.methods)")
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
