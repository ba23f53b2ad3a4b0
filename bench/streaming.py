"""Streaming-update throughput and update-to-visible latency, SQLite log vs Redis Streams log.

    python bench/streaming.py              # -> bench/results/streaming.md
    python bench/streaming.py --fast --out /tmp/s.md   # smoke run, seconds (tests/test_benchmarks.py)

For each log a real `embserve serve` process is started (Redis: a real redis-server with AOF
fsync on every write, started here on a free loopback port), with a keyed 64-dim table under a
SCALL policy and a byte budget, so re-decisions and compactions run as they would in production.

* **Applied rows/s**: writers post binary update batches as fast as the server acknowledges
  them, for a fixed time; the rate is rows applied (from the server's own counter) over the time
  from the first post until the applier caught up with the last one.
* **Update-to-visible latency**: one-row updates posted with ``wait=true``; the answer comes
  when the applier has applied the update, so the round trip is the time until a lookup can see
  it.  Measured idle and while a background writer streams batches.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.routers.updates import BINARY_UPDATE_TYPE, encode_binary_updates  # noqa: E402

DIM = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0, method: str = "GET") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited")
        try:
            if httpx.request(method, url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(url)


def stop(*procs: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM every process (a clean stop: the service snapshots), then wait; kill what hangs."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_redis(folder: Path, durable: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """A real redis-server on a free loopback port; ``durable`` = AOF with fsync on every write
    (the update log's setting), otherwise no persistence (a cache, as a feature store runs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not installed")
    port = free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), *persistence, "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0"


def applied_rows(client: httpx.Client) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("embserve_updates_applied_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_log(kind: str, seconds: float, batch_rows: int, writers: int, probes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "EMBSERVE_TABLES_DIR": str(folder / "tables"), "EMBSERVE_SNAPSHOT_INTERVAL_S": "30"}
        redis_proc = None
        if kind == "redis":
            redis_proc, url = start_redis(folder)
            env.update({"REDIS_URL": url, "EMBSERVE_REDIS_STREAM": f"bench:{uuid.uuid4().hex}"})
        port = free_port()
        env["EMBSERVE_PORT"] = str(port)
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/readyz", server)
            client = httpx.Client(base_url=base, timeout=60.0)
            budget = 2_000_000 * DIM // 2  # room for ~2M rows at ~4 bits/param
            r = client.post("/v1/admin/tables", json={
                "name": "emb", "dim": DIM, "classes": [f"d{DIM}b16", f"d{DIM}b8", f"d{DIM}b4"],
                "budget_bytes": budget, "policy": {"name": "scall", "alpha": 0.6},
            })
            assert r.status_code == 201, r.text
            rng = np.random.default_rng(0)
            payloads = []
            for k in range(32):
                ids = rng.integers(0, 2_000_000, batch_rows)
                vectors = rng.normal(size=(batch_rows, DIM)).astype(np.float32)
                payloads.append(encode_binary_updates(ids, vectors, np.empty(0, np.int64)))

            # ---- throughput
            done = threading.Event()  # not `stop`: that name is the module's process stopper, used below
            acked = [0] * writers

            def writer(w: int, rows_per_s: float | None = None) -> None:
                c = httpx.Client(base_url=base, timeout=60.0)
                k = w
                t0 = time.perf_counter()
                sent = 0
                while not done.is_set():
                    if rows_per_s is not None:  # paced: a steady stream rather than a flood
                        ahead = sent / rows_per_s - (time.perf_counter() - t0)
                        if ahead > 0:
                            done.wait(ahead)
                            continue
                    resp = c.post("/v1/tables/emb/updates", content=payloads[k % len(payloads)], headers={"content-type": BINARY_UPDATE_TYPE})
                    assert resp.status_code == 200, resp.text
                    acked[w] += batch_rows
                    sent += batch_rows
                    k += writers
                c.close()

            before = applied_rows(client)
            started = time.perf_counter()
            threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
            for t in threads:
                t.start()
            time.sleep(seconds)  # the measurement window, not synchronization
            done.set()
            for t in threads:
                t.join()
            ack_elapsed = time.perf_counter() - started
            total_acked = sum(acked)
            # wait until the applier has caught up with everything acknowledged
            probe = client.post("/v1/tables/emb/updates?wait=true", json={"upsert_ids": [1], "vectors": [[0.0] * DIM]}, timeout=300)
            assert probe.json()["applied"], probe.text
            applied_elapsed = time.perf_counter() - started
            applied = applied_rows(client) - before

            # ---- latency, idle then under a background stream
            def latencies(n: int) -> list[float]:
                out = []
                for i in range(n):
                    t0 = time.perf_counter()
                    resp = client.post("/v1/tables/emb/updates?wait=true", json={"upsert_ids": [10_000_000 + i], "vectors": [[float(i)] * DIM]})
                    out.append(time.perf_counter() - t0)
                    assert resp.json()["applied"], resp.text
                return out

            idle = latencies(probes)
            done.clear()
            stream_rate = 0.5 * applied / applied_elapsed
            background = threading.Thread(target=writer, args=(0, stream_rate))
            background.start()
            loaded = latencies(probes)
            done.set()
            background.join()
            client.close()

            def pct(xs: list[float], q: float) -> float:
                return float(np.percentile(np.asarray(xs) * 1000, q))

            return {
                "acked_rows_per_s": total_acked / ack_elapsed,
                "applied_rows_per_s": applied / applied_elapsed,
                "applied_rows": applied,
                "idle_p50_ms": pct(idle, 50),
                "idle_p99_ms": pct(idle, 99),
                "loaded_p50_ms": pct(loaded, 50),
                "loaded_p99_ms": pct(loaded, 99),
                "loaded_mean_ms": statistics.mean(loaded) * 1000,
                "background_rows_per_s": stream_rate,
            }
        finally:
            stop(server)
            if redis_proc is not None:
                stop(redis_proc, timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-rows", type=int, default=2000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--fast", action="store_true", help="smoke run: 1 s windows, small batches, few probes (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "streaming.md")
    args = parser.parse_args()
    if args.fast:
        args.seconds, args.batch_rows, args.probes = 1.0, 200, 5
    results = {}
    for kind in ("sqlite", "redis"):
        results[kind] = run_log(kind, args.seconds, args.batch_rows, args.writers, args.probes)
        print(kind, {k: round(v, 2) for k, v in results[kind].items()}, flush=True)
    targets = {"sqlite": 100.0, "redis": 250.0}
    lines = [
        "# Streaming updates: applied rows/s and update-to-visible latency" + (" (smoke mode: --fast, numbers mean nothing)" if args.fast else ""),
        "",
        f"Machine: {os.cpu_count()} cores, {sys.platform}; run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"A real `embserve serve` process per log; keyed {DIM}-dim table, classes d{DIM}b16/b8/b4 under a SCALL policy and budget;",
        f"{args.writers} writers posting binary batches of {args.batch_rows} rows for {args.seconds:.0f} s; latency = `wait=true` round trip of a 1-row update",
        f"({args.probes} probes idle, {args.probes} while a background writer streams at half the measured applied rate). Redis: redis-server 7 with AOF, appendfsync always.",
        "",
        "| log | acknowledged rows/s | applied rows/s (target >= 100k) | idle p50 / p99 ms | under load p50 / p99 ms (target p99) |",
        "|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        lines.append(
            f"| {kind} | {r['acked_rows_per_s']:,.0f} | {r['applied_rows_per_s']:,.0f} | {r['idle_p50_ms']:.1f} / {r['idle_p99_ms']:.1f} | "
            f"{r['loaded_p50_ms']:.1f} / {r['loaded_p99_ms']:.1f} (<= {targets[kind]:.0f}) |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
