"""Tables on disk: one safetensors file whose header metadata carries the JSON manifest.

File layout (safetensors, see https://github.com/huggingface/safetensors):

    u64 little-endian  header length H
    H bytes            JSON header: {tensor name: {dtype, shape, data_offsets}, ...,
                                     "__metadata__": {"embserve.manifest": "<manifest JSON>"}}
    ...                raw tensor bytes, little-endian, row-major

Tensors, by name (all that :meth:`CompressedTable.state_tensors` returns):

    index.locator                 int32 [N]          dense and keyed tables (format-2 hash: int32 [cap])
    index.keys                    int64 [N]          keyed: sorted IDs (format-2 hash: int64 [cap])
    index.slots                   int32 [cap, 3]     hash (format 3): 12-byte slots, int64 key (2 words,
                                                     low first; INT64_MIN = free) + int32 locator
                                                     (layout and slot formula: compression/hash_index.py);
                                                     with a static part, its overflow
    index.static_slots / pilots   int32 [m, 3] / int16 [B]   hash (format 4): the static part
    index.delta_keys / _locator   int64 / int32      keyed: unmerged inserts
    index.bounds / index.bases    int64 [R+1] / int32 [R]   runs: run-length encoded dense locator
    class.{k}.slab                uint8 [cap_k, row_bytes_k]   rows of class k (compression.layout)
    class.{k}.free                int32 [f_k]        free slots of class k
    class.{k}.codebook            fp16 [m, 2**bits, dim/m]   product-quantization class k only
    rotation                      fp16 [D, K]        optional: the first K columns of the orthogonal
                                                     rotation, K = widest truncated class (older
                                                     files: fp32 [D, D], still read; narrowed on load)
    unknown.default               fp32 [D]           optional
    unknown.buckets               fp16 [K, D]        optional (hashed, qr, binary_hash)
    unknown.params                int64 [2]          optional (qr: [M, Q]; binary_hash: [S, k])
    lifecycle.counts              int32 [depth, width]   optional: admission / eviction counts
    lifecycle.clock               int64 [2]          optional: [upserted rows, next halving]
                                                     (compression/lifecycle.py; hash tables only)

Manifest (JSON object): ``format_version``, ``dim``, ``index`` (``dense``/``keyed``/``runs``/``hash``),
``classes`` (``[{"dim", "bits", "used"}]`` in class-index order; a product-quantization class
adds ``"kind": "pq"`` and ``"m"``, and then ``bits`` is its code width), ``unknown`` (policy
kind), ``lifecycle`` (null, or ``max_ids`` / ``admit_min_count`` / ``half_life_rows`` / sketch
shape / ``eviction_samples``), ``log_position`` (update-log position the file includes, or
null), ``objective`` (what the allocator minimized: ``l2``, ``cosine`` or ``knn``; null or
absent for tables built otherwise), ``extra`` (free-form).

Format versions: a file is written with the smallest version that holds what it uses, so a
table an older reader could read stays readable by it.  Version 2 adds PQ (codebook) classes,
the ``hash`` index and the fp16 ``[D, K]`` rotation: a version-1 reader would take a PQ class's
``(dim, bits)`` for a scalar class, not know the index, or read the rotation as fp32 ``[D, D]``,
so it must refuse such a file, and it does: its version check
names the newer version and says to upgrade.  Version 3 changes the ``hash`` index's layout
(below), version 4 adds its static part.  This reader reads all four.

The ``runs`` index and the ``qr`` / ``binary_hash`` unknown-ID kinds were added without a
format version bump: they are new names, so a reader that predates them refuses such a file
with a clear "inconsistent table file" error instead of misreading it, and every file it could
read before reads the same.

The ``hash`` index (open addressing, compression/hash_index.py) is written as format version 3:
packed 12-byte slots ``index.slots`` with the fmix64 home slot.  Version 2 wrote it as separate
``index.keys`` / ``index.locator`` arrays placed by a Fibonacci (single multiply) hash; this
reader still loads such files (their IDs are re-inserted into slots), and a version-2 reader
refuses a version-3 file with "format version 3 is newer than this embserve reads (2); upgrade
embserve" instead of probing the slots with the wrong hash.  A reader of version 1 refuses both.
Version 3's capacity was first a power of two (home = fmix64's top ``log2(cap)`` bits); it is
now any capacity (home = ``((fmix64 >> 32) * cap) >> 32``, which is the same slot when ``cap``
is a power of two, so those files load unchanged).  New files are still version 3: a reader
from before that change loads the ones whose capacity happens to be a power of two and refuses
the others with "inconsistent table file (hash index capacity must be a power of two ...)",
never probing them with the wrong home.
Version 4 adds the hash index's static part (``index.static_slots`` int32 [m, 3], 12-byte slots
as above; ``index.pilots`` int16 [buckets], uint16 bits; formula in compression/hash_index.py),
which holds most of its IDs: a version-3 reader would find them missing from ``index.slots``,
so it refuses the file with its "newer than this embserve reads" error.  A hash index without a
static part (the torch fallback builds none) is still written as version 3.
Every other table is still written as version 1 (or 2 for PQ classes and the fp16 rotation),
so files an older reader could read stay readable by it, and this reader loads every older file.

Keeping the manifest inside the tensor file makes the write a single atomic rename: a crash
leaves either the old file or the new one, never a table with a mismatched manifest.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import memory
from .index import index_from_state
from .layout import RowClass
from .lifecycle import IdLifecycle
from .table import CompressedTable
from .unknown import UnknownPolicy

FORMAT_VERSION = 4  # the newest version this reader reads
# the oldest version that can hold each feature: a file is written with the smallest version
# that holds everything it uses, so a table an older reader could read stays readable by it
_INDEX_VERSIONS = {"hash": 3}  # format 2 had the split-array hash layout (still read)
_STATIC_HASH_VERSION = 4  # a hash index with a static part (index.static_slots / index.pilots)
_PQ_VERSION = 2
_ROTATION_VERSION = 2  # fp16 [D, K]; a version-1 reader expects fp32 [D, D]
MANIFEST_KEY = "embserve.manifest"
TABLE_SUFFIX = ".safetensors"


class TableFormatError(ValueError):
    """The file is not a table this version can read."""


def manifest_of(table: CompressedTable, log_position: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format_version": max(
            _INDEX_VERSIONS.get(table.index.kind, 1),
            _STATIC_HASH_VERSION if getattr(table.index, "has_static", False) else 1,
            _PQ_VERSION if any(rc.pq for rc in table.classes) else 1,
            _ROTATION_VERSION if table.rotation is not None else 1,
        ),
        "dim": table.dim,
        "index": table.index.kind,
        "classes": [_class_entry(rc, u) for rc, u in zip(table.classes, table.used, strict=True)],
        "unknown": table.unknown.kind,
        "lifecycle": None if table.lifecycle is None else table.lifecycle.config.as_dict(),
        "objective": table.objective,
        "log_position": log_position,
        "extra": extra or {},
    }


def _class_entry(rc: RowClass, used: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"dim": rc.dim, "bits": rc.bits, "used": used}
    if rc.pq:
        entry.update(kind="pq", m=rc.m)
    return entry


def _class_of(entry: dict[str, Any]) -> RowClass:
    kind = entry.get("kind", "scalar")
    if kind == "pq":
        return RowClass(int(entry["dim"]), int(entry["bits"]), int(entry["m"]))
    if kind != "scalar":
        raise ValueError(f"unknown row class kind {kind!r}")
    return RowClass(int(entry["dim"]), int(entry["bits"]))


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the folder's entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_state(
    table: CompressedTable, log_position: str | None = None, extra: dict[str, Any] | None = None, *, writers_excluded: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A consistent copy of the table's tensors and its manifest, taken under the table's lock.

    Writers wait for the lock; the copy is what makes it safe to write the file after the lock is
    released (``to("cpu")`` alone would hand back the live CPU tensors).  ``writers_excluded``:
    the caller holds what keeps every writer out (the service's per-table write lock), so the
    copy needs no lock against lookups, which only read: they go on while it is taken (a 1M-ID
    int8 table: 126 MiB, about 70 ms of copying that held every lookup of the table before)."""
    if not writers_excluded:
        with table.lock:
            return capture_state(table, log_position, extra, writers_excluded=True)
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in table.state_tensors().items()}
    return tensors, manifest_of(table, log_position, extra)


def write_state(tensors: dict[str, torch.Tensor], manifest: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a captured state atomically: temp file in the same folder, fsync, rename, fsync folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def save_table(
    table: CompressedTable, path: str | os.PathLike[str], log_position: str | None = None, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``table`` to ``path`` atomically (see :func:`write_state`)."""
    tensors, manifest = capture_state(table, log_position, extra)
    return write_state(tensors, manifest, path)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read only the header of a table file (cheap: no tensor bytes are loaded)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise TableFormatError(f"{path}: not a safetensors file ({exc})") from exc
    if MANIFEST_KEY not in meta:
        raise TableFormatError(f"{path}: no embserve manifest in the file header")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise TableFormatError(f"{path}: manifest is not valid JSON ({exc})") from exc
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise TableFormatError(f"{path}: manifest has no integer format_version")
    if version > FORMAT_VERSION:
        raise TableFormatError(
            f"{path}: table format version {version} is newer than this embserve reads ({FORMAT_VERSION}); upgrade embserve"
        )
    return manifest


def load_table(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[CompressedTable, dict[str, Any]]:
    manifest = read_manifest(path)
    tensors = load_file(str(path), device=str(device))
    try:
        classes = [_class_of(c) for c in manifest["classes"]]
        used = [int(c["used"]) for c in manifest["classes"]]
        index = index_from_state(manifest["index"], tensors)
        for k in range(len(classes)):  # onto huge pages one slab at a time: one slab's copy at most in flight
            tensors[f"class.{k}.slab"] = memory.adopt(tensors[f"class.{k}.slab"])
        table = CompressedTable(
            dim=int(manifest["dim"]),
            classes=classes,
            slabs=[tensors[f"class.{k}.slab"] for k in range(len(classes))],
            used=used,
            index=index,
            free=[tensors[f"class.{k}.free"] for k in range(len(classes))],
            rotation=tensors.get("rotation"),
            unknown=UnknownPolicy.from_state(manifest["unknown"], tensors),
            codebooks=[tensors[f"class.{k}.codebook"] if rc.pq else None for k, rc in enumerate(classes)],
            lifecycle=IdLifecycle.from_state(manifest["lifecycle"], tensors) if manifest.get("lifecycle") else None,
        )
        table.objective = manifest.get("objective")
    except (KeyError, TypeError, ValueError) as exc:
        raise TableFormatError(f"{path}: inconsistent table file ({exc})") from exc
    return table, manifest
