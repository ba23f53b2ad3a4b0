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

from compression.storage import TableFormatError, read_manifest
from service.updatelog import Position, parse_position
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
    return check_table(client, "emb", ID_SPACE, reference, [in_flight or {}])[0]


def check_table(
    client: httpx.Client, table: str, id_space: int, reference: dict[int, np.ndarray], in_flights: list[dict[int, np.ndarray | None]]
) -> list[bool]:
    """:func:`check_against` for one table and several writers' in-flight updates (on disjoint
    IDs); returns, per in-flight update, whether it landed."""
    ids = list(range(id_space))
    r = client.post("/v1/lookup", json={"lookups": [{"table": table, "ids": ids}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    values = np.asarray(res["embeddings"], dtype=np.float32)
    found = res["found"]
    landed_votes: list[list[bool]] = [[] for _ in in_flights]
    lost, extra = [], []  # acknowledged value missing / a row that should not be there
    for i in ids:
        expected = reference.get(i)
        got = values[i] if found[i] else None
        matches_ref = (expected is None and got is None) or (expected is not None and got is not None and np.array_equal(got, expected))
        flight = next((k for k, f in enumerate(in_flights) if i in f), None)
        if flight is not None:
            alt = in_flights[flight][i]
            matches_alt = (alt is None and got is None) or (alt is not None and got is not None and np.array_equal(got, alt))
            assert matches_ref or matches_alt, f"{table} id {i}: neither the acknowledged nor the in-flight value"
            if matches_alt and not matches_ref:
                landed_votes[flight].append(True)
            elif matches_ref and not matches_alt:
                landed_votes[flight].append(False)
        elif not matches_ref:
            (extra if expected is None else lost).append(i)
    assert not lost, f"{table}: {len(lost)} IDs lost their acknowledged value, e.g. {lost[:5]}"
    assert not extra, f"{table}: {len(extra)} IDs hold a row nothing acknowledged now (deleted, or a dropped namesake's), e.g. {extra[:5]}"
    # an in-flight entry is one log entry: it landed whole or not at all
    assert all(len(set(v)) <= 1 for v in landed_votes), "an in-flight update was applied in part"
    return [bool(v and v[0]) for v in landed_votes]


# ------------------------------------------------------------------------------------------------
# SIGKILL during concurrent admin snapshots and drops (issue 12).  A fast default number of
# trials in the normal run; EMBSERVE_CRASH_TRIALS=20 (or more) for the full count.

TRIALS = int(os.environ.get("EMBSERVE_CRASH_TRIALS", "2"))
CHAOS_ENV = {"EMBSERVE_SNAPSHOT_INTERVAL_S": "0.05"}  # the periodic snapshot all but never idles


def log_env(log_kind: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if log_kind == "redis":
        return {"REDIS_URL": request.getfixturevalue("redis_url"), "EMBSERVE_REDIS_STREAM": f"crash:{uuid.uuid4().hex}"}
    return {}


class Writer:
    """Upserts (and a few deletes) to one table over its own ID range, remembering what was
    acknowledged and what was in flight when the server died."""

    def __init__(self, base: str, table: str, ids: range, seed: int) -> None:
        self.base, self.table, self.ids = base, table, ids
        self.rng = random.Random(seed)
        self.seed = seed
        self.reference: dict[int, np.ndarray] = {}
        self.in_flight: dict[int, np.ndarray | None] = {}
        self.acknowledged = 0
        self.error: str | None = None

    def run(self, stop: threading.Event) -> None:
        client = httpx.Client(base_url=self.base, timeout=30.0)
        k = 0
        while not stop.is_set():
            ids = np.array(self.rng.sample(self.ids, 16), dtype=np.int64)
            vectors = np.random.default_rng(self.seed * 1_000_003 + self.acknowledged + k).normal(size=(16, DIM)).astype(np.float32)
            deletes = [self.rng.choice(self.ids)] if k % 5 == 0 else []
            pending: dict[int, np.ndarray | None] = {int(i): v for i, v in zip(ids, vectors, strict=True)}
            pending.update({d: None for d in deletes})
            self.in_flight = pending
            try:
                r = client.post(f"/v1/tables/{self.table}/updates", json={"upsert_ids": ids.tolist(), "vectors": vectors.tolist(), "delete_ids": deletes})
            except httpx.TransportError:
                return  # the server died mid-request: this one stays in flight
            if r.status_code != 200:
                self.error = f"update answered {r.status_code}: {r.text}"
                return
            self.settle(landed=True)
            self.acknowledged += 1
            k += 1

    def settle(self, landed: bool) -> None:
        if landed:
            for i, v in self.in_flight.items():
                if v is None:
                    self.reference.pop(i, None)
                else:
                    self.reference[i] = v
        self.in_flight = {}


def kill_after(proc: subprocess.Popen[bytes], rng: random.Random, threads: list[threading.Thread], stop: threading.Event) -> None:
    threads[0].join(timeout=rng.uniform(0.5, 2.0))  # a random moment (bounded), then kill -9
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()


def watch_position(path: Path, stop: threading.Event, backwards: list[tuple[Position, Position]], last: list[Position]) -> None:
    """Read the table file's log position over and over: it must never go backwards.  This sees
    an out-of-order snapshot even when no kill lands in the moment it leaves the file behind."""
    while not stop.is_set():
        try:
            pos = parse_position(read_manifest(path)["log_position"])
        except (TableFormatError, OSError):
            pos = None
        if pos is not None:
            if last and pos < last[0]:
                backwards.append((last[0], pos))
            if not last or pos > last[0]:
                last[:] = [pos]
        stop.wait(0.002)  # a polling pace, not a synchronization


@pytest.mark.parametrize("log_kind", ["sqlite", "redis"])
def test_sigkill_during_concurrent_snapshots_loses_no_acknowledged_update(log_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two writers, the periodic snapshot every 50 ms and an admin snapshot loop on one table:
    overlapping snapshots, and trims behind them, while the process is killed at random."""
    env = {**log_env(log_kind, request), **CHAOS_ENV}
    tables = tmp_path / "tables"
    rng = random.Random(21 if log_kind == "sqlite" else 22)
    proc, base = start_server(tables, env)
    with httpx.Client(base_url=base, timeout=30.0) as c:
        assert c.post("/v1/admin/tables", json={"name": "emb", "dim": DIM, "classes": [f"d{DIM}b32"]}).status_code == 201
    half = ID_SPACE // 2
    writers = [Writer(base, "emb", range(0, half), 1), Writer(base, "emb", range(half, ID_SPACE), 2)]
    snapshots = 0
    backwards: list[tuple[Position, Position]] = []
    newest: list[Position] = []
    try:
        for _trial in range(TRIALS):
            stop = threading.Event()
            for w in writers:
                w.base = base

            def snapshotter() -> None:
                nonlocal snapshots
                with httpx.Client(base_url=base, timeout=30.0) as c:
                    while not stop.is_set():
                        try:
                            r = c.post("/v1/admin/tables/emb/snapshot")
                        except httpx.TransportError:
                            return
                        assert r.status_code == 200, r.text
                        snapshots += 1

            threads = [threading.Thread(target=w.run, args=(stop,)) for w in writers] + [threading.Thread(target=snapshotter)]
            threads.append(threading.Thread(target=watch_position, args=(tables / "emb.safetensors", stop, backwards, newest)))
            for t in threads:
                t.start()
            kill_after(proc, rng, threads, stop)
            assert all(w.error is None for w in writers), [w.error for w in writers]
            assert not backwards, f"the table file went back to an older log position: {backwards[:3]}"
            proc, base = start_server(tables, env)
            with httpx.Client(base_url=base, timeout=30.0) as c:
                reference = {**writers[0].reference, **writers[1].reference}
                landed = check_table(c, "emb", ID_SPACE, reference, [w.in_flight for w in writers])
            for w, did in zip(writers, landed, strict=True):
                w.settle(did)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    acked = sum(w.acknowledged for w in writers)
    print(f"\n{log_kind}: {TRIALS} SIGKILL trials with concurrent snapshots: {acked} acknowledged updates, "
          f"{snapshots} admin snapshots, 0 lost, the file's position never went backwards")
    assert acked > 10 * TRIALS  # the trials really wrote something


@pytest.mark.parametrize("log_kind", ["sqlite", "redis"])
def test_sigkill_during_drops_and_snapshots_resurrects_nothing(log_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Tables created, written, snapshotted and dropped (names reused) while another thread
    snapshots them and a writer streams into a steady table; killed at random.  After each
    restart: no dropped table is back, every acknowledged table and row is there, and a
    re-created table holds none of its dropped namesake's rows."""
    env = {**log_env(log_kind, request), **CHAOS_ENV}
    tables = tmp_path / "tables"
    rng = random.Random(31 if log_kind == "sqlite" else 32)
    names = ["z0", "z1", "z2"]
    z_ids = 64
    model: dict[str, dict[int, np.ndarray] | None] = {n: None for n in names}  # None = dropped / never made
    in_flight: list[tuple[str, str, dict[int, np.ndarray]]] = []  # (op, table, rows of an upsert)
    counts = {"create": 0, "drop": 0, "upsert": 0, "snapshot": 0, "raced_snapshots": 0}
    proc, base = start_server(tables, env)
    with httpx.Client(base_url=base, timeout=30.0) as c:
        assert c.post("/v1/admin/tables", json={"name": "emb", "dim": DIM, "classes": [f"d{DIM}b32"]}).status_code == 201
    writer = Writer(base, "emb", range(ID_SPACE), 3)
    errors: list[str] = []
    try:
        for trial in range(TRIALS):
            stop = threading.Event()
            writer.base = base
            op_rng = random.Random(trial * 7919 + (1 if log_kind == "sqlite" else 2))

            def churn() -> None:
                with httpx.Client(base_url=base, timeout=30.0) as c:
                    k = 0
                    while not stop.is_set():
                        name = op_rng.choice(names)
                        rows = model[name]
                        if rows is None:
                            op, rows_sent = "create", {}
                        else:
                            roll = op_rng.random()
                            op = "upsert" if roll < 0.5 else "snapshot" if roll < 0.7 else "drop"
                            rows_sent = {}
                            if op == "upsert":
                                ids = op_rng.sample(range(z_ids), 4)
                                vecs = np.random.default_rng(trial * 1_000_003 + k).normal(size=(4, DIM)).astype(np.float32)
                                rows_sent = dict(zip(ids, vecs, strict=True))
                        in_flight[:] = [(op, name, rows_sent)]
                        try:
                            if op == "create":
                                r = c.post("/v1/admin/tables", json={"name": name, "dim": DIM, "classes": [f"d{DIM}b32"]})
                                ok = r.status_code == 201
                            elif op == "drop":
                                r = c.delete(f"/v1/admin/tables/{name}")
                                ok = r.status_code == 204
                            elif op == "snapshot":
                                r = c.post(f"/v1/admin/tables/{name}/snapshot")
                                ok = r.status_code == 200
                            else:
                                body = {"upsert_ids": list(rows_sent), "vectors": [v.tolist() for v in rows_sent.values()]}
                                r = c.post(f"/v1/tables/{name}/updates", json=body)
                                ok = r.status_code == 200
                        except httpx.TransportError:
                            return  # died mid-request: stays in flight
                        if not ok:
                            errors.append(f"{op} {name}: {r.status_code} {r.text}")
                            return
                        settle_op(model, op, name, rows_sent, landed=True)
                        counts[op] += 1
                        in_flight.clear()
                        k += 1

            def snapshotter() -> None:  # races the drops: 200 or 404, never a resurrected file
                with httpx.Client(base_url=base, timeout=30.0) as c:
                    while not stop.is_set():
                        try:
                            r = c.post(f"/v1/admin/tables/{op_rng.choice(names)}/snapshot")
                        except httpx.TransportError:
                            return
                        if r.status_code not in (200, 404):
                            errors.append(f"racing snapshot: {r.status_code} {r.text}")
                            return
                        counts["raced_snapshots"] += 1

            threads = [threading.Thread(target=writer.run, args=(stop,)), threading.Thread(target=churn), threading.Thread(target=snapshotter)]
            for t in threads:
                t.start()
            kill_after(proc, rng, threads, stop)
            assert not errors and writer.error is None, (errors, writer.error)
            proc, base = start_server(tables, env)
            with httpx.Client(base_url=base, timeout=30.0) as c:
                writer.settle(check_table(c, "emb", ID_SPACE, writer.reference, [writer.in_flight])[0])
                served = {t["name"] for t in c.get("/v1/tables").json()["tables"]}
                flight = in_flight[0] if in_flight else None
                resurrected = [n for n in names if model[n] is None and n in served and not (flight and flight[:2] == ("create", n))]
                assert not resurrected, f"trial {trial}: dropped tables came back: {resurrected}"
                missing = [n for n in names if model[n] is not None and n not in served and not (flight and flight[:2] == ("drop", n))]
                assert not missing, f"trial {trial}: acknowledged tables are gone: {missing}"
                if flight is not None:
                    op, name, rows_sent = flight
                    if op in ("create", "drop"):
                        settle_op(model, op, name, rows_sent, landed=(name in served) == (op == "create"))
                for name in names:
                    if model[name] is None:
                        continue
                    flights = [{i: v for i, v in rows_sent.items()}] if flight and flight[0] == "upsert" and flight[1] == name else []
                    landed = check_table(c, name, z_ids, model[name], flights or [{}])  # type: ignore[arg-type]
                    if flights:
                        settle_op(model, "upsert", name, flight[2], landed=landed[0])  # type: ignore[index]
                in_flight.clear()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"\n{log_kind}: {TRIALS} SIGKILL trials with drops: {counts}, {writer.acknowledged} updates to emb; "
          "0 resurrected tables, 0 lost updates")
    assert counts["drop"] + counts["create"] > TRIALS  # the trials really churned tables


def settle_op(model: dict[str, dict[int, np.ndarray] | None], op: str, name: str, rows: dict[int, np.ndarray], landed: bool) -> None:
    if not landed:
        return
    if op == "create":
        model[name] = {}
    elif op == "drop":
        model[name] = None
    elif op == "upsert":
        assert model[name] is not None
        model[name].update(rows)  # type: ignore[union-attr]
