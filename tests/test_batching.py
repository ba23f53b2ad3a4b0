"""Cross-request batching (service/batching.py): concurrent lookups of one table merged into one
decode give exactly what each lookup alone gives, in-process and through a real server."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from compression import compress, load_table, save_table
from compression.synthetic import synthetic_table, zipf_frequencies
from service.batching import LookupBatching, resolve_window_us
from service.client import EmbeddingClient

from tests.test_e2e import serving


@pytest.fixture(scope="module")
def table_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("batch_tables")
    freqs = zipf_frequencies(5_000, seed=9)
    table, _ = compress(synthetic_table(5_000, 32, freqs, seed=9), freqs, ratio=8, unknown="default")
    save_table(table, folder / "items.safetensors")
    return folder


def _requests(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-10, 5_200, int(rng.integers(1, 300))).astype(np.int64) for _ in range(count)]


def assert_same(got: torch.Tensor, want: torch.Tensor, table) -> None:  # type: ignore[no-untyped-def]
    """Bit for bit where decoding is row by row (C and Triton kernels, or no rotation); the torch
    reference rotates with a matmul whose rounding depends on the batch's size."""
    if table.decoder.path != "torch" or table.rotation is None:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name, {"table": "items"})
    return 0.0 if value is None else value


def test_concurrent_lookups_merge_into_one_decode(table_file: Path) -> None:
    table, _ = load_table(table_file / "items.safetensors")
    parts = _requests(12, seed=1)
    registry = CollectorRegistry()
    # the group is full exactly when all 12 have joined: it flushes then, not on a timer
    batching = LookupBatching(window_us=10_000_000, max_ids=sum(p.shape[0] for p in parts), registry=registry)
    start = threading.Barrier(len(parts))

    def one(ids: np.ndarray):  # type: ignore[no-untyped-def]
        start.wait()
        return batching.lookup("items", table, ids)

    with ThreadPoolExecutor(len(parts)) as pool:
        results = list(pool.map(one, parts))
    for ids, got in zip(parts, results, strict=True):
        want = table.lookup(torch.from_numpy(ids))
        assert_same(got.values, want.values, table)
        assert torch.equal(got.locators, want.locators)
        assert got.num_unknown == want.num_unknown
    assert _sample(registry, "embserve_lookup_batch_ids_count") == 1
    assert _sample(registry, "embserve_lookup_batch_ids_sum") == sum(p.shape[0] for p in parts)


def test_groups_respect_the_id_limit(table_file: Path) -> None:
    table, _ = load_table(table_file / "items.safetensors")
    parts = _requests(16, seed=2) + [np.arange(900, dtype=np.int64)]  # the last one is over the limit alone
    registry = CollectorRegistry()
    batching = LookupBatching(window_us=2_000, max_ids=600, registry=registry)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ids: batching.lookup("items", table, ids), parts))
    for ids, got in zip(parts, results, strict=True):
        assert_same(got.values, table.lookup(torch.from_numpy(ids)).values, table)
    count = _sample(registry, "embserve_lookup_batch_ids_count")
    assert _sample(registry, "embserve_lookup_batch_ids_sum") == sum(p.shape[0] for p in parts)
    # no merged decode holds more than the limit, unless one request alone does
    assert count >= (sum(p.shape[0] for p in parts) - 900) / 600 + 1
    assert registry.get_sample_value("embserve_lookup_batch_ids_bucket", {"table": "items", "le": "1024.0"}) == count


def test_off_by_default_on_cpu() -> None:
    assert resolve_window_us(None, "cpu") == 0
    assert resolve_window_us(None, "cuda") > 0
    assert resolve_window_us(50, "cpu") == 50
    batching = LookupBatching(0, 1000, CollectorRegistry())
    assert not batching.enabled


@pytest.mark.e2e
def test_server_with_batching_answers_concurrent_clients_exactly(table_file: Path) -> None:
    table, _ = load_table(table_file / "items.safetensors")
    clients, per_client = 8, 6
    work = [_requests(per_client, seed=100 + c) for c in range(clients)]
    env = {"EMBSERVE_BATCH_WINDOW_US": "20000", "EMBSERVE_MAX_BATCH_IDS": "100000"}
    with serving(table_file, env) as base:
        start = threading.Barrier(clients)

        def run(parts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, int]]:
            out = []
            with EmbeddingClient(base) as client:
                start.wait()
                for ids in parts:
                    res = client.lookup("items", ids)
                    out.append((res.values, res.found, res.unknown))
            return out

        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(run, work))
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    for parts, got in zip(work, answers, strict=True):
        for ids, (values, found, unknown) in zip(parts, got, strict=True):
            want = table.lookup(torch.from_numpy(ids))
            assert_same(torch.from_numpy(np.array(values)), want.values, table)
            assert np.array_equal(found, want.found.numpy()) and unknown == want.num_unknown
    count = float(re.search(r'^embserve_lookup_batch_ids_count\{table="items"\} (\S+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r'^embserve_lookup_batch_ids_sum\{table="items"\} (\S+)$', metrics, re.M).group(1))  # type: ignore[union-attr]
    assert total == sum(p.shape[0] for parts in work for p in parts)
    assert count < clients * per_client  # some lookups were merged
    assert re.search(r'^embserve_table_device_bytes\{device="cpu",table="items"\} [1-9]', metrics, re.M)
