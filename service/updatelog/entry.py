"""One update-log entry: a batch of upserts and deletes for one table, and its encoding as a
flat field map - the same fields in SQLite columns and in Redis stream entries.

Fields (all values bytes; integers as ASCII decimal), which an online trainer may also write
straight into the Redis stream with ``XADD embserve:updates * table ... dim ... ...``:

    table        table name, UTF-8
    dim          D, the table's dimension (ASCII decimal)
    upsert_ids   n x int64, little-endian
    vectors      n x D x float32, little-endian, row-major (original coordinates)
    delete_ids   m x int64, little-endian

Within an entry upserts apply first, then deletes: an entry that upserts and deletes the same ID
leaves it deleted.  Within one upsert list a later duplicate wins.

A position is two integers ``major-minor``: a Redis stream ID (ms-seq), or ``seq-0`` for SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Position = tuple[int, int]


class MalformedEntry(ValueError):
    """A log entry that cannot be decoded; the applier skips it and counts it."""


@dataclass
class UpdateBatch:
    table: str
    upsert_ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, D]
    delete_ids: np.ndarray  # int64 [m]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def size(self) -> int:
        return int(self.upsert_ids.shape[0] + self.delete_ids.shape[0])

    def to_fields(self) -> dict[str, bytes]:
        return {
            "table": self.table.encode("utf-8"),
            "dim": str(self.dim).encode(),
            "upsert_ids": np.ascontiguousarray(self.upsert_ids, dtype="<i8").tobytes(),
            "vectors": np.ascontiguousarray(self.vectors, dtype="<f4").tobytes(),
            "delete_ids": np.ascontiguousarray(self.delete_ids, dtype="<i8").tobytes(),
        }

    def blob_views(self) -> tuple[memoryview, memoryview, memoryview]:
        """The three array fields as byte views (same bytes as :meth:`to_fields`), without
        copying arrays that already have the field's dtype and are contiguous - what a store
        that copies the bytes itself (SQLite's bind) wants."""
        return (
            memoryview(np.ascontiguousarray(self.upsert_ids, dtype="<i8").reshape(-1)).cast("B"),
            memoryview(np.ascontiguousarray(self.vectors, dtype="<f4").reshape(-1)).cast("B"),  # 1-D: no cast of a (0, 0) view
            memoryview(np.ascontiguousarray(self.delete_ids, dtype="<i8").reshape(-1)).cast("B"),
        )

    @classmethod
    def from_fields(cls, fields: dict[str, bytes] | dict[bytes, bytes]) -> "UpdateBatch":
        f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
        try:
            table = f["table"].decode("utf-8") if isinstance(f["table"], bytes) else str(f["table"])
            dim = int(f["dim"])
            # views of the stored bytes, not copies (read-only: the applier copies what it keeps)
            ids = np.frombuffer(f.get("upsert_ids", b""), dtype="<i8").astype(np.int64, copy=False)
            vec_bytes = f.get("vectors", b"")
            deletes = np.frombuffer(f.get("delete_ids", b""), dtype="<i8").astype(np.int64, copy=False)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise MalformedEntry(f"cannot decode entry fields: {exc}") from exc
        if dim <= 0 or len(vec_bytes) != 4 * dim * ids.shape[0]:
            raise MalformedEntry(f"vectors hold {len(vec_bytes)} bytes, expected {ids.shape[0]} x {dim} float32")
        vectors = np.frombuffer(vec_bytes, dtype="<f4").astype(np.float32, copy=False).reshape(ids.shape[0], dim)
        return cls(table, ids, vectors, deletes)


def format_position(pos: Position | None) -> str | None:
    return None if pos is None else f"{pos[0]}-{pos[1]}"


def parse_position(text: str | bytes | None) -> Position | None:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    major, _, minor = text.partition("-")
    try:
        return int(major), int(minor or 0)
    except ValueError as exc:
        raise ValueError(f"bad log position {text!r}") from exc
