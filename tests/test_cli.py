"""The command line: compress a dense table file, inspect the result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from compression import load_table
from compression.synthetic import synthetic_table, zipf_frequencies
from service.cli import app

runner = CliRunner()


def test_compress_and_inspect(tmp_path: Path) -> None:
    freqs = zipf_frequencies(5000, seed=2)
    rows = synthetic_table(5000, 32, freqs, seed=2)
    np.save(tmp_path / "w.npy", rows.numpy())
    np.save(tmp_path / "f.npy", freqs.numpy())
    out = tmp_path / "t.safetensors"
    result = runner.invoke(app, ["compress", str(tmp_path / "w.npy"), str(out), "--frequencies", str(tmp_path / "f.npy"), "--ratio", "8"])
    assert result.exit_code == 0, result.output
    table, manifest = load_table(out)
    assert table.nbytes <= 5000 * 32 * 4 / 8
    assert manifest["extra"]["source"] == "w.npy"
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0
    assert "format_version" in result.output and "bits/param" in result.output


def test_compress_keyed_with_unknown_policy(tmp_path: Path) -> None:
    rows = torch.randn(300, 8)
    np.save(tmp_path / "w.npy", rows.numpy())
    np.save(tmp_path / "ids.npy", (np.arange(300, dtype=np.int64) * 1000))
    out = tmp_path / "k.safetensors"
    result = runner.invoke(app, ["compress", str(tmp_path / "w.npy"), str(out), "--ids", str(tmp_path / "ids.npy"),
                                 "--budget-bytes", "8000", "--unknown", "default", "--bits", "8,4"])
    assert result.exit_code == 0, result.output
    table, _ = load_table(out)
    res = table.lookup(torch.tensor([1000, 1001]))
    assert res.found.tolist() == [True, False]
    assert table.unknown.kind == "default"


def test_compress_reports_impossible_budgets(tmp_path: Path) -> None:
    np.save(tmp_path / "w.npy", np.ones((100, 8), dtype=np.float32))
    # 25 bytes: a one-run index fits, not one row - the table would prune every row
    result = runner.invoke(app, ["compress", str(tmp_path / "w.npy"), str(tmp_path / "o.safetensors"), "--budget-bytes", "25"])
    assert result.exit_code == 2
    assert "prune every row" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_compress_index_and_objective_options(tmp_path: Path) -> None:
    freqs = torch.sort(zipf_frequencies(3000, seed=3), descending=True).values
    np.save(tmp_path / "w.npy", synthetic_table(3000, 16, freqs, seed=3).numpy())
    np.save(tmp_path / "f.npy", freqs.numpy())
    out = tmp_path / "r.safetensors"
    args = ["compress", str(tmp_path / "w.npy"), str(out), "--frequencies", str(tmp_path / "f.npy"), "--ratio", "64"]
    assert runner.invoke(app, [*args, "--index", "dense"]).exit_code == 2  # a dense locator alone is 4x the budget
    result = runner.invoke(app, [*args, "--objective", "cosine"])
    assert result.exit_code == 0, result.output
    table, manifest = load_table(out)
    assert manifest["index"] == "runs" and manifest["objective"] == "cosine"
    for bad in (["--index", "hash"], ["--objective", "dot"]):
        assert runner.invoke(app, [*args, *bad]).exit_code == 2


def test_inspect_rejects_non_tables(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    result = runner.invoke(app, ["inspect", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
