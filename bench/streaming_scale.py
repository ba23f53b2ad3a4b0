"""An endless ID stream into a real server: a keyed table with ``max_ids`` and a byte budget.

    python bench/streaming_scale.py --seconds 180          # 20M-ID Zipf universe, max_ids 1M -> bench/results/streaming_scale.md/.png
    python bench/streaming_scale.py --fast                 # 10 s, 200k universe, max_ids 10k (the test runs this)
    python bench/streaming_scale.py --seconds 3600 --universe 100000000 --distinct 20000000
                                                           # until 20M distinct IDs were sent (~40-60M rows)

A real ``embserve serve`` process (SQLite update log, snapshots and log trimming on) hosts one
keyed table (64 dims, int8 rows, hash index) created through the admin API with ``max_ids``,
an admission count and a byte budget.  Writer threads send binary update requests with IDs
drawn from Zipf(``--zipf``) over ``--universe`` ranks (rank -> an arbitrary int64 ID), for
``--seconds``, ``--rows`` or ``--distinct`` (distinct IDs sent; a Zipf stream over a universe
several times larger meets 20M distinct IDs within a few tens of millions of rows).  At the default exponent 0.9 about a third of 16M rows are IDs never
seen before and 1.5M IDs recur (enough to fill ``max_ids`` = 1M past the admission count).  The vector of an ID is a fixed function of the ID and the current
*epoch*; at each checkpoint (every ``--check-every`` seconds) the writers pause, the epoch's
updates are waited for (``wait=true``), the hottest ``--head`` IDs are looked up and compared
with what the int8 class stores for their vector (the codec applied here), and the next epoch
starts.  A sampler thread reads the table's counted bytes (``GET /v1/tables/{name}``: index,
rows, free lists, admission counts) and the server's RSS twice a second.

Reported: updates acknowledged per second (the API's rate: durably logged) and applied per
second (until the last one is visible), distinct IDs sent, IDs held, evicted / filtered
counts (from ``/metrics``), the largest sampled table bytes against the budget, head
exactness, and a memory-vs-time plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression import RowClass  # noqa: E402
from compression.codecs import decode_rows, encode_rows  # noqa: E402
from service.wire import encode_binary_updates  # noqa: E402

BINARY = "application/x-embserve-updates"
TABLE = "stream"
DIM = 64
_MIX = np.uint64(0x9E3779B97F4A7C15)


def ids_of(ranks: np.ndarray) -> np.ndarray:
    """Rank (1 = hottest) -> an arbitrary positive int64 ID (a bijection on 63 bits)."""
    with np.errstate(over="ignore"):
        return ((ranks.astype(np.uint64) * _MIX) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)


def zipf_ranks(rng: np.random.Generator, s: float, universe: int, count: int) -> np.ndarray:
    """Ranks 1..universe with P(r) ~ r^-s (bounded Zipf, any s > 0), by the inverse CDF of the
    continuous power law: numpy's own zipf needs s > 1 and is unbounded, and at s > 1 a stream
    of tens of millions of rows meets few distinct IDs."""
    u = rng.random(count)
    if abs(s - 1.0) < 1e-9:
        r = np.exp(u * np.log(universe))
    else:
        r = (u * (universe ** (1 - s) - 1) + 1) ** (1 / (1 - s))
    return np.clip(r.astype(np.int64), 1, universe)


_FREQ = np.linspace(0.5, 3.0, DIM, dtype=np.float64)


def vectors_of(ids: np.ndarray, epoch: int) -> np.ndarray:
    """The vector every write of an ID carries during ``epoch`` (so writer order does not matter)."""
    phase = (ids % 1_000_003).astype(np.float64)[:, None] * 1e-3 + epoch * 0.37
    return np.sin(phase * _FREQ[None, :] + _FREQ[None, :]).astype(np.float32)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat field 10): a fresh mmap per request
    buffer shows up here as about one fault per 4 KiB of payload."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc: under a shared machine, rows per
    CPU-second says what the server can do when it has a core, whatever else runs)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


@dataclass
class Run:
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, table bytes, rss, ids)
    acked_rows: int = 0
    requests: int = 0
    checks: list[tuple[float, int, int, float]] = field(default_factory=list)  # (t, found, exact, max abs err vs fp32)
    seen: np.ndarray | None = None
    distinct: int = 0  # distinct ranks sent so far (kept as writes are acknowledged)
    sample_errors: int = 0
    lag_refusals: int = 0  # updates the server refused for apply lag (503 apply_lag), each re-sent
    log_refusals: int = 0  # updates the log could not take in time (503 log_unavailable), each re-sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a small, 10-second run (the test's)")
    parser.add_argument("--seconds", type=float, default=180.0, help="stop after this long")
    parser.add_argument("--rows", type=int, default=10**10, help="... or after this many upserted rows")
    parser.add_argument("--distinct", type=int, default=None, help="... or once this many distinct IDs were sent (needs a --universe above it)")
    parser.add_argument("--universe", type=int, default=20_000_000, help="distinct IDs the Zipf stream draws from")
    parser.add_argument("--zipf", type=float, default=0.9, help="Zipf exponent of the ID ranks (bounded: any value > 0)")
    parser.add_argument("--max-ids", type=int, default=1_000_000)
    parser.add_argument("--admit-min-count", type=int, default=2)
    parser.add_argument("--half-life-rows", type=int, default=8_000_000)
    parser.add_argument("--sketch-width", type=int, default=1 << 21)
    parser.add_argument("--budget-mib", type=float, default=160.0, help="byte budget of the table (all its counted bytes)")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per update request")
    parser.add_argument("--policy", default="none", help="the table's dimension policy (none: it never re-decides; knapsack, scall, ...: it "
                        "re-decides every --segment-updates rows, and each re-decision rebuilds its hash index's static part)")
    parser.add_argument("--segment-updates", type=int, default=5_000_000, help="rows between re-decisions with a --policy (EMBSERVE_SEGMENT_UPDATES)")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--head", type=int, default=1000, help="hottest ranks checked at each checkpoint")
    parser.add_argument("--check-every", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the server's tables directory (update log, snapshots)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "streaming_scale.md")
    args = parser.parse_args()
    if args.fast:
        args.seconds, args.universe, args.max_ids, args.half_life_rows = min(args.seconds, 10.0), 200_000, 10_000, 50_000
        args.sketch_width, args.budget_mib, args.batch, args.head, args.check_every = 1 << 15, 4.0, 2000, 200, 4.0
    if args.distinct is not None and args.distinct > args.universe:
        parser.error(f"--distinct {args.distinct:,} can never be reached with --universe {args.universe:,}")
    budget = int(args.budget_mib * 2**20)
    work = Path(tempfile.mkdtemp(prefix="embserve-scale-"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        "EMBSERVE_TABLES_DIR": str(work / "tables"),
        "EMBSERVE_PORT": str(port),
        "EMBSERVE_SNAPSHOT_INTERVAL_S": "60" if not args.fast else "3",
        "EMBSERVE_LOG_LEVEL": "warning",
        "EMBSERVE_SEGMENT_UPDATES": str(args.segment_updates),
    }
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=120.0)
    run = Run(seen=np.zeros(args.universe + 1, dtype=bool))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
            time.sleep(0.1)
        r = client.post("/v1/admin/tables", json={
            "name": TABLE, "dim": DIM, "classes": [f"d{DIM}b8"], "budget_bytes": budget, "max_ids": args.max_ids,
            "admit_min_count": args.admit_min_count, "count_half_life_rows": args.half_life_rows, "count_sketch_width": args.sketch_width,
            "policy": {"name": args.policy},
        })
        assert r.status_code == 201, r.text
        started = time.monotonic()
        cpu_started, client_cpu_started = cpu_seconds(server.pid), time.process_time()
        faults_started = minor_faults(server.pid)
        stop = threading.Event()
        sampler_stop = threading.Event()

        def sampler() -> None:
            with httpx.Client(base_url=base, timeout=30.0) as c:
                while not sampler_stop.is_set():
                    try:
                        info = c.get(f"/v1/tables/{TABLE}").json()
                    except httpx.TransportError:  # a refused or slow connection under load: sample again
                        run.sample_errors += 1
                    else:
                        run.samples.append((time.monotonic() - started, int(info["bytes"]), rss_bytes(server.pid), int(info["ids"])))
                    sampler_stop.wait(0.5)

        epoch = [0]
        lock = threading.Lock()
        barrier = threading.Barrier(args.writers + 1, timeout=600)
        pause = threading.Event()
        done = threading.Event()

        def writer(k: int) -> None:
            rng = np.random.default_rng(100 + k)
            with httpx.Client(base_url=base, timeout=120.0) as c:
                while True:
                    if pause.is_set():
                        barrier.wait()  # checkpoint: the main thread checks the head
                        barrier.wait()
                        if done.is_set():  # set only between the two waits of the last checkpoint
                            return
                        continue
                    ranks = zipf_ranks(rng, args.zipf, args.universe, args.batch)
                    ids = ids_of(ranks)
                    body = encode_binary_updates(ids, vectors_of(ids, epoch[0]), np.zeros(0, dtype=np.int64))
                    resp = c.post(f"/v1/tables/{TABLE}/updates", content=body, headers={"Content-Type": BINARY})
                    while resp.status_code == 503 and ("apply_lag" in resp.text or "log_unavailable" in resp.text):
                        # the server's back-pressure (EMBSERVE_MAX_APPLY_LAG_S), or a log that could
                        # not take the write in time (SQLite's 30 s lock wait, e.g. behind a WAL
                        # checkpoint of gigabytes): nothing was acknowledged, so a writer waits as told
                        with lock:
                            if "apply_lag" in resp.text:
                                run.lag_refusals += 1
                            else:
                                run.log_refusals += 1
                        time.sleep(float(resp.headers.get("retry-after", "1")))
                        resp = c.post(f"/v1/tables/{TABLE}/updates", content=body, headers={"Content-Type": BINARY})
                    if resp.status_code != 200:
                        raise SystemExit(f"update failed: {resp.status_code} {resp.text[:300]}")
                    with lock:
                        run.acked_rows += int(ids.shape[0])
                        run.requests += 1
                        fresh = ranks[~run.seen[ranks]]  # type: ignore[index]
                        if fresh.size:
                            run.distinct += int(np.unique(fresh).size)
                            run.seen[fresh] = True  # type: ignore[index]
                        if run.acked_rows >= args.rows or (args.distinct is not None and run.distinct >= args.distinct):
                            stop.set()

        head_ids = ids_of(np.arange(1, args.head + 1))

        def write_head() -> None:
            """Every head ID carries the current epoch's vector from here on (the stream alone
            might not rewrite each of them before the next checkpoint)."""
            body = encode_binary_updates(head_ids, vectors_of(head_ids, epoch[0]), np.zeros(0, dtype=np.int64))
            r = client.post(f"/v1/tables/{TABLE}/updates", content=body, headers={"Content-Type": BINARY})
            assert r.status_code == 200, r.text

        def check_head() -> None:
            # the epoch's writes are all acknowledged; wait until they are applied, then look
            r = client.post(f"/v1/tables/{TABLE}/updates", json={"delete_ids": [-1]})
            assert r.status_code == 200, r.text
            target = tuple(int(x) for x in r.json()["position"].split("-"))
            give_up = time.monotonic() + 900
            while True:  # the applier may lag the acknowledged writes by more than wait=true waits
                position = client.get(f"/v1/tables/{TABLE}").json()["log_position"]
                if position and tuple(int(x) for x in position.split("-")) >= target:
                    break
                assert time.monotonic() < give_up, "the applier did not catch up in 15 minutes"
                time.sleep(0.2)
            ranks = np.arange(1, args.head + 1)
            ids = ids_of(ranks)
            res = client.post("/v1/lookup", json={"lookups": [{"table": TABLE, "ids": ids.tolist()}]}).json()["results"][0]
            got = np.asarray(res["embeddings"], dtype=np.float32)
            want = vectors_of(ids, epoch[0])
            stored = decode_rows(encode_rows(torch.from_numpy(want), RowClass(DIM, 8)), RowClass(DIM, 8)).numpy()
            found = np.asarray(res["found"])
            exact = int((found & (got == stored).all(axis=1)).sum())
            run.checks.append((time.monotonic() - started, int(found.sum()), exact, float(np.abs(got[found] - want[found]).max()) if found.any() else float("nan")))
            print(f"  t={run.checks[-1][0]:.0f}s head {args.head}: found {found.sum()}, exact to int8 {exact}", flush=True)

        for _ in range(max(1, args.admit_min_count)):  # past the admission count
            write_head()
        threads = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(args.writers)]
        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        for t in threads:
            t.start()
        next_check = started + args.check_every
        while not stop.is_set() and time.monotonic() - started < args.seconds:
            time.sleep(0.2)
            if time.monotonic() >= next_check:
                pause.set()
                barrier.wait()
                check_head()
                epoch[0] += 1
                write_head()
                pause.clear()
                barrier.wait()
                next_check = time.monotonic() + args.check_every
                elapsed = time.monotonic() - started
                print(f"t={elapsed:.0f}s acked {run.acked_rows:,} rows ({run.acked_rows / elapsed:,.0f}/s), {run.distinct:,} distinct IDs", flush=True)
        send_seconds = time.monotonic() - started
        stop.set()
        pause.set()
        barrier.wait()  # writers park at the checkpoint
        acked = run.acked_rows
        check_head()
        done.set()
        barrier.wait()  # ... and leave
        applied_seconds = time.monotonic() - started
        server_cpu, client_cpu = cpu_seconds(server.pid) - cpu_started, time.process_time() - client_cpu_started
        faults = minor_faults(server.pid) - faults_started
        sampler_stop.set()
        sampling.join(timeout=10)
        metrics = client.get("/metrics").text
        info = client.get(f"/v1/tables/{TABLE}").json()
    finally:
        client.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if not args.keep:  # the update log and snapshots of a long run are gigabytes
            shutil.rmtree(work, ignore_errors=True)

    def counter(name: str) -> float:
        m = re.search(rf'^{name}{{table="{TABLE}"}} ([0-9.e+]+)$', metrics, re.M)
        return float(m.group(1)) if m else 0.0

    evicted, filtered = counter("embserve_evicted_ids_total"), counter("embserve_updates_filtered_total")
    redecisions = counter("embserve_resize_events_total")
    share = env.get("EMBSERVE_REDECIDE_MAX_SHARE", "0.25 (default)")
    max_bytes = max(s[1] for s in run.samples)
    within = all(s[1] <= budget for s in run.samples)
    distinct = run.distinct
    head_ok = all(c[2] == args.head for c in run.checks)
    plot = args.out.with_suffix(".png")
    _plot(run, budget, plot, args)
    lines = [
        "# Streaming scale: an endless keyed ID stream into a bounded table",
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on a 2-core VM shared with other jobs "
        f"({'--fast' if args.fast else f'--seconds {args.seconds:.0f}'}{f' --distinct {args.distinct:,}' if args.distinct else ''}).  Real `embserve serve`, SQLite update log, snapshots every "
        f"{env['EMBSERVE_SNAPSHOT_INTERVAL_S']} s with log trimming.",
        f"Table: {DIM} dims, int8 rows (d{DIM}b8), hash index, max_ids {args.max_ids:,}, admission at {args.admit_min_count} upserts, "
        f"counts halving every {args.half_life_rows:,} rows (sketch 4 x {args.sketch_width:,}), budget {budget / 2**20:.0f} MiB, "
        f"policy {args.policy}" + (f" (re-decides every {args.segment_updates:,} rows, rebuilding the index's static part)." if args.policy != "none" else " (never re-decides)."),
        f"Stream: Zipf({args.zipf}) over {args.universe:,} ranks, {args.writers} writer threads, {args.batch:,} rows per binary update request.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| rows acknowledged (durably logged) | {acked:,} in {send_seconds:.0f} s = **{acked / send_seconds:,.0f} rows/s** |",
        f"| rows applied (visible to lookups) | {acked:,} by {applied_seconds:.0f} s = **{acked / applied_seconds:,.0f} rows/s** |",
        f"| server CPU time (all its threads) | {server_cpu:.0f} s for {acked:,} rows = **{acked / max(server_cpu, 1e-9):,.0f} rows per CPU-second** "
        f"(the load generator in the same 2-core VM used {client_cpu:.0f} s) |",
        f"| server minor page faults | {faults:,} = {faults / max(acked, 1):.3f} per row |",
        f"| distinct IDs sent | {distinct:,} of {args.universe:,} |",
        f"| IDs held at the end | {info['ids']:,} (max_ids {args.max_ids:,}); index {info['index_slots']:,} slots |",
        f"| evicted IDs | {evicted:,.0f} |",
        f"| filtered upserts (below the admission count) | {filtered:,.0f} |",
        f"| re-decisions by the policy | {redecisions:,.0f} (`EMBSERVE_REDECIDE_MAX_SHARE` {share}) |",
        f"| updates refused for apply lag (503 apply_lag, re-sent after Retry-After) | {run.lag_refusals:,} |",
        f"| updates the log could not take in time (503 log_unavailable, re-sent after Retry-After) | {run.log_refusals:,} |",
        f"| table bytes, largest of {len(run.samples)} samples | {max_bytes / 2**20:.1f} MiB of {budget / 2**20:.0f} MiB budget: {'within' if within else '**OVER**'} |",
        f"| table bytes at the end | {info['bytes'] / 2**20:.1f} MiB (index {info['index_bytes'] / 2**20:.1f}, rows {info['row_bytes'] / 2**20:.1f}, other {info['other_bytes'] / 2**20:.1f}) |",
        f"| samples that failed to connect (server busy) | {run.sample_errors} |",
        f"| server RSS, largest sample | {max(s[2] for s in run.samples) / 2**20:.0f} MiB (Python, torch, the traffic sketch, buffers included) |",
        f"| head ({args.head} hottest IDs) at {len(run.checks)} checkpoints | "
        f"{'all found and exact to int8 at every checkpoint' if head_ok else 'NOT all exact: ' + str(run.checks)} |",
        "",
        f"![memory vs time]({plot.name})",
        "",
    ]
    report = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    if not (within and head_ok):
        raise SystemExit(1)


def _plot(run: Run, budget: int, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] for s in run.samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, [s[1] / 2**20 for s in run.samples], label="table bytes (counted)")
    ax.plot(t, [s[2] / 2**20 for s in run.samples], label="server RSS", alpha=0.6)
    ax.axhline(budget / 2**20, color="red", linestyle="--", label="budget")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    ax2.plot(t, [s[3] for s in run.samples], color="gray", linestyle=":", label="IDs held")
    ax2.set_ylabel("IDs held")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.set_title(f"keyed table under a Zipf ID stream (max_ids {args.max_ids:,})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
