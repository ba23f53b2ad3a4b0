"""Trimming one Redis stream that several replicas follow.

Every replica reads the whole stream and snapshots its tables on its own schedule; after a
restart it replays the stream from its snapshots' position.  So an entry may go only when
*every* replica's snapshots hold it.  Each replica records the position it still needs (the
oldest snapshot position over its tables) in a Redis hash, with an expiry time:

    HASH    <stream>:replicas  field = replica id,  value = "<ms>-<seq>|<expires unix ms>"
                                                   ("|<expires>" alone: needs the whole stream)
    STRING  <stream>:trimmed   "<ms>-<seq>": the newest position a trim has dropped

A replica refreshes its record every ``ttl / 3`` seconds (the heartbeat) and whenever it
trims.  Trimming is one Lua script, atomic in Redis: refresh the caller's record, drop records
past their expiry, take the minimum position over the rest, ``XTRIM MINID`` behind it.  Because
registration and trimming are both atomic, a replica that registers is either seen by a trim
or registered after it (and then finds the entries it needs still there or reports them
missing).  Expiry uses Redis's clock (``TIME``), not the replicas', so their clock skew does
not matter.

A replica quiet for longer than the TTL (down, or partitioned from Redis) stops holding the
stream back; if it comes back after entries it needed were trimmed, :meth:`missed` tells it
(the script records the newest position it trimmed through in ``<stream>:trimmed``), the
applier logs an error and the replica holds itself out of readiness (``/readyz`` 503,
``embserve_update_log_gap`` 1): it must be re-seeded from a fresh snapshot.  Pick the TTL longer than any restart you want to
survive without a re-seed.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import redis

from .entry import Position, format_position, parse_position

_TRIM_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. string.format('%d', now + tonumber(ARGV[3])))
if ARGV[4] ~= '1' then return -1 end
local entries = redis.call('HGETALL', KEYS[1])
local best_ms, best_seq, best_text = nil, nil, nil
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local sep = string.find(value, '|', 1, true)
  local pos = string.sub(value, 1, sep - 1)
  local expires = tonumber(string.sub(value, sep + 1))
  if expires < now then
    redis.call('HDEL', KEYS[1], entries[i])
  else
    if pos == '' then return 0 end
    local dash = string.find(pos, '-', 1, true)
    local ms = tonumber(string.sub(pos, 1, dash - 1))
    local seq = tonumber(string.sub(pos, dash + 1))
    if best_ms == nil or ms < best_ms or (ms == best_ms and seq < best_seq) then
      best_ms, best_seq, best_text = ms, seq, string.sub(pos, 1, dash - 1)
    end
  end
end
if best_ms == nil then return 0 end
local trimmed = redis.call('XTRIM', KEYS[2], 'MINID', best_text .. '-' .. string.format('%d', best_seq + 1))
if trimmed > 0 then
  local old = redis.call('GET', KEYS[3])
  local keep = true
  if old then
    local dash = string.find(old, '-', 1, true)
    local oms, oseq = tonumber(string.sub(old, 1, dash - 1)), tonumber(string.sub(old, dash + 1))
    keep = oms < best_ms or (oms == best_ms and oseq < best_seq)
  end
  if keep then redis.call('SET', KEYS[3], best_text .. '-' .. string.format('%d', best_seq)) end
end
return trimmed
"""


def default_replica_id(port: int) -> str:
    """Host name plus port (or process ID for port 0): distinct for replicas on one host, and
    stable across restarts of a container (same host name, same port)."""
    return f"{socket.gethostname()}:{port or os.getpid()}"


@dataclass(frozen=True)
class TrimGap:
    """Entries this replica needs were trimmed away: what it needed and what the stream holds now
    (what an operator needs to know to re-seed it, shown by ``/readyz``)."""

    needed: Position | None  # it must replay every entry after this (None: the whole stream)
    trimmed_through: Position  # the newest position a coordinated trim dropped
    first_entry: Position | None  # the oldest entry the stream still holds (None: empty stream)


class ReplicaTrimCoordinator:
    def __init__(self, client: redis.Redis, stream: str, replica_id: str, ttl_s: float) -> None:
        self.client = client
        self.stream = stream
        self.key = f"{stream}:replicas"
        self.trimmed_key = f"{stream}:trimmed"  # the newest position a coordinated trim dropped
        self.replica_id = replica_id
        self.ttl_ms = int(ttl_s * 1000)
        self._script = client.register_script(_TRIM_SCRIPT)

    def _run(self, needed: Position | None, trim: bool) -> int:
        text = format_position(needed) or ""
        return int(self._script(keys=[self.key, self.stream, self.trimmed_key], args=[self.replica_id, text, self.ttl_ms, "1" if trim else "0"]))

    def heartbeat(self, needed: Position | None) -> None:
        """Record that this replica still needs every entry after ``needed`` (None: all)."""
        self._run(needed, trim=False)

    def trim(self, needed: Position | None) -> int:
        """Heartbeat, then drop the entries every live replica's snapshots hold; returns how many."""
        return max(0, self._run(needed, trim=True))

    def replicas(self) -> dict[str, dict[str, Any]]:
        """The records as stored (for tests and operators): id -> position and expiry."""
        out = {}
        for rid, value in self.client.hgetall(self.key).items():
            pos, _, expires = value.decode().partition("|")
            out[rid.decode()] = {"position": parse_position(pos) if pos else None, "expires_ms": int(expires)}
        return out

    def leave(self) -> None:
        """Drop this replica's record (a clean, permanent shutdown)."""
        self.client.hdel(self.key, self.replica_id)

    def missed(self, needed: Position | None) -> bool:
        """Whether entries after ``needed`` were already trimmed (this replica was quiet past the TTL)."""
        return self.gap(needed) is not None

    def gap(self, needed: Position | None) -> TrimGap | None:
        """:meth:`missed`, with the positions that say how much: None when nothing was missed."""
        trimmed = parse_position(self.client.get(self.trimmed_key))
        if trimmed is None or (needed is not None and trimmed <= needed):
            return None
        first = self.client.xrange(self.stream, min="-", max="+", count=1)
        return TrimGap(needed, trimmed, parse_position(first[0][0]) if first else None)


def coordinator_for(update_log: object, replica_id: str | None, ttl_s: float, port: int) -> ReplicaTrimCoordinator | None:
    """A coordinator for a Redis log (None for the single-process SQLite log)."""
    if getattr(update_log, "kind", None) != "redis":
        return None
    client = update_log.client  # type: ignore[attr-defined]
    return ReplicaTrimCoordinator(client, update_log.stream, replica_id or default_replica_id(port), ttl_s)  # type: ignore[attr-defined]
