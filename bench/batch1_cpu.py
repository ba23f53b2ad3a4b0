"""Server CPU per batch-1 binary lookup, of this tree against other checkouts, interleaved.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py -q build_ext --inplace)
    python bench/batch1_cpu.py --tree /tmp/base                # this tree vs /tmp/base -> stdout
    python bench/batch1_cpu.py --fast                          # this tree alone, seconds (the suite runs it)

One real ``embserve serve`` process per tree (``PYTHONPATH`` = the tree), all holding the same
table; client threads (``http.client``, one kept-alive connection each) send batch-1 binary
lookups to one server at a time, round-robin over the servers for ``--rounds`` rounds with the
start rotated.  A server's CPU per request is the rise of its ``/proc/<pid>/stat`` user+system
time over a round divided by the round's requests: what the request path costs the server,
whatever the client and the kernel's scheduling cost.  Reported: each tree's median (min..max)
and its ratio to the first tree, as the median of same-round ratios with their spread.

Why a separate probe: ``bench/service.py`` measures the same number among many others, in runs
of minutes; a change to the request path is judged faster here, against its own baseline tree.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

_BENCH = str(Path(__file__).resolve().parent)
ROOT = Path(_BENCH).parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p not in (_BENCH, "")] + [_BENCH]

from compression import compress, save_table  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402
from service.wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE, ParsedLookup, encode_binary_request  # noqa: E402
from streaming import free_port, stop, wait_http  # noqa: E402


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send(port: int, bodies: list[bytes], per_thread: int, threads: int) -> None:
    """``threads`` clients, each sending ``per_thread`` lookups back to back on one connection."""
    headers = {"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}
    failures: list[str] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        try:
            for i in range(per_thread):
                conn.request("POST", "/v1/lookup", body=bodies[(k * 7919 + i) % len(bodies)], headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"HTTP {response.status}")
                    return
        finally:
            conn.close()

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        raise RuntimeError(f"a lookup failed: {failures[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="another checkout to compare (built in place); repeatable")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--requests", type=int, default=5000, help="requests per server and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", "--quick", action="store_true", help="smoke run: 5k rows, 5 rounds of 200 requests")
    args = parser.parse_args()
    if args.fast:
        args.rows, args.rounds, args.requests = 5000, 5, 200
    trees = [Path(t).resolve() for t in args.tree] + [ROOT]
    freqs = zipf_frequencies(args.rows)
    table, _ = compress(synthetic_table(args.rows, 64, freqs), freqs, ratio=8)
    bodies = [encode_binary_request([ParsedLookup("demo", sample_ids(freqs, 1, seed=k).numpy().astype(np.int64), None, "none")])
              for k in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        servers: list[tuple[Path, subprocess.Popen[bytes], int]] = []
        try:
            for k, tree in enumerate(trees):
                folder = Path(tmp) / f"tables-{k}"  # each server its own folder: its own update log
                folder.mkdir()
                save_table(table, folder / "demo.safetensors")
                port = free_port()
                env = {**os.environ, "EMBSERVE_TABLES_DIR": str(folder), "EMBSERVE_PORT": str(port), "EMBSERVE_LOG_LEVEL": "warning",
                       "PYTHONPATH": str(tree)}
                proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=str(tree),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                servers.append((tree, proc, port))
                wait_http(f"http://127.0.0.1:{port}/readyz", proc)
                send(port, bodies, max(50, args.requests // 10), args.threads)  # warm-up
            per_thread = max(1, args.requests // args.threads)
            cpu: dict[Path, list[float]] = {tree: [] for tree in trees}
            for r in range(args.rounds):
                order = servers[r % len(servers):] + servers[: r % len(servers)]
                for tree, proc, port in order:
                    before = process_cpu_seconds(proc.pid)
                    send(port, bodies, per_thread, args.threads)
                    cpu[tree].append((process_cpu_seconds(proc.pid) - before) / (per_thread * args.threads) * 1e6)
        finally:
            stop(*(proc for _, proc, _ in servers), timeout=30)
    base = cpu[trees[0]]
    print(f"server CPU per batch-1 binary lookup, {args.rounds} interleaved rounds of {per_thread * args.threads} requests "
          f"({args.threads} client threads), {args.rows:,} x 64 table")
    for tree, values in cpu.items():
        ratios = [a / b for a, b in zip(values, base, strict=True) if b]
        label = "this tree" if tree == ROOT else str(tree)
        versus = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})" if ratios else "n/a (no CPU tick)"
        print(f"- {label}: {statistics.median(values):.0f} us ({min(values):.0f}..{max(values):.0f}); / first: {versus}")


if __name__ == "__main__":
    main()
