"""The deployment, actually deployed: the CPU image is built and docker-compose.yml runs, with
docker-compose.offline.yml on top (no registry: a local Debian base, Debian's Redis and
Prometheus, a wheelhouse; host networking, everything on loopback).  Checked: both replicas
serve lookups; an update through one is visible on both; Prometheus scrapes both; a replica
whose process is killed is restarted by its restart policy and converges from the stream (and
one stopped with ``docker kill``, which Docker treats as a manual stop, comes back with
``docker compose up``); with the stream trimmed behind both replicas' snapshots, ``down`` and
``up`` keep every acknowledged update (each replica resumes from its own tables volume, and
the stream keeps what a stopped replica has not applied); a replica whose volume is lost
starts from the seed, logs that it missed trimmed entries and answers /readyz 503 (its health
check fails) while the other stays ready.

Needs a Docker engine, the compose plugin, the base image and the wheelhouse, which
``docker/ci-prepare.sh`` provides (``.ci/run`` calls it); skipped with the reason otherwise.
The stack runs as its own compose project on free ports and is removed with its volumes at the
end, whatever happened."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from tests.test_e2e import free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.offline.yml"]
CACHE = Path(os.environ.get("EMBSERVE_DOCKER_CACHE", "/var/cache/embserve-docker"))
BASE_IMAGE = "embserve-base:bookworm"
DEMO_ROWS = 20_000  # the seed job's demo table: small, so that building it takes seconds
DIM = 64
READY_TIMEOUT_S = 300.0  # one replica: start, load, replay the stream (slow on a loaded machine)
STREAM = "embserve:updates"  # the update log's Redis stream (the default EMBSERVE_REDIS_STREAM)
MISSED = "were trimmed from the stream while this replica was away"  # the applier's error (service/applier.py)
Position = tuple[int, int]  # a stream entry ID, "<ms>-<seq>"


def _run(args: list[str], timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)


def docker_unavailable() -> str | None:
    """Why the stack cannot run here, or None.  Quotes docker/ci-prepare.sh's own reason."""
    prepare = CACHE / "unavailable"
    said = f" (docker/ci-prepare.sh: {prepare.read_text().strip()})" if prepare.is_file() else ""
    if shutil.which("docker") is None:
        return "no docker CLI: run docker/ci-prepare.sh" + said
    try:
        info = _run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=20)
        if info.returncode != 0:
            return f"dockerd is not reachable ({info.stderr.strip().splitlines()[-1] if info.stderr.strip() else 'no answer'}){said}"
        if _run(["docker", "compose", "version"], timeout=20).returncode != 0:
            return "no docker compose plugin: run docker/ci-prepare.sh" + said
        if _run(["docker", "image", "inspect", BASE_IMAGE], timeout=20).returncode != 0:
            return f"no base image {BASE_IMAGE}: run docker/ci-prepare.sh" + said
    except subprocess.TimeoutExpired:
        return "the docker CLI did not answer within 20 s" + said
    if not any((ROOT / "docker" / "wheelhouse").glob("torch-*.whl")):
        return "docker/wheelhouse/ holds no torch wheel: run docker/ci-prepare.sh" + said
    return None


@dataclass
class Stack:
    """One compose project on free loopback ports, and every update it acknowledged."""

    project: str
    env: dict[str, str]
    ports: dict[str, int]
    acked: dict[int, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    next_id: int = DEMO_ROWS  # new IDs: the demo table holds 0 .. DEMO_ROWS-1
    volumes: set[str] = field(default_factory=set)
    positions: list[Position] = field(default_factory=list)  # the stream position of each acknowledged update

    def compose(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["docker", "compose", "-p", self.project]
        for f in COMPOSE_FILES:
            cmd += ["-f", str(ROOT / f)]
        done = _run(cmd + list(args), timeout=timeout, cwd=ROOT, env=self.env)
        if check and done.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def replica(self, n: int) -> str:
        return f"http://127.0.0.1:{self.ports[f'EMBSERVE_PORT_{n}']}"

    def container(self, service: str) -> str:
        return f"{self.project}-{service}-1"

    def inspect(self, service: str) -> dict[str, Any]:
        out = _run(["docker", "inspect", self.container(service)], timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)[0]

    def note_volumes(self) -> None:
        """Remembers the unnamed volumes (the image's VOLUME) of this project's containers:
        ``down --volumes`` removes those of the containers it removes, not of containers that an
        earlier ``down`` removed, so the teardown removes them by name."""
        ids = _run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"], timeout=30).stdout.split()
        if ids:
            for c in json.loads(_run(["docker", "inspect", *ids], timeout=30).stdout):
                self.volumes |= {m["Name"] for m in c["Mounts"] if m["Type"] == "volume" and re.fullmatch(r"[0-9a-f]{64}", m["Name"])}

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", timeout=60, check=False).stdout[-8000:]

    def wait_ready(self, n: int, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds until replica ``n`` answers /readyz with 200 (polls a real server)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if httpx.get(f"{self.replica(n)}/readyz", timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"replica {n} not ready within {timeout:.0f} s\n{self.logs()}")

    def wait_live(self, n: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Until replica ``n`` answers /healthz with 200 (for one expected to stay unready)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if httpx.get(f"{self.replica(n)}/healthz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"replica {n} not live within {timeout:.0f} s\n{self.logs()}")

    def probe_exit(self, service: str) -> int:
        """Exit status of the image's health check command, run in the service's container now."""
        return _run(["docker", "exec", self.container(service), "embserve", "probe", "/readyz"], timeout=60).returncode

    def lookup(self, n: int, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        r = httpx.post(f"{self.replica(n)}/v1/lookup", json={"lookups": [{"table": "demo", "ids": ids}]}, timeout=30.0)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        return np.asarray(result["embeddings"], dtype=np.float32).reshape(len(ids), DIM), np.asarray(result["found"])

    def update(self, n: int, count: int, wait: bool) -> list[int]:
        """Upserts ``count`` new IDs through replica ``n``; records them once acknowledged."""
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        vectors = np.random.default_rng(ids[0]).normal(size=(count, DIM)).astype(np.float32)
        r = httpx.post(
            f"{self.replica(n)}/v1/tables/demo/updates",
            params={"wait": "true" if wait else "false"},
            json={"upsert_ids": ids, "vectors": vectors.tolist()},
            headers={"authorization": f"Bearer {self.env['EMBSERVE_TOKEN']}"},
            timeout=30.0,
        )
        assert r.status_code == 200, r.text
        self.acked.update(zip(ids, vectors, strict=True))
        self.positions.append(_position(r.json()["position"]))
        return ids

    def snapshot(self, n: int) -> int:
        """Replica ``n`` snapshots the demo table now and trims; returns the entries it trimmed."""
        r = httpx.post(f"{self.replica(n)}/v1/admin/tables/demo/snapshot", headers={"authorization": f"Bearer {self.env['EMBSERVE_TOKEN']}"}, timeout=60.0)
        assert r.status_code == 200, r.text
        return int(r.json()["trimmed_entries"])

    def redis_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports["EMBSERVE_REDIS_PORT"], socket_timeout=10.0)

    def stream(self) -> list[Position]:
        """The positions of the entries the update log's stream still holds, oldest first."""
        with self.redis_client() as client:
            return [_position(entry_id) for entry_id, _ in client.xrange(STREAM, "-", "+")]

    def trim_records(self) -> set[str]:
        """The replica ids the trim coordinator holds a record for (service/updatelog/trim_coordinator.py)."""
        with self.redis_client() as client:
            return {k.decode() for k in client.hkeys(f"{STREAM}:replicas")}

    def wait_converged(self, n: int, timeout: float = 60.0) -> None:
        """Replica ``n`` serves every acknowledged update (compressed: close in direction)."""
        ids = sorted(self.acked)
        deadline = time.monotonic() + timeout
        while True:
            got, found = self.lookup(n, ids)
            if found.all():
                break
            assert time.monotonic() < deadline, f"replica {n}: {int((~found).sum())} of {len(ids)} acknowledged IDs missing"
            time.sleep(0.25)
        sent = np.stack([self.acked[i] for i in ids])
        cosine = (got * sent).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(sent, axis=1))
        assert cosine.min() > 0.9, f"replica {n}: an updated row does not match what was sent (cosine {cosine.min():.3f})"


def _gauge(stack: Stack, n: int, name: str) -> float:
    """One unlabelled gauge's value from replica ``n``'s /metrics."""
    text = httpx.get(f"{stack.replica(n)}/metrics", timeout=10.0).text
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert len(values) == 1, f"{name} not exported once by replica {n}"
    return values[0]


def _position(text: str | bytes) -> Position:
    ms, seq = (text.decode() if isinstance(text, bytes) else text).split("-")
    return int(ms), int(seq)


def _dump_timings(stack: Stack) -> None:
    print("\ndocker stack timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in stack.timings.items()))
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "last-test-timings.json").write_text(json.dumps(stack.timings, indent=1))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    reason = docker_unavailable()
    if reason is not None:
        pytest.skip(reason)
    ports = {name: free_port() for name in ("EMBSERVE_REDIS_PORT", "EMBSERVE_PORT_1", "EMBSERVE_PORT_2", "EMBSERVE_PROMETHEUS_PORT")}
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "EMBSERVE_TOKEN": secrets.token_hex(24),
        "EMBSERVE_DEMO_ROWS": str(DEMO_ROWS),
        "DOCKER_BUILDKIT": "0",  # the classic builder: no buildx plugin needed, --network host for apt
        "COMPOSE_PROGRESS": "plain",
    }
    stack = Stack(project=f"embserve-test-{os.getpid()}", env=env, ports=ports)
    try:
        started = time.monotonic()
        stack.compose("build", timeout=1200)
        stack.timings["build"] = time.monotonic() - started
        started = time.monotonic()
        stack.compose("up", "-d", "--no-build", timeout=900)
        stack.timings["up (redis healthy, seed job done, replicas started)"] = time.monotonic() - started
        stack.wait_ready(1)
        stack.wait_ready(2)
        stack.timings["up -> both replicas ready"] = time.monotonic() - started
        yield stack
    finally:
        _dump_timings(stack)
        stack.note_volumes()
        stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=300, check=False)
        leftover = [v for v in stack.volumes if _run(["docker", "volume", "inspect", v], timeout=30).returncode == 0]
        if leftover:
            _run(["docker", "volume", "rm", "--force", *leftover], timeout=120)


def test_the_image_holds_the_compiled_kernels(stack: Stack) -> None:
    """The build stage compiles the decoder library and its CPython entry (setup.py builds both
    as optional extensions, so a missing compiler or missing Python headers would only show up
    as a slow image): the running replica must have both."""
    check = "from compression.kernels import cpu_c; print(cpu_c.AVAILABLE, cpu_c.ENTRY_AVAILABLE, cpu_c.ENCODER_AVAILABLE)"
    out = _run(["docker", "exec", stack.container("embserve-1"), "python", "-c", check], timeout=60)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


def test_both_replicas_serve_lookups(stack: Stack) -> None:
    ids = [0, 1, 2, DEMO_ROWS - 1, DEMO_ROWS + 10_000_000]
    one, found_one = stack.lookup(1, ids)
    two, found_two = stack.lookup(2, ids)
    assert found_one.tolist() == found_two.tolist() == [True, True, True, True, False]
    # both seeded from the same file, no update yet: the same bits
    assert np.array_equal(one, two) and np.abs(one[:4]).sum() > 0


def test_an_update_through_one_is_visible_on_both(stack: Stack) -> None:
    ids = stack.update(1, 32, wait=True)
    _, found = stack.lookup(1, ids)  # wait=true: read-your-writes on the replica that took it
    assert found.all()
    stack.wait_converged(2)
    stack.update(2, 32, wait=False)  # and the other way round
    stack.wait_converged(1)
    stack.wait_converged(2)
    # the same stream applied to the same seed: both replicas hold the same bits
    ids = sorted(stack.acked)
    assert np.array_equal(stack.lookup(1, ids)[0], stack.lookup(2, ids)[0])


def _prometheus(stack: Stack, query: str) -> list[dict[str, Any]]:
    r = httpx.get(f"http://127.0.0.1:{stack.ports['EMBSERVE_PROMETHEUS_PORT']}/api/v1/query", params={"query": query}, timeout=10.0)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    return r.json()["data"]["result"]


def test_prometheus_scrapes_both_replicas(stack: Stack) -> None:
    expected = {f"127.0.0.1:{stack.ports['EMBSERVE_PORT_1']}", f"127.0.0.1:{stack.ports['EMBSERVE_PORT_2']}"}
    deadline = time.monotonic() + 90.0  # scrape interval 5 s; Prometheus itself starts after the replicas
    while True:
        try:
            up = {s["metric"]["instance"] for s in _prometheus(stack, 'up{job="embserve"} == 1')}
            applied = {s["metric"]["instance"] for s in _prometheus(stack, 'sum by (instance) (embserve_updates_applied_total{table="demo"}) > 0')}
        except httpx.TransportError:
            up = applied = set()
        if up == expected and applied == expected:
            break
        assert time.monotonic() < deadline, f"Prometheus sees up={sorted(up)}, updates applied on {sorted(applied)}; expected {sorted(expected)}"
        time.sleep(1.0)
    r = httpx.get(f"http://127.0.0.1:{stack.ports['EMBSERVE_PROMETHEUS_PORT']}/api/v1/rules", timeout=10.0)
    assert r.status_code == 200 and r.json()["data"]["groups"], "the recording and alerting rules did not load"


def test_a_killed_replica_is_restarted_and_converges(stack: Stack) -> None:
    # A crash (what the OOM killer does): SIGKILL to the replica's process.  The restart policy
    # (unless-stopped) brings the same container back; it reloads its own tables folder and
    # replays the stream from there, including what was written while it was down.
    before = stack.inspect("embserve-2")
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    killed = time.monotonic()
    stack.update(1, 16, wait=True)
    while stack.inspect("embserve-2")["RestartCount"] <= before["RestartCount"]:
        assert time.monotonic() < killed + 60.0, "the restart policy did not restart the killed replica"
        time.sleep(0.25)
    stack.wait_ready(2)
    stack.timings["SIGKILL -> restarted replica ready"] = time.monotonic() - killed
    stack.wait_converged(2)

    # `docker kill` is a manual stop to Docker: no restart policy applies, by design.  The
    # operator's `docker compose up -d` starts it again, and it converges the same way.
    assert _run(["docker", "kill", stack.container("embserve-1")]).returncode == 0
    assert stack.inspect("embserve-1")["State"]["Running"] is False
    stack.update(2, 16, wait=True)
    started = time.monotonic()
    stack.compose("up", "-d", "--no-build", "embserve-1")
    stack.wait_ready(1)
    stack.timings["docker kill, compose up -> replica ready"] = time.monotonic() - started
    stack.wait_converged(1)


def test_down_and_up_with_trimming_keeps_every_acknowledged_update(stack: Stack) -> None:
    # docker-compose.yml trims the stream (EMBSERVE_TRIM_LOG=true); each replica keeps its tables
    # in a named volume of its own and its trim record under a fixed EMBSERVE_REPLICA_ID.
    stack.update(1, 16, wait=False)
    stack.update(2, 16, wait=False)
    stack.wait_converged(1)
    stack.wait_converged(2)
    # Both snapshot: the first trims nothing the other still needs, the second trims behind both
    # (every entry so far); no acknowledged update is left in the stream.
    trimmed = stack.snapshot(1) + stack.snapshot(2)
    snapshotted = stack.positions[-1]
    assert trimmed > 0 and not [p for p in stack.stream() if p <= snapshotted], stack.stream()
    # Replica 2 stops (a clean stop: it snapshots, and its record stays): what replica 1 takes
    # now is held in the stream for it, through replica 1's own snapshot and trim at `down`.
    stack.compose("stop", "--timeout", "30", "embserve-2")
    stack.update(1, 16, wait=True)
    held = stack.positions[-1]
    started = time.monotonic()
    stack.note_volumes()
    stack.compose("down", "--timeout", "30")  # keeps the named volumes: Redis's AOF, the seed, tables-1/-2
    stack.compose("up", "-d", "--no-build", timeout=900)
    stack.wait_ready(1)
    stack.wait_ready(2)
    stack.timings["down, up -> both replicas ready"] = time.monotonic() - started
    # New containers, the same volumes: each resumes from its own snapshot.  The stream holds only
    # the entry replica 2 had not applied (nothing trims until a snapshot), so every other
    # acknowledged update is served from the replicas' tables volumes, none from the stream.
    assert stack.stream() == [held]
    stack.wait_converged(1)
    stack.wait_converged(2)
    ids = sorted(stack.acked)
    assert len(ids) == 32 + 32 + 16 + 16 + 16 + 16 + 16
    assert np.array_equal(stack.lookup(1, ids)[0], stack.lookup(2, ids)[0])
    # the same two records (fixed ids, not one per container), and nobody missed anything
    assert stack.trim_records() == {"embserve-1", "embserve-2"}
    assert MISSED not in stack.compose("logs", "--no-color", "embserve-1", "embserve-2", timeout=60).stdout
    # trimming goes on after the restart: both snapshot, and the held entry goes too
    stack.snapshot(1)
    stack.snapshot(2)
    assert stack.stream() == []


def test_a_replica_whose_volume_is_lost_is_held_out_of_readiness(stack: Stack) -> None:
    # What the top of docker-compose.yml warns about: without its volume a replica starts from
    # the seed, which lacks every update, and the stream was trimmed of them.  It says so, and
    # takes no traffic: /readyz 503 (its health check fails) until an operator re-seeds it.
    stack.compose("rm", "--stop", "--force", "embserve-2")
    gone = _run(["docker", "volume", "rm", f"{stack.project}_tables-2"], timeout=60)
    assert gone.returncode == 0, gone.stderr
    stack.compose("up", "-d", "--no-build", "embserve-2")
    stack.wait_live(2)
    assert MISSED in stack.compose("logs", "--no-color", "embserve-2", timeout=60).stdout
    r = httpx.get(f"{stack.replica(2)}/readyz", timeout=10.0)
    assert r.status_code == 503 and r.json()["error"]["code"] == "update_log_gap", r.text
    assert "re-seed" in r.json()["error"]["message"]
    assert _gauge(stack, 2, "embserve_update_log_gap") == 1.0 and _gauge(stack, 1, "embserve_update_log_gap") == 0.0
    # the image's health check (`embserve probe /readyz`) fails on it and passes on the other
    assert stack.probe_exit("embserve-2") != 0 and stack.probe_exit("embserve-1") == 0
    assert stack.inspect("embserve-2")["State"]["Health"]["Status"] != "healthy"  # "starting", then "unhealthy"
    assert httpx.get(f"{stack.replica(1)}/readyz", timeout=10.0).status_code == 200
    _, found = stack.lookup(2, sorted(stack.acked))
    assert not found.any()  # the seed's table, none of the trimmed updates
    assert stack.trim_records() == {"embserve-1", "embserve-2"}
