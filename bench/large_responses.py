"""Large lookup answers against a real `embserve serve`: what one costs the server's memory, and
whether `/healthz` stays responsive while it is built and sent.

    python bench/large_responses.py            # -> bench/results/large_responses.md
    python bench/large_responses.py --quick    # smaller answers, for a smoke run

One 384-dim table (8-bit rows).  For each answer size, ``--rounds`` times: reset the server's peak
RSS (``/proc/<pid>/clear_refs``), send one binary or JSON lookup sized to that many bytes, read it
in 1 MiB pieces, and meanwhile poll ``/healthz`` from another thread every 5 ms.  Reported: the
peak-RSS growth over the answer's size, the request's latency, and ``/healthz`` latency while the
request runs (p50 / max) next to idle ``/healthz`` polled the same way in the same run.  Last, the
issue's request (10^6 IDs of the 384-dim table, 1.5 GB of float32): how fast the 413 comes back.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import torch

_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [str(Path(_BENCH).parent)] + [p for p in sys.path if p not in (_BENCH, "")] + [_BENCH]

from compression import save_table  # noqa: E402
from compression.allocation import compress_uniform  # noqa: E402
from compression.layout import RowClass  # noqa: E402
from service.wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE, ParsedLookup, encode_binary_request  # noqa: E402
from streaming import free_port, stop, wait_http  # noqa: E402

ROWS, DIM = 50_000, 384


def _kib(pid: int, field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))  # type: ignore[union-attr]


def _post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/lookup", body=body, headers=headers)
        response = conn.getresponse()
        size = 0
        while chunk := response.read(1 << 20):
            size += len(chunk)
        return response.status, size
    finally:
        conn.close()


class HealthPoller:
    """Polls /healthz every 5 ms on one keep-alive connection; latencies in seconds."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while not self._stop.is_set():
            started = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            self.latencies.append(time.perf_counter() - started)
            self._stop.wait(0.005)
        conn.close()

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _start_server(tree: Path, folder: Path) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    env = {**os.environ, "EMBSERVE_TABLES_DIR": str(folder), "EMBSERVE_PORT": str(port), "EMBSERVE_LOG_LEVEL": "warning",
           "PYTHONPATH": str(tree)}
    log = folder.parent / f"server-{port}.log"  # its output, for the error if it does not come up
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(tree))
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc)
    except RuntimeError as exc:
        raise RuntimeError(f"the server of {tree} did not come up ({exc}); its output:\n{log.read_text()[-3000:]}") from exc
    return port, proc


def _measure(port: int, pid: int, body: bytes, headers: dict[str, str]) -> tuple[int, int, int, float, float, float]:
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    rss = _kib(pid, "VmRSS")
    with HealthPoller(port) as busy:
        started = time.perf_counter()
        status, size = _post(port, body, headers)
        elapsed = time.perf_counter() - started
    grew = (_kib(pid, "VmHWM") - rss) * 1024
    lat = np.array(busy.latencies) * 1e3
    return status, size, grew, elapsed, float(np.median(lat)), float(lat.max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout of the code before (e.g. `git worktree add /tmp/base main`): its server answers the same "
                             "requests, round-robin with this one (it has no response cap: the 1.5 GB request is not sent to it)")
    parser.add_argument("--out", type=Path, default=Path(_BENCH) / "results" / "large_responses.md")
    args = parser.parse_args()
    mib = 1 << 20
    sizes = [("binary", 32 * mib), ("JSON", 32 * mib)] if args.quick else [
        ("binary", 64 * mib), ("binary", 250 * mib), ("JSON", 64 * mib), ("JSON", 240 * mib)]
    rng = np.random.default_rng(0)
    trees = {"this": Path(_BENCH).parent}
    if args.baseline_tree is not None:
        trees["before"] = args.baseline_tree.resolve()
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    binary_headers = {"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tables"
        save_table(compress_uniform(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(0)), RowClass(DIM, 8)),
                   folder / "wide.safetensors")
        try:
            for name, tree in trees.items():
                servers[name] = _start_server(tree, folder)
            idle: dict[str, HealthPoller] = {}
            for name, (port, _) in servers.items():
                for start in range(0, ROWS, 5000):  # every row resident before measuring
                    _post(port, encode_binary_request([ParsedLookup("wide", np.arange(start, start + 5000), None, "none")]), binary_headers)
                with HealthPoller(port) as idle[name]:
                    time.sleep(2.0)  # a fixed idle window to sample, not synchronization
            rows_out = []
            for form, target in sizes:
                per_row = DIM * 4 + 1 if form == "binary" else DIM * 13 + 6  # what the server counts
                n = int(target / per_row)
                for _ in range(args.rounds):
                    ids = rng.integers(0, ROWS, n)
                    if form == "binary":
                        body, headers = encode_binary_request([ParsedLookup("wide", ids, None, "none")]), binary_headers
                    else:
                        body, headers = orjson.dumps({"lookups": [{"table": "wide", "ids": ids.tolist()}]}), {"content-type": "application/json"}
                    for name, (port, proc) in servers.items():  # round-robin: same IDs, same moment
                        rows_out.append((name, form, n, *_measure(port, proc.pid, body, headers)))
                        print(rows_out[-1], flush=True)
            over = encode_binary_request([ParsedLookup("wide", rng.integers(0, ROWS, 1_000_000), None, "none")])
            started = time.perf_counter()
            over_status, _ = _post(servers["this"][0], over, binary_headers)
            refused_ms = (time.perf_counter() - started) * 1e3
        finally:
            stop(*(proc for _, proc in servers.values()))
    lines = [
        "# Large lookup answers: server memory and /healthz while one is served",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, `python bench/large_responses.py"
        f"{' --quick' if args.quick else ''}{' --baseline-tree <main before the change>' if args.baseline_tree else ''}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared with other jobs: timings are noisy), "
        f"table {ROWS:,} x {DIM} 8-bit, default `EMBSERVE_MAX_RESPONSE_BYTES` (256 MiB). "
        "`before` is the code before the response cap and sliced sending, answering the same requests round-robin with `this`.",
        "",
        "Peak RSS growth is the server's VmHWM (reset before each request) minus its RSS before it, over the answer's size.",
    ]
    for name, poller in idle.items():
        lat = np.array(poller.latencies) * 1e3
        lines.append(f"Idle /healthz of `{name}`, same run: p50 {np.median(lat):.2f} ms, max {lat.max():.2f} ms.")
    lines += [
        "",
        "| server | format | IDs | status | answer MB | peak RSS growth / answer | request s | /healthz p50 ms during | /healthz max ms during |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, form, n, status, size, grew, elapsed, p50, worst in rows_out:
        ratio = f"{grew / size:.2f}x" if size else "-"
        lines.append(f"| {name} | {form} | {n:,} | {status} | {size / 1e6:.0f} | {ratio} | {elapsed:.2f} | {p50:.2f} | {worst:.1f} |")
    lines += ["", f"10^6 IDs x 384 dims (1.5 GB of float32) in binary, `this`: HTTP {over_status} in {refused_ms:.0f} ms"
              " (the request body alone is 8 MB of IDs).", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
