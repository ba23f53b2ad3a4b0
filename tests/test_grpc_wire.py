"""The gRPC ModelInfer path's own bytes: the hand-built ``ModelInferResponse`` frame
(service/grpc_wire.py) is what the generated message class builds, and the planned answer
(:meth:`InferenceService.answer_planned` / ``infer_bytes``: rows decoded straight into the
response) is byte for byte the general path's (``_infer``, the message API's parse and numpy
arrays), for every shape, precision, output selection and request id; what the plan does not
take goes to the general path, and malformed bytes are a 400 (INVALID_ARGUMENT), never a crash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import RowClass, build_table, save_table
from compression.kernels import cpu_c
from compression.unknown import UnknownPolicy, build_unknown_policy

pb = pytest.importorskip("tritonclient.grpc.service_pb2")
grpc_v2 = pytest.importorskip("service.grpc_v2")

from service.errors import ApiError  # noqa: E402
from service.grpc_wire import encode_infer_response, varint  # noqa: E402

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def _message_api(name: str, version: str, request_id: str, pruned: int, outputs: list[tuple[str, str, list[int], bytes]]) -> Any:
    response = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
    response.parameters["pruned"].int64_param = pruned
    for out_name, datatype, shape, contents in outputs:
        response.outputs.add(name=out_name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(contents)
    return response


@settings(max_examples=300, deadline=None)
@given(name=_text, version=_text, request_id=_text, pruned=st.integers(-(2**63), 2**63 - 1),
       outputs=st.lists(st.tuples(_text, _text, st.lists(st.integers(0, 2**63 - 1), max_size=4), st.binary(max_size=300)), max_size=3))
def test_hand_built_response_is_the_message_apis(name: str, version: str, request_id: str, pruned: int,
                                                 outputs: list[tuple[str, str, list[int], bytes]]) -> None:
    expected = _message_api(name, version, request_id, pruned, outputs)
    got = encode_infer_response(name, version, request_id, pruned, outputs)
    assert pb.ModelInferResponse.FromString(got) == expected
    assert got == expected.SerializeToString()  # the same bytes, too: fields in number order


def test_varint_is_protobufs() -> None:
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1, -1, -(2**63)):
        message = pb.InferParameter(int64_param=value)
        assert message.SerializeToString() == b"\x10" + varint(value)


# ---------------------------------------------------------------- the service's ModelInfer


CLASSES = [RowClass(16, 32), RowClass(16, 8), RowClass(8, 4)]
DIM = 16


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An InferenceService on a real app state: table ``t`` (hashed IDs, a non-zero row for
    unknown ones) and ``sparse`` (a pruned class: the plan's decoder call declines it)."""
    from service.app import create_app
    from service.settings import Settings

    folder = tmp_path_factory.mktemp("tables")
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(300, DIM, generator=g)
    ids = torch.randperm(10**6, generator=g)[:300] * 7
    table = build_table(rows, torch.randint(0, 3, (300,), generator=g), CLASSES, ids=ids,
                        unknown=UnknownPolicy(kind="default", default=rows.mean(0)), index="hash")
    save_table(table, Path(folder) / "t.safetensors")
    sparse_rows = torch.randn(50, 8, generator=g)
    cls = torch.zeros(50, dtype=torch.int64)
    cls[25:] = 1
    policy = build_unknown_policy("hashed", sparse_rows, torch.arange(50), torch.ones(50), num_buckets=8)
    save_table(build_table(sparse_rows, cls, [RowClass(8, 32), RowClass(0, 32)], unknown=policy, index="runs"), Path(folder) / "sparse.safetensors")
    app = create_app(Settings(tables_dir=str(folder)))
    loop = asyncio.new_event_loop()
    context = app.router.lifespan_context(app)
    loop.run_until_complete(context.__aenter__())
    try:
        state = app.state.embserve  # type: ignore[attr-defined]
        yield grpc_v2.InferenceService(state), [int(k) for k in ids[:40]]
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


def _request(model: str, ids: np.ndarray, shape: list[int], datatype: str = "INT64", request_id: str = "",
             params: dict[str, Any] | None = None, outputs: list[str] | None = None) -> Any:
    """A request as tritonclient builds it: raw contents, the message's last field."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="ids", datatype=datatype, shape=shape)
    request.raw_input_contents.append(ids.tobytes())
    for key, value in (params or {}).items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    for out_name in outputs or []:
        request.outputs.add(name=out_name)
    return request


def _general(service: Any, raw: bytes) -> bytes:
    return service._infer(pb.ModelInferRequest.FromString(raw))  # type: ignore[no-any-return]


@pytest.mark.skipif(not cpu_c.ENTRY_AVAILABLE, reason="compiled decoder (with its CPython entry) not built")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(0, 39), min_size=1, max_size=30), unknown=st.lists(st.sampled_from([-3, 1, 10**12, -(2**63)]), max_size=3),
       layout=st.sampled_from(["flat", "column", "scalar"]), datatype=st.sampled_from([None, "FP32", "FP16", "BF16"]),
       outputs=st.sampled_from([[], ["embeddings"], ["found"], ["found", "embeddings"], ["embeddings", "found"]]),
       request_id=st.sampled_from(["", "r-1", "ü"]), priority=st.booleans())
def test_planned_answer_is_the_general_paths_bytes(service: Any, picks: list[int], unknown: list[int], layout: str, datatype: str | None,
                                                   outputs: list[str], request_id: str, priority: bool) -> None:
    svc, held = service
    wanted = [held[p] for p in picks] + unknown
    if layout == "scalar":
        wanted = wanted[:1]
    ids = np.array(wanted, dtype="<i8")
    shape = {"flat": [len(ids)], "column": [len(ids), 1], "scalar": []}[layout]
    params: dict[str, Any] = {} if datatype is None else {"embeddings_datatype": datatype}
    if priority:
        params["priority"] = 3  # a parameter the model ignores, on both paths
    raw = _request("t", ids, shape, request_id=request_id, params=params, outputs=outputs).SerializeToString()
    expected = _general(svc, raw)
    assert svc.infer_bytes(raw) == expected  # parsed, planned, the plan remembered
    assert svc.answer_planned(raw) == expected  # the remembered plan
    # the same head with other IDs: the plan's answer is theirs
    other = np.array([held[(p + 1) % 40] for p in picks[: len(ids)]] + [7] * max(0, len(ids) - len(picks)), dtype="<i8")[: len(ids)]
    raw_other = _request("t", other, shape, request_id=request_id, params=params, outputs=outputs).SerializeToString()
    assert svc.answer_planned(raw_other) == _general(svc, raw_other)


def test_what_the_plan_leaves_to_the_general_path(service: Any) -> None:
    svc, held = service
    ids = np.array(held[:3], dtype="<i8")
    leave = [
        _request("t", ids.astype("<i4"), [3], "INT32"),  # another ID type
        _request("t", ids, [3], params={"pooling": "none", "embeddings_datatype": "FP16"}, outputs=["found", "found"]),  # an output twice
        _request("sparse", np.array([1, 30, 999], dtype="<i8"), [3]),  # a pruned class: the decoder call declines it
    ]
    typed = pb.ModelInferRequest(model_name="t")
    typed.inputs.add(name="ids", datatype="INT64", shape=[3]).contents.int64_contents.extend(held[:3])
    leave.append(typed)
    for request in leave:
        raw = request.SerializeToString()
        assert svc.infer_bytes(raw) == _general(svc, raw)
        assert svc.answer_planned(raw) is None  # nothing remembered for it
    # raw contents before the other fields (another serializer's order): answered, not remembered
    request = _request("t", ids, [3])
    raw_part = pb.ModelInferRequest(raw_input_contents=[ids.tobytes()]).SerializeToString()
    request.ClearField("raw_input_contents")
    raw = raw_part + request.SerializeToString()
    assert svc.infer_bytes(raw) == _general(svc, raw) == _general(svc, _request("t", ids, [3]).SerializeToString())
    assert svc.answer_planned(raw) is None
    # same length, other head (another request id): not the remembered plan's; it replaces it
    a = _request("t", ids, [3], request_id="ab").SerializeToString()
    b = _request("t", ids[::-1].copy(), [3], request_id="cd").SerializeToString()
    assert len(a) == len(b) and svc.infer_bytes(a) == _general(svc, a)
    assert svc.answer_planned(b) is None
    assert svc.infer_bytes(b) == _general(svc, b) and pb.ModelInferResponse.FromString(svc.answer_planned(b)).id == "cd"
    assert svc.answer_planned(a) is None
    # refusals come from the general path, with its messages: never planned
    for request, message in ((_request("t", ids, [4]), "raw bytes"), (_request("t", ids, [3], params={"pooling": "max"}), "pooling"),
                             (_request("nope", ids, [3]), "no model"), (_request("t", ids, [3], params={"embeddings_datatype": "INT8"}), "embeddings_datatype")):
        with pytest.raises(ApiError, match=message):
            svc.infer_bytes(request.SerializeToString())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=200), cut=st.integers(1, 60))
def test_malformed_bytes_are_a_400_never_a_crash(service: Any, junk: bytes, cut: int) -> None:
    svc, held = service
    valid = _request("t", np.array(held[:4], dtype="<i8"), [4]).SerializeToString()
    for raw in (junk, valid[: max(0, len(valid) - cut)], valid[:5] + junk):
        try:
            answer = svc.infer_bytes(raw)
        except ApiError as exc:
            assert exc.status in (400, 404, 413)
        else:
            assert isinstance(answer, bytes)
    with pytest.raises(ApiError, match="malformed ModelInferRequest") as info:
        svc.infer_bytes(b"\x0a\x05ab")  # a string field longer than the message
    assert info.value.status == 400
