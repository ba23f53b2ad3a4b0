"""DPQ and MGQE: product-quantized embeddings learned inside the model, served as PQ row classes.

**DPQ** (differentiable product quantization, Chen et al. 2020; the VQ variant the VLDB 2024
benchmark runs).  Every ID has a *query* row ``q`` (a training-time parameter only); the row is
cut into ``m`` sub-vectors, and each is replaced by its nearest centroid in that sub-space's
codebook of ``2**k`` centroids.  The forward pass outputs the centroids (straight-through: the
gradient goes to ``q`` unchanged), and a VQ loss pulls each chosen centroid towards its query
sub-vector, plus ``beta`` times a commitment term pulling the query towards the centroid.
After training only the codes and the codebook are kept.

**MGQE** (multi-granular quantized embeddings, Kang et al. 2020): DPQ where the ``head_fraction``
most frequent IDs may pick among all ``2**k_head`` centroids of each sub-space and the others
only among the first ``2**k_tail`` (frequent IDs get more centroids, rare IDs shorter codes).

**Budgets.**  :meth:`CodebookEmbedding.for_budget` picks ``m`` and the code widths so that the
exported table fits; when even 1-byte codes for every ID do not fit, the rarest IDs get no row
and share one learned vector instead, served by the table's ``default`` unknown-ID policy
(``found = false`` for them, as for any ID without a row; 4 D bytes).

What it stores (exported).  One PQ class per code width (:mod:`compression.layout`):
``ceil(m*k/8)`` bytes of codes per ID and an fp16 codebook ``[m, 2**k, D/m]`` per class (MGQE's
tail class holds a copy of the first ``2**k_tail`` centroids, so each class decodes on its own;
those bytes are counted).  The index is the run-length encoded locator when that is smaller than
a dense one (a frequency-numbered vocabulary has 2-3 runs).  Decode: ``m`` gathers.

In eval mode ``forward(ids)`` equals ``export().lookup(ids).values`` bit for bit: both gather the
same codes from the same fp16 centroids (the forward rounds the codebook to fp16 too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ... import pq
from ...allocation import BudgetTooSmall
from ...index import DenseIndex, RunIndex, run_index_bytes
from ...layout import RowClass, encode_locator
from ...table import CompressedTable
from ...unknown import UnknownPolicy
from .base import ServableEmbedding, fp16_rounded, straight_through


class CodebookEmbedding(ServableEmbedding):
    """Per ID a query row (training only) quantized to ``m`` codebook centroids; see module doc.

    ``rank`` of an ID is its position in descending ``frequencies`` (ties by ID).  IDs of rank
    ``< num_head`` use ``2**bits_head`` centroids per sub-space, ranks ``< num_coded``
    ``2**bits_tail``, and the rest have no row (zeros)."""

    def __init__(
        self,
        num_ids: int,
        dim: int,
        m: int,
        bits_head: int,
        bits_tail: int | None = None,
        num_head: int | None = None,
        num_coded: int | None = None,
        frequencies: torch.Tensor | None = None,
        beta: float = 0.25,
        vq_weight: float = 1.0,
        init_std: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        bits_tail = bits_head if bits_tail is None else bits_tail
        if not 1 <= bits_tail <= bits_head <= 8:
            raise ValueError("code widths must satisfy 1 <= bits_tail <= bits_head <= 8")
        self.head_class = RowClass(dim, bits_head, m)
        self.tail_class = RowClass(dim, bits_tail, m)
        self.dim, self.m = dim, m
        self.num_head = num_ids if num_head is None else max(0, min(num_head, num_ids))
        self.num_coded = num_ids if num_coded is None else max(self.num_head, min(num_coded, num_ids))
        self.beta, self.vq_weight = beta, vq_weight
        freqs = torch.zeros(num_ids) if frequencies is None else frequencies.to(torch.float64).reshape(-1)
        if freqs.numel() != num_ids:
            raise ValueError("one frequency per ID")
        order = torch.argsort(-freqs, stable=True) if frequencies is not None else torch.arange(num_ids)
        rank = torch.empty(num_ids, dtype=torch.int64)
        rank[order] = torch.arange(num_ids)
        self.register_buffer("rank", rank)
        gen = torch.Generator().manual_seed(seed)
        self.query = nn.Parameter(torch.randn(num_ids, dim, generator=gen) * init_std)
        # centroids start at random query sub-vectors, so no code starts out unused
        picks = torch.randint(0, num_ids, (m, 1 << bits_head), generator=gen)
        sub = self.query.detach().reshape(num_ids, m, dim // m)
        self.codebook = nn.Parameter(sub[picks, torch.arange(m).unsqueeze(1)].clone())  # [m, K, s]
        # the IDs left without a row (budget too small to code them all) share one learned
        # vector, served as the table's ``default`` unknown-ID policy (fp32 [D], counted)
        self.default = nn.Parameter(torch.zeros(dim), requires_grad=self.num_coded < num_ids)
        self._vq_loss: torch.Tensor | None = None
        self._codes_cache: tuple[tuple[int, int, int, int], torch.Tensor] | None = None

    @property
    def num_ids(self) -> int:
        return int(self.query.shape[0])

    @property
    def pruned(self) -> bool:
        """Some IDs have no row (they get the shared default vector)."""
        return self.num_coded < self.num_ids

    @property
    def tail_centroids(self) -> int:
        return 1 << self.tail_class.bits

    def _codes(self, q: torch.Tensor, cb: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Nearest allowed centroid per sub-vector: int64 ``[n, m]`` (tail IDs: first 2**k_tail)."""
        n = q.shape[0]
        sub = q.reshape(n, self.m, -1).transpose(0, 1)  # [m, n, s]
        dist = torch.baddbmm((cb * cb).sum(dim=2).unsqueeze(1), sub, cb.transpose(1, 2), alpha=-2.0)  # [m, n, K]
        if self.tail_class.bits < self.head_class.bits:
            allowed = torch.arange(cb.shape[1]) < self.tail_centroids
            dist = torch.where(head.view(1, n, 1) | allowed.view(1, 1, -1), dist, torch.full_like(dist, float("inf")))
        return dist.argmin(dim=2).T

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        rank = self.rank[ids]
        coded = rank < self.num_coded
        out = torch.zeros((ids.numel(), self.dim), dtype=torch.float32)
        if self.pruned:
            out = out + self.default * (~coded).unsqueeze(1)  # exactly ``default`` (x * 1.0 + 0.0)
        if not bool(coded.any()):
            return out
        cid = ids[coded]
        q = self.query[cid]
        cb = fp16_rounded(self.codebook)  # what the table stores
        if self.training:
            codes = self._codes(q.detach(), cb.detach(), rank[coded] < self.num_head)
        else:  # exactly the export's codes (one batched computation over all IDs, cached)
            codes = self.codes()[cid]
        n = cid.numel()
        cent = cb[torch.arange(self.m).expand(n, self.m), codes].reshape(n, self.dim)  # gradient -> codebook
        if self.training:
            vq = (cent - q.detach()).pow(2).sum(dim=1).mean() + self.beta * (q - cent.detach()).pow(2).sum(dim=1).mean()
            self._vq_loss = vq if self._vq_loss is None else self._vq_loss + vq
        out = out.to(q.dtype)
        out[coded] = straight_through(q, cent.detach())
        return out

    def penalty(self) -> torch.Tensor | None:
        loss, self._vq_loss = self._vq_loss, None
        return None if loss is None else self.vq_weight * loss

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """Codes of every ID (``[N, m]``; rows of uncoded IDs are meaningless), recomputed only
        when the parameters changed."""
        key = (self.query._version, self.codebook._version, self.query.data_ptr(), self.codebook.data_ptr())
        if self._codes_cache is None or self._codes_cache[0] != key:
            cb = self.codebook.detach().to(torch.float16).to(torch.float32)
            self._codes_cache = (key, self._codes(self.query.detach(), cb, self.rank < self.num_head))
        return self._codes_cache[1]

    @torch.no_grad()
    def export(self) -> CompressedTable:
        n = self.num_ids
        codes = self.codes()
        cb16 = self.codebook.detach().to(torch.float16)
        classes: list[RowClass] = [self.head_class]
        books: list[torch.Tensor | None] = [cb16]
        tail = self.tail_class.bits < self.head_class.bits and self.num_coded > self.num_head
        if tail:
            classes.append(self.tail_class)
            books.append(cb16[:, : self.tail_centroids].clone())
        class_of = torch.full((n,), -1, dtype=torch.int64)
        class_of[self.rank < self.num_coded] = 1 if tail else 0
        class_of[self.rank < self.num_head] = 0
        unknown = UnknownPolicy("default", default=self.default.detach().to(torch.float32).clone()) if self.pruned else None
        return codes_table(self.dim, codes, class_of, classes, books, unknown)

    @staticmethod
    def table_bytes(num_ids: int, dim: int, m: int, bits_head: int, bits_tail: int, num_head: int, num_coded: int, index_bytes: int) -> int:
        """Bytes of the exported table (``index_bytes``: what its index will hold)."""
        head, tail = RowClass(dim, bits_head, m), RowClass(dim, bits_tail, m)
        has_tail = bits_tail < bits_head and num_coded > num_head
        rows = num_head * head.row_bytes + (num_coded - num_head) * (tail.row_bytes if has_tail else head.row_bytes)
        default = 4 * dim if num_coded < num_ids else 0
        return rows + head.codebook_bytes + (tail.codebook_bytes if has_tail else 0) + index_bytes + default

    @classmethod
    def for_budget(
        cls,
        num_ids: int,
        dim: int,
        frequencies: torch.Tensor,
        budget_bytes: int,
        mgqe: bool = True,
        head_fraction: float = 0.1,
        sub_dims: Sequence[int] = (1, 2, 4, 8, 16),
        **kwargs: object,
    ) -> "CodebookEmbedding":
        """The first of :meth:`configs_for_budget` (its rule below), built."""
        best = cls.configs_for_budget(num_ids, dim, budget_bytes, mgqe, head_fraction, sub_dims)[0]
        return cls(num_ids, dim, frequencies=frequencies, **best, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def configs_for_budget(
        cls,
        num_ids: int,
        dim: int,
        budget_bytes: int,
        mgqe: bool = True,
        head_fraction: float = 0.1,
        sub_dims: Sequence[int] = (1, 2, 4, 8, 16),
    ) -> list[dict[str, int]]:
        """The configuration that fits ``budget_bytes`` coding the most IDs, then with the longest
        tail codes (most IDs are in the tail), then with the most code bits in all.  DPQ (``mgqe=False``): one width ``k`` in ``{8, 6, 5, 4, 3, 2, 1}``; MGQE:
        ``(k_head, k_tail)`` in ``{(8, 4), (6, 4), (6, 3), (5, 3), (4, 2), (4, 3), (8, 6)}`` with at
        least the ``head_fraction`` most frequent IDs at ``k_head`` - more when the budget has
        bytes left once every ID is coded - or, when that codes fewer IDs, one width like DPQ.
        Every ``(m, k_head, k_tail)`` that fits, best first by that rule: the rule is a proxy, so
        a trainer with a validation set should train the first few and keep the best (the
        quality bench trains three; at MovieLens 1/64 the third beat the first by 1.1 AUC points).  Assumes a frequency-numbered vocabulary for the index
        estimate (3 runs); the export's real index is checked against the budget."""
        # 1-bit codes: at the highest ratios a byte per ID is all there is, and 8 sub-spaces of 2
        # centroids code more IDs in it than 4 of 4 (a smaller codebook): MovieLens at 1/128,
        # 1,562 vs 1,498 IDs coded, test AUC -3.34% vs -4.51% (bench/results/quality.md)
        single = [(k, k) for k in (8, 6, 5, 4, 3, 2, 1)]
        widths = [(8, 4), (6, 4), (6, 3), (5, 3), (4, 2), (4, 3), (8, 6), *single] if mgqe else single
        index_bytes = min(run_index_bytes(3), 4 * num_ids)
        found: list[tuple[tuple[int, int, int, int], dict[str, int]]] = []

        def largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
            """The largest x in [lo, hi] with fits(x) (fits is monotone decreasing), or lo - 1."""
            lo -= 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid - 1
            return lo

        for s in sub_dims:
            if dim % s:
                continue
            m = dim // s
            for kh, kl in widths:
                min_head = int(round(head_fraction * num_ids)) if kh > kl else num_ids

                def size(nh: int, coded: int) -> int:
                    return cls.table_bytes(num_ids, dim, m, kh, kl, min(nh, coded), coded, index_bytes)  # noqa: B023

                coded = largest(1, num_ids, lambda c: size(min_head, c) <= budget_bytes)  # noqa: B023
                if coded < 1:
                    continue
                # MGQE: bytes left after coding every ID buy long codes for more frequent IDs
                nh = largest(min(min_head, coded), coded, lambda h: size(h, coded) <= budget_bytes)  # noqa: B023
                bits = nh * m * kh + (coded - nh) * m * kl
                # the tail holds most IDs: its code length first, then what the head gets on top;
                # ties: fewer, longer sub-vectors (more centroids each)
                score = (coded, m * kl, bits, -m)
                found.append((score, dict(m=m, bits_head=kh, bits_tail=kl, num_head=nh, num_coded=coded)))
        if not found:
            raise BudgetTooSmall(f"no DPQ/MGQE configuration of a {num_ids} x {dim} table fits {budget_bytes} bytes")
        found.sort(key=lambda f: f[0], reverse=True)  # stable: equal scores keep the search order

        def layout(c: dict[str, int]) -> tuple[int, int, int, int]:
            head, tail = RowClass(dim, c["bits_head"], c["m"]), RowClass(dim, c["bits_tail"], c["m"])
            return c["num_coded"], c["num_head"], head.row_bytes, tail.row_bytes

        # drop configurations another one beats on every count: the same IDs coded in rows of the
        # same bytes, with at least as many code bits (d16pq4x1 wastes half of d16pq8x1's byte)
        kept: list[dict[str, int]] = []
        for _, c in found:
            if not any(
                layout(k) == layout(c) and k["m"] * k["bits_head"] >= c["m"] * c["bits_head"] and k["m"] * k["bits_tail"] >= c["m"] * c["bits_tail"]
                for k in kept
            ):
                kept.append(c)
        return kept

    def describe(self) -> str:
        tail = f", tail k={self.tail_class.bits}" if self.tail_class.bits < self.head_class.bits else ""
        return f"m={self.m}, k={self.head_class.bits}{tail}, head {self.num_head}, coded {self.num_coded} of {self.num_ids}"


def DPQEmbedding(num_ids: int, dim: int, m: int, bits: int, **kwargs: object) -> CodebookEmbedding:  # noqa: N802 - a constructor
    """DPQ: every ID picks among all ``2**bits`` centroids of each of ``m`` sub-spaces."""
    return CodebookEmbedding(num_ids, dim, m, bits, bits, **kwargs)  # type: ignore[arg-type]


def MGQEEmbedding(  # noqa: N802 - a constructor
    num_ids: int, dim: int, m: int, frequencies: torch.Tensor, bits_head: int = 8, bits_tail: int = 4, head_fraction: float = 0.1, **kwargs: object
) -> CodebookEmbedding:
    """MGQE: the ``head_fraction`` most frequent IDs use ``2**bits_head`` centroids, the rest
    the first ``2**bits_tail``."""
    return CodebookEmbedding(
        num_ids, dim, m, bits_head, bits_tail, num_head=int(round(head_fraction * num_ids)), frequencies=frequencies, **kwargs  # type: ignore[arg-type]
    )


def codes_table(
    dim: int,
    codes: torch.Tensor,
    class_of_id: torch.Tensor,
    classes: list[RowClass],
    codebooks: list[torch.Tensor | None],
    unknown: UnknownPolicy | None = None,
) -> CompressedTable:
    """A table for IDs ``0..N-1`` from PQ codes (``[N, m]``): ID ``i`` gets ``codes[i]`` packed
    into ``classes[class_of_id[i]]`` (``-1``: no row).  Codes are written as given, not
    re-derived from vectors, so the table decodes exactly the centroids they name."""
    n = class_of_id.numel()
    locator = torch.full((n,), -1, dtype=torch.int32)
    slabs, used = [], []
    for c, rc in enumerate(classes):
        members = torch.nonzero(class_of_id == c).flatten()
        slabs.append(pq.pack_codes(codes[members], rc.bits) if rc.pq else torch.empty((members.numel(), rc.row_bytes), dtype=torch.uint8))
        used.append(members.numel())
        locator[members] = encode_locator(c, 0) + torch.arange(members.numel(), dtype=torch.int32)
    runs = RunIndex.from_locator(locator)
    dense = DenseIndex(locator)
    index = runs if runs.nbytes < dense.nbytes else dense
    return CompressedTable(dim, classes, slabs, used, index, unknown=unknown, codebooks=codebooks)
