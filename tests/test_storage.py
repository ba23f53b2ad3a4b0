"""Table files: bit-exact round trip, atomic writes, clear errors for files we cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compression import FORMAT_VERSION, CompressedTable, RowClass, TableFormatError, compress, load_table, read_manifest, save_table
from compression import storage
from compression.hash_index import static_available


def test_round_trip_is_bit_exact(tmp_path: Path, mixed_table: CompressedTable) -> None:
    path = save_table(mixed_table, tmp_path / "t.safetensors", log_position="17-0")
    loaded, manifest = load_table(path)
    # an fp16 rotation makes it version 2 (a version-1 reader would read it as fp32 [D, D]);
    # a dense table without PQ classes or rotation stays readable by version-1 readers
    assert manifest["log_position"] == "17-0" and manifest["format_version"] == (2 if mixed_table.rotation is not None else 1)
    before, after = mixed_table.state_tensors(), loaded.state_tensors()
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype
        assert torch.equal(before[name], after[name]), name
    ids = torch.arange(-5, 25_000, 7)
    assert torch.equal(mixed_table.lookup(ids).values, loaded.lookup(ids).values)
    assert loaded.nbytes == mixed_table.nbytes


def test_keyed_table_with_pending_inserts_round_trips(tmp_path: Path) -> None:
    table = CompressedTable.empty(4, [RowClass(4, 32), RowClass(4, 4)], keyed=True)
    table.put(torch.tensor([10, -3, 99]), torch.randn(3, 4), 1)
    table.put(torch.tensor([7]), torch.randn(1, 4), 0)
    table.delete(torch.tensor([-3]))
    loaded, _ = load_table(save_table(table, tmp_path / "k.safetensors"))
    ids = torch.tensor([10, -3, 99, 7, 8])
    a, b = table.lookup(ids), loaded.lookup(ids)
    assert torch.equal(a.values, b.values) and torch.equal(a.found, b.found)
    assert torch.equal(loaded.free[1], table.free[1])


def test_newer_format_version_fails_clearly(tmp_path: Path, mixed_table: CompressedTable) -> None:
    path = save_table(mixed_table, tmp_path / "t.safetensors")
    tensors, _ = {k: v.contiguous() for k, v in mixed_table.state_tensors().items()}, None
    manifest = read_manifest(path)
    manifest["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, str(path), metadata={storage.MANIFEST_KEY: json.dumps(manifest)})
    with pytest.raises(TableFormatError, match="newer than this embserve reads"):
        load_table(path)


def test_non_table_files_fail_clearly(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TableFormatError):
        load_table(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(TableFormatError, match="no embserve manifest"):
        load_table(plain)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, mixed_table: CompressedTable, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_table(mixed_table, tmp_path / "t.safetensors", log_position="1-0")
    original = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        Path(filename).write_bytes(b"half a tab")
        raise OSError("disk full")

    monkeypatch.setattr(storage, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_table(mixed_table, path, log_position="2-0")
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_compress_then_save_keeps_budget_on_disk(tmp_path: Path, zipf_rows) -> None:  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    table, report = compress(rows, freqs, ratio=16)
    path = save_table(table, tmp_path / "z.safetensors")
    # the file adds only its JSON header to the bytes the table reports
    assert table.nbytes <= report.budget_bytes
    assert path.stat().st_size - table.nbytes < 8192


def test_corrupt_locators_are_refused_at_load(tmp_path: Path) -> None:
    table = CompressedTable.empty(4, [RowClass(4, 8)], keyed=False)
    table.put(torch.arange(10), torch.randn(10, 4), 0)
    path = save_table(table, tmp_path / "c.safetensors")
    tensors = {k: v.clone() for k, v in table.state_tensors().items()}
    tensors["index.locator"][3] = 10_000  # slot far past the slab
    save_file(tensors, str(path), metadata={storage.MANIFEST_KEY: json.dumps(read_manifest(path))})
    with pytest.raises(TableFormatError, match="past the used slots"):
        load_table(path)
    tensors["index.locator"][3] = 3 << 28  # class 3 of a 1-class table
    save_file(tensors, str(path), metadata={storage.MANIFEST_KEY: json.dumps(read_manifest(path))})
    with pytest.raises(TableFormatError, match="row class"):
        load_table(path)


def test_hash_indexed_tables_are_version_3_and_an_older_reader_refuses_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    table.put(torch.tensor([5, -(2**62)]), torch.randn(2, 4), 0)
    path = save_table(table, tmp_path / "h.safetensors")
    assert not table.index.has_static  # type: ignore[attr-defined]  # filled by puts: no static part until a rebuild
    assert read_manifest(path)["format_version"] == 3 < FORMAT_VERSION
    loaded, manifest = load_table(path)
    assert manifest["index"] == "hash" and torch.equal(loaded.lookup(torch.tensor([5, -(2**62), 6])).values, table.lookup(torch.tensor([5, -(2**62), 6])).values)
    assert torch.equal(loaded.index.slots, table.index.slots)  # type: ignore[attr-defined]
    sorted_table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=False)
    sorted_table.put(torch.tensor([1]), torch.randn(1, 4), 0)
    old_path = save_table(sorted_table, tmp_path / "d.safetensors")
    monkeypatch.setattr(storage, "FORMAT_VERSION", 2)  # what a reader of the format-2 hash layout does
    with pytest.raises(TableFormatError, match="format version 3 is newer than this embserve reads"):
        load_table(path)
    load_table(old_path)  # files without the new kind stay readable by it


@pytest.mark.skipif(not static_available(), reason="the static part is built by the compiled library")
def test_a_static_hash_index_is_version_4_round_trips_and_a_version_3_reader_refuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A keyed table whose index has a static part: written as format 4 with both parts, read
    back equal (the same slots, the same answers, still writable), refused by a format-3 reader
    (which would look for the IDs in the overflow slots alone), and its loader checks that the
    static keys sit where the pilots put them."""
    table = CompressedTable.empty(4, [RowClass(4, 32)], keyed=True)
    ids = torch.arange(2000) * 1_000_003 - 2**40
    table.put(ids, torch.randn(2000, 4), 0)
    table.index.rebuild()  # type: ignore[attr-defined]  # what a re-decision does
    table.delete(ids[:10])
    table.put(torch.tensor([7, 8]), torch.randn(2, 4), 0)
    assert table.index.has_static  # type: ignore[attr-defined]
    path = save_table(table, tmp_path / "s.safetensors")
    assert read_manifest(path)["format_version"] == 4 == FORMAT_VERSION
    loaded, _ = load_table(path)
    probe = torch.cat([ids, torch.tensor([7, 8, 9])])
    assert torch.equal(loaded.lookup(probe).values, table.lookup(probe).values)
    for name in ("index.slots", "index.static_slots", "index.pilots"):
        assert torch.equal(loaded.state_tensors()[name], table.state_tensors()[name])
    loaded.put(torch.tensor([9]), torch.ones(1, 4), 0)
    assert bool(loaded.lookup(torch.tensor([9])).found.all())
    monkeypatch.setattr(storage, "FORMAT_VERSION", 3)
    with pytest.raises(TableFormatError, match="format version 4 is newer than this embserve reads"):
        load_table(path)
    monkeypatch.setattr(storage, "FORMAT_VERSION", 4)
    tensors = {k: v.detach().clone().contiguous() for k, v in table.state_tensors().items()}
    tensors["index.pilots"][0] ^= 1  # another pilot: the first bucket's IDs are no longer where it points
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={storage.MANIFEST_KEY: json.dumps(read_manifest(path))})
    with pytest.raises(TableFormatError, match="static slots"):
        load_table(tmp_path / "bad.safetensors")


def format_2_hash_arrays(ids: list[int], locators: list[int], capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The format-2 hash layout, written the slow obvious way: separate ``keys int64[cap]`` and
    ``locator int32[cap]``, home slot ``(uint64(id) * 0x9E3779B97F4A7C15 mod 2**64) >> (64 - L)``,
    linear probing."""
    log2 = capacity.bit_length() - 1
    keys = [-(2**63)] * capacity
    locs = [-1] * capacity
    for key, loc in zip(ids, locators, strict=True):
        s = ((key % 2**64) * 0x9E3779B97F4A7C15 % 2**64) >> (64 - log2)
        while keys[s] != -(2**63):
            s = (s + 1) % capacity
        keys[s], locs[s] = key, loc
    return torch.tensor(keys, dtype=torch.int64), torch.tensor(locs, dtype=torch.int32)


def test_a_format_2_hash_table_file_still_loads(tmp_path: Path) -> None:
    """Files written before the 12-byte slots (format 2: separate arrays, Fibonacci hash) load:
    their IDs are re-inserted into slots, every lookup answers as before, and the next save is
    format 3."""
    table = CompressedTable.empty(8, [RowClass(8, 32), RowClass(8, 8)], keyed=True)
    ids = torch.arange(300) * 1_000_003 - 2**40
    rows = torch.randn(300, 8)
    table.put(ids[:150], rows[:150], 0)
    table.put(ids[150:], rows[150:], 1)
    table.delete(ids[::7])
    path = save_table(table, tmp_path / "new.safetensors")
    tensors = {k: v.detach().clone().contiguous() for k, v in table.state_tensors().items()}
    held, locs = table.index.live_items()
    # format 2 only had power-of-two capacities (this table's own one need not be)
    capacity = 1 << (table.index.capacity - 1).bit_length()  # type: ignore[attr-defined]
    del tensors["index.slots"]
    tensors["index.keys"], tensors["index.locator"] = format_2_hash_arrays(held.tolist(), locs.tolist(), capacity)
    manifest = read_manifest(path)
    manifest["format_version"] = 2
    old = tmp_path / "format2.safetensors"
    save_file(tensors, str(old), metadata={storage.MANIFEST_KEY: json.dumps(manifest)})
    loaded, _ = load_table(old)
    probe = torch.cat([ids, torch.tensor([7, -(2**63) + 1])])
    want, got = table.lookup(probe), loaded.lookup(probe)
    assert torch.equal(got.values, want.values) and torch.equal(got.locators, want.locators)
    assert loaded.index.capacity == capacity  # type: ignore[attr-defined]
    assert loaded.nbytes == table.nbytes + 12 * (capacity - table.index.capacity)  # type: ignore[attr-defined]
    loaded.put(torch.tensor([42]), torch.ones(1, 8), 0)  # writable in the new layout
    assert read_manifest(save_table(loaded, tmp_path / "again.safetensors"))["format_version"] == 3
    tensors["index.keys"][int(torch.nonzero(tensors["index.keys"] != -(2**63))[0])] = int(held[-1])  # an ID held twice
    save_file(tensors, str(old), metadata={storage.MANIFEST_KEY: json.dumps(manifest)})
    with pytest.raises(TableFormatError, match="twice"):
        load_table(old)
