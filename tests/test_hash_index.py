"""The open-addressing hash index: against a dict model (hypothesis), compiled vs torch paths,
the agreed slot formula, in-place growth, and through the table's compiled decode pipeline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import CompressedTable, RowClass, compress, load_table, save_table
from compression import hash_index as hi
from compression.hash_index import EMPTY, HashIndex, capacity_for, home_slots
from compression.kernels import cpu_c

PATHS = ["torch"] + (["compiled"] if cpu_c.HASH_OPS_AVAILABLE else [])


def check_invariants(index: HashIndex, model: dict[int, int]) -> None:
    keys, locs = index.live_items()
    assert dict(zip(keys.tolist(), locs.tolist(), strict=True)) == model
    assert index.count == len(model) and index.num_ids == len(model)
    assert index.count <= index.capacity * hi.MAX_LOAD
    # every held key is reachable from its home slot without crossing a free slot
    cap = index.capacity
    held = torch.nonzero(index.keys != EMPTY).flatten()
    homes = home_slots(index.keys[held], cap)
    for slot, home in zip(held.tolist(), homes.tolist(), strict=True):
        s = home
        while s != slot:
            assert int(index.keys[s]) != EMPTY
            s = (s + 1) % cap
    assert bool((index.locator[index.keys == EMPTY] == -1).all())


ops = st.lists(
    st.tuples(
        st.booleans(),  # True = upsert, False = delete
        st.lists(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1) | st.integers(-40, 40), min_size=1, max_size=60),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.parametrize("impl", PATHS)
@settings(max_examples=60, deadline=None)
@given(batches=ops)
def test_matches_a_dict_model(impl: str, batches: list[tuple[bool, list[int]]]) -> None:
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        index = HashIndex.empty()
        model: dict[int, int] = {}
        for k, (upsert, ids) in enumerate(batches):
            t = torch.tensor(ids, dtype=torch.int64)
            if upsert:
                locs = torch.arange(len(ids), dtype=torch.int32) + 100 * k
                index.assign(t, locs)
                for i, loc in zip(ids, locs.tolist(), strict=True):
                    model[i] = loc
            else:
                index.assign(t, torch.full((len(ids),), -1, dtype=torch.int32))
                for i in ids:
                    model.pop(i, None)
            check_invariants(index, model)
            probe = torch.tensor(ids + [7, -7, 2**62], dtype=torch.int64)
            expected = [model.get(i, -1) for i in probe.tolist()]
            assert index.resolve(probe).tolist() == expected
    finally:
        cpu_c.HASH_OPS_AVAILABLE = saved


def test_slot_formula_is_the_agreed_one() -> None:
    ids = torch.tensor([0, 1, -1, 12345, -(2**62), 2**63 - 1], dtype=torch.int64)
    for cap in (16, 1024, 1 << 20):
        log2 = cap.bit_length() - 1
        want = [((i % 2**64) * 0x9E3779B97F4A7C15 % 2**64) >> (64 - log2) for i in ids.tolist()]
        assert home_slots(ids, cap).tolist() == want
    index = HashIndex.empty(16)
    index.assign(torch.tensor([12345]), torch.tensor([7], dtype=torch.int32))
    assert int(index.keys[home_slots(torch.tensor([12345]), 16)[0]]) == 12345


@pytest.mark.skipif(not cpu_c.HASH_OPS_AVAILABLE, reason="compiled hash ops not built")
def test_compiled_and_torch_paths_agree_on_a_large_churn() -> None:
    g = torch.Generator().manual_seed(3)
    compiled, reference = HashIndex.empty(), HashIndex.empty()
    for step in range(6):
        ids = torch.randint(-(2**40), 2**40, (20_000,), generator=g)
        locs = torch.randint(0, 2**27, (20_000,), generator=g, dtype=torch.int64).to(torch.int32)
        gone = ids[torch.randint(0, 20_000, (5000,), generator=g)]
        compiled.assign(ids, locs)
        compiled.assign(gone, torch.full((5000,), -1, dtype=torch.int32))
        cpu_c.HASH_OPS_AVAILABLE = False
        try:
            reference.assign(ids, locs)
            reference.assign(gone, torch.full((5000,), -1, dtype=torch.int32))
            probe = torch.cat([ids, gone, torch.randint(-(2**40), 2**40, (1000,), generator=g)])
            torch_answer = reference.resolve(probe)
        finally:
            cpu_c.HASH_OPS_AVAILABLE = True
        assert torch.equal(compiled.resolve(probe), torch_answer)
        assert compiled.count == reference.count
    assert compiled.capacity == capacity_for(compiled.count) or compiled.capacity == 2 * capacity_for(compiled.count)


def test_rejects_the_empty_marker_and_bad_state() -> None:
    index = HashIndex.empty()
    with pytest.raises(ValueError, match="INT64_MIN"):
        index.assign(torch.tensor([EMPTY]), torch.tensor([0], dtype=torch.int32))
    assert index.resolve(torch.tensor([EMPTY])).tolist() == [-1]
    with pytest.raises(ValueError, match="power of two"):
        HashIndex(torch.full((24,), EMPTY), torch.full((24,), -1, dtype=torch.int32))
    keys = torch.full((16,), EMPTY)
    keys[(int(home_slots(torch.tensor([5]), 16)[0]) + 3) % 16] = 5  # misplaced: a free slot lies between home and it
    with pytest.raises(ValueError, match="probing"):
        HashIndex(keys, torch.where(keys == EMPTY, -1, 0).to(torch.int32))


def test_table_lookups_through_the_hash_index_on_both_backends(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    ids = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1)) * 7919 - 10**9
    table, _ = compress(rows, freqs, ratio=4, ids=ids)  # the index costs 12 B a slot: 8x leaves no room at 32 dims
    assert isinstance(table.index, HashIndex)
    assert table.stats().index_bytes == 12 * table.index.capacity
    probe = torch.cat([ids[torch.randint(0, ids.numel(), (5000,))], torch.tensor([EMPTY, 3, -(10**12)])])
    fast = table.lookup(probe)
    table.backend = "torch"
    slow = table.lookup(probe)
    assert torch.equal(fast.locators, slow.locators)
    assert torch.allclose(fast.values, slow.values, atol=1e-6)  # rotated rows: summation order differs
    assert fast.num_unknown == 3


def test_empty_keyed_table_is_hash_indexed_and_writes_in_place(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    assert isinstance(table.index, HashIndex)
    ids = torch.arange(5000) * 1_000_003 - 2**40
    rows = torch.randn(5000, 4)
    for start in range(0, 5000, 500):
        table.put(ids[start : start + 500], rows[start : start + 500], 0)
    table.delete(ids[:1000])
    keys_before = table.index.keys.data_ptr()
    table.put(ids[2000:2100], rows[2000:2100] * 2, 0)  # no growth: the same arrays are written
    assert table.index.keys.data_ptr() == keys_before
    table.compact()
    assert table.index.keys.data_ptr() == keys_before  # compaction repoints locators in place
    res = table.lookup(ids)
    assert not bool(res.found[:1000].any()) and bool(res.found[1000:].all())
    assert torch.equal(res.values[2000:2100], rows[2000:2100] * 2)
    save_table(table, tmp_path / "t.safetensors")
    loaded, manifest = load_table(tmp_path / "t.safetensors")
    assert manifest["index"] == "hash" and isinstance(loaded.index, HashIndex)
    assert torch.equal(loaded.lookup(ids).values, res.values)
