"""The compiled decoder's CPython entry (compression/kernels/pyentry.c) and what rides on it:
``CompressedTable.lookup``'s short path and ``lookup_to_buffer`` (IDs read from a request body,
rows and status bytes written into an answer) give exactly what the general lookup gives, for
every index kind, unknown IDs, any byte offset; and the service's one-table binary answer
(``LookupFastPath.answer_one_binary``) is byte for byte the general path's."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import LookupResult, RowClass, build_table, save_table
from compression.kernels import cpu_c
from compression.unknown import UnknownPolicy

pytestmark = pytest.mark.skipif(not cpu_c.ENTRY_AVAILABLE, reason="compiled decoder (with its CPython entry) not built")

CLASSES = [RowClass(16, 32), RowClass(16, 8), RowClass(8, 4), RowClass(16, 2)]


def _table(kind: str, seed: int = 0, classes: list[RowClass] = CLASSES):
    g = torch.Generator().manual_seed(seed)
    n = 400
    rows = torch.randn(n, 16, generator=g)
    cls = torch.randint(0, len(classes), (n,), generator=g)
    ids = None if kind == "dense" else torch.randperm(50_000, generator=g)[:n] * 13 - 7_000
    unknown = UnknownPolicy(kind="default", default=rows.mean(0))  # a non-zero row for unknown IDs: the fill must happen
    table = build_table(rows, cls, classes, ids=ids, unknown=unknown, index={"dense": "dense", "hash": "hash", "keyed": "sorted"}[kind])
    return table, ids


def _query(ids: torch.Tensor | None, picks: list[int], unknown: list[int]) -> torch.Tensor:
    held = torch.arange(400) if ids is None else ids
    return torch.tensor([int(held[p % 400]) for p in picks] + unknown, dtype=torch.int64)


@pytest.mark.parametrize("kind", ["dense", "hash", "keyed"])
@settings(max_examples=30, deadline=None)
@given(picks=st.lists(st.integers(0, 399), max_size=40), unknown=st.lists(st.sampled_from([-5, 10**9, 2**62, 400, -(2**63)]), max_size=4),
       offset=st.integers(0, 9))
def test_lookup_to_buffer_equals_lookup(kind: str, picks: list[int], unknown: list[int], offset: int) -> None:
    table, ids = _table(kind)
    query = _query(ids, picks, unknown)
    n = query.numel()
    expected = table.lookup(query)
    body = b"\x07" * offset + query.numpy().astype("<i8").tobytes() + b"tail"
    rows_at = 4 * ((offset + 3) // 4)
    # junk where rows and statuses go: every byte must be written (the service's answers are
    # not zero-filled first: cpu_c.answer_buffer)
    answer = bytearray(b"\xab" * (rows_at + 4 * 16 * n + n + 3))
    got_unknown = table.lookup_to_buffer(body, offset, n, answer, rows_at, rows_at + 4 * 16 * n)
    assert got_unknown == expected.num_unknown
    values = np.frombuffer(answer, dtype=np.float32, count=16 * n, offset=rows_at).reshape(n, 16)
    assert np.array_equal(values, expected.values.numpy())
    status = np.frombuffer(answer, dtype=np.uint8, count=n, offset=rows_at + 4 * 16 * n)
    assert np.array_equal(status, (expected.locators >= 0).numpy().astype(np.uint8))


@pytest.mark.parametrize("kind", ["dense", "hash", "keyed"])
def test_lookup_short_path_equals_the_general_one(kind: str) -> None:
    """The short path (compiled entry) against the same table on the torch backend."""
    table, ids = _table(kind, seed=3)
    query = _query(ids, list(range(0, 400, 7)) * 3, [10**9, -1])
    fast = table.lookup(query)
    table.backend = "torch"  # type: ignore[assignment]
    slow = table.lookup(query)
    assert torch.equal(fast.values, slow.values)
    assert torch.equal(fast.locators, slow.locators)
    assert fast.num_unknown == slow.num_unknown == 2
    out = torch.empty(query.numel(), 16)
    table.backend = "compiled"  # type: ignore[assignment]
    assert table.lookup(query, out=out).values is out and torch.equal(out, slow.values)


@pytest.mark.parametrize("kind", ["dense", "hash", "keyed"])
def test_lazy_locators_equal_the_general_paths(kind: str) -> None:
    """With a zero unknown-ID policy the short path hands back the locators as raw bytes and
    LookupResult makes the tensor on first use: it must equal the torch backend's, for a
    batch of one (the case the bytes are for), a larger batch, and an empty one."""
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(300, 16, generator=g)
    cls = torch.randint(0, len(CLASSES), (300,), generator=g)
    ids = None if kind == "dense" else torch.randperm(40_000, generator=g)[:300] * 7 + 11
    table = build_table(rows, cls, CLASSES, ids=ids, index={"dense": "dense", "hash": "hash", "keyed": "sorted"}[kind])
    held = torch.arange(300) if ids is None else ids
    for query in (held[5:6], torch.cat([held[::9], torch.tensor([10**12, -3])]), held[:0]):
        fast = table.lookup(query)
        table.backend = "torch"  # type: ignore[assignment]
        slow = table.lookup(query)
        table.backend = "compiled"  # type: ignore[assignment]
        assert fast.num_unknown == slow.num_unknown
        assert torch.equal(fast.values, slow.values)
        assert fast.locators.dtype == torch.int32 and torch.equal(fast.locators, slow.locators)
        assert torch.equal(fast.found, slow.found) and torch.equal(fast.status, slow.status)
        assert fast.locators is fast.locators  # made once


def test_a_lookup_result_needs_its_locators() -> None:
    with pytest.raises(ValueError, match="locators"):
        LookupResult(torch.zeros(1, 4), None, 0)


def test_lookup_to_buffer_declines_pruned_tables_and_bad_ranges() -> None:
    table, _ = _table("dense", classes=CLASSES + [RowClass(0, 32)])
    answer = bytearray(4 * 16 + 1)
    assert table.lookup_to_buffer(struct.pack("<q", 1), 0, 1, answer, 0, 64) is None  # pruned rows need lookup()
    table, _ = _table("dense")
    with pytest.raises(ValueError, match="past its buffer"):
        table.lookup_to_buffer(struct.pack("<q", 1), 0, 2, bytearray(200), 0, 128)  # two IDs, one in the body
    with pytest.raises(ValueError, match="past its buffer"):
        table.lookup_to_buffer(struct.pack("<qq", 1, 2), 0, 2, bytearray(4 * 16 * 2), 0, 128)  # no room for statuses
    with pytest.raises(BufferError):
        table.lookup_to_buffer(struct.pack("<q", 1), 0, 1, b"\0" * 100, 0, 64)  # type: ignore[arg-type]  # read-only answer


def test_a_replaced_index_array_is_not_read_through_a_stale_view() -> None:
    """The C view is cached by a weak reference to the array it points at: a write that grows
    the hash index (rehash: a new slot array) must be seen by the next lookup."""
    table, ids = _table("hash", seed=5)
    assert ids is not None
    before = table.index.c_view()
    new_ids = torch.arange(10**12, 10**12 + 3000, dtype=torch.int64)
    table.put(new_ids, torch.randn(3000, 16), 0)
    assert table.index.c_view() is not before
    got = table.lookup(new_ids[-5:])
    assert got.num_unknown == 0
    table.backend = "torch"  # type: ignore[assignment]
    assert torch.equal(got.values, table.lookup(new_ids[-5:]).values)


# ---------------------------------------------------------------- the service's one-table answer


@pytest.fixture(scope="module")
def service_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from service.app import create_app
    from service.settings import Settings

    tables = tmp_path_factory.mktemp("tables")
    table, _ = _table("hash", seed=9)
    save_table(table, Path(tables) / "t.safetensors")
    app = create_app(Settings(tables_dir=str(tables)))
    loop = asyncio.new_event_loop()
    context = app.router.lifespan_context(app)
    loop.run_until_complete(context.__aenter__())
    try:
        yield app
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


def test_one_table_binary_answers_are_the_general_paths_bytes(service_state: object) -> None:
    from service.routers.lookup import LookupFastPath, answer_bytes
    from service.wire import BINARY_REQUEST_TYPE, ParsedLookup, encode_binary_request

    app = service_state
    state = app.state.embserve  # type: ignore[attr-defined]
    fast = LookupFastPath(app, state)  # type: ignore[arg-type]
    held = state.tables.get("t").table.index.live_items()[0]
    big = [int(k) for k in held[:400]] * 3 + [10**15] * 5  # 1205 IDs: a 78 KB answer, kept as the bytearray
    for ids in ([int(held[0])], [int(held[3]), 10**15, int(held[3])], [int(k) for k in held[:37]], [-(2**63)], big, big[:1203]):
        body = encode_binary_request([ParsedLookup("t", np.array(ids, dtype=np.int64), None, "none", None)])
        # the answer buffer is not zero-filled: leave junk in the memory it is likely to reuse
        junk = bytearray(b"\xab" * (24 + 65 * len(ids) + 8))
        del junk
        got = fast.answer_one_binary(body)
        assert got is not None
        expected, _ = answer_bytes(state, body, BINARY_REQUEST_TYPE, True)
        assert got == bytes(expected)
    # 16-bit values: the general path's bytes too (its conversion is the same rounding), asked
    # for by the lookup's dtype code or, with code 0, by the Accept header's dtype=
    sixteen = [[int(held[0])], [int(held[3]), 10**15, int(held[3])], [int(k) for k in held[:37]], big, big[:1203]]
    for ids in sixteen:
        for asked, accept in (("f16", None), ("bf16", None), (None, "f16"), (None, "bf16"), ("f32", "f16")):
            body = encode_binary_request([ParsedLookup("t", np.array(ids, dtype=np.int64), None, "none", asked)])
            got = fast.answer_one_binary(body, BINARY_REQUEST_TYPE, True, accept)  # type: ignore[arg-type]
            assert got is not None
            expected, _ = answer_bytes(state, body, BINARY_REQUEST_TYPE, True, accept)  # type: ignore[arg-type]
            assert got == bytes(expected), (asked, accept, len(ids))
    # what it leaves to the general path: None, nothing counted
    leave = [
        encode_binary_request([ParsedLookup("t", np.array([1, 2]), np.array([0]), "sum", None)]),  # pooled
        encode_binary_request([ParsedLookup("t", np.array([1]), None, "none", None)] * 2),  # two lookups
        encode_binary_request([ParsedLookup("nope", np.array([1]), None, "none", None)]),  # unknown table: a 404 there
        encode_binary_request([ParsedLookup("t", np.array([], dtype=np.int64), None, "none", None)]),
        encode_binary_request([ParsedLookup("t", np.array([1]), None, "none", None)])[:-1],  # truncated: a 400 there
        b"EMQ1",
    ]
    for body in leave:
        assert fast.answer_one_binary(body) is None
