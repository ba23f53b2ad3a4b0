"""Synthetic tables that look like trained ID embeddings, for demos, tests and benchmarks.

Trained recommender tables are not white noise: rows share a low-rank structure (a few
directions carry most of the energy), and frequent IDs have larger norms than rare ones
(their rows moved further from the init).  ID frequencies follow a Zipf law."""

from __future__ import annotations

import torch


def zipf_frequencies(n: int, exponent: float = 1.05, shuffle: bool = True, seed: int = 0) -> torch.Tensor:
    """Expected lookup counts per ID (sum 1), Zipf over ranks; shuffled over IDs by default."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    freqs = ranks.pow(-exponent)
    freqs /= freqs.sum()
    if shuffle:
        freqs = freqs[torch.randperm(n, generator=gen)]
    return freqs


def synthetic_table(n: int, dim: int, frequencies: torch.Tensor | None = None, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """``[n, dim]`` float32 rows: low-rank signal plus noise, scaled up with frequency."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty((n, dim), dtype=torch.float32)
    basis = torch.randn(rank, dim, generator=gen) / rank**0.5
    if frequencies is None:
        frequencies = zipf_frequencies(n, seed=seed)
    rel = (frequencies / frequencies.max()).to(torch.float32)
    scale = 0.02 + 0.08 * rel.pow(0.25)  # frequent rows move further from a small init
    chunk = 1 << 18
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        k = stop - start
        signal = torch.randn(k, rank, generator=gen) @ basis
        noise = 0.3 * torch.randn(k, dim, generator=gen)
        out[start:stop] = (signal + noise) * scale[start:stop, None]
    return out


def sample_ids(frequencies: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` IDs drawn from ``frequencies`` (int64), as lookup traffic would bring them."""
    gen = torch.Generator().manual_seed(seed)
    cdf = torch.cumsum(frequencies.to(torch.float64), 0)
    cdf /= cdf[-1].clone()
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_(max=frequencies.numel() - 1)
