"""The command line as a newcomer meets it: every bad input to ``compress`` is one line on stderr
and exit 2 (no traceback, nothing written) - each case through the CLI's code in this process,
one of each kind through the real ``embserve`` process - a budget that would prune every row is
refused, progress covers every phase, and ``--help`` texts are intact."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compression import compress
from compression.synthetic import synthetic_table, zipf_frequencies
from service.cli import app as cli_app

pytestmark = pytest.mark.e2e  # real `embserve` processes
N, D = 400, 16


def _embserve(*args: str, cwd: Path | None = None, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parents[1]), **env_extra}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    rows = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    np.save(d / "w.npy", rows)
    np.save(d / "f.npy", np.random.default_rng(1).random(N))
    np.save(d / "f_short.npy", np.ones(N - 1))
    np.save(d / "ids_float.npy", np.arange(N, dtype=np.float64))
    np.save(d / "ids_short.npy", np.arange(N - 3, dtype=np.int64))
    np.save(d / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "w1d.npy", rows[:, 0].copy())
    with_nan = rows.copy()
    with_nan[3, 3] = np.nan
    np.save(d / "nan.npy", with_nan)
    (d / "garbage.npy").write_bytes(b"this is not a numpy file")
    (d / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    (d / "out").mkdir()
    return d


# (arguments after `compress W OUT`, or the whole argument list when it starts with "!"; what the line says)
BAD_INPUTS = [
    (["--ratio", "8", "--frequencies", "{d}/missing.npy"], "--frequencies {d}/missing.npy: no such file"),
    (["--ratio", "8", "--bits", "3"], "--bits 3: supported widths are 32, 16, 8, 4, 2, 1"),
    (["--ratio", "8", "--bits", "8,x"], "--bits '8,x': expected comma-separated integers"),
    (["!", "{d}/obj.npy", "{d}/out/t.safetensors", "--ratio", "8"], "obj.npy: not a numeric .npy array"),
    (["!", "{d}/strings.npy", "{d}/out/t.safetensors", "--ratio", "8"], "strings.npy: dtype <U1 is not numeric"),
    (["!", "{d}/garbage.safetensors", "{d}/out/t.safetensors", "--ratio", "8"], "garbage.safetensors: not a readable .safetensors file"),
    (["!", "{d}/missing.npy", "{d}/out/t.safetensors", "--ratio", "8"], "input {d}/missing.npy: no such file"),
    (["!", "{d}/w1d.npy", "{d}/out/t.safetensors", "--ratio", "8"], "expected a non-empty 2-D table [N, D], got shape [400]"),
    (["!", "{d}/nan.npy", "{d}/out/t.safetensors", "--ratio", "8"], "the table holds NaN or Inf values"),
    (["--ratio", "8", "--frequencies", "{d}/f_short.npy"], "expected 400 values (one per row of the table), got shape [399]"),
    (["--ratio", "8", "--ids", "{d}/ids_short.npy"], "--ids {d}/ids_short.npy: expected 400 values"),
    (["--ratio", "8", "--ids", "{d}/ids_float.npy"], "expected integer IDs"),
    ([], "give exactly one of --ratio and --budget-bytes"),
    (["--ratio", "-2"], "must be positive"),
    (["--ratio", "8", "--unknown", "nope"], "--unknown 'nope': must be zero, default or hashed"),
    (["--budget-bytes", "20"], "cannot hold 400 rows"),  # not even a one-run index and one row
    # 16 x on a dense index: the budget is exactly the index (4 bytes an ID), so every row would
    # be pruned (index auto takes a run-length index there and fits rows)
    (["--ratio", "16", "--index", "dense"], "would prune every row"),
    (["!", "{d}/w.npy", "{d}/out", "--ratio", "8"], "give a file name ending in .safetensors"),
]


def _check_one_line(args: list[str], expected: str, returncode: int, stderr: str, stdout: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, (args, stderr)
    assert len(lines) == 1 and lines[0].startswith("embserve compress: "), (args, stderr)
    assert expected in lines[0], (args, lines[0])
    assert "Traceback" not in stderr + stdout


def _case(files: Path, case: tuple[list[str], str]) -> tuple[list[str], str]:
    args, expected = case
    args = [a.format(d=files) for a in args]
    full = args[1:] if args[:1] == ["!"] else [str(files / "w.npy"), str(files / "out" / "t.safetensors"), *args]
    return full, expected.format(d=files)


def test_every_bad_compress_input_is_one_line_and_exit_2(files: Path) -> None:
    """Every case through the CLI's own code in this process (click's runner: the same parsing,
    checks and exit path as the installed command, without ~1.5 s of imports per case)."""
    runner = CliRunner()
    for case in BAD_INPUTS:
        args, expected = _case(files, case)
        result = runner.invoke(cli_app, ["compress", *args], env={"COLUMNS": "200"})
        _check_one_line(args, expected, result.exit_code, result.stderr, result.stdout)
    assert list((files / "out").iterdir()) == []  # nothing written, not even a temporary file


# one case of each kind through a real `embserve` process: a usage error typer reports, a file
# the library cannot read, a value the allocator refuses
REAL_PROCESS_CASES = [BAD_INPUTS[1], BAD_INPUTS[5], BAD_INPUTS[16]]


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(files: Path) -> None:
    def run(case: tuple[list[str], str]) -> tuple[list[str], str, subprocess.CompletedProcess[str]]:
        args, expected = _case(files, case)
        return args, expected, _embserve("compress", *args)

    with ThreadPoolExecutor(len(REAL_PROCESS_CASES)) as pool:  # each is a real process (~1.5 s of imports)
        results = list(pool.map(run, REAL_PROCESS_CASES))
    for args, expected, result in results:
        _check_one_line(args, expected, result.returncode, result.stderr, result.stdout)
    assert list((files / "out").iterdir()) == []


def test_compress_reports_every_phase() -> None:
    freqs = zipf_frequencies(2000, seed=4)
    rows = synthetic_table(2000, 16, freqs, seed=4)
    seen: list[tuple[str, int, int]] = []
    compress(rows, freqs, ratio=6, num_groups=8, sample_per_group=64, stage=lambda what, done, total: seen.append((what, done, total)))
    phases = list(dict.fromkeys(what for what, _, _ in seen))
    assert phases[0].startswith("rotation") and phases[-1] == "encoding rows"
    costing = [p for p in phases if p.startswith("estimating costs")]
    assert costing, phases
    for phase in costing:  # cost estimation moves the bar (it sat at 0 here before)
        steps = [(done, total) for what, done, total in seen if what == phase]
        assert len(steps) > 1 and steps[-1][0] == steps[-1][1]
    assert seen[-1] == ("encoding rows", 2000, 2000)


def test_demo_builds_and_demo_and_serve_refuse_bad_values_in_one_line(tmp_path: Path) -> None:
    ok = _embserve("demo", "--no-serve", "--rows", "3000", "--dim", "32", "--tables-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "demo.safetensors").is_file() and "built in" in ok.stderr
    with ThreadPoolExecutor(3) as pool:
        rows, name, port = pool.map(lambda args: _embserve(*args[0], **args[1]), [
            (("demo", "--no-serve", "--rows", "0", "--tables-dir", str(tmp_path / "x")), {}),
            (("demo", "--no-serve", "--name", "a..b", "--tables-dir", str(tmp_path / "x")), {}),
            (("serve",), {"EMBSERVE_PORT": "99999", "EMBSERVE_TABLES_DIR": str(tmp_path / "x")}),
        ])
    for bad, expected in ((rows, "--rows"), (name, "--name 'a..b'"), (port, "port (--port or EMBSERVE_PORT): Input should be less than")):
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and expected in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()


def test_help_texts_show_env_variables_defaults_and_no_raw_markup() -> None:
    serve = _embserve("serve", "--help")
    assert serve.returncode == 0
    for expected in ("EMBSERVE_TABLES_DIR, default tables", "EMBSERVE_HOST, default 127.0.0.1", "EMBSERVE_PORT, default 8080",
                     "EMBSERVE_DEVICE, default cpu", "EMBSERVE_TORCH_THREADS, default 1"):
        assert expected in serve.stdout, serve.stdout
    probe = _embserve("probe", "--help")
    assert probe.returncode == 0 and "``" not in probe.stdout and "answers PATH with 200" in probe.stdout


def test_compress_still_writes_a_good_table(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    result = _embserve("compress", str(files / "w.npy"), str(out), "--ratio", "8", "--frequencies", str(files / "f.npy"))
    assert result.returncode == 0, result.stderr
    from compression import load_table

    table, _ = load_table(out)
    assert table.lookup(torch.arange(N)).values.abs().sum() > 0
