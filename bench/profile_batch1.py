"""Where a batch-1 binary lookup spends the server's CPU: py-spy samples a real `embserve serve`
process while client threads send batch-1 binary lookups, and the samples are summarized.

    python bench/profile_batch1.py --label before --out bench/results/profile_batch1.md
    python bench/profile_batch1.py --label after --append --out bench/results/profile_batch1.md

The summary has two tables: *inclusive* time of the frames that matter (a frame's share of all
samples of the serving thread, with everything it calls), and *self* time of the hottest leaf
functions.  Sampling is py-spy's (``--native`` off: C frames are folded into their Python
caller), so a C function's time shows under the Python line that called it.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [str(Path(_BENCH).parent)] + [p for p in sys.path if p not in (_BENCH, "")] + [_BENCH]

from compression import compress, save_table  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402
from service.client import EmbeddingClient  # noqa: E402
from streaming import free_port, stop, wait_http  # noqa: E402


def _frame_name(frame: str) -> str:
    """py-spy raw frames look like ``func (path/to/file.py:123)``; keep ``func (file.py)``."""
    func, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{func} ({file})" if file else func


# frames every sample of the serving thread passes through (process start-up, CLI, event loop
# runner): they say nothing about where a request's time goes, so the inclusive table skips them
_SCAFFOLD_FILES = {"core.py", "main.py", "_compat.py", "runners.py", "server.py", "<frozen runpy>", "cli.py", "serving.py",
                   "base_events.py", "events.py", "threading.py"}


def summarize(raw: Path, top: int = 18) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, inclusive shares, self shares) of the stacks in py-spy's collapsed ``raw`` output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    for name in list(inclusive):
        if name.rsplit(" (", 1)[-1].rstrip(")") in _SCAFFOLD_FILES:
            del inclusive[name]
    share = lambda c: [(name, n / total) for name, n in c.most_common(top)]  # noqa: E731
    return total, share(inclusive), share(own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="client threads sending batch-1 lookups")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--label", default="now")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "profile_batch1.md")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    freqs = zipf_frequencies(args.rows)
    table, _ = compress(synthetic_table(args.rows, 64, freqs), freqs, ratio=8)
    batches = [sample_ids(freqs, 1, seed=k).numpy() for k in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tables").mkdir()
        save_table(table, Path(tmp) / "tables" / "demo.safetensors")
        port = free_port()
        env = {**os.environ, "EMBSERVE_TABLES_DIR": str(Path(tmp) / "tables"), "EMBSERVE_PORT": str(port), "EMBSERVE_LOG_LEVEL": "warning"}
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/readyz", server)
            client = EmbeddingClient(base)
            done = threading.Event()
            sent = [0] * args.threads

            def load(k: int) -> None:
                while not done.is_set():
                    client.lookup("demo", batches[sent[k] % len(batches)])
                    sent[k] += 1

            threads = [threading.Thread(target=load, args=(k,)) for k in range(args.threads)]
            for t in threads:
                t.start()
            raw = Path(tmp) / "profile.txt"
            started = time.perf_counter()
            subprocess.run([pyspy, "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)), "--rate", "500",
                            "--format", "raw", "--output", str(raw), "--nonblocking"], check=True, capture_output=True)
            done.set()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            client.close()
            samples, inclusive, own = summarize(raw)
        finally:
            stop(server, timeout=30)
    lines = [
        f"## {args.label}: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"`py-spy record --rate 500` on `embserve serve` for {args.seconds:g} s while {args.threads} client threads sent "
        f"batch-1 binary lookups ({sum(sent) / elapsed:,.0f} requests/s); {samples:,} samples of the server's threads "
        "(py-spy skips idle threads; the event loop's own C code - epoll, socket reads - shows as `Runner.run`). "
        "A C function's time is charged to the Python line that called it: `RequestResponseCycle.send` is uvicorn "
        "writing the response (header and body: two socket writes) plus its own header handling.",
        "",
        "| frame (inclusive) | share of samples |",
        "|---|---|",
        *[f"| `{name}` | {share:.1%} |" for name, share in inclusive],
        "",
        "| leaf function (self) | share of samples |",
        "|---|---|",
        *[f"| `{name}` | {share:.1%} |" for name, share in own],
        "",
    ]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        args.out.write_text(args.out.read_text() + "\n" + text)
    else:
        header = ("# Profile of a batch-1 binary lookup in the server\n\n"
                  "Produced by `bench/profile_batch1.py` (py-spy sampling a real server process under batch-1 load).\n\n")
        args.out.write_text(header + text)
    print(text)


if __name__ == "__main__":
    main()
