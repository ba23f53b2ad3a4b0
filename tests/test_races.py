"""Races and outages that used to lose acknowledged writes or stall the service (issue 12):
overlapping snapshots, a drop racing a snapshot, a table over its budget, a Redis outage, and
leftovers of a snapshot killed mid-write.  In-process apps on a real update log (both kinds
where the log matters) and real files; interleavings are forced with a gate on the file write
(the real write still runs), never with sleeps."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import compression.storage as storage
from compression.storage import read_manifest
from service.settings import Settings
from service.updatelog import UpdateBatch, format_position
from tests.test_streaming import create, lookup, settings, start, upsert  # noqa: F401 - settings: both logs, as a fixture

GATE_DEADLINE_S = 2.0  # how long a held snapshot waits for the racing call before going on


class WriteGate:
    """Holds the first table-file write whose name contains ``table`` until ``release()`` (or a
    deadline), so a test can run a second operation while a snapshot is half done.  Wraps the
    real ``save_file``: the bytes written are the real ones."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, table: str) -> None:
        self.table = table
        self.entered = threading.Event()
        self._release = threading.Event()
        self._held = False
        real = storage.save_file

        def gated(tensors: Any, filename: str, metadata: Any = None) -> None:
            if not self._held and f".{table}.safetensors." in Path(filename).name:
                self._held = True
                self.entered.set()
                self._release.wait(GATE_DEADLINE_S * 5)
            real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(storage, "save_file", gated)

    def release(self) -> None:
        self._release.set()


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, out


def crash_stop(client, state) -> None:  # type: ignore[no-untyped-def]
    """Stop like a SIGKILL would, for what reaches disk: no clean-shutdown snapshot."""
    state.applier.stop()
    state.applier.snapshot_all = lambda only_dirty=False: None
    client.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- 1


def test_overlapping_snapshots_never_move_the_file_backwards(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow snapshot (older position) and a fast one (newer position, which trims the log):
    the older one must not replace the newer file, or the entries in between are gone."""
    client, state = start(settings)
    v = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    try:
        create(client, classes=["d8b32"])
        upsert(client, [1], v[:1])
        hosted = state.tables.get("emb")
        gate = WriteGate(monkeypatch, "emb")
        slow, slow_out = run_in_thread(lambda: state.applier.snapshot(hosted))  # the periodic one
        assert gate.entered.wait(10)
        second = upsert(client, [2], v[1:])  # acknowledged while the slow snapshot is half done
        fast, fast_out = run_in_thread(lambda: client.post("/v1/admin/tables/emb/snapshot"))
        fast.join(GATE_DEADLINE_S)  # a serialized snapshot waits for the slow one: that is fine
        gate.release()
        slow.join(30)
        fast.join(30)
        assert "error" not in slow_out and "error" not in fast_out, (slow_out, fast_out)
        assert fast_out["result"].status_code == 200, fast_out["result"].text
        on_disk = read_manifest(settings.tables_dir / "emb.safetensors")["log_position"]
        assert on_disk == second["position"], "an older snapshot replaced a newer one"
        assert format_position(hosted.snapshot_position) == second["position"]
    finally:
        crash_stop(client, state)
    client, state = start(settings)
    try:
        values, found = lookup(client, [1, 2])
        assert found == [True, True], "an acknowledged update was lost"
        assert np.array_equal(values, v)
    finally:
        client.__exit__(None, None, None)


def test_a_snapshot_copies_the_table_beside_lookups_with_writers_held_off(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot's copy of the table (capture_state) holds the table's write lock, not the
    lock lookups take: a lookup on another thread finishes while the copy is being made (a
    1M-ID int8 table's copy held every lookup about 70 ms before), and a writer cannot start."""
    import torch

    client, state = start(settings)
    try:
        create(client, classes=["d8b32"])
        upsert(client, [1, 2], np.ones((2, 8), np.float32))
        hosted = state.tables.get("emb")
        seen: dict[str, bool] = {}
        real = storage.manifest_of

        def copying(*args: Any, **kwargs: Any) -> Any:  # called while the tensors are copied
            done, writer_in = threading.Event(), threading.Event()
            threading.Thread(target=lambda: (hosted.table.lookup(torch.tensor([1, 2])), done.set()), daemon=True).start()
            seen["lookup"] = done.wait(30)

            def write() -> None:
                if hosted.write_lock.acquire(timeout=0.2):
                    writer_in.set()
                    hosted.write_lock.release()

            writer = threading.Thread(target=write)
            writer.start()
            writer.join()
            seen["writer"] = writer_in.is_set()
            return real(*args, **kwargs)

        monkeypatch.setattr(storage, "manifest_of", copying)
        assert state.applier.snapshot(hosted) is not None
        assert seen == {"lookup": True, "writer": False}
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- 2


def test_drop_during_a_snapshot_stays_dropped(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    client, state = start(settings)
    try:
        create(client, name="z", classes=["d8b32"])
        upsert(client, [1, 2], np.ones((2, 8), np.float32), table="z")
        hosted = state.tables.get("z")
        gate = WriteGate(monkeypatch, "z")
        snap, snap_out = run_in_thread(lambda: state.applier.snapshot(hosted))
        assert gate.entered.wait(10)
        drop, drop_out = run_in_thread(lambda: client.delete("/v1/admin/tables/z"))
        drop.join(GATE_DEADLINE_S)  # a drop that waits for the snapshot is fine
        gate.release()
        snap.join(30)
        drop.join(30)
        assert "error" not in snap_out and "error" not in drop_out, (snap_out, drop_out)
        assert drop_out["result"].status_code == 204
        assert not (settings.tables_dir / "z.safetensors").exists(), "the snapshot re-created a dropped table"
        state.applier.snapshot(hosted)  # a later attempt with a stale handle is a no-op
        assert not (settings.tables_dir / "z.safetensors").exists()
        assert client.get("/v1/tables/z").status_code == 404
    finally:
        client.__exit__(None, None, None)
    client, _ = start(settings)
    try:
        assert client.get("/v1/tables/z").status_code == 404, "a restart resurrected a dropped table"
    finally:
        client.__exit__(None, None, None)


def test_a_dropped_seeded_table_is_not_seeded_again(tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    client, _ = start(Settings(tables_dir=seed, snapshot_interval_s=3600))
    create(client, name="base", classes=["d8b32"])
    client.__exit__(None, None, None)
    settings = Settings(tables_dir=tmp_path / "tables", seed_dir=seed, snapshot_interval_s=3600)
    client, _ = start(settings)
    try:
        assert client.get("/v1/tables/base").status_code == 200
        assert client.delete("/v1/admin/tables/base").status_code == 204
    finally:
        client.__exit__(None, None, None)
    client, _ = start(settings)
    try:
        assert client.get("/v1/tables/base").status_code == 404, "the seed folder brought a dropped table back"
        create(client, name="base", classes=["d8b32"])  # the name can be used again, and then it stays
    finally:
        client.__exit__(None, None, None)
    client, _ = start(settings)
    try:
        assert client.get("/v1/tables/base").status_code == 200
    finally:
        client.__exit__(None, None, None)


def test_a_recreated_table_never_gets_the_dropped_ones_rows(settings: Settings) -> None:
    """Entries for the old ``z`` still waiting in the log when ``z`` is dropped and created again
    belong to the old table: neither the applier nor a replay after restart may apply them."""
    client, state = start(settings)
    try:
        create(client, name="t", classes=["d8b32"])
        create(client, name="z", classes=["d8b32"])
        upsert(client, [1], np.ones((1, 8), np.float32), table="z")
        t_lock = state.tables.get("t").table.lock
        with t_lock:  # the applier stalls on t's entry: what follows stays unapplied for now
            r = client.post("/v1/tables/t/updates", json={"upsert_ids": [5], "vectors": [[1.0] * 8]})
            assert r.status_code == 200
            r = client.post("/v1/tables/z/updates", json={"upsert_ids": [2], "vectors": [[2.0] * 8]})
            assert r.status_code == 200
            assert client.delete("/v1/admin/tables/z").status_code == 204
            create(client, name="z", classes=["d8b32"])
        last = state.update_log.last_position()
        assert state.applier.wait_for(last, 30)
        assert lookup(client, [1, 2], table="z")[1] == [False, False], "the new z holds the dropped z's rows"
    finally:
        crash_stop(client, state)
    client, _ = start(settings)
    try:
        assert lookup(client, [1, 2], table="z")[1] == [False, False], "replay gave the new z the dropped z's rows"
        assert lookup(client, [5], table="t")[1] == [True]
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- 3


def test_an_update_that_cannot_fit_the_budget_is_refused_up_front(settings: Settings) -> None:
    client, state = start(settings)
    try:
        # 2000 rows need at least 32000 bytes in d8b16: they can never fit 30000
        create(client, name="small", classes=["d8b32", "d8b16"], budget_bytes=30_000, policy={"name": "scall"})
        ids = list(range(2000))
        before = state.update_log.last_position()
        r = client.post("/v1/tables/small/updates", json={"upsert_ids": ids, "vectors": [[1.0] * 8] * 2000})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "budget_too_small" and "30000" in r.json()["error"]["message"]
        assert state.update_log.last_position() == before, "a refused update reached the log"
        upsert(client, ids[:500], np.ones((500, 8), np.float32), table="small")  # what fits is taken
        r = client.post("/v1/tables/small/updates", json={"upsert_ids": ids[500:], "vectors": [[1.0] * 8] * 1500})
        assert r.status_code == 422, r.text  # counted with the rows the table already holds
        assert state.update_log.last_position() != before
    finally:
        client.__exit__(None, None, None)


def test_one_table_over_its_budget_never_stalls_the_others(settings: Settings) -> None:
    settings.wait_timeout_s = 3.0
    settings.snapshot_interval_s = 0.2
    client, state = start(settings)
    try:
        # 2000 rows need at least 32000 bytes in d8b16: they can never fit 30000
        create(client, name="small", classes=["d8b32", "d8b16"], budget_bytes=30_000, policy={"name": "scall"})
        create(client, name="other", classes=["d8b32"])
        ids = np.arange(2000, dtype=np.int64)
        vectors = np.ones((2000, 8), np.float32)
        # a trainer writing straight into the log cannot be refused: the entry is applied and the
        # table marked over budget, and nothing else waits for it
        state.update_log.append(UpdateBatch("small", ids, vectors, np.empty(0, np.int64)))
        for k in range(6):
            started = time.monotonic()
            done = upsert(client, [k], np.full((1, 8), float(k), np.float32), table="other")
            assert done["applied"] and time.monotonic() - started < settings.wait_timeout_s
        assert state.applier.error is None, state.applier.error
        assert lookup(client, [0, 1999], table="small")[1] == [True, True]
        info = client.get("/v1/tables/small").json()
        assert info["over_budget"] and info["bytes"] > 30_000, info
        assert client.get("/v1/tables/other").json()["over_budget"] is None
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["over_budget"] == ["small"], ready.text
        assert 'embserve_table_over_budget{table="small"} 1.0' in client.get("/metrics").text
        upsert(client, [], np.empty((0, 8), np.float32), deletes=[1998, 1999], table="small")  # shrinking is always taken
        # snapshots and the trim keep going for every table, the one over budget included
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            positions = [state.tables.get(n).snapshot_position for n in ("small", "other")]
            if positions == [state.applier.position] * 2 and state.update_log.count_after(None) == 0:
                break
            time.sleep(0.05)  # polling a condition with a deadline
        else:
            raise AssertionError(f"snapshots stalled: {positions} vs {state.applier.position}")
        # deletes always pass, and a budget that fits clears the mark
        r = client.put("/v1/admin/tables/small/policy", json={"policy": {"name": "scall"}, "budget_bytes": 200_000, "redecide": True})
        assert r.status_code == 200, r.text
        assert client.get("/v1/tables/small").json()["over_budget"] is None
    finally:
        client.__exit__(None, None, None)


def test_one_tables_failing_snapshot_never_stalls_the_others(settings: Settings) -> None:
    """A table whose file cannot be written (here: a folder sits at its path; in life a full or
    read-only disk) keeps its older file and the log behind it; the others go on."""
    settings.snapshot_interval_s = 0.1
    client, state = start(settings)
    try:
        create(client, name="a", classes=["d8b32"])
        create(client, name="b", classes=["d8b32"])
        blocker = settings.tables_dir / "a.safetensors"
        blocker.unlink()
        blocker.mkdir()
        upsert(client, [1], np.ones((1, 8), np.float32), table="a")
        last = upsert(client, [1], np.ones((1, 8), np.float32), table="b")["position"]
        deadline = time.monotonic() + 20
        while format_position(state.tables.get("b").snapshot_position) != last:
            assert time.monotonic() < deadline, "b's snapshot stalled behind a's failing one"
            time.sleep(0.05)  # polling a condition with a deadline
        assert state.applier.error is None, state.applier.error
        assert format_position(state.tables.get("a").snapshot_position) != last
        assert state.update_log.count_after(None) >= 1, "the log was trimmed past what a's file holds"
        blocker.rmdir()
        while format_position(state.tables.get("a").snapshot_position) != last or state.update_log.count_after(None):
            assert time.monotonic() < deadline, "a's snapshot did not resume"
            time.sleep(0.05)  # polling a condition with a deadline
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- 4


class RedisProcess:
    """A redis-server this test may stop and start again, same port and data folder (AOF)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder), "--appendonly", "yes",
             "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)  # polling a real process for readiness
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture()
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from tests.test_e2e import free_port

    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisProcess(folder, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_redis_outage_answers_503_keeps_lookups_ready_and_recovers(own_redis: RedisProcess, tmp_path: Path) -> None:
    settings = Settings(tables_dir=tmp_path / "tables", redis_url=own_redis.url, snapshot_interval_s=3600, wait_timeout_s=5.0)
    client, state = start(settings)
    try:
        create(client, classes=["d8b32"])
        upsert(client, [1], np.ones((1, 8), np.float32))
        own_redis.stop()
        r = client.post("/v1/tables/emb/updates", json={"upsert_ids": [2], "vectors": [[2.0] * 8]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "log_unavailable"
        assert int(r.headers["retry-after"]) >= 1
        assert lookup(client, [1])[1] == [True]
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text  # an orchestrator must not pull the replica
        body = ready.json()
        assert body["lookups"] == "ready" and body["writes"] == "degraded", body
        own_redis.start()
        deadline = time.monotonic() + 30
        while True:  # the client retries as Retry-After says, until the log is back
            r = client.post("/v1/tables/emb/updates?wait=true", json={"upsert_ids": [2], "vectors": [[2.0] * 8]})
            if r.status_code == 200:
                break
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(float(r.headers["retry-after"]) / 10)  # a client's back-off, shortened for the test
        assert r.json()["applied"] is True
        assert lookup(client, [1, 2])[1] == [True, True]
        deadline = time.monotonic() + 30
        while (body := client.get("/readyz").json())["writes"] != "ready":
            assert time.monotonic() < deadline, body
            time.sleep(0.05)  # polling a condition with a deadline
    finally:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- 5


def test_start_cleans_snapshot_leftovers(tmp_path: Path) -> None:
    tables = tmp_path / "tables"
    tables.mkdir()
    leftovers = [tables / ".emb.safetensors.k2j4h1.tmp", tables / "base.safetensors.seeding"]
    for path in leftovers:
        path.write_bytes(b"half a table")
    keep = tables / "notes.txt"
    keep.write_text("not ours")
    client, _ = start(Settings(tables_dir=tables, snapshot_interval_s=3600))
    client.__exit__(None, None, None)
    assert not any(p.exists() for p in leftovers), [p for p in leftovers if p.exists()]
    assert keep.exists()


@pytest.mark.parametrize("name", ["a..b", "..", "x..", "a/b", ".hidden", ""])
def test_bad_table_names_get_422(tmp_path: Path, name: str) -> None:
    client, state = start(Settings(tables_dir=tmp_path / "tables", snapshot_interval_s=3600))
    try:
        r = client.post("/v1/admin/tables", json={"name": name, "dim": 4, "classes": ["d4b32"]})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_request"
        assert state.tables.names() == []
        assert list((tmp_path / "tables").glob("*.safetensors")) == []
    finally:
        client.__exit__(None, None, None)
