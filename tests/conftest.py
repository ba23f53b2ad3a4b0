"""Shared fixtures: small but realistic tables (trained-like rows, Zipf frequencies)."""

from __future__ import annotations

import pytest
import torch

from compression import compress
from compression.synthetic import synthetic_table, zipf_frequencies


@pytest.fixture(scope="session")
def zipf_rows() -> tuple[torch.Tensor, torch.Tensor]:
    freqs = zipf_frequencies(20_000, seed=1)
    return synthetic_table(20_000, 32, freqs, seed=1), freqs


@pytest.fixture(scope="session")
def mixed_table(zipf_rows):  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    table, _ = compress(rows, freqs, ratio=10, unknown="default")
    return table
