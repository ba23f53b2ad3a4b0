"""GPU lookups: our Triton kernels vs torch's gathers on the same GPU, and the service end to end.

    python bench/gpu.py                      # on a CUDA machine -> bench/results/gpu.md (bench/gpu.sh runs it)
    python bench/gpu.py --smoke              # anywhere: TRITON_INTERPRET=1 on CPU tensors, tiny sizes,
                                             # -> bench/results/gpu_smoke.md (checks the script, not speed)

What is measured (all on one GPU, same IDs for every method):

* **lookups/s** at batch 1k / 64k / 1M, uniform and Zipf(1.05) IDs over a 10M x 64 table, for
  torch fp32 ``F.embedding``, an fp16 gather (fp16 out), and our tables: "8x" and "16x" class
  mixes (bits by frequency rank), dense IDs, keyed by sorted int64 keys (main + delta, as
  :class:`~compression.index.KeyedIndex` holds them) and keyed by the open-addressing hash
  layout (built here on the GPU; the service's HashIndex is wired in separately).  Two timings:
  *host loop* (calls back to back from Python, what a caller gets, launch overhead included)
  and *graph* (one call captured in a CUDA graph and replayed: device time only).
* **bandwidth**: bytes read + written per lookup (ID, index entry, stored row, output row,
  locator) / device time, as a share of the measured device-to-device copy bandwidth.
  Keyed probes' intermediate loads are not counted (a lower bound for keyed).
* **writes**: rows/s of ``table.put`` batches into the device slabs, and device syncs per put
  (``torch.cuda.set_sync_debug_mode``).
* **service**: a real ``embserve serve`` on the GPU (EMBSERVE_DEVICE=cuda), a 1M x 64 8x table,
  binary lookups of batch 1024 from client processes: closed loop (req/s, p50, p99) and open
  loop at a fixed rate (latency from the scheduled send time), batching off and on.
* the targets of issue 10, checked against these numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression import CompressedTable, RowClass, save_table  # noqa: E402
from compression.hash_index import home_slots, pack_slots  # noqa: E402
from compression.kernels import triton_module  # noqa: E402

td = triton_module()
DIM = 64
# (fraction of IDs by frequency rank, row class): top ranks get the wide classes
MIXES: dict[str, list[tuple[float, RowClass]]] = {
    "8x": [(0.01, RowClass(DIM, 16)), (0.03, RowClass(DIM, 8)), (0.36, RowClass(DIM, 4)), (0.60, RowClass(DIM, 2))],
    "16x": [(0.02, RowClass(DIM, 4)), (0.30, RowClass(DIM, 2)), (0.50, RowClass(DIM, 1)), (0.18, RowClass(0, 32))],
}
EMPTY_KEY = -(2**63)


# ------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


ROUNDS = 1 if SMOKE else 3


def host_loop_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds per call over ROUNDS rounds of ``reps`` back-to-back calls (after a warm-up)."""
    fn()
    sync(device)
    rounds = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        rounds.append((time.perf_counter() - started) / reps)
    return statistics.median(rounds)


def graph_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float | None:
    """Device seconds per call: ``fn`` captured once in a CUDA graph, replayed ``reps`` times
    between two events (median of 3 rounds).  None off CUDA or where capture fails."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # warm-up (and Triton's compile) outside the capture
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - report, keep benchmarking
        print(f"  graph capture failed: {exc}", flush=True)
        return None
    graph.replay()
    sync(device)
    rounds = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(rounds)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = graph_seconds(lambda: dst.copy_(src), device, 10) or host_loop_seconds(lambda: dst.copy_(src), device, 3)
    return 2 * src.numel() * 4 / seconds


# ------------------------------------------------------------------ tables


@dataclass
class Tables:
    n: int
    rank_of_id: torch.Tensor  # frequency rank of each dense ID
    cdf: torch.Tensor  # Zipf CDF over ranks
    id_of_rank: torch.Tensor
    fp32: torch.Tensor
    fp16: torch.Tensor
    ours: dict[str, CompressedTable] = field(default_factory=dict)  # dense IDs
    keyed: dict[str, CompressedTable] = field(default_factory=dict)  # the same rows under int64 keys
    key_of_id: torch.Tensor | None = None
    hash_views: dict[str, object] = field(default_factory=dict)
    put_rows_per_s: dict[str, float] = field(default_factory=dict)
    put_syncs: dict[str, int] = field(default_factory=dict)


def class_of_rank(n: int, mix: list[tuple[float, RowClass]], device: torch.device) -> torch.Tensor:
    bounds = torch.tensor(np.cumsum([f for f, _ in mix]) * n, device=device).round().to(torch.int64)
    return torch.bucketize(torch.arange(n, device=device), bounds, right=True).clamp_(max=len(mix) - 1)


def build_tables(n: int, device: torch.device, chunk: int, keyed: bool) -> Tables:
    gen = torch.Generator(device=device).manual_seed(0)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    cdf = torch.cumsum(ranks.pow(-1.05), 0)
    cdf /= cdf[-1].clone()
    id_of_rank = torch.randperm(n, generator=gen, device=device)
    rank_of_id = torch.empty_like(id_of_rank)
    rank_of_id[id_of_rank] = torch.arange(n, device=device)
    scale = (0.02 + 0.08 * (1.0 / (rank_of_id + 1).to(torch.float32)).pow(0.25))[:, None]
    fp32 = torch.randn(n, DIM, generator=gen, device=device) * scale
    t = Tables(n, rank_of_id, cdf, id_of_rank, fp32, fp32.to(torch.float16))
    if keyed:
        keys = torch.unique(torch.randint(-(2**62), 2**62, (n + n // 100 + 16,), generator=gen, device=device))
        t.key_of_id = keys[torch.randperm(keys.numel(), generator=gen, device=device)[:n]]
    rows_host = fp32.cpu()  # the applier hands rows over from the host
    keys_host = None if t.key_of_id is None else t.key_of_id.cpu()
    for name, mix in MIXES.items():
        classes = [rc for _, rc in mix]
        cls = class_of_rank(n, mix, device)[rank_of_id]
        cls_host = cls.cpu()
        variants = [("dense", False)] + ([("keyed", True)] if keyed else [])
        for kind, is_keyed in variants:
            table = CompressedTable.empty(DIM, classes, keyed=is_keyed, device=device)
            started = time.perf_counter()
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                key = keys_host[lo:hi] if is_keyed else torch.arange(lo, hi)  # type: ignore[index]
                table.put(key, rows_host[lo:hi], cls_host[lo:hi])
            if is_keyed:
                table.index.merge()  # a served keyed table between merges; the delta probe is tested elsewhere
            sync(device)
            t.put_rows_per_s[f"{name} {kind}"] = n / (time.perf_counter() - started)
            t.put_syncs[f"{name} {kind}"] = count_syncs(table, device, n, t.key_of_id if is_keyed else None, cls)
            (t.keyed if is_keyed else t.ours)[name] = table
            if is_keyed:
                keys_live, locs = table.index.live_items()
                t.hash_views[name] = build_hash(keys_live, locs)
    return t


def count_syncs(table: CompressedTable, device: torch.device, n: int, key_of_id: torch.Tensor | None, cls: torch.Tensor) -> int:
    """Device syncs one put of 4096 existing rows (rewritten in place) causes."""
    if device.type != "cuda":
        return -1
    ids = torch.arange(0, min(n, 4096), device=device)
    keys = (key_of_id[ids] if key_of_id is not None else ids).cpu()
    rows, classes = torch.randn(ids.numel(), DIM), cls[ids].cpu()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table.put(keys, rows, classes)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def build_hash(keys: torch.Tensor, locs: torch.Tensor) -> object:
    """The agreed open-addressing layout (load <= 0.5), built on the device: every unplaced key
    claims its current slot; a claim that wins an empty slot places the key, the others move
    one slot on.  Linear probing's invariant holds (a key only passes occupied slots)."""
    n = keys.numel()
    log2cap = max(1, int(np.ceil(np.log2(max(2, 2 * n)))))
    cap = 1 << log2cap
    device = keys.device
    table_keys = torch.full((cap,), EMPTY_KEY, dtype=torch.int64, device=device)
    table_locs = torch.full((cap,), -1, dtype=torch.int32, device=device)
    slot = home_slots(keys, cap)  # fmix64's top log2cap bits (compression/hash_index.py)
    pending = torch.arange(n, device=device)
    while pending.numel():
        s = slot[pending]
        free = table_keys[s] == EMPTY_KEY
        claim = torch.full((cap,), -1, dtype=torch.int64, device=device)
        claim.scatter_(0, s[free], pending[free])
        won = free & (claim[s] == pending)
        table_keys[s[won]] = keys[pending[won]]
        table_locs[s[won]] = locs[pending[won]]
        lost = pending[~won]
        slot[lost] = (slot[lost] + 1) & (cap - 1)
        pending = lost
    return td.HashIndexView(pack_slots(table_keys, table_locs))  # the 12-byte slots the kernel probes


def sample(t: Tables, batch: int, dist: str, seed: int) -> torch.Tensor:
    """Dense IDs: uniform, or Zipf by rank mapped to the shuffled IDs."""
    device = t.cdf.device
    gen = torch.Generator(device=device).manual_seed(seed)
    if dist == "uniform":
        return torch.randint(0, t.n, (batch,), generator=gen, device=device)
    u = torch.rand(batch, generator=gen, device=device, dtype=torch.float64)
    ranks = torch.searchsorted(t.cdf, u).clamp_(max=t.n - 1)
    return t.id_of_rank[ranks]


# ------------------------------------------------------------------ lookups


@dataclass
class Row:
    method: str
    batch: int
    dist: str
    host_s: float
    graph_s: float | None
    bytes_per_call: float
    table_bytes: int


def row_bytes_of(table: CompressedTable, loc: torch.Tensor) -> float:
    """Stored bytes the located rows occupy (what a lookup must read of them)."""
    per_class = torch.tensor([rc.row_bytes for rc in table.classes] + [0] * 8, device=loc.device)
    cls = torch.where(loc >= 0, loc >> 28, torch.full_like(loc, 8)).to(torch.int64)
    return float(per_class[cls].sum())


def run_lookups(t: Tables, batches: list[int], dists: list[str], device: torch.device, budget_ids: int) -> list[Row]:
    results = []
    for batch in batches:
        reps = max(3, min(200, budget_ids // batch))
        for dist in dists:
            dense = sample(t, batch, dist, seed=batch)
            out32 = torch.empty((batch, DIM), dtype=torch.float32, device=device)
            out16 = torch.empty((batch, DIM), dtype=torch.float16, device=device)
            loc = torch.empty(batch, dtype=torch.int32, device=device)
            io = 8 + 4  # ID read, locator written
            cases: list[tuple[str, Callable[[], object], float, int]] = [
                ("torch fp32 F.embedding", lambda: F.embedding(dense, t.fp32), batch * (8 + 2 * 4 * DIM), t.fp32.numel() * 4),
                ("torch fp16 gather (fp16 out)", lambda: F.embedding(dense, t.fp16), batch * (8 + 2 * 2 * DIM), t.fp16.numel() * 2),
            ]
            for name, table in t.ours.items():
                cargs = td.class_args(table.slabs, table.classes, table.rotation)
                located = table.index.resolve(dense)
                stored = row_bytes_of(table, located)
                cases.append((f"ours {name} dense", _lookup(out32, dense, table.index, cargs, loc), batch * (io + 4 + 4 * DIM) + stored, table.nbytes))
                cases.append((f"ours {name} dense (fp16 out)", _lookup(out16, dense, table.index, cargs, loc), batch * (io + 4 + 2 * DIM) + stored, table.nbytes))
                if name in t.keyed:
                    keyed = t.keyed[name]
                    keys = t.key_of_id[dense]  # type: ignore[index]
                    kargs = td.class_args(keyed.slabs, keyed.classes, keyed.rotation)
                    stored_k = row_bytes_of(keyed, keyed.index.resolve(keys))
                    cases.append((f"ours {name} keyed, sorted keys", _lookup(out32, keys, keyed.index, kargs, loc), batch * (io + 12 + 4 * DIM) + stored_k, keyed.nbytes))
                    view = t.hash_views[name]
                    hash_bytes = view.keys.numel() * 12 + keyed.nbytes - keyed.index.nbytes  # type: ignore[attr-defined]
                    cases.append((f"ours {name} keyed, hash index", _lookup(out32, keys, view, kargs, loc), batch * (io + 12 + 4 * DIM) + stored_k, hash_bytes))
            for method, fn, nbytes, table_bytes in cases:
                host = host_loop_seconds(fn, device, reps)
                graph = graph_seconds(fn, device, reps)
                results.append(Row(method, batch, dist, host, graph, nbytes, table_bytes))
                g = f"{batch / graph / 1e6:9.1f}" if graph else "        -"
                print(f"  {method:34s} b{batch:<8d} {dist:8s} host {batch / host / 1e6:9.3g} M/s  graph {g} M/s", flush=True)
    return results


def _lookup(out: torch.Tensor, ids: torch.Tensor, index: object, cargs: object, loc: torch.Tensor) -> Callable[[], object]:
    return lambda: td.lookup(out, ids, index, cargs, None, loc=loc)


def sweep_tiles(t: Tables, device: torch.device) -> list[tuple[int, int, int, float]]:
    """Decode strategy x tile size x warps for the 8x dense table at batch 64k, uniform IDs
    (device time); the fastest is used for the rest of the run and by the served process.
    (The defaults were picked without a GPU: the largest tile that compiles without register
    spills, and the shared quantized pass, which issues fewer instructions.)"""
    table = t.ours["8x"]
    batch = 65536 if device.type == "cuda" else 64
    ids = sample(t, batch, "uniform", seed=7)
    out = torch.empty((batch, DIM), device=device)
    loc = torch.empty(batch, dtype=torch.int32, device=device)
    cargs = td.class_args(table.slabs, table.classes, table.rotation)
    if device.type == "cuda":
        grid = [(1, 512, 2), (1, 512, 4), (1, 1024, 2), (1, 1024, 4), (1, 1024, 8), (1, 2048, 4), (1, 2048, 8),
                (0, 512, 4), (0, 1024, 4), (0, 2048, 8)]
    else:
        grid = [(1, 1024, 4), (0, 1024, 4)]
    results = []
    for generic, tile, warps in grid:
        bn = td.block_sizes(DIM, tile=tile)[0]

        def fn(bn: int = bn, warps: int = warps, generic: int = generic) -> object:
            return td.lookup(out, ids, table.index, cargs, None, loc=loc, block_n=bn, num_warps=warps, generic=bool(generic))

        seconds = graph_seconds(fn, device, 50) or host_loop_seconds(fn, device, 1)
        results.append((generic, tile, warps, seconds))
        print(f"  {'shared' if generic else 'per-class'} quantized pass, tile {tile:5d} warps {warps}: {batch / seconds / 1e6:10.3f} M lookups/s", flush=True)
    generic, tile, warps, _ = min(results, key=lambda r: r[3])
    td.GENERIC_QUANTIZED, td.TILE_VALUES, td.NUM_WARPS = generic, tile, warps
    return results


def check_agreement(t: Tables, device: torch.device) -> list[str]:
    """Each GPU path against the torch reference on the same device, before any timing."""
    notes = []
    ids = sample(t, 4096, "zipf", seed=1)
    for name, table in t.ours.items():
        table.backend = "triton"
        got = table.lookup(ids).values
        table.backend = "torch"
        want = table.lookup(ids).values
        table.backend = "auto"
        notes.append(f"ours {name} dense: triton == torch reference: {bool(torch.equal(got, want))}")
        if name in t.keyed:
            keyed = t.keyed[name]
            keys = t.key_of_id[ids]  # type: ignore[index]
            kargs = td.class_args(keyed.slabs, keyed.classes, keyed.rotation)
            out = torch.empty((ids.numel(), DIM), device=device)
            td.lookup(out, keys, t.hash_views[name], kargs, None)
            notes.append(f"ours {name} hash index == dense rows: {bool(torch.equal(out, want))}")
    return notes


# ------------------------------------------------------------------ service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a real process for readiness
    raise TimeoutError("server did not become ready")


def _client(base: str, table: str, id_space: int, batch: int, threads: int, seconds: float, rate: float, first_slot: int,
            stride: int, seed: int, queue: "mp.Queue[list[float]]") -> None:
    """One client process: ``threads`` threads, closed loop (rate 0) or open loop (slots of a
    fixed-rate schedule, latency from the scheduled time).  Puts its latencies on ``queue``."""
    import threading

    from service.client import EmbeddingClient

    lat: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter() + 0.5

    def run(k: int) -> None:
        rng = np.random.default_rng(seed * 100 + k)
        mine = []
        with EmbeddingClient(base, timeout=30) as client:
            client.lookup(table, rng.integers(0, id_space, batch))  # connection warm
            slot = first_slot + k
            while True:
                if rate > 0:
                    due = start + slot / rate
                    slot += stride
                    now = time.perf_counter()
                    if due > start + seconds:
                        break
                    if due > now:
                        time.sleep(due - now)  # open loop: wait for the scheduled send time
                    t0 = due
                else:
                    t0 = time.perf_counter()
                    if t0 > start + seconds:
                        break
                    if t0 < start:
                        time.sleep(start - t0)
                        continue
                client.lookup(table, rng.integers(0, id_space, batch))
                mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(lat)


@dataclass
class ServiceRow:
    batching: str
    mode: str
    clients: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def run_service(table: CompressedTable, device: torch.device, window_us: int, procs: int, threads: int, seconds: float,
                rate: float, id_space: int, batch: int) -> list[ServiceRow]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        save_table(table, Path(folder) / "items.safetensors")
        port = free_port()
        env = {**os.environ, "EMBSERVE_TABLES_DIR": folder, "EMBSERVE_PORT": str(port), "EMBSERVE_DEVICE": str(device),
               "EMBSERVE_BATCH_WINDOW_US": str(window_us), "EMBSERVE_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc, timeout=180)
            for mode, r in (("closed loop", 0.0), (f"open loop {rate:.0f} req/s", rate)):
                ctx = mp.get_context("spawn")
                queue: mp.Queue[list[float]] = ctx.Queue()
                workers = [ctx.Process(target=_client, args=(base, "items", id_space, batch, threads, seconds, r, p * threads, procs * threads, p, queue)) for p in range(procs)]
                for w in workers:
                    w.start()
                lat = [x for _ in workers for x in queue.get(timeout=seconds + 120)]
                for w in workers:
                    w.join()
                lat_ms = np.array(lat) * 1e3
                rows.append(ServiceRow("on" if window_us else "off", mode, procs * threads, len(lat), seconds,
                                       float(np.percentile(lat_ms, 50)) if len(lat) else float("nan"),
                                       float(np.percentile(lat_ms, 99)) if len(lat) else float("nan")))
                print(f"  service batching {rows[-1].batching:3s} {mode:22s} {rows[-1].rps:8.0f} req/s  p50 {rows[-1].p50_ms:.2f} ms  p99 {rows[-1].p99_ms:.2f} ms", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return rows


# ------------------------------------------------------------------ report


def machine(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    else:
        gpu = "no GPU: CPU tensors under TRITON_INTERPRET=1 (smoke run; timings mean nothing)"
    return (f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{os.cpu_count()} CPUs; kernel: {'shared' if td.GENERIC_QUANTIZED else 'per-class'} quantized pass, "
            f"tile {td.TILE_VALUES} values, {td.NUM_WARPS} warps")


def fmt_rate(batch: int, seconds: float | None) -> str:
    return f"{batch / seconds / 1e6:,.3g}" if seconds else "-"


def report(args: argparse.Namespace, device: torch.device, t: Tables, rows: list[Row], peak: float, notes: list[str],
           service: list[ServiceRow], elapsed: float, sweep: list[tuple[int, int, int, float]]) -> str:
    batches = sorted({r.batch for r in rows})
    dists = ["uniform", "zipf"]
    methods = list(dict.fromkeys(r.method for r in rows))
    get = {(r.method, r.batch, r.dist): r for r in rows}
    lines = [
        "# GPU lookups: Triton kernels vs torch gathers, and the service on the GPU",
        "",
        f"Machine: {machine(device)}.  Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s, "
        f"`python bench/gpu.py{' --smoke' if args.smoke else ''}`.",
        f"Table: {t.n:,} x {DIM}, Zipf(1.05) frequencies shuffled over IDs; class mixes by frequency rank: "
        + "; ".join(f"{k}: " + ", ".join(f"{f:.0%} {rc.label()}" for f, rc in v) for k, v in MIXES.items()) + ".",
        f"Device-to-device copy (read + written): **{peak / 1e12:.2f} TB/s**, the peak bandwidth shares below refer to.",
        "",
        "## Lookups/s (millions), host loop / CUDA graph",
        "",
        "| method | table bytes | " + " | ".join(f"b{b} {d}" for b in batches for d in dists) + " |",
        "|---|---|" + "---|" * (len(batches) * len(dists)),
    ]
    for m in methods:
        any_row = next(r for r in rows if r.method == m)
        cells = []
        for b in batches:
            for d in dists:
                r = get.get((m, b, d))
                cells.append("-" if r is None else f"{fmt_rate(b, r.host_s)} / {fmt_rate(b, r.graph_s)}")
        size = f"{any_row.table_bytes / 2**20:,.0f} MiB" if any_row.table_bytes >= 2**20 else f"{any_row.table_bytes / 1024:,.0f} KiB"
        lines.append(f"| {m} | {size} | " + " | ".join(cells) + " |")
    lines += ["", "## Achieved bandwidth (CUDA graph time), share of the copy peak", "",
              "| method | " + " | ".join(f"b{b} {d}" for b in batches for d in dists) + " |",
              "|---|" + "---|" * (len(batches) * len(dists))]
    for m in methods:
        cells = []
        for b in batches:
            for d in dists:
                r = get.get((m, b, d))
                if r is None or not r.graph_s:
                    cells.append("-")
                else:
                    bw = r.bytes_per_call / r.graph_s
                    cells.append(f"{bw / 1e12:.2f} TB/s ({bw / peak:.0%})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Writes into device slabs (`table.put`, batches of rows as the applier hands them over)", "",
              "| table | rows/s building it | device syncs per put of 4096 rows |", "|---|---|---|"]
    for k, v in t.put_rows_per_s.items():
        s = t.put_syncs.get(k, -1)
        lines.append(f"| {k} | {v:,.0f} | {s if s >= 0 else '-'} |")
    if service:
        lines += ["", f"## Service on the device: binary lookups of batch {args.service_batch}, {service[0].clients} clients "
                  f"({args.client_procs} processes x {args.client_threads} threads), {args.service_seconds:.0f} s each", "",
                  "| batching | load | requests | req/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
        for s in service:
            lines.append(f"| {s.batching} | {s.mode} | {s.requests} | {s.rps:,.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} |")
    sweep_batch = 65536 if device.type == "cuda" else 64
    lines += ["", f"## Tile sweep (8x dense, b{sweep_batch} uniform, device time; the fastest is used above)", "",
              "| quantized classes | values per tile | warps | M lookups/s |", "|---|---|---|---|",
              *[f"| {'one shared pass' if g else 'one pass per class'} | {tile} | {warps} | {sweep_batch / sec / 1e6:,.3g} |" for g, tile, warps, sec in sweep]]
    lines += ["", "## Agreement checked before timing", "", *[f"- {n}" for n in notes]]
    lines += ["", "## Targets (issue 10)", "", *targets(rows, peak, service)]
    return "\n".join(lines) + "\n"


def targets(rows: list[Row], peak: float, service: list[ServiceRow]) -> list[str]:
    get = {(r.method, r.batch, r.dist): r for r in rows}
    out = []
    for b in sorted({r.batch for r in rows if r.batch >= 65536}):
        for d in ("uniform", "zipf"):
            ours, base = get.get(("ours 8x dense", b, d)), get.get(("torch fp32 F.embedding", b, d))
            if ours and base and ours.graph_s and base.graph_s:
                ratio = base.graph_s / ours.graph_s
                share = ours.bytes_per_call / ours.graph_s / peak
                out.append(f"- 8x dense, b{b} {d}: {ratio:.2f}x F.embedding (target >= 1.3x: {'met' if ratio >= 1.3 else 'NOT met'}), "
                           f"{share:.0%} of peak bandwidth (target >= 60%: {'met' if share >= 0.6 else 'NOT met'})")
    for method in ("ours 8x keyed, sorted keys", "ours 8x keyed, hash index"):
        for d in ("uniform", "zipf"):
            r = get.get((method, 1 << 20, d))
            if r and r.graph_s:
                rate = r.batch / r.graph_s
                out.append(f"- {method}, b1M {d}: {rate / 1e9:.2f} billion IDs/s (target >= 1: {'met' if rate >= 1e9 else 'NOT met'})")
    for s in service:
        if s.batching == "on" and s.mode.startswith("open"):
            ok = s.p99_ms <= 2.0 and s.rps >= 2000
            out.append(f"- service, batching on, {s.mode}: {s.rps:,.0f} req/s, p99 {s.p99_ms:.2f} ms (target p99 <= 2 ms at >= 2,000 req/s: {'met' if ok else 'NOT met'})")
    return out or ["- (not measured in this run)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny sizes: checks the script runs")
    parser.add_argument("--rows", type=int, default=None, help="table rows (default 10M; smoke 2048)")
    parser.add_argument("--no-keyed", action="store_true")
    parser.add_argument("--no-service", action="store_true")
    parser.add_argument("--service-rows", type=int, default=None, help="rows of the served table (default 1M)")
    parser.add_argument("--service-batch", type=int, default=1024)
    parser.add_argument("--service-seconds", type=float, default=None)
    parser.add_argument("--service-rate", type=float, default=2000.0, help="open-loop requests/s")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--client-threads", type=int, default=4)
    parser.add_argument("--window-us", type=int, default=200, help="EMBSERVE_BATCH_WINDOW_US for the batching-on runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.smoke:
        device = torch.device("cpu")
        n, batches, budget, chunk = args.rows or 2048, [64, 256], 1, 1024
        args.service_seconds = args.service_seconds or 2.0
        args.service_rate = min(args.service_rate, 50.0)
        args.client_procs, args.client_threads = min(args.client_procs, 2), min(args.client_threads, 2)
        service_rows = args.service_rows or 2048
        out_path = args.out or ROOT / "bench" / "results" / "gpu_smoke.md"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke to check the script on CPU")
        device = torch.device("cuda")
        n, batches, budget, chunk = args.rows or 10_000_000, [1024, 65536, 1 << 20], 64 << 20, 1 << 20
        args.service_seconds = args.service_seconds or 6.0
        service_rows = args.service_rows or 1_000_000
        out_path = args.out or ROOT / "bench" / "results" / "gpu.md"
    print(f"machine: {machine(device)}", flush=True)
    peak = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 1 << 22)
    print(f"copy bandwidth {peak / 1e12:.3f} TB/s; building {n:,}-row tables", flush=True)
    t = build_tables(n, device, chunk, keyed=not args.no_keyed)
    notes = check_agreement(t, device)
    print("\n".join(notes), flush=True)
    sweep = sweep_tiles(t, device)
    os.environ["EMBSERVE_TRITON_TILE"], os.environ["EMBSERVE_TRITON_WARPS"] = str(td.TILE_VALUES), str(td.NUM_WARPS)  # the server too
    os.environ["EMBSERVE_TRITON_GENERIC"] = str(td.GENERIC_QUANTIZED)
    rows = run_lookups(t, batches, ["uniform", "zipf"], device, budget)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # written now and again at the end: a run cut short by its time limit still leaves the kernel numbers
    out_path.write_text(report(args, device, t, rows, peak, notes, [], time.perf_counter() - started, sweep))
    service: list[ServiceRow] = []
    if not args.no_service:
        served = t.ours["8x"] if service_rows == n else build_tables(service_rows, device, chunk, keyed=False).ours["8x"]
        del t.fp32, t.fp16
        for window in (0, args.window_us):
            service += run_service(served, device, window, args.client_procs, args.client_threads, args.service_seconds,
                                   args.service_rate, service_rows, args.service_batch)
    text = report(args, device, t, rows, peak, notes, service, time.perf_counter() - started, sweep)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"wrote {out_path}", flush=True)


if __name__ == "__main__":
    main()
