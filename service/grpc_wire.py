"""``ModelInferResponse`` bytes built by hand around the tensor bytes (service/grpc_v2.py).

Why: building the answer with the protobuf message API copies the embeddings twice more than
the wire needs (into the message's ``raw_output_contents``, then into the serialized string)
and costs a dozen Python-to-upb calls; a batch-1 lookup's own work is a few microseconds.  The
response is a fixed frame around one or two byte blobs, so the frame is built once per request
shape and the decoder writes the rows straight into the answer, between the frame's pieces.

Layout (protobuf wire format, proto3; ``tag`` = field number << 3 | wire type, wire type 2 =
length-delimited, 0 = varint; every length and integer a base-128 varint)::

    0x0a len  model_name                 field 1, string
    0x12 len  model_version              field 2, string (omitted when empty, as proto3 does)
    0x1a len  id                         field 3, string (omitted when empty)
    0x22 len  parameters entry           field 4, map<string, InferParameter>, one entry:
                0x0a len "pruned"          key   (field 1 of the entry)
                0x12 len InferParameter    value (field 2): 0x10 varint  int64_param (field 2,
                                           a oneof member: written even when 0)
    0x2a len  InferOutputTensor          field 5, once per output, in the request's order:
                0x0a len name              field 1
                0x12 len datatype          field 2
                0x1a len varint...         field 3, shape, packed int64 (omitted when empty)
    0x32 len  bytes                      field 6, raw_output_contents, once per output, same order

Fields in field-number order, the order upb's serializer writes; the tests check these bytes
against ``ModelInferResponse`` (tests/test_grpc_wire.py).
"""

from __future__ import annotations

from collections.abc import Sequence

_MASK64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    """Base-128 varint, least significant group first; a negative int64 as its 64-bit two's
    complement (10 bytes), as protobuf encodes it."""
    value &= _MASK64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): tag, length, payload."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    """A proto3 string field: nothing when empty (the default is not written)."""
    return _field(number, text.encode("utf-8")) if text else b""


def _output_tensor(name: str, datatype: str, shape: Sequence[int]) -> bytes:
    """One ``InferOutputTensor`` (no parameters, no typed contents: the values are raw)."""
    packed = b"".join(varint(int(d)) for d in shape)
    return _string(1, name) + _string(2, datatype) + (_field(3, packed) if packed else b"")


def infer_response_frame(
    model_name: str, model_version: str, request_id: str, pruned: int, outputs: Sequence[tuple[str, str, Sequence[int], int]]
) -> list[bytes]:
    """The bytes of a ``ModelInferResponse`` around its raw output contents.

    ``outputs``: ``(name, datatype, shape, nbytes)`` per output, in answer order, ``nbytes``
    the length of its raw contents.  Returns ``pieces`` with one piece per output: the
    response is ``pieces[0] + contents[0] + pieces[1] + contents[1] + ...``; ``pieces[0]``
    holds every field before the contents and the first content's tag and length, each later
    piece the tag and length of its content."""
    head = bytearray()
    head += _string(1, model_name)
    head += _string(2, model_version)
    head += _string(3, request_id)
    # map entry: key then value, the InferParameter's int64_param set (a oneof: written as 0 too)
    head += _field(4, _string(1, "pruned") + _field(2, varint(2 << 3 | 0) + varint(pruned)))
    for name, datatype, shape, _ in outputs:
        head += _field(5, _output_tensor(name, datatype, shape))
    pieces = [varint(6 << 3 | 2) + varint(nbytes) for _, _, _, nbytes in outputs]
    if pieces:
        pieces[0] = bytes(head) + pieces[0]
    else:
        pieces = [bytes(head)]
    return pieces


def encode_infer_response(
    model_name: str, model_version: str, request_id: str, pruned: int, outputs: Sequence[tuple[str, str, Sequence[int], bytes | bytearray | memoryview]]
) -> bytes:
    """A whole serialized ``ModelInferResponse``: ``outputs`` are ``(name, datatype, shape,
    raw contents)``; the contents are copied once, into the answer."""
    pieces = infer_response_frame(model_name, model_version, request_id, pruned, [(n, d, s, memoryview(c).nbytes) for n, d, s, c in outputs])
    parts: list[bytes | bytearray | memoryview] = []
    for piece, (_, _, _, contents) in zip(pieces, outputs, strict=False):
        parts += (piece, contents)
    if not outputs:
        parts = pieces  # type: ignore[assignment]
    return b"".join(parts)
