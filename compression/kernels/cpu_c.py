"""ctypes binding of the compiled CPU decoder in ``decode.c`` (built by ``setup.py``)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..layout import MAX_CLASSES, RowClass

MAX_ROTATED_DIM = 1024  # must match decode.c
# Below this many IDs one thread decodes: starting the OpenMP team costs more than the work.
PARALLEL_MIN_ROWS = 1024


class _RowClassC(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("dim", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("rotation_t", ctypes.c_void_p),
        ("pq_m", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("codebook", ctypes.c_void_p),
    ]


class _IndexC(ctypes.Structure):
    """Mirror of ``index_t`` in decode.c."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("locator", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("keys", ctypes.c_void_p),
        ("fence", ctypes.c_void_p),
        ("n_fence", ctypes.c_int64),
        ("delta_keys", ctypes.c_void_p),
        ("delta_locator", ctypes.c_void_p),
        ("n_delta", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("mslots", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("pilots", ctypes.c_void_p),
        ("nb", ctypes.c_int64),
    ]


class _HidxC(ctypes.Structure):
    """Mirror of ``hidx_t`` in hashindex.c: a hash index's static part and overflow slots."""

    _fields_ = [
        ("pilots", ctypes.c_void_p),
        ("nb", ctypes.c_int64),
        ("mslots", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("cap", ctypes.c_int64),
    ]


# 3 was the format-2 hash layout (separate key / locator arrays), retired: a library built
# before kind 4 rejects it instead of misreading the 12-byte slots; 5 is a hash index with a
# static part (a library built before it rejects kind 5, and cpu_c never hands it one: see
# STATIC_OPS_AVAILABLE)
INDEX_RESOLVED, INDEX_DENSE, INDEX_KEYED, INDEX_HASH, INDEX_STATIC_HASH = 0, 1, 2, 4, 5
FENCE = 16  # must match decode.c; 16 keys = 2 cache lines per run, fence = N/16 keys
_T = TypeVar("_T", bound="ctypes.Structure | ctypes.Array[Any]")


def _ptr(t: torch.Tensor) -> int | None:
    return t.data_ptr() if t.numel() else None


def _addressed(view: _T) -> _T:
    """``view`` with its own address as ``view.address``: the CPython entry takes addresses,
    and ``ctypes.addressof`` per lookup is a tenth of a microsecond a batch-1 lookup can spare."""
    view.address = ctypes.addressof(view)  # type: ignore[attr-defined]
    return view


_RESOLVED = _addressed(_IndexC(kind=INDEX_RESOLVED))


def dense_index(locator: torch.Tensor) -> _IndexC:
    return _addressed(_IndexC(kind=INDEX_DENSE, locator=_ptr(locator), n=locator.numel()))


def keyed_index(keys: torch.Tensor, locator: torch.Tensor, fence: torch.Tensor, delta_keys: torch.Tensor, delta_locator: torch.Tensor) -> _IndexC:
    return _addressed(_IndexC(
        kind=INDEX_KEYED, locator=_ptr(locator), n=keys.numel(), keys=_ptr(keys), fence=_ptr(fence), n_fence=fence.numel(),
        delta_keys=_ptr(delta_keys), delta_locator=_ptr(delta_locator), n_delta=delta_keys.numel(),
    ))


def hash_index(slots: torch.Tensor) -> _IndexC:
    """View of an open-addressing :class:`compression.hash_index.HashIndex`: its int32
    ``[cap, 3]`` slot array (12-byte slots, ``kernels/hashslot.h``), ``n`` = capacity."""
    return _addressed(_IndexC(kind=INDEX_HASH, n=slots.shape[0], slots=_ptr(slots)))


def static_hash_index(static_slots: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor) -> _IndexC:
    """View of a :class:`compression.hash_index.HashIndex` with a static part (``m`` > 0 slots,
    uint16 pilots held as int16) and its overflow ``slots`` (``n`` = their capacity)."""
    return _addressed(_IndexC(
        kind=INDEX_STATIC_HASH, n=slots.shape[0], slots=_ptr(slots),
        mslots=_ptr(static_slots), m=static_slots.shape[0], pilots=_ptr(pilots), nb=pilots.numel(),
    ))


def _load() -> ctypes.CDLL | None:
    here = Path(__file__).parent
    for path in sorted(here.glob("_decode*.so")) + sorted(here.glob("_decode*.pyd")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if not hasattr(lib, "embserve_rotation_f32"):
            # built when row_class_t carried an fp16 R^T: it would misread the fp32 one (and
            # the _entry of that build likewise); torch decodes until the package is rebuilt
            continue
        lib.embserve_lookup.restype = ctypes.c_int64
        lib.embserve_lookup.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
        ]
        _declare_hash_ops(lib)
        _declare_encoder(lib)
        _declare_sketch_ops(lib)
        if hasattr(lib, "embserve_narrow"):  # float32 -> fp16 / bf16 (a library built before it lacks it)
            lib.embserve_narrow.restype = ctypes.c_int32
            lib.embserve_narrow.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32]
        lib.embserve_init()
        return lib
    return None


def _declare_hash_ops(lib: ctypes.CDLL) -> None:
    """Signatures of hashindex.c (built into the same library).  A library built before the
    12-byte slot layout lacks the ``embserve_hslot_*`` names (it has the format-2
    ``embserve_hash_*`` ones, which take other arguments): the hash index then takes its torch
    path, and lookups too (:meth:`HashIndex.c_view` returns None), until it is rebuilt.  The
    same holds for a library built when capacities were powers of two (home = top bits, wrap =
    mask): it lacks ``embserve_hslot_any_capacity`` and would misplace keys in other capacities."""
    if not hasattr(lib, "embserve_hslot_upsert") or not hasattr(lib, "embserve_hslot_any_capacity"):
        return
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.embserve_hslot_find.restype = None
    lib.embserve_hslot_find.argtypes = [p, i64, p, i64, p]
    lib.embserve_hslot_upsert.restype = i64
    lib.embserve_hslot_upsert.argtypes = [p, i64, p, p, i64]
    lib.embserve_hslot_delete.restype = i64
    lib.embserve_hslot_delete.argtypes = [p, i64, p, i64, p]
    lib.embserve_hslot_rehash.restype = None
    lib.embserve_hslot_rehash.argtypes = [p, i64, p, i64]
    if hasattr(lib, "embserve_mph_static_part"):
        lib.embserve_mph_build.restype = i64
        lib.embserve_mph_build.argtypes = [p, p, i64, p, i64, p, i64, p]
        lib.embserve_hidx_find.restype = None
        lib.embserve_hidx_find.argtypes = [p, p, i64, p]
        lib.embserve_hidx_upsert.restype = None
        lib.embserve_hidx_upsert.argtypes = [p, p, p, i64, p]
        lib.embserve_hidx_delete.restype = None
        lib.embserve_hidx_delete.argtypes = [p, p, i64, p, p]


def _declare_encoder(lib: ctypes.CDLL) -> None:
    """Signature of encode.c's ``embserve_encode_rows`` (absent from a library built before it:
    encoding then takes the torch path until the library is rebuilt)."""
    if not hasattr(lib, "embserve_encode_rows"):
        return
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.embserve_encode_rows.restype = i64
    lib.embserve_encode_rows.argtypes = [p, i64, i32, i32, i32, p, i32, p, i64, i32]


def _declare_sketch_ops(lib: ctypes.CDLL) -> None:
    """Signatures of sketch.c (absent from a library built before it: the sketches use torch)."""
    if not hasattr(lib, "embserve_cms_add_i32"):
        return
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("embserve_cms_add_i32", "embserve_cms_min_i32", "embserve_cms_min_f32"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [p, i64, i64, p, p, i64] + ([p] if "min" in name else [])
    lib.embserve_cms_add_f32.restype = None
    lib.embserve_cms_add_f32.argtypes = [p, i64, i64, p, p, i64, ctypes.c_float]


_LIB = _load()
AVAILABLE = _LIB is not None
HASH_OPS_AVAILABLE = AVAILABLE and hasattr(_LIB, "embserve_hslot_upsert") and hasattr(_LIB, "embserve_hslot_any_capacity")
# A library built before the static part (hashindex.c's embserve_mph_*, decode.c's kind 5) would
# probe an index that has one through its overflow slots alone: such an index stays on the torch
# path (writes and lookups) until the library is rebuilt, and builds make no static part.
STATIC_OPS_AVAILABLE = HASH_OPS_AVAILABLE and hasattr(_LIB, "embserve_mph_static_part")
# codecs.encode_rows takes the compiled encoder when this is set (tests switch it off to run the
# torch path on the same machine)
ENCODER_AVAILABLE = AVAILABLE and hasattr(_LIB, "embserve_encode_rows")
# count-min sketch adds and estimates (frequency.py, lifecycle.py); tests switch it off to run torch
SKETCH_OPS_AVAILABLE = AVAILABLE and hasattr(_LIB, "embserve_cms_add_i32")
# Below this many rows one thread encodes: the applier's batches stay on its own thread (the
# request threads need the other cores), a table build uses them all.
ENCODE_PARALLEL_MIN_ROWS = 65536


def encode_rows(x: torch.Tensor, bits: int, refit: bool, grid: tuple[float, ...], row_bytes: int) -> torch.Tensor | None:
    """Quantized rows of ``x`` (float32 ``[n, dim]``, contiguous, CPU) as ``[n, row_bytes]``
    uint8, bit-identical to ``codecs.quantize_rows`` + packing; ``None`` when some row needs the
    torch path (non-finite values, a range past fp16): the caller then encodes all of them
    with torch."""
    assert _LIB is not None
    n, dim = x.shape
    out = torch.empty((n, row_bytes), dtype=torch.uint8)
    grid_c = (ctypes.c_float * max(1, len(grid)))(*grid)
    threads = torch.get_num_threads() if n >= ENCODE_PARALLEL_MIN_ROWS else 1
    rc = _LIB.embserve_encode_rows(x.data_ptr(), n, dim, bits, int(refit), grid_c, len(grid), out.data_ptr(), row_bytes, threads)
    if rc < 0:
        raise RuntimeError("compiled encoder rejected its arguments")
    return out if rc == 0 else None


def _load_entry() -> object | None:
    """The decoder's CPython entry points (pyentry.c, the ``_entry`` extension): ``lookup`` and
    ``lookup_answer`` at about a tenth of a ctypes call's overhead.  None when it was not built
    (no Python headers at install time) or the ctypes library is missing: then every call goes
    through ctypes, as before."""
    if _LIB is None:
        return None
    try:
        from . import _entry
    except ImportError:
        return None
    # lookup_loc is the newest entry point: an _entry built before it (a stale build) is not used
    return _entry if hasattr(_entry, "lookup_loc") else None


ENTRY: Any = _load_entry()

# The hash functions take ``slots``: the int32 [cap, 3] slot array of a HashIndex (contiguous, CPU).


def hash_find(slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    assert _LIB is not None
    out = torch.empty(ids.numel(), dtype=torch.int32)
    _LIB.embserve_hslot_find(slots.data_ptr(), slots.shape[0], ids.data_ptr(), ids.numel(), out.data_ptr())
    return out


def hash_upsert(slots: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor) -> int:
    """Upsert in place; returns how many keys were new.  The caller guarantees room."""
    assert _LIB is not None
    return int(_LIB.embserve_hslot_upsert(slots.data_ptr(), slots.shape[0], ids.data_ptr(), locs.data_ptr(), ids.numel()))


def hash_delete(slots: torch.Tensor, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Delete in place (backward shift); returns how many were held and their old locators."""
    assert _LIB is not None
    old = torch.empty(ids.numel(), dtype=torch.int32)
    removed = _LIB.embserve_hslot_delete(slots.data_ptr(), slots.shape[0], ids.data_ptr(), ids.numel(), old.data_ptr())
    return int(removed), old


def hash_rehash(old_slots: torch.Tensor, slots: torch.Tensor) -> None:
    assert _LIB is not None
    _LIB.embserve_hslot_rehash(old_slots.data_ptr(), old_slots.shape[0], slots.data_ptr(), slots.shape[0])


# The static part's functions take the int32 [m, 3] static slots, the int16 [nb] pilots (uint16
# bits) and the int32 [cap, 3] overflow slots of a HashIndex (contiguous, CPU).


def static_build(ids: torch.Tensor, locs: torch.Tensor, static_slots: torch.Tensor, pilots: torch.Tensor) -> torch.Tensor:
    """Fill the (all-free) ``static_slots`` and ``pilots`` with unique ``ids`` -> ``locs``;
    returns a bool mask of the IDs that got a static slot (the rest belong in the overflow)."""
    assert _LIB is not None
    placed = torch.zeros(ids.numel(), dtype=torch.uint8)
    got = _LIB.embserve_mph_build(ids.data_ptr(), locs.data_ptr(), ids.numel(), static_slots.data_ptr(), static_slots.shape[0],
                                  pilots.data_ptr(), pilots.numel(), placed.data_ptr())
    if got < 0:
        raise MemoryError("building a hash index's static part ran out of memory")
    return placed.bool()


def _hidx(static_slots: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor) -> _HidxC:
    return _HidxC(pilots=_ptr(pilots), nb=pilots.numel(), mslots=_ptr(static_slots), m=static_slots.shape[0],
                  slots=slots.data_ptr(), cap=slots.shape[0])


def hidx_find(static_slots: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Locators of ``ids`` (-1 = absent): the static slot, then the overflow."""
    assert _LIB is not None
    out = torch.empty(ids.numel(), dtype=torch.int32)
    _LIB.embserve_hidx_find(ctypes.byref(_hidx(static_slots, pilots, slots)), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out


def hidx_upsert(static_slots: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor, locs: torch.Tensor) -> tuple[int, int]:
    """Upsert in place; returns the new keys (in the static part, in the overflow).  The caller
    guarantees overflow room for every ID not yet held."""
    assert _LIB is not None
    added = (ctypes.c_int64 * 2)()
    _LIB.embserve_hidx_upsert(ctypes.byref(_hidx(static_slots, pilots, slots)), ids.data_ptr(), locs.data_ptr(), ids.numel(), added)
    return int(added[0]), int(added[1])


def hidx_delete(static_slots: torch.Tensor, pilots: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """Delete in place; returns how many left (the static part, the overflow) and the locators
    the IDs had (-1 = not held)."""
    assert _LIB is not None
    old = torch.empty(ids.numel(), dtype=torch.int32)
    removed = (ctypes.c_int64 * 2)()
    _LIB.embserve_hidx_delete(ctypes.byref(_hidx(static_slots, pilots, slots)), ids.data_ptr(), ids.numel(), old.data_ptr(), removed)
    return int(removed[0]), int(removed[1]), old


def class_array(
    slabs: list[torch.Tensor],
    classes: list[RowClass],
    rotation_t: torch.Tensor | None = None,
    codebooks: list[torch.Tensor | None] | None = None,
) -> ctypes.Array[_RowClassC]:
    """The C view of a table's classes: slab addresses and shapes, padded to MAX_CLASSES,
    ``R^T`` (fp32 ``[K, D]``, the decoder's copy) for truncated classes of a rotated table, and
    the fp16 codebook of PQ classes.

    Valid until a slab is reallocated; tables rebuild it when they grow a slab."""
    arr = (_RowClassC * MAX_CLASSES)()
    width = None if rotation_t is None else rotation_t.shape[1]
    if rotation_t is not None and (rotation_t.dtype != torch.float32 or not rotation_t.is_contiguous()):
        raise ValueError("the compiled decoder reads the rotation as a contiguous fp32 R^T")
    for k, (slab, rc) in enumerate(zip(slabs, classes, strict=True)):
        if slab.device.type != "cpu" or not slab.is_contiguous():
            raise ValueError("the compiled decoder needs contiguous CPU slabs")
        arr[k].base = slab.data_ptr() if slab.numel() else None
        arr[k].row_bytes = rc.row_bytes
        arr[k].dim = rc.dim
        arr[k].bits = rc.bits
        if rotation_t is not None and 0 < rc.dim < (width or 0):
            arr[k].rotation_t = rotation_t.data_ptr()
        if rc.pq:
            codebook = None if codebooks is None else codebooks[k]
            if codebook is None or codebook.dtype != torch.float16 or not codebook.is_contiguous() or codebook.device.type != "cpu":
                raise ValueError(f"the compiled decoder needs a contiguous fp16 CPU codebook for {rc.label()}")
            arr[k].pq_m = rc.m
            arr[k].codebook = codebook.data_ptr()
    return _addressed(arr)


def lookup(out: torch.Tensor, ids: torch.Tensor, index: _IndexC | None, classes_c: ctypes.Array[_RowClassC]) -> tuple[torch.Tensor, int]:
    """Decode into ``out`` (float32 ``[n, D]`` contiguous CPU).  ``ids`` are raw IDs resolved
    through ``index``, or locators already when it is ``None``.  Returns the locators and how
    many of them are ``-1`` (no row)."""
    assert _LIB is not None
    n, width = out.shape
    if ids.dtype is not torch.int64 or not ids.is_contiguous():
        ids = ids.to(torch.int64).contiguous()
    loc = torch.empty(n, dtype=torch.int32)
    threads = torch.get_num_threads() if n >= PARALLEL_MIN_ROWS else 1
    if ENTRY is not None:
        return loc, ENTRY.lookup(  # type: ignore[attr-defined]
            ids.data_ptr(), n, (index if index is not None else _RESOLVED).address, classes_c.address,  # type: ignore[attr-defined]
            out.data_ptr(), width, loc.data_ptr(), threads,
        )
    # ctypes.byref, not addressof: no int -> c_void_p conversion on a path that runs per request
    rc = _LIB.embserve_lookup(
        ids.data_ptr(), n, ctypes.byref(index if index is not None else _RESOLVED),
        ctypes.byref(classes_c), MAX_CLASSES, out.data_ptr(), width, loc.data_ptr(), threads,
    )
    if rc < 0:
        raise RuntimeError("compiled decoder rejected its arguments")
    return loc, int(rc)


ENTRY_AVAILABLE = ENTRY is not None
# the entry's pruned-row mask (absent from an _entry built before it: tables with a pruned class
# then take the general lookup, which computes the mask with torch)
ENTRY_PRUNED = ENTRY is not None and hasattr(ENTRY, "pruned")


# the wire's dtype codes for lookup_answer's rows (service/wire.py): 16-bit answers narrowed in C
ANSWER_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
# the entry's lookup_answer takes a dtype (absent from an _entry built before: 16-bit answers
# then take the general path)
ENTRY_NARROW = ENTRY is not None and hasattr(ENTRY, "ANSWER_DTYPES")


def lookup_answer(ids: bytes | bytearray | memoryview, ids_offset: int, n: int, index: _IndexC, classes_c: ctypes.Array[_RowClassC],
                  answer: bytearray, rows_offset: int, width: int, status_offset: int, dtype: torch.dtype = torch.float32) -> int:
    """Decode the ``n`` int64 IDs at ``ids[ids_offset:]`` (a request body) straight into
    ``answer`` (a response buffer): rows ``[n, width]`` of ``dtype`` (float32, or fp16 / bf16
    rounded to nearest even in C: :data:`ENTRY_NARROW`) at ``rows_offset`` and one status byte
    per ID at ``status_offset`` (1 has a row, 0 unknown).  One call, no tensors: the service's
    small binary answers (pyentry.c).  Returns the unknown count; unknown IDs' rows are the
    decoder's zeros, for the caller to fill."""
    assert ENTRY is not None
    if dtype is torch.float32:
        return ENTRY.lookup_answer(  # type: ignore[attr-defined,no-any-return]
            ids, ids_offset, n, index.address, classes_c.address, answer, rows_offset, width, status_offset,  # type: ignore[attr-defined]
        )
    assert ENTRY_NARROW
    return ENTRY.lookup_answer(  # type: ignore[attr-defined,no-any-return]
        ids, ids_offset, n, index.address, classes_c.address, answer, rows_offset, width, status_offset,  # type: ignore[attr-defined]
        ANSWER_DTYPE_CODES[dtype],
    )


def narrow(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (contiguous float32 CPU) as ``dtype`` (fp16 or bf16) by the C pass 16-bit
    answers use (decode.c's embserve_narrow): what tests hold to torch's own conversion."""
    assert _LIB is not None and hasattr(_LIB, "embserve_narrow")
    assert values.dtype == torch.float32 and values.is_contiguous() and values.device.type == "cpu"
    out = torch.empty(values.shape, dtype=dtype)
    if _LIB.embserve_narrow(values.data_ptr(), values.numel(), out.data_ptr(), ANSWER_DTYPE_CODES[dtype]) != 0:
        raise ValueError(f"no C narrowing to {dtype}")
    return out


def answer_buffer(size: int) -> bytearray:
    """A ``size``-byte bytearray for an answer whose every byte the caller writes (head,
    :func:`lookup_answer`'s rows and statuses, padding): not zero-filled first when the compiled
    entry is built (pyentry.c), zeros otherwise."""
    if ENTRY is None:
        return bytearray(size)
    return ENTRY.answer_buffer(size)  # type: ignore[attr-defined,no-any-return]


# Count-min sketches: ``cells`` is a contiguous CPU [depth, width] float32 or int32 tensor,
# ``mult`` the int64 [depth] row multipliers, ``ids`` contiguous int64 (see sketch.c).


def sketch_add(cells: torch.Tensor, mult: torch.Tensor, ids: torch.Tensor, weight: float = 1.0) -> None:
    """One occurrence (``weight`` for float cells; 1 for int32 cells) per entry of ``ids``, in place."""
    assert _LIB is not None
    depth, width = cells.shape
    if cells.dtype == torch.int32:
        _LIB.embserve_cms_add_i32(cells.data_ptr(), depth, width, mult.data_ptr(), ids.data_ptr(), ids.numel())
    else:
        _LIB.embserve_cms_add_f32(cells.data_ptr(), depth, width, mult.data_ptr(), ids.data_ptr(), ids.numel(), weight)


def sketch_min(cells: torch.Tensor, mult: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The smallest of each ID's cells (its count-min estimate)."""
    assert _LIB is not None
    depth, width = cells.shape
    out = torch.empty(ids.numel(), dtype=cells.dtype)
    fn = _LIB.embserve_cms_min_i32 if cells.dtype == torch.int32 else _LIB.embserve_cms_min_f32
    fn(cells.data_ptr(), depth, width, mult.data_ptr(), ids.data_ptr(), ids.numel(), out.data_ptr())
    return out
