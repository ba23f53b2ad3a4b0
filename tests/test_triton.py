"""The Triton kernels against the torch reference, for every row class, index kind (dense, runs,
sorted keys with a delta part, open-addressing hash), pooling mode, unknown-ID policy and
output dtype.

Without a GPU they run under ``TRITON_INTERPRET=1`` on CPU tensors (conftest sets it before
anything imports triton); with one, the same tests run on CUDA tensors.  Floats must be equal
bit for bit where the C kernel's are (scalar classes: ``code * scale`` is exact in fp32), and
allclose where the order of a sum differs (rotation, pooling, the binary-code hash's block sum).
The interpreter is slow (~0.1 s a launch), so sizes and example counts are small."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed (pip install triton; the test extra has it)")

from compression import RowClass, build_table  # noqa: E402
from compression.hash_index import slot_keys, static_available  # noqa: E402
from compression.index import KeyedIndex, RunIndex  # noqa: E402
from compression.kernels import select_path, triton_module  # noqa: E402
from compression.layout import LOCATOR_CLASS_SHIFT, SUPPORTED_BITS  # noqa: E402
from compression.pooling import pool_bags  # noqa: E402
from compression.table import CompressedTable  # noqa: E402
from compression.unknown import UnknownPolicy  # noqa: E402
from test_hash_index import fmix64, home  # noqa: E402 - the agreed hash and home slot, written once as the tests' reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set (conftest sets it)", allow_module_level=True)

td = triton_module()
INT64_MIN = -(2**63)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ------------------------------------------------------------------ builders


def build_hash(keys: torch.Tensor, locators: torch.Tensor, cap: int) -> "object":
    """The agreed open-addressing layout (any capacity), built the slow obvious way (Python ints)."""
    assert keys.numel() <= cap
    table_keys = np.full(cap, INT64_MIN, dtype=np.int64)
    table_locs = np.full(cap, -1, dtype=np.int32)
    for key, loc in zip(keys.tolist(), locators.tolist(), strict=True):
        slot = home(key, cap)
        while table_keys[slot] != INT64_MIN:
            slot = slot + 1 if slot + 1 < cap else 0
        table_keys[slot], table_locs[slot] = key, loc
    # the 12-byte slots: int64 key as (low, high) int32 words, then the locator
    words = np.stack([table_keys.view(np.int32).reshape(cap, 2)[:, 0], table_keys.view(np.int32).reshape(cap, 2)[:, 1], table_locs], axis=1)
    return td.HashIndexView(torch.from_numpy(np.ascontiguousarray(words)).to(DEVICE))


def policy(kind: str, dim: int, gen: torch.Generator) -> UnknownPolicy:
    if kind == "zero":
        return UnknownPolicy("zero")
    if kind == "default":
        return UnknownPolicy("default", default=torch.randn(dim, generator=gen))
    if kind == "hashed":
        return UnknownPolicy("hashed", buckets=torch.randn(13, dim, generator=gen).half())
    if kind == "qr":
        return UnknownPolicy("qr", buckets=torch.randn(4 + 6, dim, generator=gen).half(), params=torch.tensor([4, 6]))
    return UnknownPolicy("binary_hash", buckets=torch.randn(3 * 8, dim, generator=gen).half(), params=torch.tensor([9, 3]))


def make_table(
    dim: int, classes: list[RowClass], n: int, index: str, rotated: bool, unknown: str, seed: int
) -> CompressedTable:
    """A table on DEVICE with every class populated, of the given index kind; a keyed table
    also gets a delta part (new IDs after the build) and tombstones (deleted IDs)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, dim, generator=gen)
    cls = torch.randint(0, len(classes), (n,), generator=gen)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0].float().contiguous() if rotated else None
    ids = torch.randperm(10 * n, generator=gen)[:n] * 7 - 3 * n if index in ("keyed", "hash") else None
    if index == "runs":
        cls = torch.sort(cls).values  # class-grouped rows, as exported tables are: few runs
    table = build_table(
        rows, cls, classes, ids=ids, rotation=rotation, unknown=policy(unknown, dim, gen),
        index={"runs": "runs", "dense": "dense", "keyed": "sorted", "hash": "hash"}[index],
    )
    if index == "hash":  # the real HashIndex: inserts after the build and backward-shift deletes
        table.put(torch.arange(5) * 1_000_003 + 11, torch.randn(5, dim, generator=gen), torch.arange(5) % len(classes))
        table.delete(ids[:3])
        assert table.index.kind == "hash"
    if index == "keyed":
        extra = torch.arange(5) * 1_000_003 + 11
        table.put(extra, torch.randn(5, dim, generator=gen), torch.arange(5) % len(classes))
        table.delete(ids[:3])
        assert table.index.delta_keys.numel()  # the delta part is exercised
    elif index == "dense":
        table.delete(torch.tensor([0, n // 2]))
    return table.to(DEVICE)


def query_ids(table: CompressedTable, n: int, seed: int) -> torch.Tensor:
    """Known IDs, unknown ones, negative and extreme ones."""
    gen = torch.Generator().manual_seed(seed)
    known, _ = table.index.live_items()
    known = known.cpu()
    picks = known[torch.randint(0, known.numel(), (n,), generator=gen)] if known.numel() else torch.zeros(n, dtype=torch.int64)
    odd = torch.tensor([-1, -(2**62), 2**62, 2**63 - 1, INT64_MIN + 1, 10**9 + 7], dtype=torch.int64)
    random = torch.randint(-50, 5000, (n,), generator=gen)
    mix = torch.cat([picks, odd, random])
    return mix[torch.randperm(mix.numel(), generator=gen)][:n].to(DEVICE)


def reference(table: CompressedTable, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    table.backend = "torch"
    try:
        return table.lookup(ids)
    finally:
        table.backend = "triton"


def serve_pruned(table: CompressedTable, out: torch.Tensor, ids: torch.Tensor, loc: torch.Tensor) -> None:
    """What :meth:`CompressedTable.lookup` adds after a raw kernel launch: pruned (dim-0) rows
    get the unknown-ID policy's row (the kernel writes zeros for them)."""
    if table._pruned_classes is not None:
        pruned = (loc >= 0) & table._pruned_classes[(loc >> LOCATOR_CLASS_SHIFT).clamp(min=0).long()]
        table.unknown.fill(out, ids, pruned)


def assert_values(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact:
        assert torch.equal(got.float().cpu(), want.float().cpu()), (got - want).abs().max()
    else:
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ strategies

row_classes = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from(SUPPORTED_BITS)), min_size=1, max_size=8, unique=True
)


@st.composite
def configs(draw: st.DrawFn) -> dict:  # type: ignore[type-arg]
    dim = draw(st.sampled_from([1, 3, 8, 13, 32]))
    # class dims: full, and truncations of it (0 = pruned)
    picks = draw(row_classes)
    dims = [dim, max(1, dim // 2), max(1, dim // 4), 1, 0]
    classes = sorted({RowClass(dims[d], b) for d, b in picks})
    return {
        "dim": dim,
        "classes": classes,
        "n": draw(st.integers(1, 120)),
        "index": draw(st.sampled_from(["dense", "runs", "keyed", "hash"])),
        "rotated": draw(st.booleans()) and dim > 1,
        "unknown": draw(st.sampled_from(["zero", "default", "hashed", "qr", "binary_hash"])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "seed": draw(st.integers(0, 2**16)),
    }


# every example on a GPU compiles a new kernel variant (seconds each): fewer there
FAST = settings(max_examples=10 if DEVICE.type == "cpu" else 5, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def exact_for(cfg: dict) -> bool:  # type: ignore[type-arg]
    rotated_rows = cfg["rotated"] and any(0 < rc.dim < cfg["dim"] for rc in cfg["classes"])
    return not rotated_rows and cfg["unknown"] != "binary_hash"


# ------------------------------------------------------------------ tests


@FAST
@given(cfg=configs(), batch=st.integers(1, 150))
def test_lookup_matches_reference(cfg: dict, batch: int) -> None:  # type: ignore[type-arg]
    table = make_table(cfg["dim"], cfg["classes"], cfg["n"], cfg["index"], cfg["rotated"], cfg["unknown"], cfg["seed"])
    table.backend = "triton"
    ids = query_ids(table, batch, cfg["seed"])
    want = reference(table, ids)
    got = table.lookup(ids, dtype=cfg["dtype"])
    assert torch.equal(got.locators.cpu(), want.locators.cpu())
    assert got.num_unknown == want.num_unknown
    assert_values(got.values, want.values.to(cfg["dtype"]), exact_for(cfg))


@FAST
@given(cfg=configs(), lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6), mode=st.sampled_from(["sum", "mean"]))
def test_pooled_matches_reference(cfg: dict, lengths: list[int], mode: str) -> None:  # type: ignore[type-arg]
    table = make_table(cfg["dim"], cfg["classes"], cfg["n"], cfg["index"], cfg["rotated"], cfg["unknown"], cfg["seed"])
    table.backend = "triton"
    ids = query_ids(table, sum(lengths), cfg["seed"])
    offsets = torch.tensor([0, *np.cumsum(lengths)[:-1].tolist()], dtype=torch.int64)
    want = reference(table, ids)
    pooled = pool_bags(want.values, offsets.to(DEVICE), mode).to(cfg["dtype"])
    got = table.lookup_bags(ids, offsets, mode, dtype=cfg["dtype"])  # type: ignore[arg-type]
    assert torch.equal(got.locators.cpu(), want.locators.cpu())
    assert got.num_unknown == want.num_unknown
    if cfg["dtype"] == torch.float32:
        torch.testing.assert_close(got.values.cpu(), pooled.cpu(), rtol=1e-5, atol=1e-5)
    else:  # one rounding of the output, possibly on either side of a tie after a reordered sum
        torch.testing.assert_close(got.values.float().cpu(), pooled.float().cpu(), rtol=1e-2, atol=1e-2)


@FAST
@given(
    cfg=configs(),
    batch=st.integers(1, 100),
    load=st.sampled_from([0.25, 0.5, 0.7, 0.9, 1.0]),  # 1.0: a full table, absent keys probe every slot
    pow2=st.booleans(),
)
def test_hash_probe_matches_reference(cfg: dict, batch: int, load: float, pow2: bool) -> None:  # type: ignore[type-arg]
    """Power-of-two capacities (the older files) and exact ones (``ceil(n / load)``: mostly not)."""
    cfg = {**cfg, "index": "keyed"}
    table = make_table(cfg["dim"], cfg["classes"], cfg["n"], "keyed", cfg["rotated"], cfg["unknown"], cfg["seed"])
    keys, locs = table.index.live_items()
    cap = max(1, int(np.ceil(max(1, keys.numel()) / load)))
    view = build_hash(keys.cpu(), locs.cpu(), 1 << (cap - 1).bit_length() if pow2 else cap)
    ids = query_ids(table, batch, cfg["seed"])
    want = reference(table, ids)
    out = torch.empty((batch, cfg["dim"]), dtype=cfg["dtype"], device=DEVICE)
    loc = td.lookup(out, ids, view, td.class_args(table.slabs, table.classes, table.rotation), table.unknown)
    serve_pruned(table, out, ids, loc)
    assert torch.equal(loc.cpu(), want.locators.cpu())
    assert_values(out, want.values.to(cfg["dtype"]), exact_for(cfg))


@FAST
@given(cfg=configs(), batch=st.integers(1, 100))
def test_per_class_quantized_path_matches_reference(cfg: dict, batch: int) -> None:  # type: ignore[type-arg]
    """The kernel's other decode strategy (one pass per quantized class, ``generic=False``);
    the default shares one pass among them.  bench/gpu.py measures which is faster."""
    table = make_table(cfg["dim"], cfg["classes"], cfg["n"], cfg["index"], cfg["rotated"], cfg["unknown"], cfg["seed"])
    ids = query_ids(table, batch, cfg["seed"])
    want = reference(table, ids)
    out = torch.empty((batch, cfg["dim"]), dtype=cfg["dtype"], device=DEVICE)
    cargs = td.class_args(table.slabs, table.classes, table.rotation)
    loc = td.lookup(out, ids, table.index, cargs, table.unknown, generic=False)
    serve_pruned(table, out, ids, loc)
    assert torch.equal(loc.cpu(), want.locators.cpu())
    assert_values(out, want.values.to(cfg["dtype"]), exact_for(cfg))


def test_hash_probe_edges() -> None:
    """One-slot table, a colliding cluster that wraps around the end, the reserved key queried."""
    classes = [RowClass(4, 32)]
    rows = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    table = build_table(rows, torch.zeros(3, dtype=torch.int64), classes).to(DEVICE)
    cargs = td.class_args(table.slabs, table.classes, None)
    one = build_hash(torch.tensor([42]), torch.tensor([2], dtype=torch.int32), 1)
    out = torch.empty((3, 4), device=DEVICE)
    loc = td.lookup(out, torch.tensor([42, 43, INT64_MIN], device=DEVICE), one, cargs)
    assert loc.cpu().tolist() == [2, -1, -1]
    assert torch.equal(out[0].cpu(), rows[2])
    # keys whose home slot is the last one of 4: they wrap to slots 0, 1
    homed_last = [k for k in range(1, 10_000) if fmix64(k) >> 62 == 3]
    last, absent = homed_last[:3], homed_last[3]  # absent: its probe wraps through the cluster to slot 2
    view = build_hash(torch.tensor(last), torch.tensor([0, 1, 2], dtype=torch.int32), 4)
    assert slot_keys(view.slots.cpu()).tolist()[:2] == last[1:]
    loc = td.lookup(torch.empty((4, 4), device=DEVICE), torch.tensor([*last, absent], device=DEVICE), view, cargs)
    assert loc.cpu().tolist() == [0, 1, 2, -1]
    # the same at a capacity that is not a power of two: the wrap is at 5, not a mask
    homed_last = [k for k in range(1, 10_000) if home(k, 5) == 4]
    last, absent = homed_last[:3], homed_last[3]
    view = build_hash(torch.tensor(last), torch.tensor([0, 1, 2], dtype=torch.int32), 5)
    assert slot_keys(view.slots.cpu()).tolist()[:2] == last[1:] and view.slots.shape[0] == 5
    loc = td.lookup(torch.empty((4, 4), device=DEVICE), torch.tensor([*last, absent], device=DEVICE), view, cargs)
    assert loc.cpu().tolist() == [0, 1, 2, -1]


def test_resolved_locators_and_empty_batches() -> None:
    classes = [RowClass(8, 4), RowClass(8, 16)]
    table = build_table(torch.randn(20, 8), torch.arange(20) % 2, classes).to(DEVICE)
    table.backend = "triton"
    loc = table.index.resolve(torch.arange(-2, 22, device=DEVICE))
    got = torch.empty((24, 8), device=DEVICE)
    want = torch.empty((24, 8), device=DEVICE)
    assert table.decoder.decode(got, loc) == 4
    table.backend = "torch"
    table.decoder.decode(want, loc)
    assert torch.equal(got.cpu(), want.cpu())
    table.backend = "triton"
    empty = table.lookup(torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert empty.values.shape == (0, 8) and empty.num_unknown == 0
    bags = table.lookup_bags(torch.empty(0, dtype=torch.int64), torch.tensor([0, 0]), "mean")
    assert torch.equal(bags.values.cpu(), torch.zeros(2, 8))


def test_writes_are_seen_by_the_kernel() -> None:
    """Slabs grow (reallocated) and rows move class under writes: the launch arguments follow."""
    classes = [RowClass(8, 32), RowClass(8, 2)]
    table = CompressedTable.empty(8, classes, keyed=True, device=DEVICE)
    table.backend = "triton"
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        ids = torch.arange(step * 40, step * 40 + 40) * 13
        table.put(ids, torch.randn(40, 8, generator=gen), torch.arange(40) % 2)
    table.put(torch.tensor([13, 26]), torch.ones(2, 8), 0)  # moves a 2-bit row to fp32
    ids = torch.arange(0, 170 * 13, 13, device=DEVICE)
    got = table.lookup(ids)
    want = reference(table, ids)
    assert torch.equal(got.values.cpu(), want.values.cpu())
    assert torch.equal(got.values[1:3].cpu(), torch.ones(2, 8))


def test_auto_picks_triton_only_for_cuda() -> None:
    assert select_path("auto", torch.device("cpu")) in ("compiled", "torch")
    if torch.cuda.is_available():
        assert select_path("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError):
        select_path("nonsense", torch.device("cpu"))


def test_keyed_index_without_delta_and_empty_index() -> None:
    classes = [RowClass(4, 8)]
    table = build_table(torch.randn(10, 4), torch.zeros(10, dtype=torch.int64), classes, ids=torch.arange(10) * 5, keyed_index="sorted").to(DEVICE)
    table.backend = "triton"
    assert isinstance(table.index, KeyedIndex) and table.index.delta_keys.numel() == 0
    ids = torch.tensor([0, 5, 7, 45, 50, -5], device=DEVICE)
    assert torch.equal(table.lookup(ids).values.cpu(), reference(table, ids).values.cpu())
    empty = CompressedTable.empty(4, classes, keyed=True, device=DEVICE)
    empty.backend = "triton"
    assert empty.lookup(ids).num_unknown == 6
    runs = build_table(torch.randn(10, 4), torch.zeros(10, dtype=torch.int64), classes, index="runs").to(DEVICE)
    runs.backend = "triton"
    assert isinstance(runs.index, RunIndex)
    ids = torch.tensor([-1, 0, 9, 10, 2**40], device=DEVICE)
    assert torch.equal(runs.lookup(ids).values.cpu(), reference(runs, ids).values.cpu())


def test_a_lookup_sees_a_write_batch_whole() -> None:
    """A writer rewrites all 32 rows with one value per batch while lookups run on the Triton
    path: every lookup sees all rows of one batch, never a mix (the table lock orders launches,
    and on a GPU one stream orders the writes' scatters before later lookups)."""
    import threading

    classes = [RowClass(8, 32), RowClass(8, 16)]
    ids = torch.arange(32)
    table = build_table(torch.zeros(32, 8), ids % 2, classes).to(DEVICE)
    table.backend = "triton"
    stop = threading.Event()
    wrote = threading.Event()  # set after each finished batch: the reader waits for a new one

    def write() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            table.put(ids, torch.full((32, 8), float(k)), ids % 2)
            wrote.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        seen = set()
        for _ in range(6):
            # A batch finished since the last lookup, so each lookup sees a newer value (the
            # writer keeps going while the lookup runs, which is the race under test).
            assert wrote.wait(timeout=60)
            wrote.clear()
            values = table.lookup(ids.to(DEVICE)).values.cpu()
            assert bool((values == values[0, 0]).all()), values[:, 0]
            seen.add(float(values[0, 0]))
    finally:
        stop.set()
        writer.join()
    assert len(seen) > 1  # writes really did interleave with the lookups


def test_hash_probe_of_a_real_index_with_both_parts() -> None:
    """The HashIndex itself (built with a static part where the compiled library makes one, then
    puts into free static slots or the overflow, deletes from both) at the capacities it sized;
    the kernel finds what the reference does."""
    table = make_table(8, [RowClass(8, 32), RowClass(8, 4)], 200, "hash", False, "zero", 3)
    assert table.index.has_static == static_available() and table.index.overflow_capacity % 16 == 0
    if static_available():  # the static part really is what answers most of them
        assert table.index.count - table.index.overflow_count > 150
    else:
        assert table.index.capacity & (table.index.capacity - 1)  # not a power of two
    ids = torch.cat([table.index.live_items()[0].cpu(), torch.tensor([1, 2, 3, INT64_MIN])]).to(DEVICE)
    want = reference(table, ids)
    out = torch.empty((ids.numel(), 8), device=DEVICE)
    loc = td.lookup(out, ids, table.index, td.class_args(table.slabs, table.classes, table.rotation), table.unknown)
    assert torch.equal(loc.cpu(), want.locators.cpu())
    assert torch.equal(out.cpu(), want.values.cpu())
