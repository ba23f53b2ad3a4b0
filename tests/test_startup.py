"""Start-up as an operator meets it, with real server processes: a signal while tables load stops
the process, a missing tables folder is created and logged, and ``EmbeddingClient.ready()`` can be
polled while a server comes up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compression import save_table
from compression.allocation import compress_uniform
from compression.layout import RowClass
from service.client import EmbeddingClient
from tests.test_e2e import free_port

pytestmark = pytest.mark.e2e


def _start(tables: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "EMBSERVE_TABLES_DIR": str(tables), "EMBSERVE_PORT": str(port)}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sigint_while_tables_load_stops_the_process(tmp_path: Path) -> None:
    folder = tmp_path / "tables"
    table = compress_uniform(torch.randn(100_000, 64, generator=torch.Generator().manual_seed(1)), RowClass(64, 32))
    save_table(table, folder / "t000.safetensors")
    total = 120
    for k in range(1, total):  # many tables (hard links: no disk) that take a while to load in all
        os.link(folder / "t000.safetensors", folder / f"t{k:03d}.safetensors")
    proc = _start(folder, free_port())
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "loaded table" in line:  # loading has begun: interrupt it
                proc.send_signal(signal.SIGINT)
                break
        proc.wait(timeout=30)
        seen.extend(proc.stderr.readlines())
    finally:
        _stop(proc)
    log = "".join(seen)
    assert proc.returncode == -signal.SIGINT, log  # before: 0, after loading everything and binding the port
    assert "SIGINT while loading tables: stopping before serving" in log
    assert "startup complete" not in log and "Uvicorn running" not in log
    assert log.count("loaded table") < total


def test_a_missing_tables_folder_is_created_and_logged(tmp_path: Path) -> None:
    folder = tmp_path / "not" / "there"
    port = free_port()
    proc = _start(folder, port)
    try:
        with EmbeddingClient(f"http://127.0.0.1:{port}", timeout=2) as client:
            deadline = time.monotonic() + 60
            while not client.ready():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)  # polling a real process for readiness
    finally:
        _stop(proc)
    assert folder.is_dir()
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert f"tables folder {folder} did not exist: created it, empty" in log


def test_client_ready_can_wait_for_a_server_that_is_not_up_yet(tmp_path: Path) -> None:
    port = free_port()
    with EmbeddingClient(f"http://127.0.0.1:{port}", timeout=2) as client:
        assert client.ready() is False  # refused: nothing listens yet
        assert client.ready() is False  # and again on the same connection (was CannotSendRequest)
        (tmp_path / "tables").mkdir()
        proc = _start(tmp_path / "tables", port)
        try:
            deadline = time.monotonic() + 60
            while not client.ready():
                assert proc.poll() is None, "server exited"
                assert time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.05)  # polling a real process for readiness
            assert client.tables() == []
        finally:
            _stop(proc)
