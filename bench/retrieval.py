"""Retrieval quality per byte: cosine kNN recall@10 of compressed tables against simple plans
and faiss PQ, at equal bytes.

    python bench/retrieval.py                 # MovieLens items + 1M x 64 clustered table -> bench/results/retrieval.md
    python bench/retrieval.py --fast --out /tmp/r   # smoke test (a test runs it): a 1,000-row clustered table, 2 ratios

Protocol:

* tables: (1) item vectors of a matrix-factorization model trained on MovieLens-100k ratings
  (``compression.training.datasets``; 1,682 items x 64, traffic = each item's rating count);
  (2) a synthetic clustered table (``--rows`` x 64, default 1M): rows around 2,000 cluster
  centres with a spread and norm that vary by row, Zipf traffic, IDs numbered by frequency
  (as after a trainer's vocabulary mapping).
* budgets: ``N * D * 4 / ratio`` bytes for ratio 4 .. 128, counting everything each method
  holds (index, rows, codebooks, rotation).
* recall@10: ``--queries`` query IDs drawn by traffic; truth = the 10 nearest rows by cosine in
  the fp32 table (the query itself excluded); retrieved = the 10 nearest by cosine of the
  query's *served* vector among all *served* vectors.  A zero row (pruned) has cosine 0 with
  everything.
* error: frequency-weighted relative squared error ``sum f |x - x'|^2 / sum f |x|^2`` (l2) and
  its per-row normalized form ``sum f |x - x'|^2 / |x|^2 / sum f`` (cosine proxy).
* methods (:data:`METHODS`, one entry each; a method that cannot fit a budget is skipped there):
  embserve ``compress`` with ``objective="l2"``, ``"cosine"`` and ``"knn"`` (plans judged by
  recall estimated on sampled traffic, :mod:`compression.knn`), and ``"knn"`` with PQ classes
  among the candidates (``pq=True``, the recommended setting for retrieval); baselines: uniform
  int8 / int4 / int2 (our codec with MSE clipping, a one-run index), keep-top-K (the most
  frequent rows at fp16 / int8 / int4, the rest zero, largest K that fits), and faiss PQ
  (``IndexPQ``, the largest ``m x nbits`` whose codes + fp32 codebooks fit).
* which proxy predicts recall: per table and ratio, the Spearman rank correlation between each
  proxy and recall over all methods that fit, averaged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression import RowClass, build_table, compress, compress_uniform  # noqa: E402
from compression.allocation import BudgetTooSmall  # noqa: E402

RATIOS = (4, 8, 16, 32, 64, 128)
FAST_RATIOS = (8, 32)
K = 10


# ---------------------------------------------------------------------------- tables


@dataclass
class Table:
    name: str
    rows: torch.Tensor  # fp32 [N, D]
    freqs: torch.Tensor  # float64 [N]


def movielens_items(dim: int = 64, epochs: int = 60, seed: int = 0) -> Table:
    """Item vectors of a biased matrix factorization trained on MovieLens-100k (MSE, Adam)."""
    from compression.training.datasets import movielens_100k

    r = movielens_100k()
    users = torch.from_numpy(r.users - 1)
    items = torch.from_numpy(r.items - 1)
    ratings = torch.from_numpy(r.ratings)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    p = (0.1 * torch.randn(n_users, dim, generator=gen)).requires_grad_()
    q = (0.1 * torch.randn(n_items, dim, generator=gen)).requires_grad_()
    bu = torch.zeros(n_users, requires_grad=True)
    bi = torch.zeros(n_items, requires_grad=True)
    mu = float(ratings.mean())
    opt = torch.optim.Adam([p, q, bu, bi], lr=0.02)
    batch = 8192
    for _ in range(epochs):
        perm = torch.randperm(len(ratings), generator=gen)
        for s in range(0, len(perm), batch):
            b = perm[s : s + batch]
            pred = mu + bu[users[b]] + bi[items[b]] + (p[users[b]] * q[items[b]]).sum(1)
            loss = ((pred - ratings[b]) ** 2).mean() + 1e-4 * ((p[users[b]] ** 2).sum(1) + (q[items[b]] ** 2).sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    counts = torch.bincount(items, minlength=n_items).to(torch.float64)
    return Table("movielens-100k items (MF, 1,682 x 64)", q.detach().clone(), counts)


def clustered_table(n: int, dim: int = 64, clusters: int = 2000, seed: int = 0) -> Table:
    """Rows around cluster centres, Zipf traffic, IDs numbered by descending frequency."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen)
    centres /= centres.norm(dim=1, keepdim=True)
    owner = torch.randint(0, clusters, (n,), generator=gen)
    spread = 0.25 + 0.5 * torch.rand(n, 1, generator=gen)  # tight and loose neighbourhoods
    norm = torch.exp(0.3 * torch.randn(n, 1, generator=gen))  # norms vary row to row
    rows = torch.empty(n, dim)
    chunk = 1 << 18
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        v = centres[owner[s:e]] + spread[s:e] * torch.randn(e - s, dim, generator=gen) / dim**0.5
        rows[s:e] = v / v.norm(dim=1, keepdim=True) * norm[s:e]
    freqs = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.05  # ID 0 is the most frequent
    return Table(f"clustered synthetic ({n:,} x {dim}, Zipf 1.05)", rows, freqs)


# ---------------------------------------------------------------------------- methods


@dataclass
class Served:
    values: torch.Tensor  # fp32 [N, D]: what a lookup of every ID returns
    nbytes: int  # everything the method holds


Build = Callable[[Table, int], "Served | None"]


def _served_table(table: object, n: int) -> torch.Tensor:
    out = []
    for s in range(0, n, 1 << 18):
        out.append(table.lookup(torch.arange(s, min(n, s + (1 << 18)))).values)  # type: ignore[attr-defined]
    return torch.cat(out)


def embserve(objective: str, pq: bool = False) -> Build:
    def build(t: Table, budget: int) -> Served | None:
        try:
            table, _ = compress(t.rows, t.freqs, budget_bytes=budget, objective=objective, pq=pq)  # type: ignore[arg-type]
        except BudgetTooSmall:
            return None
        return Served(_served_table(table, t.rows.shape[0]), table.nbytes)

    return build


def uniform(bits: int) -> Build:
    def build(t: Table, budget: int) -> Served | None:
        table = compress_uniform(t.rows, RowClass(t.rows.shape[1], bits), index="runs")
        if table.nbytes > budget:
            return None
        return Served(_served_table(table, t.rows.shape[0]), table.nbytes)

    return build


def keep_top(bits: int) -> Build:
    """The K most frequent rows at one width, the rest zero: the largest K that fits."""

    def build(t: Table, budget: int) -> Served | None:
        n, dim = t.rows.shape
        order = torch.argsort(t.freqs, descending=True, stable=True)
        rc = RowClass(dim, bits)
        k = min(n - 1, budget // rc.row_bytes)
        while k > 0:
            cls = torch.ones(n, dtype=torch.int64)
            cls[order[:k]] = 0
            best = None
            for index in ("runs", "dense"):
                table = build_table(t.rows, cls, [rc, RowClass(0, 32)], index=index)
                if table.nbytes <= budget and (best is None or table.nbytes < best.nbytes):
                    best = table
            if best is not None:
                return Served(_served_table(best, n), best.nbytes)
            k = int(k * 0.98)
        return None

    return build


def faiss_pq(t: Table, budget: int) -> Served | None:
    """faiss ``IndexPQ``: the largest ``m * nbits`` whose codes + fp32 codebooks fit."""
    import faiss

    n, dim = t.rows.shape
    best = None
    for m in (d for d in (1, 2, 4, 8, 16, 32, 64) if dim % d == 0):
        for nbits in range(1, 13):
            nbytes = -(-n * m * nbits // 8) + (1 << nbits) * dim * 4
            if nbytes <= budget and (1 << nbits) <= n and (best is None or m * nbits > best[0] * best[1]):
                best = (m, nbits, nbytes)
    if best is None:
        return None
    m, nbits, nbytes = best
    x = t.rows.numpy().astype(np.float32)
    pq = faiss.ProductQuantizer(dim, m, nbits)
    pq.cp.min_points_per_centroid = 1  # small tables: train anyway, without a warning per sub-space
    gen = np.random.default_rng(0)
    train = x if n <= 100_000 else x[gen.choice(n, 100_000, replace=False)]
    pq.train(np.ascontiguousarray(train))
    codes = pq.compute_codes(x)
    return Served(torch.from_numpy(pq.decode(codes)), nbytes)


RECOMMENDED = "embserve knn+pq"


@dataclass
class Method:
    name: str
    build: Build
    ours: bool = False


# One entry per method.  "embserve knn+pq" (the knn objective with product-quantization classes
# among the candidates: ``compress(objective="knn", pq=True)``, CLI ``--objective knn --pq``) is
# what the README recommends for retrieval tables.
METHODS: list[Method] = [
    Method("embserve l2", embserve("l2"), ours=True),
    Method("embserve cosine", embserve("cosine"), ours=True),
    Method("embserve knn", embserve("knn"), ours=True),
    Method("embserve knn+pq", embserve("knn", pq=True), ours=True),
    Method("uniform int8", uniform(8)),
    Method("uniform int4", uniform(4)),
    Method("uniform int2", uniform(2)),
    Method("top-K fp16", keep_top(16)),
    Method("top-K int8", keep_top(8)),
    Method("top-K int4", keep_top(4)),
    Method("faiss PQ", faiss_pq),
]


# ---------------------------------------------------------------------------- metrics


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def top_k(vectors: torch.Tensor, queries: torch.Tensor, k: int = K) -> torch.Tensor:
    """The ``k`` nearest rows by cosine to each query row (itself excluded)."""
    unit = _unit(vectors)
    out = []
    for s in range(0, queries.numel(), 64):
        q = queries[s : s + 64]
        scores = unit[q] @ unit.T
        scores[torch.arange(q.numel()), q] = -float("inf")
        out.append(torch.topk(scores, k, dim=1).indices)
    return torch.cat(out)


def recall(truth: torch.Tensor, served: torch.Tensor, queries: torch.Tensor) -> float:
    got = top_k(served, queries)
    hits = (got[:, :, None] == truth[:, None, :]).any(2).sum()
    return float(hits) / truth.numel()


def errors(t: Table, served: torch.Tensor) -> tuple[float, float]:
    sq = ((served - t.rows) ** 2).sum(1).double()
    norms = (t.rows**2).sum(1).double()
    f = t.freqs
    return float((f * sq).sum() / (f * norms).sum()), float((f * sq / norms.clamp(min=1e-30)).sum() / f.sum())


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------- run


@dataclass
class Row:
    table: str
    ratio: int
    method: str
    ours: bool
    nbytes: int
    recall: float
    l2: float
    cosine: float
    seconds: float


def run(tables: list[Table], ratios: tuple[int, ...], queries: int, methods: list[Method], log: Callable[[str], None]) -> list[Row]:
    out: list[Row] = []
    for t in tables:
        n, dim = t.rows.shape
        q = torch.multinomial(t.freqs / t.freqs.sum(), queries, replacement=True, generator=torch.Generator().manual_seed(1))
        truth = top_k(t.rows, q)
        for ratio in ratios:
            budget = int(n * dim * 4 / ratio)
            for m in methods:
                started = time.perf_counter()
                served = m.build(t, budget)
                seconds = time.perf_counter() - started
                if served is None:
                    log(f"{t.name} {ratio}x {m.name}: does not fit")
                    continue
                assert served.nbytes <= budget, (m.name, served.nbytes, budget)
                l2, cos = errors(t, served.values)
                row = Row(t.name, ratio, m.name, m.ours, served.nbytes, recall(truth, served.values, q), l2, cos, seconds)
                log(f"{t.name} {ratio}x {m.name}: recall {row.recall:.4f} l2 {l2:.4g} cos {cos:.4g} ({seconds:.1f} s)")
                out.append(row)
    return out


def proxy_correlations(rows: list[Row]) -> dict[str, float]:
    """Mean over (table, ratio) of the Spearman correlation of each proxy with recall (the
    proxies are errors: a good one correlates near -1)."""
    result: dict[str, list[float]] = {"l2": [], "cosine": []}
    keys = sorted({(r.table, r.ratio) for r in rows})
    for key in keys:
        group = [r for r in rows if (r.table, r.ratio) == key]
        if len(group) < 3:
            continue
        for proxy in result:
            c = spearman([getattr(r, proxy) for r in group], [r.recall for r in group])
            if c == c:
                result[proxy].append(c)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in result.items()}


def report(rows: list[Row], ratios: tuple[int, ...], machine: str, elapsed: float, recommended: str) -> str:
    lines = [
        "# Retrieval: cosine recall@10 per byte",
        "",
        f"Machine: {machine}. Run took {elapsed / 60:.1f} min. `python bench/retrieval.py` (protocol in its docstring).",
        "",
    ]
    for table in dict.fromkeys(r.table for r in rows):
        lines += [f"## {table}", "", "recall@10 (fp32 neighbours as truth); `-` = does not fit the budget", ""]
        methods = list(dict.fromkeys(r.method for r in rows if r.table == table))
        lines.append("| method | " + " | ".join(f"{x}x" for x in ratios) + " |")
        lines.append("|---|" + "---|" * len(ratios))
        cell = {(r.method, r.ratio): r for r in rows if r.table == table}
        for m in methods:
            vals = [f"{cell[(m, x)].recall:.4f}" if (m, x) in cell else "-" for x in ratios]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        best_base = []
        margin = []
        for x in ratios:
            base = [r.recall for r in rows if r.table == table and r.ratio == x and not r.ours]
            ours = cell.get((recommended, x))
            best_base.append(f"{max(base):.4f}" if base else "-")
            margin.append(f"{ours.recall - max(base):+.4f}" if base and ours else "-")
        lines.append("| *best baseline* | " + " | ".join(best_base) + " |")
        lines.append(f"| *{recommended} - best baseline* | " + " | ".join(margin) + " |")
        lines += ["", "frequency-weighted relative squared error (l2) / per-row normalized (cosine):", ""]
        lines.append("| method | " + " | ".join(f"{x}x" for x in ratios) + " |")
        lines.append("|---|" + "---|" * len(ratios))
        for m in methods:
            vals = [f"{cell[(m, x)].l2:.3g} / {cell[(m, x)].cosine:.3g}" if (m, x) in cell else "-" for x in ratios]
            lines.append(f"| {m} | " + " | ".join(vals) + " |")
        lines.append("")
    corr = proxy_correlations(rows)
    lines += [
        "## Which error predicts recall",
        "",
        "Spearman correlation between each proxy and recall@10 across the methods at one ratio, averaged over tables and ratios (-1 = the proxy ranks methods exactly as recall does):",
        "",
        "| proxy | mean Spearman vs recall |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:+.3f} |" for k, v in corr.items()]
    lines.append("")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, load average {load:.1f} at the end, {dt.date.today()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="smoke run: the clustered table only, 1,000 rows, 2 ratios, 50 queries")
    ap.add_argument("--rows", type=int, default=None, help="rows of the clustered table (default 1M; 1,000 with --fast)")
    ap.add_argument("--queries", type=int, default=None, help="query IDs per table (default 500; 50 with --fast)")
    ap.add_argument("--no-movielens", action="store_true", help="skip the MovieLens table (no dataset download)")
    ap.add_argument("--epochs", type=int, default=60, help="matrix-factorization epochs for the MovieLens item vectors")
    ap.add_argument("--methods", default="", help="comma-separated method names to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated method names to leave out (e.g. 'embserve l2')")
    ap.add_argument("--ratios", default=None, help="comma-separated ratios (default 4..128; 4,16,64 with --fast)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    ratios = tuple(int(x) for x in args.ratios.split(",")) if args.ratios else (FAST_RATIOS if args.fast else RATIOS)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    only = {x.strip() for x in args.methods.split(",") if x.strip()}
    unknown = (only | skip) - {m.name for m in METHODS}
    if unknown:
        ap.error(f"unknown method(s) {sorted(unknown)}; methods: {[m.name for m in METHODS]}")
    methods = [m for m in METHODS if m.name not in skip and (not only or m.name in only)]
    rows_n = args.rows or (1000 if args.fast else 1_000_000)
    queries = args.queries or (50 if args.fast else 500)
    started = time.perf_counter()
    tables = [] if (args.no_movielens or args.fast) else [movielens_items(epochs=args.epochs)]
    tables.append(clustered_table(rows_n))
    rows = run(tables, ratios, queries, methods, lambda s: print(s, flush=True))
    recommended = RECOMMENDED if any(m.name == RECOMMENDED for m in methods) else "embserve knn"
    text = report(rows, ratios, machine(), time.perf_counter() - started, recommended)
    text += "\nCommand: `python bench/retrieval.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "retrieval.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
