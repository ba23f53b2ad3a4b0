"""How long lookups wait while a served table re-decides its classes, one run.

    python bench/redecide_stall.py                 # 1M keyed IDs x 64 -> bench/results/redecide_stall.md
    python bench/redecide_stall.py --ids 100000 --out /tmp/r.md

A re-decision (service/applier.py) reads every held ID, decides classes, moves the rows whose
class changed, compacts the slabs and rebuilds the hash index: O(IDs), seconds at 1M.  A lookup
of the same table in the meantime waits for whatever part of that holds the table's lock.  This
runs the applier's own ``redecide`` (its thread not started) on a keyed table while another
thread looks up batches of 4096 IDs back to back, and reports the lookups' latencies during the
re-decision, for three budgets: one that moves no row, and two that move rows down a class; then
the same while the applier applies 50 log entries of 10,000 rows (half of them new IDs), the
same again with the table at its ``max_ids`` (each entry's new IDs evict as many held ones), and
during a snapshot of the table (``Applier.snapshot``: its copy and the file write).  The
table's lock is wrapped (``HoldTimer``), so the report also gives the longest time the
re-decision's thread held it and the calls that took it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression import CompressedTable, RowClass  # noqa: E402
from compression.lifecycle import IdLifecycle, LifecycleConfig  # noqa: E402
from compression.synthetic import zipf_frequencies  # noqa: E402
from service.applier import Applier  # noqa: E402
from service.metrics import ServiceMetrics  # noqa: E402
from service.registry import TableRegistry, policy_from_config  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.updatelog.base import LogRecord  # noqa: E402
from service.updatelog.entry import UpdateBatch  # noqa: E402
from service.updatelog.sqlite_log import SqliteUpdateLog  # noqa: E402


class HoldTimer:
    """The table's lock, wrapped: how long the re-decision's thread (this one) holds it each
    time, and where it took it (the calling functions), so a long wait names its cause."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.owner = threading.get_ident()
        self.holds: list[tuple[float, str]] = []
        self._open: list[tuple[float, str]] = []

    def __enter__(self) -> "HoldTimer":
        self.inner.__enter__()
        if threading.get_ident() == self.owner:
            where = " < ".join(f.name for f in traceback.extract_stack(limit=4)[:-1][::-1])
            self._open.append((time.perf_counter(), where))
        return self

    def __exit__(self, *exc: object) -> Any:
        if threading.get_ident() == self.owner:
            started, where = self._open.pop()
            if not self._open:  # the outermost hold of a re-entrant lock
                self.holds.append((time.perf_counter() - started, where))
        return self.inner.__exit__(*exc)


ENTRIES, ENTRY_ROWS = 50, 10_000  # the log-entry case: bench/streaming_scale.py's request size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--label", default="this tree", help="what the run measures (a revision), for the report")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "redecide_stall.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, d = args.ids, args.dim
    tmp = Path(tempfile.mkdtemp())
    settings = Settings(tables_dir=tmp / "tables", segment_updates=10**9, segment_seconds=3600, snapshot_interval_s=3600)
    registry = TableRegistry(sketch_width=1 << 20)
    table = CompressedTable.empty(d, [RowClass(d, 16), RowClass(d, 8), RowClass(d, 4), RowClass(d, 2)], keyed=True)
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(1)) * 7919 + 3
    g = torch.Generator().manual_seed(3)
    for start in range(0, n, 100_000):  # streamed in: the rows arrive in class int4
        part = keys[start : start + 100_000]
        table.put(part, torch.randn(part.numel(), d, generator=g), 2)
    timer = HoldTimer(table.lock)
    table.lock = timer  # type: ignore[assignment] - same protocol (with-statement)
    hosted = registry.add("t", table)
    hosted.policy = policy_from_config({"name": "knapsack"})
    applier = Applier(SqliteUpdateLog(tmp / "log.sqlite3"), registry, ServiceMetrics(registry), settings)
    if hosted.sketch is not None:  # Zipf traffic: the policy has frequencies to go by
        hosted.sketch.add(keys[torch.multinomial(zipf_frequencies(n), 200_000, replacement=True, generator=g)], 1.0)
    rows = []
    rng = np.random.default_rng(4)
    entries: dict[str, list[UpdateBatch]] = {"entries": [], "evicting": []}
    for case, new_ids in (("entries", (2**40, 2**41)), ("evicting", (2**41, 2**42))):
        for k in range(ENTRIES):  # half held IDs (rows rewritten), half new ones
            held = keys.numpy()[rng.integers(0, n, ENTRY_ROWS // 2)]
            fresh = rng.integers(*new_ids, ENTRY_ROWS - ENTRY_ROWS // 2)
            entries[case].append(UpdateBatch("t", np.concatenate([held, fresh]).astype(np.int64),
                                              rng.standard_normal((ENTRY_ROWS, d)).astype(np.float32), np.empty(0, dtype=np.int64)))
    cases: tuple[tuple[str, float | str], ...] = (
        ("budget 1.2x the table", 1.2), ("budget 0.9x", 0.9), ("budget 0.85x", 0.85),
        (f"{ENTRIES} log entries of {ENTRY_ROWS:,} rows", "entries"),
        (f"the same at `max_ids` (each evicts {ENTRY_ROWS // 2:,})", "evicting"), ("snapshot (no re-decision)", "snapshot"),
    )
    for label, fraction in cases:
        if isinstance(fraction, float):
            hosted.budget_bytes = int(table.nbytes * fraction)
        if fraction == "evicting":  # the table stops where it is: new IDs evict the coldest held ones
            table.lifecycle = IdLifecycle(LifecycleConfig(max_ids=table.index.num_ids))
        hosted.dirty = True
        calls: list[tuple[float, float]] = []
        stop = threading.Event()

        def looker() -> None:
            gen = torch.Generator().manual_seed(2)
            while not stop.is_set():
                ids = keys[torch.randint(0, n, (4096,), generator=gen)]
                started = time.perf_counter()
                table.lookup(ids)
                calls.append((started, time.perf_counter()))

        timer.holds.clear()
        thread = threading.Thread(target=looker)
        thread.start()
        time.sleep(0.3)  # the lookups are running (a bench, not a test: no ordering to prove)
        window = (time.perf_counter(), 0.0)
        try:
            result: dict[str, Any] = {"moved": {}}
            if fraction == "snapshot":
                applier.snapshot(hosted)  # the table's copy and its file write
            elif isinstance(fraction, str):
                segment = 1 + list(entries).index(fraction)  # positions past the last case's: not skipped as applied
                for k, batch in enumerate(entries[fraction]):  # what the applier's thread does with each log entry
                    applier._apply_one(LogRecord((segment, k + 1), 0.0, batch))  # noqa: SLF001
            else:
                result = applier.redecide(hosted)
            window = (window[0], time.perf_counter())
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join()
        during = sorted(e - s for s, e in calls if e > window[0] and s < window[1])  # overlapped the re-decision
        moved = sum(result["moved"].values())
        hold, where = max(timer.holds, default=(0.0, ""))
        held = f"{hold * 1e3:.1f} ms in `{where}`" if where else "not taken"
        rows.append(
            f"| {label} | {window[1] - window[0]:.2f} s | {moved:,} | {len(during)} | {during[len(during) // 2] * 1e3:.1f} ms | "
            f"{during[int(len(during) * 0.99)] * 1e3:.1f} ms | **{during[-1] * 1e3:.0f} ms** | {held} |"
        )
        print(rows[-1], flush=True)
    lines = [
        "# Lookups during a re-decision, log entries or a snapshot",
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {args.label}; {platform.processor() or platform.machine()}, "
        f"2-core VM shared with other jobs, Python {platform.python_version()}, torch {torch.__version__}.",
        f"Table: {n:,} keyed IDs x {d}, classes fp16/int8/int4/int2, streamed in as int4; policy knapsack; "
        "the applier's `redecide` on this thread, batches of 4096 IDs looked up back to back on another.",
        "",
        "| re-decision | took | rows moved | lookups during it | p50 | p99 | longest | longest hold of the table's lock by the re-decision's thread |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
