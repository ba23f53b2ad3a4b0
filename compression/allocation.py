"""Budget allocation: which row class each ID gets, so that the table fits a byte budget with the
least frequency-weighted reconstruction error (the post-training form of MPE's per-group
precision search, extended with per-group dimension).

1. Sort IDs by frequency and cut them into groups: a few small geometric groups at the head
   (where a single ID can carry a percent of all traffic), then equal-count groups.
2. For every (group, candidate class) estimate ``sum_i f_i * ||x_i - decode(encode(x_i))||^2``
   from a sample of the group's rows, and count the exact bytes the group would take.
3. Solve the multiple-choice knapsack "one class per group, total bytes <= budget" with the
   convex-hull greedy: every group starts at its cheapest class and upgrades are taken in order
   of error saved per byte while they fit.  This is the Lagrangian solution, plus a greedy fill.
4. The bytes that do not depend on the choice - index, rotation, unknown-ID fallback - are
   taken off the budget first, so the built table's :attr:`nbytes` is within the budget.

Dimension candidates below ``D`` are evaluated in a frequency-weighted PCA basis
(:mod:`compression.rotation`), full-dimension ones on the rows as they are (that is how each is
stored, see :mod:`compression.table`).  Up to three plans are solved - full dimension only; all
candidates with the rotation's bytes reserved; all candidates truncated in the stored basis
(no rotation: for tables trained with a dimension mask) - and the one with least error is built.

The error of a (group, class) pair is, by default, the frequency-weighted squared
reconstruction error above; a caller can pass ``group_error`` to score it instead by what it
does to a model (:mod:`compression.training.sensitivity`: how far the model's outputs move on training
rows that use the group's IDs), which is what matters when pruning rare rows to zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import codecs
from .hash_index import HashIndex, hash_index_bytes
from .index import DenseIndex, IdIndex, KeyedIndex, RunIndex, run_index_bytes
from .kernels.cpu_c import FENCE
from .layout import MAX_CLASSES, RowClass, encode_locator
from .rotation import weighted_pca_rotation
from .table import CompressedTable
from .unknown import UnknownKind, UnknownPolicy, build_unknown_policy

DEFAULT_BITS: tuple[int, ...] = (32, 16, 8, 4, 2, 1)
_ENCODE_CHUNK = 1 << 16
_HEAD_GROUP_MIN = 256

ProgressFn = Callable[[int, int], None]
# (what compress() is doing, units done, units in all): every phase reports, so a progress bar
# moves through cost estimation (most of the time on large tables), not only through encoding
StageFn = Callable[[str, int, int], None]
# (group index, row positions of the whole group, the group's rows as a class would serve them,
# in original coordinates) -> the error of serving them so, e.g. how far a model's outputs move
# (compression.training.sensitivity); replaces the frequency-weighted reconstruction error.
GroupErrorFn = Callable[[int, torch.Tensor, torch.Tensor], float]
# How a table without explicit ``ids`` (IDs 0..N-1) indexes its rows: one int32 locator per ID,
# or the same locators run-length encoded (cheap when the vocabulary is numbered by frequency,
# so that frequency groups are ID ranges).
DenseKind = Literal["dense", "runs"]
# How a table with explicit ``ids`` indexes them: "hash" (open addressing, the default; see
# compression/hash_index.py) or "sorted" (the sorted-key KeyedIndex, still loadable and buildable)
KeyedKind = Literal["hash", "sorted"]


class BudgetTooSmall(ValueError):
    """The budget does not cover the bytes every table of this shape must hold."""


def candidate_classes(dim: int, dims: Sequence[int] | None = None, bits: Sequence[int] = DEFAULT_BITS) -> list[RowClass]:
    """All ``(d, b)`` for the given dims (default ``D, D/2, D/4, D/8, 0``) and bit widths."""
    if dims is None:
        dims = sorted({dim, dim // 2, dim // 4, dim // 8, 0}, reverse=True)
    out = {RowClass(d, b if d else 32) for d in dims for b in bits if 0 <= d <= dim}
    return sorted(out, key=lambda rc: (-rc.dim, -rc.bits))


def frequency_groups(order: torch.Tensor, num_groups: int) -> list[torch.Tensor]:
    """Split IDs (row positions sorted by descending frequency) into groups, see module doc."""
    n = order.numel()
    step = max(1, -(-n // num_groups))
    bounds = [0]
    size = _HEAD_GROUP_MIN
    while bounds[-1] + size < min(step, n):
        bounds.append(bounds[-1] + size)
        size *= 2
    bounds.extend(range(max(step, bounds[-1] + 1), n, step))
    bounds.append(n)
    bounds = sorted(set(b for b in bounds if b <= n))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class GroupCosts:
    sizes: list[int]
    errors: torch.Tensor  # [G, C] float64 estimated weighted squared error
    bytes: torch.Tensor  # [G, C] int64 exact row bytes


def estimate_costs(
    rows: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    groups: list[torch.Tensor],
    classes: list[RowClass],
    sample_per_group: int,
    rotation: torch.Tensor | None = None,
    seed: int = 0,
    group_error: GroupErrorFn | None = None,
    progress: ProgressFn | None = None,
    codebooks: dict[RowClass, torch.Tensor] | None = None,
) -> GroupCosts:
    """Per (group, class): estimated weighted squared error and exact bytes.  ``rows`` is the
    table, or a function returning the rows at given positions (a live table decodes only the
    sampled rows).  With ``group_error`` every group is served whole through each class and the
    function scores it (no sampling).  PQ classes encode against ``codebooks[class]``.
    ``progress(done, total)`` is told after each class (each group with ``group_error``)."""
    codebooks = codebooks or {}
    if group_error is not None:
        return _costs_from(rows, groups, classes, rotation, group_error, codebooks, progress)
    gen = torch.Generator().manual_seed(seed)
    picks, scales = [], []
    for g in groups:
        if g.numel() <= sample_per_group:
            pick = g
        else:
            pick = g[torch.randperm(g.numel(), generator=gen)[:sample_per_group]]
        picks.append(pick)
        scales.append(g.numel() / pick.numel())
    sample = torch.cat(picks)
    x = (rows[sample] if isinstance(rows, torch.Tensor) else rows(sample)).to(torch.float32)
    dim = x.shape[1]
    x_rotated = x @ rotation if rotation is not None else x
    w = weights[sample].to(torch.float64)
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([p.numel() for p in picks]))
    errors = torch.zeros((len(groups), len(classes)), dtype=torch.float64)
    for c, rc in enumerate(classes):
        source = x_rotated if 0 < rc.dim < dim else x  # the basis the class stores
        err = codecs.reconstruction_error(source, rc, dim, codebooks.get(rc)).to(torch.float64)
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
        errors[:, c].index_add_(0, owner, w * err)
        if progress is not None:
            progress(c + 1, len(classes))
    errors *= torch.tensor(scales, dtype=torch.float64)[:, None]
    sizes = [g.numel() for g in groups]
    nbytes = torch.tensor([[n * rc.row_bytes for rc in classes] for n in sizes], dtype=torch.int64)
    return GroupCosts(sizes, errors, nbytes)


def served_rows(
    x: torch.Tensor, row_class: RowClass, rotation: torch.Tensor | None = None, codebook: torch.Tensor | None = None
) -> torch.Tensor:
    """What a table serves for rows ``x`` stored in ``row_class``: encoded, decoded, zero-padded,
    and rotated back for a truncated class of a rotated table (exactly the lookup's arithmetic)."""
    n, dim = x.shape
    out = torch.zeros((n, dim), dtype=torch.float32)
    if row_class.dim == 0:
        return out
    truncated = rotation is not None and row_class.dim < dim
    source = x.to(torch.float32) @ rotation if truncated else x.to(torch.float32)  # type: ignore[operator]
    decoded = codecs.decode_rows(codecs.encode_rows(source, row_class, codebook=codebook), row_class, codebook)
    if truncated:
        return decoded @ rotation[:, : row_class.dim].T  # type: ignore[index]
    out[:, : row_class.dim] = decoded
    return out


def _costs_from(
    rows: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    groups: list[torch.Tensor],
    classes: list[RowClass],
    rotation: torch.Tensor | None,
    group_error: GroupErrorFn,
    codebooks: dict[RowClass, torch.Tensor],
    progress: ProgressFn | None = None,
) -> GroupCosts:
    errors = torch.zeros((len(groups), len(classes)), dtype=torch.float64)
    for g, grp in enumerate(groups):
        x = (rows[grp] if isinstance(rows, torch.Tensor) else rows(grp)).to(torch.float32)
        for c, rc in enumerate(classes):
            approx = served_rows(x, rc, rotation, codebooks.get(rc))
            err = float(group_error(g, grp, approx)) if bool(torch.isfinite(approx).all()) else float("inf")
            errors[g, c] = err if err == err else float("inf")  # NaN -> unusable
        if progress is not None:
            progress(g + 1, len(groups))
    sizes = [g.numel() for g in groups]
    nbytes = torch.tensor([[n * rc.row_bytes for rc in classes] for n in sizes], dtype=torch.int64)
    return GroupCosts(sizes, errors, nbytes)


def solve_knapsack(errors: torch.Tensor, nbytes: torch.Tensor, budget: int) -> list[int]:
    """Pick one class per group (row) with total bytes <= ``budget``, low total error."""
    num_groups = errors.shape[0]
    choice: list[int] = []
    steps: list[tuple[float, int, int, int]] = []  # (error saved per byte, group, from, to)
    for g in range(num_groups):
        options = [(int(nbytes[g, c]), float(errors[g, c]), c) for c in range(errors.shape[1]) if errors[g, c] != float("inf")]
        options.sort(key=lambda t: (t[0], t[1]))
        hull: list[tuple[int, float, int]] = []
        for b, e, c in options:
            if hull and e >= hull[-1][1]:
                continue  # costs more, not better
            if hull and b == hull[-1][0]:
                hull.pop()
            while len(hull) >= 2:
                (b1, e1, _), (b2, e2, _) = hull[-2], hull[-1]
                # drop the middle point if it lies on or above the chord (not convex)
                if (e1 - e2) * (b - b1) <= (e1 - e) * (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append((b, e, c))
        if not hull:
            raise ValueError("no candidate class can store these rows (non-finite values?)")
        choice.append(hull[0][2])
        for (b1, e1, c1), (b2, e2, c2) in zip(hull[:-1], hull[1:]):
            steps.append(((e1 - e2) / max(b2 - b1, 1), g, c1, c2))
    spent = sum(int(nbytes[g, choice[g]]) for g in range(num_groups))
    if spent > budget:
        raise BudgetTooSmall(f"the cheapest classes need {spent} bytes for rows, budget leaves {budget}")
    steps.sort(key=lambda s: -s[0])
    for _, g, c_from, c_to in steps:
        if choice[g] != c_from:
            continue  # an earlier step of this group was skipped: its later steps do not apply
        extra = int(nbytes[g, c_to]) - int(nbytes[g, c_from])
        if spent + extra <= budget:
            choice[g] = c_to
            spent += extra
    return choice


@dataclass
class CompressionReport:
    budget_bytes: int
    fixed_bytes: int
    rotation: bool
    estimated_error: float
    group_sizes: list[int] = field(default_factory=list)
    group_classes: list[str] = field(default_factory=list)


def group_runs(groups: list[torch.Tensor], n: int) -> int:
    """Maximal runs of consecutive IDs that belong to one group: a bound on the runs of a
    :class:`RunIndex` over a table whose classes are chosen per group (``len(groups)`` when the
    IDs are numbered by frequency)."""
    if n == 0:
        return 0
    owner = torch.empty(n, dtype=torch.int64)
    for g, grp in enumerate(groups):
        owner[grp] = g
    return 1 + int((owner[1:] != owner[:-1]).sum())


def _fixed_bytes(
    n: int, dim: int, keyed: bool, rotation: bool, unknown: UnknownKind, num_buckets: int, runs: int | None = None,
    keyed_index: KeyedKind = "hash",
) -> int:
    # hash: 12 bytes per slot of a power-of-two capacity (compression/hash_index.py); sorted:
    # int64 key + int32 locator per ID, plus the fence (every FENCE-th key, see index.py)
    if keyed and keyed_index == "hash":
        index = hash_index_bytes(n)
    elif keyed:
        index = n * 12 + 8 * -(-n // FENCE)
    elif runs is not None:
        index = run_index_bytes(runs)
    else:
        index = n * 4
    rot = dim * dim * 4 if rotation else 0
    costs = {"zero": 0, "default": dim * 4, "hashed": num_buckets * dim * 2}
    if unknown not in costs:
        raise ValueError(f"compress() builds the zero, default or hashed fallback; {unknown!r} is trained (compression.training.methods)")
    unk = costs[unknown]
    return index + rot + unk


def build_table(
    rows: torch.Tensor,
    row_class_of: torch.Tensor,
    classes: list[RowClass],
    ids: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    unknown: UnknownPolicy | None = None,
    progress: ProgressFn | None = None,
    index: DenseKind = "dense",
    codebooks: Sequence[torch.Tensor | None] | None = None,
    keyed_index: KeyedKind = "hash",
) -> CompressedTable:
    """Encode ``rows`` (original coordinates) into a table; row ``i`` goes to class ``row_class_of[i]``
    (a PQ class encodes against ``codebooks[class]``: nearest centroids).

    Slabs are sized exactly (no spare capacity); ``ids=None`` builds a table for IDs 0..N-1
    with a :class:`DenseIndex`, or a :class:`RunIndex` when ``index="runs"``; explicit ``ids`` get
    a :class:`HashIndex` (``keyed_index="sorted"``: the sorted :class:`KeyedIndex`).  A row whose class
    is ``-1`` is left out (its ID has no row).
    """
    n, dim = rows.shape
    slabs, used = [], []
    books = list(codebooks) if codebooks is not None else [None] * len(classes)
    locator = torch.full((n,), -1, dtype=torch.int32)
    done = 0
    for c, rc in enumerate(classes):
        members = torch.nonzero(row_class_of == c).flatten()
        slab = torch.empty((members.numel(), rc.row_bytes), dtype=torch.uint8)
        for start in range(0, members.numel(), _ENCODE_CHUNK):
            part = members[start : start + _ENCODE_CHUNK]
            x = rows[part].to(torch.float32)
            if rotation is not None and 0 < rc.dim < dim:
                x = x @ rotation  # truncated classes store the rotated basis
            if rc.row_bytes:
                slab[start : start + part.numel()] = codecs.encode_rows(x, rc, codebook=books[c])
            done += part.numel()
            if progress is not None:
                progress(done, n)
        locator[members] = encode_locator(c, 0) + torch.arange(members.numel(), dtype=torch.int32)
        slabs.append(slab)
        used.append(members.numel())
    id_index: IdIndex
    if ids is not None:
        present = locator >= 0
        if keyed_index == "hash":
            id_index = HashIndex.build(ids[present], locator[present])
        elif keyed_index == "sorted":
            id_index = KeyedIndex.build(ids[present], locator[present])
        else:
            raise ValueError(f"keyed_index must be 'hash' or 'sorted', got {keyed_index!r}")
    elif index == "runs":
        id_index = RunIndex.from_locator(locator)
    elif index == "dense":
        id_index = DenseIndex(locator)
    else:
        raise ValueError(f"index must be 'dense' or 'runs', got {index!r}")
    return CompressedTable(dim, classes, slabs, used, id_index, rotation=rotation, unknown=unknown, codebooks=books)


def compress(
    rows: torch.Tensor,
    frequencies: torch.Tensor | None = None,
    budget_bytes: int | None = None,
    ratio: float | None = None,
    ids: torch.Tensor | None = None,
    candidates: list[RowClass] | None = None,
    num_groups: int = 64,
    sample_per_group: int = 512,
    unknown: UnknownKind = "zero",
    num_buckets: int = 1024,
    allow_rotation: bool = True,
    progress: ProgressFn | None = None,
    index: DenseKind = "dense",
    group_error: GroupErrorFn | None = None,
    stage: StageFn | None = None,
    pq: bool | Sequence[RowClass] = False,
    keyed_index: KeyedKind = "hash",
) -> tuple[CompressedTable, CompressionReport]:
    """Compress a dense fp32 table into the cheapest-error mixed table within the budget.

    ``budget_bytes`` counts everything the table holds (index, rows, rotation, fallback);
    ``ratio`` sets it to ``N * D * 4 / ratio`` instead.  ``frequencies`` default to uniform.
    ``index="runs"`` (IDs 0..N-1 only) stores the locators run-length encoded: the budget then
    reserves 12 bytes per run of consecutive IDs in one frequency group, which is the number of
    groups when the vocabulary is numbered by descending frequency (and up to N otherwise).
    ``group_error`` replaces the frequency-weighted reconstruction error by the caller's measure
    of what serving a group through a class costs (see :data:`GroupErrorFn`).
    ``progress(done, n)`` follows the encoding of rows; ``stage(what, done, total)`` follows
    every phase (see :data:`StageFn`).
    ``pq=True`` adds product-quantization classes (:func:`compression.pq_alloc.pq_candidates`;
    or pass the PQ classes to consider, here or among ``candidates``): per frequency group the
    allocator may then pick a codebook class, each with its own k-means codebook, next to the
    ``(dim, bits)`` classes (:mod:`compression.pq_alloc`).
    """
    if rows.dim() != 2:
        raise ValueError("rows must be a 2-D [N, D] table")
    n, dim = rows.shape
    rows = rows.to(torch.float32).contiguous()
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("the table holds NaN or Inf values")
    if (budget_bytes is None) == (ratio is None):
        raise ValueError("give exactly one of budget_bytes and ratio")
    if ratio is not None:
        if ratio <= 0:
            raise ValueError("ratio must be positive")
        budget_bytes = int(n * dim * 4 / ratio)
    assert budget_bytes is not None
    freqs = torch.ones(n, dtype=torch.float64) if frequencies is None else frequencies.to(torch.float64).reshape(-1)
    if freqs.numel() != n or bool((freqs < 0).any()) or not bool(torch.isfinite(freqs).all()):
        raise ValueError("frequencies must be N finite non-negative numbers")
    if ids is not None:
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() != n:
            raise ValueError("ids must have one entry per row")
    keyed = ids is not None
    if index not in ("dense", "runs"):
        raise ValueError(f"index must be 'dense' or 'runs', got {index!r}")
    cands = candidates if candidates is not None else candidate_classes(dim)
    pq_classes = [rc for rc in cands if rc.pq] + ([] if isinstance(pq, bool) else list(pq))
    cands = [rc for rc in cands if not rc.pq]
    order = torch.argsort(freqs, descending=True, stable=True)
    groups = frequency_groups(order, num_groups)
    runs_bound = group_runs(groups, n) if (index == "runs" and not keyed) else None
    owner = None
    if runs_bound is not None:
        owner = torch.empty(n, dtype=torch.int64)
        for g, grp in enumerate(groups):
            owner[grp] = g
    weights = freqs + 1e-9  # an ID never seen still costs a little error

    def tell(what: str) -> ProgressFn:
        return (lambda done, total: stage(what, done, total)) if stage is not None else (lambda done, total: None)

    plans: list[tuple[float, bool, list[RowClass], list[int], int | None]] = []
    full_dim = [rc for rc in cands if rc.dim == dim]
    reduced = [rc for rc in cands if rc.dim < dim]
    tell("rotation (weighted PCA)")(0, 1)
    rotation = weighted_pca_rotation(rows, weights) if (allow_rotation and reduced) else None
    variants: list[tuple[bool, list[RowClass]]] = []
    if full_dim:
        variants.append((False, full_dim + ([rc for rc in reduced if rc.dim == 0])))
    if rotation is not None:
        variants.append((True, cands))
    if any(0 < rc.dim < dim for rc in reduced) or not full_dim:
        # truncation in the stored basis: right for tables trained with a dimension mask
        # (nested / FIITED-style), whose leading coordinates already carry the most
        variants.append((False, cands))
    first_costs: dict[tuple[bool, tuple[RowClass, ...]], GroupCosts] = {}
    for k, (rotated, variant) in enumerate(variants):
        variant = list(variant)
        costing = tell(f"estimating costs ({k + 1}/{len(variants)})")
        # run-length index: reserve for a few runs first (adjacent groups of one class share a
        # run, and frequency-ordered choices change class only a few times), more if needed
        runs = None if runs_bound is None else min(runs_bound, MAX_CLASSES)
        costs = estimate_costs(rows, weights, groups, variant, sample_per_group, rotation if rotated else None, group_error=group_error,
                               progress=costing)
        first_costs.setdefault((rotated, tuple(variant)), costs)  # PQ plans reuse the unrotated full-dim costs
        while True:
            fixed = _fixed_bytes(n, dim, keyed, rotated, unknown, num_buckets, runs, keyed_index)
            try:
                choice = solve_knapsack(costs.errors, costs.bytes, budget_bytes - fixed)
            except BudgetTooSmall:
                break
            used = sorted(set(choice))
            if runs is not None and owner is not None:
                by_id = torch.tensor(choice, dtype=torch.int64)[owner]
                actual = 1 + int((by_id[1:] != by_id[:-1]).sum()) if n else 0
                if actual > runs:
                    runs = actual
                    continue
            if len(used) <= MAX_CLASSES:
                err = float(sum(costs.errors[g, c] for g, c in enumerate(choice)))
                plans.append((err, rotated, variant, choice, runs))
                break
            # too many distinct classes: keep the ones holding the most rows and solve again
            rows_in = {c: 0 for c in used}
            for g, c in enumerate(choice):
                rows_in[c] += costs.sizes[g]
            keep = sorted(used, key=lambda c: -rows_in[c])[:MAX_CLASSES]
            variant = [variant[c] for c in sorted(keep)]
            costs = estimate_costs(rows, weights, groups, variant, sample_per_group, rotation if rotated else None, group_error=group_error,
                                   progress=costing)
    codebook_of: dict[RowClass, torch.Tensor] = {}
    if pq is True or pq_classes:
        tell("product-quantization codebooks")(0, 1)
        from . import pq_alloc  # builds on this module

        pq_classes = pq_classes or pq_alloc.pq_candidates(dim, budget_bytes, n)
        codebook_of = pq_alloc.train_candidate_codebooks(rows, weights, pq_classes)
        unrotated = full_dim + [rc for rc in reduced if rc.dim == 0]
        plans += pq_alloc.pq_plans(
            rows, weights, groups, unrotated, pq_classes, codebook_of, sample_per_group, budget_bytes,
            lambda runs: _fixed_bytes(n, dim, keyed, False, unknown, num_buckets, runs, keyed_index),
            None if runs_bound is None else min(runs_bound, MAX_CLASSES), owner, group_error,
            scalar_costs=first_costs.get((False, tuple(unrotated))),
        )
    if not plans:
        smallest = _fixed_bytes(n, dim, keyed, False, unknown, num_buckets, None if runs_bound is None else 1, keyed_index)
        raise BudgetTooSmall(
            f"budget of {budget_bytes} bytes cannot hold {n} rows: the index and fallback alone take {smallest} bytes"
            " and the cheapest row classes need more than what is left"
        )
    err, rotated, variant, choice, runs = min(plans, key=lambda p: p[0])
    used_classes = sorted(set(choice))
    remap = {c: k for k, c in enumerate(used_classes)}
    table_classes = [variant[c] for c in used_classes]
    rotated = rotated and any(0 < rc.dim < dim for rc in table_classes)  # no truncated row, no rotation
    row_class_of = torch.empty(n, dtype=torch.int64)
    for g, grp in enumerate(groups):
        row_class_of[grp] = remap[choice[g]]
    tell("unknown-ID fallback")(0, 1)
    policy = build_unknown_policy(unknown, rows, ids if ids is not None else torch.arange(n), weights, num_buckets)
    codebooks = None
    if any(rc.pq for rc in table_classes):
        from .pq_alloc import refine_codebooks

        codebooks = refine_codebooks(rows, weights, row_class_of, table_classes, codebook_of)
    encoding = tell("encoding rows")

    def encoded(done: int, total: int) -> None:
        encoding(done, total)
        if progress is not None:
            progress(done, total)

    table = build_table(
        rows, row_class_of, table_classes, ids=ids, rotation=rotation if rotated else None, unknown=policy, progress=encoded,
        index=index, codebooks=codebooks, keyed_index=keyed_index,
    )
    report = CompressionReport(
        budget_bytes=budget_bytes,
        fixed_bytes=_fixed_bytes(n, dim, keyed, rotated, unknown, num_buckets, runs, keyed_index)
        + sum(rc.codebook_bytes for rc in table_classes),
        rotation=rotated,
        estimated_error=err,
        group_sizes=[g.numel() for g in groups],
        group_classes=[variant[c].label() for c in choice],
    )
    if table.nbytes > budget_bytes:  # the accounting above is exact; this guards against drift
        raise AssertionError(f"built table holds {table.nbytes} bytes, over the budget of {budget_bytes}")
    return table, report


def compress_uniform(
    rows: torch.Tensor,
    row_class: RowClass,
    ids: torch.Tensor | None = None,
    unknown: UnknownKind = "zero",
    frequencies: torch.Tensor | None = None,
    index: DenseKind = "dense",
    keyed_index: KeyedKind = "hash",
) -> CompressedTable:
    """Every row in one class: the uniform-quantization baseline (FBGEMM-style INT8/INT4/...).
    With ``index="runs"`` a table of IDs 0..N-1 needs a single run (20 bytes) instead of 4N."""
    n, dim = rows.shape
    if row_class.dim != dim:
        raise ValueError("a uniform table keeps every coordinate; use compress() for dimension reduction")
    weights = torch.ones(n, dtype=torch.float64) if frequencies is None else frequencies.to(torch.float64)
    policy = build_unknown_policy(unknown, rows, ids if ids is not None else torch.arange(n), weights)
    return build_table(rows, torch.zeros(n, dtype=torch.int64), [row_class], ids=ids, unknown=policy, index=index)
