"""Prometheus metrics.  Names follow Prometheus practice: ``embserve_`` prefix, base units,
``_total`` counters, and no IDs as labels (labels are table names, row classes, routes).

Request metrics are updated on the request path; table gauges (bytes, ratio, rows per class) are
computed when Prometheus scrapes, from the live tables, so they can never go stale."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .registry import TableRegistry

# "_created" timestamp series double the scrape size and no dashboard uses them
disable_created_metrics()

# Latency buckets from 50 us (a batch-1 lookup) to 10 s.
_LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class TableCollector(Collector):
    def __init__(self, tables: TableRegistry) -> None:
        self.tables = tables

    def collect(self) -> Iterator[Metric]:
        nbytes = GaugeMetricFamily("embserve_table_bytes", "Bytes a table holds: rows, index and metadata", labels=["table"])
        ids = GaugeMetricFamily("embserve_table_ids", "IDs a table holds a row for", labels=["table"])
        ratio = GaugeMetricFamily("embserve_table_compression_ratio", "fp32 bytes of the same rows / bytes held", labels=["table"])
        bpp = GaugeMetricFamily("embserve_table_bits_per_parameter", "Bits held per logical parameter (ID x dim)", labels=["table"])
        rows = GaugeMetricFamily("embserve_table_class_rows", "Rows stored in each row class", labels=["table", "row_class"])
        class_bytes = GaugeMetricFamily("embserve_table_class_bytes", "Slab bytes of each row class", labels=["table", "row_class"])
        index_bytes = GaugeMetricFamily("embserve_table_index_bytes", "Bytes of a table's ID index", labels=["table"])
        budget = GaugeMetricFamily("embserve_table_budget_bytes", "Byte budget of a table under a dimension policy", labels=["table"])
        over_budget = GaugeMetricFamily(
            "embserve_table_over_budget", "1 when the policy cannot fit the table's rows in its budget (served over it)", labels=["table"]
        )
        snapshot_age = GaugeMetricFamily("embserve_table_snapshot_age_seconds", "Seconds since the table's last snapshot", labels=["table"])
        index_slots = GaugeMetricFamily("embserve_table_index_slots", "Slots of a hash-indexed table's index (held IDs / slots = its load)", labels=["table"])
        max_ids = GaugeMetricFamily("embserve_table_max_ids", "Capacity of a keyed table in IDs (embserve_table_ids / this = occupancy)", labels=["table"])
        now = time.time()
        for name in self.tables.names():
            hosted = self.tables.get(name)
            if hosted is None:
                continue
            stats = hosted.table.stats()
            nbytes.add_metric([name], stats.nbytes)
            ids.add_metric([name], stats.num_ids)
            ratio.add_metric([name], stats.compression_ratio)
            bpp.add_metric([name], stats.bits_per_parameter)
            index_bytes.add_metric([name], stats.index_bytes)
            for cs in stats.classes:
                rows.add_metric([name, cs.row_class.label()], cs.rows)
                class_bytes.add_metric([name, cs.row_class.label()], cs.bytes)
            if hosted.budget_bytes is not None:
                budget.add_metric([name], hosted.budget_bytes)
                over_budget.add_metric([name], 0.0 if hosted.over_budget is None else 1.0)
            if hosted.snapshot_at is not None:
                snapshot_age.add_metric([name], now - hosted.snapshot_at)
            capacity = getattr(hosted.table.index, "capacity", None)
            if capacity is not None:
                index_slots.add_metric([name], capacity)
            lifecycle = hosted.table.lifecycle
            if lifecycle is not None and lifecycle.config.max_ids is not None:
                max_ids.add_metric([name], lifecycle.config.max_ids)
        yield from (nbytes, ids, ratio, bpp, rows, class_bytes, index_bytes, budget, over_budget, snapshot_age, index_slots, max_ids)


class LoopCounter:
    """One series of a counter, added to only on the event loop's thread: a plain float, no lock.

    Why: prometheus_client takes a lock per ``inc`` (three Python calls and a mutex), a few
    microseconds per batch-1 lookup (about 8% of its server CPU).  The series' prometheus child
    still exists and is what other threads add to; a scrape reports the two summed
    (:class:`LoopMergedCollector`), so the exposed value is the same as if every addition had
    gone to the child."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """One series of a histogram, observed only on the event loop's thread, without a lock
    (why: :class:`LoopCounter`).  ``counts[i]``: observations in bucket ``i`` alone (at most
    ``bounds[i]``, more than ``bounds[i - 1]``); made cumulative when scraped."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ascending, the last +Inf: every observation lands in one bucket
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, Prometheus' ``le`` (a value on a bound is in it)
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class LoopMergedCollector(Collector):
    """A Counter or Histogram as the registry exposes it: its own samples plus, per label set,
    what the event loop's thread added to that set's :class:`LoopCounter` / :class:`LoopHistogram`.

    Registered in the metric's place (same name, type, help, labels and order), so /metrics
    reads as before.  Loop-side series are created with their prometheus child (:meth:`series`),
    so a label set appears when it did before: at its first use.  Values are only ever added on
    either side, so a scrape never sees a counter go backwards; a scrape from another thread
    reads each loop-side value whole (the GIL), at worst one observation behind in ``_sum``, as
    prometheus_client's own histograms can be."""

    def __init__(self, metric: Counter | Histogram, labelnames: tuple[str, ...] = (), buckets: tuple[float, ...] = ()) -> None:
        self.metric = metric
        self.labelnames = labelnames
        # the histogram's bounds with +Inf, and each bound's ``le`` label as prometheus writes it
        self.bounds = (*buckets, float("inf")) if buckets else ()
        self._le_index = {floatToGoString(b): i for i, b in enumerate(self.bounds)}
        # label values -> loop-side series; only the loop thread adds keys, scrapes only get()
        self._series: dict[tuple[str, ...], LoopCounter | LoopHistogram] = {}

    def series(self, *labelvalues: str) -> Any:
        """The loop-side series of one label set (created with its prometheus child).  Only ever
        call it, and use what it returns, on one thread: the event loop's."""
        local = self._series.get(labelvalues)
        if local is None:
            if labelvalues:
                self.metric.labels(*labelvalues)  # the series exists from now on, as with labels() before
            local = LoopHistogram(self.bounds) if self.bounds else LoopCounter()
            self._series[labelvalues] = local
        return local

    def describe(self) -> Iterator[Metric]:
        return iter(self.metric.describe())

    def collect(self) -> Iterator[Metric]:
        for family in self.metric.collect():  # fresh objects per call: changed in place
            cumulative: dict[tuple[str, ...], tuple[list[int], float]] = {}
            samples = []
            for sample in family.samples:
                key = tuple(sample.labels[name] for name in self.labelnames)
                local = self._series.get(key)
                if local is None:
                    samples.append(sample)
                    continue
                if isinstance(local, LoopCounter):
                    add = local.value if sample.name.endswith("_total") else 0.0
                else:
                    counts_sum = cumulative.get(key)
                    if counts_sum is None:
                        # one snapshot per label set, so its buckets, count and sum agree
                        counts_sum = cumulative[key] = (list(accumulate(list(local.counts))), local.sum)
                    counts, total = counts_sum
                    if sample.name.endswith("_bucket"):
                        add = counts[self._le_index[sample.labels["le"]]]
                    elif sample.name.endswith("_count"):
                        add = counts[-1]
                    elif sample.name.endswith("_sum"):
                        add = total
                    else:
                        add = 0.0
                samples.append(sample._replace(value=sample.value + add) if add else sample)
            family.samples = samples
            yield family


class ServiceMetrics:
    """All metrics of one app instance, in their own registry (tests build many apps)."""

    def __init__(self, tables: TableRegistry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # metrics a lookup answered on the event loop updates (service/fasthttp.py): registered
        # through a LoopMergedCollector, which adds that thread's lock-free series when scraped
        self.loop_side: dict[Any, LoopMergedCollector] = {}  # keyed by the metric object
        self.http_requests = self._merged(Counter(
            "embserve_http_requests_total", "HTTP requests by route, method and status", ["route", "method", "status"], registry=None
        ), ("route", "method", "status"))
        self.http_errors = self._merged(Counter(
            "embserve_http_request_errors_total", "HTTP requests answered with 4xx or 5xx", ["route", "status"], registry=None
        ), ("route", "status"))
        self.http_latency = self._merged(Histogram(
            "embserve_http_request_duration_seconds", "HTTP request latency by route", ["route", "method"],
            buckets=_LATENCY_BUCKETS, registry=None,
        ), ("route", "method"), _LATENCY_BUCKETS)
        # gRPC (service/grpc_v2.py): its own names, since its codes are gRPC's, not HTTP statuses
        self.grpc_requests = Counter(
            "embserve_grpc_requests_total", "gRPC calls by method and status code", ["method", "code"], registry=self.registry
        )
        self.grpc_latency = Histogram(
            "embserve_grpc_request_duration_seconds", "gRPC call latency by method", ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.http_fast_path = self._merged(Counter(
            "embserve_http_fast_path_requests_total",
            "Lookups answered in the HTTP protocol, below ASGI (service/fasthttp.py); also counted in embserve_http_requests_total",
            registry=None,
        ))
        self.lookup_latency = self._merged(Histogram(
            "embserve_lookup_duration_seconds", "Time to look up and decode one table's IDs", ["table"],
            buckets=_LATENCY_BUCKETS, registry=None,
        ), ("table",), _LATENCY_BUCKETS)
        self.lookup_ids = self._merged(Counter("embserve_lookup_ids_total", "IDs looked up", ["table"], registry=None), ("table",))
        self.unknown_ids = self._merged(
            Counter("embserve_lookup_unknown_ids_total", "IDs looked up that the table does not hold", ["table"], registry=None), ("table",)
        )
        self.updates_applied = Counter("embserve_updates_applied_total", "Rows upserted or deleted by the applier", ["table", "op"], registry=self.registry)
        self.updates_rejected = Counter(
            "embserve_updates_rejected_total", "Log entries the applier skipped (malformed, unknown table, invalid)", ["reason"], registry=self.registry
        )
        self.updates_appended = Counter("embserve_updates_appended_total", "Update requests acknowledged (durably in the log)", ["table"], registry=self.registry)
        self.sketch_dropped = Counter(
            "embserve_sketch_dropped_lookups_total",
            "Lookups the frequency sketch did not count: its queue for an applier round was full (service/applier.py)",
            ["table"], registry=self.registry,
        )
        self.log_lag_entries = Gauge("embserve_update_log_lag_entries", "Log entries not applied yet", registry=self.registry)
        self.log_lag_seconds = Gauge("embserve_update_log_lag_seconds", "Age of the oldest unapplied log entry", registry=self.registry)
        self.log_gap = Gauge(
            "embserve_update_log_gap",
            "1 while this replica missed entries trimmed from the shared stream (held out of readiness until re-seeded), else 0",
            registry=self.registry,
        )
        self.evicted_ids = Counter(
            "embserve_evicted_ids_total", "IDs evicted from a keyed table at its max_ids (lowest decayed counts first)", ["table"], registry=self.registry
        )
        self.updates_filtered = Counter(
            "embserve_updates_filtered_total", "Upserted rows not stored: their ID is below the table's admission count", ["table"], registry=self.registry
        )
        self.resize_events = Counter("embserve_resize_events_total", "Class re-decisions by the dimension policy", ["table"], registry=self.registry)
        self.rows_moved = Counter("embserve_rows_moved_total", "Rows moved into a row class by re-decisions", ["table", "row_class"], registry=self.registry)
        self.redecision_seconds = Histogram(
            "embserve_redecision_seconds",
            "Wall time of a class re-decision (O(held IDs); segments are paced by EMBSERVE_REDECIDE_MAX_SHARE)",
            ["table"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        self.registry.register(TableCollector(tables))
        self._table_children: dict[str, tuple[Any, Any, Any]] = {}
        self._loop_table_children: dict[str, tuple[Any, Any, Any]] = {}

    def _merged(self, metric: Any, labelnames: tuple[str, ...] = (), buckets: tuple[float, ...] = ()) -> Any:
        """Register ``metric`` (built with ``registry=None``) behind a :class:`LoopMergedCollector`
        and return the metric itself: other threads use it as before."""
        collector = LoopMergedCollector(metric, labelnames, buckets)
        self.registry.register(collector)
        self.loop_side[metric] = collector
        return metric

    def loop_series(self, metric: Counter | Histogram, *labelvalues: str) -> Any:
        """The lock-free series of ``metric`` for ``labelvalues``, for the event loop's thread
        only (:class:`LoopCounter`, :class:`LoopHistogram`: ``inc`` / ``observe`` as a child)."""
        return self.loop_side[metric].series(*labelvalues)

    def loop_table_children(self, table: str) -> tuple[Any, Any, Any]:
        """:meth:`table_children` for the event loop's thread: lock-free series, same values."""
        children = self._loop_table_children.get(table)
        if children is None:
            children = self._loop_table_children[table] = (
                self.loop_series(self.lookup_latency, table), self.loop_series(self.lookup_ids, table), self.loop_series(self.unknown_ids, table)
            )
        return children

    def table_children(self, table: str) -> tuple[Any, Any, Any]:
        """``(lookup latency, IDs looked up, unknown IDs)`` children of one table, cached:
        ``labels()`` takes a lock and builds a key, microseconds a batch-1 request should not pay."""
        children = self._table_children.get(table)
        if children is None:
            children = self._table_children[table] = (
                self.lookup_latency.labels(table), self.lookup_ids.labels(table), self.unknown_ids.labels(table)
            )
        return children
