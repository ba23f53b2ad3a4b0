"""Lookup throughput of compressed tables vs the fp32 gather and FBGEMM's int-N TBE, one run.

    python bench/lookup.py                      # 1M x 64, batches 512/4096/65536 -> bench/results/lookup.md
    python bench/lookup.py --rows 200000 --quick

Every method answers the same question - ``ids -> float32 [n, 64]``, one row per ID, no pooling -
on the same table and the same ID streams (uniform, and Zipf-distributed like ranking traffic).
Numbers are medians over repeats of a fixed number of IDs per batch size, so small batches are
timed over many calls.  Quality is the frequency-weighted relative squared error
``sum f_i ||x_i - x̂_i||^2 / sum f_i ||x_i||^2`` (the error a lookup sees on average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression import RowClass, candidate_classes, compress, compress_uniform  # noqa: E402
from compression.kernels import COMPILED_AVAILABLE  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402

try:
    import fbgemm_baseline  # noqa: E402
except Exception:  # noqa: BLE001 - the baseline is optional; any import failure means "not installed"
    fbgemm_baseline = None  # type: ignore[assignment]


@dataclass
class Method:
    name: str
    lookup: Callable[[torch.Tensor], torch.Tensor]
    nbytes: int
    note: str = ""
    rel_error: float = 0.0
    speed: dict[tuple[int, str], float] = field(default_factory=dict)  # (batch, dist) -> lookups/s
    keys: torch.Tensor | None = None  # keyed table: the int64 ID of row i; streams are mapped before timing


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.machine()}"
    )


def time_lookups(fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor], repeats: int) -> float:
    """Median lookups/s over ``repeats`` passes over ``batches`` (after one warm-up pass)."""
    for ids in batches:
        fn(ids)
    rates = []
    for _ in range(repeats):
        n = 0
        started = time.perf_counter()
        for ids in batches:
            fn(ids)
            n += ids.numel()
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def relative_error(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, freqs: torch.Tensor, keys: torch.Tensor | None) -> float:
    ids = torch.arange(rows.shape[0])
    err = torch.zeros((), dtype=torch.float64)
    ref = torch.zeros((), dtype=torch.float64)
    for start in range(0, rows.shape[0], 65536):
        part = ids[start : start + 65536]
        got = fn(part if keys is None else keys[part])
        truth = rows[part]
        w = freqs[part]
        err += (((got - truth) ** 2).sum(1).double() * w).sum()
        ref += ((truth**2).sum(1).double() * w).sum()
    return float(err / ref)


def build_methods(rows: torch.Tensor, freqs: torch.Tensor, quick: bool) -> list[Method]:
    n, d = rows.shape
    methods = [Method("fp32 `F.embedding` gather", lambda ids: F.embedding(ids, rows), rows.numel() * 4, "baseline")]
    half = rows.half()
    methods.append(Method("fp16 gather -> fp32", lambda ids: F.embedding(ids, half).float(), half.numel() * 2, "torch"))
    precision_only = candidate_classes(d, dims=[d, 0])
    tables = {}
    for bits in (8, 4):
        tables[f"ours uniform int{bits}"] = (compress_uniform(rows, RowClass(d, bits)), "row-wise, compiled decoder")
    for ratio in (8, 16):
        table, _ = compress(rows, freqs, ratio=ratio, candidates=precision_only)
        tables[f"ours mixed precision {ratio}x"] = (table, "knapsack over bits {32..1, pruned}")
    if not quick:
        table, _ = compress(rows, freqs, ratio=16)
        tables["ours mixed precision + dims 16x"] = (table, "bits and dims, PCA rotation")
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(9)) * 1_000_003 - 7 * n  # arbitrary int64 IDs
    keyed, _ = compress(rows, freqs, ratio=8, candidates=precision_only, ids=keys, keyed_index="sorted")  # hash index: bench/keyed.py
    tables["ours mixed precision 8x, keyed int64 IDs"] = (keyed, "sorted keys + fence, searched in the C kernel")
    for name, (table, note) in tables.items():
        classes = ", ".join(f"{rc.label()}:{k}" for rc, k in zip(table.classes, table.rows_per_class(), strict=True) if k)
        methods.append(
            Method(name, lambda ids, t=table: t.lookup(ids).values, table.nbytes, f"{note}; {classes}", keys=keys if table is keyed else None)
        )
    if COMPILED_AVAILABLE:
        ref_table = compress_uniform(rows, RowClass(d, 4))
        ref_table.backend = "torch"
        methods.append(Method("ours uniform int4, torch reference path", lambda ids: ref_table.lookup(ids).values, ref_table.nbytes, "pure torch ops"))
    if fbgemm_baseline is not None and fbgemm_baseline.AVAILABLE:
        for bits in (8, 4):
            tbe = fbgemm_baseline.FbgemmIntNTable(rows, bits)
            methods.append(Method(f"FBGEMM IntN TBE INT{bits}", tbe.lookup, tbe.nbytes, "fbgemm-gpu-cpu 1.8.0 raw op; its CPU kernel decodes a table on one thread"))
    return methods


def render(methods: list[Method], batch_sizes: list[int], rows: int, dim: int, seconds: float) -> str:
    fp32 = methods[0]
    fbgemm4 = next((m for m in methods if m.name == "FBGEMM IntN TBE INT4"), None)
    lines = [
        "# Lookup throughput: compressed tables vs fp32 gather vs FBGEMM",
        "",
        f"Machine: {machine()}.  Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s.",
        f"Table: {rows:,} x {dim} synthetic trained-like rows, Zipf(1.05) ID frequencies shuffled over IDs.",
        "All methods return float32 `[n, D]`, one row per ID.  Speeds in million lookups/s (median); "
        "`rel. error` is the traffic-weighted relative squared error.",
        "",
    ]
    head = "| method | bytes | bits/param | rel. error |" + "".join(f" b{b} uniform | b{b} Zipf |" for b in batch_sizes)
    lines += [head, "|" + "---|" * (4 + 2 * len(batch_sizes))]
    for m in methods:
        bpp = 8 * m.nbytes / (rows * dim)
        cells = "".join(f" {m.speed[(b, 'uniform')] / 1e6:.1f} | {m.speed[(b, 'zipf')] / 1e6:.1f} |" for b in batch_sizes)
        lines.append(f"| {m.name} | {m.nbytes / 2**20:.1f} MiB | {bpp:.2f} | {m.rel_error:.2e} |{cells}")
    lines += ["", "Notes per method:", ""]
    lines += [f"- **{m.name}**: {m.note}" for m in methods if m.note]
    if 4096 in batch_sizes:
        lines += ["", "## Targets at batch 4096 (mixed precision at <= 4 bits/parameter)", ""]
        lines += ["| method | dist | vs fp32 gather (target >= 0.7x) | vs FBGEMM INT4 (target >= 1.2x) |", "|---|---|---|---|"]
        for m in methods:
            if not m.name.startswith("ours mixed precision") or 8 * m.nbytes / (rows * dim) > 4.0 + 1e-6:
                continue
            for dist in ("uniform", "zipf"):
                vs_fp32 = m.speed[(4096, dist)] / fp32.speed[(4096, dist)]
                vs_fb = f"{m.speed[(4096, dist)] / fbgemm4.speed[(4096, dist)]:.2f}x" if fbgemm4 else "FBGEMM not installed"
                lines.append(f"| {m.name} | {dist} | {vs_fp32:.2f}x | {vs_fb} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batches", default="512,4096,65536")
    parser.add_argument("--ids-per-measure", type=int, default=262_144, help="IDs timed per repeat and batch size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer methods and repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lookup.md")
    args = parser.parse_args()
    started = time.perf_counter()
    batch_sizes = [int(b) for b in args.batches.split(",")]
    freqs = zipf_frequencies(args.rows)
    rows = synthetic_table(args.rows, args.dim, freqs)
    methods = build_methods(rows, freqs, args.quick)
    repeats = 3 if args.quick else args.repeats
    streams = {}
    for b in batch_sizes:
        count = max(1, args.ids_per_measure // b)
        streams[(b, "uniform")] = [torch.randint(0, args.rows, (b,), generator=torch.Generator().manual_seed(k)) for k in range(count)]
        streams[(b, "zipf")] = [sample_ids(freqs, b, seed=1000 + k) for k in range(count)]
    for m in methods:
        m.rel_error = relative_error(m.lookup, rows, freqs, m.keys)
        for key, batches in streams.items():
            if m.keys is not None:
                batches = [m.keys[b] for b in batches]
            m.speed[key] = time_lookups(m.lookup, batches, repeats)
        print(f"{m.name:45s} " + " ".join(f"{k[0]}/{k[1]}={v / 1e6:.1f}M/s" for k, v in m.speed.items()), flush=True)
    report = render(methods, batch_sizes, args.rows, args.dim, time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
