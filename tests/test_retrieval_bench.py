"""Smoke test of the retrieval benchmark: ``bench/retrieval.py --fast`` runs end to end and
writes its report, with every method and the proxy correlations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a benchmark's quick run (python -m pytest -m slow; .ci/run)
def test_fast_retrieval_bench_writes_its_report(tmp_path: Path) -> None:
    pytest.importorskip("faiss")  # the bench extra's faiss-cpu: the PQ baseline
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "retrieval.py"), "--fast", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "retrieval.md").read_text()
    for label in ("embserve knn", "embserve knn+pq - best baseline", "embserve cosine", "uniform int2", "top-K int8", "faiss PQ", "best baseline", "Which error predicts recall"):
        assert label in report, label
