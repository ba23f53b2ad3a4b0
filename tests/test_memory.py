"""compression.memory: large CPU arrays (slabs, hash slots) start on a 2 MiB boundary of a
mapping advised MADV_HUGEPAGE over exactly their whole 2 MiB chunks; tables adopt their slabs
there without changing a byte they answer or count."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from compression import RowClass, compress_uniform, memory
from compression.hash_index import new_slots

MiB = 1 << 20
needs_madvise = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")


def _vma(addr: int) -> tuple[int, int, set[str]]:
    """(start, end, VmFlags) of this process's mapping that holds ``addr`` (/proc/self/smaps)."""
    start = end = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            start, end = (lo, hi) if lo <= addr < hi else (None, None)
        elif line.startswith("VmFlags:") and start is not None:
            return start, end, set(line.split()[1:])
    raise AssertionError(f"no mapping holds {addr:#x}")


@needs_madvise
def test_large_array_starts_on_a_huge_page_and_only_its_whole_chunks_are_advised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBSERVE_HUGE_PAGES", raising=False)
    nbytes = 5 * MiB + 12345  # two whole 2 MiB chunks and a tail
    t = memory.empty((nbytes,), torch.uint8)
    assert t.data_ptr() % memory.HUGE_PAGE == 0 and t.numel() == nbytes
    t.fill_(7)  # every byte writable, none past the end needed
    start, end, flags = _vma(t.data_ptr())
    # the advice covers exactly the whole chunks: the kernel split the mapping there
    assert (start, end) == (t.data_ptr(), t.data_ptr() + 2 * memory.HUGE_PAGE)
    assert "hg" in flags
    tail_start, _, tail_flags = _vma(t.data_ptr() + 2 * memory.HUGE_PAGE)
    assert tail_start == t.data_ptr() + 2 * memory.HUGE_PAGE and "hg" not in tail_flags


def test_small_arrays_and_the_switch_take_ordinary_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    small = memory.empty((1000, 3), torch.int32)
    assert small.untyped_storage().resizable()  # torch's own allocation, not a mapping
    monkeypatch.setenv("EMBSERVE_HUGE_PAGES", "0")
    assert not memory.huge_pages_enabled()
    big = memory.empty((4 * MiB,), torch.uint8)
    assert big.untyped_storage().resizable()
    x = torch.arange(4 * MiB, dtype=torch.int32).to(torch.uint8)
    assert memory.adopt(x) is x


@needs_madvise
def test_adopt_copies_once_and_keeps_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBSERVE_HUGE_PAGES", raising=False)
    x = torch.randint(0, 255, (3 * MiB + 1,), dtype=torch.uint8)[1:]  # an unaligned view
    y = memory.adopt(x)
    assert y is not x and torch.equal(y, x) and memory.on_huge_mapping(y)
    assert memory.adopt(y) is y  # already there: no second copy
    small = torch.zeros(100, dtype=torch.uint8)
    assert memory.adopt(small) is small


@needs_madvise
def test_hash_slots_use_the_same_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBSERVE_HUGE_PAGES", raising=False)
    slots = new_slots(300_000)  # 3.4 MiB
    assert slots.data_ptr() % memory.HUGE_PAGE == 0
    assert bool((slots[:, 1] == -(2**31)).all()) and bool((slots[:, 2] == -1).all())


@needs_madvise
def test_table_slabs_move_to_huge_pages_without_changing_answers_or_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = torch.randn(120_000, 64, generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("EMBSERVE_HUGE_PAGES", "0")
    plain = compress_uniform(rows, RowClass(64, 8))  # 68 B rows: a 7.8 MiB slab
    monkeypatch.delenv("EMBSERVE_HUGE_PAGES")
    huge = compress_uniform(rows, RowClass(64, 8))
    assert plain.slabs[0].untyped_storage().resizable()
    assert huge.slabs[0].data_ptr() % memory.HUGE_PAGE == 0
    assert huge.nbytes == plain.nbytes
    ids = torch.randint(0, 120_000, (5000,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(huge.lookup(ids).values, plain.lookup(ids).values)
    # a table that grows (streamed rows) and compacts keeps its slabs there
    extra = torch.arange(120_000, 200_000)
    fresh = torch.randn(extra.numel(), 64, generator=torch.Generator().manual_seed(5))
    huge.put(extra, fresh, 0)
    assert huge.slabs[0].data_ptr() % memory.HUGE_PAGE == 0
    huge.delete(torch.arange(0, 100_000))
    huge.compact()
    assert huge.slabs[0].data_ptr() % memory.HUGE_PAGE == 0
    kept = torch.arange(100_000, 200_000)
    want = torch.cat([plain.lookup(kept[:20_000]).values, compress_uniform(fresh, RowClass(64, 8)).lookup(torch.arange(80_000)).values])
    assert torch.equal(huge.lookup(kept).values, want)


@needs_madvise
def test_a_table_read_from_its_file_has_its_slabs_on_huge_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compression.storage import load_table, save_table

    monkeypatch.delenv("EMBSERVE_HUGE_PAGES", raising=False)
    rows = torch.randn(100_000, 64, generator=torch.Generator().manual_seed(6))
    table = compress_uniform(rows, RowClass(64, 4))  # 3.4 MiB slab
    save_table(table, tmp_path / "t.safetensors")
    loaded, _ = load_table(tmp_path / "t.safetensors")
    assert loaded.slabs[0].data_ptr() % memory.HUGE_PAGE == 0
    ids = torch.arange(0, 100_000, 7)
    assert torch.equal(loaded.lookup(ids).values, table.lookup(ids).values) and loaded.nbytes == table.nbytes
