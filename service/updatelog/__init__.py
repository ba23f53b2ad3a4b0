"""Update logs: Redis Streams when ``REDIS_URL`` is set, SQLite (WAL) as the embedded default."""

from __future__ import annotations

from pathlib import Path

from .base import LogRecord, UpdateLog
from .entry import MalformedEntry, Position, UpdateBatch, format_position, parse_position


def open_log(redis_url: str | None, sqlite_path: Path, stream: str = "embserve:updates") -> UpdateLog:
    if redis_url:
        from .redis_log import RedisUpdateLog

        return RedisUpdateLog(redis_url, stream)
    from .sqlite_log import SqliteUpdateLog

    return SqliteUpdateLog(sqlite_path)


__all__ = ["LogRecord", "MalformedEntry", "Position", "UpdateBatch", "UpdateLog", "format_position", "open_log", "parse_position"]
