"""The same tables served from a CUDA device: the torch path must give what the CPU gives.
Skipped where no GPU is present (the development machine); run on a lent GPU machine."""

from __future__ import annotations

import pytest
import torch

from compression import RowClass, build_table, compress
from compression.synthetic import synthetic_table, zipf_frequencies

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_lookup_matches_cpu() -> None:
    freqs = zipf_frequencies(50_000, seed=7)
    rows = synthetic_table(50_000, 64, freqs, seed=7)
    table, _ = compress(rows, freqs, ratio=16, unknown="hashed")
    gpu = table.to("cuda")
    ids = torch.randint(-100, 50_100, (10_000,))
    cpu_res, gpu_res = table.lookup(ids), gpu.lookup(ids.cuda())
    assert gpu_res.values.device.type == "cuda"
    assert torch.allclose(gpu_res.values.cpu(), cpu_res.values, atol=1e-5)
    assert torch.equal(gpu_res.found.cpu(), cpu_res.found)
    offsets = torch.tensor([0, 10, 10, 500])
    assert torch.allclose(gpu.lookup_bags(ids.cuda(), offsets.cuda(), "mean").values.cpu(), table.lookup_bags(ids, offsets, "mean").values, atol=1e-5)


def test_cuda_writes_and_keyed_index() -> None:
    classes = [RowClass(16, 32), RowClass(16, 4)]
    rows = torch.randn(1000, 16)
    table = build_table(rows, torch.randint(0, 2, (1000,)), classes, ids=torch.arange(1000) * 11).to("cuda")
    table.put(torch.tensor([5, 7777], device="cuda"), torch.ones(2, 16, device="cuda"), 0)
    res = table.lookup(torch.tensor([5, 7777, 11, 12], device="cuda"))
    assert res.found.tolist() == [True, True, True, False]
    assert torch.equal(res.values[:2].cpu(), torch.ones(2, 16))


def test_cuda_pq_classes_decode_and_encode_like_cpu() -> None:
    """PQ (codebook) classes on the GPU: the torch reference gathers from the codebook on the
    device, bit for bit what the CPU decodes; upserts encode against the device codebook."""
    n, d = 20_000, 32
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(64, d, generator=gen)[torch.randint(0, 64, (n,), generator=gen)] + 0.2 * torch.randn(n, d, generator=gen)
    freqs = zipf_frequencies(n, seed=3)
    table, _ = compress(rows, freqs, ratio=12, pq=True)
    assert any(rc.pq for rc in table.classes)
    table.backend = "torch"
    gpu = table.to("cuda")
    ids = torch.randint(-10, n + 10, (8192,), generator=gen)
    assert torch.equal(gpu.lookup(ids.cuda()).values.cpu(), table.lookup(ids).values)
    c = next(k for k, rc in enumerate(gpu.classes) if rc.pq)
    new = torch.randn(3, d, generator=gen)
    gpu.put(torch.tensor([1, 2, 3], device="cuda"), new.cuda(), c)
    table.put(torch.tensor([1, 2, 3]), new, c)
    assert torch.allclose(gpu.lookup(torch.tensor([1, 2, 3], device="cuda")).values.cpu(), table.lookup(torch.tensor([1, 2, 3])).values)
