"""The HTTP API through the ASGI app (in process): every endpoint, both wire formats, bad input."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient

from compression import CompressedTable, RowClass, compress_uniform
from service.app import create_app
from service.registry import TableRegistry
from service.settings import Settings
from service.wire import (

    BINARY_REQUEST_TYPE,
    BINARY_RESPONSE_TYPE,
    ParsedLookup,
    decode_binary_response,
    encode_binary_request,
)

# in-process calls come from a loopback peer, like a developer on the same host: writes need no token then
LOOPBACK = ("127.0.0.1", 50000)

ROWS = torch.randn(1000, 16, generator=torch.Generator().manual_seed(3))


@pytest.fixture()
def tables(mixed_table: CompressedTable) -> TableRegistry:
    registry = TableRegistry("cpu")
    registry.add("items", compress_uniform(ROWS, RowClass(16, 32)))
    registry.add("users", mixed_table)
    return registry


@pytest.fixture()
def client(tables: TableRegistry, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(tables_dir=tmp_path, max_ids_per_request=5000, max_body_bytes=200_000, max_lookups_per_request=4)
    app = create_app(settings, tables)
    with TestClient(app, client=LOOPBACK) as c:
        assert app.state.embserve.applier.wait_caught_up(10)
        yield c


def lookup(client: TestClient, *items: dict) -> dict:  # type: ignore[type-arg]
    r = client.post("/v1/lookup", json={"lookups": list(items)})
    assert r.status_code == 200, r.text
    return r.json()


def test_json_lookup_returns_rows_and_found_flags(client: TestClient) -> None:
    body = lookup(client, {"table": "items", "ids": [3, 999, 1000, -1]})
    (res,) = body["results"]
    assert res["shape"] == [4, 16]
    assert res["found"] == [True, True, False, False]
    assert res["unknown"] == 2
    assert np.allclose(res["embeddings"][0], ROWS[3].numpy())
    assert res["embeddings"][2] == [0.0] * 16


def test_several_tables_in_one_request(client: TestClient, mixed_table: CompressedTable) -> None:
    body = lookup(client, {"table": "items", "ids": [1]}, {"table": "users", "ids": [5, 6]})
    assert [r["table"] for r in body["results"]] == ["items", "users"]
    expected = mixed_table.lookup(torch.tensor([5, 6])).values.numpy()
    assert np.array_equal(np.asarray(body["results"][1]["embeddings"], dtype=np.float32), expected)


def test_pooled_lookup(client: TestClient) -> None:
    body = lookup(client, {"table": "items", "ids": [1, 2, 3], "offsets": [0, 2], "pooling": "mean"})
    res = body["results"][0]
    assert res["shape"] == [2, 16]
    assert np.allclose(res["embeddings"][0], ((ROWS[1] + ROWS[2]) / 2).numpy(), atol=1e-6)
    assert res["found"] == [True, True, True]


def test_binary_request_and_response(client: TestClient) -> None:
    ids = np.array([7, 8, 5000], dtype=np.int64)
    body = encode_binary_request([ParsedLookup("items", ids, None, "none"), ParsedLookup("items", ids, np.array([0, 1]), "sum")])
    r = client.post("/v1/lookup", content=body, headers={"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE})
    assert r.status_code == 200 and r.headers["content-type"] == BINARY_RESPONSE_TYPE
    (values, found, unknown), (pooled, _, _) = decode_binary_response(r.content)
    assert values.shape == (3, 16) and values.dtype == np.float32
    assert np.array_equal(values[:2], ROWS[7:9].numpy())
    assert found.tolist() == [True, True, False] and unknown == 1
    assert np.allclose(pooled[1], ROWS[8].numpy())


def test_json_in_binary_out(client: TestClient) -> None:
    r = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [2]}]}, headers={"accept": "application/octet-stream"})
    ((values, found, unknown),) = decode_binary_response(r.content)
    assert np.array_equal(values[0], ROWS[2].numpy()) and unknown == 0


def test_tables_catalogue(client: TestClient, mixed_table: CompressedTable) -> None:
    listing = client.get("/v1/tables").json()["tables"]
    assert [t["name"] for t in listing] == ["items", "users"]
    users = client.get("/v1/tables/users").json()
    stats = mixed_table.stats()
    assert users["bytes"] == mixed_table.nbytes
    assert users["ids"] == 20_000 and users["dim"] == 32
    assert sum(c["rows"] for c in users["classes"]) == 20_000
    assert users["compression_ratio"] == pytest.approx(stats.compression_ratio)
    assert users["bits_per_parameter"] == pytest.approx(8 * mixed_table.nbytes / (20_000 * 32))
    assert client.get("/v1/tables/nope").status_code == 404


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["tables"] == ["items", "users"]


def test_readyz_is_503_until_tables_load(tables: TableRegistry, tmp_path: Path) -> None:
    app = create_app(Settings(tables_dir=tmp_path), tables)
    tables.ready = False
    with TestClient(app, client=LOOPBACK) as c:  # lifespan with a given registry marks it ready
        tables.ready = False
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_metrics_exposition(client: TestClient) -> None:
    lookup(client, {"table": "items", "ids": [1, 2, 5000]})
    client.get("/v1/tables/nope")
    text = client.get("/metrics").text
    assert 'embserve_lookup_ids_total{table="items"} 3.0' in text
    assert 'embserve_lookup_unknown_ids_total{table="items"} 1.0' in text
    assert 'embserve_http_requests_total{method="POST",route="/v1/lookup",status="200"} 1.0' in text
    assert 'embserve_http_request_errors_total{route="/v1/tables/{name}",status="404"} 1.0' in text
    assert 'embserve_table_bytes{table="items"}' in text
    assert 'embserve_table_class_rows{row_class="d16b32",table="items"} 1000.0' in text
    assert "embserve_lookup_duration_seconds_bucket" in text
    assert "_created" not in text


BAD_JSON_BODIES = [
    (b"{not json", 400),
    (b"[]", 422),
    (b'{"lookups": []}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1.5]}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [true]}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": ["1"]}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [9223372036854775808]}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1], "extra": 1}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1], "pooling": "max"}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1, 2], "pooling": "sum"}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1, 2], "offsets": [0, 1]}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1, 2], "offsets": [1], "pooling": "sum"}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1, 2], "offsets": [0, 3], "pooling": "sum"}]}', 422),
    (b'{"lookups": [{"table": "items", "ids": [1, 2], "offsets": [0, 2, 1], "pooling": "sum"}]}', 422),
    (b'{"lookups": [{"table": "nope", "ids": [1]}]}', 404),
    (b'{"lookups": [{"table": "../../etc/passwd", "ids": [1]}]}', 404),
    (orjson.dumps({"lookups": [{"table": "items", "ids": list(range(5001))}]}), 413),
    (orjson.dumps({"lookups": [{"table": "items", "ids": [1]}] * 5}), 413),
]


@pytest.mark.parametrize(("body", "status"), BAD_JSON_BODIES)
def test_bad_json_requests_get_4xx_json_errors_and_change_nothing(client: TestClient, body: bytes, status: int) -> None:
    r = client.post("/v1/lookup", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["message"]
    assert "embserve_lookup_ids_total{" not in client.get("/metrics").text  # nothing was looked up
    assert lookup(client, {"table": "items", "ids": [1]})["results"][0]["found"] == [True]


def _binary(entries: list[ParsedLookup]) -> bytes:
    return encode_binary_request(entries)


BAD_BINARY_BODIES = [
    b"",
    b"EMQ1",
    b"XXXX\x01\x00\x00\x00",
    b"EMQ1\x00\x00\x00\x00",
    _binary([ParsedLookup("items", np.arange(3), None, "none")])[:-4],
    _binary([ParsedLookup("items", np.arange(3), None, "none")]) + b"\0",
    b"EMQ1\x01\x00\x00\x00" + b"\x05\x00\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00items",
    b"EMQ1\x01\x00\x00\x00" + b"\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xff\xfe" + b"\0" * 8,
]


@pytest.mark.parametrize("body", BAD_BINARY_BODIES)
def test_malformed_binary_bodies_get_400(client: TestClient, body: bytes) -> None:
    r = client.post("/v1/lookup", content=body, headers={"content-type": BINARY_REQUEST_TYPE})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "malformed_body"


def test_oversized_and_unsupported_bodies(client: TestClient) -> None:
    r = client.post("/v1/lookup", content=b"x" * 200_001, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/v1/lookup", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/lookup", content=b"ids=1", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert client.get("/v1/lookup").status_code == 405
    assert client.get("/no/such/route").json()["error"]["status"] == 404


def test_openapi_documents_both_body_types(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/v1/lookup"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", BINARY_REQUEST_TYPE}
    # every $ref in the document resolves
    text = orjson.dumps(spec).decode()
    for ref in set(re.findall(r'"#/components/schemas/([A-Za-z0-9_]+)"', text)):
        assert ref in spec["components"]["schemas"], ref
    assert "LookupItem" in spec["components"]["schemas"]


def test_lookup_fast_path_keeps_metrics_limits_and_routing(client: TestClient) -> None:
    """POST /v1/lookup is answered by LookupFastPath, outside FastAPI's router: it must still be
    counted under its route template, and other methods still reach the router."""
    r = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [1, 2]}]})
    assert r.status_code == 200
    assert client.post("/v1/lookup", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    metrics = client.get("/metrics").text
    assert 'embserve_http_requests_total{method="POST",route="/v1/lookup",status="200"}' in metrics
    assert 'embserve_http_requests_total{method="POST",route="/v1/lookup",status="400"}' in metrics
    assert client.get("/v1/lookup").status_code == 405


def test_every_lookup_feeds_the_frequency_sketch(client: TestClient) -> None:
    """Binary batch-1 lookups hand the applier their IDs' bytes, JSON and larger ones arrays: the
    sketch that drives the allocator counts every looked-up ID either way."""
    state = client.app.state.embserve  # type: ignore[attr-defined]
    headers = {"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}
    for ids in [[7]] * 30 + [[9, 9, 11]] * 5:
        body = encode_binary_request([ParsedLookup("items", np.asarray(ids, dtype=np.int64), None, "none")])
        assert client.post("/v1/lookup", content=body, headers=headers).status_code == 200
    lookup(client, {"table": "items", "ids": [7, 11]})
    state.applier.step()  # drains what was queued (the applier's own thread may have already)
    estimate = state.tables.get("items").sketch.estimate(torch.tensor([7, 9, 11, 500])).tolist()
    assert estimate == pytest.approx([31, 10, 6, 0], rel=1e-2)  # a one-hour half-life: ten seconds decay 0.2%


def test_a_table_replaced_or_removed_under_the_same_request_is_answered_anew(client: TestClient, tables: TableRegistry) -> None:
    """A binary batch-1 answer is planned once per request head (table name, ID count): the plan
    must follow the registry - another table under that name, another dimension, or none."""
    headers = {"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}
    body = encode_binary_request([ParsedLookup("items", np.asarray([3], dtype=np.int64), None, "none")])

    def values() -> np.ndarray:
        r = client.post("/v1/lookup", content=body, headers=headers)
        assert r.status_code == 200, r.text
        return decode_binary_response(r.content)[0][0]

    assert np.array_equal(values(), ROWS[3:4].numpy())
    assert np.array_equal(values(), ROWS[3:4].numpy())  # planned now
    tables.add("items", compress_uniform(ROWS[:, :8] * 2, RowClass(8, 32)))
    assert np.array_equal(values(), ROWS[3:4, :8].numpy() * 2)
    tables.remove("items")
    r = client.post("/v1/lookup", content=body, headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_table"


def test_binary_lookup_bytes_wait_bounded_and_none_is_lost_across_rounds(client: TestClient) -> None:
    """The request path hands the applier IDs' bytes per table; a round takes what is there,
    what comes after waits for the next, and at most _SMALL_SLICES_MAX small slices (batch-1
    lookups) or _LOOKUP_QUEUE_MAX larger ones wait per table."""
    from service.applier import _LOOKUP_QUEUE_MAX, _SMALL_SLICES_MAX

    state = client.app.state.embserve  # type: ignore[attr-defined]
    applier = state.applier
    applier.stop()  # rounds driven here, one at a time
    sketch = state.tables.get("items").sketch
    one = np.asarray([42], dtype="<i8").tobytes()
    for _ in range(3 * _SMALL_SLICES_MAX):
        applier.record_lookup_bytes("items", one)
    applier.step()
    assert sketch.estimate(torch.tensor([42])).item() == pytest.approx(_SMALL_SLICES_MAX, rel=1e-2)
    # larger slices stop at the count cap: past it only small ones still get in
    sixteen = np.full(16, 44, dtype="<i8").tobytes()
    for _ in range(2 * _LOOKUP_QUEUE_MAX):
        applier.record_lookup_bytes("items", sixteen)
    applier.record_lookup_bytes("items", np.asarray([45], dtype="<i8").tobytes())
    assert len(applier._raw_lookups["items"]) == _LOOKUP_QUEUE_MAX + 1  # the small one got in past the count cap
    applier.step()
    assert sketch.estimate(torch.tensor([44])).item() == pytest.approx(16 * _LOOKUP_QUEUE_MAX, rel=1e-2)
    # every lookup left out was counted where an operator sees it
    dropped = state.metrics.registry.get_sample_value("embserve_sketch_dropped_lookups_total", {"table": "items"})
    assert dropped == 2 * _SMALL_SLICES_MAX + _LOOKUP_QUEUE_MAX
    for _ in range(_LOOKUP_QUEUE_MAX + 10):  # the array queue (JSON lookups) drops its oldest
        applier.record_lookup("items", np.asarray([46], dtype=np.int64))
    assert state.metrics.registry.get_sample_value("embserve_sketch_dropped_lookups_total", {"table": "items"}) == dropped + 10
    applier.step()
    applier.record_lookup_bytes("items", np.asarray([43, 43], dtype="<i8").tobytes())
    applier.record_lookup("items", np.asarray([43], dtype=np.int64))
    applier.step()
    assert sketch.estimate(torch.tensor([43])).item() == pytest.approx(3, rel=1e-2)
