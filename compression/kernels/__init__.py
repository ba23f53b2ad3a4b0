"""How stored bytes are read: the decode ops behind :meth:`CompressedTable.lookup`.

``torch`` is the reference (any device, one vectorized op per class); ``compiled`` is the C
kernel in ``decode.c`` (one fused pass, built at install time); ``triton`` is the fused GPU
kernel in ``triton_decode.py`` (index probe, decode, unknown-ID policy and output cast in one
launch; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).  ``auto`` takes the
compiled path for CPU tables when it was built, Triton for CUDA tables when it imports, else
the reference.  Tests check they give identical floats (allclose where rounding order differs:
rotation, pooling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..codecs import decode_rows
from ..layout import LOCATOR_CLASS_SHIFT, LOCATOR_SLOT_MASK, RowClass

if TYPE_CHECKING:  # the index imports this package for its compiled view
    from ..index import IdIndex

from . import cpu_c

COMPILED_AVAILABLE = cpu_c.AVAILABLE
_TRITON: Any = None  # the triton_decode module once imported; False when triton is missing


def triton_module() -> Any:
    """``triton_decode``, imported on first use (importing triton costs ~0.5 s, which a CPU
    service never needs to pay), or None where triton is not installed."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton_decode

            _TRITON = triton_decode
        except Exception:  # noqa: BLE001 - missing, or installed but unusable: serve with torch
            _TRITON = False
    return _TRITON or None


def decode_reference(
    out: torch.Tensor,
    loc: torch.Tensor,
    slabs: list[torch.Tensor],
    classes: list[RowClass],
    rotation: torch.Tensor | None = None,
    codebooks: list[torch.Tensor | None] | None = None,
) -> None:
    """Per class: gather its rows, decode (PQ classes: gather from the codebook), and
    (truncated classes of a rotated table) rotate back."""
    out.zero_()
    width = out.shape[1]
    valid = loc >= 0
    cls = torch.where(valid, loc >> LOCATOR_CLASS_SHIFT, torch.full_like(loc, -1))
    for c, rc in enumerate(classes):
        if rc.dim == 0:
            continue
        rows = torch.nonzero(cls == c).flatten()
        if rows.numel() == 0:
            continue
        slots = (loc[rows] & LOCATOR_SLOT_MASK).to(torch.int64)
        decoded = decode_rows(slabs[c][slots], rc, None if codebooks is None else codebooks[c])
        if rotation is not None and rc.dim < width:
            out[rows] = decoded @ rotation[:, : rc.dim].to(torch.float32).T
        else:
            out[rows, : rc.dim] = decoded


def select_path(backend: str, device: torch.device) -> str:
    """The decode path (``compiled``, ``triton`` or ``torch``) a backend setting gives on a device."""
    if backend == "compiled":
        if not COMPILED_AVAILABLE:
            raise RuntimeError("the compiled decoder was not built (no C compiler at install time?)")
        if device.type != "cpu":
            raise RuntimeError("the compiled backend runs on CPU tables only")
        return "compiled"
    if backend == "triton":
        module = triton_module()
        if module is None:
            raise RuntimeError("the triton backend needs the triton package (pip install triton)")
        if not module.runs_here(device):
            raise RuntimeError("the triton backend runs on CUDA tables (or CPU tables under TRITON_INTERPRET=1)")
        return "triton"
    if backend == "torch":
        return "torch"
    if backend != "auto":
        raise ValueError(f"unknown decode backend {backend!r}")
    if device.type == "cpu":
        return "compiled" if COMPILED_AVAILABLE else "torch"
    if device.type == "cuda" and triton_module() is not None:
        return "triton"
    return "torch"


def _use_compiled(backend: str, device: torch.device) -> bool:
    return select_path(backend, device) == "compiled"


class Decoder:
    """Decodes one table's rows.  Holds what the compiled path needs about the slabs (their
    addresses), so :meth:`refresh` must be called whenever a slab is reallocated."""

    def __init__(
        self,
        slabs: list[torch.Tensor],
        classes: list[RowClass],
        backend: str = "auto",
        rotation: torch.Tensor | None = None,
        codebooks: list[torch.Tensor | None] | None = None,
    ) -> None:
        self._triton_args: Any = None
        self.classes = classes
        self.codebooks = codebooks if codebooks is not None else [None] * len(classes)
        self.backend = backend
        self.rotation = rotation
        # the C decoder's R^T, row-major fp32, made when the compiled path is taken: row k is the
        # direction coordinate k of a truncated row contributes.  fp32, not the stored fp16:
        # widening it on every multiply-add was a sixth of a rotated row's decode
        # (kernels/decode.c, rotate_back_avx2); counted in held_tensors, and in the budget
        # (rotation.rotation_bytes)
        self._rotation_t: torch.Tensor | None = None
        self.refresh(slabs)

    def refresh(self, slabs: list[torch.Tensor]) -> None:
        self.slabs = slabs
        device = slabs[0].device
        self.path = select_path(self.backend, device)
        if self.path == "triton" and any(rc.pq for rc in self.classes):
            # the Triton kernel has no codebook gather yet: PQ tables decode with the reference
            if self.backend == "triton":
                raise RuntimeError("the triton backend does not decode product-quantization classes yet")
            self.path = "torch"
        self.compiled = self.path == "compiled"
        # the Triton launch's per-table arguments (typed slab views, class constants, R^T)
        self._triton_args = triton_module().class_args(slabs, self.classes, self.rotation) if self.path == "triton" else None
        if self.compiled and self.rotation is not None and self.rotation.shape[1] > cpu_c.MAX_ROTATED_DIM:
            self.compiled = False  # the C decoder's per-row scratch is bounded
        if self.compiled and self.rotation is not None and self._rotation_t is None:
            self._rotation_t = self.rotation.T.to(torch.float32).contiguous()
        self._classes_c = cpu_c.class_array(slabs, self.classes, self._rotation_t, self.codebooks) if self.compiled else None
        # the class array when lookups can take the CPython entry (cpu_c.ENTRY: table.lookup,
        # table.lookup_to_buffer), else None
        self.entry_classes = self._classes_c if cpu_c.ENTRY_AVAILABLE else None

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """What the decoder holds besides the table's own tensors (the C decoder's R^T)."""
        return {} if self._rotation_t is None else {"decoder.rotation_t": self._rotation_t}

    @property
    def fills_unknown(self) -> bool:
        """The decode already wrote the unknown-ID policy's rows (Triton does it in-kernel)."""
        return self._triton_args is not None

    def writes(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`lookup` can write ``dtype`` directly (else it takes fp32 and the caller casts)."""
        return dtype == torch.float32 or (self._triton_args is not None and dtype in (torch.float16, torch.bfloat16))

    def decode(self, out: torch.Tensor, loc: torch.Tensor) -> int:
        """Write the rows named by locators ``loc`` (``-1`` -> zeros) into ``out [n, D]``;
        returns how many locators are ``-1``."""
        if self._triton_args is not None:
            triton_module().lookup(out, loc.to(torch.int64), None, self._triton_args)
            return int((loc < 0).sum())
        if self._classes_c is not None:
            return cpu_c.lookup(out, loc, None, self._classes_c)[1]
        decode_reference(out, loc, self.slabs, self.classes, self.rotation, self.codebooks)
        return int((loc < 0).sum())

    def lookup(self, out: torch.Tensor, ids: torch.Tensor, index: IdIndex, unknown: Any = None) -> tuple[torch.Tensor, int]:
        """Resolve ``ids`` and decode into ``out``; returns the locators and the unknown count.
        On the compiled and Triton paths the index is searched inside the decode loop (one
        pass); Triton also writes the rows of unknown IDs by ``unknown`` (see fills_unknown)."""
        if self._triton_args is not None:
            loc = triton_module().lookup(out, ids, index, self._triton_args, unknown)
            return loc, int((loc < 0).sum())
        if self._classes_c is not None:
            view = index.c_view()
            if view is not None:
                return cpu_c.lookup(out, ids, view, self._classes_c)
        loc = index.resolve(ids)
        return loc, self.decode(out, loc)

    @property
    def fused_pooling(self) -> bool:
        return self._triton_args is not None

    def lookup_pooled(
        self, out: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, mode: str, index: IdIndex, unknown: Any = None
    ) -> tuple[torch.Tensor, int]:
        """Triton only (see fused_pooling): resolve, decode and pool bags into ``out [bags, D]``
        in one launch; the ``[n, D]`` rows are never written."""
        assert self._triton_args is not None
        loc = triton_module().lookup_pooled(out, ids, offsets, mode, index, self._triton_args, unknown)
        return loc, int((loc < 0).sum())
