"""The table store: lookups, unknown IDs, writes that move rows between classes, honest bytes."""

from __future__ import annotations

import pytest
import torch

from compression import CompressedTable, RowClass, build_table, compress_uniform, pool_bags
from compression.codecs import decode_rows, encode_rows
from compression.index import DenseIndex, KeyedIndex
from compression.kernels import COMPILED_AVAILABLE
from compression.unknown import UnknownPolicy, bucket_of

CLASSES = [RowClass(16, 32), RowClass(16, 8), RowClass(8, 4), RowClass(16, 1), RowClass(0, 32)]


def _expected(rows: torch.Tensor, rc: RowClass, dim: int) -> torch.Tensor:
    out = torch.zeros(rows.shape[0], dim)
    out[:, : rc.dim] = decode_rows(encode_rows(rows, rc), rc)
    return out


def _backends() -> list[str]:
    return ["torch", "compiled"] if COMPILED_AVAILABLE else ["torch"]


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("backend", _backends())
def test_lookup_matches_per_class_decoding(keyed: bool, backend: str) -> None:
    torch.manual_seed(0)
    n = 500
    rows = torch.randn(n, 16)
    cls = torch.randint(0, len(CLASSES), (n,))
    ids = torch.randperm(10_000)[:n] * 7 - 3000 if keyed else None
    table = build_table(rows, cls, CLASSES, ids=ids)
    table.backend = backend  # type: ignore[assignment]
    query_pos = torch.randint(0, n, (300,))
    query = ids[query_pos] if ids is not None else query_pos
    result = table.lookup(query)
    expected = torch.stack([_expected(rows[p : p + 1], CLASSES[int(cls[p])], 16)[0] for p in query_pos.tolist()])
    assert torch.equal(result.values, expected)
    # a dim-0 row stores nothing: it is reported pruned (and served by the unknown-ID policy)
    pruned = torch.tensor([CLASSES[int(cls[p])].dim == 0 for p in query_pos.tolist()])
    assert torch.equal(result.found, ~pruned) and result.num_unknown == 0
    assert result.num_pruned == int(pruned.sum()) > 0


@pytest.mark.skipif(not COMPILED_AVAILABLE, reason="compiled decoder not built")
@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("n_query", [1, 33, 5000])
def test_compiled_and_reference_paths_agree_bit_for_bit(keyed: bool, n_query: int) -> None:
    torch.manual_seed(1)
    classes = [RowClass(24, b) for b in (32, 16, 8, 4, 2, 1)] + [RowClass(11, 4), RowClass(0, 8)]
    rows = torch.randn(3000, 24) * 3
    cls = torch.randint(0, len(classes), (3000,))
    ids = torch.arange(3000) * 3 if keyed else None
    table = build_table(rows, cls, classes, ids=ids)
    query = torch.randint(-50, 9500 if keyed else 3100, (n_query,))
    table.backend = "compiled"
    fast = table.lookup(query)
    table.backend = "torch"
    ref = table.lookup(query)
    assert torch.equal(fast.values, ref.values)
    assert torch.equal(fast.locators, ref.locators)
    assert fast.num_unknown == ref.num_unknown == int((ref.locators < 0).sum())
    assert fast.num_pruned == ref.num_pruned and torch.equal(fast.status, ref.status)


def test_unknown_ids_are_reported_and_filled_by_policy() -> None:
    rows = torch.randn(10, 4)
    query = torch.tensor([0, 10, -1, 9, 1 << 40])
    zero = compress_uniform(rows, RowClass(4, 32))
    res = zero.lookup(query)
    assert res.found.tolist() == [True, False, False, True, False]
    assert res.num_unknown == 3
    assert torch.equal(res.values[1], torch.zeros(4))
    assert torch.equal(res.values[0], rows[0])

    default = compress_uniform(rows, RowClass(4, 32), unknown="default")
    res = default.lookup(query)
    assert torch.allclose(res.values[1], rows.mean(0), atol=1e-6)
    assert torch.equal(res.values[1], res.values[4])

    hashed = compress_uniform(rows, RowClass(4, 32), unknown="hashed")
    res = hashed.lookup(query)
    buckets = hashed.unknown.buckets
    assert buckets is not None
    for pos in (1, 2, 4):
        b = int(bucket_of(query[pos : pos + 1], buckets.shape[0]))
        assert torch.equal(res.values[pos], buckets[b].float())


def test_bucket_hash_is_stable_and_spreads() -> None:
    ids = torch.arange(100_000)
    b = bucket_of(ids, 1024)
    assert int(b.min()) >= 0 and int(b.max()) < 1024
    counts = torch.bincount(b, minlength=1024).float()
    assert counts.std() / counts.mean() < 0.2
    # the documented formula, computed with Python integers: high 31 bits of id * golden mod 2**64
    for i in (0, 1, 12345, -7, 2**63 - 1, -(2**63)):
        expected = (((i * 0x9E3779B97F4A7C15) % 2**64) >> 33) % 1024
        assert bucket_of(torch.tensor([i]), 1024).item() == expected


@pytest.mark.parametrize("keyed", [False, True])
def test_put_moves_rows_between_classes_and_reuses_slots(keyed: bool) -> None:
    classes = [RowClass(8, 32), RowClass(8, 4)]
    table = CompressedTable.empty(8, classes, keyed=keyed)
    ids = torch.tensor([5, 1, 9, 3])
    rows = torch.randn(4, 8)
    table.put(ids, rows, 0)
    assert torch.equal(table.lookup(ids).values, rows)
    assert table.rows_per_class() == [4, 0]
    # demote two rows to 4 bits: their fp32 slots go on the free list and get reused
    table.put(ids[:2], rows[:2], 1)
    assert table.rows_per_class() == [2, 2]
    assert table.free[0].numel() == 2
    assert torch.equal(table.lookup(ids[:2]).values, _expected(rows[:2], classes[1], 8))
    new_rows = torch.randn(2, 8)
    table.put(torch.tensor([100, 200]), new_rows, 0)
    assert table.free[0].numel() == 0 and table.used[0] == 4
    assert torch.equal(table.lookup(torch.tensor([100, 200])).values, new_rows)
    # an update in place keeps the slot
    before = table.index.resolve(torch.tensor([9]))
    table.put(torch.tensor([9]), torch.ones(1, 8), 0)
    assert torch.equal(table.index.resolve(torch.tensor([9])), before)
    assert torch.equal(table.lookup(torch.tensor([9])).values, torch.ones(1, 8))


def test_rows_per_class_agrees_with_the_index_after_moves_and_deletes() -> None:
    torch.manual_seed(8)
    table = CompressedTable.empty(4, [RowClass(4, 32), RowClass(4, 8), RowClass(0, 32)], keyed=True)
    for step in range(30):
        ids = torch.randint(0, 500, (40,))
        table.put(ids, torch.randn(40, 4), torch.randint(0, 3, (40,)))
        table.delete(torch.randint(0, 500, (10,)))
        _, locs = table.index.live_items()
        walked = torch.bincount((locs >> 28).long(), minlength=3).tolist()
        assert table.rows_per_class() == walked, step
    table.compact()
    _, locs = table.index.live_items()
    assert table.rows_per_class() == torch.bincount((locs >> 28).long(), minlength=3).tolist()


def test_put_last_duplicate_wins_and_delete() -> None:
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    table.put(torch.tensor([7, 7, 8]), torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4]), 0)
    assert table.lookup(torch.tensor([7])).values[0].tolist() == [2.0] * 4
    assert table.delete(torch.tensor([7, 7, 42])) == 1
    res = table.lookup(torch.tensor([7, 8]))
    assert res.found.tolist() == [False, True]
    assert table.stats().num_ids == 1


def test_put_rejects_bad_rows() -> None:
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    with pytest.raises(ValueError):
        table.put(torch.tensor([1]), torch.tensor([[float("nan")] * 4]), 0)
    with pytest.raises(ValueError):
        table.put(torch.tensor([1]), torch.ones(1, 3), 0)
    with pytest.raises(ValueError):
        table.put(torch.tensor([1]), torch.ones(1, 4), 5)
    assert table.stats().num_ids == 0


def test_slabs_grow_by_doubling_and_inserts_survive_index_merges() -> None:
    table = CompressedTable.empty(4, [RowClass(4, 8)], keyed=True)
    table.index = KeyedIndex(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32))  # the sorted index, still supported
    all_ids = torch.randperm(1_000_000)[:20_000] - 500_000
    rows = torch.randn(20_000, 4)
    for start in range(0, 20_000, 1000):
        table.put(all_ids[start : start + 1000], rows[start : start + 1000], 0)
    assert table.slabs[0].shape[0] == 32_000  # 1000 -> 2000 -> ... -> 32000: doubling, not per-insert growth
    assert isinstance(table.index, KeyedIndex)
    assert table.index.delta_keys.numel() < 20_000  # merges happened
    res = table.lookup(all_ids)
    assert bool(res.found.all())
    assert torch.allclose(res.values, rows, atol=0.05)


def test_reported_bytes_match_the_tensors_held(mixed_table: CompressedTable) -> None:
    storages = {}
    for t in mixed_table.held_tensors().values():
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert mixed_table.nbytes == sum(storages.values())
    stats = mixed_table.stats()
    assert stats.nbytes == stats.index_bytes + stats.row_bytes + stats.other_bytes
    rotation = 0 if mixed_table.rotation is None else mixed_table.rotation.numel() * mixed_table.rotation.element_size()
    decoder = sum(t.numel() * t.element_size() for t in mixed_table.decoder.held_tensors().values())  # the C decoder's fp32 R^T
    assert stats.other_bytes == mixed_table.unknown.nbytes + rotation + decoder
    if mixed_table.rotation is not None and mixed_table.decoder.compiled:
        assert decoder == 4 * mixed_table.rotation.numel()  # held, and counted


def test_bag_pooling_matches_manual_sums() -> None:
    rows = torch.randn(10, 4)
    table = compress_uniform(rows, RowClass(4, 32))
    ids = torch.tensor([1, 2, 3, 4, 5, 99])
    offsets = torch.tensor([0, 2, 2, 5])
    summed = table.lookup_bags(ids, offsets, "sum").values
    assert torch.allclose(summed[0], rows[1] + rows[2])
    assert torch.equal(summed[1], torch.zeros(4))  # empty bag
    assert torch.allclose(summed[2], rows[3] + rows[4] + rows[5])
    assert torch.allclose(summed[3], torch.zeros(4))  # unknown ID 99 pools as zero
    mean = table.lookup_bags(ids, offsets, "mean").values
    assert torch.allclose(mean[2], (rows[3] + rows[4] + rows[5]) / 3)
    for bad in ([1, 2], [0, 3, 2], [0, 7]):
        with pytest.raises(ValueError):
            pool_bags(torch.zeros(6, 4), torch.tensor(bad), "sum")


def test_dense_index_grows_and_rejects_negative_ids() -> None:
    index = DenseIndex(torch.full((4,), -1, dtype=torch.int32))
    index.assign(torch.tensor([10]), torch.tensor([3], dtype=torch.int32))
    assert index.size >= 11
    assert index.resolve(torch.tensor([10, 3, 11, -1])).tolist() == [3, -1, -1, -1]
    with pytest.raises(ValueError):
        index.assign(torch.tensor([-2]), torch.tensor([0], dtype=torch.int32))


def test_keyed_index_rejects_duplicates() -> None:
    with pytest.raises(ValueError):
        KeyedIndex.build(torch.tensor([3, 1, 3]), torch.zeros(3, dtype=torch.int32))


def test_unknown_policy_validation() -> None:
    with pytest.raises(ValueError):
        UnknownPolicy("default")
    with pytest.raises(ValueError):
        UnknownPolicy("nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", _backends())
def test_truncated_rows_live_in_the_rotated_basis_and_decode_back(backend: str) -> None:
    from compression.rotation import weighted_pca_rotation

    torch.manual_seed(4)
    rows = torch.randn(400, 4) @ torch.randn(4, 32)  # rank 4: 8 rotated coordinates hold it all
    rotation = weighted_pca_rotation(rows, torch.ones(400))
    classes = [RowClass(32, 32), RowClass(8, 32), RowClass(0, 32)]
    cls = torch.tensor([0, 1, 2] * 133 + [1])
    table = build_table(rows, cls, classes, rotation=rotation)
    table.backend = backend  # type: ignore[assignment]
    assert table.truncated(1) and not table.truncated(0) and not table.truncated(2)
    # full-dim rows are stored as they are, bit for bit
    assert torch.equal(table.slabs[0].view(torch.float32).reshape(-1, 32)[0], rows[0])
    got = table.lookup(torch.arange(400)).values
    keep = cls != 2
    # the rotation is stored in fp16: truncated rows come back within its rounding (~1e-3 relative)
    assert torch.allclose(got[keep], rows[keep], rtol=2e-3, atol=5e-3)
    assert torch.equal(got[~keep], torch.zeros(int((~keep).sum()), 32))
    new = torch.randn(3, 4) @ torch.randn(4, 32)
    new = new @ rotation[:, :4] @ rotation[:, :4].T  # inside the span the rotation keeps
    table.put(torch.tensor([1000, 1001, 1002]), new, 1)
    assert torch.allclose(table.lookup(torch.tensor([1000, 1001, 1002])).values, new, rtol=2e-3, atol=5e-3)


@pytest.mark.skipif(not COMPILED_AVAILABLE, reason="compiled decoder not built")
def test_compiled_rotation_matches_reference() -> None:
    from compression.rotation import weighted_pca_rotation

    torch.manual_seed(5)
    rows = torch.randn(3000, 48)
    rotation = weighted_pca_rotation(rows, torch.rand(3000))
    classes = [RowClass(48, 16), RowClass(24, 8), RowClass(12, 4), RowClass(6, 1)]
    table = build_table(rows, torch.randint(0, 4, (3000,)), classes, rotation=rotation)
    query = torch.randint(-10, 3010, (4000,))
    table.backend = "compiled"
    fast = table.lookup(query).values
    table.backend = "torch"
    ref = table.lookup(query).values
    # same math, different summation order (axpy per coordinate vs a blocked matmul)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=1e-5)
