"""KServe v2 over gRPC, end to end: a real `embserve serve` process with ``EMBSERVE_GRPC_PORT``
set, called by an unmodified ``tritonclient.grpc`` client; the same tables, tokens, limits and
error meanings as HTTP.  The Python client's ``dtype=`` is checked against the same server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from compression import RowClass, build_table, compress, save_table
from compression.unknown import build_unknown_policy
from compression.synthetic import synthetic_table, zipf_frequencies
from service.client import EmbeddingClient, EmbservError

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from test_e2e import free_port, serving  # noqa: E402

pytestmark = pytest.mark.e2e
TOKEN = "read-token-0123456789abcdef"
HEADERS = {"authorization": f"Bearer {TOKEN}"}
RESPONSE_CAP = 5000  # 100 IDs x 16 dims: 6,500 bytes at FP32, 3,300 at FP16 (values + found flags)
SPARSE_ROWS = torch.randn(100, 8, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC address) of one real server with a read token, a 100-ID limit and a
    response cap that 100 IDs of 16 float32 values pass only at 16 bits."""
    folder = tmp_path_factory.mktemp("grpc")
    freqs = zipf_frequencies(2000, seed=4)
    table, _ = compress(synthetic_table(2000, 16, freqs, seed=4), freqs, ratio=6)
    (folder / "tables").mkdir()
    save_table(table, folder / "tables" / "items.safetensors")
    # "sparse": IDs 50..99 pruned (dim 0), served by a hashed unknown-ID policy
    cls = torch.zeros(100, dtype=torch.int64)
    cls[50:] = 1
    policy = build_unknown_policy("hashed", SPARSE_ROWS, torch.arange(100), torch.ones(100), num_buckets=16)
    save_table(build_table(SPARSE_ROWS, cls, [RowClass(8, 32), RowClass(0, 32)], unknown=policy, index="runs"), folder / "tables" / "sparse.safetensors")
    grpc_port = free_port()
    env = {"EMBSERVE_GRPC_PORT": str(grpc_port), "EMBSERVE_READ_TOKEN": TOKEN, "EMBSERVE_MAX_IDS_PER_REQUEST": "100",
           "EMBSERVE_LOG_LEVEL": "warning", "EMBSERVE_MAX_RESPONSE_BYTES": str(RESPONSE_CAP)}
    with serving(folder / "tables", env) as base:
        yield base, f"127.0.0.1:{grpc_port}"


def ids_input(values: np.ndarray, datatype: str = "INT64"):  # type: ignore[no-untyped-def]
    tensor = grpcclient.InferInput("ids", list(values.shape), datatype)
    tensor.set_data_from_numpy(values)
    return tensor


def status_of(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status())


def test_health_and_metadata(server: tuple[str, str]) -> None:
    client = grpcclient.InferenceServerClient(server[1])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("items", headers=HEADERS)
    meta = client.get_model_metadata("items", headers=HEADERS, as_json=True)
    assert meta["versions"] == ["1"] and meta["outputs"][0]["shape"] == ["-1", "16"]
    assert client.get_server_metadata().name == "embserve"


def test_infer_matches_the_http_answer(server: tuple[str, str]) -> None:
    base, address = server
    wanted = np.array([[0], [5], [1999], [123456]], dtype=np.int64)  # [n, 1], one unknown
    client = grpcclient.InferenceServerClient(address)
    result = client.infer("items", [ids_input(wanted)], headers=HEADERS)
    embeddings, found = result.as_numpy("embeddings"), result.as_numpy("found")
    assert embeddings.shape == (4, 1, 16) and found.shape == (4, 1)
    with EmbeddingClient(base, token=TOKEN) as http:
        answer = http.lookup("items", wanted.reshape(-1))
        expected = answer.values
        np.testing.assert_array_equal(embeddings.reshape(4, 16), expected)
        # which IDs have a row of their own depends on the allocator's plan (it may prune some);
        # the unknown one never does, and both protocols agree on every one
        assert found.reshape(-1).tolist() == list(answer.found) and not found[3, 0] and found.any()
        # the same rows at 16 bits, over both protocols and both precisions
        for datatype, dtype, torch_dtype in (("FP16", "f16", torch.float16), ("BF16", "bf16", torch.bfloat16)):
            half = client.infer("items", [ids_input(wanted)], headers=HEADERS, parameters={"embeddings_datatype": datatype})
            rounded = torch.from_numpy(expected.copy()).to(torch_dtype).float().numpy()
            np.testing.assert_array_equal(half.as_numpy("embeddings").astype(np.float32).reshape(4, 16), rounded)
            np.testing.assert_array_equal(np.asarray(http.lookup("items", wanted.reshape(-1), dtype=dtype).values, np.float32), rounded)  # type: ignore[arg-type]
        uint = client.infer("items", [ids_input(np.array([5, 6], dtype=np.uint32), "UINT32")], headers=HEADERS)
        np.testing.assert_array_equal(uint.as_numpy("embeddings"), http.lookup("items", [5, 6]).values)


def test_pooled_bags(server: tuple[str, str]) -> None:
    client = grpcclient.InferenceServerClient(server[1])
    wanted = np.array([1, 2, 3, 4], dtype=np.int64)
    offsets = grpcclient.InferInput("offsets", [2], "INT64")
    offsets.set_data_from_numpy(np.array([0, 1], dtype=np.int64))
    pooled = client.infer("items", [ids_input(wanted), offsets], headers=HEADERS, parameters={"pooling": "sum"}).as_numpy("embeddings")
    rows = client.infer("items", [ids_input(wanted)], headers=HEADERS).as_numpy("embeddings")
    np.testing.assert_allclose(pooled, np.stack([rows[0], rows[1:].sum(0)]), rtol=1e-6, atol=1e-6)


def test_tokens_limits_and_errors_have_their_grpc_codes(server: tuple[str, str]) -> None:
    client = grpcclient.InferenceServerClient(server[1])
    one = [ids_input(np.array([1], dtype=np.int64))]
    assert status_of(lambda: client.infer("items", one)) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: client.infer("items", one, headers={"authorization": "Bearer wrong-token-0123456789"})) == "StatusCode.PERMISSION_DENIED"
    assert status_of(lambda: client.get_model_metadata("items")) == "StatusCode.UNAUTHENTICATED"
    assert status_of(lambda: client.infer("nope", one, headers=HEADERS)) == "StatusCode.NOT_FOUND"
    assert status_of(lambda: client.infer("items", one, model_version="7", headers=HEADERS)) == "StatusCode.NOT_FOUND"
    too_many = [ids_input(np.arange(150, dtype=np.int64))]
    assert status_of(lambda: client.infer("items", too_many, headers=HEADERS)) == "StatusCode.RESOURCE_EXHAUSTED"
    floats = grpcclient.InferInput("ids", [1], "FP32")
    floats.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    assert status_of(lambda: client.infer("items", [floats], headers=HEADERS)) == "StatusCode.INVALID_ARGUMENT"
    bad_dtype = {"embeddings_datatype": "INT8"}
    assert status_of(lambda: client.infer("items", one, headers=HEADERS, parameters=bad_dtype)) == "StatusCode.INVALID_ARGUMENT"
    # the same limit on HTTP, for comparison: 413
    with EmbeddingClient(server[0], token=TOKEN) as http, pytest.raises(EmbservError) as info:
        http.lookup("items", np.arange(150))
    assert info.value.status == 413


def test_response_cap_counts_16_bit_values_at_their_width(server: tuple[str, str]) -> None:
    """The cap counts 2 bytes a value for FP16 / BF16 on gRPC, v1 binary and v2 HTTP (it counted 4,
    refusing a half-size answer), and gRPC checks it at all (it did not)."""
    base, address = server
    client = grpcclient.InferenceServerClient(address)
    hundred = [ids_input(np.arange(100, dtype=np.int64))]
    assert status_of(lambda: client.infer("items", hundred, headers=HEADERS)) == "StatusCode.RESOURCE_EXHAUSTED"
    half = client.infer("items", hundred, headers=HEADERS, parameters={"embeddings_datatype": "FP16"})
    assert half.as_numpy("embeddings").shape == (100, 16)
    with EmbeddingClient(base, token=TOKEN) as http:
        with pytest.raises(EmbservError) as info:
            http.lookup("items", np.arange(100))
        assert info.value.status == 413 and "EMBSERVE_MAX_RESPONSE_BYTES" in str(info.value)
        assert http.lookup("items", np.arange(100), dtype="f16").values.shape == (100, 16)


def test_pruned_count_and_grpc_metrics(server: tuple[str, str]) -> None:
    """A response says how many IDs had a pruned row (parameter ``pruned``, as v2 HTTP does), and
    every call is counted by method and code in the service's Prometheus metrics."""
    import httpx

    base, address = server
    client = grpcclient.InferenceServerClient(address)
    result = client.infer("sparse", [ids_input(np.array([3, 60, 1000, 99], dtype=np.int64))], headers=HEADERS)
    assert result.get_response().parameters["pruned"].int64_param == 2
    assert result.as_numpy("found").tolist() == [True, False, False, False]
    assert status_of(lambda: client.infer("sparse", [ids_input(np.array([1], dtype=np.int64))])) == "StatusCode.UNAUTHENTICATED"
    text = httpx.get(f"{base}/metrics", headers=HEADERS).text
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines() if line.startswith("embserve_grpc_requests_total{")
    }
    assert counts.get('code="OK",method="ModelInfer"', 0) >= 1, counts
    assert counts.get('code="UNAUTHENTICATED",method="ModelInfer"', 0) >= 1, counts
    assert 'embserve_grpc_request_duration_seconds_count{method="ModelInfer"}' in text


def test_malformed_message_is_invalid_argument(server: tuple[str, str]) -> None:
    """Bytes that are no ModelInferRequest: INVALID_ARGUMENT with the parser's reason (they
    were grpcio's deserialization failure, UNKNOWN), and the server answers the next call."""
    import grpc

    with grpc.insecure_channel(server[1]) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        for junk in (b"\x0a\x05ab", b"\xff" * 9, b"\x3a\x80"):
            with pytest.raises(grpc.RpcError) as info:
                infer(junk, metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed ModelInferRequest" in str(info.value.details())
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\xff" * 9)  # the token is checked first, as for every call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client = grpcclient.InferenceServerClient(server[1])
    assert client.infer("items", [ids_input(np.array([1], dtype=np.int64))], headers=HEADERS).as_numpy("embeddings").shape == (1, 16)
