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
   Each index kind is charged its real bytes (a run-length index: the runs the plan implies,
   re-solved with a larger reservation when the plan needs more), and ``index="auto"`` tries
   every kind that can serve the IDs.

Dimension candidates below ``D`` are evaluated in a frequency-weighted PCA basis
(:mod:`compression.rotation`), full-dimension ones on the rows as they are (that is how each is
stored, see :mod:`compression.table`).  The rotation costs ``D x K`` fp16 bytes plus the C decoder's fp32 copy, ``K`` the widest
truncated class, so the knapsack is solved once per ``K`` with that reserved; and once with
truncation in the stored basis (no rotation: for tables trained with a dimension mask).

These knapsack plans compete with the simple plans a user could write by hand - every uniform
width, keep-top-K at every width (:data:`PLAN_BUILDERS`) - on the same estimated objective,
and the least-error plan is built: the allocator never loses to a simpler plan on its own
objective (up to sampling error of the estimate; exact when every row is sampled).

The error of a (group, class) pair is, by default, the frequency-weighted squared
reconstruction error above; a caller can pass ``group_error`` to score it instead by what it
does to a model (:mod:`compression.training.sensitivity`: how far the model's outputs move on training
rows that use the group's IDs), which is what matters when pruning rare rows to zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from . import codecs, memory
from .hash_index import HashIndex, hash_index_bytes
from .index import DenseIndex, IdIndex, KeyedIndex, RunIndex, run_index_bytes
from .kernels.cpu_c import FENCE
from .layout import MAX_CLASSES, RowClass, encode_locator
from .parallel import coarse_threads, thread_map
from .rotation import rotation_bytes, stored_rotation, weighted_pca_rotation
from .table import CompressedTable
from .unknown import UnknownKind, UnknownPolicy, build_unknown_policy

if TYPE_CHECKING:
    from .knn import TrafficSample

DEFAULT_BITS: tuple[int, ...] = (32, 16, 8, 4, 2, 1)
_ENCODE_CHUNK = 1 << 16
_HEAD_GROUP_MIN = 256

ProgressFn = Callable[[int, int], None]
# (phase, done, total): what compress() is doing now, for a progress bar over every phase
StageFn = Callable[[str, int, int], None]
# (group index, row positions of the whole group, the group's rows as a class would serve them,
# in original coordinates) -> the error of serving them so, e.g. how far a model's outputs move
# (compression.training.sensitivity); replaces the frequency-weighted reconstruction error.
GroupErrorFn = Callable[[int, torch.Tensor, torch.Tensor], float]
# How a table without explicit ``ids`` (IDs 0..N-1) indexes its rows: one int32 locator per ID,
# or the same locators run-length encoded (cheap when the vocabulary is numbered by frequency,
# so that frequency groups are ID ranges).
DenseKind = Literal["dense", "runs"]
IndexKind = Literal["auto", "dense", "runs", "keyed"]
INDEX_KINDS: tuple[str, ...] = ("dense", "runs", "keyed")
# How a keyed table indexes its IDs: "hash" (open addressing, the default; see
# compression/hash_index.py) or "sorted" (the sorted-key KeyedIndex, still loadable and buildable)
KeyedKind = Literal["hash", "sorted"]
# What the allocator minimizes (see objective_weights).
Objective = Literal["l2", "cosine", "knn"]
OBJECTIVES: tuple[str, ...] = ("l2", "cosine", "knn")


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
    # The sample behind ``errors`` (absent when a GroupErrorFn scored whole groups): each sampled
    # row's rank in the frequency order, its weighted error per class, and the factor that scales
    # it up to its group.  Plans that cut a group in two (keep-top-K) are scored from these.
    sample_rank: torch.Tensor | None = None  # int64 [S]
    sample_errors: torch.Tensor | None = None  # float64 [S, C]
    sample_scale: torch.Tensor | None = None  # float64 [S]


def _row_errors(
    x: torch.Tensor, x_rotated: torch.Tensor | None, rc: RowClass, dim: int, fallback: torch.Tensor | None,
    rotation: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row squared error of serving rows ``x`` from class ``rc``.  ``x_rotated`` is ``x`` in
    the rotated basis (first ``K`` coordinates) for a truncated class of a rotated table; a
    dim-0 row is served by the unknown-ID policy, whose rows are ``fallback`` (zero if None)."""
    if rc.dim == 0:
        return ((x if fallback is None else x - fallback) ** 2).sum(dim=1)
    if x_rotated is not None and rotation is not None and rc.dim < dim:
        y = x_rotated[:, : rc.dim]
        decoded = codecs.decode_rows(codecs.encode_rows(y, rc), rc)
        # rotated back exactly as a lookup does (the fp16 columns are not exactly orthonormal)
        return ((decoded @ rotation[:, : rc.dim].T - x) ** 2).sum(dim=1)
    return codecs.reconstruction_error(x, rc, dim, codebook)


def estimate_costs(
    rows: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    weights: torch.Tensor,
    groups: list[torch.Tensor],
    classes: list[RowClass],
    sample_per_group: int,
    rotation: torch.Tensor | None = None,
    seed: int = 0,
    group_error: GroupErrorFn | None = None,
    fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rotated: Sequence[bool] | None = None,
    progress: ProgressFn | None = None,
    codebooks: dict[RowClass, torch.Tensor] | None = None,
) -> GroupCosts:
    """Per (group, class): estimated weighted squared error and exact bytes.  ``rows`` is the
    table, or a function returning the rows at given positions (a live table decodes only the
    sampled rows).  With ``group_error`` every group is served whole through each class and the
    function scores it (no sampling).

    ``rotation`` (``[D, K]``, any float dtype) is the basis truncated classes are stored in;
    ``rotated[c]`` says per class whether it uses it (default: every truncated class does when
    a rotation is given).  ``fallback(positions)`` gives the unknown-ID policy's rows, which is
    what a dim-0 class serves (default zeros).  PQ classes encode against ``codebooks[class]``.
    ``progress(done, total)`` is told after each class (each group with ``group_error``)."""
    codebooks = codebooks or {}
    if group_error is not None:
        return _costs_from(rows, groups, classes, rotation, group_error, codebooks, progress, rotated, fallback)
    gen = torch.Generator().manual_seed(seed)
    picks, scales = [], []
    for g in groups:
        if g.numel() <= sample_per_group:
            pick = torch.arange(g.numel())
        else:
            pick = torch.sort(torch.randperm(g.numel(), generator=gen)[:sample_per_group]).values
        picks.append(pick)
        scales.append(g.numel() / pick.numel())
    rank_start = torch.tensor([0] + [g.numel() for g in groups]).cumsum(0)
    sample_rank = torch.cat([rank_start[k] + p for k, p in enumerate(picks)])
    sample = torch.cat([g[p] for g, p in zip(groups, picks)])
    x = (rows[sample] if isinstance(rows, torch.Tensor) else rows(sample)).to(torch.float32)
    dim = x.shape[1]
    # the rotation as a table stores it (fp16), so the estimate is what the table will serve
    rot = None if rotation is None else rotation.to(torch.float16).to(torch.float32)
    x_rotated = x @ rot if rot is not None else None
    fb = None if fallback is None else fallback(sample).to(torch.float32)
    w = weights[sample].to(torch.float64)
    counts = torch.tensor([p.numel() for p in picks])
    owner = torch.repeat_interleave(torch.arange(len(groups)), counts)
    scale = torch.repeat_interleave(torch.tensor(scales, dtype=torch.float64), counts)
    per_row = torch.zeros((sample.numel(), len(classes)), dtype=torch.float64)

    def column(c: int) -> torch.Tensor:
        rc = classes[c]
        use_rot = x_rotated is not None and 0 < rc.dim < dim and (rotated is None or rotated[c])
        return _row_errors(x, x_rotated if use_rot else None, rc, dim, fb, rot, codebooks.get(rc)).to(torch.float64)

    # one class per task on parallel threads (compression.parallel), in order for the progress bar
    for c, err in enumerate(thread_map(column, range(len(classes)))):
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
        per_row[:, c] = w * err
        if progress is not None:
            progress(c + 1, len(classes))
    errors = torch.zeros((len(groups), len(classes)), dtype=torch.float64)
    errors.index_add_(0, owner, per_row * scale[:, None])
    sizes = [g.numel() for g in groups]
    nbytes = torch.tensor([[n * rc.row_bytes for rc in classes] for n in sizes], dtype=torch.int64)
    return GroupCosts(sizes, errors, nbytes, sample_rank, per_row, scale)


def served_rows(
    x: torch.Tensor, row_class: RowClass, rotation: torch.Tensor | None = None, codebook: torch.Tensor | None = None
) -> torch.Tensor:
    """What a table serves for rows ``x`` stored in ``row_class``: encoded, decoded, zero-padded,
    and rotated back for a truncated class of a rotated table (exactly the lookup's arithmetic;
    a dim-0 row is zeros here, the unknown-ID policy's row in a table)."""
    n, dim = x.shape
    out = torch.zeros((n, dim), dtype=torch.float32)
    if row_class.dim == 0:
        return out
    truncated = rotation is not None and row_class.dim < dim
    if truncated:
        assert rotation is not None
        cols = stored_rotation(rotation, row_class.dim).to(torch.float32)
        decoded = codecs.decode_rows(codecs.encode_rows(x.to(torch.float32) @ cols, row_class), row_class)
        return decoded @ cols.T
    encoded = codecs.encode_rows(x.to(torch.float32), row_class, codebook=codebook)
    out[:, : row_class.dim] = codecs.decode_rows(encoded, row_class, codebook)
    return out


def _costs_from(
    rows: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    groups: list[torch.Tensor],
    classes: list[RowClass],
    rotation: torch.Tensor | None,
    group_error: GroupErrorFn,
    codebooks: dict[RowClass, torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
    rotated: Sequence[bool] | None = None,
    fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GroupCosts:
    """Costs by the caller's ``group_error``: each group served whole through each class, as the
    table would serve it - through the rotation only where ``rotated[c]`` (a truncated class
    without it keeps the first coordinates), a dim-0 class as the unknown-ID policy's rows."""
    codebooks = codebooks or {}
    errors = torch.zeros((len(groups), len(classes)), dtype=torch.float64)
    for g, grp in enumerate(groups):
        x = (rows[grp] if isinstance(rows, torch.Tensor) else rows(grp)).to(torch.float32)
        for c, rc in enumerate(classes):
            if rc.dim == 0 and fallback is not None:
                approx = fallback(grp).to(torch.float32)
            else:
                use_rot = rotation is not None and (rotated is None or rotated[c])
                approx = served_rows(x, rc, rotation if use_rot else None, codebooks.get(rc))
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
    index: str = "dense"
    objective: str = "l2"
    plan: str = "knapsack"
    # every plan that fit, as (name, index kind, estimated error, bytes): what the pick beat
    candidates: list[tuple[str, str, float, int]] = field(default_factory=list)
    # objective "knn": the chosen plan's recall@10 estimated on held-out sampled traffic
    estimated_recall: float | None = None


# ---------------------------------------------------------------------------- index bytes


def index_bytes(kind: str, n: int, span: int, runs: int) -> int:
    """Bytes of an index of ``kind`` over ``n`` IDs, IDs ``< span`` for the positional kinds
    (``dense``: one int32 locator per ID in ``0..span-1``; ``runs``: ``runs`` runs;
    ``keyed``: int64 key + int32 locator per ID plus the fence, every FENCE-th key; ``hash``:
    what a one-go build holds, compression/hash_index.py's hash_index_bytes: a static part at
    load 0.94 plus its pilots, 13.2 bytes per ID, or without the compiled library 12 bytes per
    open-addressing slot at load <= 0.7, 17.1)."""
    if kind == "hash":
        return hash_index_bytes(n)
    if kind == "keyed":
        return n * 12 + 8 * -(-n // FENCE)
    if kind == "dense":
        return 4 * span
    if kind == "runs":
        return run_index_bytes(runs)
    raise ValueError(f"index must be one of {INDEX_KINDS}, got {kind!r}")


def count_runs(class_by_position: torch.Tensor, ids: torch.Tensor | None) -> int:
    """Runs of a :class:`RunIndex` over rows whose class is ``class_by_position`` (positions in
    ascending ID order; slots are handed out in that order, so consecutive IDs of one class
    have consecutive slots).  ``ids`` (sorted) adds the runs of missing IDs between them."""
    n = class_by_position.numel()
    if n == 0:
        return 0
    changes = class_by_position[1:] != class_by_position[:-1]
    if ids is None:
        return 1 + int(changes.sum())
    gaps = ids[1:] != ids[:-1] + 1
    # a gap ends the run before it, adds a run of "no row", and starts a new one
    return 1 + int((changes & ~gaps).sum()) + 2 * int(gaps.sum()) + (1 if int(ids[0]) > 0 else 0)


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


def fallback_bytes(unknown: UnknownKind, dim: int, num_buckets: int) -> int:
    costs = {"zero": 0, "default": dim * 4, "hashed": num_buckets * dim * 2}
    if unknown not in costs:
        raise ValueError(f"compress() builds the zero, default or hashed fallback; {unknown!r} is trained (compression.training.methods)")
    return costs[unknown]


def _fixed_bytes(
    n: int, dim: int, keyed: bool, rotation: bool, unknown: UnknownKind, num_buckets: int, runs: int | None = None
) -> int:
    """Index + full fp32 rotation + fallback: the accounting of tables built before rotations
    were stored as fp16 columns (kept for callers that size a table by hand)."""
    kind = "keyed" if keyed else ("runs" if runs is not None else "dense")
    return index_bytes(kind, n, n, runs or 0) + (dim * dim * 4 if rotation else 0) + fallback_bytes(unknown, dim, num_buckets)


# ---------------------------------------------------------------------------- objectives


def objective_weights(rows: torch.Tensor, frequencies: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Per-row weight of the squared error the allocator minimizes.

    ``l2``: the row's traffic (frequency-weighted squared error: what a ranker's dot products
    see).  ``cosine``: traffic over the row's squared norm, i.e. each row's error relative to
    its own length - what cosine / normalized dot-product retrieval sees, where a short row
    matters as much as a long one."""
    f = frequencies.to(torch.float64) + 1e-9  # an ID never seen still costs a little error
    if objective == "l2":
        return f
    if objective in ("cosine", "knn"):  # knn: compress() adds neighbour traffic (compression.knn)
        norms = (rows.to(torch.float64) ** 2).sum(dim=1)
        floor = float(norms.mean()) * 1e-6 + 1e-30
        return f / norms.clamp(min=floor)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


# ---------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """One way to store the table: the rows in frequency order, cut into ``segments`` of
    ``(row count, column of the cost matrix)``, and the index that serves them."""

    name: str
    segments: list[tuple[int, int]]
    index: str
    runs: int
    columns: list[int]  # cost-matrix columns the plan uses, in table class order
    error: float
    nbytes: int


@dataclass
class PlanContext:
    """What a plan builder sees: the cost matrix over every candidate column, and how to price
    and score a plan.  Column ``c`` is class ``classes[c]``, stored rotated when ``rotated[c]``."""

    n: int
    dim: int
    budget: int
    groups: list[torch.Tensor]
    costs: GroupCosts
    classes: list[RowClass]
    rotated: list[bool]
    index_kinds: list[str]
    order: torch.Tensor  # row positions by descending frequency
    ids: torch.Tensor | None  # sorted IDs of the positions, None for 0..N-1
    span: int
    other_bytes: int  # fallback

    def fixed_bytes(self, columns: Sequence[int], index: str, runs: int) -> int:
        """Index + rotation columns + fallback + the codebooks of the PQ classes used."""
        widest = max((self.classes[c].dim for c in columns if self.rotated[c]), default=0)
        books = sum(self.classes[c].codebook_bytes for c in columns)
        return index_bytes(index, self.n, self.span, runs) + rotation_bytes(self.dim, widest) + self.other_bytes + books

    def class_by_position(self, segments: Sequence[tuple[int, int]]) -> torch.Tensor:
        by_rank = torch.repeat_interleave(
            torch.tensor([c for _, c in segments], dtype=torch.int64), torch.tensor([k for k, _ in segments], dtype=torch.int64)
        )
        out = torch.empty(self.n, dtype=torch.int64)
        out[self.order] = by_rank
        return out

    def runs_of(self, segments: Sequence[tuple[int, int]]) -> int:
        return count_runs(self.class_by_position(segments), self.ids)

    def error_of(self, segments: Sequence[tuple[int, int]]) -> float:
        """Estimated objective of a plan: per group from the cost matrix, and for a group that
        a segment boundary cuts, from its sampled rows on either side (by count when only
        whole-group scores exist)."""
        costs = self.costs
        total = 0.0
        bounds = [0]
        for g in self.groups:
            bounds.append(bounds[-1] + g.numel())
        seg_start = 0
        pieces: list[list[tuple[int, int, int]]] = [[] for _ in self.groups]  # (from rank, to rank, column)
        g = 0
        for seg_len, seg_col in segments:
            lo, hi = seg_start, seg_start + seg_len
            while g < len(self.groups) and bounds[g] < hi:
                a, b = max(lo, bounds[g]), min(hi, bounds[g + 1])
                if b > a:
                    pieces[g].append((a, b, seg_col))
                if bounds[g + 1] <= hi:
                    g += 1
                else:
                    break
            seg_start = hi
        for g, parts in enumerate(pieces):
            if len(parts) == 1:
                total += float(costs.errors[g, parts[0][2]])
                continue
            if costs.sample_rank is not None and costs.sample_errors is not None and costs.sample_scale is not None:
                for a, b, col in parts:
                    inside = (costs.sample_rank >= a) & (costs.sample_rank < b)
                    total += float((costs.sample_errors[inside, col] * costs.sample_scale[inside]).sum())
            else:
                size = bounds[g + 1] - bounds[g]
                total += sum(float(costs.errors[g, col]) * (b - a) / size for a, b, col in parts)
        return total

    def make(self, name: str, segments: list[tuple[int, int]], index: str | None = None) -> "Plan | None":
        """Price ``segments`` with the cheapest allowed index (or ``index``); None if over budget,
        if it holds more classes than a table can, or if it prunes every row."""
        segments = [(k, c) for k, c in segments if k > 0]
        columns = sorted({c for _, c in segments})
        if len(columns) > MAX_CLASSES or all(self.classes[c].dim == 0 for c in columns):
            return None
        row_bytes = sum(k * self.classes[c].row_bytes for k, c in segments)
        best: Plan | None = None
        for kind in [index] if index is not None else self.index_kinds:
            runs = self.runs_of(segments) if kind == "runs" else 0
            total = row_bytes + self.fixed_bytes(columns, kind, runs)
            if total <= self.budget and (best is None or total < best.nbytes):
                best = Plan(name, segments, kind, runs, columns, 0.0, total)
        if best is not None:
            best.error = self.error_of(segments)
        return best


PlanBuilder = Callable[[PlanContext], list[Plan]]


def knapsack_plans(ctx: PlanContext) -> list[Plan]:
    """Per-group classes by the multiple-choice knapsack, for every index kind and basis:
    full-dimension classes only; with rotated truncated classes up to each width ``K`` (the
    rotation's ``D x K`` fp16 bytes reserved); with truncation in the stored basis."""
    dim = ctx.dim
    full = [c for c, rc in enumerate(ctx.classes) if (rc.dim == dim or rc.dim == 0) and not rc.pq]
    rot_widths = sorted({ctx.classes[c].dim for c in range(len(ctx.classes)) if ctx.rotated[c]}, reverse=True)
    variants: list[list[int]] = []
    if any(ctx.classes[c].dim == dim for c in full):
        variants.append(full)
    for k in rot_widths:
        variants.append(full + [c for c in range(len(ctx.classes)) if ctx.rotated[c] and ctx.classes[c].dim <= k])
    plain_trunc = [c for c, rc in enumerate(ctx.classes) if 0 < rc.dim < dim and not ctx.rotated[c] and not rc.pq]
    if plain_trunc:
        variants.append(full + plain_trunc)
    # codebook classes, MGQE-style: one PQ class, or two (frequent groups take the richer one),
    # next to the scalar full-dimension classes; each reserves its codebook
    pq_cols = [c for c, rc in enumerate(ctx.classes) if rc.pq]
    for i, p in enumerate(pq_cols):
        variants.append(full + [p])
        for q in pq_cols[i + 1 :]:
            variants.append(full + [p, q])
    plans: list[Plan] = []
    for kind in ctx.index_kinds:
        for variant in variants:
            plan = _solve_variant(ctx, variant, kind)
            if plan is not None:
                plans.append(plan)
    return plans


def _solve_variant(ctx: PlanContext, variant: list[int], kind: str) -> Plan | None:
    variant = list(variant)
    widest = max((ctx.classes[c].dim for c in variant if ctx.rotated[c]), default=0)
    # run-length index: reserve for a few runs first (adjacent groups of one class share a run),
    # more if the solution needs them
    runs = min(len(ctx.groups), MAX_CLASSES) if kind == "runs" else 0
    for _ in range(8):
        # every PQ class of the variant reserves its codebook up front (make() prices what is used)
        books = sum(ctx.classes[c].codebook_bytes for c in variant)
        fixed = index_bytes(kind, ctx.n, ctx.span, runs) + rotation_bytes(ctx.dim, widest) + ctx.other_bytes + books
        sub_err, sub_bytes = ctx.costs.errors[:, variant], ctx.costs.bytes[:, variant]
        try:
            choice = solve_knapsack(sub_err, sub_bytes, ctx.budget - fixed)
        except BudgetTooSmall:
            return None
        segments = [(ctx.costs.sizes[g], variant[c]) for g, c in enumerate(choice)]
        used = sorted({c for _, c in segments})
        if len(used) > MAX_CLASSES:
            # too many distinct classes: keep the ones holding the most rows and solve again
            rows_in = {c: 0 for c in used}
            for k, c in segments:
                rows_in[c] += k
            variant = sorted(sorted(used, key=lambda c: -rows_in[c])[:MAX_CLASSES])
            continue
        if kind == "runs":
            actual = ctx.runs_of(segments)
            if actual > runs:
                runs = actual
                continue
        return ctx.make("knapsack", segments, kind)
    return None


def uniform_plans(ctx: PlanContext) -> list[Plan]:
    """Every row in one full-dimension class (FBGEMM-style uniform quantization), per width."""
    plans = []
    for c, rc in enumerate(ctx.classes):
        if rc.dim == ctx.dim:
            plan = ctx.make(f"uniform {rc.label()}", [(ctx.n, c)])
            if plan is not None:
                plans.append(plan)
    return plans


def keep_top_plans(ctx: PlanContext) -> list[Plan]:
    """The ``K`` most frequent rows in one full-dimension class, the rest pruned (served by the
    unknown-ID policy), with the largest ``K`` that fits: one plan per width."""
    zero = next((c for c, rc in enumerate(ctx.classes) if rc.dim == 0), None)
    if zero is None:
        return []
    plans = []
    for c, rc in enumerate(ctx.classes):
        if rc.dim != ctx.dim:
            continue
        best: Plan | None = None
        for kind in ctx.index_kinds:
            runs_guess = 2 if ctx.ids is None else 0
            fixed = ctx.fixed_bytes([c], kind, runs_guess)
            k = min(ctx.n - 1, max(0, (ctx.budget - fixed) // max(rc.row_bytes, 1)))
            plan = ctx.make(f"top-K {rc.label()}", [(k, c), (ctx.n - k, zero)], kind) if k > 0 else None
            if plan is None and k > 1 and kind == "runs":
                # IDs not numbered by frequency: more runs than guessed; the largest K that fits
                lo, hi = 0, k
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if ctx.make("probe", [(mid, c), (ctx.n - mid, zero)], kind) is not None:
                        lo = mid
                    else:
                        hi = mid
                plan = ctx.make(f"top-K {rc.label()}", [(lo, c), (ctx.n - lo, zero)], kind) if lo > 0 else None
            if plan is not None and (best is None or (plan.segments[0][0], -plan.nbytes) > (best.segments[0][0], -best.nbytes)):
                best = plan
        if best is not None:
            plans.append(best)
    return plans


# The plans the allocator weighs against each other; the best estimated objective wins.  The
# simple plans are here so that the allocator can never lose to one of them on its own
# objective.  Another family of row classes (e.g. product-quantization codebooks) plugs in as
# one more builder.
PLAN_BUILDERS: list[PlanBuilder] = [knapsack_plans, uniform_plans, keep_top_plans]


# ---------------------------------------------------------------------------- building


def build_table(
    rows: torch.Tensor,
    row_class_of: torch.Tensor,
    classes: list[RowClass],
    ids: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
    unknown: UnknownPolicy | None = None,
    progress: ProgressFn | None = None,
    index: str | None = None,
    codebooks: Sequence[torch.Tensor | None] | None = None,
    keyed_index: KeyedKind = "hash",
    frequencies: torch.Tensor | None = None,
) -> CompressedTable:
    """Encode ``rows`` (original coordinates) into a table; row ``i`` goes to class ``row_class_of[i]``
    (a PQ class encodes against ``codebooks[class]``: nearest centroids).

    Slabs are sized exactly (no spare capacity).  ``index``: ``dense`` / ``runs`` (a locator per
    ID, plain or run-length encoded; with ``ids`` the locator spans ``0..max(ids)``) or
    ``keyed`` (``ids=None`` means IDs 0..N-1; a :class:`HashIndex`, or with
    ``keyed_index="sorted"`` the sorted :class:`KeyedIndex`) or ``hash`` / ``sorted`` by name;
    default ``keyed`` with ``ids``, else ``dense``.  A row whose class is ``-1`` is
    left out (its ID has no row).  Within a class, slots follow ascending ID, so a run of
    consecutive IDs in one class is one run of the run-length index.  ``rotation`` is stored
    as its first K columns in fp16 (K = the widest truncated class), and encoding uses exactly
    that, so what is stored is what decodes.  ``frequencies`` (expected lookups per row): a hash
    index inserts the hottest IDs first, so they sit in their home slots (:meth:`HashIndex.build`).
    """
    n, dim = rows.shape
    widest = max((rc.dim for rc in classes if 0 < rc.dim < dim), default=0)
    kept_rotation = stored_rotation(rotation, widest) if (rotation is not None and widest) else None
    rot32 = None if kept_rotation is None else kept_rotation.to(torch.float32)
    id_order = torch.argsort(ids, stable=True) if ids is not None else None
    books = list(codebooks) if codebooks is not None else [None] * len(classes)
    slabs, used = [], []
    locator = torch.full((n,), -1, dtype=torch.int32)
    chunks: list[tuple[int, int, torch.Tensor]] = []  # (class, first slot, row positions)
    for c, rc in enumerate(classes):
        members = torch.nonzero(row_class_of == c).flatten()
        if id_order is not None:
            members = members[torch.argsort(ids[members], stable=True)]  # type: ignore[index]
        slabs.append(memory.empty((members.numel(), rc.row_bytes), torch.uint8))
        chunks.extend((c, start, members[start : start + _ENCODE_CHUNK]) for start in range(0, members.numel(), _ENCODE_CHUNK))
        locator[members] = encode_locator(c, 0) + torch.arange(members.numel(), dtype=torch.int32)
        used.append(members.numel())

    def encode_chunk(chunk: tuple[int, int, torch.Tensor]) -> torch.Tensor | None:
        c, _, part = chunk
        rc = classes[c]
        if not rc.row_bytes:
            return None
        x = rows[part].to(torch.float32)
        if rot32 is not None and 0 < rc.dim < dim:
            x = x @ rot32[:, : rc.dim]  # truncated classes store the rotated basis
        return codecs.encode_rows(x, rc, codebook=books[c])

    # chunks encode on parallel threads (compression.parallel); each is written, and counted
    # for the progress bar, in order as it arrives
    done = 0
    for (c, start, part), encoded in zip(chunks, thread_map(encode_chunk, chunks)):
        if encoded is not None:
            slabs[c][start : start + part.numel()] = encoded
        done += part.numel()
        if progress is not None:
            progress(done, n)
    id_index: IdIndex
    if index is None:
        index = "keyed" if ids is not None else "dense"
    if index == "keyed":
        if keyed_index not in ("hash", "sorted"):
            raise ValueError(f"keyed_index must be 'hash' or 'sorted', got {keyed_index!r}")
        index = keyed_index
    if index in ("hash", "sorted"):
        present = locator >= 0
        keys = ids if ids is not None else torch.arange(n, dtype=torch.int64)
        if index == "hash":
            hot = None if frequencies is None else frequencies.reshape(-1)[present]
            id_index = HashIndex.build(keys[present], locator[present], frequencies=hot)
        else:
            id_index = KeyedIndex.build(keys[present], locator[present])
    elif index in ("dense", "runs"):
        if ids is not None:
            if n and int(ids.min()) < 0:
                raise ValueError("a dense or run index needs IDs >= 0")
            dense = torch.full((int(ids.max()) + 1 if n else 0,), -1, dtype=torch.int32)
            dense[ids] = locator
            locator = dense
        id_index = RunIndex.from_locator(locator) if index == "runs" else DenseIndex(locator)
    else:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
    return CompressedTable(dim, classes, slabs, used, id_index, rotation=kept_rotation, unknown=unknown, codebooks=books)


def _fallback_fn(policy: UnknownPolicy, ids: torch.Tensor | None, dim: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The rows the unknown-ID policy serves for given row positions (None: zeros)."""
    if policy.kind == "zero":
        return None
    if policy.kind == "default":
        assert policy.default is not None
        default = policy.default
        return lambda pos: default.to(torch.float32).expand(pos.numel(), dim)
    return lambda pos: policy.rows(pos if ids is None else ids[pos])


def _reweighted(costs: GroupCosts, new: torch.Tensor, old: torch.Tensor, groups: list[torch.Tensor]) -> GroupCosts:
    """The same sampled errors under other per-row weights (no re-encoding)."""
    assert costs.sample_rank is not None and costs.sample_errors is not None and costs.sample_scale is not None
    order = torch.cat(groups)
    positions = order[costs.sample_rank]
    factor = (new[positions] / old[positions].clamp(min=1e-300)).to(torch.float64)
    per_row = costs.sample_errors * factor[:, None]
    owner = torch.bucketize(costs.sample_rank, torch.tensor([g.numel() for g in groups]).cumsum(0), right=True)
    errors = torch.zeros_like(costs.errors).index_add_(0, owner, per_row * costs.sample_scale[:, None])
    return GroupCosts(costs.sizes, errors, costs.bytes, costs.sample_rank, per_row, costs.sample_scale)


def _judge(
    plans: list[Plan], ctx: PlanContext, traffic: "TrafficSample", rows: torch.Tensor, rotation: torch.Tensor | None,
    fallback: Callable[[torch.Tensor], torch.Tensor] | None, codebooks: dict[RowClass, torch.Tensor] | None = None,
    progress: ProgressFn | None = None,
) -> dict[int, float]:
    """Estimated recall of every plan (by ``id(plan)``); served rows are computed once per
    column for the positions the judge reads (a PQ column through its candidate codebook, as
    the costs were estimated).  ``progress(done, total)`` after each plan."""
    pos = traffic.positions()
    x = rows[pos].to(torch.float32)
    cache: dict[int, torch.Tensor] = {}

    def column(c: int) -> torch.Tensor:
        if c not in cache:
            rc = ctx.classes[c]
            if rc.dim == 0:
                cache[c] = fallback(pos).to(torch.float32) if fallback is not None else torch.zeros_like(x)
            else:
                book = (codebooks or {}).get(rc) if rc.pq else None
                cache[c] = served_rows(x, rc, rotation if ctx.rotated[c] else None, codebook=book)
        return cache[c]

    where = torch.full((ctx.n,), -1, dtype=torch.int64)
    where[pos] = torch.arange(pos.numel())
    scores: dict[int, float] = {}
    seen: dict[tuple[tuple[int, int], ...], float] = {}
    for plan in plans:
        key = tuple(plan.segments)
        if key not in seen:
            cls = ctx.class_by_position(plan.segments)[pos]
            served = torch.empty_like(x)
            for c in torch.unique(cls).tolist():
                mask = cls == c
                served[mask] = column(c)[mask]
            seen[key] = traffic.recall(lambda p, served=served: served[where[p]])
        scores[id(plan)] = seen[key]
        if progress is not None:
            progress(len(scores), len(plans))
    return scores


@coarse_threads()
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
    index: IndexKind = "auto",
    group_error: GroupErrorFn | None = None,
    objective: Objective = "l2",
    plan_builders: Sequence[PlanBuilder] | None = None,
    stage: StageFn | None = None,
    pq: bool | Sequence[RowClass] = False,
    keyed_index: KeyedKind = "hash",
) -> tuple[CompressedTable, CompressionReport]:
    """Compress a dense fp32 table into the least-error table within the budget.

    ``budget_bytes`` counts everything the table holds (index, rows, rotation, fallback);
    ``ratio`` sets it to ``N * D * 4 / ratio`` instead.  ``frequencies`` default to uniform.

    ``index``: ``auto`` (default) prices every index that can serve the IDs - ``dense`` (4 B per
    ID in ``0..max ID``), ``runs`` (12 B per run of consecutive IDs in one class: a handful for
    a vocabulary numbered by frequency), ``keyed`` (12 B per ID + fence) - and each plan takes
    the cheapest; ``dense`` / ``runs`` need IDs >= 0.  ``objective``: ``l2`` minimizes the
    traffic-weighted squared error (rankers), ``cosine`` the traffic-weighted squared error
    relative to each row's squared norm (retrieval by cosine / normalized dot product).
    ``group_error`` replaces the error by the caller's measure of what serving a group through a
    class costs (see :data:`GroupErrorFn`).

    Candidate plans come from ``plan_builders`` (default :data:`PLAN_BUILDERS`: the knapsack over
    frequency groups, every uniform width, keep-top-K at every width); the one with the least
    estimated objective is built.  Pruned (dim-0) rows are served by the unknown-ID policy,
    and their error is scored against its rows.  A plan that prunes every row is never taken:
    :class:`BudgetTooSmall` says so instead.

    ``pq=True`` adds product-quantization classes (:func:`compression.pq_alloc.pq_candidates`;
    or pass the PQ classes to consider, here or among ``candidates``): each gets a
    frequency-weighted k-means codebook, and the knapsack may give frequency groups one or two
    of them next to the ``(dim, bits)`` classes (MGQE-style), their codebooks counted.
    ``keyed_index``: how a keyed table indexes its IDs (``hash``, the default, or ``sorted``).
    ``progress(done, n)`` follows the encoding of rows; ``stage(what, done, total)`` follows
    every phase.
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
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if index not in ("auto", *INDEX_KINDS):
        raise ValueError(f"index must be auto or one of {INDEX_KINDS}, got {index!r}")
    freqs = torch.ones(n, dtype=torch.float64) if frequencies is None else frequencies.to(torch.float64).reshape(-1)
    if freqs.numel() != n or bool((freqs < 0).any()) or not bool(torch.isfinite(freqs).all()):
        raise ValueError("frequencies must be N finite non-negative numbers")
    span = n
    if ids is not None:
        ids = ids.to(torch.int64).reshape(-1)
        if ids.numel() != n:
            raise ValueError("ids must have one entry per row")
        by_id = torch.argsort(ids, stable=True)
        sorted_ids = ids[by_id]
        if n > 1 and not bool((sorted_ids[1:] != sorted_ids[:-1]).all()):
            raise ValueError("IDs must be unique")
        # work in ascending ID order: positions then follow IDs, which is what runs count
        rows, freqs, ids = rows[by_id], freqs[by_id], sorted_ids
        if n and int(ids[0]) >= 0 and int(ids[-1]) < 2**31:
            span = int(ids[-1]) + 1
        else:
            span = -1  # a positional index cannot hold these IDs
        if n and int(ids[0]) == 0 and int(ids[-1]) == n - 1:
            ids = None  # exactly 0..N-1: a plain positional table
    if index == "auto":
        kinds = ["dense", "runs", "keyed"] if span >= 0 else ["keyed"]
    else:
        if index != "keyed" and span < 0:
            raise ValueError(f"index {index!r} needs IDs in 0..2^31-1; use keyed (or auto)")
        kinds = [index]
    if keyed_index not in ("hash", "sorted"):
        raise ValueError(f"keyed_index must be 'hash' or 'sorted', got {keyed_index!r}")
    kinds = [("hash" if k == "keyed" and keyed_index == "hash" else k) for k in kinds]

    def tell(what: str) -> ProgressFn:
        return (lambda done, total: stage(what, done, total)) if stage is not None else (lambda done, total: None)

    cands = candidates if candidates is not None else candidate_classes(dim)
    pq_classes = [rc for rc in cands if rc.pq] + ([] if isinstance(pq, bool) else list(pq))
    cands = [rc for rc in cands if not rc.pq]
    order = torch.argsort(freqs, descending=True, stable=True)
    groups = frequency_groups(order, num_groups)
    traffic = None
    if objective == "knn":
        from .knn import TrafficSample

        tell("kNN truth of sampled traffic")(0, 1)
        traffic = TrafficSample(rows, freqs)
        weights = traffic.row_weights()
    else:
        weights = objective_weights(rows, freqs, objective)
    policy = build_unknown_policy(unknown, rows, ids if ids is not None else torch.arange(n), freqs + 1e-9, num_buckets)
    other = fallback_bytes(unknown, dim, num_buckets)

    # cost matrix columns: every candidate as stored plainly, plus the truncated ones rotated
    reduced = [rc for rc in cands if 0 < rc.dim < dim]
    tell("rotation (weighted PCA)")(0, 1)
    rotation = weighted_pca_rotation(rows, weights) if (allow_rotation and reduced) else None
    codebook_of: dict[RowClass, torch.Tensor] = {}
    if pq is True or pq_classes:
        from . import pq_alloc  # builds on this module

        tell("product-quantization codebooks")(0, 1)
        pq_classes = pq_classes or pq_alloc.pq_candidates(dim, budget_bytes, n)
        codebook_of = pq_alloc.train_candidate_codebooks(rows, weights, pq_classes)
    columns: list[RowClass] = [rc for rc in cands] + list(pq_classes)
    rotated = [False] * len(columns)
    if rotation is not None:
        columns += reduced
        rotated += [True] * len(reduced)
    costs = estimate_costs(
        rows, weights, groups, columns, sample_per_group, rotation, group_error=group_error,
        fallback=_fallback_fn(policy, ids, dim), rotated=rotated, progress=tell("estimating costs"), codebooks=codebook_of,
    )
    tell("weighing plans")(0, 1)
    ctx = PlanContext(n, dim, budget_bytes, groups, costs, columns, rotated, kinds, order, ids, max(span, 0), other)
    plans: list[Plan] = []
    builders = plan_builders if plan_builders is not None else PLAN_BUILDERS
    for builder in builders:
        plans.extend(builder(ctx))
    judged: dict[int, float] = {}
    if traffic is not None:
        # the cosine-weighted knapsack too (reweighting the same sample), then every plan is
        # judged by the recall it gives on held-out sampled traffic
        cos_ctx = replace(ctx, costs=_reweighted(costs, objective_weights(rows, freqs, "cosine"), weights, groups))
        for builder in builders:
            if builder is knapsack_plans:
                for plan in builder(cos_ctx):
                    plan.name += " (cosine weights)"
                    plan.error = ctx.error_of(plan.segments)
                    plans.append(plan)
        judged = _judge(
            plans, ctx, traffic, rows, rotation, _fallback_fn(policy, ids, dim), codebook_of, tell("judging plans on sampled traffic")
        )
    if not plans:
        one_class = ctx.runs_of([(n, 0)]) if "runs" in kinds else 0
        smallest = min(ctx.fixed_bytes([], kind, one_class) for kind in kinds)
        raise BudgetTooSmall(
            f"budget of {budget_bytes} bytes cannot hold {n} rows: the index and fallback alone take {smallest} bytes,"
            " and what is left would prune every row (a table that serves only its unknown-ID policy)"
        )
    if judged:
        best = max(plans, key=lambda p: (judged[id(p)], -p.error, -p.nbytes))
    else:
        best = min(plans, key=lambda p: (p.error, p.nbytes))
    table_columns = best.columns
    remap = {c: k for k, c in enumerate(table_columns)}
    table_classes = [columns[c] for c in table_columns]
    uses_rotation = any(rotated[c] for c in table_columns)
    class_by_position = ctx.class_by_position(best.segments)
    row_class_of = torch.tensor([remap.get(c, -1) for c in range(len(columns))], dtype=torch.int64)[class_by_position]
    books = None
    if any(rc.pq for rc in table_classes):
        from .pq_alloc import refine_codebooks

        books = refine_codebooks(rows, weights, row_class_of, table_classes, codebook_of)
    encoding = tell("encoding rows")

    def encoded(done: int, total: int) -> None:
        encoding(done, total)
        if progress is not None:
            progress(done, total)

    table = build_table(
        rows, row_class_of, table_classes, ids=ids, rotation=rotation if uses_rotation else None, unknown=policy,
        progress=encoded, index=best.index, codebooks=books, keyed_index=keyed_index, frequencies=freqs,
    )
    col_of_group = []
    rank = 0
    for g in groups:
        col_of_group.append(int(class_by_position[order[rank]]))
        rank += g.numel()
    report = CompressionReport(
        budget_bytes=budget_bytes,
        fixed_bytes=ctx.fixed_bytes(table_columns, best.index, best.runs),
        rotation=uses_rotation,
        estimated_error=best.error,
        group_sizes=[g.numel() for g in groups],
        group_classes=[columns[c].label() for c in col_of_group],
        index=best.index,
        objective=objective,
        plan=best.name,
        candidates=[(p.name, p.index, p.error, p.nbytes) for p in plans],
        estimated_recall=judged.get(id(best)),
    )
    table.objective = objective
    if table.nbytes > budget_bytes:  # the accounting above is exact; this guards against drift
        raise AssertionError(f"built table holds {table.nbytes} bytes, over the budget of {budget_bytes} (plan {best.name}, {best.nbytes})")
    return table, report


def compress_uniform(
    rows: torch.Tensor,
    row_class: RowClass,
    ids: torch.Tensor | None = None,
    unknown: UnknownKind = "zero",
    frequencies: torch.Tensor | None = None,
    index: str | None = None,
) -> CompressedTable:
    """Every row in one class: the uniform-quantization baseline (FBGEMM-style INT8/INT4/...).
    With ``index="runs"`` a table of IDs 0..N-1 needs a single run (20 bytes) instead of 4N."""
    n, dim = rows.shape
    if row_class.dim != dim:
        raise ValueError("a uniform table keeps every coordinate; use compress() for dimension reduction")
    weights = torch.ones(n, dtype=torch.float64) if frequencies is None else frequencies.to(torch.float64)
    policy = build_unknown_policy(unknown, rows, ids if ids is not None else torch.arange(n), weights)
    return build_table(rows, torch.zeros(n, dtype=torch.int64), [row_class], ids=ids, unknown=policy, index=index, frequencies=frequencies)
