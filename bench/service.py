"""Service-level lookups against the stacks users replace, same IDs and same table, one run.

    python bench/service.py            # -> bench/results/service.md
    python bench/service.py --quick    # a short smoke run

Paths compared (all called from this Python process, as a ranker would):

* **service binary** / **service JSON**: a real `embserve serve` process (uvicorn) holding the
  demo table (1M x 64, Zipf traffic, compressed 8x by the knapsack allocator), called with
  ``service.client.EmbeddingClient``;
* **Redis blob store**: one fp32 blob per ID in a real `redis-server` (no persistence, as a
  feature-store cache runs), fetched with MGET and decoded with numpy: what a Feast-style
  online store does;
* **in-process compressed** and **in-process fp32 gather**: the same compressed table, and the
  uncompressed fp32 rows with ``F.embedding``, in this process (no network): the floor.

Closed loop: ``--concurrency`` threads each send the next batch as soon as the last one
answers, for ``--seconds``; IDs/s and per-request latency p50/p99.  Open loop: batch 1024 sent
at a fixed 200 requests/s, latency measured from each request's *scheduled* send time, so
queueing counts (no coordinated omission).  Memory: the table's own bytes as the server reports
them, and the resident set of each server process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# this file is named like the `service` package: put the repository first and bench/ last
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [str(Path(_BENCH).parent)] + [p for p in sys.path if p not in (_BENCH, "")] + [_BENCH]

from compression import compress, load_table, save_table  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402
from service.client import EmbeddingClient  # noqa: E402
from streaming import free_port, start_redis, stop, wait_http  # noqa: E402

TABLE = "demo"


@dataclass
class Measured:
    path: str
    batch: int
    requests: int
    ids_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # CPU time of the serving process per request (embserve or redis-server)
    client_cpu_us: float  # CPU time of this process (the caller) per request


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process, all its threads (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def closed_loop(call: Callable[[np.ndarray], object], batches: list[np.ndarray], concurrency: int, seconds: float) -> tuple[int, float, list[float]]:
    """(requests, elapsed seconds, latencies) with ``concurrency`` threads calling back to back."""
    counter = itertools.count()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(k: int) -> None:
        start_gate.wait()
        mine = latencies[k]
        while True:
            ids = batches[next(counter) % len(batches)]
            t0 = time.perf_counter()
            if t0 >= deadline[0]:
                return
            call(ids)
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    deadline[0] = started + seconds
    start_gate.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for xs in latencies for x in xs]
    return len(flat), elapsed, flat


def open_loop(call: Callable[[np.ndarray], object], batches: list[np.ndarray], rate: float, seconds: float, workers: int = 16) -> tuple[list[float], int]:
    """Latencies from each request's scheduled send time, and how many were sent."""
    total = int(rate * seconds)
    start = time.perf_counter() + 0.05
    counter = itertools.count()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            k = next(counter)
            if k >= total:
                return
            scheduled = start + k / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # pacing the schedule, not synchronizing with the server
            call(batches[k % len(batches)])
            with lock:
                latencies.append(time.perf_counter() - scheduled)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, total


def percentiles(latencies: list[float]) -> tuple[float, float]:
    arr = np.asarray(latencies) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def load_redis(url: str, rows: np.ndarray, chunk: int = 10_000) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for lo in range(0, rows.shape[0], chunk):
        block = rows[lo : lo + chunk]
        client.mset({b"e:%d" % (lo + k): block[k].tobytes() for k in range(block.shape[0])})
    client.close()


def redis_fetcher(url: str, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    import redis

    pool = redis.ConnectionPool.from_url(url, max_connections=64)
    local = threading.local()

    def fetch(ids: np.ndarray) -> np.ndarray:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = redis.Redis(connection_pool=pool)
        blobs = client.mget([b"e:%d" % i for i in ids.tolist()])
        return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)

    return fetch


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s for batch 1024")
    parser.add_argument("--quick", action="store_true", help="100k rows, 1 s per cell")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "service.md")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds = 100_000, 1.0
    batch_sizes = [int(b) for b in args.batches.split(",")]

    freqs = zipf_frequencies(args.rows, seed=0)
    dense = synthetic_table(args.rows, args.dim, freqs, seed=0)
    rng_batches = {b: [sample_ids(freqs, b, seed=1000 * b + k).numpy() for k in range(64)] for b in batch_sizes}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"compressing {args.rows:,} x {args.dim} at {args.ratio}x ...", flush=True)
        table, _ = compress(dense, freqs, ratio=args.ratio)
        (folder / "tables").mkdir()
        save_table(table, folder / "tables" / f"{TABLE}.safetensors")
        in_process, _ = load_table(folder / "tables" / f"{TABLE}.safetensors")

        port = free_port()
        env = {**os.environ, "EMBSERVE_TABLES_DIR": str(folder / "tables"), "EMBSERVE_PORT": str(port), "EMBSERVE_LOG_LEVEL": "warning"}
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        redis_proc, redis_url = start_redis(folder, durable=False)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/readyz", server)
            print("loading Redis ...", flush=True)
            dense_np = dense.numpy()
            load_redis(redis_url, dense_np)
            import redis

            info = redis.Redis.from_url(redis_url).info("memory")
            binary_client = EmbeddingClient(base)
            json_client = EmbeddingClient(base, binary=False)
            server_table_bytes = int(binary_client.tables()[0]["bytes"])
            paths: dict[str, Callable[[np.ndarray], object]] = {
                "service binary": lambda ids: binary_client.lookup(TABLE, ids),
                "service JSON": lambda ids: json_client.lookup(TABLE, ids),
                "Redis MGET + decode": redis_fetcher(redis_url, args.dim),
                "in-process compressed": lambda ids: in_process.lookup(torch.from_numpy(ids)).values,
                "in-process fp32 gather": lambda ids: F.embedding(torch.from_numpy(ids), dense),
            }
            # every path must return the same rows (compressed ones within their error)
            probe = rng_batches[batch_sizes[-1]][0]
            exact = dense_np[probe]
            np.testing.assert_array_equal(paths["Redis MGET + decode"](probe), exact)
            np.testing.assert_allclose(binary_client.lookup(TABLE, probe).values, in_process.lookup(torch.from_numpy(probe)).values.numpy(), rtol=0, atol=0)

            results: list[Measured] = []
            for batch in batch_sizes:
                for name, call in paths.items():
                    for ids in rng_batches[batch][:4]:
                        call(ids)  # warm connections and caches
                    serving = server.pid if name.startswith("service") else redis_proc.pid if name.startswith("Redis") else None
                    server_cpu = cpu_seconds(serving) if serving else 0.0
                    client_cpu = cpu_seconds(os.getpid())
                    n, elapsed, lat = closed_loop(call, rng_batches[batch], args.concurrency, args.seconds)
                    server_cpu = (cpu_seconds(serving) - server_cpu) if serving else 0.0
                    client_cpu = cpu_seconds(os.getpid()) - client_cpu
                    p50, p99 = percentiles(lat)
                    results.append(Measured(name, batch, n, n * batch / elapsed, p50, p99, server_cpu / n * 1e6, client_cpu / n * 1e6))
                    print(f"{name:24s} batch {batch:5d}: {n * batch / elapsed / 1e6:7.3f} M IDs/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms", flush=True)

            open_batch = max(batch_sizes)
            open_rows = []
            for name in ("service binary", "Redis MGET + decode"):
                lat, sent = open_loop(paths[name], rng_batches[open_batch], args.rate, max(args.seconds * 2, 2.0))
                p50, p99 = percentiles(lat)
                open_rows.append((name, sent, p50, p99, float(np.max(lat) * 1e3)))
                print(f"open loop {name}: {sent} requests at {args.rate:g}/s, p50 {p50:.2f} ms p99 {p99:.2f} ms", flush=True)

            server_rss = rss_bytes(server.pid)
            redis_rss = rss_bytes(redis_proc.pid)
            binary_client.close()
            json_client.close()
        finally:
            stop(server, redis_proc, timeout=30)

    fp32_bytes = args.rows * args.dim * 4
    by = {(r.path, r.batch): r for r in results}
    lines = [
        "# Service lookups vs a Redis blob store and in-process lookups",
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.",
        f"Table: {args.rows:,} IDs x {args.dim} dims, Zipf traffic, compressed {args.ratio:g}x by the knapsack allocator "
        f"(fp32 would be {fp32_bytes / 2**20:.0f} MiB). The load generator shares the 2 cores with the servers.",
        f"Closed loop: {args.concurrency} client threads, {args.seconds:g} s per cell, same 64 pre-drawn ID batches for every path.",
        "",
        "Server CPU: CPU time the serving process (embserve or redis-server) spent per request; client CPU: this",
        "process's CPU per request (request building, HTTP or RESP parsing, decoding).  On 2 shared cores the two",
        "compete, so the CPU columns are the capacity figures: IDs/s a dedicated core would give is batch / CPU time.",
        "",
        "| path | batch | requests | M IDs/s | p50 ms | p99 ms | server CPU us/req | client CPU us/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        server_cpu = f"{r.server_cpu_us:.0f}" if r.server_cpu_us else "-"
        lines.append(
            f"| {r.path} | {r.batch} | {r.requests:,} | {r.ids_per_s / 1e6:.3f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {server_cpu} | {r.client_cpu_us:.0f} |"
        )
    lines += [
        "",
        f"Open loop, batch {open_batch}, {args.rate:g} requests/s scheduled (latency from the scheduled send time):",
        "",
        "| path | requests | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for name, sent, p50, p99, worst in open_rows:
        lines.append(f"| {name} | {sent} | {p50:.2f} | {p99:.2f} | {worst:.2f} |")
    lines += [
        "",
        "Memory:",
        "",
        "| holder | table bytes | process resident set |",
        "|---|---|---|",
        f"| embserve (compressed table, index included) | {server_table_bytes / 2**20:.1f} MiB | {server_rss / 2**20:.0f} MiB |",
        f"| Redis, one fp32 blob per ID (`used_memory`) | {info['used_memory'] / 2**20:.1f} MiB | {redis_rss / 2**20:.0f} MiB |",
        f"| fp32 array in process | {fp32_bytes / 2**20:.1f} MiB | - |",
        "",
    ]
    big = max(batch_sizes)
    if ("service binary", big) in by and ("Redis MGET + decode", big) in by:
        speedup = by[("service binary", big)].ids_per_s / by[("Redis MGET + decode", big)].ids_per_s
        mem = info["used_memory"] / server_table_bytes
        open_p99 = next(p99 for name, _, _, p99, _ in open_rows if name == "service binary")
        lines += [
            "Targets (issue 4):",
            "",
            f"- batch {big} binary p99 at {args.rate:g} req/s <= 5 ms: **{open_p99:.2f} ms** ({'met' if open_p99 <= 5 else 'missed'})",
            f"- IDs/s >= 4x the Redis path at batch {big}: **{speedup:.1f}x** ({'met' if speedup >= 4 else 'missed'})",
            f"- >= 10x less table memory than Redis: **{mem:.1f}x** ({'met' if mem >= 10 else 'missed'})",
            "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
