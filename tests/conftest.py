"""Shared fixtures: small but realistic tables (trained-like rows, Zipf frequencies)."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run interpreted on CPU tensors; the flag is read when a
# kernel is defined, so it must be set before anything imports compression.kernels.triton_decode.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from compression import compress
from compression.synthetic import synthetic_table, zipf_frequencies


@pytest.fixture(scope="session")
def zipf_rows() -> tuple[torch.Tensor, torch.Tensor]:
    freqs = zipf_frequencies(20_000, seed=1)
    return synthetic_table(20_000, 32, freqs, seed=1), freqs


@pytest.fixture(scope="session")
def mixed_table(zipf_rows):  # type: ignore[no-untyped-def]
    rows, freqs = zipf_rows
    table, _ = compress(rows, freqs, ratio=10, unknown="default")
    return table


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real redis-server on a free loopback port, AOF on and fsynced on every write."""
    import shutil
    import subprocess

    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes",
         "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(200):  # wait for the server to accept connections
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    raise RuntimeError("redis-server exited") from None
                import time

                time.sleep(0.02)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis"])
def update_log(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    """Each update-log implementation, empty."""
    import uuid

    from service.updatelog import open_log

    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        log = open_log(url, tmp_path / "unused.sqlite3", stream=f"test:{uuid.uuid4().hex}")
    else:
        log = open_log(None, tmp_path / "updates.sqlite3")
    yield log
    log.close()
