"""Lock-free metric series for the event loop's thread (service/metrics.py): a scrape shows the
same names, types, label sets and values as if every update had gone through prometheus_client.

Two ServiceMetrics get the same updates: one all through prometheus children (the locked path
other threads use), the other split between its children and its loop-side series, in mixed
order.  Their exposition must agree sample for sample."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import LoopHistogram, ServiceMetrics
from service.registry import TableRegistry

# on bucket bounds (a value on a bound is in that bucket), between them, past the last, zero
LATENCIES = [5e-5, 4.9e-5, 1e-4, 1.01e-4, 0.0, 2.5e-3, 10.0, 11.0, 3e-4, 0.5]


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(metrics: ServiceMetrics) -> list[tuple[str, str, str]]:
    return [(f.name, f.type, f.documentation) for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())]


def update(metrics: ServiceMetrics, loop_side: bool) -> None:
    """One mixed request sequence; with ``loop_side``, every other update goes to the loop series."""
    for k, latency in enumerate(LATENCIES):
        use_loop = loop_side and k % 2 == 0
        route = ("/v1/lookup", "POST")
        status = "200" if k % 3 else "404"
        table = "a" if k % 4 else "b"
        if use_loop:
            metrics.loop_series(metrics.http_requests, *route, status).inc()
            metrics.loop_series(metrics.http_latency, *route).observe(latency)
            metrics.loop_series(metrics.http_fast_path).inc()
            latency_child, ids, unknown = metrics.loop_table_children(table)
        else:
            metrics.http_requests.labels(*route, status).inc()
            metrics.http_latency.labels(*route).observe(latency)
            metrics.http_fast_path.inc()
            latency_child, ids, unknown = metrics.table_children(table)
        latency_child.observe(latency)
        ids.inc(k + 1)
        if k % 5 == 0:
            unknown.inc(2)
        if status == "404":
            (metrics.loop_series(metrics.http_errors, "/v1/lookup", status) if use_loop else metrics.http_errors.labels("/v1/lookup", status)).inc()
    # a label set only the loop side ever used, and one only the locked side used
    if loop_side:
        metrics.loop_series(metrics.http_requests, "/v1/lookup", "POST", "413").inc()
    else:
        metrics.http_requests.labels("/v1/lookup", "POST", "413").inc()
    metrics.http_requests.labels("/healthz", "GET", "200").inc(3)


def test_loop_series_expose_what_prometheus_children_would() -> None:
    locked, mixed = ServiceMetrics(TableRegistry()), ServiceMetrics(TableRegistry())
    update(locked, loop_side=False)
    update(mixed, loop_side=True)
    assert families(mixed) == families(locked)  # same names, types, help, in the same order
    want, got = samples(locked), samples(mixed)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_sum"):
            assert got[key] == pytest.approx(value, rel=1e-12), key  # float sums, added in another order
        else:
            assert got[key] == value, key
    assert got[("embserve_http_fast_path_requests_total", ())] == len(LATENCIES)
    bucket = ("embserve_lookup_duration_seconds_bucket", (("le", "5e-05"), ("table", "a")))
    assert got[bucket] == want[bucket] > 0  # 5e-5 itself counted in le="5e-05"


def test_a_label_set_appears_at_its_first_use_as_before() -> None:
    metrics = ServiceMetrics(TableRegistry())
    assert not any("table=\"t\"" in line for line in generate_latest(metrics.registry).decode().splitlines())
    metrics.loop_table_children("t")
    text = generate_latest(metrics.registry).decode()
    assert 'embserve_lookup_ids_total{table="t"} 0.0' in text
    assert 'embserve_lookup_duration_seconds_count{table="t"} 0.0' in text


def test_loop_histogram_buckets_follow_prometheus_le() -> None:
    h = LoopHistogram((1.0, 2.0, float("inf")))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.sum == 8.0


def test_scrapes_from_another_thread_never_see_a_counter_go_back() -> None:
    """Loop-side and locked updates on two threads while a third scrapes: every scrape's value
    is at least the previous one's, and the last scrape sees every update."""
    metrics = ServiceMetrics(TableRegistry())
    loop_ids = metrics.loop_table_children("t")[1]
    locked_ids = metrics.table_children("t")[1]
    n = 20_000
    done = threading.Event()
    seen: list[float] = []

    def scrape() -> None:
        while not done.is_set():
            seen.append(samples(metrics)[("embserve_lookup_ids_total", (("table", "t"),))])

    def locked() -> None:
        for _ in range(n):
            locked_ids.inc()

    threads = [threading.Thread(target=scrape), threading.Thread(target=locked)]
    for t in threads:
        t.start()
    for _ in range(n):
        loop_ids.inc()
    threads[1].join()
    done.set()
    threads[0].join()
    assert all(b >= a for a, b in zip(seen, seen[1:], strict=False))
    assert samples(metrics)[("embserve_lookup_ids_total", (("table", "t"),))] == 2 * n
