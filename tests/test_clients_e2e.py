"""Clients against a real `embserve serve` process: our Python client (sync and async), an
unmodified Triton HTTP client on the v2 protocol, and the write token over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from compression import compress_uniform, save_table
from compression.layout import RowClass
from service.client import AsyncEmbeddingClient, EmbeddingClient, EmbservError
from service.client_http import HttpConnection, ResponseError
from tests.test_e2e import serving

pytestmark = pytest.mark.e2e

TOKEN = "e2e-write-token-0123456789"
DIM = 16
ROWS = torch.randn(2_000, DIM, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("tables")
    save_table(compress_uniform(ROWS, RowClass(DIM, 32)), folder / "items.safetensors")  # fp32: exact answers
    save_table(compress_uniform(ROWS[:100], RowClass(DIM, 32)), folder / "users.safetensors")
    secret = folder.parent / "token"
    secret.write_text(TOKEN + "\n")
    with serving(folder, {"EMBSERVE_TOKEN_FILE": str(secret), "EMBSERVE_MAX_IDS_PER_REQUEST": "50000"}) as base:
        yield base


def test_sync_client_binary_and_json_agree_with_the_table(server: str) -> None:
    ids = np.array([0, 7, 1999, 5000, 7], dtype=np.int64)
    with EmbeddingClient(server) as binary, EmbeddingClient(server, binary=False) as plain:
        for client in (binary, plain):
            emb = client.lookup("items", ids)
            assert emb.values.shape == (5, DIM) and emb.values.dtype == np.float32
            assert emb.found.tolist() == [True, True, True, False, True]
            assert emb.unknown == 1
            np.testing.assert_array_equal(emb.values[[0, 1, 2, 4]], ROWS[[0, 7, 1999, 7]].numpy())
        users, items = binary.lookup_many({"users": [3, 4], "items": [5]})
        np.testing.assert_array_equal(users.values, ROWS[[3, 4]].numpy())
        np.testing.assert_array_equal(items.values, ROWS[[5]].numpy())
        pooled = binary.lookup("items", [1, 2, 3], offsets=[0, 1], pooling="sum")
        np.testing.assert_allclose(pooled.values, np.stack([ROWS[1].numpy(), (ROWS[2] + ROWS[3]).numpy()]), rtol=1e-6)
        with pytest.raises(EmbservError) as err:
            binary.lookup("nope", [1])
        assert err.value.status == 404 and err.value.code == "unknown_table"


def test_writes_need_the_token_and_the_client_sends_it(server: str) -> None:
    vec = np.full((1, DIM), 0.5, np.float32)
    with EmbeddingClient(server) as anonymous, EmbeddingClient(server, token="wrong-token-wrong-token") as wrong:
        with pytest.raises(EmbservError) as err:
            anonymous.update("items", upsert_ids=[10], vectors=vec)
        assert err.value.status == 401
        with pytest.raises(EmbservError) as err:
            wrong.update("items", upsert_ids=[10], vectors=vec)
        assert err.value.status == 403
        assert anonymous.lookup("items", [10]).values[0, 0] == ROWS[10, 0].item()  # nothing was applied
    r = httpx.post(f"{server}/v1/admin/tables", json={"name": "t", "dim": 4, "classes": ["d4b32"]})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    with EmbeddingClient(server, token=TOKEN) as writer:
        ack = writer.update("items", upsert_ids=[10], vectors=vec, delete_ids=[11], wait=True)
        assert ack.applied and ack.upserts == 1 and ack.deletes == 1
        emb = writer.lookup("items", [10, 11])
        np.testing.assert_array_equal(emb.values[0], vec[0])
        assert emb.found.tolist() == [True, False]


def test_async_client_runs_concurrent_lookups(server: str) -> None:
    async def main() -> list[np.ndarray]:
        async with AsyncEmbeddingClient(server) as client:
            assert await client.ready()
            results = await asyncio.gather(*(client.lookup("items", [k, k + 1]) for k in range(100, 132)))
            names = {t["name"] for t in await client.tables()}
            assert {"items", "users"} <= names
            return [r.values for r in results]

    values = asyncio.run(main())
    for k, v in zip(range(100, 132), values):
        np.testing.assert_array_equal(v, ROWS[[k, k + 1]].numpy())


@pytest.mark.parametrize("binary", [True, False])
def test_unmodified_triton_client_calls_the_v2_protocol(server: str, binary: bool) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("items")
    meta = client.get_model_metadata("items")
    assert meta["outputs"][0] == {"name": "embeddings", "datatype": "FP32", "shape": [-1, DIM]}
    ids = np.array([[1, 2, 3], [4, 5, 99_999]], dtype=np.int64)
    ids_input = triton.InferInput("ids", list(ids.shape), "INT64")
    ids_input.set_data_from_numpy(ids, binary_data=binary)
    outputs = [triton.InferRequestedOutput("embeddings", binary_data=binary), triton.InferRequestedOutput("found", binary_data=binary)]
    result = client.infer("items", [ids_input], outputs=outputs, request_id="r-1")
    emb = result.as_numpy("embeddings")
    assert emb.shape == (2, 3, DIM)
    np.testing.assert_array_equal(emb[0], ROWS[[1, 2, 3]].numpy())
    assert result.as_numpy("found").tolist() == [[True, True, True], [True, True, False]]
    assert result.get_response()["id"] == "r-1"
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.infer("nope", [ids_input])
    too_many = np.zeros(60_000, dtype=np.int64)
    big = triton.InferInput("ids", [60_000], "INT64")
    big.set_data_from_numpy(too_many, binary_data=True)
    with pytest.raises(InferenceServerException, match="limit"):
        client.infer("items", [big])


# ------------------------------------------------- the blocking client's connection (client_http.py)


def test_kept_alive_connections_carry_the_next_request(server: str) -> None:
    """An answer without ``Connection: close`` leaves the connection open: the next request goes
    on the same socket (httptools forgets keep-alive once a message is parsed, so it must be
    read while the message completes; a client that reconnected for every request paid a TCP
    handshake, a slow-starting window and the server's per-connection setup on each lookup)."""
    ids = np.arange(1000, dtype=np.int64)  # a 64 KB answer, more than one recv
    with EmbeddingClient(server) as client:
        client.lookup("items", ids)
        sock = client._connection().sock
        assert sock is not None
        port = sock.getsockname()[1]
        for _ in range(3):
            client.lookup("items", ids[:5])
            client.lookup("items", ids)
        assert client._connection().sock is sock and sock.getsockname()[1] == port

    async def run() -> None:
        async with AsyncEmbeddingClient(server, max_connections=4) as client:
            for _ in range(3):
                await client.lookup("items", ids)
            assert len(client._pool._open) == 1 and len(client._pool._idle) == 1

    asyncio.run(run())


def test_large_chunked_and_closing_answers_read_whole(server: str) -> None:
    """A JSON answer over 1 MiB comes chunked (service/buffered.py); ``Connection: close`` makes
    the client open a new connection for the next request."""
    ids = np.arange(2000, dtype=np.int64).repeat(10)  # 20,000 rows of 16 floats: ~4 MB of JSON
    with EmbeddingClient(server, binary=False) as plain, EmbeddingClient(server) as binary:
        big = plain.lookup("items", ids)
        assert big.values.shape == (20_000, DIM)
        np.testing.assert_array_equal(big.values, binary.lookup("items", ids).values)  # (other tests write some rows)
        conn = binary._connection()
        status, _ = conn.request("GET", "/healthz", None, b"Connection: close\r\n")
        assert status == 200 and conn.sock is None  # the server said close: so did the client
        np.testing.assert_array_equal(binary.lookup("items", [5]).values, ROWS[[5]].numpy())


def _peer(answer: bytes | None, close_first: bool = False) -> tuple[socket.socket, threading.Thread]:
    """A loopback peer that reads one request and writes ``answer`` (None: writes nothing and
    keeps the connection open), or with ``close_first`` answers the first request with a
    kept-alive 200, then reads the second and closes without answering it, like a server whose
    idle timeout fired as the request arrived."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            if close_first:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                conn.recv(65536)
                return  # closed without answering the second request
            if answer is None:
                conn.recv(65536)  # until the client gives up and closes
                return
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_connection_errors_are_clear_and_leave_no_half_used_connection() -> None:
    for answer, error in ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", ResponseError),  # ends mid-body
                          (b"garbage, not HTTP\r\n\r\n", ResponseError),
                          (None, TimeoutError)):
        listener, thread = _peer(answer)
        conn = HttpConnection("http", "127.0.0.1", listener.getsockname()[1], timeout=0.5)
        with pytest.raises(error):
            conn.request("GET", "/x", None, b"")
        assert conn.sock is None
        thread.join(5)
        listener.close()


def test_a_kept_alive_connection_the_server_closed_is_retried_once() -> None:
    listener, thread = _peer(None, close_first=True)
    client = EmbeddingClient(f"http://127.0.0.1:{listener.getsockname()[1]}")
    conn = client._connection()
    assert conn.request("GET", "/first", None, b"") == (200, b"ok")

    retry = threading.Thread(target=lambda: _answer_once(listener, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nretry"), daemon=True)
    retry.start()
    # the second request goes out on the kept-alive connection, which the peer closes without
    # answering: the client retries it once on a new connection (the retry thread answers)
    assert client._request("GET", "/second") == (200, b"retry")
    thread.join(5)
    retry.join(5)
    listener.close()
    client.close()


def test_async_pool_reads_chunked_answers_retries_and_fails_clearly(server: str) -> None:
    from service.client_http import AsyncHttpPool

    async def run() -> None:
        ids = np.arange(2000, dtype=np.int64).repeat(10)
        async with AsyncEmbeddingClient(server, binary=False, max_connections=2) as plain, AsyncEmbeddingClient(server) as binary:
            big, small = await asyncio.gather(plain.lookup("items", ids), binary.lookup("items", ids))  # 4 MB chunked JSON
            np.testing.assert_array_equal(big.values, small.values)
            # more concurrent lookups than connections: they queue for one and all answer
            answers = await asyncio.gather(*(plain.lookup("items", [k]) for k in range(20)))
            assert [a.values.shape for a in answers] == [(1, DIM)] * 20 and len(plain._pool._open) <= 2
        # a kept-alive connection the peer closed: retried once on a new one
        listener, thread = _peer(None, close_first=True)
        port = listener.getsockname()[1]
        client = AsyncEmbeddingClient(f"http://127.0.0.1:{port}")
        assert await client._request("GET", "/first") == (200, b"ok")
        retry = threading.Thread(target=lambda: _answer_once(listener, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nretry"), daemon=True)
        retry.start()
        assert await client._request("GET", "/second") == (200, b"retry")  # as in the sync test above
        thread.join(5)
        await client.aclose()
        retry.join(5)
        listener.close()
        for answer, error in ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", ResponseError), (b"garbage, not HTTP\r\n\r\n", ResponseError),
                              (None, TimeoutError)):
            listener, thread = _peer(answer)
            pool = AsyncHttpPool("http", "127.0.0.1", listener.getsockname()[1], 0.5, 4)
            with pytest.raises(error):
                await pool.request("GET", "/x", None, b"")
            assert not pool._open and not pool._idle  # nothing half-used is kept
            await pool.aclose()
            thread.join(5)
            listener.close()

    asyncio.run(run())


def _answer_once(listener: socket.socket, answer: bytes) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(answer)
