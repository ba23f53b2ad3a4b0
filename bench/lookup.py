"""Lookup throughput of compressed tables vs the fp32 gather and FBGEMM's int-N TBE, one run.

    python bench/lookup.py                      # 1M x 64, batches 512/4096/65536 -> bench/results/lookup.md
    python bench/lookup.py --fast --out /tmp/l.md   # smoke run, seconds (tests/test_benchmarks.py)

Every method answers the same question - ``ids -> float32 [n, 64]``, one row per ID, no pooling -
on the same table and the same ID streams (uniform, and Zipf-distributed like ranking traffic).
Methods are timed round-robin (``bench/interleave.py``): each round times every method once on
the same IDs (a fixed number of IDs per batch size, so small batches are timed over many calls),
speeds are medians over rounds and every ratio is the median of same-round ratios with its spread.  Quality is the frequency-weighted relative squared error
``sum f_i ||x_i - x̂_i||^2 / sum f_i ||x_i||^2`` (the error a lookup sees on average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression import CompressedTable, RowClass, candidate_classes, compress, compress_uniform  # noqa: E402
from compression.hash_index import HashIndex  # noqa: E402
from compression.kernels import COMPILED_AVAILABLE  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402
from interleave import MIN_ROUNDS, NOISE_NOTE, Spread, ratio, run_alternating, run_rounds, target_line  # noqa: E402

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
    rounds: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # (batch, dist) -> lookups/s per round
    keys: torch.Tensor | None = None  # keyed table: the int64 ID of row i; streams are mapped before timing

    def ids_for(self, positions: torch.Tensor) -> torch.Tensor:
        """The IDs this method looks up for a batch of row positions (a keyed table's keys)."""
        return positions if self.keys is None else self.keys[positions]

    def steps(self, batches: list[torch.Tensor]) -> list[Callable[[], int]]:
        """One alternating step per batch (its IDs mapped here, outside the timing)."""
        return [batch_step(self.lookup, self.ids_for(ids)) for ids in batches]


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


# What a measurement's seconds are: process CPU time (default) or wall time.  On a machine shared
# with other jobs a pass is preempted for whole scheduler slices; CPU time leaves those out (it
# still sees cache and memory-bandwidth interference, which interleaving evens out).
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def pass_rate(fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor]) -> Callable[[], float]:
    """One measurement: lookups/s over one pass over ``batches`` (called once per round)."""

    def measure() -> float:
        n = 0
        started = clock()
        for ids in batches:
            fn(ids)
            n += ids.numel()
        return n / max(clock() - started, 1e-9)

    return measure


def batch_step(fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor) -> Callable[[], int]:
    """One step of an alternating measurement: one batch, returning how many IDs it looked up."""

    def step() -> int:
        fn(ids)
        return ids.numel()

    return step


CALLS_PER_STEP = 500  # batch-1 calls timed as one step: a clock read per call would be a third of a call


def call_step(fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, calls: int) -> Callable[[], int]:
    """One step of the per-call overhead measurement: ``calls`` calls of ``fn(ids)`` back to back."""

    def step() -> int:
        for _ in range(calls):
            fn(ids)
        return calls

    return step


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


KEYED_SAME_ROWS = "ours mixed precision 8x, keyed int64 IDs, same rows"


def same_rows(table: CompressedTable, index: object) -> CompressedTable:
    """The table's slabs (shared, not copied) behind another index: two indexes timed on
    exactly the same rows (bench/keyed.py uses it too)."""
    return CompressedTable(table.dim, table.classes, table.slabs, table.used, index, table.free, table.rotation, table.unknown)  # type: ignore[arg-type]


def build_methods(rows: torch.Tensor, freqs: torch.Tensor, quick: bool) -> list[Method]:
    n, d = rows.shape
    methods = [Method("fp32 `F.embedding` gather", lambda ids: F.embedding(ids, rows), rows.numel() * 4, "baseline")]
    half = rows.half()
    methods.append(Method("fp16 gather -> fp32", lambda ids: F.embedding(ids, half).float(), half.numel() * 2, "torch"))
    precision_only = candidate_classes(d, dims=[d, 0])
    tables = {}
    for bits in (8, 4):
        tables[f"ours uniform int{bits}"] = (compress_uniform(rows, RowClass(d, bits)), "row-wise, compiled decoder")
    for times in (8, 16):
        table, _ = compress(rows, freqs, ratio=times, candidates=precision_only)
        tables[f"ours mixed precision {times}x"] = (table, "knapsack over bits {32..1, pruned}")
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(9)) * 1_000_003 - 7 * n  # arbitrary int64 IDs
    positions, locs = tables["ours mixed precision 8x"][0].index.live_items()
    # hottest IDs inserted first, as compress(ids=...) builds a keyed table's hash index
    same = same_rows(tables["ours mixed precision 8x"][0], HashIndex.build(keys[positions], locs, frequencies=freqs[positions]))
    tables[KEYED_SAME_ROWS] = (same, "the 8x table's own slabs behind a hash index of the keys: keyed vs dense on the same rows")
    if not quick:
        table, _ = compress(rows, freqs, ratio=16)
        tables["ours mixed precision + dims 16x"] = (table, "bits and dims, PCA rotation")
    keyed, _ = compress(rows, freqs, ratio=8, candidates=precision_only, ids=keys)  # sorted index vs hash: bench/keyed.py
    tables["ours mixed precision 8x, keyed int64 IDs"] = (keyed, "compressed for keyed IDs (its index counts in the budget); hash index, probed in the C kernel")
    for name, (table, note) in tables.items():
        classes = ", ".join(f"{rc.label()}:{k}" for rc, k in zip(table.classes, table.rows_per_class(), strict=True) if k)
        methods.append(
            Method(name, lambda ids, t=table: t.lookup(ids).values, table.nbytes, f"{note}; {classes}",
                   keys=keys if table is keyed or table is same else None)
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


def is_target_table(m: Method, rows: int, dim: int) -> bool:
    """A mixed-precision table at <= 4 bits/parameter: what issue 13's targets hold to fp32 and FBGEMM."""
    return m.name.startswith("ours mixed precision") and 8 * m.nbytes / (rows * dim) <= 4.0 + 1e-6


def target_baselines(methods: list[Method]) -> list[Method]:
    """fp32 gather (always first) and FBGEMM INT4 when installed."""
    return [methods[0]] + [m for m in methods if m.name == "FBGEMM IntN TBE INT4"]


def render(methods: list[Method], batch_sizes: list[int], rows: int, dim: int, seconds: float, rounds: int,
           overhead: dict[str, list[float]], fast: bool, alternated: dict[str, dict[str, list[float]]],
           keyed_pair: dict[str, tuple[list[float], list[float]]]) -> str:
    fp32 = methods[0]
    fbgemm4 = next((m for m in methods if m.name == "FBGEMM IntN TBE INT4"), None)
    lines = [
        "# Lookup throughput: compressed tables vs fp32 gather vs FBGEMM" + (" (smoke mode: --fast, numbers mean nothing)" if fast else ""),
        "",
        f"Machine: {machine()}.  Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds:.0f} s, {rounds} interleaved rounds, "
        f"passes timed by {'process CPU time' if clock is time.process_time else 'wall time'}.",
        f"Table: {rows:,} x {dim} synthetic trained-like rows, Zipf(1.05) ID frequencies shuffled over IDs.",
        "All methods return float32 `[n, D]`, one row per ID.  Speeds in million lookups/s, median over rounds; "
        "`rel. error` is the traffic-weighted relative squared error.",
        "",
        NOISE_NOTE,
        "",
    ]
    head = "| method | bytes | bits/param | rel. error |" + "".join(f" b{b} uniform | b{b} Zipf |" for b in batch_sizes)
    lines += [head, "|" + "---|" * (4 + 2 * len(batch_sizes))]
    for m in methods:
        bpp = 8 * m.nbytes / (rows * dim)
        cells = "".join(
            f" {Spread.of(m.rounds[(b, 'uniform')]).median / 1e6:.1f} | {Spread.of(m.rounds[(b, 'zipf')]).median / 1e6:.1f} |" for b in batch_sizes
        )
        lines.append(f"| {m.name} | {m.nbytes / 2**20:.1f} MiB | {bpp:.2f} | {m.rel_error:.2e} |{cells}")
    lines += ["", "Notes per method:", ""]
    lines += [f"- **{m.name}**: {m.note}" for m in methods if m.note]
    target_batch = 4096 if 4096 in batch_sizes else max(batch_sizes)
    lines += ["", f"## Ratios at batch {target_batch}: median of same-round ratios (min..max over {rounds} rounds)", ""]
    lines += ["| method | dist | vs fp32 gather | vs FBGEMM INT4 |", "|---|---|---|---|"]
    targets: list[str] = []
    for m in methods:
        if not m.name.startswith("ours"):
            continue
        for dist in ("uniform", "zipf"):
            key = (target_batch, dist)
            vs_fp32 = ratio(m.rounds[key], fp32.rounds[key])
            vs_fb = ratio(m.rounds[key], fbgemm4.rounds[key]) if fbgemm4 else None
            lines.append(f"| {m.name} | {dist} | {vs_fp32.fmt()} | {vs_fb.fmt() if vs_fb else 'FBGEMM not installed'} |")
            if is_target_table(m, rows, dim) and dist in alternated:
                alt = alternated[dist]
                targets.append(target_line(f"{m.name}, {dist}, vs fp32 gather", ratio(alt[m.name], alt[fp32.name]), 1.0))
                if fbgemm4 is not None:
                    targets.append(target_line(f"{m.name}, {dist}, vs FBGEMM INT4", ratio(alt[m.name], alt[fbgemm4.name]), 1.2))
    lines += [
        "",
        f"## Targets (issue 13): mixed precision at <= 4 bits/parameter, batch {target_batch}, alternated batch by batch",
        "",
        f"These tables and their baselines take turns batch by batch over the same batches, {rounds} rounds "
        "(`run_alternating` in bench/interleave.py), so each round's ratio compares batches timed milliseconds apart; the "
        "table above has the round-robin ratios of whole passes, which span the machine's drift.",
        "",
    ]
    lines += targets or ["- no mixed-precision table at <= 4 bits/parameter in this run"]
    dense8 = next((m for m in methods if m.name == "ours mixed precision 8x"), None)
    keyed8 = next((m for m in methods if m.name == KEYED_SAME_ROWS), None)
    if dense8 is not None and keyed8 is not None and keyed_pair:
        lines += [
            "",
            f"## Target (issue 11): keyed / dense lookups on the same 8x rows, batch {target_batch}, alternated batch by batch",
            "",
            f"{rounds} rounds, each one pass over the same batches as above with the two tables taking turns batch by batch "
            "(`run_alternating` in bench/interleave.py): each round's ratio compares batches timed milliseconds apart.  In the "
            "round-robin rounds above, whole passes of the other methods sit between the two and the ratio spans the machine's drift.",
            "",
        ]
        lines += [target_line(f"hash-indexed int64 IDs / dense IDs, {dist}", ratio(*keyed_pair[dist]), 0.8) for dist in ("uniform", "zipf")]
        lines += ["", "For reference, the same ratio from the round-robin rounds above (whole passes, seconds apart):", ""]
        lines += [f"- {dist}: {ratio(keyed8.rounds[(target_batch, dist)], dense8.rounds[(target_batch, dist)]).fmt()}" for dist in ("uniform", "zipf")]
    if overhead:
        emb = overhead["fp32 `F.embedding`"]
        ours = overhead["ours mixed precision 8x `lookup`"]
        per_call = ratio(emb, ours)  # time per call of ours / F.embedding's = rate of F.embedding / ours
        lines += [
            "",
            f"## Per-call overhead at batch 1 (one ID, calls back to back, alternated in blocks of {CALLS_PER_STEP} calls)",
            "",
            "| call | us per call, median (min..max) |",
            "|---|---|",
        ]
        for name, rates in overhead.items():
            us = Spread.of([1e6 / r for r in rates])
            lines.append(f"| {name} | {us.fmt(2, '')} |")
        lines += ["", target_line("`CompressedTable.lookup` per-call time / `F.embedding`'s, batch 1", per_call, 1.5, at_least=False)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batches", default="512,4096,65536")
    parser.add_argument("--ids-per-measure", type=int, default=262_144, help="IDs timed per method, round and batch size")
    parser.add_argument("--rounds", type=int, default=7, help=f"interleaved rounds (at least {MIN_ROUNDS})")
    parser.add_argument("--calls", type=int, default=20_000, help="batch-1 calls per method and round (per-call overhead)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="time a pass by process CPU time (default) or wall time")
    parser.add_argument("--threads", type=int, default=1, help="torch / decoder threads (1: per-core speed, and CPU time is not inflated by spinning OpenMP workers)")
    parser.add_argument("--fast", "--quick", dest="fast", action="store_true", help="smoke run: 20k rows, small measures, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lookup.md")
    args = parser.parse_args()
    if args.fast:
        args.rows, args.ids_per_measure, args.calls, args.batches = 20_000, 8192, 500, "512,4096"
        args.rounds = MIN_ROUNDS
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}: a spread needs rounds")
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    batch_sizes = [int(b) for b in args.batches.split(",")]
    freqs = zipf_frequencies(args.rows)
    rows = synthetic_table(args.rows, args.dim, freqs)
    methods = build_methods(rows, freqs, args.fast)
    streams = {}
    for b in batch_sizes:
        count = max(1, args.ids_per_measure // b)
        streams[(b, "uniform")] = [torch.randint(0, args.rows, (b,), generator=torch.Generator().manual_seed(k)) for k in range(count)]
        streams[(b, "zipf")] = [sample_ids(freqs, b, seed=1000 + k) for k in range(count)]
    for m in methods:
        m.rel_error = relative_error(m.lookup, rows, freqs, m.keys)
    for key, batches in streams.items():
        measures = {}
        for m in methods:
            mine = [m.ids_for(b) for b in batches]
            for ids in mine:  # warm-up pass, outside the rounds
                m.lookup(ids)
            measures[m.name] = pass_rate(m.lookup, mine)
        per_round = run_rounds(measures, args.rounds)
        for m in methods:
            m.rounds[key] = per_round[m.name]
        print(f"{key[0]}/{key[1]}: " + " ".join(f"{m.name[:24]}={Spread.of(m.rounds[key]).median / 1e6:.1f}M/s" for m in methods), flush=True)
    # the targets' ratios: the methods each compares alternated batch by batch (run_alternating's why)
    target_batch = 4096 if 4096 in batch_sizes else max(batch_sizes)
    compared = target_baselines(methods) + [m for m in methods if is_target_table(m, args.rows, args.dim)]
    alternated: dict[str, dict[str, list[float]]] = {}
    keyed_pair: dict[str, tuple[list[float], list[float]]] = {}
    dense8 = next((m for m in methods if m.name == "ours mixed precision 8x"), None)
    keyed8 = next((m for m in methods if m.name == KEYED_SAME_ROWS), None)
    for dist in ("uniform", "zipf"):
        batches = streams[(target_batch, dist)]
        alternated[dist] = run_alternating(
            {m.name: m.steps(batches) for m in compared}, args.rounds, clock
        )
        if dense8 is not None and keyed8 is not None:  # issue 11: the two alone
            pair = run_alternating({"dense": dense8.steps(batches), "keyed": keyed8.steps(batches)}, args.rounds, clock)
            keyed_pair[dist] = (pair["keyed"], pair["dense"])
    overhead: dict[str, list[float]] = {}
    if dense8 is not None:
        one = torch.tensor([7], dtype=torch.int64)
        calls = {"fp32 `F.embedding`": methods[0].lookup, "ours mixed precision 8x `lookup`": dense8.lookup}
        for fn in calls.values():
            for _ in range(100):
                fn(one)
        steps = max(1, args.calls // CALLS_PER_STEP)  # alternated in blocks of calls, like the targets above
        overhead = run_alternating({name: [call_step(fn, one, CALLS_PER_STEP)] * steps for name, fn in calls.items()}, args.rounds, clock)
    report = render(methods, batch_sizes, args.rows, args.dim, time.perf_counter() - started, args.rounds, overhead, args.fast, alternated, keyed_pair)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
