"""How stored bytes are read: the decode ops behind :meth:`CompressedTable.lookup`.

``torch`` is the reference (any device, one vectorized op per class); ``compiled`` is the C
kernel in ``decode.c`` (one fused pass, built at install time).  ``auto`` takes the compiled
path for CPU tables when it was built, else the reference.  Tests check both give identical
floats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..codecs import decode_rows
from ..layout import LOCATOR_CLASS_SHIFT, LOCATOR_SLOT_MASK, RowClass

if TYPE_CHECKING:  # the index imports this package for its compiled view
    from ..index import IdIndex

from . import cpu_c

COMPILED_AVAILABLE = cpu_c.AVAILABLE


def decode_reference(
    out: torch.Tensor, loc: torch.Tensor, slabs: list[torch.Tensor], classes: list[RowClass], rotation: torch.Tensor | None = None
) -> None:
    """Per class: gather its rows, decode, and (truncated classes of a rotated table) rotate back."""
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
        decoded = decode_rows(slabs[c][slots], rc)
        if rotation is not None and rc.dim < width:
            out[rows] = decoded @ rotation[:, : rc.dim].to(torch.float32).T
        else:
            out[rows, : rc.dim] = decoded


def _use_compiled(backend: str, device: torch.device) -> bool:
    if backend == "compiled":
        if not COMPILED_AVAILABLE:
            raise RuntimeError("the compiled decoder was not built (no C compiler at install time?)")
        if device.type != "cpu":
            raise RuntimeError("the compiled backend runs on CPU tables only")
        return True
    if backend not in ("auto", "torch"):
        raise ValueError(f"unknown decode backend {backend!r}")
    return backend == "auto" and COMPILED_AVAILABLE and device.type == "cpu"


class Decoder:
    """Decodes one table's rows.  Holds what the compiled path needs about the slabs (their
    addresses), so :meth:`refresh` must be called whenever a slab is reallocated."""

    def __init__(
        self, slabs: list[torch.Tensor], classes: list[RowClass], backend: str = "auto", rotation: torch.Tensor | None = None
    ) -> None:
        self.classes = classes
        self.backend = backend
        self.rotation = rotation
        # R^T row-major, fp16 (what the C decoder reads; an fp32 rotation of an old file is
        # narrowed, which is how it will be written next time): row k is the direction
        # coordinate k of a truncated row contributes
        self._rotation_t = None if rotation is None else rotation.T.to(torch.float16).contiguous()
        self.refresh(slabs)

    def refresh(self, slabs: list[torch.Tensor]) -> None:
        self.slabs = slabs
        device = slabs[0].device
        self.compiled = _use_compiled(self.backend, device)
        if self.compiled and self.rotation is not None and self.rotation.shape[1] > cpu_c.MAX_ROTATED_DIM:
            self.compiled = False  # the C decoder's per-row scratch is bounded
        self._classes_c = cpu_c.class_array(slabs, self.classes, self._rotation_t) if self.compiled else None

    def decode(self, out: torch.Tensor, loc: torch.Tensor) -> int:
        """Write the rows named by locators ``loc`` (``-1`` -> zeros) into ``out [n, D]``;
        returns how many locators are ``-1``."""
        if self._classes_c is not None:
            return cpu_c.lookup(out, loc, None, self._classes_c)[1]
        decode_reference(out, loc, self.slabs, self.classes, self.rotation)
        return int((loc < 0).sum())

    def lookup(self, out: torch.Tensor, ids: torch.Tensor, index: IdIndex) -> tuple[torch.Tensor, int]:
        """Resolve ``ids`` and decode into ``out``; returns the locators and the unknown count.
        On the compiled path the index is searched inside the decode loop (one pass)."""
        if self._classes_c is not None:
            view = index.c_view()
            if view is not None:
                return cpu_c.lookup(out, ids, view, self._classes_c)
        loc = index.resolve(ids)
        return loc, self.decode(out, loc)
