"""Every benchmark runs in the suite in its quick mode (``--fast``): a benchmark that crashes
cannot back a committed number.  Each one runs end to end against real parts (server processes,
Redis, Locust) on a tiny table, and must write its report with the interleaved verdict lines.
The interleaving helper itself is checked on synthetic numbers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "bench"))  # appended: bench/service.py must not shadow the service package

from interleave import Spread, ratio, run_alternating, run_rounds, target_line  # noqa: E402


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- the helper


def test_rounds_are_round_robin_with_a_rotating_start() -> None:
    calls: list[str] = []

    def measure(name: str):  # type: ignore[no-untyped-def]
        return lambda: calls.append(name) or float(len(calls))

    out = run_rounds({"a": measure("a"), "b": measure("b"), "c": measure("c")}, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(v) for v in out.values()] == [3, 3, 3]


def test_alternating_runs_step_by_step_and_rates_each_round() -> None:
    # a fake clock: every step of "a" takes 1 s, of "b" 2 s, and everything gets 0.1% slower
    # after each step (drift within a round); the same-round ratio still comes out 2
    now = [0.0]
    calls: list[tuple[str, int]] = []
    slowdown = [1.0]

    def step(name: str, j: int, cost: float):  # type: ignore[no-untyped-def]
        def run() -> int:
            calls.append((name, j))
            now[0] += cost * slowdown[0]
            slowdown[0] *= 1.001
            return 10

        return run

    out = run_alternating({"a": [step("a", j, 1.0) for j in range(3)], "b": [step("b", j, 2.0) for j in range(3)]}, 2, lambda: now[0])
    assert calls[:6] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]  # order rotates with the step
    assert calls[6:8] == [("b", 0), ("a", 0)]  # and with the round
    assert [len(v) for v in out.values()] == [2, 2]
    r = ratio(out["a"], out["b"])
    assert 1.99 < r.lo <= r.hi < 2.01
    with pytest.raises(ValueError):
        run_alternating({"a": [step("a", 0, 1.0)], "b": []}, 1, lambda: now[0])


def test_ratio_is_the_median_of_same_round_ratios() -> None:
    # drift that doubles every round cancels within a round: every same-round ratio is 2
    fast = [2.0, 4.0, 8.0, 16.0, 32.0]
    slow = [1.0, 2.0, 4.0, 8.0, 16.0]
    r = ratio(fast, slow)
    assert (r.median, r.lo, r.hi) == (2.0, 2.0, 2.0)


def test_a_target_is_met_only_when_the_whole_spread_clears_it() -> None:
    assert Spread.of([1.3, 1.25, 1.4]).verdict(1.2) == "met"
    assert Spread.of([1.3, 1.1, 1.4]).verdict(1.2).startswith("not shown")
    assert Spread.of([1.0, 1.1, 1.15]).verdict(1.2) == "missed"
    assert Spread.of([30.0, 35.0, 39.0]).verdict(40, at_least=False) == "met"
    assert Spread.of([30.0, 45.0]).verdict(40, at_least=False).startswith("not shown")
    line = target_line("x vs y", Spread.of([1.3, 1.25, 1.4]), 1.2)
    assert "1.30x (1.25..1.40)" in line and line.endswith("met")


# ---------------------------------------------------------------- the benchmarks, quick mode


def bench_smoke(test: Callable[..., None]) -> Callable[..., None]:
    """A benchmark's quick run: real processes (e2e) and tens of seconds each (slow: left out of
    the default run, run by ``python -m pytest -m slow``, which .ci/run does on every change)."""
    return pytest.mark.slow(pytest.mark.e2e(test))



@bench_smoke
def test_lookup_bench_fast(tmp_path: Path) -> None:
    out = tmp_path / "lookup.md"
    _run(["bench/lookup.py", "--fast", "--out", str(out)])
    report = out.read_text()
    assert "smoke mode" in report and "interleaved rounds" in report
    assert "## Targets (issue 13)" in report and "Per-call overhead at batch 1" in report
    assert "(" in report and ".." in report  # spreads are printed
    assert "alternated batch by batch" in report and "hash-indexed int64 IDs / dense IDs, uniform >= 0.8x" in report


@bench_smoke
def test_service_bench_fast(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out = tmp_path / "service.md"
    try:
        import granian  # noqa: F401
        compare = ["--compare-servers"]  # the service under granian too: the other server choice keeps working
    except ImportError:
        compare = []
    _run(["bench/service.py", "--fast", "--out", str(out), *compare])
    report = out.read_text()
    if compare:
        assert "service binary (granian)" in report
    assert "smoke mode" in report and "round-robin" in report
    for path in ("service binary (", "service binary, fp16 values", "service v2 gRPC (tritonclient)", "Redis MGET + decode", "HTTP floor"):
        assert path in report
    assert "server CPU per batch-1 binary lookup" in report


@bench_smoke
def test_streaming_bench_fast(tmp_path: Path) -> None:
    """It used to crash at the end of its first log (a local Event shadowed the module's stop())."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out = tmp_path / "streaming.md"
    _run(["bench/streaming.py", "--fast", "--out", str(out)])
    report = out.read_text()
    assert "| sqlite |" in report and "| redis |" in report


@bench_smoke
def test_streaming_quality_bench_fast(tmp_path: Path) -> None:
    out = tmp_path / "streaming_quality.md"
    _run(["bench/streaming_quality.py", "--fast", "--out", str(out)])
    report = out.read_text()
    assert "smoke mode" in report
    for policy in ("| fp32 |", "| scall |", "| knapsack |", "| uniform |"):
        assert policy in report
    assert out.with_suffix(".png").stat().st_size > 1000


@bench_smoke
def test_loadtest_fast(tmp_path: Path) -> None:
    if importlib.util.find_spec("locust") is None:  # not imported here: locust monkey-patches ssl on import
        pytest.skip("locust (the load extra) is not installed")
    _run(["loadtest/run.py", "--fast", "--demo-dir", str(tmp_path / "tables"), "--out", str(tmp_path / "out")])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "smoke mode" in summary and "| request | requests | failures |" in summary  # rows: as many as the loaded host allowed


@bench_smoke
def test_compress_speed_bench_fast(tmp_path: Path) -> None:
    """The compress-speed bench times a baseline tree (exported with git) against this one."""
    out = tmp_path / "compress_speed.md"
    baseline = "HEAD" if shutil.which("git") and (ROOT / ".git").exists() else "none"
    _run(["bench/compress_speed.py", "--fast", "--baseline", baseline, "--out", str(out)], timeout=600)
    report = out.read_text()
    assert "smoke mode" in report and "## Targets (issue 9)" in report
    assert "| 8x |" in report and "| 128x |" in report and "(" in report and ".." in report
    if baseline != "none":
        assert "after/before wall" in report


@bench_smoke
def test_keyed_bench_fast(tmp_path: Path) -> None:
    out = tmp_path / "keyed.md"
    _run(["bench/keyed.py", "--rows", "20000", "--rounds", "5", "--ids-per-round", "16384", "--loads", "0.5", "--out", str(out)])
    report = out.read_text()
    assert "| dense (IDs 0..N-1) |" in report and "open addressing only, hot-first, load 0.5" in report
    assert "Target: keyed (hash index) >= 0.80x dense" in report and ".." in report


@bench_smoke
def test_redecide_stall_bench_fast(tmp_path: Path) -> None:
    out = tmp_path / "stall.md"
    _run(["bench/redecide_stall.py", "--ids", "20000", "--out", str(out)])
    report = out.read_text()
    for row in ("| budget 1.2x the table |", "| budget 0.85x |", "log entries of 10,000 rows |", "at `max_ids` (each evicts 5,000) |",
                "| snapshot (no re-decision) |"):
        assert row in report
    assert "longest hold of the table's lock" in report


@bench_smoke
@pytest.mark.skipif(shutil.which("gcc") is None, reason="the A/B compiles both builds with gcc")
def test_hash_layout_ab_fast(tmp_path: Path) -> None:
    """Both builds (here both this tree: an A/A run) compile, fill their own slot arrays and
    answer every batch alike (the script asserts it), and the report lands in --out."""
    out = tmp_path / "ab.md"
    _run(["bench/hash_layout_ab.py", "--base", "", "--rows", "20000", "--rounds", "2", "--batches", "2", "--passes", "1",
          "--base-loads", "0.7", "--loads", "0.7", "--out", str(out)])
    text = out.read_text()
    assert "uniform, batch 4096" in text and "zipf, batch 4096" in text and "/base 1.00x (1.00..1.00)" in text


@bench_smoke
def test_large_responses_bench_fast(tmp_path: Path) -> None:
    out = tmp_path / "large.md"
    _run(["bench/large_responses.py", "--quick", "--out", str(out)], timeout=300)
    assert out.read_text().strip()


@bench_smoke
def test_profile_batch1_fast(tmp_path: Path) -> None:
    if shutil.which("py-spy") is None and not (Path(sys.executable).parent / "py-spy").exists():
        pytest.skip("py-spy (the bench extra) is not installed")
    out = tmp_path / "profile.md"
    _run(["bench/profile_batch1.py", "--seconds", "2", "--rows", "5000", "--out", str(out)], timeout=120)
    report = out.read_text()
    assert "| frame (inclusive) | share of samples |" in report and "LookupFastPath" in report


@bench_smoke
def test_batch1_cpu_bench_fast() -> None:
    proc = _run(["bench/batch1_cpu.py", "--fast"], timeout=180)
    assert "server CPU per batch-1 binary lookup" in proc.stdout and "- this tree:" in proc.stdout


@bench_smoke
def test_grpc_cpu_bench_fast() -> None:
    pytest.importorskip("tritonclient.grpc")
    proc = _run(["bench/grpc_cpu.py", "--fast"], timeout=180)
    assert "gRPC / HTTP" in proc.stdout and "gRPC / the gRPC floor" in proc.stdout and "| gRPC floor (noop_grpc.py) | gRPC | 1 |" in proc.stdout
