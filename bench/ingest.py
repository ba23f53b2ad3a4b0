"""What keyed updates cost: the row encoder (torch vs compiled) and a real server's rows per
CPU-second on the streaming_scale load.

    python bench/ingest.py                                  # encoder + one 60 s server run -> bench/results/ingest.md
    python bench/ingest.py --baseline /tmp/base --rounds 2  # ... and the same runs of another checkout, alternated
    python bench/ingest.py --encoder-only

Encoder: 10,000 rows x 64 dims (the stream's vectors and Gaussian rows), int8 and 4-bit
classes, one thread; the torch and the compiled encoder run interleaved round by round, and the
reported speedup is the median of the per-round ratios with their min..max (the machine is
shared: only ratios from one run mean anything).  The outputs are compared byte for byte.

Server: ``bench/streaming_scale.py --seconds S`` (real ``embserve serve``, SQLite log, 2 writer
threads, 10k-row binary requests, a keyed int8 table with max_ids 1M, admission and a budget).
Rows per server CPU-second (all its threads, from /proc) is the number that survives a loaded
machine; rows/s depends on how much of a core the server got.  With ``--baseline DIR`` (a
checkout of another commit, its C library built) the two trees' runs alternate, and the
per-round ratio of rows per CPU-second is reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compression.codecs import encode_rows  # noqa: E402
from compression.kernels import cpu_c  # noqa: E402
from compression.layout import RowClass  # noqa: E402


def _stream_vectors(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Rows like the ones bench/streaming_scale.py sends (sines of an ID-dependent phase)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from streaming_scale import vectors_of

    ids = rng.integers(1, 2**62, n)
    return torch.from_numpy(vectors_of(ids, 0))


def encoder_bench(rounds: int, reps: int) -> list[str]:
    """Interleaved torch-vs-compiled timings; returns markdown rows."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    inputs = {"stream rows": _stream_vectors(10_000, rng), "Gaussian rows": torch.from_numpy(rng.standard_normal((10_000, 64), dtype=np.float32))}
    saved = cpu_c.ENCODER_AVAILABLE
    lines = []
    try:
        for name, x in inputs.items():
            for bits in (8, 4):
                rc = RowClass(64, bits)

                def run(compiled: bool) -> tuple[float, torch.Tensor]:
                    cpu_c.ENCODER_AVAILABLE = compiled and saved
                    t = time.perf_counter()
                    for _ in range(reps):
                        out = encode_rows(x, rc)
                    return (time.perf_counter() - t) / reps, out

                run(True), run(False)  # warm-up
                ratios, t_c, t_t = [], [], []
                same = True
                for _ in range(rounds):
                    tc, oc = run(True)
                    tt, ot = run(False)
                    ratios.append(tt / tc)
                    t_c.append(tc)
                    t_t.append(tt)
                    same &= bool(torch.equal(oc, ot))
                lines.append(
                    f"| {name}, {rc.label()} | {x.shape[0] / statistics.median(t_t):,.0f} | {x.shape[0] / statistics.median(t_c):,.0f} | "
                    f"**{statistics.median(ratios):.1f}x** ({min(ratios):.1f}..{max(ratios):.1f}) | {'yes' if same else '**NO**'} |"
                )
                print(lines[-1], flush=True)
    finally:
        cpu_c.ENCODER_AVAILABLE = saved
    return lines


def _server_run(tree: Path, seconds: float, writers: int) -> dict[str, float]:
    """One bench/streaming_scale.py run of ``tree``; the numbers from its report."""
    scratch = Path(tempfile.mkdtemp(prefix="embserve-ingest-"))
    out = scratch / "scale.md"
    try:
        # TMPDIR: the server's tables directory (gigabytes of log and snapshots) goes under
        # scratch and is removed with it, whatever the tree's streaming_scale does
        proc = subprocess.run(
            [sys.executable, str(tree / "bench" / "streaming_scale.py"), "--seconds", str(seconds), "--writers", str(writers),
             "--check-every", str(max(30.0, seconds / 2)), "--out", str(out)],
            capture_output=True, text=True, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "TMPDIR": str(scratch)},
            timeout=seconds + 900,
        )
        if not out.exists():
            raise SystemExit(f"streaming_scale in {tree} failed: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        report = out.read_text()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def number(pattern: str) -> float:
        m = re.search(pattern, report)
        return float(m.group(1).replace(",", "")) if m else float("nan")

    return {
        "acked_per_s": number(r"rows acknowledged[^=]*= \*\*([0-9,]+) rows/s"),
        "per_cpu_s": number(r"\*\*([0-9,]+) rows per CPU-second"),
        "faults_per_row": number(r"minor page faults \| [0-9,]+ = ([0-9.]+) per row"),
        "ok": float(proc.returncode == 0),
    }


def _commit(tree: Path) -> str:
    """Short commit of a git checkout (with "+changes" when its tracked files differ), or "?"."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + (" +changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="server runs per tree (alternated with --baseline)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each server run")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of another commit to compare with (C library built)")
    parser.add_argument("--baseline-label", default="baseline", help="what the baseline is (e.g. its commit), for the report")
    parser.add_argument("--encoder-rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.md")
    args = parser.parse_args()
    if not cpu_c.ENCODER_AVAILABLE:
        raise SystemExit("the compiled encoder is not built: python setup.py build_ext --inplace")
    load_before = os.getloadavg()[0]
    lines = [
        "# Ingest: what a keyed update costs",
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores shared with other jobs "
        f"(load average {load_before:.1f} at the start), torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}.",
        "",
        f"## Row encoder: torch vs compiled (`compression/kernels/encode.c`), one thread, 10,000 x 64 rows, {args.encoder_rounds} interleaved rounds",
        "",
        "| rows, class | torch rows/s | compiled rows/s | speedup, median (min..max) | same bytes |",
        "|---|---|---|---|---|",
    ]
    lines += encoder_bench(args.encoder_rounds, reps=3)
    if not args.encoder_only:
        trees = [("this tree", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
        for r in range(args.rounds):
            for name, tree in trees if r % 2 == 0 else trees[::-1]:  # alternate who goes first
                res = _server_run(tree, args.seconds, args.writers)
                results[name].append(res)
                print(f"round {r + 1} {name}: {res}", flush=True)
        lines += [
            "",
            f"## Real server: `bench/streaming_scale.py --seconds {args.seconds:.0f} --writers {args.writers}` "
            f"(10k-row binary requests, int8 keyed table, max_ids 1M, admission, budget)",
            "",
            f"Trees: this tree ({_commit(ROOT)})" + (f", baseline: {args.baseline_label}." if args.baseline else "."),
            "",
            "| tree | round | rows acknowledged/s | rows per server CPU-second | minor faults per row | bench exit |",
            "|---|---|---|---|---|---|",
        ]
        for name, _ in trees:
            for r, res in enumerate(results[name]):
                lines.append(f"| {name} | {r + 1} | {res['acked_per_s']:,.0f} | {res['per_cpu_s']:,.0f} | {res['faults_per_row']:.3f} | {'ok' if res['ok'] else 'FAILED'} |")
        if args.baseline:
            ratios = [a["per_cpu_s"] / b["per_cpu_s"] for a, b in zip(results["this tree"], results["baseline"], strict=True)]
            lines += ["", f"Rows per server CPU-second, this tree / baseline: **{statistics.median(ratios):.2f}x** "
                          f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})."]
    lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f}.", ""]
    report = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
