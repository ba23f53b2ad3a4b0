"""The open-addressing hash index: against a dict model (hypothesis), compiled vs torch paths,
the agreed slot formula, in-place growth, and through the table's compiled decode pipeline;
capacities of any size (not only powers of two), and indexes built with the older
power-of-two formula still found."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import CompressedTable, RowClass, compress, load_table, save_table
from compression import hash_index as hi
from compression.hash_index import EMPTY, HashIndex, capacity_for, home_slots
from compression.kernels import cpu_c
from compression.synthetic import sample_ids, zipf_frequencies

PATHS = ["torch"] + (["compiled"] if cpu_c.HASH_OPS_AVAILABLE else [])


def check_invariants(index: HashIndex, model: dict[int, int]) -> None:
    keys, locs = index.live_items()
    assert dict(zip(keys.tolist(), locs.tolist(), strict=True)) == model
    assert index.count == len(model) and index.num_ids == len(model)
    assert index.overflow_count <= index.overflow_capacity * hi.MAX_LOAD
    # every static key is in its own static slot, and no ID is in both parts
    skeys = hi.slot_keys(index.static)
    sheld = torch.nonzero(skeys != EMPTY).flatten()
    if index.static.shape[0]:
        assert torch.equal(hi.static_positions(skeys[sheld], index.pilots, index.static.shape[0]), sheld)
    assert bool((index.static[skeys == EMPTY, 2] == -1).all())
    assert not bool(torch.isin(index.keys, skeys[sheld]).any())
    # every held overflow key is reachable from its home slot without crossing a free slot
    cap = index.overflow_capacity
    keys = index.keys  # computed from the slots' two words: once
    held = torch.nonzero(keys != EMPTY).flatten()
    homes = home_slots(keys[held], cap)
    for slot, home in zip(held.tolist(), homes.tolist(), strict=True):
        s = home
        while s != slot:
            assert int(keys[s]) != EMPTY
            s = (s + 1) % cap
    assert bool((index.locator[keys == EMPTY] == -1).all())


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
@given(batches=ops, start=st.integers(hi.MIN_CAPACITY, 200))
def test_matches_a_dict_model(impl: str, batches: list[tuple[bool, list[int]]], start: int) -> None:
    """Any starting capacity (mostly not a power of two; growth picks multiples of 16)."""
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        index = HashIndex.empty(start)
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


def fmix64(key: int) -> int:
    """The agreed hash, in Python ints mod 2**64 (MurmurHash3's 64-bit finalizer)."""
    x = key % 2**64
    x ^= x >> 33
    x = x * 0xFF51AFD7ED558CCD % 2**64
    x ^= x >> 33
    x = x * 0xC4CEB9FE1A85EC53 % 2**64
    return x ^ (x >> 33)


def home(key: int, cap: int) -> int:
    """The agreed home slot: the hash's top 32 bits scaled onto [0, cap) (multiply-high)."""
    return ((fmix64(key) >> 32) * cap) >> 32


def old_home(key: int, cap: int) -> int:
    """The home slot of power-of-two indexes before any capacity was allowed: the top log2(cap) bits."""
    return fmix64(key) >> (64 - (cap.bit_length() - 1))


def test_slot_formula_is_the_agreed_one() -> None:
    ids = torch.tensor([0, 1, -1, 12345, -(2**62), 2**63 - 1, EMPTY + 1], dtype=torch.int64)
    for cap in (16, 1024, 1 << 20, 17, 48, 1000, 1428576, hi.MAX_CAPACITY, (1 << 31) - 1):
        want = [home(i, cap) for i in ids.tolist()]
        assert home_slots(ids, cap).tolist() == want
        assert all(0 <= h < cap for h in want)
    index = HashIndex.empty(16)
    index.assign(torch.tensor([12345]), torch.tensor([7], dtype=torch.int32))
    assert int(index.keys[home_slots(torch.tensor([12345]), 16)[0]]) == 12345


@settings(max_examples=200, deadline=None)
@given(key=st.integers(-(2**63), 2**63 - 1), log2=st.integers(0, 31))
def test_power_of_two_homes_are_the_old_ones(key: int, log2: int) -> None:
    """For cap = 2**k the multiply-high home is exactly the old ``fmix64 >> (64 - k)``, which is
    what keeps format-3 files written with power-of-two capacities valid."""
    cap = 1 << log2
    assert home(key, cap) == (old_home(key, cap) if log2 else 0)
    assert home_slots(torch.tensor([key]), cap).tolist() == [home(key, cap)]


def old_layout_slots(keys: list[int], locs: list[int], cap: int) -> torch.Tensor:
    """Slots placed the way the power-of-two code placed them (old home, masked wrap), in Python."""
    table_keys, table_locs = [EMPTY] * cap, [-1] * cap
    for key, loc in zip(keys, locs, strict=True):
        s = old_home(key, cap)
        while table_keys[s] != EMPTY:
            s = (s + 1) & (cap - 1)
        table_keys[s], table_locs[s] = key, loc
    return hi.pack_slots(torch.tensor(table_keys, dtype=torch.int64), torch.tensor(table_locs, dtype=torch.int32))


@pytest.mark.parametrize("impl", PATHS)
def test_an_index_built_with_the_old_power_of_two_formula_is_found(impl: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A file written before this change (power-of-two capacity, old home, masked wrap) loads,
    validates, finds every key (also in clusters that wrap past the end) and takes writes."""
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        g = torch.Generator().manual_seed(11)
        cap = 1024
        keys = torch.unique(torch.randint(-(2**62), 2**62, (700,), generator=g)).tolist()
        wrap = [k for k in range(1, 200_000) if old_home(k, cap) == cap - 1][:5]  # a cluster over the end
        keys = [k for k in keys if k not in wrap][: 715 - len(wrap)] + wrap
        locs = list(range(len(keys)))
        index = HashIndex.from_state({"index.slots": old_layout_slots(keys, locs, cap)})  # validates reachability
        assert index.capacity == cap and index.count == len(keys)
        assert index.resolve(torch.tensor(keys + [3, -5])).tolist() == locs + [-1, -1]
        index.assign(torch.tensor(keys[:100]), torch.full((100,), -1, dtype=torch.int32))  # deletes by the same homes
        index.assign(torch.tensor([7, 8]), torch.tensor([1, 2], dtype=torch.int32))  # 617 IDs: no growth
        assert index.capacity == cap
        assert index.resolve(torch.tensor(keys + [7, 8])).tolist() == [-1] * 100 + locs[100:] + [1, 2]
    finally:
        cpu_c.HASH_OPS_AVAILABLE = saved


def test_capacity_for_is_a_multiple_of_16_at_load_up_to_max() -> None:
    for n in [0, 1, 11, 12, 13, 100, 20_000, 1_000_000, 12_345_678]:
        cap = capacity_for(n)
        assert cap % 16 == 0 and cap >= hi.MIN_CAPACITY and n <= cap * hi.MAX_LOAD
        assert cap == hi.MIN_CAPACITY or (cap - 16) * hi.MAX_LOAD < n  # the smallest such
    assert capacity_for(1_000_000) == 1_428_576  # 16.3 MiB of slots (was 2**21: 24 MiB)
    # built in one go: a static part (1,063,830 slots at load 0.94, 200,000 pilots) and an
    # empty overflow of MIN_CAPACITY slots, 13.2 bytes per ID; 17.1 without the compiled library
    assert hi.static_shape(1_000_000) == (1_063_830, 200_000)
    if hi.static_available():
        assert hi.hash_index_bytes(1_000_000) == 12 * (1_063_830 + 16) + 2 * 200_000
    else:
        assert hi.hash_index_bytes(1_000_000) == 12 * 1_428_576
    with pytest.raises(ValueError, match="at most"):
        capacity_for(int(hi.MAX_CAPACITY * hi.MAX_LOAD) + 10)


@pytest.mark.parametrize("impl", PATHS)
def test_growth_is_geometric_and_stops_at_max_ids(impl: str) -> None:
    """Batches of one ID: the capacity grows by about 1.5x each time (amortized O(1) rehash per
    ID), and with ``max_ids`` it stops at capacity_for(max_ids, CHURN_LOAD)."""
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        index, capacities = HashIndex.empty(), []
        for i in range(3000):
            index.assign(torch.tensor([i * 7919]), torch.tensor([i], dtype=torch.int32))
            if not capacities or capacities[-1] != index.capacity:
                capacities.append(index.capacity)
        assert len(capacities) <= math.ceil(math.log(3000 / 0.7 / 16, 1.5)) + 2
        assert all(b >= 1.4 * a for a, b in zip(capacities, capacities[1:]))
        assert index.resolve(torch.arange(3000) * 7919).tolist() == list(range(3000))
        capped = HashIndex.empty()
        for i in range(1000):
            capped.assign(torch.tensor([i]), torch.tensor([i], dtype=torch.int32), max_ids=1000)
        assert capped.capacity == capacity_for(1000, hi.CHURN_LOAD)
        # past max_ids (a table evicts before it inserts, so only this index API sees it): just enough room
        capped.assign(torch.tensor([5000]), torch.tensor([0], dtype=torch.int32), max_ids=1000)
        assert capped.capacity == capacity_for(1001, hi.CHURN_LOAD)
    finally:
        cpu_c.HASH_OPS_AVAILABLE = saved


@st.composite
def keyed_batches(draw: st.DrawFn) -> tuple[int, list[list[int]]]:
    cap = draw(st.integers(hi.MIN_CAPACITY, 300).filter(lambda c: c & (c - 1) != 0))
    keys = st.integers(-(2**63) + 1, 2**63 - 1) | st.integers(-60, 60)
    return cap, draw(st.lists(st.lists(keys, min_size=1, max_size=40, unique=True), min_size=1, max_size=8))


@pytest.mark.skipif(not cpu_c.HASH_OPS_AVAILABLE, reason="compiled hash ops not built")
@settings(max_examples=60, deadline=None)
@given(case=keyed_batches(), data=st.data())
def test_compiled_and_torch_slot_arrays_agree_on_any_capacity(case: tuple[int, list[list[int]]], data: st.DataObject) -> None:
    """Non-power-of-two capacities: one ID at a time into a capacity that needs no growth (a
    rehash is batched on the torch path), the C and torch inserts leave identical slot arrays;
    in batches and after deletes (the torch path re-inserts a cluster's tail, C
    shifts it back) the occupied slots are identical (linear probing's occupancy does not
    depend on order) and every answer is."""
    cap, batches = case
    flat = list(dict.fromkeys(k for b in batches for k in b))
    gone = data.draw(st.lists(st.sampled_from(flat), max_size=len(flat)))
    indexes = {}
    for impl in ("compiled", "torch"):
        cpu_c.HASH_OPS_AVAILABLE = impl == "compiled"
        try:
            roomy = max(cap, capacity_for(len(flat)))
            one, batched = HashIndex.empty(roomy + (roomy & (roomy - 1) == 0)), HashIndex.empty(cap)
            for i, key in enumerate(flat):
                one.assign(torch.tensor([key]), torch.tensor([i], dtype=torch.int32))
            for b in batches:
                batched.assign(torch.tensor(b), torch.tensor([flat.index(k) for k in b], dtype=torch.int32))
            batched.assign(torch.tensor(gone, dtype=torch.int64), torch.full((len(gone),), -1, dtype=torch.int32))
            probe = torch.tensor(flat + [61, -61], dtype=torch.int64)
            indexes[impl] = (one.slots.clone(), batched.keys != EMPTY, batched.resolve(probe), one.capacity)
        finally:
            cpu_c.HASH_OPS_AVAILABLE = True
    (c_one, c_occ, c_found, c_cap), (t_one, t_occ, t_found, t_cap) = indexes["compiled"], indexes["torch"]
    assert c_cap == t_cap and torch.equal(c_one, t_one)
    assert torch.equal(c_occ, t_occ) and torch.equal(c_found, t_found)
    model = {k: flat.index(k) for k in flat if k not in set(gone)}
    assert c_found.tolist() == [model.get(k, -1) for k in flat + [61, -61]]  # 61 may be one of the keys


def test_slot_bytes_are_the_agreed_packed_layout() -> None:
    """12 bytes a slot: the int64 key little-endian, then the int32 locator; free = INT64_MIN, -1."""
    index = HashIndex.empty(16)
    key = -0x123456789ABCDEF
    index.assign(torch.tensor([key]), torch.tensor([0x0BADF00D], dtype=torch.int32))
    raw = index.slots.contiguous().view(torch.uint8).reshape(16, 12)
    s = int(home_slots(torch.tensor([key]), 16)[0])
    assert bytes(raw[s].tolist()) == key.to_bytes(8, "little", signed=True) + (0x0BADF00D).to_bytes(4, "little")
    free = (s + 1) % 16
    assert bytes(raw[free].tolist()) == EMPTY.to_bytes(8, "little", signed=True) + (-1).to_bytes(4, "little", signed=True)
    assert index.nbytes == 12 * 16 == index.slots.numel() * 4


@pytest.mark.parametrize("impl", PATHS)
def test_strided_ids_spread_like_random_ones(impl: str) -> None:
    """IDs in an arithmetic progression (the bench's ``i * 1,000,003``): one multiply (format 2's
    Fibonacci hash) put about a third in their home slot at load 0.48; fmix64 about three in four,
    which is what a lookup's mispredicted probe branches depend on."""
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        n = 30_000
        index = HashIndex.build(torch.arange(n) * 1_000_003 - 7 * n, torch.arange(n, dtype=torch.int32), capacity=1 << 16)
        keys = index.keys
        held = torch.nonzero(keys != EMPTY).flatten()
        at_home = float((home_slots(keys[held], index.capacity) == held).float().mean())
        assert 0.45 < index.load < 0.5 and at_home > 0.7
    finally:
        cpu_c.HASH_OPS_AVAILABLE = saved


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
    assert compiled.capacity == reference.capacity and compiled.count <= compiled.capacity * hi.MAX_LOAD
    assert compiled.capacity % 16 == 0 and compiled.capacity & (compiled.capacity - 1)  # not a power of two


def test_rejects_the_empty_marker_and_bad_state() -> None:
    index = HashIndex.empty()
    with pytest.raises(ValueError, match="INT64_MIN"):
        index.assign(torch.tensor([EMPTY]), torch.tensor([0], dtype=torch.int32))
    assert index.resolve(torch.tensor([EMPTY])).tolist() == [-1]
    assert HashIndex(hi.new_slots(24)).capacity == 24  # any capacity in [MIN_CAPACITY, MAX_CAPACITY]
    with pytest.raises(ValueError, match="capacity must be in"):
        HashIndex(hi.new_slots(8))
    with pytest.raises(ValueError, match="int32"):
        HashIndex(torch.zeros(16, 2, dtype=torch.int64))
    keys = torch.full((16,), EMPTY)
    keys[(int(home_slots(torch.tensor([5]), 16)[0]) + 3) % 16] = 5  # misplaced: a free slot lies between home and it
    with pytest.raises(ValueError, match="probing"):
        HashIndex(hi.pack_slots(keys, torch.where(keys == EMPTY, -1, 0)))


def test_table_lookups_through_the_hash_index_on_both_backends(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    ids = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1)) * 7919 - 10**9
    table, _ = compress(rows, freqs, ratio=4, ids=ids)  # the index costs 12 B a slot: 8x leaves no room at 32 dims
    assert isinstance(table.index, HashIndex)
    assert table.stats().index_bytes == table.index.nbytes == hi.hash_index_bytes(ids.numel())
    assert table.index.has_static == hi.static_available()
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
    slots_before = table.index.slots.data_ptr()
    table.put(ids[2000:2100], rows[2000:2100] * 2, 0)  # no growth: the same slots are written
    assert table.index.slots.data_ptr() == slots_before
    table.compact()
    assert table.index.slots.data_ptr() == slots_before  # compaction repoints locators in place
    res = table.lookup(ids)
    assert not bool(res.found[:1000].any()) and bool(res.found[1000:].all())
    assert torch.equal(res.values[2000:2100], rows[2000:2100] * 2)
    save_table(table, tmp_path / "t.safetensors")
    loaded, manifest = load_table(tmp_path / "t.safetensors")
    assert manifest["index"] == "hash" and isinstance(loaded.index, HashIndex)
    assert torch.equal(loaded.lookup(ids).values, res.values)


def test_an_8x_keyed_table_spends_its_budget_on_rows_not_index_padding() -> None:
    """compress(ids=keys, ratio=8) at 64 dims: the index is 12 B a slot at load > 0.6 (a
    power-of-two capacity put 20,000 IDs at 0.61 but 30,000 at 0.46; the static part holds them at
    0.94), so more rows keep codes."""
    g = torch.Generator().manual_seed(5)
    n = 30_000
    rows = torch.randn(n, 64, generator=g)
    freqs = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    ids = torch.randperm(n, generator=g) * 1_000_003 - 2**45
    table, _ = compress(rows, freqs, ratio=8, ids=ids)
    assert isinstance(table.index, HashIndex) and table.nbytes <= rows.numel() * 4 / 8
    assert table.stats().index_bytes == table.index.nbytes == hi.hash_index_bytes(n)
    assert table.index.load > (0.9 if hi.static_available() else 0.6)
    probe = ids[:2000]
    fast = table.lookup(probe)
    table.backend = "torch"
    slow = table.lookup(probe)
    assert torch.equal(fast.locators, slow.locators) and torch.allclose(fast.values, slow.values, atol=1e-6)
    assert bool((fast.found if fast.pruned is None else fast.found | fast.pruned).all())


def _home_share(index: HashIndex, keys: torch.Tensor, freqs: torch.Tensor) -> tuple[float, float]:
    """(share of keys, share of the traffic ``freqs`` sends to them) resolved in their home slot."""
    slot_keys = index.keys
    held = torch.nonzero(slot_keys != EMPTY).flatten()
    at_home = home_slots(slot_keys[held], index.capacity) == held
    home_keys = slot_keys[held[at_home]]
    weight = freqs.double() / freqs.double().sum()
    return float(at_home.double().mean()), float(weight[torch.isin(keys, home_keys)].sum())


@pytest.mark.parametrize("impl", PATHS)
def test_a_frequency_ordered_build_puts_the_hot_ids_in_their_home_slots(impl: str) -> None:
    """Inserted hottest first, the IDs most lookups ask for take their home slots (one slot, one
    line, no probe); the index holds the same IDs, exactly as reachable as any insertion order."""
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        n = 30_000
        freqs = zipf_frequencies(n, seed=4)
        keys = torch.randperm(n, generator=torch.Generator().manual_seed(4)) * 1_000_003 - 7 * n
        locs = torch.randperm(n, generator=torch.Generator().manual_seed(5)).to(torch.int32)
        plain = HashIndex.build(keys, locs, static=False)
        hot = HashIndex.build(keys, locs, frequencies=freqs, static=False)
        assert hot.capacity == plain.capacity == capacity_for(n) and 0.69 < hot.load <= hi.MAX_LOAD
        check_invariants(hot, dict(zip(keys.tolist(), locs.tolist(), strict=True)))
        assert torch.equal(hot.resolve(keys), locs) and torch.equal(plain.resolve(keys), locs)
        hottest = keys[int(torch.argmax(freqs))]
        assert int(hot.resolve(hottest.view(1))[0]) == int(locs[int(torch.argmax(freqs))])
        assert int(home_slots(hottest.view(1), hot.capacity)[0]) == int(torch.nonzero(hot.keys == hottest).flatten()[0])
        keys_plain, traffic_plain = _home_share(plain, keys, freqs)
        keys_hot, traffic_hot = _home_share(hot, keys, freqs)
        assert abs(keys_hot - keys_plain) < 0.02  # as many keys at home in any order ...
        assert traffic_plain < 0.75 and traffic_hot > 0.9  # ... but the ones the traffic asks for
    finally:
        cpu_c.HASH_OPS_AVAILABLE = saved


def test_frequency_ordered_hash_lookups_equal_dense_lookups_of_the_same_rows(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    """The 8x table's own slabs behind a hash index of arbitrary int64 keys (open addressing
    hot-first, and a static part) answer exactly what the dense index answers for the same rows,
    through the compiled pipeline and the torch reference; keys that are not held stay unknown."""
    rows, freqs = zipf_rows
    dense, _ = compress(rows, freqs, ratio=8, candidates=[RowClass(32, b) for b in (16, 8, 4, 2, 1)] + [RowClass(0, 32)])
    n = rows.shape[0]
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(6)) * 1_000_003 - 7 * n
    positions, locs = dense.index.live_items()
    probe = torch.cat([sample_ids(freqs, 6000, seed=7), torch.randint(0, n, (3000,), generator=torch.Generator().manual_seed(8))])
    want = dense.lookup(probe)
    for static in (False, True) if hi.static_available() else (False,):
        index = HashIndex.build(keys[positions], locs, frequencies=freqs[positions], static=static)
        assert index.has_static == static
        hashed = CompressedTable(dense.dim, dense.classes, dense.slabs, dense.used, index, dense.free, dense.rotation, dense.unknown)
        for backend in ("compiled", "torch") if cpu_c.AVAILABLE else ("torch",):
            hashed.backend = backend
            got = hashed.lookup(keys[probe])
            assert torch.equal(got.values, want.values) and torch.equal(got.locators, want.locators)
            missing = hashed.lookup(torch.tensor([EMPTY, 12345, -(10**15)]))
            assert missing.num_unknown == 3


def test_compress_builds_a_keyed_tables_hash_index_in_one_read_per_id(zipf_rows) -> None:  # type: ignore[no-untyped-def]
    """compress() gives a keyed table a static part: every ID in its own static slot (one read,
    hot or cold), the overflow empty; without the compiled library, open addressing hottest first."""
    rows, freqs = zipf_rows
    ids = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(2)) * 7919 - 10**9
    table, _ = compress(rows, freqs, ratio=4, ids=ids)
    index = table.index
    assert isinstance(index, HashIndex)
    if hi.static_available():
        assert index.overflow_count == 0 and index.count == ids.numel()
        assert bool((hi._torch_static_find(index.static, index.pilots, ids) >= 0).all())
    else:
        assert _home_share(index, ids, freqs)[1] > 0.9
    with pytest.raises(ValueError, match="frequencies for"):
        HashIndex.build(ids, torch.zeros(ids.numel(), dtype=torch.int32), frequencies=freqs[:10])


@pytest.mark.parametrize("impl", PATHS)
def test_rebuild_without_a_static_part_relays_an_arrival_ordered_index_hot_first(impl: str) -> None:
    """Without the compiled static part: an index filled coldest first (the worst arrival order)
    and then rebuilt by frequency holds the same IDs at the same locators, at the same capacity,
    with the traffic's IDs in their home slots."""
    saved, saved_static = cpu_c.HASH_OPS_AVAILABLE, cpu_c.STATIC_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    cpu_c.STATIC_OPS_AVAILABLE = False
    try:
        n = 20_000
        freqs = zipf_frequencies(n, seed=8)
        keys = torch.randperm(n, generator=torch.Generator().manual_seed(8)) * 999_983 + 5
        locs = torch.arange(n, dtype=torch.int32)
        index = HashIndex.empty()
        cold_first = torch.argsort(freqs)
        for part in torch.chunk(cold_first, 4):  # grows (rehashes) on the way, like a stream
            index.assign(keys[part], locs[part])
        capacity = index.capacity
        _, traffic_before = _home_share(index, keys, freqs)
        index.rebuild(lambda ids: freqs[_positions(keys, ids)])
        _, traffic_after = _home_share(index, keys, freqs)
        assert index.capacity == capacity and index.count == n and not index.has_static
        check_invariants(index, dict(zip(keys.tolist(), locs.tolist(), strict=True)))
        assert traffic_before < 0.75 and traffic_after > 0.9
        with pytest.raises(ValueError, match="frequencies"):
            index.rebuild(lambda ids: torch.ones(3))
    finally:
        cpu_c.HASH_OPS_AVAILABLE, cpu_c.STATIC_OPS_AVAILABLE = saved, saved_static


def _positions(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Where each of ``ids`` sits in ``keys`` (all present)."""
    order = torch.argsort(keys)
    return order[torch.searchsorted(keys[order], ids)]


# ---------------------------------------------------------------------------------- the static part

STATIC = pytest.mark.skipif(not hi.static_available(), reason="the static part is built by the compiled library")


@STATIC
@pytest.mark.parametrize("impl", PATHS)
@settings(max_examples=40, deadline=None)
@given(
    start=st.lists(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1) | st.integers(-60, 60), min_size=1, max_size=300, unique=True),
    batches=ops,
)
def test_a_static_part_matches_a_dict_model(impl: str, start: list[int], batches: list[tuple[bool, list[int]]]) -> None:
    """Built with a static part over ``start``, then any upserts and deletes: IDs leave static
    slots, new IDs take free static slots or the overflow, and the compiled and torch paths both
    answer as a dict does (a static part built over the lot again, at the end, too)."""
    index = HashIndex.build(torch.tensor(start), torch.arange(len(start), dtype=torch.int32))
    assert index.has_static and index.overflow_count == 0
    model = {k: i for i, k in enumerate(start)}
    saved = cpu_c.HASH_OPS_AVAILABLE
    cpu_c.HASH_OPS_AVAILABLE = saved and impl == "compiled"
    try:
        for step, (upsert, ids) in enumerate(batches):
            t = torch.tensor(ids)
            if upsert:
                locs = torch.arange(len(ids), dtype=torch.int32) + 1000 * step
                index.assign(t, locs)
                for k, v in zip(ids, locs.tolist(), strict=True):
                    model[k] = v
            else:  # callers delete distinct IDs (CompressedTable.delete takes torch.unique)
                ids = list(dict.fromkeys(ids))
                assert index.delete(torch.tensor(ids)).tolist() == [model.get(k, -1) for k in ids]
                for k in ids:
                    model.pop(k, None)
            check_invariants(index, model)
            probe = torch.tensor(list(model) + [EMPTY, 61, -61])
            assert index.resolve(probe).tolist() == [model.get(k, -1) for k in probe.tolist()]
            # what deleting IDs frees in the overflow (CompressedTable.reserve): all held IDs, all of it
            held = torch.tensor(list(model), dtype=torch.int64)
            assert len(model) - index.static_held(held) == index.overflow_count
    finally:
        cpu_c.HASH_OPS_AVAILABLE = saved
    index.rebuild()
    check_invariants(index, model)
    assert index.overflow_count == 0 or len(model) < 2  # every ID placed again (one ID: no rebuild)


@STATIC
def test_rebuild_moves_a_streamed_index_into_a_static_part() -> None:
    """An index filled by upserts (all in the overflow, which grew at load <= 0.7) rebuilt: every
    ID in a static slot of its own, the overflow back to MIN_CAPACITY, the same locators, a
    quarter fewer bytes, and the compiled lookup pipeline answers as the torch reference."""
    n = 20_000
    keys = torch.randperm(n, generator=torch.Generator().manual_seed(8)) * 999_983 + 5
    locs = torch.arange(n, dtype=torch.int32)
    index = HashIndex.empty()
    for part in torch.chunk(torch.arange(n), 5):
        index.assign(keys[part], locs[part])
    before = index.nbytes
    assert not index.has_static and before / n > 17
    index.rebuild()
    assert index.has_static and index.overflow_count == 0 and index.overflow_capacity == hi.MIN_CAPACITY
    check_invariants(index, dict(zip(keys.tolist(), locs.tolist(), strict=True)))
    assert index.nbytes / n < 13.5 and index.nbytes == 12 * (index.static.shape[0] + 16) + 2 * index.pilots.numel()
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    table.put(keys, torch.randn(n, 4, generator=torch.Generator().manual_seed(1)), 0)
    table.index.rebuild()  # type: ignore[attr-defined]
    probe = torch.cat([keys[torch.randint(0, n, (3000,), generator=torch.Generator().manual_seed(2))], torch.tensor([EMPTY, 4, -7])])
    fast = table.lookup(probe)
    table.backend = "torch"
    slow = table.lookup(probe)
    assert torch.equal(fast.locators, slow.locators) and torch.equal(fast.values, slow.values) and fast.num_unknown == 3


@STATIC
def test_a_static_index_refuses_inconsistent_parts() -> None:
    keys = torch.arange(500) * 7919 - 3
    index = HashIndex.build(keys, torch.arange(500, dtype=torch.int32))
    static, pilots, slots = index.static.clone(), index.pilots.clone(), index.slots.clone()
    HashIndex(slots, static, pilots)  # as built: fine
    with pytest.raises(ValueError, match="both its slots and its pilots"):
        HashIndex(slots, static)
    moved = pilots.clone()
    moved[int(torch.nonzero(moved >= 0).flatten()[0])] += 1
    with pytest.raises(ValueError, match="static slots"):
        HashIndex(slots, static, moved)
    twice = hi.new_slots(16)
    hi._torch_upsert(twice, keys[:1], torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="both its static part and its overflow"):
        HashIndex(twice, static, pilots)


@STATIC
def test_eviction_samples_draw_from_both_parts() -> None:
    keys = torch.arange(4000) * 7919 - 3
    index = HashIndex.build(keys, torch.arange(4000, dtype=torch.int32))
    extra = torch.arange(3000) * 7919 + 10**12
    index.assign(extra, torch.arange(3000, dtype=torch.int32))  # mostly into the overflow
    assert index.overflow_count > 2000
    drawn, locs = index.sample(2000, torch.Generator().manual_seed(3))
    assert bool(torch.isin(drawn, keys).any()) and bool(torch.isin(drawn, extra).any())
    assert torch.equal(index.resolve(drawn), locs)
