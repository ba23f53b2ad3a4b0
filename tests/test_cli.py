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
                                 "--budget-bytes", "12000", "--unknown", "default", "--bits", "8,4"])  # the hash index takes 6 KB
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


def test_compress_with_pq_classes(tmp_path: Path) -> None:
    freqs = zipf_frequencies(3000, seed=4)
    gen = torch.Generator().manual_seed(4)
    rows = torch.randn(16, 16, generator=gen)[torch.randint(0, 16, (3000,), generator=gen)] + 0.1 * torch.randn(3000, 16, generator=gen)
    np.save(tmp_path / "w.npy", rows.numpy())
    np.save(tmp_path / "f.npy", freqs.numpy())
    out = tmp_path / "t.safetensors"
    result = runner.invoke(app, ["compress", str(tmp_path / "w.npy"), str(out), "--frequencies", str(tmp_path / "f.npy"), "--ratio", "6", "--pq", "--groups", "16"])
    assert result.exit_code == 0, result.output
    table, manifest = load_table(out)
    assert table.nbytes <= 3000 * 16 * 4 / 6 and any(rc.pq for rc in table.classes)
    assert manifest["format_version"] == 2 and any(c.get("kind") == "pq" for c in manifest["classes"])
    assert "pq" in result.output  # the class summary names the PQ class


def test_compress_keyed_with_capacity_and_set_it_on_a_server(tmp_path: Path) -> None:
    from tests.test_e2e import serving

    rows = torch.randn(3000, 16)
    np.save(tmp_path / "w.npy", rows.numpy())
    np.save(tmp_path / "ids.npy", (np.arange(3000, dtype=np.int64) * 7_919 - 10**12))
    out = tmp_path / "tables" / "k.safetensors"
    out.parent.mkdir()
    args = ["compress", str(tmp_path / "w.npy"), str(out), "--ids", str(tmp_path / "ids.npy"), "--ratio", "1.2"]
    result = runner.invoke(app, [*args, "--max-ids", "5000", "--admit-min-count", "2"])
    assert result.exit_code == 0, result.output
    table, manifest = load_table(out)
    assert manifest["index"] == "hash" and manifest["lifecycle"]["max_ids"] == 5000 and manifest["lifecycle"]["admit_min_count"] == 2
    bad = runner.invoke(app, [*args, "--keyed-index", "btree"])
    assert bad.exit_code == 2 and "hash or sorted" in bad.output
    bad = runner.invoke(app, [*args, "--keyed-index", "sorted", "--max-ids", "10"])
    assert bad.exit_code == 2
    with serving(out.parent, {}) as base:
        result = runner.invoke(app, ["capacity", "k", "--url", base, "--max-ids", "100"])
        assert result.exit_code == 0, result.output
        assert '"max_ids": 100' in result.output
        result = runner.invoke(app, ["capacity", "nope", "--url", base, "--max-ids", "100"])
        assert result.exit_code == 2 and "HTTP 404" in result.output
