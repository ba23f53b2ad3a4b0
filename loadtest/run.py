"""Headless load test with a report: CSV from Locust, a markdown summary and a latency plot.

    python loadtest/run.py --seconds 60                  # starts `embserve demo` on a free port
    python loadtest/run.py --host http://127.0.0.1:8080  # an already running service
    python loadtest/run.py --fast --out /tmp/load        # smoke run: 20k-row demo, 3 s, 2 users

Bounded in time (``--seconds``) and, unless ``--allow-remote``, to loopback hosts: a load test
pointed at someone else's service by mistake should fail, not run.  Output in ``--out``:
``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv`` (Locust's own),
``summary.md`` and ``latency.png``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HERE = Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the demo service exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # polling a process that is starting
    raise TimeoutError(f"{base} not ready after {timeout:.0f} s")


def run_locust(host: str, seconds: int, users: int, spawn_rate: float, out: Path, writer: bool) -> int:
    classes = ["RankingUser"] + (["UpdateWriter"] if writer else [])
    cmd = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", host,
        "-u", str(users + (1 if writer else 0)), "-r", str(spawn_rate), "-t", f"{seconds}s", "--stop-timeout", "10",
        "--csv", str(out / "locust"), "--csv-full-history", "--only-summary", "--loglevel", "WARNING", *classes,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, env=env, timeout=seconds + 120).returncode


def read_stats(out: Path) -> list[dict[str, str]]:
    with open(out / "locust_stats.csv", newline="") as f:
        return list(csv.DictReader(f))


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "locust_stats_history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated" and r["50%"] not in ("N/A", "")]
    if not rows:
        return
    t0 = int(rows[0]["Timestamp"])
    t = [int(r["Timestamp"]) - t0 for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    for q in ("50%", "95%", "99%"):
        ax.plot(t, [float(r[q]) for r in rows], label=f"p{q.rstrip('%')}")
    ax2 = ax.twinx()
    ax2.plot(t, [float(r["Requests/s"]) for r in rows], color="gray", linestyle=":", label="requests/s")
    ax.set_xlabel("seconds")
    ax.set_ylabel("latency, ms (all requests)")
    ax2.set_ylabel("requests/s")
    ax.set_yscale("log")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title("embserve under locust: latency percentiles over time")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)


def summary(stats: list[dict[str, str]], args: argparse.Namespace, host: str, demo: bool) -> str:
    lines = [
        "# Load test: embserve under Locust" + (" (smoke mode: --fast, numbers mean nothing)" if args.fast else ""),
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.seconds} s, {args.users} ranking users"
        f"{' + 1 update writer' if args.writer else ''}, against {f'`embserve demo` ({args.demo_rows:,} x 64, 8x)' if demo else host}.",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}; Locust and the service share it.",
        "",
        "| request | requests | failures | req/s | IDs/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in stats:
        n = int(row["Request Count"])
        if n == 0:
            continue
        rps = float(row["Requests/s"])
        ids_per_s = rps * float(row["Average Content Size"])
        name = "**all**" if row["Name"] == "Aggregated" else row["Name"]
        lines.append(
            f"| {name} | {n:,} | {int(row['Failure Count']):,} | {rps:.1f} | {ids_per_s:,.0f} | {row['50%']} | {row['95%']} | {row['99%']} | "
            f"{float(row['Max Response Time']):.0f} |"
        )
    lines += ["", "IDs/s counts looked-up (or updated) IDs: Locust's response length is set to the IDs of each call.", "",
              "![latency over time](latency.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=None, help="service URL (default: start `embserve demo` here)")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=8.0)
    parser.add_argument("--no-writer", dest="writer", action="store_false", help="lookups only, no update writer")
    parser.add_argument("--table", default=None, help="load only this table (default: all)")
    parser.add_argument("--demo-dir", type=Path, default=Path("tables"), help="tables folder for the demo service")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    parser.add_argument("--demo-rows", type=int, default=1_000_000, help="IDs in the demo table it builds")
    parser.add_argument("--fast", action="store_true", help="smoke run: a 20k-row demo table, 3 s, 2 users (tests/test_benchmarks.py)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.fast:
        args.seconds, args.users, args.spawn_rate, args.demo_rows = 3, 2, 2.0, 20_000
    if not 1 <= args.seconds <= 3600:
        parser.error("--seconds must be within 1..3600")
    if args.table:
        os.environ["EMBSERVE_LOAD_TABLES"] = args.table
    args.out.mkdir(parents=True, exist_ok=True)

    demo: subprocess.Popen[bytes] | None = None
    host = args.host
    if host is None:
        port = free_port()
        host = f"http://127.0.0.1:{port}"
        demo = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "demo", "--tables-dir", str(args.demo_dir), "--port", str(port),
             "--rows", str(args.demo_rows)],
            cwd=HERE.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    elif urlsplit(host).hostname not in LOOPBACK and not args.allow_remote:
        parser.error(f"{host} is not a loopback address; pass --allow-remote to load-test it")
    try:
        wait_ready(host, demo, timeout=600)
        code = run_locust(host, args.seconds, args.users, args.spawn_rate, args.out, args.writer)
    finally:
        if demo is not None:
            demo.send_signal(signal.SIGTERM)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                demo.kill()
    stats = read_stats(args.out)
    plot(args.out)
    text = summary(stats, args, host, demo is not None)
    (args.out / "summary.md").write_text(text)
    print(text)
    sys.exit(code)


if __name__ == "__main__":
    main()
