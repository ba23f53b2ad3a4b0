"""Access control, limits and name checks, in-process (the real-HTTP side is in test_clients_e2e)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from compression import compress_uniform
from compression.layout import RowClass
from service.app import create_app
from service.registry import TableRegistry
from service.settings import Settings
from service.wire import BINARY_UPDATE_TYPE, encode_binary_updates

WRITE = "write-token-abcdefghijklmnop"
READ = "read-token-abcdefghijklmnopq"
ROWS = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
LOOPBACK = ("127.0.0.1", 50000)
REMOTE = ("10.1.2.3", 50000)


def make_client(tmp_path: Path, peer: tuple[str, int] = LOOPBACK, **settings: object) -> TestClient:
    registry = TableRegistry("cpu")
    registry.add("emb", compress_uniform(ROWS, RowClass(8, 32)))
    app = create_app(Settings(tables_dir=tmp_path, **settings), registry=registry)  # type: ignore[arg-type]
    return TestClient(app, client=peer)


@pytest.fixture()
def guarded(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, token=WRITE, read_token=READ) as client:
        assert client.app.state.embserve.applier.wait_caught_up(10)  # type: ignore[attr-defined]
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


UPDATE = {"upsert_ids": [1], "vectors": [[0.5] * 8]}


def test_writes_need_the_write_token(guarded: TestClient) -> None:
    for path, body in [("/v1/tables/emb/updates", UPDATE), ("/v1/admin/tables", {"name": "x", "dim": 4, "classes": ["d4b32"]})]:
        r = guarded.post(path, json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        assert guarded.post(path, json=body, headers={"authorization": "Basic " + WRITE}).status_code == 401
        assert guarded.post(path, json=body, headers=bearer("wrong-" + WRITE)).status_code == 403
        assert guarded.post(path, json=body, headers=bearer(READ)).status_code == 403  # the read token never writes
    r = guarded.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": [1]}]}, headers=bearer(READ))
    assert r.json()["results"][0]["embeddings"][0] == pytest.approx(ROWS[1].tolist())  # nothing was applied
    assert guarded.post("/v1/tables/emb/updates?wait=true", json=UPDATE, headers=bearer(WRITE)).json()["applied"]
    r = guarded.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": [1]}]}, headers=bearer(READ))
    assert r.json()["results"][0]["embeddings"][0] == [0.5] * 8


def test_reads_need_a_token_when_a_read_token_is_set(guarded: TestClient) -> None:
    lookup = {"lookups": [{"table": "emb", "ids": [1]}]}
    infer = {"inputs": [{"name": "ids", "shape": [1], "datatype": "INT64", "data": [1]}]}
    assert guarded.post("/v1/lookup", json=lookup).status_code == 401
    assert guarded.get("/v1/tables").status_code == 401
    assert guarded.post("/v1/lookup", json=lookup, headers=bearer("nope-nope-nope-nope")).status_code == 403
    r = guarded.post("/v2/models/emb/infer", json=infer)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)  # the v2 protocol's error shape
    for token in (READ, WRITE):  # the write token reads too
        assert guarded.post("/v1/lookup", json=lookup, headers=bearer(token)).status_code == 200
        assert guarded.post("/v2/models/emb/infer", json=infer, headers=bearer(token)).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert guarded.get(path).status_code == 200, path  # probes and scrapes carry no secrets


def test_without_a_token_only_loopback_clients_may_write(tmp_path: Path) -> None:
    with make_client(tmp_path / "a", peer=REMOTE) as remote:
        r = remote.post("/v1/tables/emb/updates", json=UPDATE)
        assert r.status_code == 401 and "loopback" in r.json()["error"]["message"]
        assert remote.post("/v1/admin/tables/emb/snapshot").status_code == 401
        assert remote.post("/v1/lookup", json={"lookups": [{"table": "emb", "ids": [1]}]}).status_code == 200
    with make_client(tmp_path / "b", peer=LOOPBACK) as local:
        assert local.post("/v1/tables/emb/updates?wait=true", json=UPDATE).json()["applied"]


def test_tokens_come_from_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(WRITE + "\n")
    assert Settings(token_file=secret).token.get_secret_value() == WRITE  # type: ignore[union-attr]
    secret.write_text("  \n")
    with pytest.raises(ValidationError, match="empty"):
        Settings(token_file=secret)
    with pytest.raises(ValidationError, match="cannot read"):
        Settings(token_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="16 characters"):
        Settings(token="short")
    assert WRITE not in repr(Settings(token=WRITE))  # secrets never reach logs through repr


def test_oversized_bodies_and_id_counts_are_refused(tmp_path: Path) -> None:
    with make_client(tmp_path, max_body_bytes=4096, max_updates_per_request=10, max_ids_per_request=100) as client:
        big = encode_binary_updates(np.arange(200), np.zeros((200, 8), np.float32), np.empty(0, np.int64))
        assert client.post("/v1/tables/emb/updates", content=big, headers={"content-type": BINARY_UPDATE_TYPE}).status_code == 413
        many = {"upsert_ids": list(range(11)), "vectors": [[0.0] * 8] * 11}
        r = client.post("/v1/tables/emb/updates", json=many)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        ids = {"lookups": [{"table": "emb", "ids": list(range(101))}]}
        assert client.post("/v1/lookup", json=ids).status_code == 413
        infer = {"inputs": [{"name": "ids", "shape": [101], "datatype": "INT64", "data": list(range(101))}]}
        r = client.post("/v2/models/emb/infer", json=infer)
        assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.mark.parametrize("name", ["..", "../etc", "a%2Fb", ".hidden", "a" * 129, "sp ace", "x;rm"])
def test_bad_table_names_never_reach_the_disk(tmp_path: Path, name: str) -> None:
    with make_client(tmp_path) as client:
        r = client.post("/v1/admin/tables", json={"name": name, "dim": 4, "classes": ["d4b32"]})
        assert r.status_code == 422, r.text
        for path in (f"/v1/tables/{name}", f"/v1/tables/{name}/updates", f"/v2/models/{name}"):
            status = (client.get(path) if "updates" not in path else client.post(path, json=UPDATE)).status_code
            if ".." in name:  # HTTP clients resolve dot segments before sending: another route answers
                assert status < 500, (path, status)
            else:
                assert 400 <= status < 500, (path, status)
    assert all(p.name.startswith("updates.sqlite3") for p in tmp_path.iterdir())  # only the update log was written


def test_internal_errors_do_not_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object, **__: object) -> None:
        raise RuntimeError("secret path /srv/tables/emb and a stack frame")

    with make_client(tmp_path) as client:
        client.app.state.embserve.tables.get("emb").table.lookup = explode  # type: ignore[attr-defined]
        for path, body in [("/v1/lookup", {"lookups": [{"table": "emb", "ids": [1]}]}),
                           ("/v2/models/emb/infer", {"inputs": [{"name": "ids", "shape": [1], "datatype": "INT64", "data": [1]}]})]:
            r = TestClient(client.app, raise_server_exceptions=False, client=LOOPBACK).post(path, json=body)
            assert r.status_code == 500
            text = r.text
            assert "secret" not in text and "RuntimeError" not in text and "Traceback" not in text
            assert orjson.loads(text)["error"]
