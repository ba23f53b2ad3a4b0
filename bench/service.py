"""Service-level lookups against the stacks users replace, same IDs and same table, one run.

    python bench/service.py                       # -> bench/results/service.md
    python bench/service.py --compare-servers     # also the HTTP server not picked by default (uvicorn vs granian)
    python bench/service.py --fast --out /tmp/s.md   # smoke run, seconds (tests/test_benchmarks.py)

Paths compared (all called from this Python process, as a ranker would):

* **service binary (uvicorn, ASGI only)**: a second `embserve serve` with
  ``EMBSERVE_HTTP_FAST_PATH=false``, every request through ASGI: the baseline of the HTTP-level
  lookup fast path (service/fasthttp.py), in the same rounds;
* **service binary** / **service JSON**: a real `embserve serve` process (uvicorn) holding the
  demo table (1M x 64, Zipf traffic, compressed 8x by the knapsack allocator), called with
  ``service.client.EmbeddingClient``;
* **Redis blob store**: one fp32 blob per ID in a real `redis-server` (no persistence, as a
  feature-store cache runs), fetched with MGET and decoded with numpy: what a Feast-style
  online store does;
* **in-process compressed** and **in-process fp32 gather**: the same compressed table, and the
  uncompressed fp32 rows with ``F.embedding``, in this process (no network): the floor.

Closed loop: ``--concurrency`` threads each send the next batch as soon as the last one
answers, for ``--seconds``; IDs/s and per-request latency p50/p99.  Paths are measured
round-robin over ``--rounds`` rounds (``bench/interleave.py``), so service-vs-Redis ratios are
medians of same-round ratios with their spread.  Open loop: batch 1024 sent
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
from interleave import MIN_ROUNDS, NOISE_NOTE, Spread, ratio, run_rounds, target_line  # noqa: E402
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
    """CPU time of a process, all its live threads, in nanoseconds' resolution (the scheduler's
    per-thread run time, /proc/<pid>/task/*/schedstat); /proc/<pid>/stat counts 10 ms ticks,
    too coarse for the short cells of interleaved rounds."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


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


@dataclass
class Cell:
    """One path at one batch size: a measurement per interleaved round."""

    path: str
    batch: int
    rounds: list[Measured]

    def spread(self, attr: str) -> Spread:
        return Spread.of([getattr(m, attr) for m in self.rounds])


def measure_cell(
    name: str, call: Callable[[np.ndarray], object], batches: list[np.ndarray], serving_pid: int | None, concurrency: int, seconds: float,
    sink: list[Measured], batch: int,
) -> Callable[[], float]:
    """A measure for :func:`interleave.run_rounds`: one closed loop of ``seconds``; returns IDs/s and
    keeps the round's full measurement in ``sink``."""

    def measure() -> float:
        server_cpu = cpu_seconds(serving_pid) if serving_pid else 0.0
        client_cpu = time.process_time()  # this process: counts the loop's threads after they end, too
        n, elapsed, lat = closed_loop(call, batches, concurrency, seconds)
        server_cpu = (cpu_seconds(serving_pid) - server_cpu) if serving_pid else 0.0
        client_cpu = time.process_time() - client_cpu
        p50, p99 = percentiles(lat)
        n = max(n, 1)
        sink.append(Measured(name, batch, n, n * batch / elapsed, p50, p99, server_cpu / n * 1e6, client_cpu / n * 1e6))
        return n * batch / elapsed

    return measure


def start_server(folder: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    port = free_port()
    env = {**os.environ, "EMBSERVE_TABLES_DIR": str(folder / "tables"), "EMBSERVE_PORT": str(port), "EMBSERVE_LOG_LEVEL": "warning",
           "EMBSERVE_SNAPSHOT_INTERVAL_S": "86400", **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=1.0, help="closed-loop seconds per path, batch size and round")
    parser.add_argument("--rounds", type=int, default=5, help=f"interleaved rounds (at least {MIN_ROUNDS})")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s for batch 1024")
    parser.add_argument("--compare-servers", action="store_true", help="also run the HTTP server not chosen by default, as its own path")
    parser.add_argument("--fast", "--quick", dest="fast", action="store_true", help="smoke run: 20k rows, 0.1 s cells, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "service.md")
    args = parser.parse_args()
    if args.fast:
        args.rows, args.seconds, args.rounds, args.batches = 20_000, 0.1, MIN_ROUNDS, "1,1024"
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}: a spread needs rounds")
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

        grpc_port = free_port()
        server, base, server_env = start_server(folder, {"EMBSERVE_GRPC_PORT": str(grpc_port)})
        # the same server with every request through ASGI: the HTTP-level fast path's baseline, same rounds
        asgi_only, asgi_base, _ = start_server(folder, {"EMBSERVE_HTTP_FAST_PATH": "false"})
        other = None
        if args.compare_servers:
            other, other_base, _ = start_server(folder, {"EMBSERVE_HTTP_SERVER": "uvicorn" if default_http_server() == "granian" else "granian"})
        redis_proc, redis_url = start_redis(folder, durable=False)
        floor_port = free_port()
        floor = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", _BENCH, "noop_asgi:app", "--port", str(floor_port), "--log-level", "warning", "--no-access-log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs = [p for p in (server, asgi_only, other, redis_proc, floor) if p is not None]
        load_before = load_average()
        try:
            wait_http(f"{base}/readyz", server)
            wait_http(f"{asgi_base}/readyz", asgi_only)
            wait_http(f"http://127.0.0.1:{floor_port}/", floor, method="POST")
            if other is not None:
                wait_http(f"{other_base}/readyz", other)
            print("loading Redis ...", flush=True)
            dense_np = dense.numpy()
            load_redis(redis_url, dense_np)
            import redis

            info = redis.Redis.from_url(redis_url).info("memory")
            binary_client = EmbeddingClient(base)
            fp16_client = EmbeddingClient(base, dtype="f16")
            json_client = EmbeddingClient(base, binary=False)
            asgi_client = EmbeddingClient(asgi_base)
            server_table_bytes = int(binary_client.tables()[0]["bytes"])
            grpc_call = grpc_fetcher(f"127.0.0.1:{grpc_port}")
            http_server = default_http_server()
            paths: dict[str, tuple[Callable[[np.ndarray], object], int | None]] = {
                f"service binary ({http_server})": (lambda ids: binary_client.lookup(TABLE, ids), server.pid),
                f"service binary ({http_server}, ASGI only)": (lambda ids: asgi_client.lookup(TABLE, ids), asgi_only.pid),
                "service binary, fp16 values": (lambda ids: fp16_client.lookup(TABLE, ids), server.pid),
                "service JSON": (lambda ids: json_client.lookup(TABLE, ids), server.pid),
                "service v2 gRPC (tritonclient)": (grpc_call, server.pid),
                "Redis MGET + decode": (redis_fetcher(redis_url, args.dim), redis_proc.pid),
                "HTTP floor: uvicorn + no-op ASGI app": (raw_poster(floor_port), floor.pid),
                "in-process compressed": (lambda ids: in_process.lookup(torch.from_numpy(ids)).values, None),
                "in-process fp32 gather": (lambda ids: F.embedding(torch.from_numpy(ids), dense), None),
            }
            other_client = None
            if other is not None:
                other_client = EmbeddingClient(other_base)
                other_name = "uvicorn" if http_server == "granian" else "granian"
                paths[f"service binary ({other_name})"] = (lambda ids: other_client.lookup(TABLE, ids), other.pid)
            binary_path = f"service binary ({http_server})"
            # every path must return the same rows (compressed ones within their error)
            probe = rng_batches[batch_sizes[-1]][0]
            exact = dense_np[probe]
            np.testing.assert_array_equal(paths["Redis MGET + decode"][0](probe), exact)
            served = binary_client.lookup(TABLE, probe).values
            np.testing.assert_allclose(served, in_process.lookup(torch.from_numpy(probe)).values.numpy(), rtol=0, atol=0)
            np.testing.assert_array_equal(grpc_call(probe), served)
            np.testing.assert_array_equal(fp16_client.lookup(TABLE, probe).values, served.astype(np.float16))

            cells: dict[tuple[str, int], Cell] = {}
            for batch in batch_sizes:
                measures = {}
                for name, (call, pid) in paths.items():
                    for ids in rng_batches[batch][:4]:
                        call(ids)  # warm connections and caches
                    cell = cells[(name, batch)] = Cell(name, batch, [])
                    measures[name] = measure_cell(name, call, rng_batches[batch], pid, args.concurrency, args.seconds, cell.rounds, batch)
                run_rounds(measures, args.rounds)
                for name in paths:
                    c = cells[(name, batch)]
                    print(f"{name:32s} batch {batch:5d}: {c.spread('ids_per_s').median / 1e6:7.3f} M IDs/s  "
                          f"server CPU {c.spread('server_cpu_us').median:6.0f} us/req", flush=True)

            open_batch = max(batch_sizes)
            open_rows = []
            for name in (binary_path, "Redis MGET + decode"):
                lat, sent = open_loop(paths[name][0], rng_batches[open_batch], args.rate, max(args.seconds * args.rounds, 2.0))
                p50, p99 = percentiles(lat)
                open_rows.append((name, sent, p50, p99, float(np.max(lat) * 1e3)))
                print(f"open loop {name}: {sent} requests at {args.rate:g}/s, p50 {p50:.2f} ms p99 {p99:.2f} ms", flush=True)

            server_rss = rss_bytes(server.pid)
            redis_rss = rss_bytes(redis_proc.pid)
            load_after = load_average()
            for client in (binary_client, fp16_client, json_client, asgi_client, other_client):
                if client is not None:
                    client.close()
        finally:
            stop(*procs, timeout=30)

    report = render(args, cells, open_rows, batch_sizes, binary_path, server_table_bytes, server_rss, info, redis_rss, (load_before, load_after))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def load_average() -> str:
    """The host's 1/5/15-minute load averages (other jobs share these cores)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def default_http_server() -> str:
    from service.settings import Settings

    return str(Settings.model_fields["http_server"].default)


def raw_poster(port: int) -> Callable[[np.ndarray], bytes]:
    """The service's binary request, POSTed with ``http.client`` (what EmbeddingClient uses) to
    the no-op app: the HTTP cost alone, on both sides."""
    import http.client

    from service.wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE, ParsedLookup, encode_binary_request

    local = threading.local()

    def post(ids: np.ndarray) -> bytes:
        body = encode_binary_request([ParsedLookup(TABLE, ids, None, "none")])
        for attempt in (0, 1):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("POST", "/v1/lookup", body=body, headers={"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE})
                return conn.getresponse().read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()  # an idle keep-alive connection the server closed: once more on a new one
                local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    return post


def grpc_fetcher(url: str) -> Callable[[np.ndarray], np.ndarray]:
    """KServe v2 ModelInfer through an unmodified ``tritonclient.grpc`` client, one per thread."""
    import tritonclient.grpc as grpcclient

    local = threading.local()

    def fetch(ids: np.ndarray) -> np.ndarray:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("ids", [len(ids)], "INT64")
        tensor.set_data_from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        result = client.infer(TABLE, [tensor], outputs=[grpcclient.InferRequestedOutput("embeddings")])
        return result.as_numpy("embeddings")

    return fetch


def render(args: argparse.Namespace, cells: dict[tuple[str, int], Cell], open_rows: list[tuple[str, int, float, float, float]],
           batch_sizes: list[int], binary_path: str, server_table_bytes: int, server_rss: int, info: dict, redis_rss: int,  # type: ignore[type-arg]
           load: tuple[str, str] = ("?", "?")) -> str:
    fp32_bytes = args.rows * args.dim * 4
    lines = [
        "# Service lookups vs a Redis blob store and in-process lookups" + (" (smoke mode: --fast, numbers mean nothing)" if args.fast else ""),
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}; load average (1/5/15 min) {load[0]} at the start, {load[1]} at the end.",
        f"Table: {args.rows:,} IDs x {args.dim} dims, Zipf traffic, compressed {args.ratio:g}x by the knapsack allocator "
        f"(fp32 would be {fp32_bytes / 2**20:.0f} MiB). The load generator shares the 2 cores with the servers.",
        f"Closed loop: {args.concurrency} client threads, {args.seconds:g} s per path and round, {args.rounds} rounds run round-robin "
        "(every path once per round, start rotated), same 64 pre-drawn ID batches for every path.",
        "",
        NOISE_NOTE,
        "",
        "Server CPU: CPU time the serving process (embserve or redis-server) spent per request; client CPU: this",
        "process's CPU per request (request building, HTTP or RESP parsing, decoding).  On 2 shared cores the two",
        "compete, so the CPU columns are the capacity figures: IDs/s a dedicated core would give is batch / CPU time.",
        "Every column is the median over rounds; server CPU also shows its min..max over rounds.",
        "",
        "| path | batch | requests | M IDs/s | p50 ms | p99 ms | server CPU us/req (min..max) | client CPU us/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch in batch_sizes:
        for (path, b), c in cells.items():
            if b != batch:
                continue
            cpu = c.spread("server_cpu_us")
            server_cpu = f"{cpu.median:.0f} ({cpu.lo:.0f}..{cpu.hi:.0f})" if cpu.median else "-"
            lines.append(
                f"| {path} | {batch} | {sum(m.requests for m in c.rounds):,} | {c.spread('ids_per_s').median / 1e6:.3f} | "
                f"{c.spread('p50_ms').median:.2f} | {c.spread('p99_ms').median:.2f} | {server_cpu} | {c.spread('client_cpu_us').median:.0f} |"
            )
    lines += [
        "",
        f"Open loop, batch {max(batch_sizes)}, {args.rate:g} requests/s scheduled (latency from the scheduled send time):",
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
        "Same-round ratios (median, min..max over rounds):",
        "",
    ]
    redis = "Redis MGET + decode"
    targets = []
    for batch in batch_sizes:
        if (binary_path, batch) not in cells or (redis, batch) not in cells:
            continue
        vs_redis = ratio([m.ids_per_s for m in cells[(binary_path, batch)].rounds], [m.ids_per_s for m in cells[(redis, batch)].rounds])
        lines.append(f"- batch {batch}: service binary IDs/s / Redis path IDs/s = {vs_redis.fmt()}")
        if batch == 64:
            targets.append(target_line("service binary ahead of the Redis path at batch 64 (IDs/s ratio)", vs_redis, 1.0))
        if batch == 1024:
            targets.append(target_line("service binary IDs/s vs the Redis path at batch 1024", vs_redis, 8.0))
        for other in ("service v2 gRPC (tritonclient)", "service binary, fp16 values") + tuple(p for p, b in cells if b == batch and p.startswith("service binary (") and p != binary_path):
            if (other, batch) in cells:
                r = ratio([m.ids_per_s for m in cells[(other, batch)].rounds], [m.ids_per_s for m in cells[(binary_path, batch)].rounds])
                cpu = ratio([m.server_cpu_us for m in cells[(other, batch)].rounds], [m.server_cpu_us for m in cells[(binary_path, batch)].rounds])
                lines.append(f"- batch {batch}: {other} / {binary_path}: IDs/s {r.fmt()}, server CPU per request {cpu.fmt()}")
    if (binary_path, 1) in cells:
        targets.insert(0, target_line("server CPU per batch-1 binary lookup", cells[(binary_path, 1)].spread("server_cpu_us"), 40, at_least=False, digits=0, unit=" us"))
        floor_path = "HTTP floor: uvicorn + no-op ASGI app"
        if (floor_path, 1) in cells:
            floor_cpu = cells[(floor_path, 1)].spread("server_cpu_us")
            over = ratio([m.server_cpu_us for m in cells[(binary_path, 1)].rounds], [m.server_cpu_us for m in cells[(floor_path, 1)].rounds])
            targets.insert(1, f"  - for scale, same rounds: uvicorn answering the same request with a no-op ASGI app costs "
                              f"**{floor_cpu.fmt(0, ' us')}** of server CPU; the service costs {over.fmt()} that")
    big = max(batch_sizes)
    open_p99 = next((p99 for name, _, _, p99, _ in open_rows if name == binary_path), float("nan"))
    mem = info["used_memory"] / server_table_bytes
    lines += [
        "",
        "Targets (issue 13; `met` only when every round clears the target):",
        "",
        *targets,
        "",
        "Earlier targets (issue 4):",
        "",
        f"- batch {big} binary p99 at {args.rate:g} req/s <= 5 ms: **{open_p99:.2f} ms** ({'met' if open_p99 <= 5 else 'missed'})",
        f"- >= 10x less table memory than Redis: **{mem:.1f}x** ({'met' if mem >= 10 else 'missed'})",
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
