"""Pruned rows on the wire: the binary status byte (0 unknown, 1 found, 2 pruned), the JSON and
KServe v2 ``pruned`` counts, and the client's view of them; the unknown-ID policy fills them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from compression import RowClass, build_table
from compression.unknown import build_unknown_policy
from service.app import create_app
from service.client import _lookup_answer
from service.registry import TableRegistry
from service.settings import Settings
from service.wire import (
    BINARY_REQUEST_TYPE,
    BINARY_RESPONSE_TYPE,
    ParsedLookup,
    decode_binary_response,
    decode_binary_statuses,
    encode_binary_request,
)

LOOPBACK = ("127.0.0.1", 50000)
ROWS = torch.randn(100, 8, generator=torch.Generator().manual_seed(4))


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    cls = torch.zeros(100, dtype=torch.int64)
    cls[50:] = 1  # IDs 50..99 pruned
    policy = build_unknown_policy("hashed", ROWS, torch.arange(100), torch.ones(100), num_buckets=16)
    registry = TableRegistry("cpu")
    registry.add("t", build_table(ROWS, cls, [RowClass(8, 32), RowClass(0, 32)], unknown=policy, index="runs"))
    app = create_app(Settings(tables_dir=tmp_path), registry)
    with TestClient(app, client=LOOPBACK) as c:
        assert app.state.embserve.applier.wait_caught_up(10)
        c.policy = policy  # type: ignore[attr-defined]
        yield c


IDS = [3, 60, 1000, 99]


def test_json_reports_pruned_ids_and_serves_the_policy_row(client: TestClient) -> None:
    r = client.post("/v1/lookup", json={"lookups": [{"table": "t", "ids": IDS}]})
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    assert res["found"] == [True, False, False, False]
    assert res["unknown"] == 1 and res["pruned"] == 2
    expected = client.policy.rows(torch.tensor([60, 1000, 99])).numpy()  # type: ignore[attr-defined]
    assert np.allclose(np.asarray(res["embeddings"][1:], dtype=np.float32), expected)
    assert np.allclose(res["embeddings"][0], ROWS[3].numpy())
    (emb,) = _lookup_answer(200, r.content, binary=False, dtypes=[None])
    assert emb.pruned == 2 and emb.found.tolist() == [True, False, False, False]


@pytest.mark.parametrize("repeat", [1, 3], ids=["4 IDs", "12 IDs"])  # status bytes from a list up to 8 IDs, numpy above
def test_binary_status_byte_says_unknown_found_or_pruned(client: TestClient, repeat: int) -> None:
    body = encode_binary_request([ParsedLookup("t", np.asarray(IDS * repeat, dtype=np.int64), None, "none")])
    r = client.post("/v1/lookup", content=body, headers={"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE})
    assert r.status_code == 200
    ((values, status, unknown),) = decode_binary_statuses(r.content)
    assert status.tolist() == [1, 2, 0, 2] * repeat and unknown == repeat
    ((_, found, _),) = decode_binary_response(r.content)
    assert found.tolist() == [True, False, False, False] * repeat
    (emb,) = _lookup_answer(200, r.content, binary=True, dtypes=[None])
    assert emb.status is not None and emb.status.tolist() == [1, 2, 0, 2] * repeat
    assert emb.pruned == 2 * repeat and emb.found.tolist() == [True, False, False, False] * repeat


def test_v2_infer_carries_the_pruned_count(client: TestClient) -> None:
    req = {"inputs": [{"name": "ids", "datatype": "INT64", "shape": [4], "data": IDS}]}
    r = client.post("/v2/models/t/infer", content=orjson.dumps(req), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"] == {"pruned": 2}
    found = next(o for o in body["outputs"] if o["name"] == "found")
    assert found["data"] == [True, False, False, False]
