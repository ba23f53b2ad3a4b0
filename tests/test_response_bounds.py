"""Bounded responses against a real server process: a lookup whose answer would exceed
``EMBSERVE_MAX_RESPONSE_BYTES`` is refused with 413 before any row is decoded (v1 JSON and
binary, v2 JSON and binary), and a large allowed answer does not cost the process several copies
of itself (peak RSS read from ``/proc/<pid>/status``)."""

from __future__ import annotations

import http.client
import re
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch

from compression import save_table
from compression.allocation import compress_uniform
from compression.layout import RowClass
from service.wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE, ParsedLookup, decode_binary_response, encode_binary_request
from tests.test_e2e import serving_process as server

pytestmark = pytest.mark.e2e

DIM = 256
ROWS = 4000
CAP = 1 << 20  # 1 MiB: 1024 binary rows of 256 float32, ~315 JSON rows


def _table_dir(tmp_path: Path, rows: int, dim: int, bits: int = 8) -> Path:
    folder = tmp_path / "tables"
    gen = torch.Generator().manual_seed(3)
    table = compress_uniform(torch.randn(rows, dim, generator=gen), RowClass(dim, bits))
    save_table(table, folder / "wide.safetensors")
    return folder


def _ids_looked_up(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    match = re.search(r'^embserve_lookup_ids_total\{table="wide"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def _binary_lookup(base: str, ids: np.ndarray, offsets: np.ndarray | None = None, pooling: str = "none") -> httpx.Response:
    body = encode_binary_request([ParsedLookup("wide", ids, offsets, pooling)])  # type: ignore[arg-type]
    return httpx.post(f"{base}/v1/lookup", content=body, headers={"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}, timeout=30)


def _infer_binary(base: str, ids: np.ndarray) -> httpx.Response:
    head = orjson.dumps({
        "inputs": [{"name": "ids", "shape": [len(ids)], "datatype": "INT64", "parameters": {"binary_data_size": 8 * len(ids)}}],
        "parameters": {"binary_data_output": True},
    })
    return httpx.post(f"{base}/v2/models/wide/infer", content=head + ids.astype("<i8").tobytes(),
                      headers={"inference-header-content-length": str(len(head))}, timeout=30)


def test_over_the_response_cap_is_413_and_nothing_is_decoded(tmp_path: Path) -> None:
    folder = _table_dir(tmp_path, ROWS, DIM)
    with server(folder, {"EMBSERVE_MAX_RESPONSE_BYTES": str(CAP)}) as (base, _):
        ids = np.arange(2000, dtype=np.int64)  # 2000 x 256 x 4 = 2 MB binary, well under the ID limit
        before = _ids_looked_up(base)
        refused = [
            _binary_lookup(base, ids),
            httpx.post(f"{base}/v1/lookup", json={"lookups": [{"table": "wide", "ids": ids[:500].tolist()}]}, timeout=30),
            _infer_binary(base, ids),
            httpx.post(f"{base}/v2/models/wide/infer", json={"inputs": [{"name": "ids", "shape": [500], "datatype": "INT64",
                                                                        "data": ids[:500].tolist()}]}, timeout=30),
        ]
        for response in refused:
            assert response.status_code == 413, response.text
            assert f"{CAP:,}" in response.text and "EMBSERVE_MAX_RESPONSE_BYTES" in response.text
        assert refused[0].json()["error"]["code"] == "too_large"  # v1: the project's error shape
        assert "~13" not in refused[0].text and "binary format" in refused[1].text  # JSON refusals point at binary
        assert "error" in refused[2].json() and isinstance(refused[2].json()["error"], str)  # v2: the protocol's shape
        assert _ids_looked_up(base) == before  # refused before any row was decoded

        # the same IDs fit as binary at 500, and pooled into 10 bags (10 rows, not 2000)
        ok = _binary_lookup(base, ids[:500])
        assert ok.status_code == 200
        assert decode_binary_response(ok.content)[0][0].shape == (500, DIM)
        pooled = _binary_lookup(base, ids, np.arange(0, 2000, 200, dtype=np.int64), "sum")
        assert pooled.status_code == 200, pooled.text
        assert decode_binary_response(pooled.content)[0][0].shape == (10, DIM)
        assert _ids_looked_up(base) == before + 2500


def _status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB$", text, re.M).group(1))  # type: ignore[union-attr]


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0: ``5`` to clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _drain(base: str, body: bytes, headers: dict[str, str], path: str = "/v1/lookup") -> int:
    """POST and read the answer in small pieces (the client's memory is not what is measured)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200
        total = 0
        while chunk := response.read(1 << 20):
            total += len(chunk)
        return total
    finally:
        conn.close()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_large_allowed_answer_costs_about_one_copy_of_itself(tmp_path: Path) -> None:
    rows, dim = 8000, 512
    folder = _table_dir(tmp_path, rows, dim)
    with server(folder, {}) as (base, proc):
        gen = np.random.default_rng(0)
        binary_headers = {"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}
        # warm up: every row once (mmap'd slabs resident), allocator arenas in use
        for start in range(0, rows, 1000):
            _drain(base, encode_binary_request([ParsedLookup("wide", np.arange(start, start + 1000), None, "none")]), binary_headers)
        if not _reset_peak(proc.pid):
            pytest.skip("cannot reset VmHWM (/proc/<pid>/clear_refs)")

        ids = gen.integers(0, rows, 48_000)  # 48k x 512 x 4 = 98 MB of float32
        rss = _status_kib(proc.pid, "VmRSS")
        size = _drain(base, encode_binary_request([ParsedLookup("wide", ids, None, "none")]), binary_headers)
        grew = (_status_kib(proc.pid, "VmHWM") - rss) * 1024
        assert size > 98_000_000
        print(f"binary: answer {size / 1e6:.0f} MB, peak RSS grew {grew / 1e6:.0f} MB ({grew / size:.2f}x)")
        assert grew < 1.6 * size  # the values once, plus slices; it was ~3x (tobytes + join + transport buffer)

        _reset_peak(proc.pid)
        ids = gen.integers(0, rows, 12_000)  # ~12k x 512 x 12.5 = 77 MB of JSON
        rss = _status_kib(proc.pid, "VmRSS")
        body = orjson.dumps({"lookups": [{"table": "wide", "ids": ids.tolist()}]})
        size = _drain(base, body, {"content-type": "application/json"})
        grew = (_status_kib(proc.pid, "VmHWM") - rss) * 1024
        print(f"JSON: answer {size / 1e6:.0f} MB, peak RSS grew {grew / 1e6:.0f} MB ({grew / size:.2f}x)")
        assert grew < 0.8 * size  # the decoded float32 (~4/13 of the JSON) plus a slice; it was ~1.4x
