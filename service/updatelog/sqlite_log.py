"""The embedded default update log: one SQLite file in WAL mode with ``synchronous=FULL``, so a
committed append survives a crash (of the process or of the machine).

Schema::

    CREATE TABLE updates (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,   -- position seq-0
        appended_at REAL    NOT NULL,                    -- unix seconds
        table_name  TEXT    NOT NULL,
        dim         INTEGER NOT NULL,
        upsert_ids  BLOB    NOT NULL,                    -- fields as in entry.py
        vectors     BLOB    NOT NULL,
        delete_ids  BLOB    NOT NULL
    )

Connections are per thread (sqlite3 objects must not cross threads); WAL lets the applier read
while request threads append.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from .base import LogRecord, UpdateLog
from .entry import MalformedEntry, Position, UpdateBatch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    appended_at REAL NOT NULL,
    table_name TEXT NOT NULL,
    dim INTEGER NOT NULL,
    upsert_ids BLOB NOT NULL,
    vectors BLOB NOT NULL,
    delete_ids BLOB NOT NULL
)
"""


# Page size of a new log file (an existing file keeps its own: WAL mode fixes it).  An entry of
# 10k x 64 rows is a 2.6 MB blob: at SQLite's default 4 KiB that is ~640 overflow pages, each a
# WAL frame with its own header, checksum and write on append, then a checkpoint copy and a
# read; at 64 KiB there are 16x fewer.  Appending and reading such entries took 0.57x the CPU
# (median of 8 interleaved rounds, 0.46..0.85; bench/results/streaming_scale.md).  A tiny entry
# costs one 64 KiB WAL frame instead of 4 KiB: nothing next to its fsync.
PAGE_SIZE = 65536


class SqliteUpdateLog(UpdateLog):
    kind = "sqlite"
    unavailable = (sqlite3.OperationalError,)  # locked past the timeout, disk full, I/O error

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._appended = threading.Condition()
        conn = self._conn()
        conn.execute(_SCHEMA)
        conn.commit()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # before WAL: takes effect only on a new file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def append(self, batch: UpdateBatch) -> Position:
        ids, vectors, deletes = batch.blob_views()  # SQLite copies the bytes once, into its pages
        conn = self._conn()
        cur = conn.execute(
            "INSERT INTO updates (appended_at, table_name, dim, upsert_ids, vectors, delete_ids) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), batch.table, batch.dim, ids, vectors, deletes),
        )  # autocommit: the INSERT is committed (and fsynced, synchronous=FULL) when execute returns
        seq = cur.lastrowid
        assert seq is not None
        with self._appended:
            self._appended.notify_all()
        return (seq, 0)

    def read(self, after: Position | None, count: int, block_ms: int = 0) -> list[LogRecord]:
        start = after[0] if after is not None else 0
        rows = self._select(start, count)
        if not rows and block_ms > 0:
            with self._appended:
                self._appended.wait(block_ms / 1000.0)  # woken by an append in this process
            rows = self._select(start, count)
        out = []
        for seq, appended_at, table, dim, ids, vectors, deletes in rows:
            try:
                batch: UpdateBatch | MalformedEntry = UpdateBatch.from_fields(
                    {"table": table.encode(), "dim": str(dim).encode(), "upsert_ids": ids, "vectors": vectors, "delete_ids": deletes}
                )
            except MalformedEntry as exc:
                batch = exc
            out.append(LogRecord((seq, 0), appended_at, batch))
        return out

    def _select(self, start: int, count: int) -> list[tuple]:  # type: ignore[type-arg]
        return self._conn().execute(
            "SELECT seq, appended_at, table_name, dim, upsert_ids, vectors, delete_ids FROM updates WHERE seq > ? ORDER BY seq LIMIT ?",
            (start, count),
        ).fetchall()

    def last_position(self) -> Position | None:
        row = self._conn().execute("SELECT MAX(seq) FROM updates").fetchone()
        if row[0] is None:
            # an emptied log still remembers its sequence: positions never go backwards
            seq = self._conn().execute("SELECT seq FROM sqlite_sequence WHERE name = 'updates'").fetchone()
            return None if seq is None else (int(seq[0]), 0)
        return (int(row[0]), 0)

    def count_after(self, after: Position | None, limit: int = 1_000_000) -> int:
        start = after[0] if after is not None else 0
        row = self._conn().execute("SELECT COUNT(*) FROM (SELECT 1 FROM updates WHERE seq > ? LIMIT ?)", (start, limit)).fetchone()
        return int(row[0])

    def oldest_after(self, after: Position | None) -> float | None:
        start = after[0] if after is not None else 0
        row = self._conn().execute("SELECT appended_at FROM updates WHERE seq > ? ORDER BY seq LIMIT 1", (start,)).fetchone()
        return None if row is None else float(row[0])

    def trim_before(self, position: Position) -> int:
        cur = self._conn().execute("DELETE FROM updates WHERE seq <= ?", (position[0],))
        return int(cur.rowcount)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
