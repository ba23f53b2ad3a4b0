"""Row classes and the byte layout of one stored row.

A compressed table keeps each row in exactly one *row class* ``(dim, bits)``.  Every class
owns one slab: a ``uint8`` tensor ``[capacity, row_bytes]``.  The byte layout of one row of a
slab, little-endian throughout:

    bits == 32   | f32 x[0] | f32 x[1] | ... | f32 x[dim-1] |          row_bytes = 4 * dim
    bits == 16   | f16 x[0] | f16 x[1] | ... | f16 x[dim-1] |          row_bytes = 2 * dim
    bits <= 8    | f16 scale | f16 bias | packed codes ...  |          row_bytes = 4 + ceil(dim * bits / 8)
    dim  == 0    (nothing: the row decodes to zeros)                    row_bytes = 0

For ``bits <= 8`` the decoded value is ``x[j] = bias + scale * code[j]`` with
``code[j]`` an unsigned integer in ``[0, 2**bits - 1]``.  Codes are packed in *planar* order:
with ``per = 8 // bits`` codes per byte and ``stride = ceil(dim / per)`` code bytes, code ``j``
lives in code byte ``j % stride`` at bit offset ``(j // stride) * bits``.  For 4 bits and
``dim = 64``: byte ``k`` holds coordinate ``k`` in its low nibble and coordinate ``k + 32`` in
its high nibble.  (FBGEMM interleaves instead - low nibble = even coordinate - which makes the
decoder write every other float; planar order lets the decoder unpack whole byte runs with one
shift-and-mask and write contiguous floats, which compilers vectorize.  At 8 bits both orders
are the same.)  The 4-byte head (fp16 scale, then fp16 bias) is FBGEMM TBE's row-wise layout;
unlike FBGEMM on GPU we do not pad rows to 16 bytes, so a 64-dim INT4 row is 36 bytes, not 48.

A row stored with ``dim < D`` holds the first ``dim`` coordinates of the (possibly rotated)
row; the remaining coordinates decode to zero.

**Product-quantization (codebook) classes** ``(dim, bits=k, m)`` with ``m > 0``: the row's first
``dim`` coordinates are cut into ``m`` sub-vectors of ``s = dim / m`` coordinates; sub-vector ``j``
is stored as a ``k``-bit code (``1 <= k <= 8``) naming one of the ``2**k`` centroids of sub-space
``j`` in the class's shared codebook, an fp16 tensor ``[m, 2**k, s]`` (``class.{c}.codebook`` in
the file; its bytes are the table's)::

    pq (m > 0)   | code[0] | code[1] | ... | code[m-1] |  bit-packed     row_bytes = ceil(m * k / 8)

The codes form one little-endian bit stream: code ``j`` occupies bits ``j*k .. j*k+k-1`` of the
row, where bit ``b`` is bit ``b % 8`` of byte ``b // 8`` (a code may straddle two bytes; unused
high bits of the last byte are zero).  Decoding is ``m`` gathers:
``x[j*s : (j+1)*s] = float(codebook[j, code[j]])``.  There is no per-row head: at 16x-128x a
4-byte scale+bias is most of a row, and a codebook spends those bytes once per class instead.
Several PQ classes (different ``(m, k)``, each with its own codebook) can coexist in a table,
e.g. more sub-spaces or more centroids for frequent IDs (MGQE).
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS: tuple[int, ...] = (32, 16, 8, 4, 2, 1)
QUANTIZED_BITS: tuple[int, ...] = (8, 4, 2, 1)
ROW_HEAD_BYTES = 4  # fp16 scale + fp16 bias, only for bits <= 8
MAX_PQ_BITS = 8  # PQ codes: 1..8 bits, so a codebook has at most 256 centroids per sub-space

# A locator is one int32: class index in bits 28..30, slot in bits 0..27; -1 means "no row".
LOCATOR_CLASS_SHIFT = 28
LOCATOR_SLOT_MASK = (1 << LOCATOR_CLASS_SHIFT) - 1
MAX_CLASSES = 8
MAX_SLOTS_PER_CLASS = 1 << LOCATOR_CLASS_SHIFT
NO_ROW = -1


@dataclass(frozen=True, order=True)
class RowClass:
    """One storage class: how many leading coordinates a row keeps, and at what precision.

    ``m == 0``: a scalar class, ``bits`` per coordinate.  ``m > 0``: a product-quantization class,
    ``m`` sub-vectors of ``dim // m`` coordinates, each a ``bits``-bit code into a codebook."""

    dim: int
    bits: int
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not 1 <= self.bits <= MAX_PQ_BITS:
                raise ValueError(f"a PQ class has 1..{MAX_PQ_BITS}-bit codes, got {self.bits}")
            if self.m < 0 or self.dim <= 0 or self.dim % self.m:
                raise ValueError(f"a PQ class needs 0 < m dividing dim, got dim={self.dim}, m={self.m}")
            return
        if self.m < 0:
            raise ValueError(f"m must be >= 0, got {self.m}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.dim < 0:
            raise ValueError(f"dim must be >= 0, got {self.dim}")

    @property
    def row_bytes(self) -> int:
        if self.m:
            return (self.m * self.bits + 7) // 8
        if self.dim == 0:
            return 0
        if self.bits == 32:
            return 4 * self.dim
        if self.bits == 16:
            return 2 * self.dim
        return ROW_HEAD_BYTES + packed_code_bytes(self.dim, self.bits)

    @property
    def quantized(self) -> bool:
        """A scalar class with a per-row (scale, bias) head."""
        return self.bits <= 8 and self.dim > 0 and not self.m

    @property
    def pq(self) -> bool:
        return self.m > 0

    @property
    def sub_dim(self) -> int:
        """Coordinates per sub-vector of a PQ class."""
        return self.dim // self.m if self.m else 0

    @property
    def codebook_shape(self) -> tuple[int, int, int] | None:
        """``(m, 2**bits, dim // m)`` for a PQ class (fp16), else ``None``."""
        return (self.m, 1 << self.bits, self.dim // self.m) if self.m else None

    @property
    def codebook_bytes(self) -> int:
        return 2 * (1 << self.bits) * self.dim if self.m else 0

    def label(self) -> str:
        """Stable short name used in metrics and manifests, e.g. ``d64b4``, or ``d64pq8x4`` for
        a PQ class of 8 sub-vectors with 4-bit codes."""
        if self.m:
            return f"d{self.dim}pq{self.m}x{self.bits}"
        return f"d{self.dim}b{self.bits}"

    @classmethod
    def parse(cls, label: str) -> "RowClass":
        try:
            if label.startswith("d") and "pq" in label:
                dim_text, rest = label[1:].split("pq", 1)
                m_text, bits_text = rest.split("x", 1)
                return cls(int(dim_text), int(bits_text), int(m_text))
            if not label.startswith("d") or "b" not in label:
                raise ValueError
            dim_text, bits_text = label[1:].split("b", 1)
            return cls(int(dim_text), int(bits_text))
        except ValueError as exc:
            raise ValueError(f"bad row class label {label!r}") from exc


def packed_code_bytes(dim: int, bits: int) -> int:
    """Code bytes of a ``bits <= 8`` row: ``ceil(dim / (8 // bits))`` (the planar stride)."""
    per = 8 // bits
    return (dim + per - 1) // per


def encode_locator(class_index: int, slot: int) -> int:
    return (class_index << LOCATOR_CLASS_SHIFT) | slot
