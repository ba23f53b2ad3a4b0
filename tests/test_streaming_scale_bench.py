"""Smoke test of ``bench/streaming_scale.py --fast``: a real server takes a Zipf ID stream into a
keyed table with max_ids, admission and a byte budget; the bench exits 0 only when the sampled
table bytes stayed within the budget and the head was exact at every checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # slow: a benchmark's quick run (python -m pytest -m slow; .ci/run)

ROOT = Path(__file__).resolve().parent.parent


def test_fast_streaming_scale_bench(tmp_path: Path) -> None:
    out = tmp_path / "streaming_scale.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "streaming_scale.py"), "--fast", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "within" in report and "all found and exact to int8 at every checkpoint" in report
    evicted = next(line for line in report.splitlines() if line.startswith("| evicted IDs"))
    filtered = next(line for line in report.splitlines() if line.startswith("| filtered upserts"))
    assert evicted.split("|")[2].strip() != "0" and filtered.split("|")[2].strip() != "0"
    assert out.with_suffix(".png").stat().st_size > 5_000
