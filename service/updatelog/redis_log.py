"""The deployment update log: one Redis stream (default key ``embserve:updates``).  Every replica
reads it with XREAD from its own position (no consumer group: each replica must see every
entry), so replicas converge.  Entry fields are documented in entry.py; a trainer may XADD them
directly.

Durability: an XADD is acknowledged by Redis after its AOF write; with ``appendonly yes`` and
``appendfsync always`` (docker-compose.yml sets both) that write is fsynced before the reply,
and on Redis >= 7.2 we also call ``WAITAOF 1 0`` so the guarantee holds whatever fsync policy
the server runs with.  :meth:`check_durability` reports a server that can lose acknowledged
writes, and ``/readyz`` shows it.
"""

from __future__ import annotations

import redis

from .base import LogRecord, UpdateLog
from .entry import MalformedEntry, Position, UpdateBatch, format_position, parse_position

DEFAULT_STREAM = "embserve:updates"


class RedisUpdateLog(UpdateLog):
    kind = "redis"
    unavailable = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError (AOF replay) included

    def __init__(self, url: str, stream: str = DEFAULT_STREAM) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=30.0, socket_connect_timeout=5.0)
        self.stream = stream
        version = str(self.client.info("server").get("redis_version", "0"))
        self._has_waitaof = tuple(int(x) for x in version.split(".")[:2]) >= (7, 2)

    def check_durability(self) -> list[str]:
        cfg = self.client.config_get("append*")
        problems = []
        if cfg.get("appendonly") != "yes":
            problems.append("redis runs without AOF (appendonly no): acknowledged updates die with it")
        elif cfg.get("appendfsync") != "always" and not self._has_waitaof:
            problems.append(f"redis appendfsync is {cfg.get('appendfsync')!r} and WAITAOF is unavailable: up to a second of updates can be lost")
        return problems

    def append(self, batch: UpdateBatch) -> Position:
        entry_id = self.client.xadd(self.stream, batch.to_fields())  # type: ignore[arg-type]
        if self._has_waitaof:
            self.client.execute_command("WAITAOF", 1, 0, 0)
        pos = parse_position(entry_id)
        assert pos is not None
        return pos

    def _records(self, entries: list) -> list[LogRecord]:  # type: ignore[type-arg]
        out = []
        for entry_id, fields in entries:
            pos = parse_position(entry_id)
            assert pos is not None
            try:
                batch: UpdateBatch | MalformedEntry = UpdateBatch.from_fields(fields)
            except MalformedEntry as exc:
                batch = exc
            out.append(LogRecord(pos, pos[0] / 1000.0, batch))
        return out

    def read(self, after: Position | None, count: int, block_ms: int = 0) -> list[LogRecord]:
        start = format_position(after) or "0-0"
        reply = self.client.xread({self.stream: start}, count=count, block=block_ms if block_ms > 0 else None)
        if not reply:
            return []
        _, entries = reply[0]
        return self._records(entries)

    def last_position(self) -> Position | None:
        try:
            info = self.client.xinfo_stream(self.stream)
        except redis.ResponseError:
            return None  # no stream yet
        last = info.get("last-generated-id")
        pos = parse_position(last)
        return None if pos == (0, 0) else pos

    def count_after(self, after: Position | None, limit: int = 1_000_000) -> int:
        start = "(" + (format_position(after) or "0-0") if after is not None else "-"
        return len(self.client.xrange(self.stream, min=start, max="+", count=limit))

    def oldest_after(self, after: Position | None) -> float | None:
        start = "(" + (format_position(after) or "0-0") if after is not None else "-"
        first = self.client.xrange(self.stream, min=start, max="+", count=1)
        return None if not first else int(first[0][0].split(b"-")[0]) / 1000.0

    def trim_before(self, position: Position) -> int:
        # MINID keeps entries >= the id; we drop <= position, so keep from position + 1
        return int(self.client.xtrim(self.stream, minid=f"{position[0]}-{position[1] + 1}", approximate=False))

    def close(self) -> None:
        self.client.close()

