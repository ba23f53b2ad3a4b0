"""Both update logs, against a real redis-server and real SQLite files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.updatelog import MalformedEntry, UpdateBatch, UpdateLog, open_log
from service.updatelog.entry import format_position, parse_position


def batch(table: str, ids: list[int], dim: int = 4, deletes: list[int] | None = None) -> UpdateBatch:
    vectors = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim)
    return UpdateBatch(table, np.array(ids, dtype=np.int64), vectors, np.array(deletes or [], dtype=np.int64))


def test_append_then_read_in_order(update_log: UpdateLog) -> None:
    assert update_log.last_position() is None
    positions = [update_log.append(batch("t", [i, i + 1])) for i in range(5)]
    assert positions == sorted(positions) and len(set(positions)) == 5
    records = update_log.read(None, 100)
    assert [r.position for r in records] == positions
    first = records[0].batch
    assert isinstance(first, UpdateBatch)
    assert first.upsert_ids.tolist() == [0, 1] and first.vectors.shape == (2, 4)
    assert [r.position for r in update_log.read(positions[1], 2)] == positions[2:4]
    assert update_log.count_after(positions[1]) == 3
    assert update_log.last_position() == positions[-1]
    assert update_log.oldest_after(positions[-1]) is None
    assert update_log.oldest_after(None) is not None


def test_delete_only_and_view_batches_round_trip(update_log: UpdateLog) -> None:
    """A delete-only entry (no vectors: shape (0, dim), what a JSON delete becomes) and an entry
    whose arrays are read-only views of a request body (what the binary parser hands over) both
    come back with the same IDs and bytes."""
    from service.wire import encode_binary_updates, parse_binary_updates

    deletes_only = UpdateBatch("t", np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float32), np.array([-1, 5], dtype=np.int64))
    body = encode_binary_updates(np.array([3, 4], dtype=np.int64), np.arange(8, dtype=np.float32).reshape(2, 4), np.array([6], dtype=np.int64))
    ids, vectors, deletes = parse_binary_updates(body)
    assert not vectors.flags.writeable  # a view of the body, not a copy
    positions = [update_log.append(deletes_only), update_log.append(UpdateBatch("t", ids, vectors, deletes))]
    first, second = (r.batch for r in update_log.read(None, 10))
    assert [r.position for r in update_log.read(None, 10)] == positions
    assert isinstance(first, UpdateBatch) and first.delete_ids.tolist() == [-1, 5] and first.upsert_ids.size == 0
    assert isinstance(second, UpdateBatch) and second.upsert_ids.tolist() == [3, 4] and second.delete_ids.tolist() == [6]
    assert second.vectors.tobytes() == np.arange(8, dtype=np.float32).tobytes()


def test_trim_drops_entries_at_or_before(update_log: UpdateLog) -> None:
    positions = [update_log.append(batch("t", [i])) for i in range(4)]
    update_log.trim_before(positions[1])
    assert [r.position for r in update_log.read(None, 10)] == positions[2:]
    assert update_log.last_position() == positions[-1]


def test_read_blocks_until_an_append_or_timeout(update_log: UpdateLog) -> None:
    assert update_log.read(None, 10, block_ms=50) == []


def test_sqlite_appends_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "u.sqlite3"
    log = open_log(None, path)
    pos = log.append(batch("t", [7], deletes=[9]))
    log.close()
    reopened = open_log(None, path)
    (rec,) = reopened.read(None, 10)
    assert rec.position == pos and isinstance(rec.batch, UpdateBatch) and rec.batch.delete_ids.tolist() == [9]
    reopened.trim_before(pos)
    assert reopened.last_position() == pos  # positions never go backwards after a trim
    assert reopened.append(batch("t", [1])) > pos
    reopened.close()


def test_sqlite_new_logs_use_large_pages_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    """A new log file gets PAGE_SIZE pages (fewer WAL frames per multi-MB entry); a file made
    with SQLite's default 4 KiB pages opens, appends and reads as before."""
    import sqlite3

    from service.updatelog.sqlite_log import PAGE_SIZE

    new = open_log(None, tmp_path / "new.sqlite3")
    new.append(batch("t", [1]))
    assert sqlite3.connect(tmp_path / "new.sqlite3").execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
    new.close()
    old_path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(old_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE filler (x)")  # the file exists with 4 KiB pages before the log opens it
    conn.close()
    old = open_log(None, old_path)
    pos = old.append(batch("t", [2], dim=64))
    assert [r.position for r in old.read(None, 10)] == [pos]
    assert sqlite3.connect(old_path).execute("PRAGMA page_size").fetchone()[0] == 4096
    old.close()


def test_malformed_direct_writes_are_surfaced_not_fatal(redis_url: str) -> None:
    import redis

    log = open_log(redis_url, Path("unused"), stream="test:malformed")
    client = redis.Redis.from_url(redis_url)
    client.xadd("test:malformed", {"table": "t", "dim": "4", "upsert_ids": b"\x00" * 8, "vectors": b"\x00" * 3})
    log.append(batch("t", [1]))
    records = log.read(None, 10)
    assert isinstance(records[0].batch, MalformedEntry)
    assert isinstance(records[1].batch, UpdateBatch)
    client.close()
    log.close()


def test_redis_durability_check(redis_url: str) -> None:
    log = open_log(redis_url, Path("unused"), stream="test:durable")
    assert log.check_durability() == []  # the fixture runs appendonly yes, appendfsync always
    log.close()


def test_positions_round_trip() -> None:
    assert parse_position(format_position((17, 3))) == (17, 3)
    assert parse_position(b"1700000000000-5") == (1700000000000, 5)
    with pytest.raises(ValueError):
        parse_position("x-y")
