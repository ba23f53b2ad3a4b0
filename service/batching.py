"""Cross-request batching: concurrent lookups of one table are merged into one decode.

Why: on a GPU a lookup of 1,024 IDs is a few microseconds of kernel behind tens of
microseconds of launch, copies and syncs; sixteen requests that arrive together cost sixteen
times that overhead if served one by one, and one times it merged.  On a CPU a lookup has no
such fixed cost, so batching is off there by default.

How (``EMBSERVE_BATCH_WINDOW_US`` > 0): request threads (lookups run in the thread pool when
batching is on) join the table's open *group*.  The first one in leads: it waits until the
window has passed or the group holds ``EMBSERVE_MAX_BATCH_IDS`` IDs, closes the group, runs
one ``table.lookup`` over the concatenated IDs, and hands each member its rows; the others
wait for that.  A request that would overflow the open group starts the next one (and closes
the full one at once); a request over the limit by itself is a group of one.  The merged
lookup takes the table's lock once, so every member sees the same table state, whole.

On a CUDA table the IDs go up through a pinned host buffer with a non-blocking copy, and the
rows and locators come down the same way with one stream sync, so each member's result is a
view of host memory the response encoder reads directly.  The same path serves unbatched
lookups of a CUDA table.

Metrics: ``embserve_lookup_batch_ids`` (IDs per merged decode, per table; observed when
batching is on) and ``embserve_table_device_bytes`` (bytes a table holds on its device, per
table and device, computed at scrape time).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from compression import CompressedTable, LookupResult

from .registry import TableRegistry

# default window on a GPU when EMBSERVE_BATCH_WINDOW_US is not set (CPU: 0 = off)
DEFAULT_GPU_WINDOW_US = 200
_BATCH_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


def resolve_window_us(window_us: int | None, device: str) -> int:
    """The window in effect: the setting, or 0 on CPU / DEFAULT_GPU_WINDOW_US elsewhere."""
    if window_us is not None:
        return window_us
    return 0 if torch.device(device).type == "cpu" else DEFAULT_GPU_WINDOW_US


def device_lookup(table: CompressedTable, ids: np.ndarray) -> LookupResult:
    """One lookup whose result is on the host: unchanged on a CPU table; on a CUDA table the
    IDs go up and the rows come down through pinned buffers with non-blocking copies."""
    if table.device.type != "cuda":
        return table.lookup(torch.from_numpy(ids))
    host_ids = torch.empty(ids.shape[0], dtype=torch.int64, pin_memory=True)
    host_ids.numpy()[:] = ids
    result = table.lookup(host_ids.to(table.device, non_blocking=True))
    values = torch.empty(result.values.shape, dtype=result.values.dtype, pin_memory=True)
    locators = torch.empty(result.locators.shape, dtype=result.locators.dtype, pin_memory=True)
    values.copy_(result.values, non_blocking=True)
    locators.copy_(result.locators, non_blocking=True)
    torch.cuda.current_stream(table.device).synchronize()
    return LookupResult(values, locators, result.num_unknown)


@dataclass
class _Group:
    """One merged batch being collected for a table."""

    parts: list[np.ndarray] = field(default_factory=list)
    total: int = 0
    full: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    results: list[LookupResult] = field(default_factory=list)
    error: BaseException | None = None


class TableBatcher:
    """Merges the concurrent lookups of one table (see module docstring).  Holds no reference
    to the table (the caller passes it), so a dropped table's memory is not kept alive here."""

    def __init__(self, window_s: float, max_ids: int, histogram: Histogram | None = None) -> None:
        self.window_s = window_s
        self.max_ids = max_ids
        self.histogram = histogram
        self._lock = threading.Lock()
        self._open: _Group | None = None

    def lookup(self, table: CompressedTable, ids: np.ndarray) -> LookupResult:
        with self._lock:
            group = self._open
            if group is not None and group.total + ids.shape[0] > self.max_ids:
                group.full.set()  # no room: its leader flushes now, we start the next group
                self._open = group = None
            leader = group is None
            if group is None:
                group = self._open = _Group()
            member = len(group.parts)
            group.parts.append(ids)
            group.total += ids.shape[0]
            if group.total >= self.max_ids:
                group.full.set()
                self._open = None
        if leader:
            group.full.wait(self.window_s)
            with self._lock:
                if self._open is group:
                    self._open = None  # closed: later arrivals start a new group
            self._flush(table, group)
        else:
            group.done.wait()
        if group.error is not None:
            raise group.error
        return group.results[member]

    def _flush(self, table: CompressedTable, group: _Group) -> None:
        try:
            merged = group.parts[0] if len(group.parts) == 1 else np.concatenate(group.parts)
            if self.histogram is not None:
                self.histogram.observe(merged.shape[0])
            result = device_lookup(table, merged)
            values, locators = result.values, result.locators
            start = 0
            for part in group.parts:
                end = start + part.shape[0]
                loc = locators[start:end]
                unknown = result.num_unknown if len(group.parts) == 1 else int((loc < 0).sum())
                group.results.append(LookupResult(values[start:end], loc, unknown))
                start = end
        except BaseException as exc:  # noqa: BLE001 - every member must hear of it
            group.error = exc
        finally:
            group.done.set()


class LookupBatching:
    """The service's lookup entry point for unpooled lookups: merged per table when the window
    is on, through pinned buffers on CUDA, a plain ``table.lookup`` otherwise."""

    def __init__(self, window_us: int, max_ids: int, registry: CollectorRegistry) -> None:
        self.window_us = window_us
        self.max_ids = max_ids
        self.batch_ids = Histogram(
            "embserve_lookup_batch_ids", "IDs per merged decode under cross-request batching", ["table"],
            buckets=_BATCH_BUCKETS, registry=registry,
        )
        # per table object, weakly: a reloaded or dropped table's batcher goes with it
        self._batchers: weakref.WeakKeyDictionary[CompressedTable, TableBatcher] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.window_us > 0

    def lookup(self, name: str, table: CompressedTable, ids: np.ndarray) -> LookupResult:
        if not self.enabled:
            return device_lookup(table, ids)
        batcher = self._batchers.get(table)
        if batcher is None:
            with self._lock:
                batcher = self._batchers.get(table)
                if batcher is None:
                    batcher = self._batchers[table] = TableBatcher(self.window_us / 1e6, self.max_ids, self.batch_ids.labels(name))
        return batcher.lookup(table, ids)


def warm_up(tables: TableRegistry) -> list[str]:
    """Run one lookup, pooled sum and pooled mean on every GPU table, so the Triton kernels are
    compiled (seconds each on first use) before the server takes requests, not in the first
    requests' latency.  Returns the tables warmed."""
    warmed = []
    for name in tables.names():
        hosted = tables.get(name)
        if hosted is None or hosted.table.device.type == "cpu":
            continue
        ids, offsets = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        hosted.table.lookup(ids)
        hosted.table.lookup_bags(ids, offsets, "sum")
        hosted.table.lookup_bags(ids, offsets, "mean")
        warmed.append(name)
    return warmed


class DeviceBytesCollector(Collector):
    """``embserve_table_device_bytes``: what each table holds on its device (rows, index,
    codebooks, rotation, fallback), read from the live tables at scrape time."""

    def __init__(self, tables: TableRegistry) -> None:
        self.tables = tables

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("embserve_table_device_bytes", "Bytes a table holds on its device", labels=["table", "device"])
        for name in self.tables.names():
            hosted = self.tables.get(name)
            if hosted is None:
                continue
            table = hosted.table
            with table.lock:
                held = [t for t in table.held_tensors().values() if t.device == table.device]
                total = sum(t.numel() * t.element_size() for t in held)
            family.add_metric([name, str(table.device)], total)
        yield family

