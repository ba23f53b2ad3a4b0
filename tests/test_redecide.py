"""Re-decisions in the applier: segment re-decisions are paced (after one that took t seconds the
next waits t * (1/share - 1), so a fast stream into a large table keeps its applier applying: a
re-decision is O(held IDs)), and lookups go on while one decides and rebuilds the index (only
moving rows and swapping arrays holds them).  Driven on an applier whose thread is not started,
with its clock read from the table's own record of the last re-decision (no sleeps).  Log
entries likewise: admission, eviction choice and encoding beside the lookups, the entry's writes
in one hold of the table's lock."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import CompressedTable, RowClass
from compression import memory as memory_module
from compression import table as table_module
from compression.hash_index import MAX_LOAD, HashIndex
from compression.lifecycle import IdLifecycle, LifecycleConfig
from service.applier import Applier
from service.metrics import ServiceMetrics
from service.registry import HostedTable, TableRegistry, policy_from_config
from service.settings import Settings
from service.updatelog.base import LogRecord
from service.updatelog.entry import UpdateBatch
from service.updatelog.sqlite_log import SqliteUpdateLog


def _applier(tmp_path: Path, share: float, start_class: int = 1) -> tuple[Applier, HostedTable, ServiceMetrics]:
    settings = Settings(tables_dir=tmp_path / "tables", segment_updates=10, segment_seconds=3600, snapshot_interval_s=3600,
                        redecide_max_share=share)
    registry = TableRegistry()
    table = CompressedTable.empty(8, [RowClass(8, 32), RowClass(8, 8)], keyed=True)
    ids = torch.arange(200)
    table.put(ids, torch.randn(200, 8, generator=torch.Generator().manual_seed(1)), start_class)  # 1 = int8: the budget lets them move up
    hosted = registry.add("t", table)
    hosted.policy = policy_from_config({"name": "knapsack"})
    hosted.budget_bytes = table.nbytes * 4  # fits: only segments trigger re-decisions
    metrics = ServiceMetrics(registry)
    return Applier(SqliteUpdateLog(tmp_path / "log.sqlite3"), registry, metrics, settings), hosted, metrics


def _decisions(metrics: ServiceMetrics) -> float:
    return metrics.resize_events.labels("t")._value.get()  # noqa: SLF001 - the counter's own value


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_a_full_segment_waits_for_its_share_after_a_long_redecision(tmp_path: Path, share: float) -> None:
    applier, hosted, metrics = _applier(tmp_path, share)
    hosted.updates_since_decision = 10  # a full segment
    applier._maybe_redecide()  # noqa: SLF001 - the applier loop's own step
    assert _decisions(metrics) == 1 and hosted.updates_since_decision == 0
    # its time is exported (Prometheus: a histogram per table) and is what the pacing uses
    assert metrics.redecision_seconds.labels("t")._sum.get() == pytest.approx(hosted.last_decision_seconds)  # noqa: SLF001
    # pretend that one took 10 s: the next segment has to wait 10 * (1/share - 1) s after it ended
    wait = 10.0 * (1.0 / share - 1.0)
    hosted.last_decision_seconds = 10.0
    hosted.updates_since_decision = 10_000
    hosted.last_decision_at -= wait - 1.0  # ended (wait - 1) s ago: still inside the wait
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 1 and hosted.updates_since_decision == 10_000  # paced: rows wait for the next one
    hosted.last_decision_at -= 2.0  # now (wait + 1) s ago
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 2 and hosted.updates_since_decision == 0
    assert 0.0 <= hosted.last_decision_seconds < 10.0  # the real duration replaced the pretend one


def test_an_over_budget_table_is_not_paced(tmp_path: Path) -> None:
    applier, hosted, metrics = _applier(tmp_path, 0.25, start_class=0)  # fp32 rows: room to move down
    hosted.last_decision_seconds = 100.0  # a long last re-decision, just now
    hosted.updates_since_decision = 10
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 0  # a segment waits ...
    hosted.budget_bytes = hosted.table.nbytes - 1  # ... a table over its budget does not
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 1 and hosted.table.nbytes <= hosted.budget_bytes


def test_share_one_means_no_pacing(tmp_path: Path) -> None:
    applier, hosted, metrics = _applier(tmp_path, 1.0)
    hosted.last_decision_seconds = 100.0
    hosted.updates_since_decision = 10
    applier._maybe_redecide()  # noqa: SLF001
    assert _decisions(metrics) == 1


def test_the_share_must_be_in_0_1() -> None:
    with pytest.raises(ValueError):
        Settings(redecide_max_share=0)
    with pytest.raises(ValueError):
        Settings(redecide_max_share=1.5)


def _lookup_from_another_thread(table: CompressedTable) -> bool:
    """Whether a lookup on another thread finishes within 30 s while this thread waits (it
    cannot while this thread holds the table's lock)."""
    done = threading.Event()
    worker = threading.Thread(target=lambda: (table.lookup(torch.arange(5)), done.set()), daemon=True)
    worker.start()
    return done.wait(30.0)


def test_lookups_go_on_while_a_redecision_decides_and_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    applier, hosted, metrics = _applier(tmp_path, 1.0, start_class=0)
    table = hosted.table
    hosted.budget_bytes = int(table.nbytes * 0.7)  # fp32 rows: most have to move down to int8
    seen: dict[str, bool] = {}
    decide, rebuilt = hosted.policy.decide, HashIndex.rebuilt  # type: ignore[union-attr]

    def deciding(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["decide"] = _lookup_from_another_thread(table)
        return decide(*args, **kwargs)

    def rebuilding(index, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen["rebuild"] = _lookup_from_another_thread(table)
        return rebuilt(index, *args, **kwargs)

    encode = table_module.codecs.encode_rows

    def encoding(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["encode"] = _lookup_from_another_thread(table)
        return encode(*args, **kwargs)

    assign, repoint, empty = HashIndex.assign, HashIndex.repoint, memory_module.empty
    writes: list[tuple[str, bool]] = []

    def assigning(index, *args, **kwargs):  # type: ignore[no-untyped-def]
        writes.append(("assign", _lookup_from_another_thread(table)))
        return assign(index, *args, **kwargs)

    def repointing(index, *args, **kwargs):  # type: ignore[no-untyped-def]
        writes.append(("repoint", _lookup_from_another_thread(table)))
        return repoint(index, *args, **kwargs)

    def allocating(*args, **kwargs):  # type: ignore[no-untyped-def]
        writes.append(("allocate", _lookup_from_another_thread(table)))
        return empty(*args, **kwargs)

    monkeypatch.setattr(hosted.policy, "decide", deciding)
    monkeypatch.setattr(HashIndex, "rebuilt", rebuilding)
    monkeypatch.setattr(table_module.codecs, "encode_rows", encoding)
    before = table.lookup(torch.arange(200)).values
    monkeypatch.setattr(HashIndex, "assign", assigning)
    monkeypatch.setattr(HashIndex, "repoint", repointing)
    monkeypatch.setattr(memory_module, "empty", allocating)
    result = applier.redecide(hosted)
    assert result["moved"].get("d8b8", 0) > 100  # the moved rows were re-encoded beside the lookups
    assert seen == {"decide": True, "rebuild": True, "encode": True}
    # and written beside them: the index written in copies (the moved IDs' new locators, each
    # compacted class's repointing), the grown and compacted slabs allocated, all outside the lock
    assert {kind for kind, _ in writes} == {"assign", "repoint", "allocate"}
    assert all(ok for _, ok in writes), writes
    assert _decisions(metrics) == 1
    assert torch.allclose(table.lookup(torch.arange(200)).values, before, atol=0.05)  # same rows, at most re-quantized


def test_the_applier_waits_for_a_redecision_on_another_thread(tmp_path: Path) -> None:
    """An admin re-decision runs on a request thread, deciding without the table's lock: the
    table's write lock keeps the applier's entries out until it is done (else IDs deleted
    meanwhile could come back as moved rows)."""
    applier, hosted, _ = _applier(tmp_path, 1.0)
    batch = UpdateBatch("t", np.array([999], dtype=np.int64), np.ones((1, 8), dtype=np.float32), np.array([1], dtype=np.int64))
    applied = threading.Event()
    worker = threading.Thread(target=lambda: (applier._apply_one(LogRecord((1, 0), 0.0, batch)), applied.set()), daemon=True)  # noqa: SLF001
    with hosted.write_lock:  # what redecide holds from start to end
        worker.start()
        assert not applied.wait(0.5)
        assert not bool(hosted.table.lookup(torch.tensor([999])).found[0])
    assert applied.wait(30.0)
    found = hosted.table.lookup(torch.tensor([999, 1])).found
    assert bool(found[0]) and not bool(found[1])


def _table_with_holes(keyed: bool, n: int, every: int, seed: int) -> CompressedTable:
    """IDs 0..n-1 in random classes (fp32, int8), every ``every``-th deleted: free slots in both."""
    table = CompressedTable.empty(8, [RowClass(8, 32), RowClass(8, 8)], keyed=keyed)
    g = torch.Generator().manual_seed(seed)
    table.put(torch.arange(n), torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g))
    table.delete(torch.arange(0, n, every))
    return table


@pytest.mark.parametrize("keyed", [True, False])
def test_compacting_as_sole_writer_copies_slabs_beside_lookups_and_ends_the_same(keyed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, beside = _table_with_holes(keyed, 3000, 3, seed=7), _table_with_holes(keyed, 3000, 3, seed=7)
    plain.compact()
    copies: list[bool] = []
    empty = memory_module.empty

    def watched(*args, **kwargs):  # type: ignore[no-untyped-def]
        copies.append(_lookup_from_another_thread(beside))  # each new slab: allocated outside the lock
        return empty(*args, **kwargs)

    monkeypatch.setattr(memory_module, "empty", watched)
    given_back = beside.compact(sole_writer=True)
    # each class's new slab, and the index copy its rows are repointed in, allocated outside the lock
    assert len(copies) >= 2 and all(copies) and given_back > 0
    ids = torch.arange(3000)
    a, b = plain.lookup(ids), beside.lookup(ids)
    assert torch.equal(a.values, b.values) and torch.equal(a.found, b.found)
    assert beside.nbytes == plain.nbytes and beside.used == plain.used == [s.shape[0] for s in beside.slabs]


@pytest.mark.parametrize("keyed", [True, False])
def test_a_sole_writers_put_leaves_what_a_put_under_the_lock_leaves(keyed: bool) -> None:
    """put(sole_writer=True) writes new rows into slots no locator points at and the index in a
    copy, then publishes both: the table it leaves equals a plain put's, for rows that move class
    (into free slots and past a slab's end, growing it), rows rewritten in their own class, new
    IDs and a duplicate in one call."""
    plain, staged = _table_with_holes(keyed, 400, 5, seed=3), _table_with_holes(keyed, 400, 5, seed=3)
    g = torch.Generator().manual_seed(4)
    ids = torch.cat([torch.arange(1, 400, 2), torch.arange(400, 700), torch.tensor([3])])  # held, new, a duplicate
    rows = torch.randn(ids.numel(), 8, generator=g)
    target = torch.randint(0, 2, (ids.numel(),), generator=g)
    plain.put(ids, rows, target)
    slabs_before = [s.shape[0] for s in staged.slabs]
    staged.put(ids, rows, target, sole_writer=True)
    assert any(s.shape[0] > b for s, b in zip(staged.slabs, slabs_before))  # a slab grew
    every = torch.arange(800)
    a, b = plain.lookup(every), staged.lookup(every)
    assert torch.equal(a.values, b.values) and torch.equal(a.found, b.found) and torch.equal(a.locators, b.locators)
    assert staged.used == plain.used and staged.nbytes == plain.nbytes
    assert all(torch.equal(x, y) for x, y in zip(staged.free, plain.free))
    assert staged.index.num_ids == plain.index.num_ids


def test_a_sole_writers_put_writes_beside_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """The index write of a sole writer's put (HashIndex.assign on its copy) runs with lookups
    going on; only the swap holds the lock."""
    table = CompressedTable.empty(8, [RowClass(8, 32), RowClass(8, 8)], keyed=True)
    table.put(torch.arange(100), torch.randn(100, 8, generator=torch.Generator().manual_seed(5)), 1)
    assign = HashIndex.assign
    seen: list[bool] = []

    def assigning(index, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_lookup_from_another_thread(table))
        return assign(index, *args, **kwargs)

    monkeypatch.setattr(HashIndex, "assign", assigning)
    held = table.index
    table.put(torch.arange(50), torch.randn(50, 8), 0, sole_writer=True)
    assert seen == [True]
    assert table.index is held  # the same index object, its arrays swapped (HashIndex.take)
    assert bool(table.lookup(torch.arange(100)).found.all())
    assert (table.lookup(torch.arange(50)).locators >> 28).eq(0).all()


class _CountingLock:
    """The table's lock, counting this thread's outermost holds (lookups on other threads pass
    through uncounted)."""

    def __init__(self, inner: object) -> None:
        self.inner, self.owner, self.depth, self.holds = inner, threading.get_ident(), 0, 0

    def __enter__(self) -> "_CountingLock":
        self.inner.__enter__()  # type: ignore[attr-defined]
        if threading.get_ident() == self.owner:
            self.depth += 1
            self.holds += self.depth == 1
        return self

    def __exit__(self, *exc: object) -> object:
        if threading.get_ident() == self.owner:
            self.depth -= 1
        return self.inner.__exit__(*exc)  # type: ignore[attr-defined]


def test_a_log_entry_is_encoded_beside_lookups_and_written_in_one_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry that evicts (a full table) and upserts: its rows are encoded with lookups going
    on, and its writes - the evictions, the rows, the deletes - take one hold of the table's lock,
    so a lookup sees the entry all or nothing."""
    applier, hosted, _ = _applier(tmp_path, 1.0)
    table = hosted.table
    table.lifecycle = IdLifecycle(LifecycleConfig(max_ids=200))  # it holds 200: new IDs evict
    encode = table_module.codecs.encode_rows
    seen: list[bool] = []

    def encoding(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_lookup_from_another_thread(table))
        return encode(*args, **kwargs)

    monkeypatch.setattr(table_module.codecs, "encode_rows", encoding)
    counting = _CountingLock(table.lock)
    table.lock = counting  # type: ignore[assignment] - the same with-statement protocol
    reserve = table.reserve
    swaps: list[int] = []  # holds taken by reserve: a grown array swapped in, no row of the entry

    def reserving(*args, **kwargs):  # type: ignore[no-untyped-def]
        before = counting.holds
        reserve(*args, **kwargs)
        swaps.append(counting.holds - before)

    monkeypatch.setattr(table, "reserve", reserving)
    new = np.arange(1000, 1010, dtype=np.int64)
    batch = UpdateBatch("t", new, np.ones((10, 8), dtype=np.float32), np.array([5], dtype=np.int64))
    applier._apply_one(LogRecord((1, 0), 0.0, batch))  # noqa: SLF001
    assert seen and all(seen)
    assert len(swaps) == 1 and counting.holds - swaps[0] == 1  # the entry's writes: one hold
    found = table.lookup(torch.from_numpy(np.append(new, 5))).found
    assert bool(found[:10].all()) and not bool(found[10]) and table.index.num_ids <= 200


def test_a_log_entry_that_fills_the_table_grows_it_beside_lookups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry of new IDs that needs a bigger slab and a bigger hash overflow: both are copied
    with lookups going on (CompressedTable.reserve), so the hold of the lock that writes the entry
    allocates nothing, and every row lands."""
    applier, hosted, _ = _applier(tmp_path, 1.0)
    table = hosted.table
    slab_rows, overflow = table.slabs[1].shape[0], table.index.overflow_capacity
    empty = memory_module.empty  # slabs and hash slots are both allocated here
    seen: list[bool] = []

    def allocating(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_lookup_from_another_thread(table))
        return empty(*args, **kwargs)

    monkeypatch.setattr(memory_module, "empty", allocating)
    new = np.arange(1000, 3000, dtype=np.int64)
    vectors = np.random.default_rng(3).standard_normal((new.size, 8)).astype(np.float32)
    applier._apply_one(LogRecord((1, 0), 0.0, UpdateBatch("t", new, vectors, np.empty(0, dtype=np.int64))))  # noqa: SLF001
    assert table.slabs[1].shape[0] > slab_rows and table.index.overflow_capacity > overflow  # both grew
    assert len(seen) >= 2 and all(seen)
    got = table.lookup(torch.from_numpy(new))
    assert bool(got.found.all())
    assert torch.allclose(got.values, torch.from_numpy(vectors), atol=0.05 * float(np.abs(vectors).max()))


def test_reserve_counts_the_rows_an_entry_evicts() -> None:
    """A full slab: new rows that evicted IDs make room for do not grow it (a table at max_ids
    would otherwise double past its budget), the same rows without evictions do, and the commit
    after a reserve grows nothing more."""
    table = CompressedTable.empty(8, [RowClass(8, 8)], keyed=True)
    table.put(torch.arange(64), torch.randn(64, 8), 0)
    table.compact()  # the slab holds exactly its 64 rows, no free slots
    rows = table.slabs[0].shape[0]
    plan = table.plan_put(torch.arange(100, 110), torch.randn(10, 8), 0)
    table.reserve(plan, leaving=torch.arange(10))
    assert table.slabs[0].shape[0] == rows
    table.reserve(plan, leaving=torch.arange(5))  # 5 rows freed, 5 more needed: it grows
    grown = table.slabs[0]
    assert grown.shape[0] > rows
    before = table.lookup(torch.arange(64)).values
    table.commit_put(plan)
    assert table.slabs[0] is grown  # the commit found the room
    assert torch.equal(table.lookup(torch.arange(64)).values, before)
    assert bool(table.lookup(torch.arange(100, 110)).found.all())


def test_reserve_counts_the_overflow_room_an_entry_evicts() -> None:
    """A full hash overflow: new IDs that evicted overflow IDs make room for do not grow it, and
    when they do not make enough, the overflow grows in the reserve, beside the lookups, so that
    the commit rehashes nothing under the lock (before, any eviction left the growth to the
    commit)."""
    table = CompressedTable.empty(8, [RowClass(8, 8)], keyed=True)  # no static part: every ID in the overflow
    table.put(torch.arange(64), torch.randn(64, 8), 0)
    index = table.index
    assert isinstance(index, HashIndex)
    room = int(index.overflow_capacity * MAX_LOAD) - index.overflow_count
    table.put(torch.arange(64, 64 + room), torch.randn(room, 8), 0)  # full to MAX_LOAD, not past it
    slots = index.slots
    held = 64 + room
    plan = table.plan_put(torch.arange(1000, 1010), torch.randn(10, 8), 0)
    assert index.static_held(torch.arange(5)) == 0  # no static part: all 5 in the overflow
    table.reserve(plan, leaving=torch.arange(10))  # 10 leave, 10 come: the overflow has the room
    assert index.slots is slots
    table.reserve(plan, leaving=torch.arange(5))  # 5 leave, 10 come: it grows here
    grown = index.slots
    assert grown is not slots and grown.shape[0] > slots.shape[0]
    with table.lock:
        table.delete(torch.arange(5))
        table.commit_put(plan)
    assert index.slots is grown  # the commit found the room
    assert bool(table.lookup(torch.arange(1000, 1010)).found.all())
    assert bool(table.lookup(torch.arange(5, held)).found.all()) and not bool(table.lookup(torch.arange(5)).found.any())
    # IDs that leave and come back in the same entry are new again at the commit: 10 leave (room
    # for 10), 15 come (those 10 and 5 more), so the overflow must grow
    room = int(index.overflow_capacity * MAX_LOAD) - index.overflow_count
    table.put(torch.arange(2000, 2000 + room), torch.randn(room, 8), 0)
    full = index.slots
    plan = table.plan_put(torch.cat([torch.arange(10, 20), torch.arange(3000, 3005)]), torch.randn(15, 8), 0)
    table.reserve(plan, leaving=torch.arange(10, 20))
    assert index.slots is not full
