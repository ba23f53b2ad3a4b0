"""Crash safety of eviction and admission: a real server holds a keyed table with ``max_ids``
and an admission count, takes a skewed stream of updates (so it evicts and filters all the
time), and is killed with SIGKILL mid-stream.  After each restart the table must equal a replay
of the acknowledged log through the same gate (plus, or not, the one entry in flight), ID for
ID and bit for bit: eviction and admission depend on the log alone, not on lookups or time."""

from __future__ import annotations

import random
import signal
import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from compression import CompressedTable, RowClass
from compression.lifecycle import IdLifecycle, LifecycleConfig
from tests.test_crash import start_server

pytestmark = pytest.mark.e2e

DIM = 8
ID_SPACE = 4000
CONFIG = {"max_ids": 300, "admit_min_count": 2, "count_half_life_rows": 3000, "count_sketch_width": 4096}

Entry = tuple[np.ndarray, np.ndarray, list[int]]


def replay(entries: list[Entry], evicted: list[int] | None = None) -> CompressedTable:
    """The acknowledged log applied in order through the gate, as the applier does (each entry's
    eviction count appended to ``evicted``, when given)."""
    table = CompressedTable.empty(DIM, [RowClass(DIM, 32)], keyed=True)
    table.lifecycle = IdLifecycle(
        LifecycleConfig(max_ids=CONFIG["max_ids"], admit_min_count=CONFIG["admit_min_count"], half_life_rows=CONFIG["count_half_life_rows"], sketch_width=CONFIG["count_sketch_width"])
    )
    for ids, vectors, deletes in entries:
        t_ids = torch.from_numpy(ids)
        gate = table.lifecycle.gate(table, t_ids)
        table.delete(gate.victims)  # as the applier does, before the entry's rows
        if evicted is not None:
            evicted.append(gate.evicted)
        if bool(gate.keep.any()):
            table.put(t_ids[gate.keep], torch.from_numpy(vectors)[gate.keep], 0)
        if deletes:
            table.delete(torch.tensor(deletes, dtype=torch.int64))
    return table


def served_state(client: httpx.Client) -> tuple[np.ndarray, np.ndarray]:
    r = client.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": list(range(ID_SPACE))}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    return np.asarray(res["embeddings"], dtype=np.float32), np.asarray(res["found"])


def equals(table: CompressedTable, values: np.ndarray, found: np.ndarray) -> bool:
    ref = table.lookup(torch.arange(ID_SPACE))
    return bool(np.array_equal(ref.found.numpy(), found) and np.array_equal(ref.values.numpy(), values))


@pytest.mark.parametrize("log_kind", ["sqlite", "redis"])
def test_sigkill_with_eviction_and_admission_equals_a_replay(log_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env_extra = {}
    if log_kind == "redis":
        env_extra = {"REDIS_URL": request.getfixturevalue("redis_url"), "EMBSERVE_REDIS_STREAM": f"crashlc:{uuid.uuid4().hex}"}
    tables = tmp_path / "tables"
    rng = random.Random(21 if log_kind == "sqlite" else 22)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(ID_SPACE)]  # Zipf: a head that stays, a tail that churns
    acknowledged: list[Entry] = []
    for trial in range(2):
        proc, base = start_server(tables, env_extra)
        in_flight: list[Entry] = []
        try:
            with httpx.Client(base_url=base, timeout=30.0) as client:
                if trial == 0:
                    r = client.post("/v1/admin/tables", json={"name": "emb", "dim": DIM, "classes": [f"d{DIM}b32"], **CONFIG})
                    assert r.status_code == 201, r.text
                values, found = served_state(client)
                assert equals(replay(acknowledged), values, found)
                stop = threading.Event()

                def writer() -> None:
                    with httpx.Client(base_url=base, timeout=30.0) as wclient:
                        k = 0
                        while not stop.is_set():
                            ids = np.array(rng.choices(range(ID_SPACE), weights, k=32), dtype=np.int64)
                            vectors = np.random.default_rng(trial * 100_000 + k).normal(size=(32, DIM)).astype(np.float32)
                            deletes = [rng.randrange(ID_SPACE)] if k % 7 == 0 else []
                            in_flight[:] = [(ids, vectors, deletes)]
                            try:
                                r = wclient.post("/v1/tables/emb/updates", json={"upsert_ids": ids.tolist(), "vectors": vectors.tolist(), "delete_ids": deletes})
                            except httpx.TransportError:
                                return  # died mid-request: this entry stays in flight
                            if r.status_code != 200:
                                return
                            acknowledged.append(in_flight[0])
                            in_flight.clear()
                            k += 1

                thread = threading.Thread(target=writer)
                thread.start()
                thread.join(timeout=rng.uniform(1.5, 3.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                stop.set()
                thread.join(timeout=30)
                assert not thread.is_alive()
        finally:
            if proc.poll() is None:
                proc.kill()
        proc, base = start_server(tables, env_extra)
        try:
            with httpx.Client(base_url=base, timeout=30.0) as client:
                values, found = served_state(client)
                metrics = client.get("/metrics").text
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if equals(replay(acknowledged), values, found):
            continue
        assert in_flight and equals(replay(acknowledged + in_flight), values, found), "the table is not a replay of the acknowledged log"
        acknowledged += in_flight  # durably logged before the crash, never acknowledged: part of the truth now
    assert len(acknowledged) > 40
    evicted: list[int] = []
    truth = replay(acknowledged, evicted)
    # the stream really filled the table, so it evicted; it ends full, or one short when the last
    # entry's delete (every 7th entry has one) took out a held ID after its upserts
    assert sum(evicted) > 0 and CONFIG["max_ids"] - 1 <= truth.index.num_ids <= CONFIG["max_ids"]
    assert "embserve_evicted_ids_total" in metrics and "embserve_updates_filtered_total" in metrics
