"""End to end: a real `embserve serve` process (uvicorn) on a free port, called over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from compression import compress, load_table, save_table
from compression.synthetic import synthetic_table, zipf_frequencies
from service.wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE, ParsedLookup, decode_binary_response, encode_binary_request

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0, path: str = "/readyz") -> None:
    """Poll ``path`` until 200: ``/readyz`` by default, ``/healthz`` for a server expected to stay unready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}{path}", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a real process for readiness, not synchronizing on a sleep
    raise TimeoutError(f"server did not answer {path} with 200")


@contextmanager
def serving_process(tables: Path, env_extra: dict[str, str], wait_path: str = "/readyz") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `embserve serve` on a free port for the block: its base URL once it is ready (once
    ``wait_path`` answers 200), and the process (for tests that signal or measure it); SIGTERM at
    the end, SIGKILL after 20 s."""
    port = free_port()
    env = {**os.environ, "EMBSERVE_TABLES_DIR": str(tables), "EMBSERVE_PORT": str(port), **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, path=wait_path)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def serving(tables: Path, env_extra: dict[str, str], wait_path: str = "/readyz") -> Iterator[str]:
    """:func:`serving_process`, the base URL only."""
    with serving_process(tables, env_extra, wait_path) as (base, _):
        yield base


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("tables")
    freqs = zipf_frequencies(50_000, seed=5)
    rows = synthetic_table(50_000, 64, freqs, seed=5)
    table, _ = compress(rows, freqs, ratio=8)
    save_table(table, folder / "items.safetensors")
    (folder / "broken.safetensors").write_bytes(b"garbage")
    with serving(folder, {"EMBSERVE_MAX_IDS_PER_REQUEST": "100000"}) as base:
        yield base, folder


def test_json_and_binary_lookups_over_http(server: tuple[str, Path]) -> None:
    base, folder = server
    reference, _ = load_table(folder / "items.safetensors")
    ids = np.array([0, 17, 49_999, 50_000, -3], dtype=np.int64)
    expected = reference.lookup(torch.from_numpy(ids)).values.numpy()
    with httpx.Client(base_url=base, timeout=10.0) as client:
        r = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": ids.tolist()}]})
        assert r.status_code == 200
        res = r.json()["results"][0]
        assert np.array_equal(np.asarray(res["embeddings"], dtype=np.float32), expected)
        assert res["found"] == [True, True, True, False, False]

        body = encode_binary_request([ParsedLookup("items", ids, None, "none")])
        r = client.post("/v1/lookup", content=body, headers={"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE})
        ((values, found, unknown),) = decode_binary_response(r.content)
        assert np.array_equal(values, expected) and unknown == 2

        big = np.random.default_rng(0).integers(0, 50_000, 65_536)
        r = client.post("/v1/lookup", content=encode_binary_request([ParsedLookup("items", big, None, "none")]),
                        headers={"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE})
        ((values, found, _),) = decode_binary_response(r.content)
        assert values.shape == (65_536, 64) and bool(found.all())
        assert np.array_equal(values[:100], reference.lookup(torch.from_numpy(big[:100])).values.numpy())


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: tuple[str, Path]) -> None:
    base, _ = server
    with httpx.Client(base_url=base, timeout=10.0) as client:
        bad = [
            client.post("/v1/lookup", content=b"{oops", headers={"content-type": "application/json"}),
            client.post("/v1/lookup", json={"lookups": [{"table": "nope", "ids": [1]}]}),
            client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": list(range(100_001))}]}),
            client.post("/v1/lookup", content=b"EMQ1\x01\x00\x00\x00\x00", headers={"content-type": BINARY_REQUEST_TYPE}),
            client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [1, 2], "offsets": [0, 5], "pooling": "sum"}]}),
        ]
        assert [r.status_code for r in bad] == [400, 404, 413, 400, 422]
        assert all("error" in r.json() for r in bad)
        ok = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [1]}]})
        assert ok.status_code == 200
        ready = client.get("/readyz").json()
        assert ready["tables"] == ["items"] and "broken.safetensors" in ready["load_errors"]
        assert client.get("/v1/tables/items").json()["compression_ratio"] >= 7.9
        metrics = client.get("/metrics").text
        assert 'embserve_http_request_errors_total{route="/v1/lookup",status="413"} 1.0' in metrics
