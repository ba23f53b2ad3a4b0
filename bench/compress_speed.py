"""How long `embserve compress` takes end to end on a 1M x 64 table, before and after a change.

    python bench/compress_speed.py                      # 1M x 64, ratios 4/8/32/128, baseline main -> bench/results/compress_speed.md
    python bench/compress_speed.py --fast --out /tmp/x  # smoke test (a test runs it): 20k rows, 2 ratios, 1 round

The table is :func:`compression.synthetic.synthetic_table` (low-rank rows, norms growing with
frequency) with shuffled Zipf(1.05) frequencies, saved as ``.npy`` like a user's export.  Each
measurement is one real ``python -m service.cli compress`` process (import, load the ``.npy``,
allocate, encode, write the file, print its summary): wall seconds and the child's CPU seconds.
``--baseline REV`` exports that git revision into a temporary folder (``git archive``), builds its
C extension there, and times its CLI on the same input: the two trees run round-robin (rotating
start), and the after/before ratio is the median of same-round ratios with its min..max spread
(bench/interleave.py).  Quality: the frequency-weighted relative squared error
``sum f_i ||x_i - x^_i||^2 / sum f_i ||x_i||^2`` over *every* row of each written table (the
output is deterministic, so once per tree and setting).  Extra settings (``--objective cosine``,
``knn``, ``--pq``) run one round each at 8x: reported, not held to the target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleave import NOISE_NOTE, Spread, ratio, run_rounds, target_line  # noqa: E402

from compression.storage import load_table  # noqa: E402
from compression.synthetic import synthetic_table, zipf_frequencies  # noqa: E402

TARGET_S = 60.0


def export_tree(rev: str, into: Path) -> Path:
    """``rev`` of this repository as a plain folder with its C extension built (the 'before')."""
    # the repository the bench is run from (cwd), so that a copy of the bench can time any two trees
    archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, check=True, capture_output=True)
    return into


def run_cli(tree: Path, table: Path, freqs: Path, out: Path, ratio_: float, extra: list[str]) -> tuple[float, float, str]:
    """One `compress` process from ``tree``: (wall s, CPU s of the child, its output)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}
    env.pop("OMP_NUM_THREADS", None)  # the CLI's own defaults, as a user runs it
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "compress", str(table), str(out), "--frequencies", str(freqs), "--ratio", f"{ratio_:g}", *extra],
        cwd=tree, env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"compress from {tree} failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout + proc.stderr  # the CLI prints its summary on stderr


def full_error(rows: torch.Tensor, freqs: torch.Tensor, path: Path) -> float:
    """Frequency-weighted relative squared error over every row of the written table."""
    table, _ = load_table(path)
    num = den = 0.0
    for start in range(0, rows.shape[0], 1 << 17):
        stop = min(rows.shape[0], start + (1 << 17))
        x = rows[start:stop]
        got = table.lookup(torch.arange(start, stop)).values
        f = freqs[start:stop].to(torch.float64)
        num += float((f * ((got - x) ** 2).sum(1).to(torch.float64)).sum())
        den += float((f * (x**2).sum(1).to(torch.float64)).sum())
    return num / den


def plan_of(stdout: str) -> str:
    m = re.search(r"plan (.+?), index (\w+)", " ".join(stdout.split()))
    return f"{m.group(1)} ({m.group(2)})" if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", action="store_true", help="smoke run: 20k rows, ratios 8 and 128, one round, no extra settings")
    ap.add_argument("--rows", type=int, default=None, help="table rows (default 1M; 20k with --fast)")
    ap.add_argument("--ratios", default=None, help="comma-separated (default 4,8,32,128; 8,128 with --fast)")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 3; 1 with --fast)")
    ap.add_argument("--baseline", default="main", help="git revision timed as 'before' ('none': only this tree)")
    ap.add_argument("--extras", action=argparse.BooleanOptionalAction, default=None, help="also time cosine / knn / --pq at 8x (default on, off with --fast)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compress_speed.md")
    args = ap.parse_args()
    n = args.rows or (20_000 if args.fast else 1_000_000)
    ratio_arg = args.ratios if args.ratios is not None else ("8,128" if args.fast else "4,8,32,128")
    ratios = [float(r) for r in ratio_arg.split(",") if r.strip()]  # "" with --extras: only the extra settings
    rounds = args.rounds or (1 if args.fast else 3)
    extras = args.extras if args.extras is not None else not args.fast
    started = time.time()
    load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        freqs = zipf_frequencies(n)
        rows = synthetic_table(n, 64, freqs)
        np.save(tmp / "table.npy", rows.numpy())
        np.save(tmp / "freqs.npy", freqs.numpy())
        trees = {"after": ROOT}
        if args.baseline != "none":
            (tmp / "before").mkdir()
            trees = {"before": export_tree(args.baseline, tmp / "before"), "after": ROOT}
        errors: dict[tuple[str, str], float] = {}
        plans: dict[tuple[str, str], str] = {}
        settings = [(f"{r:g}x", r, []) for r in ratios]
        if extras:
            settings += [("8x cosine", 8.0, ["--objective", "cosine"]), ("8x knn", 8.0, ["--objective", "knn"]), ("8x --pq", 8.0, ["--pq"])]
        walls: dict[str, dict[str, list[float]]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        for label, r, extra in settings:
            def measure(name: str, label: str = label, r: float = r, extra: list[str] = extra) -> float:
                out = tmp / f"{name}-{label.replace(' ', '_')}.safetensors"
                wall, cpu, stdout = run_cli(trees[name], tmp / "table.npy", tmp / "freqs.npy", out, r, extra)
                cpus.setdefault((name, label), []).append(cpu)
                if (name, label) not in errors:
                    errors[name, label] = full_error(rows, freqs, out)
                    plans[name, label] = plan_of(stdout)
                out.unlink()
                print(f"{label:10s} {name:6s} {wall:6.1f} s wall {cpu:6.1f} CPU-s  load {os.getloadavg()[0]:.1f}", flush=True)
                return wall

            # one round for an extra setting, this tree first (a slow baseline can then be cut short)
            names = list(trees)[::-1] if extra else list(trees)
            walls[label] = run_rounds({name: (lambda name=name: measure(name)) for name in names}, rounds if not extra else 1)

    minutes = (time.time() - started) / 60
    cpu_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    lines = [
        "# `embserve compress` speed (1M x 64)" if not args.fast else "# `embserve compress` speed (smoke mode)",
        "",
        f"Machine: {cpu_name}, {os.cpu_count()} cores, torch {torch.__version__}; load average {load_start:.1f} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end; {dt.date.today()}. Run took {minutes:.1f} min."
        f" `python bench/compress_speed.py{' --fast' if args.fast else ''}` (protocol in its docstring).",
        "",
        f"Table: synthetic {n:,} x 64 (compression.synthetic), shuffled Zipf(1.05) frequencies, default options"
        f" (objective l2, index auto, 64 groups); {rounds} interleaved round(s) per ratio"
        + ("; one round per extra setting (this tree first)" if extras else "")
        + (f"; 'before' = `{args.baseline}`, 'after' = this tree." if "before" in trees else "; this tree only."),
        "",
        NOISE_NOTE,
        "",
        "| setting | " + " | ".join(f"{t} wall s (median, min..max)" for t in trees) + " | " + " | ".join(f"{t} CPU-s" for t in trees)
        + (" | after/before wall | " if "before" in trees else " | ") + " | ".join(f"{t} error" for t in trees) + " | plan (after) |",
        "|---|" + "---|" * (2 * len(trees) + (1 if "before" in trees else 0) + len(trees) + 1),
    ]
    for label, _, _ in settings:
        w = {t: walls[label][t] for t in trees}
        cells = [Spread.of(w[t]).fmt(1, "") for t in trees]
        cells += [f"{np.median(cpus[t, label]):.1f}" for t in trees]
        if "before" in trees:
            cells.append(ratio(w["after"], w["before"]).fmt(2, "x"))
        cells += [f"{errors[t, label]:.4g}" for t in trees]
        cells.append(plans["after", label])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 9)", ""]
    for label, _, extra in settings:
        if not extra:
            lines.append(target_line(f"{label}: `embserve compress` wall time (after)", Spread.of(walls[label]["after"]), TARGET_S, at_least=False, digits=1, unit=" s"))
    if "before" in trees:
        lines.append("")
        lines.append("Quality: the error columns are over every row of the written tables; 'after' must not exceed 'before' beyond noise.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
