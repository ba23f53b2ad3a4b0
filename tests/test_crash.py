"""Crash safety: a real service process takes a stream of updates and is killed with SIGKILL at
random moments.  After each restart every acknowledged update must be visible, and the table
must equal a replay of the acknowledged updates (plus, at most, the one update in flight when
the process died, which may or may not have reached the log).  Both logs, several trials."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_e2e import free_port, wait_ready

pytestmark = pytest.mark.e2e

DIM = 8
ID_SPACE = 3000


def start_server(tables: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "EMBSERVE_TABLES_DIR": str(tables),
        "EMBSERVE_PORT": str(port),
        "EMBSERVE_SNAPSHOT_INTERVAL_S": "0.3",  # snapshots happen mid-stream too
        **env_extra,
    }
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, proc)
    return proc, base


@pytest.mark.parametrize("log_kind", ["sqlite", "redis"])
def test_sigkill_loses_no_acknowledged_update(log_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env_extra = {}
    if log_kind == "redis":
        env_extra = {"REDIS_URL": request.getfixturevalue("redis_url"), "EMBSERVE_REDIS_STREAM": f"crash:{uuid.uuid4().hex}"}
    tables = tmp_path / "tables"
    rng = random.Random(11 if log_kind == "sqlite" else 12)
    reference: dict[int, np.ndarray] = {}  # acknowledged state, replayed in order
    for trial in range(3):
        proc, base = start_server(tables, env_extra)
        client = httpx.Client(base_url=base, timeout=30.0)
        try:
            if trial == 0:
                r = client.post("/v1/admin/tables", json={"name": "emb", "dim": DIM, "classes": [f"d{DIM}b32"]})
                assert r.status_code == 201, r.text
            check_against(client, reference, in_flight=None)
            in_flight: dict[int, np.ndarray | None] = {}
            stop = threading.Event()

            def writer() -> None:
                nonlocal in_flight
                wclient = httpx.Client(base_url=base, timeout=30.0)
                k = 0
                while not stop.is_set():
                    ids = np.array(rng.sample(range(ID_SPACE), 16), dtype=np.int64)
                    vectors = np.random.default_rng(trial * 100_000 + k).normal(size=(16, DIM)).astype(np.float32)
                    deletes = [rng.randrange(ID_SPACE)] if k % 5 == 0 else []
                    pending: dict[int, np.ndarray | None] = {int(i): v for i, v in zip(ids, vectors, strict=True)}
                    pending.update({d: None for d in deletes})  # deletes apply after upserts, as the server does
                    in_flight = pending
                    try:
                        r = wclient.post("/v1/tables/emb/updates", json={"upsert_ids": ids.tolist(), "vectors": vectors.tolist(), "delete_ids": deletes})
                    except httpx.TransportError:
                        return  # the server died mid-request: this one stays "in flight"
                    if r.status_code != 200:
                        return
                    for i, v in pending.items():  # acknowledged: part of the reference now
                        if v is None:
                            reference.pop(i, None)
                        else:
                            reference[i] = v
                    in_flight = {}
                    k += 1

            thread = threading.Thread(target=writer)
            thread.start()
            # let it run a random while (bounded), then kill -9 mid-stream
            thread.join(timeout=rng.uniform(0.5, 2.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            thread.join(timeout=30)
            assert not thread.is_alive()
        finally:
            client.close()
            if proc.poll() is None:
                proc.kill()
        proc, base = start_server(tables, env_extra)
        try:
            with httpx.Client(base_url=base, timeout=30.0) as check_client:
                landed = check_against(check_client, reference, in_flight=in_flight)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if landed:  # durably logged before the crash, just never acknowledged: now part of the truth
            for i, v in in_flight.items():
                if v is None:
                    reference.pop(i, None)
                else:
                    reference[i] = v
    assert len(reference) > 50  # the trials really wrote something


def check_against(client: httpx.Client, reference: dict[int, np.ndarray], in_flight: dict[int, np.ndarray | None] | None) -> bool:
    """Every ID holds its acknowledged value, or (IDs of the in-flight update only) that
    update's value, consistently for all of them.  Returns whether the in-flight update landed."""
    ids = list(range(ID_SPACE))
    r = client.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": ids}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    values = np.asarray(res["embeddings"], dtype=np.float32)
    found = res["found"]
    flight = in_flight or {}
    landed_votes = []
    for i in ids:
        expected = reference.get(i)
        got = values[i] if found[i] else None
        matches_ref = (expected is None and got is None) or (expected is not None and got is not None and np.array_equal(got, expected))
        if i in flight:
            alt = flight[i]
            matches_alt = (alt is None and got is None) or (alt is not None and got is not None and np.array_equal(got, alt))
            assert matches_ref or matches_alt, f"id {i}: neither the acknowledged nor the in-flight value"
            if matches_alt and not matches_ref:
                landed_votes.append(True)
            elif matches_ref and not matches_alt:
                landed_votes.append(False)
        else:
            assert matches_ref, f"id {i}: expected {expected}, got {got}"
    # the in-flight entry is one log entry: it landed whole or not at all
    assert len(set(landed_votes)) <= 1, "the in-flight update was applied in part"
    return bool(landed_votes and landed_votes[0])
