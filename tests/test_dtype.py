"""Answers at f32 (default, byte-identical EMR1), f16 or bf16 (EMR2): JSON field, binary request
flag, Accept parameter; the codec as a property; decoding straight into the response buffer."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings as hsettings, strategies as st

from compression import CompressedTable, RowClass, compress_uniform
from service.app import create_app
from service.registry import TableRegistry
from service.settings import Settings
from service.wire import (
    BINARY_REQUEST_TYPE,
    BINARY_RESPONSE_TYPE,
    LookupOutput,
    ParsedLookup,
    binary_response_size,
    decode_binary_response,
    encode_binary_request,
    encode_binary_response,
    write_response_head,
    write_result_head,
)

LOOPBACK = ("127.0.0.1", 50000)
ROWS = torch.randn(1000, 16, generator=torch.Generator().manual_seed(5))


@pytest.fixture()
def client(mixed_table: CompressedTable, tmp_path: Path) -> Iterator[TestClient]:
    registry = TableRegistry("cpu")
    registry.add("items", compress_uniform(ROWS, RowClass(16, 32)))
    registry.add("users", mixed_table)
    app = create_app(Settings(tables_dir=tmp_path), registry)
    with TestClient(app, client=LOOPBACK) as c:
        yield c


def post_binary(client: TestClient, lookups: list[ParsedLookup], accept: str = BINARY_RESPONSE_TYPE) -> bytes:
    r = client.post("/v1/lookup", content=encode_binary_request(lookups), headers={"content-type": BINARY_REQUEST_TYPE, "accept": accept})
    assert r.status_code == 200, r.text
    return r.content


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_default_f32_answer_is_byte_identical_to_emr1(client: TestClient, mixed_table: CompressedTable) -> None:
    """The answer decoded into the response buffer equals what the EMR1 encoder writes from the same rows."""
    users = ids(0, 5, 19_999, 123_456_789, 7)  # one unknown
    items = ids(3, 999, 1000)
    body = post_binary(client, [ParsedLookup("users", users, None, "none"), ParsedLookup("items", items, None, "none")])
    expected = []
    for table, wanted in ((mixed_table, users), (compress_uniform(ROWS, RowClass(16, 32)), items)):
        result = table.lookup(torch.from_numpy(wanted))
        expected.append(LookupOutput("", result.values.numpy(), result.locators.numpy() >= 0, result.num_unknown))
    assert body == encode_binary_response(expected)
    assert body[:4] == b"EMR1"


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_binary_request_flag_gives_16_bit_values(client: TestClient, dtype: str) -> None:
    wanted = ids(1, 2, 3, 5000, 999)
    full = decode_binary_response(post_binary(client, [ParsedLookup("items", wanted, None, "none")]))[0][0]
    body = post_binary(client, [ParsedLookup("items", wanted, None, "none", dtype)])  # type: ignore[arg-type]
    assert body[:4] == b"EMR2"
    (values, found, unknown), = decode_binary_response(body)
    torch_dtype = torch.float16 if dtype == "f16" else torch.bfloat16
    np.testing.assert_array_equal(np.asarray(values, dtype=np.float32), torch.from_numpy(full.copy()).to(torch_dtype).float().numpy())
    assert found.tolist() == [True, True, True, False, True] and unknown == 1
    # half the value bytes: 5 rows x 16 dims x 2 bytes, plus a 20-byte result header and 5 status bytes + 3 pad
    assert len(body) == 8 + 20 + 5 * 16 * 2 + 5 + 3


def test_accept_parameter_sets_the_default_and_a_lookup_can_override_it(client: TestClient) -> None:
    wanted = ids(1, 2)
    body = post_binary(
        client,
        [ParsedLookup("items", wanted, None, "none"), ParsedLookup("items", wanted, None, "none", "f32")],
        accept=f"{BINARY_RESPONSE_TYPE}; dtype=f16",
    )
    first, second = decode_binary_response(body)
    assert first[0].dtype == np.float16 and second[0].dtype == np.float32
    np.testing.assert_array_equal(first[0], second[0].astype(np.float16))


def test_json_dtype_field_and_pooled_bags(client: TestClient) -> None:
    r = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [1, 2, 3], "offsets": [0, 2], "pooling": "sum", "dtype": "bf16"},
                                                    {"table": "items", "ids": [1, 2, 3], "offsets": [0, 2], "pooling": "sum"}]})
    assert r.status_code == 200, r.text
    rounded, full = (np.asarray(x["embeddings"], dtype=np.float32) for x in r.json()["results"])
    np.testing.assert_array_equal(rounded, torch.from_numpy(full).to(torch.bfloat16).float().numpy())
    pooled = post_binary(client, [ParsedLookup("items", ids(1, 2, 3), ids(0, 2), "sum", "f16")])
    (values, found, _), = decode_binary_response(pooled)
    assert values.shape == (2, 16) and values.dtype == np.float16 and found.tolist() == [True, True, True]
    np.testing.assert_array_equal(values, full.astype(np.float16))


def test_bad_dtypes_are_refused(client: TestClient) -> None:
    r = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [1], "dtype": "f8"}]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    raw = bytearray(encode_binary_request([ParsedLookup("items", ids(1), None, "none")]))
    raw[8 + 3] = 9  # the dtype byte of the first lookup header
    r = client.post("/v1/lookup", content=bytes(raw), headers={"content-type": BINARY_REQUEST_TYPE})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_body"
    r = client.post("/v1/lookup", json={"lookups": [{"table": "items", "ids": [1]}]}, headers={"accept": "application/json; dtype=int4"})
    assert r.status_code == 406 and r.json()["error"]["code"] == "not_acceptable"


def test_a_decoder_reads_only_status_1_as_found() -> None:
    """The per-ID byte is a status: 0 unknown, 1 found, 2 pruned (the unknown-ID policy served
    the row), so only 1 reads as found."""
    body = bytearray(encode_binary_response([LookupOutput("t", np.zeros((3, 2), np.float32), np.array([True, False, True]), 1)]))
    status_at = 8 + 16 + 3 * 2 * 4
    body[status_at + 2] = 2
    (_, found, _), = decode_binary_response(bytes(body))
    assert found.tolist() == [True, False, False]


_result = st.tuples(st.integers(0, 5), st.integers(1, 7), st.sampled_from(["f32", "f16", "bf16"]), st.integers(0, 2**32 - 1))


@hsettings(max_examples=60, deadline=None)
@given(st.lists(_result, min_size=1, max_size=4))
def test_codec_round_trip(results: list[tuple[int, int, str, int]]) -> None:
    """Whatever the mix of shapes and dtypes: sizes add up, every result starts 4-aligned, and
    the decoder reads back exactly the values, statuses and unknown counts written."""
    rng = np.random.default_rng(len(results))
    shapes = [(rows, dim, rows, dtype) for rows, dim, dtype, _ in results]
    wide = any(dtype != "f32" for _, _, _, dtype in shapes)
    buf = bytearray(binary_response_size(shapes))
    pos = write_response_head(buf, len(shapes), wide)
    written = []
    for (rows, dim, n, dtype), (_, _, _, unknown) in zip(shapes, results, strict=True):
        assert pos % 4 == 0
        pos = write_result_head(buf, pos, rows, dim, n, unknown, dtype, wide)
        values = torch.from_numpy(rng.normal(size=(rows, dim)).astype(np.float32))
        stored = values.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype])
        raw = stored.view(torch.int16 if dtype != "f32" else torch.int32).numpy().tobytes()
        buf[pos : pos + len(raw)] = raw
        pos += len(raw)
        status = rng.integers(0, 3, n).astype(np.uint8)
        buf[pos : pos + n] = status.tobytes()
        pos += n + (-(len(raw) + n) % 4)
        written.append((stored.float().numpy(), status == 1, unknown))
    assert pos == len(buf)
    for (values, found, unknown), (want_values, want_found, want_unknown) in zip(decode_binary_response(bytes(buf)), written, strict=True):
        np.testing.assert_array_equal(np.asarray(values, dtype=np.float32), want_values)
        assert found.tolist() == want_found.tolist() and unknown == want_unknown
    if not wide:
        assert struct.unpack_from("<4s", buf)[0] == b"EMR1"


def test_lookup_decodes_into_the_given_buffer(mixed_table: CompressedTable) -> None:
    wanted = torch.tensor([0, 3, 19_999, 555_555], dtype=torch.int64)
    out = torch.full((4, mixed_table.dim), float("nan"))
    result = mixed_table.lookup(wanted, out)
    assert result.values.data_ptr() == out.data_ptr() and result.num_unknown == 1
    torch.testing.assert_close(out, mixed_table.lookup(wanted).values, rtol=0, atol=0)
    with pytest.raises(ValueError):
        mixed_table.lookup(wanted, torch.empty(3, mixed_table.dim))
    with pytest.raises(ValueError):
        mixed_table.lookup(wanted, torch.empty(4, mixed_table.dim, dtype=torch.float16))


def test_the_route_handler_sends_a_big_answer_without_copying(client: TestClient) -> None:
    """Answers past 64 KiB leave as the bytearray they were decoded into; the FastAPI route's
    Response must take that too (the fast path usually answers first)."""
    from service.routers.lookup import handle_lookup

    state = client.app.state.embserve  # type: ignore[attr-defined]
    body = encode_binary_request([ParsedLookup("items", np.arange(2000, dtype=np.int64) % 1000, None, "none")])  # 128 KiB of values
    response = handle_lookup(state, body, BINARY_REQUEST_TYPE, True)
    (values, found, unknown), = decode_binary_response(bytes(response.body))
    assert isinstance(response.body, memoryview) and values.shape == (2000, 16) and found.all() and unknown == 0
