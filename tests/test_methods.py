"""Training-time compression modules: every export serves exactly what the module computes,
hash-family tables answer any ID, MPE's widths respect its budget, FIITED prunes by utility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import BudgetTooSmall, RowClass, load_table, save_table
from compression.kernels import COMPILED_AVAILABLE
from compression.training.methods import (
    BinaryHashEmbedding,
    CodebookEmbedding,
    DPQEmbedding,
    MGQEEmbedding,
    FIITEDEmbedding,
    FullEmbedding,
    HashingTrickEmbedding,
    HybridBinaryHashEmbedding,
    MPEEmbedding,
    QREmbedding,
    ServableEmbedding,
    post_training_table,
    search_then_retrain,
)
from compression.training.methods.post_training import POST_TRAINING
from compression.synthetic import synthetic_table, zipf_frequencies
from compression.unknown import UnknownPolicy, binary_hash_slots, mix64, qr_slots

N, D = 600, 8
FREQS = torch.sort(zipf_frequencies(N, seed=3), descending=True).values * 10_000  # frequency-numbered IDs


def _fit(module: ServableEmbedding, steps: int = 12, seed: int = 0) -> ServableEmbedding:
    """A few optimizer steps on a toy regression, so parameters (and FIITED's utilities, MPE's
    search) move away from their init; then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(N, D, generator=gen)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.03)
    for _ in range(steps):
        ids = torch.randint(0, N, (256,), generator=gen)
        loss = (module(ids) - target[ids]).pow(2).mean()
        extra = module.penalty()
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        module.after_backward(ids)
        opt.step()
    return module.eval()


def _modules() -> dict[str, ServableEmbedding]:
    budget = N * D * 4 // 8
    mpe = _fit(MPEEmbedding(N, D, FREQS, budget, num_groups=12))
    mpe.choose()
    return {
        "full": _fit(FullEmbedding(N, D)),
        "mpe": _fit(mpe),
        "fiited": _fit(FIITEDEmbedding(N, D, budget_bytes=N * D * 4 // 3, total_steps=10, chunks=4, prune_every=2)),
        "bh": _fit(BinaryHashEmbedding.for_budget(N * D * 4 // 16, D, N)),
        "bh_hybrid": _fit(HybridBinaryHashEmbedding.for_budget(N * D * 4 // 6, D, N)),
        "hashing": _fit(HashingTrickEmbedding.for_budget(N * D * 4 // 16, D, N)),
        "qr": _fit(QREmbedding.for_budget(N * D * 4 // 16, D, N)),
        "dpq": _fit(DPQEmbedding(N, D, 4, 4)),
        "mgqe": _fit(MGQEEmbedding(N, D, 2, FREQS, bits_head=6, bits_tail=3)),
        "mgqe_pruned": _fit(CodebookEmbedding.for_budget(N, D, FREQS, N * D * 4 // 32)),
    }


MODULES = _modules()
HASHED = ("bh", "bh_hybrid", "hashing", "qr")


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("backend", ["torch", "compiled"] if COMPILED_AVAILABLE else ["torch"])
def test_export_serves_exactly_the_module_forward(name: str, backend: str) -> None:
    module = MODULES[name]
    table = module.export()
    table.backend = backend  # type: ignore[assignment]
    ids = torch.randint(0, N, (3000,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module(ids)
    assert torch.equal(table.lookup(ids).values, expected)
    assert table.nbytes == sum(t.numel() * t.element_size() for t in table.held_tensors().values())


@given(ids=st.lists(st.integers(min_value=0, max_value=N - 1), min_size=1, max_size=64), name=st.sampled_from(sorted(MODULES)))
@settings(max_examples=25, deadline=None)
def test_round_trip_on_any_id_batch(ids: list[int], name: str) -> None:
    module = MODULES[name]
    batch = torch.tensor(ids)
    with torch.no_grad():
        assert torch.equal(module.export().lookup(batch).values, module(batch))


@pytest.mark.parametrize("name", list(MODULES))
def test_exported_tables_survive_a_file_round_trip(tmp_path: Path, name: str) -> None:
    table = MODULES[name].export()
    loaded, manifest = load_table(save_table(table, tmp_path / f"{name}.safetensors"))
    assert manifest["index"] == table.index.kind and manifest["unknown"] == table.unknown.kind
    ids = torch.cat([torch.arange(N), torch.tensor([N, 10**9, -5, 2**62])])
    a, b = table.lookup(ids), loaded.lookup(ids)
    assert torch.equal(a.values, b.values) and torch.equal(a.found, b.found)
    assert loaded.nbytes == table.nbytes


@pytest.mark.parametrize("name", HASHED)
def test_hash_tables_give_never_seen_ids_deterministic_nonzero_vectors(name: str) -> None:
    module = MODULES[name]
    table = module.export()
    unseen = torch.tensor([N, N + 1, 10**6, 10**12, -1, -(2**40), 2**62, 2**63 - 1])
    result = table.lookup(unseen)
    assert not bool(result.found.any())  # served by the fallback, and reported as unknown
    assert bool((result.values.abs().sum(dim=1) > 0).all())
    with torch.no_grad():
        assert torch.equal(result.values, module(unseen))
    assert torch.equal(table.lookup(unseen).values, result.values)  # deterministic


def test_bh_stores_nothing_per_id_and_counts_its_bytes() -> None:
    bh = MODULES["bh"]
    assert isinstance(bh, BinaryHashEmbedding)
    table = bh.export()
    assert table.stats().num_ids == 0 and table.stats().index_bytes == 0
    assert table.nbytes == BinaryHashEmbedding.table_bytes(D, bh.code_bits, bh.block_bits) <= N * D * 4 // 16


def test_bh_hybrid_serves_head_rows_and_sends_the_tail_to_bh() -> None:
    hybrid = MODULES["bh_hybrid"]
    assert isinstance(hybrid, HybridBinaryHashEmbedding) and 0 < hybrid.num_head < N
    table = hybrid.export()
    found = table.lookup(torch.arange(N)).found
    assert bool(found[: hybrid.num_head].all()) and not bool(found[hybrid.num_head :].any())
    tail = torch.arange(hybrid.num_head, N)
    with torch.no_grad():
        assert torch.equal(table.lookup(tail).values, hybrid.tail(tail))
    assert table.nbytes <= N * D * 4 // 6


def test_bh_codes_never_fully_collide_and_blocks_stay_in_their_subtable() -> None:
    ids = torch.arange(-5000, 5000)
    slots = binary_hash_slots(ids, 40, 6)
    blocks = slots.shape[1]
    assert blocks == 7
    assert bool((slots // 64 == torch.arange(blocks)[None, :]).all())  # block j reads sub-table j
    assert torch.unique(slots, dim=0).shape[0] == ids.numel()  # 40 bits: no full collision here


def _splitmix_finalizer(x: int) -> int:
    """Reference splitmix64 finalizer on Python ints (mod 2**64)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=1, max_size=32))
@settings(max_examples=50, deadline=None)
def test_mix64_matches_the_reference_finalizer(values: list[int]) -> None:
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    want = [_splitmix_finalizer(v & ((1 << 64) - 1)) for v in values]
    assert [g & ((1 << 64) - 1) for g in got] == want


def test_qr_gives_each_vocabulary_id_its_own_pair() -> None:
    qr = MODULES["qr"]
    assert isinstance(qr, QREmbedding) and qr.num_quotients * qr.num_remainders >= N
    q, r = qr_slots(torch.arange(N), qr.num_remainders, qr.num_quotients)
    assert torch.unique(q * qr.num_remainders + r).numel() == N
    assert int(q.max()) < qr.num_quotients and int(r.max()) < qr.num_remainders


def test_new_unknown_kinds_reject_inconsistent_parameters() -> None:
    buckets = torch.zeros(10, 4, dtype=torch.float16)
    with pytest.raises(ValueError):
        UnknownPolicy("qr", buckets=buckets, params=torch.tensor([3, 3]))  # 3 + 3 != 10 rows
    with pytest.raises(ValueError):
        UnknownPolicy("binary_hash", buckets=buckets, params=torch.tensor([8, 2]))  # needs 4 * 4 rows
    with pytest.raises(ValueError):
        UnknownPolicy("binary_hash", buckets=buckets)
    UnknownPolicy("qr", buckets=buckets, params=torch.tensor([4, 6]))


# ------------------------------------------------------------------------------------ MPE


@given(
    ratio=st.sampled_from([4, 8, 16, 32, 64, 128]),
    seed=st.integers(min_value=0, max_value=2**16),
    groups=st.sampled_from([8, 16, 40]),
)
@settings(max_examples=15, deadline=None)
def test_mpe_chosen_widths_respect_the_budget(ratio: int, seed: int, groups: int) -> None:
    budget = N * D * 4 // ratio
    try:
        mpe = MPEEmbedding(N, D, FREQS, budget, num_groups=groups, seed=seed)
    except BudgetTooSmall:
        pytest.fail("an all-pruned table (one index run) always fits these budgets")
    with torch.no_grad():  # any searched distribution, including ones that want every group at 16 bits
        mpe.logits.copy_(torch.randn(mpe.logits.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    bits = mpe.choose()
    assert len(bits) == groups and set(bits) <= set(mpe.bits)
    table = mpe.export()
    assert mpe.chosen_bytes() <= budget
    assert table.nbytes == mpe.chosen_bytes()  # the accounting is exact: rows + run index
    assert table.nbytes <= budget


def test_mpe_threshold_rule_keeps_the_highest_likely_width_when_the_budget_allows() -> None:
    budget = N * RowClass(D, 8).row_bytes + 20  # 8 bits everywhere and one index run: no room for 16
    mpe = MPEEmbedding(N, D, FREQS, budget_bytes=budget, num_groups=4)
    with torch.no_grad():
        p = torch.tensor([[0.05, 0.05, 0.05, 0.7, 0.1, 0.05]] * 4)  # 4 bits likely, 8 bits at 0.1 >= 1/12
        mpe.logits.copy_(torch.log(p) * mpe.tau)
    assert mpe.choose() == [8, 8, 8, 8]


def test_mpe_pruned_groups_decode_to_zero_and_rare_groups_go_first() -> None:
    mpe = MPEEmbedding(N, D, FREQS, budget_bytes=N * D * 4 // 64, num_groups=10)
    bits = mpe.choose()  # uniform logits want 16 bits everywhere: the budget forces cuts
    assert bits[0] >= bits[-1] and bits[-1] == 0  # group 0 = most frequent
    pruned = torch.nonzero(mpe.choice[mpe.group_of] == mpe.bits.index(0)).flatten()
    table = mpe.export()
    res = table.lookup(pruned)  # held, but pruned: served by the (zero) unknown-ID policy
    assert bool((res.values == 0).all()) and bool((res.status == 2).all())


def test_mpe_search_pushes_expected_bytes_toward_the_budget() -> None:
    tight = MPEEmbedding(N, D, FREQS, N * D * 4 // 32, num_groups=12, eta=0.3)
    loose = MPEEmbedding(N, D, FREQS, N * D * 4 // 2, num_groups=12, eta=0.3)
    start = float(tight.expected_bytes().detach())
    assert start > tight.budget_bytes and start < loose.budget_bytes
    lam0 = tight.lam
    # 40 steps: with the clipping codec the fake-quantized rows fit the target a little better,
    # so the task term resists the byte penalty a little longer
    _fit(tight, steps=40)
    _fit(loose, steps=40)
    assert tight.lam > lam0 > loose.lam  # the multiplier follows the sign of (expected - budget)
    assert float(tight.expected_bytes().detach()) < 0.8 * start  # the penalty pulls widths down
    assert float(loose.expected_bytes().detach()) > start  # the task pulls them up when bytes are left


def test_search_then_retrain_resets_embeddings_and_freezes_widths() -> None:
    mpe = MPEEmbedding(N, D, FREQS, N * D * 4 // 8, num_groups=8)
    init = mpe.weight.detach().clone()
    seen: list[tuple[str, bool]] = []

    def train(model: torch.nn.Module, epochs: int) -> None:
        seen.append((mpe.stage, torch.equal(mpe.weight.detach(), init)))
        _fit(mpe, steps=epochs)
        mpe.train()

    bits = search_then_retrain(mpe, mpe, train, search_epochs=5, retrain_epochs=3)
    assert seen == [("search", True), ("fixed", True)]  # retraining starts from the pre-search weights
    assert mpe.group_bits() == bits and mpe.ready
    assert not mpe.logits.requires_grad


def test_mpe_budget_below_its_index_is_refused() -> None:
    with pytest.raises(BudgetTooSmall):
        MPEEmbedding(N, D, FREQS, budget_bytes=10, num_groups=8)


# ------------------------------------------------------------------------------------ FIITED


def test_fiited_keeps_prefixes_and_fits_its_budget() -> None:
    budget = N * D * 4 // 5
    fiited = FIITEDEmbedding(N, D, budget, total_steps=40, chunks=4, prune_every=5)
    _fit(fiited, steps=40)
    assert fiited.ready
    assert int(fiited.live.sum()) <= fiited.final_chunks
    table = fiited.export()
    assert table.nbytes <= budget
    assert {rc.bits for rc in table.classes if rc.dim} <= {16}
    # a row keeps a prefix: coordinates past its live chunks decode to zero
    values = table.lookup(torch.arange(N)).values
    cut = fiited.live * fiited.chunk_dim
    beyond = torch.arange(D)[None, :] >= cut[:, None]
    assert bool((values[beyond] == 0).all())


def test_fiited_prunes_the_chunks_with_least_utility() -> None:
    fiited = FIITEDEmbedding(10, 8, budget_bytes=10**6, total_steps=100, chunks=2)
    with torch.no_grad():
        fiited.utility.copy_(torch.tensor([[5.0, float(k)] for k in range(10)]))
    fiited.prune_to(17)  # 20 chunks live: drop the 3 lowest-utility last chunks
    assert fiited.live.tolist() == [1, 1, 1] + [2] * 7
    fiited.prune_to(5)  # last chunks first, then first chunks by their utility (all 5.0: any 5)
    assert int(fiited.live.sum()) == 5 and int(fiited.live.max()) <= 1


def test_fiited_utility_grows_with_access_and_gradient() -> None:
    fiited = FIITEDEmbedding(20, 8, budget_bytes=10**6, total_steps=1000, chunks=2, decay=0.5)
    hot = torch.tensor([3] * 50 + [4])
    loss = fiited(hot).pow(2).sum() + 0 * fiited.weight.sum()
    loss.backward()
    fiited.after_backward(hot)
    assert float(fiited.utility[3].sum()) > float(fiited.utility[4].sum()) > 0
    assert float(fiited.utility[5].sum()) == 0


def test_fiited_budget_below_its_locator_is_refused() -> None:
    with pytest.raises(BudgetTooSmall):
        FIITEDEmbedding(N, D, budget_bytes=N * 4, total_steps=10)


# ------------------------------------------------------------------------------------ post-training


@pytest.mark.parametrize("method", POST_TRAINING)
def test_post_training_methods_fit_their_budget(method: str) -> None:
    rows = synthetic_table(N, D, FREQS / FREQS.sum(), seed=4)
    budget = N * D * 4 // 5
    def row_error(group: int, positions: torch.Tensor, approx: torch.Tensor) -> float:
        return float(((approx - rows[positions]) ** 2).sum())

    try:
        table = post_training_table(method, rows, FREQS, budget, group_error=row_error, num_groups=12)
    except BudgetTooSmall:
        assert method in ("fp16", "int8", "int4")  # a uniform width has one ratio; these are under 5x
        return
    assert table.nbytes <= budget
    assert table.index.kind == "runs" and table.stats().num_ids == N


def test_knapsack_with_run_index_reaches_high_ratios() -> None:
    rows = synthetic_table(N, D, FREQS / FREQS.sum(), seed=5)
    for ratio in (32, 64):
        budget = N * D * 4 // ratio
        table = post_training_table("knapsack", rows, FREQS, budget)
        assert table.nbytes <= budget
        assert table.index.nbytes <= 8 * 9 + 4 * 8  # a few runs, not 4 bytes per ID


def test_codebook_modules_fit_their_budget_and_prune_only_the_rarest() -> None:
    for ratio in (16, 32):
        module = CodebookEmbedding.for_budget(N, D, FREQS, N * D * 4 // ratio)
        table = module.export()
        assert table.nbytes <= N * D * 4 // ratio
        found = table.lookup(torch.arange(N)).found
        assert bool(found[: module.num_coded].all()) and not bool(found[module.num_coded :].any())  # IDs are frequency-numbered
        assert all(rc.pq or rc.dim == 0 for rc in table.classes)
        assert module.pruned == (table.unknown.kind == "default")  # the rarest share one learned vector
    trained = MODULES["mgqe_pruned"]
    assert isinstance(trained, CodebookEmbedding) and trained.pruned
    rare = torch.arange(trained.num_coded, N)
    assert torch.equal(trained.export().lookup(rare).values, trained.default.detach().expand(rare.numel(), D))
    assert float(trained.default.detach().abs().sum()) > 0  # trained, not left at zero


def test_mgqe_rare_ids_use_only_the_first_centroids() -> None:
    module = MODULES["mgqe"]
    assert isinstance(module, CodebookEmbedding)
    codes = module.codes()
    tail = module.rank >= module.num_head
    assert int(codes[tail].max()) < 2**module.tail_class.bits
    assert int(codes[~tail].max()) >= 2**module.tail_class.bits  # the head does use the extra centroids
    labels = [rc.label() for rc in module.export().classes]
    assert labels == [f"d{D}pq2x6", f"d{D}pq2x3"]


def test_dpq_training_moves_the_codebook_and_lowers_the_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    target = torch.randn(N, D, generator=gen)
    module = DPQEmbedding(N, D, 4, 4, seed=1)
    start = module.codebook.detach().clone()
    ids = torch.arange(N)
    before = float((module(ids) - target).pow(2).mean().detach())
    module.penalty()
    _fit(module, steps=40, seed=5)
    module.train()
    after = float((module(ids) - target).pow(2).mean().detach())
    module.penalty()
    module.eval()
    assert not torch.equal(module.codebook.detach(), start) and after < before
