"""Product-quantization (codebook) row classes: the codec, the C decoder against the torch
reference, the file format, byte accounting, streaming upserts, and the allocator's PQ plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from compression import CompressedTable, RowClass, TableFormatError, compress, load_table, read_manifest, save_table
from compression import pq, storage
from compression.index import DenseIndex
from compression.kernels import COMPILED_AVAILABLE
from compression.layout import encode_locator
from compression.rotation import weighted_pca_rotation
from compression.synthetic import zipf_frequencies

BACKENDS = ["torch", "compiled"] if COMPILED_AVAILABLE else ["torch"]


def _codebook(rc: RowClass, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = rc.codebook_shape
    assert shape is not None
    return torch.randn(shape, generator=gen).to(torch.float16)


def _clustered(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(32, d, generator=gen)
    return centers[torch.randint(0, 32, (n,), generator=gen)] + 0.2 * torch.randn(n, d, generator=gen)


# ---------------------------------------------------------------------------------------- codec


@given(bits=st.integers(1, 8), m=st.integers(1, 40), n=st.integers(0, 20), seed=st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_code_packing_round_trips_and_uses_ceil_m_k_over_8_bytes(bits: int, m: int, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, m), generator=gen)
    packed = pq.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (m * bits + 7) // 8)
    assert packed.shape[1] == RowClass(m, bits, m).row_bytes
    assert torch.equal(pq.unpack_codes(packed, bits, m), codes)


def test_code_bits_are_one_little_endian_stream() -> None:
    # m=3 codes of 3 bits: 0b101, 0b011, 0b110 -> bits 0..8 = 101 | 110 | 011 (LSB first)
    packed = pq.pack_codes(torch.tensor([[5, 3, 6]]), 3)
    value = int(packed[0, 0]) | (int(packed[0, 1]) << 8)
    assert value == 5 | (3 << 3) | (6 << 6)


@given(
    sub=st.sampled_from([1, 2, 3, 4]),
    m=st.integers(1, 6),
    bits=st.integers(1, 8),
    n=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_encode_picks_the_nearest_centroid_and_decode_gathers_it(sub: int, m: int, bits: int, n: int, seed: int) -> None:
    rc = RowClass(sub * m, bits, m)
    cb = _codebook(rc, seed)
    x = torch.randn(n, rc.dim, generator=torch.Generator().manual_seed(seed + 1))
    decoded = pq.decode_pq(pq.encode_pq(x, rc, cb), rc, cb)
    codes = pq.unpack_codes(pq.encode_pq(x, rc, cb), bits, m)
    cbf = cb.float()
    for j in range(m):
        xs = x[:, j * sub : (j + 1) * sub]
        dist = ((xs[:, None, :] - cbf[j][None]) ** 2).sum(-1)  # [n, K]
        chosen = dist.gather(1, codes[:, j : j + 1]).squeeze(1)
        assert bool((chosen <= dist.min(dim=1).values + 1e-4).all())
        assert torch.equal(decoded[:, j * sub : (j + 1) * sub], cbf[j][codes[:, j]])


def test_weighted_kmeans_lowers_weighted_error_and_follows_the_weights() -> None:
    x = _clustered(4000, 8)
    w = torch.ones(4000, dtype=torch.float64)
    rc = RowClass(8, 4, 2)
    err = {}
    for iters in (0, 8):
        cb = pq.train_codebook(x, w, rc, iters=iters)
        err[iters] = float(((pq.decode_pq(pq.encode_pq(x, rc, cb), rc, cb) - x) ** 2).sum())
    assert err[8] < 0.8 * err[0]
    # all weight on 10 rows: they are served (almost) exactly, whatever the other rows do
    heavy = torch.zeros(4000, dtype=torch.float64)
    heavy[:10] = 1.0
    cb = pq.train_codebook(x, heavy + 1e-9, RowClass(8, 4, 8), iters=8)
    served = pq.decode_pq(pq.encode_pq(x[:10], RowClass(8, 4, 8), cb), RowClass(8, 4, 8), cb)
    assert float(((served - x[:10]) ** 2).sum()) < 1e-3


def test_row_class_labels_and_validation() -> None:
    rc = RowClass(64, 4, 8)
    assert rc.label() == "d64pq8x4" and RowClass.parse("d64pq8x4") == rc and rc.row_bytes == 4
    assert rc.codebook_bytes == 8 * 16 * 8 * 2 and rc.pq and not rc.quantized
    assert RowClass.parse("d64b4") == RowClass(64, 4)
    for bad in [(64, 9, 8), (64, 4, 7), (0, 4, 1), (64, 0, 8)]:
        with pytest.raises(ValueError):
            RowClass(*bad)
    with pytest.raises(ValueError):
        RowClass.parse("d64pqx4")


# ----------------------------------------------------------------------------------- the table


def _pq_table(rotated: bool = False) -> CompressedTable:
    """Four classes: fp32, int4, a full-width PQ class and (rotated) a truncated PQ class."""
    d, n = 16, 500
    x = _clustered(n, d)
    classes = [RowClass(16, 32), RowClass(16, 4), RowClass(16, 5, 4), RowClass(8, 3, 8) if rotated else RowClass(16, 8, 2)]
    rotation = weighted_pca_rotation(x, torch.ones(n, dtype=torch.float64)) if rotated else None
    codebooks = [None, None, _codebook(classes[2], 1), _codebook(classes[3], 2)]
    table = CompressedTable.empty(d, classes, keyed=True, rotation=rotation, codebooks=codebooks)
    ids = torch.arange(n) * 3 - 100
    table.put(ids, x, torch.arange(n) % 4)
    return table


@pytest.mark.parametrize("rotated", [False, True])
def test_compiled_decoder_is_bit_exact_with_the_torch_reference(rotated: bool) -> None:
    if not COMPILED_AVAILABLE:
        pytest.skip("compiled decoder not built")
    table = _pq_table(rotated)
    ids = torch.cat([torch.arange(-120, 1500), torch.randint(-100, 1400, (5000,), generator=torch.Generator().manual_seed(0))])
    table.backend = "compiled"
    fast = table.lookup(ids)
    table.backend = "torch"
    ref = table.lookup(ids)
    if rotated:  # rotating back is a matmul in torch and FMAs in C: same to rounding
        assert torch.allclose(fast.values, ref.values, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(fast.values, ref.values)
    assert torch.equal(fast.locators, ref.locators)


@given(sub=st.integers(1, 9), m=st.integers(1, 7), bits=st.integers(1, 8), extra=st.integers(0, 5), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_compiled_pq_decode_is_bit_exact_for_any_shape(sub: int, m: int, bits: int, extra: int, seed: int) -> None:
    """Any (sub-vector size, m, k), including odd m with 4-bit codes and codes straddling bytes,
    in a table wider than the class (the rest decodes to zeros)."""
    if not COMPILED_AVAILABLE:
        pytest.skip("compiled decoder not built")
    rc = RowClass(sub * m, bits, m)
    d = rc.dim + extra
    table = CompressedTable.empty(d, [rc], keyed=False, codebooks=[_codebook(rc, seed)])
    gen = torch.Generator().manual_seed(seed)
    table.put(torch.arange(64), torch.randn(64, d, generator=gen), 0)
    ids = torch.randint(-3, 70, (300,), generator=gen)
    table.backend = "compiled"
    fast = table.lookup(ids).values
    table.backend = "torch"
    assert torch.equal(fast, table.lookup(ids).values)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upserts_into_a_pq_class_encode_against_its_codebook(backend: str) -> None:
    table = _pq_table()
    table.backend = backend  # type: ignore[assignment]
    rc, cb = table.classes[2], table.codebooks[2]
    assert cb is not None
    new = torch.randn(7, 16)
    ids = torch.tensor([10_000, 10_001, 10_002, -7, 3, 6, 9])  # new IDs and IDs moving in from other classes
    before = table.codebooks[2].clone()  # type: ignore[union-attr]
    table.put(ids, new, 2)
    expected = pq.decode_codes(pq.nearest_codes(new, cb, rc), rc, cb)
    assert torch.equal(table.lookup(ids).values, expected)
    assert torch.equal(table.codebooks[2], before)  # the codebook is fixed; rows adapt to it


def test_pq_class_without_codebook_is_refused() -> None:
    with pytest.raises(ValueError, match="codebook"):
        CompressedTable.empty(16, [RowClass(16, 4, 4)])
    with pytest.raises(ValueError, match="codebook"):
        CompressedTable.empty(16, [RowClass(16, 4, 4)], codebooks=[torch.zeros(4, 16, 3, dtype=torch.float16)])


def test_nbytes_and_stats_count_the_codebooks() -> None:
    table = _pq_table()
    held = sum(t.numel() * t.element_size() for t in table.held_tensors().values())
    assert table.nbytes == held
    stats = table.stats()
    for k, cs in enumerate(stats.classes):
        expected = table.slabs[k].numel() + table.free[k].numel() * 4 + table.classes[k].codebook_bytes
        assert cs.bytes == expected
    assert "class.2.codebook" in table.state_tensors() and "class.0.codebook" not in table.state_tensors()
    assert stats.nbytes == stats.index_bytes + stats.row_bytes + stats.other_bytes


# ------------------------------------------------------------------------------------ storage


def test_storage_round_trip_is_bit_exact_and_marks_the_new_kind(tmp_path: Path) -> None:
    table = _pq_table(rotated=True)
    path = save_table(table, tmp_path / "pq.safetensors")
    loaded, manifest = load_table(path)
    assert manifest["format_version"] == 3  # its hash index needs 3 (the PQ class alone, 2)
    assert manifest["classes"][2] == {"dim": 16, "bits": 5, "used": table.used[2], "kind": "pq", "m": 4}
    assert "kind" not in manifest["classes"][0]
    before, after = table.state_tensors(), loaded.state_tensors()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    ids = torch.arange(-150, 1600)
    assert torch.equal(table.lookup(ids).values, loaded.lookup(ids).values)
    assert loaded.nbytes == table.nbytes


def test_a_version_1_reader_refuses_a_pq_file_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_table(_pq_table(), tmp_path / "pq.safetensors")
    monkeypatch.setattr(storage, "FORMAT_VERSION", 1)  # what an older embserve reads
    # version 3: the table is keyed, and its hash index needs 3 (a dense PQ table is version 2)
    with pytest.raises(TableFormatError, match=r"version 3 is newer than this embserve reads \(1\)"):
        load_table(path)


def test_plain_tables_stay_version_1_and_unknown_class_kinds_are_refused(tmp_path: Path) -> None:
    plain = compress(_clustered(300, 8), ratio=4)[0]
    path = save_table(plain, tmp_path / "plain.safetensors")
    assert read_manifest(path)["format_version"] == 1
    manifest = read_manifest(path)
    manifest["classes"][0]["kind"] = "lattice"
    tensors = {k: v.contiguous() for k, v in plain.state_tensors().items()}
    save_file(tensors, str(path), metadata={storage.MANIFEST_KEY: json.dumps(manifest)})
    with pytest.raises(TableFormatError, match="unknown row class kind"):
        load_table(path)


def test_missing_codebook_tensor_is_an_inconsistent_file(tmp_path: Path) -> None:
    table = _pq_table()
    path = save_table(table, tmp_path / "pq.safetensors")
    tensors = {k: v.contiguous() for k, v in table.state_tensors().items() if k != "class.2.codebook"}
    save_file(tensors, str(path), metadata={storage.MANIFEST_KEY: json.dumps(read_manifest(path))})
    with pytest.raises(TableFormatError, match="inconsistent"):
        load_table(path)


# ---------------------------------------------------------------------------------- allocator


@pytest.mark.parametrize("ratio", [16, 32, 64])
def test_allocator_with_pq_fits_the_budget_and_never_does_worse_on_its_objective(ratio: int) -> None:
    n, d = 3000, 16
    x = _clustered(n, d, seed=ratio)
    freqs = torch.sort(zipf_frequencies(n, seed=1), descending=True).values
    plain, plain_report = compress(x, freqs, ratio=ratio, index="runs", num_groups=16, sample_per_group=128)
    table, report = compress(x, freqs, ratio=ratio, index="runs", num_groups=16, sample_per_group=128, pq=True)
    assert table.nbytes <= report.budget_bytes
    assert report.estimated_error <= plain_report.estimated_error
    assert any(rc.pq for rc in table.classes)  # clustered rows: codebooks win here
    served = table.lookup(torch.arange(n)).values
    err = float((freqs * ((served - x) ** 2).sum(1)).sum())
    plain_err = float((freqs * ((plain.lookup(torch.arange(n)).values - x) ** 2).sum(1)).sum())
    assert err < plain_err
    if COMPILED_AVAILABLE:
        table.backend = "torch"
        assert torch.equal(table.lookup(torch.arange(n)).values, served)


def test_pq_classes_can_be_passed_as_candidates() -> None:
    x = _clustered(1000, 8)
    only = [RowClass(8, 4, 4), RowClass(0, 32)]
    table, report = compress(x, ratio=8, candidates=only, index="runs", num_groups=8)
    assert set(table.classes) <= set(only) and table.nbytes <= report.budget_bytes
    assert RowClass(8, 4, 4) in table.classes


def test_pq_candidates_respect_the_budget() -> None:
    from compression.pq_alloc import pq_candidates

    cands = pq_candidates(64, 100_000, num_rows=10_000)
    assert 0 < len(cands) <= 6 and all(rc.codebook_bytes <= 25_000 for rc in cands)
    assert all(rc.dim == 64 and 64 % rc.m == 0 for rc in cands)


def test_locators_into_pq_classes_are_checked_at_load() -> None:
    rc = RowClass(8, 4, 2)
    slab = torch.zeros((2, rc.row_bytes), dtype=torch.uint8)
    index = DenseIndex(torch.tensor([encode_locator(0, 0), encode_locator(0, 5)], dtype=torch.int32))
    with pytest.raises(ValueError, match="past the used slots"):
        CompressedTable(8, [rc], [slab], [2], index, codebooks=[_codebook(rc)])


# ------------------------------------------------------------------------- streaming (service)


def test_service_places_upserted_rows_in_a_pq_class_and_snapshots_it(tmp_path: Path) -> None:
    """A served table whose main class is a PQ class: new IDs streamed in land there (the most
    populated class), encoded against the existing codebook; a snapshot keeps codebook and rows."""
    import uuid

    import numpy as np
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    rc = RowClass(8, 4, 4)
    cb = _codebook(rc, 3)
    table = CompressedTable.empty(8, [RowClass(8, 32), rc], keyed=True, codebooks=[None, cb])
    table.put(torch.arange(200), _clustered(200, 8), (torch.arange(200) >= 10).long())
    tables = tmp_path / "tables"
    save_table(table, tables / "emb.safetensors")
    settings = Settings(tables_dir=tables, redis_url=None, redis_stream=f"test:{uuid.uuid4().hex}", segment_seconds=3600,
                        segment_updates=10**9, snapshot_interval_s=3600)
    app = create_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        state = app.state.embserve
        assert state.applier.wait_caught_up(10)
        new = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
        ids = [1000, 1001, 1002, 1003, 1004]
        r = client.post("/v1/tables/emb/updates?wait=true", json={"upsert_ids": ids, "vectors": new.tolist(), "delete_ids": []})
        assert r.status_code == 200 and r.json()["applied"], r.text
        res = client.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": ids}]}).json()["results"][0]
        served = np.asarray(res["embeddings"], dtype=np.float32)
        expected = pq.decode_codes(pq.nearest_codes(torch.from_numpy(new), cb, rc), rc, cb).numpy()
        assert res["found"] == [True] * 5 and np.array_equal(served, expected)
        info = client.get("/v1/tables/emb").json()
        assert any(c["row_class"] == "d8pq4x4" and c["rows"] == 195 for c in info["classes"])
        hosted = state.tables.get("emb")
        state.applier.snapshot(hosted)
        # an empty PQ class has no codebook to encode against: refused, nothing created
        r = client.post("/v1/admin/tables", json={"name": "p2", "dim": 8, "classes": ["d8pq4x4"]})
        assert r.status_code == 422 and "codebook" in r.text
        assert client.get("/v1/tables/p2").status_code == 404
    loaded, manifest = load_table(tables / "emb.safetensors")
    # the PQ class needs version 2; a hash-indexed (keyed) table needs 3
    assert manifest["format_version"] == (3 if manifest["index"] == "hash" else 2) and torch.equal(loaded.codebooks[1], cb)  # type: ignore[arg-type]
    assert np.array_equal(loaded.lookup(torch.tensor(ids)).values.numpy(), expected)


def test_triton_backend_refuses_pq_classes_instead_of_misreading_them() -> None:
    """The Triton kernel has no codebook gather: asked for it, a PQ table says so; ``auto`` on a
    CUDA device keeps such a table on the torch reference path."""
    pytest.importorskip("triton")
    table = _pq_table()
    with pytest.raises(RuntimeError, match="product-quantization"):
        table.backend = "triton"  # type: ignore[assignment]
        table.lookup(torch.arange(10))
