"""The compiled decoder's per-ID pipeline and per-class row paths (compression/kernels/decode.c)
against the torch reference: every batch size around the pipeline's warm-up and drain, every
index kind, every quantized width at the common 64 and at an odd width, and the baseline
(non-AVX2) build of the same source."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from compression import CompressedTable, LookupResult, RowClass, build_table
from compression.kernels import COMPILED_AVAILABLE, cpu_c

pytestmark = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="compiled decoder not built")

AHEAD = 16  # decode.c's pipeline distance: batches around 0..3 * AHEAD exercise warm-up, steady state and drain
PILOT_AHEAD = 24  # and the static hash slots' first pass: around it, its warm-up and drain
SIZES = [0, 1, AHEAD - 1, AHEAD, AHEAD + 1, PILOT_AHEAD - 1, PILOT_AHEAD, PILOT_AHEAD + 1, 2 * AHEAD - 1, 2 * AHEAD, 2 * AHEAD + 1,
         3 * AHEAD + 1, 257]


def _table(d: int, index: str) -> tuple[CompressedTable, torch.Tensor]:
    """Rows of every stored width (fp32, fp16, 8/4/2/1-bit), a narrower class (zero-padded) and
    a pruned one, spread at random over 3000 rows; ``index`` dense, hash or sorted.  Returns the
    table and its IDs."""
    gen = torch.Generator().manual_seed(d)
    classes = [RowClass(d, b) for b in (32, 16, 8, 4, 2, 1)] + [RowClass(d // 2 + 1, 4), RowClass(0, 32)]
    n = 3000
    rows = torch.randn(n, d, generator=gen) * 3
    cls = torch.randint(0, len(classes), (n,), generator=gen)
    if index == "dense":
        return build_table(rows, cls, classes), torch.arange(n)
    ids = torch.randperm(10 * n, generator=gen)[:n] * 7 - 5000
    return build_table(rows, cls, classes, ids=ids, keyed_index=index), ids  # type: ignore[arg-type]


def _query(ids: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` IDs: mostly held ones, some unknown (absent, negative, past the end)."""
    gen = torch.Generator().manual_seed(seed)
    q = ids[torch.randint(0, ids.numel(), (n,), generator=gen)]
    unknown = torch.rand(n, generator=gen) < 0.1
    return torch.where(unknown, torch.randint(-10**6, 10**6, (n,), generator=gen) * 13 + 1, q)


def _both_paths(table: CompressedTable, query: torch.Tensor) -> tuple[LookupResult, LookupResult]:
    """``query`` looked up on the compiled decoder and on the torch reference."""
    table.backend = "compiled"
    fast = table.lookup(query)
    table.backend = "torch"
    return fast, table.lookup(query)


@pytest.mark.parametrize("index", ["dense", "hash", "sorted"])
@pytest.mark.parametrize("d", [64, 24])
def test_every_batch_size_and_row_kind_matches_the_reference(index: str, d: int) -> None:
    table, ids = _table(d, index)
    for n in SIZES:
        fast, ref = _both_paths(table, _query(ids, n, seed=n))
        assert torch.equal(fast.values, ref.values), (index, d, n)
        assert torch.equal(fast.locators, ref.locators) and fast.num_unknown == ref.num_unknown, (index, d, n)


def test_static_slots_with_an_overflow_match_the_reference() -> None:
    """A hash index with a static part and an overflow beside it (new IDs upserted after the
    build, some static IDs deleted): every batch size finds each ID in its part, on both paths."""
    table, ids = _table(64, "hash")
    gen = torch.Generator().manual_seed(5)
    new = torch.randperm(10**6, generator=gen)[:500] * 11 + 10**8
    table.put(new, torch.randn(500, 64, generator=gen), 2)
    gone = ids[:300]
    table.delete(gone)
    assert table.index.has_static and table.index.overflow_count >= 400  # type: ignore[attr-defined]
    held = torch.cat([ids[300:], new])
    for n in SIZES:
        query = torch.cat([_query(held, n, seed=n), gone[:n]])[torch.randperm(2 * n if n <= 300 else n + 300, generator=gen)]
        fast, ref = _both_paths(table, query)
        assert torch.equal(fast.values, ref.values) and torch.equal(fast.locators, ref.locators), n
        assert fast.num_unknown == ref.num_unknown >= min(n, 300), n


@pytest.mark.parametrize("index", ["dense", "hash", "sorted"])
def test_parallel_chunks_match_the_reference(index: str) -> None:
    """Batches past PARALLEL_MIN_ROWS split into one pipeline per thread."""
    table, ids = _table(64, index)
    query = _query(ids, 5 * cpu_c.PARALLEL_MIN_ROWS + 7, seed=1)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        table.backend = "compiled"
        fast = table.lookup(query)
    finally:
        torch.set_num_threads(saved)
    table.backend = "torch"
    ref = table.lookup(query)
    assert torch.equal(fast.values, ref.values) and torch.equal(fast.locators, ref.locators)


def _pq_table() -> tuple[CompressedTable, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    classes = [RowClass(64, 4), RowClass(64, 8, 16), RowClass(64, 4, 8)]
    codebooks = [None] + [torch.randn(rc.m, 2**rc.bits, 64 // rc.m, generator=gen).half() for rc in classes[1:]]
    table = CompressedTable.empty(64, classes, keyed=False, codebooks=codebooks)  # type: ignore[arg-type]
    table.put(torch.arange(600), torch.randn(600, 64, generator=gen), torch.arange(600) % 3)
    return table, torch.arange(600)


@pytest.mark.skipif(shutil.which("cc") is None or platform.machine() not in ("x86_64", "AMD64"), reason="needs a C compiler on x86-64")
def test_baseline_build_of_the_decoder_is_bit_exact_too(tmp_path: Path) -> None:
    """The library runs its x86-64-v3 clone on this machine; a CPU without AVX2 runs the baseline
    clone with the table-driven fp16 loads.  Build that one alone (-DEMBSERVE_NO_CLONES) and hold
    it to the torch reference on every row kind and index kind."""
    src = Path(cpu_c.__file__).with_name("decode.c")
    lib_path = tmp_path / "decode_baseline.so"
    subprocess.run(["cc", "-O3", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing", "-fPIC", "-shared",
                    "-DEMBSERVE_NO_CLONES", f"-I{src.parent}", "-o", str(lib_path), str(src)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.embserve_lookup.restype = i64
    lib.embserve_lookup.argtypes = [p, i64, p, p, i32, p, i64, p, i32]
    lib.embserve_init()
    cases = [_table(d, index) for d in (64, 24) for index in ("dense", "hash", "sorted")] + [_pq_table(), _rotated_table("dense")]
    for table, ids in cases:
        table.backend = "compiled"
        classes_c = cpu_c.class_array(table.slabs, table.classes, table.decoder._rotation_t, table.decoder.codebooks)
        view = table.index.c_view()
        table.backend = "torch"
        for n in (2 * AHEAD + 1, 700):
            query = _query(ids, n, seed=n)
            ref = table.lookup(query)
            out = torch.full((n, table.dim), float("nan"))
            loc = torch.empty(n, dtype=torch.int32)
            unknown = lib.embserve_lookup(query.data_ptr(), n, view.address, ctypes.addressof(classes_c), 8, out.data_ptr(), table.dim,
                                          loc.data_ptr(), 1)
            assert torch.equal(loc, ref.locators) and unknown == ref.num_unknown
            served = ref.found  # rows the decoder writes; unknown and pruned ones are its zeros
            if table.rotation is None:
                assert torch.equal(out[served], ref.values[served])
            else:  # rotated back by the scalar loop: the same sums as torch's matmul, in another order
                torch.testing.assert_close(out[served], ref.values[served], rtol=1e-5, atol=1e-5)
            assert not out[~served].any()


@pytest.mark.parametrize("policy", ["zero", "default"])
@pytest.mark.parametrize("index", ["dense", "hash"])
def test_pruned_rows_on_the_entry_path_match_the_reference(policy: str, index: str) -> None:
    """A table with a pruned class takes the CPython entry too (the pruned mask comes from
    embserve_pruned_mask): same values, locators, pruned mask and counts as the torch path,
    with pruned and unknown rows served by the unknown-ID policy."""
    from compression.unknown import UnknownPolicy

    if not cpu_c.ENTRY_PRUNED:
        pytest.skip("CPython entry not built")
    table, ids = _table(64, index)
    table.unknown = UnknownPolicy("default", default=torch.full((64,), 0.5)) if policy == "default" else UnknownPolicy("zero")
    assert table._pruned_classes is not None  # the class layout of _table has one
    for n in (1, 2 * AHEAD + 1, 700):
        fast, ref = _both_paths(table, _query(ids, n, seed=n))
        assert fast.pruned is not None and ref.pruned is not None
        assert torch.equal(fast.values, ref.values) and torch.equal(fast.locators, ref.locators)
        assert torch.equal(fast.pruned, ref.pruned) and fast.num_pruned == ref.num_pruned
        assert fast.num_unknown == ref.num_unknown and torch.equal(fast.status, ref.status)
    assert ref.num_pruned > 0 and ref.num_unknown > 0


def test_pruned_mask_marks_exactly_the_dim0_classes() -> None:
    if not cpu_c.ENTRY_PRUNED:
        pytest.skip("CPython entry not built")
    table, _ = _table(24, "dense")
    classes_c = cpu_c.class_array(table.slabs, table.classes, None, table.decoder.codebooks)
    shift = 28  # compression/layout.py: class in bits 28..30
    loc = torch.tensor([-1, 0, (7 << shift) + 5, (6 << shift) + 2, (3 << shift), -7], dtype=torch.int32)
    out = torch.full((6,), True)
    count = cpu_c.ENTRY.pruned(loc.data_ptr(), 6, ctypes.addressof(classes_c), out.data_ptr())
    assert table.classes[7].dim == 0 and count == 1
    assert out.tolist() == [False, False, True, False, False, False]


def _rotated_table(index: str) -> tuple[CompressedTable, torch.Tensor]:
    """A rotated table whose truncated classes cover the inline rotated kinds (8, 4 and 2 bits:
    decode_rot) and the ones left to decode_other (fp16 and 1-bit truncated rows), next to full
    and pruned rows."""
    from compression.rotation import weighted_pca_rotation

    gen = torch.Generator().manual_seed(11)
    n = 2000
    rows = torch.randn(n, 6, generator=gen) @ torch.randn(6, 64, generator=gen) + 0.1 * torch.randn(n, 64, generator=gen)
    classes = [RowClass(64, 8), RowClass(16, 8), RowClass(16, 4), RowClass(32, 2), RowClass(8, 1), RowClass(16, 16), RowClass(0, 32)]
    cls = torch.randint(0, len(classes), (n,), generator=gen)
    rotation = weighted_pca_rotation(rows, torch.ones(n))
    if index == "dense":
        return build_table(rows, cls, classes, rotation=rotation), torch.arange(n)
    ids = torch.randperm(10 * n, generator=gen)[:n] * 3 + 1
    return build_table(rows, cls, classes, ids=ids, keyed_index=index, rotation=rotation), ids  # type: ignore[arg-type]


@pytest.mark.parametrize("index", ["dense", "hash"])
def test_rotated_classes_match_the_reference(index: str) -> None:
    """Truncated rows come back through R^T: the C decoder (an fp32 R^T, AVX-512 or AVX2
    multiply-adds in k order) agrees with torch's matmul up to the order of the sums."""
    table, ids = _rotated_table(index)
    assert table.rotation is not None and table.decoder.compiled
    for n in (1, 2 * AHEAD + 1, 700):
        fast, ref = _both_paths(table, _query(ids, n, seed=n))
        assert torch.equal(fast.locators, ref.locators) and fast.num_unknown == ref.num_unknown
        torch.testing.assert_close(fast.values, ref.values, rtol=1e-5, atol=1e-5)
