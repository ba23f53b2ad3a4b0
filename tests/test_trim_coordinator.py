"""Coordinated trimming of a shared Redis stream (real redis-server): the stream is trimmed
behind the oldest snapshot over live replicas only; a replica quiet past the TTL stops holding
it back and learns, when it comes back, that it missed entries.  And two in-process servers
on one stream: a snapshot-and-trim on one never drops what the other still needs."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import logging

import httpx
import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from compression import compress_uniform, save_table
from compression.layout import RowClass

from service.app import create_app
from service.applier import Applier
from service.metrics import ServiceMetrics
from service.registry import TableRegistry
from service.settings import Settings
from service.updatelog import UpdateBatch, open_log
from service.updatelog.trim_coordinator import ReplicaTrimCoordinator
from tests.test_e2e import serving

LOOPBACK = ("127.0.0.1", 50000)


def _entry() -> UpdateBatch:
    return UpdateBatch("t", np.array([1], dtype=np.int64), np.ones((1, 2), dtype=np.float32), np.zeros(0, dtype=np.int64))


def test_trims_behind_the_slowest_live_replica_only(redis_url: str, tmp_path: Path) -> None:
    stream = f"trim:{uuid.uuid4().hex}"
    log = open_log(redis_url, tmp_path / "x", stream)
    positions = [log.append(_entry()) for _ in range(10)]
    client = redis.Redis.from_url(redis_url)
    a = ReplicaTrimCoordinator(client, stream, "a", ttl_s=60)
    b = ReplicaTrimCoordinator(client, stream, "b", ttl_s=0.3)
    b.heartbeat(positions[2])
    assert a.trim(positions[7]) == 3  # entries 0..2: behind b's snapshot too
    assert log.count_after(None) == 7
    assert set(a.replicas()) == {"a", "b"} and a.replicas()["b"]["position"] == positions[2]
    c = ReplicaTrimCoordinator(client, stream, "c", ttl_s=60)
    c.heartbeat(None)  # a replica without a snapshot holds the whole stream
    assert a.trim(positions[9]) == 0
    c.leave()
    # b goes quiet: once its record expires (Redis's clock), it no longer holds the stream back
    deadline = time.monotonic() + 10
    trimmed = 0
    while trimmed == 0 and time.monotonic() < deadline:
        trimmed = a.trim(positions[7])
    assert trimmed == 5 and log.count_after(None) == 2 and "b" not in a.replicas()
    assert b.missed(positions[2]) and not a.missed(positions[7])
    log.close()
    client.close()


def _starting_replica(redis_url: str, tmp_path: Path, stream: str, replica_id: str, position: tuple[int, int] | None,
                      ttl_s: float = 60) -> Applier:
    """An applier as a replica builds it at start (not started: no read, no step yet), over one
    table whose file holds the stream up to ``position`` (None: a seed copy, no entry)."""
    tables = TableRegistry("cpu")
    hosted = tables.add("t", compress_uniform(torch.randn(4, 2), RowClass(2, 32)))
    hosted.log_position = hosted.snapshot_position = position
    settings = Settings(tables_dir=tmp_path / replica_id, redis_url=redis_url, redis_stream=stream, replica_id=replica_id, replica_ttl_s=ttl_s)
    return Applier(open_log(redis_url, tmp_path / "x", stream), tables, ServiceMetrics(tables), settings)


def test_a_starting_replica_holds_the_stream_before_its_first_read(redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Registration must come at start, before the missed() check and the first read: a trim by
    # another replica in between would otherwise drop entries this one has not read, unreported.
    stream = f"trim3:{uuid.uuid4().hex}"
    log = open_log(redis_url, tmp_path / "x", stream)
    positions = [log.append(_entry()) for _ in range(6)]
    client = redis.Redis.from_url(redis_url)
    other = ReplicaTrimCoordinator(client, stream, "other", ttl_s=60)
    fresh = _starting_replica(redis_url, tmp_path, stream, "fresh", None)  # from the seed: needs it all
    assert other.trim(positions[-1]) == 0 and log.count_after(None) == 6
    assert other.replicas()["fresh"]["position"] is None
    # restarted with its tables folder (snapshot at entry 2), under the same id: one record, moved
    fresh.log.close()
    again = _starting_replica(redis_url, tmp_path, stream, "fresh", positions[2])
    assert set(other.replicas()) == {"other", "fresh"} and other.replicas()["fresh"]["position"] == positions[2]
    assert other.trim(positions[-1]) == 3 and log.count_after(None) == 3
    assert not any(r.levelno == logging.ERROR for r in caplog.records)
    # a replica whose folder was lost starts from the seed again: the entries it needs are gone, and it says so
    again.log.close()
    with caplog.at_level(logging.ERROR, logger="embserve.applier"):
        lost = _starting_replica(redis_url, tmp_path, stream, "fresh", None)
    assert any("were trimmed from the stream while this replica was away" in r.getMessage() for r in caplog.records)
    lost.log.close()
    log.close()
    client.close()


def test_a_running_replica_silent_past_the_ttl_finds_the_gap_before_reading_past_it(redis_url: str, tmp_path: Path,
                                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A replica that stalls (or loses Redis) longer than its TTL stops holding the stream back;
    when it resumes, entries it had not read may be gone.  It must say so (and leave readiness)
    instead of reading on from the first entry after the gap."""
    stream = f"trim4:{uuid.uuid4().hex}"
    log = open_log(redis_url, tmp_path / "x", stream)
    read = [log.append(_entry()) for _ in range(3)]
    client = redis.Redis.from_url(redis_url)
    stalled = _starting_replica(redis_url, tmp_path, stream, "stalled", None, ttl_s=0.5)
    stalled.step()  # reads and applies the three entries
    assert stalled.position == read[-1] and stalled.gap is None
    unread = [log.append(_entry()) for _ in range(3)]  # appended while it is stalled: no step, no heartbeat
    other = ReplicaTrimCoordinator(client, stream, "other", ttl_s=60)
    deadline = time.monotonic() + 10
    while other.trim(unread[1]) == 0:  # once the stalled record expires, the stream goes up to unread[1]
        assert time.monotonic() < deadline, "the stalled replica's record never expired"
    with caplog.at_level(logging.ERROR, logger="embserve.applier"):
        stalled.step()
    assert stalled.gap is not None and stalled.gap.needed == read[-1] and stalled.gap.trimmed_through == unread[1]
    assert any("while this replica was silent" in r.getMessage() for r in caplog.records)
    stalled.log.close()
    log.close()
    client.close()


@pytest.fixture
def two_replicas(redis_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    stream = f"trim2:{uuid.uuid4().hex}"
    apps = []
    for name in ("r1", "r2"):
        settings = Settings(
            tables_dir=tmp_path / name, redis_url=redis_url, redis_stream=stream, replica_id=name,
            segment_seconds=3600, segment_updates=10**9, snapshot_interval_s=3600,
        )
        client = TestClient(create_app(settings), client=LOOPBACK)
        client.__enter__()
        apps.append(client)
    yield apps
    for client in apps:
        client.__exit__(None, None, None)


def test_replicas_on_one_stream_never_trim_what_another_needs(two_replicas) -> None:  # type: ignore[no-untyped-def]
    r1, r2 = two_replicas
    for client in (r1, r2):
        assert client.post("/v1/admin/tables", json={"name": "emb", "dim": 2, "classes": ["d2b32"]}).status_code == 201
    for k in range(5):
        r = r1.post("/v1/tables/emb/updates?wait=true", json={"upsert_ids": [k], "vectors": [[k, k]]})
        assert r.status_code == 200
    state2 = r2.app.state.embserve  # type: ignore[attr-defined]
    assert state2.applier.wait_for(state2.applier.log.last_position(), 10)
    r2_needs = state2.applier.needed_position()  # r2's snapshot is from before the five updates
    # r1 snapshots everything and trims: r2's older snapshot keeps the five entries alive
    assert r1.post("/v1/admin/tables/emb/snapshot").json()["trimmed_entries"] == 0
    assert state2.applier.log.count_after(r2_needs) == 5
    # r2 snapshots and trims too: now every live replica holds them, and they go
    assert r2.post("/v1/admin/tables/emb/snapshot").json()["trimmed_entries"] == 5
    values = r2.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": [4]}]}).json()["results"][0]["embeddings"]
    assert values == [[4.0, 4.0]]


def _gauge(base: str, name: str) -> float:
    """One unlabelled gauge's value from the server's /metrics (Prometheus text format)."""
    text = httpx.get(f"{base}/metrics", timeout=10.0).text
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert len(values) == 1, f"{name} not exported once:\n{text[:2000]}"
    return values[0]


@pytest.mark.e2e
def test_a_replica_that_missed_trimmed_entries_is_held_out_of_readiness(redis_url: str, tmp_path: Path) -> None:
    # Real `embserve serve` processes.  A replica whose tables come from the seed (no log
    # position: it needs the whole stream) starts after another replica trimmed entries away:
    # its tables would lack acknowledged updates, so it must not take traffic until re-seeded;
    # it stays alive (a restart would not help).  A replica on an untrimmed stream is ready.
    seed = compress_uniform(torch.randn(4, 2), RowClass(2, 32))
    folders = {name: tmp_path / name for name in ("gap", "whole")}
    for folder in folders.values():
        folder.mkdir()
        save_table(seed, folder / "t.safetensors")
    trimmed_stream, whole_stream = f"gap:{uuid.uuid4().hex}", f"whole:{uuid.uuid4().hex}"
    log = open_log(redis_url, tmp_path / "x", trimmed_stream)
    positions = [log.append(_entry()) for _ in range(6)]
    client = redis.Redis.from_url(redis_url)
    assert ReplicaTrimCoordinator(client, trimmed_stream, "other", ttl_s=60).trim(positions[3]) == 4  # entries 0..3 go

    def env(stream: str, replica: str) -> dict[str, str]:
        return {"REDIS_URL": redis_url, "EMBSERVE_REDIS_STREAM": stream, "EMBSERVE_REPLICA_ID": replica}

    with serving(folders["gap"], env(trimmed_stream, "gap"), wait_path="/healthz") as base:
        r = httpx.get(f"{base}/readyz", timeout=10.0)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "update_log_gap" and error["status"] == 503
        assert error["details"] == [{"needed_position": None, "trimmed_through": "-".join(map(str, positions[3])),
                                     "stream_first_position": "-".join(map(str, positions[4]))}]
        assert "trimmed" in error["message"] and "re-seed" in error["message"] and "from the seed" in error["message"]
        assert httpx.get(f"{base}/healthz", timeout=10.0).status_code == 200
        assert httpx.get(f"{base}/v2/health/ready", timeout=10.0).status_code == 503
        assert _gauge(base, "embserve_update_log_gap") == 1.0
    with serving(folders["whole"], env(whole_stream, "whole")) as base:
        assert httpx.get(f"{base}/readyz", timeout=10.0).status_code == 200
        assert _gauge(base, "embserve_update_log_gap") == 0.0
    log.close()
    client.close()
