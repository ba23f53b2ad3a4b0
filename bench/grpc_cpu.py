"""Server CPU per KServe v2 gRPC lookup against the binary HTTP lookup, per tree, interleaved.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py -q build_ext --inplace)
    python bench/grpc_cpu.py --tree /tmp/base                  # /tmp/base vs this tree -> stdout
    python bench/grpc_cpu.py --fast                            # this tree alone, seconds (the suite runs it)

One real ``embserve serve`` process per tree (``PYTHONPATH`` = the tree) with
``EMBSERVE_GRPC_PORT`` set, all holding the same table.  Two paths per server: ModelInfer through
an unmodified ``tritonclient.grpc`` client asking for the ``embeddings`` output (as
bench/service.py's gRPC row does), and the binary ``POST /v1/lookup`` through
``service.client.EmbeddingClient``.  ``--concurrency`` client threads call one (server, path)
at a time for ``--seconds``, round-robin over all of them for ``--rounds`` rounds, start rotated
(bench/interleave.py).  A server's CPU per request is the rise of its threads' run time
(``/proc/<pid>/task/*/schedstat``) over the cell divided by the cell's requests; the context
switches and syscalls per request come from ``/proc/<pid>/task/*/status`` and ``/proc/<pid>/io``.

A third kind of server runs in the same rounds: ``bench/noop_grpc.py``, grpc.aio answering
ModelInfer with a prebuilt answer of the same size (the ``gRPC floor``): what grpcio itself costs
per call here, below which no handler can go.

Reported per batch size: every cell's median (min..max), each tree's gRPC / HTTP server CPU
ratio (same server, same round: the number that survives a noisy machine), its gRPC / the gRPC
floor, and each tree's gRPC server CPU against the first tree's, as medians of same-round
ratios with their spread.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_BENCH = str(Path(__file__).resolve().parent)
ROOT = Path(_BENCH).parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p not in (_BENCH, "")] + [_BENCH]

from compression import compress, save_table  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402
from service.client import EmbeddingClient  # noqa: E402
from interleave import MIN_ROUNDS, NOISE_NOTE, Spread, ratio, run_rounds  # noqa: E402
from streaming import free_port, stop, wait_http  # noqa: E402


def _service_bench() -> object:
    """bench/service.py as a module (its name is the ``service`` package's): its closed loop,
    CPU reader and gRPC caller, so both benchmarks time the same thing."""
    spec = importlib.util.spec_from_file_location("bench_service", Path(_BENCH) / "service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_service"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SB = _service_bench()
FLOOR = "gRPC floor (noop_grpc.py)"


def counters(pid: int) -> np.ndarray:
    """(context switches, read syscalls, write syscalls) of a process so far, all threads."""
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
        except OSError:
            continue  # a thread that ended meanwhile
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return np.array([switches, int(io["syscr"]), int(io["syscw"])], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=[], help="another checkout to compare (built in place), first; repeatable")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batches", default="1,64,1024")
    parser.add_argument("--seconds", type=float, default=1.0, help="closed-loop seconds per cell and round")
    parser.add_argument("--rounds", type=int, default=5, help=f"interleaved rounds (at least {MIN_ROUNDS})")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--fast", "--quick", dest="fast", action="store_true", help="smoke run: 5k rows, batch 1 and 64, 0.1 s cells")
    args = parser.parse_args()
    if args.fast:
        args.rows, args.batches, args.seconds, args.rounds = 5000, "1,64", 0.1, MIN_ROUNDS
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}: a spread needs rounds")
    batch_sizes = [int(b) for b in args.batches.split(",")]
    trees = [Path(t).resolve() for t in args.tree] + [ROOT]
    labels = {tree: ("this tree" if tree == ROOT else str(tree)) for tree in trees}
    freqs = zipf_frequencies(args.rows, seed=0)
    table, _ = compress(synthetic_table(args.rows, 64, freqs, seed=0), freqs, ratio=8)
    batches = {b: [sample_ids(freqs, b, seed=1000 * b + k).numpy() for k in range(64)] for b in batch_sizes}

    with tempfile.TemporaryDirectory() as tmp:
        servers: list[tuple[Path, subprocess.Popen[bytes], str, str]] = []
        floor_proc: list[subprocess.Popen[bytes]] = []
        clients: list[EmbeddingClient] = []
        try:
            for k, tree in enumerate(trees):
                folder = Path(tmp) / f"tables-{k}"  # each server its own folder: its own update log
                folder.mkdir()
                save_table(table, folder / "demo.safetensors")
                port, grpc_port = free_port(), free_port()
                env = {**os.environ, "EMBSERVE_TABLES_DIR": str(folder), "EMBSERVE_PORT": str(port), "EMBSERVE_GRPC_PORT": str(grpc_port),
                       "EMBSERVE_LOG_LEVEL": "warning", "EMBSERVE_SNAPSHOT_INTERVAL_S": "86400", "PYTHONPATH": str(tree)}
                proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=str(tree),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                servers.append((tree, proc, f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"))
            floor_port = free_port()
            floor = subprocess.Popen([sys.executable, str(Path(_BENCH) / "noop_grpc.py"), str(floor_port), "64"], stdout=subprocess.PIPE)
            floor_proc.append(floor)
            assert floor.stdout is not None and floor.stdout.readline().strip() == b"ready", "the gRPC floor server did not start"
            calls: dict[tuple[str, str], tuple[Callable[[np.ndarray], object], int]] = {}
            for tree, proc, base, address in servers:
                wait_http(f"{base}/readyz", proc)
                http = EmbeddingClient(base)
                clients.append(http)
                grpc_call = SB.grpc_fetcher(address)  # type: ignore[attr-defined]
                probe = batches[batch_sizes[-1]][0]
                np.testing.assert_array_equal(grpc_call(probe), http.lookup("demo", probe).values)  # the same rows both ways
                calls[(labels[tree], "gRPC")] = (grpc_call, proc.pid)
                calls[(labels[tree], "HTTP")] = (lambda ids, http=http: http.lookup("demo", ids), proc.pid)
            calls[(FLOOR, "gRPC")] = (SB.grpc_fetcher(f"127.0.0.1:{floor_port}"), floor.pid)  # type: ignore[attr-defined]

            results: dict[tuple[int, str, str], list[tuple[float, float, np.ndarray]]] = {}
            for batch in batch_sizes:
                measures = {}
                for key, (call, pid) in calls.items():
                    for ids in batches[batch][:8]:
                        call(ids)  # warm connections and plans
                    sink = results[(batch, *key)] = []

                    def measure(call: Callable[[np.ndarray], object] = call, pid: int = pid, sink: list = sink) -> float:  # type: ignore[type-arg]
                        cpu, seen = SB.cpu_seconds(pid), counters(pid)  # type: ignore[attr-defined]
                        n, elapsed, _ = SB.closed_loop(call, batches[batch], args.concurrency, args.seconds)  # type: ignore[attr-defined]
                        n = max(n, 1)
                        sink.append(((SB.cpu_seconds(pid) - cpu) / n * 1e6, n / elapsed, (counters(pid) - seen) / n))  # type: ignore[attr-defined]
                        return n / elapsed

                    measures[key] = measure
                run_rounds(measures, args.rounds)
        finally:
            for client in clients:
                client.close()
            stop(*(proc for _, proc, _, _ in servers), *floor_proc, timeout=30)

    print(f"# gRPC vs binary HTTP server CPU{' (smoke mode: --fast, numbers mean nothing)' if args.fast else ''}\n")
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {SB.machine()}; {args.rows:,} x 64 table compressed 8x; "  # type: ignore[attr-defined]
          f"{args.concurrency} client threads, {args.seconds:g} s cells, {args.rounds} interleaved rounds.\n")
    print(NOISE_NOTE + "\n")
    print("| tree | path | batch | requests/s | server CPU us/req (min..max) | context switches/req | read, write syscalls/req |")
    print("|---|---|---|---|---|---|---|")
    for (batch, label, path), cells in results.items():
        cpu = Spread.of([c[0] for c in cells])
        rates = statistics.median(c[1] for c in cells)
        per = np.median(np.stack([c[2] for c in cells]), axis=0)
        print(f"| {label} | {path} | {batch} | {rates:,.0f} | {cpu.fmt(0, '')} | {per[0]:.1f} | {per[1]:.1f}, {per[2]:.1f} |")
    print("\nSame-round ratios of server CPU per request (median, min..max):\n")
    for batch in batch_sizes:
        first = [c[0] for c in results[(batch, labels[trees[0]], "gRPC")]]
        floor_cpu = [c[0] for c in results[(batch, FLOOR, "gRPC")]]
        for tree in trees:
            grpc_cpu = [c[0] for c in results[(batch, labels[tree], "gRPC")]]
            line = (f"- batch {batch}, {labels[tree]}: gRPC / HTTP {ratio(grpc_cpu, [c[0] for c in results[(batch, labels[tree], 'HTTP')]]).fmt()}; "
                    f"gRPC / the gRPC floor {ratio(grpc_cpu, floor_cpu).fmt()}")
            if tree != trees[0]:
                line += f"; gRPC / {labels[trees[0]]}'s gRPC {ratio(grpc_cpu, first).fmt()}"
            print(line)


if __name__ == "__main__":
    main()
