"""The HTTP-level lookup fast path (service/fasthttp.py) answers exactly as the ASGI path does.

Two real `embserve serve` processes on the same table and settings, one with the fast path
(the default) and one with ``EMBSERVE_HTTP_FAST_PATH=false``, get the same raw HTTP bytes over
plain sockets; their answers must be byte-identical (the ``date`` header aside), one request at
a time on a kept-alive connection, pipelined, refused (auth, limits, bad bodies), handed over
(large answers, chunked bodies, ``Expect: 100-continue``), and their request metrics must move
the same.  ``embserve_http_fast_path_requests_total`` shows the fast server really took the
requests the comparison is about.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from compression import compress, save_table
from compression.synthetic import synthetic_table, zipf_frequencies
from service.wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE, ParsedLookup, decode_binary_response, encode_binary_request

from test_e2e import serving

pytestmark = pytest.mark.e2e

TOKEN = "read-token-0123456789"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
ENV = {
    "EMBSERVE_READ_TOKEN": TOKEN,
    "EMBSERVE_MAX_IDS_PER_REQUEST": "3000",
    "EMBSERVE_MAX_RESPONSE_BYTES": str(2 * 1024 * 1024),
    "EMBSERVE_LOG_LEVEL": "warning",
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(fast path on, fast path off): base URLs of two servers of the same table."""
    folder = tmp_path_factory.mktemp("tables")
    freqs = zipf_frequencies(20_000, seed=3)
    table, _ = compress(synthetic_table(20_000, 64, freqs, seed=3), freqs, ratio=8)
    save_table(table, folder / "items.safetensors")
    with serving(folder, ENV) as fast, serving(folder, {**ENV, "EMBSERVE_HTTP_FAST_PATH": "false"}) as slow:
        yield fast, slow


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def binary_post(ids: list[int], table: str = "items", auth: str = AUTH, extra: str = "", accept: str = BINARY_RESPONSE_TYPE) -> bytes:
    body = encode_binary_request([ParsedLookup(table, np.asarray(ids, dtype=np.int64), None, "none")])
    return (
        f"POST /v1/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: {BINARY_REQUEST_TYPE}\r\nAccept: {accept}\r\n{auth}{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def json_post(payload: object, auth: str = AUTH, extra: str = "") -> bytes:
    body = orjson.dumps(payload)
    return f"POST /v1/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body


class Conn:
    """A raw HTTP/1.1 connection: send bytes, read whole responses off the socket."""

    def __init__(self, base: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", _port(base)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def _take_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before {marker!r}; have {self.buf[:200]!r}")
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> bytes:
        """One response's bytes as sent (interim 100 Continue included), ``date`` normalized."""
        head = self._take_until(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100 "):
            return head + self.response()
        lower = head.lower()
        length = re.search(rb"\r\ncontent-length: (\d+)\r\n", lower)
        if length is not None:
            body = self._take(int(length.group(1)))
        elif b"\r\ntransfer-encoding: chunked\r\n" in lower:
            body = b""
            while True:
                size_line = self._take_until(b"\r\n")
                size = int(size_line.strip(), 16)
                body += size_line + self._take(size + 2)
                if size == 0:
                    break
        else:
            body = b""
        return re.sub(rb"\r\ndate: [^\r]*\r\n", b"\r\ndate: -\r\n", head) + body

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def fast_count(base: str) -> float:
    return _metric(base, "embserve_http_fast_path_requests_total")


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def lookup_metrics(base: str) -> dict[str, float]:
    """Every sample the lookup route moves, but the latency buckets (their timing differs)."""
    wanted = ("embserve_http_requests_total", "embserve_http_request_errors_total", "embserve_http_request_duration_seconds_count",
              "embserve_lookup_ids_total", "embserve_lookup_unknown_ids_total", "embserve_lookup_duration_seconds_count")
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(wanted) and "/metrics" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def both(servers: tuple[str, str], requests: list[bytes], pipelined: bool = False) -> tuple[list[bytes], list[bytes]]:
    """Each server's responses to ``requests`` on one connection (one by one, or all sent at once)."""
    answers = []
    for base in servers:
        conn = Conn(base)
        try:
            if pipelined:
                conn.send(b"".join(requests))
                answers.append([conn.response() for _ in requests])
            else:
                got = []
                for request in requests:
                    conn.send(request)
                    got.append(conn.response())
                answers.append(got)
        finally:
            conn.close()
    return answers[0], answers[1]


def test_keep_alive_answers_match_byte_for_byte_and_take_the_fast_path(servers: tuple[str, str]) -> None:
    fast, _ = servers
    before = fast_count(fast)
    requests = [binary_post([1]), binary_post([5, 7, 10**9]), binary_post([3], accept=f"{BINARY_RESPONSE_TYPE}; dtype=f16"),
                json_post({"lookups": [{"table": "items", "ids": [1, 2]}]}), binary_post(list(range(900)))]
    got, want = both(servers, requests)
    assert got == want
    assert all(r.startswith(b"HTTP/1.1 200 OK\r\n") for r in got)
    assert fast_count(fast) - before == len(requests)
    values, found, unknown = decode_binary_response(got[1].split(b"\r\n\r\n", 1)[1])[0]
    assert values.shape == (3, 64) and found.tolist() == [True, True, False] and unknown == 1


def test_pipelined_requests_answer_in_order_across_both_paths(servers: tuple[str, str]) -> None:
    requests = [
        binary_post([1]),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",  # ASGI
        binary_post([2]),
        json_post({"lookups": [{"table": "items", "ids": list(range(1500))}]}),  # answer estimated > 1 MiB: handed over, chunked
        binary_post([3]),  # behind a request still on the ASGI path: queued there, in order
        binary_post([4], table="nope"),
        binary_post([5]),
    ]
    got, want = both(servers, requests, pipelined=True)
    assert got == want
    assert [r.split(b"\r\n", 1)[0] for r in got] == [b"HTTP/1.1 200 OK"] * 5 + [b"HTTP/1.1 404 Not Found", b"HTTP/1.1 200 OK"]
    assert b"transfer-encoding: chunked" in got[3]


def test_refusals_match(servers: tuple[str, str]) -> None:
    fast, _ = servers
    requests = [
        binary_post([1], auth=""),  # 401 + www-authenticate
        binary_post([1], auth="Authorization: Bearer wrong-token-0123456789\r\n"),  # 403
        binary_post([1], auth="Authorization: Basic abc\r\n"),  # 401
        binary_post(list(range(3001))),  # over the ID limit: 413 (its 24 KB body is over the inline size: ASGI)
        binary_post([1], table="nope"),  # 404
        binary_post([1], accept=f"{BINARY_RESPONSE_TYPE}; dtype=f64"),  # 406
        b"POST /v1/lookup HTTP/1.1\r\nHost: x\r\n" + AUTH.encode() + b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",  # 415
        b"POST /v1/lookup HTTP/1.1\r\nHost: x\r\n" + AUTH.encode() + f"Content-Type: {BINARY_REQUEST_TYPE}\r\nContent-Length: 3\r\n\r\nabc".encode(),
        json_post({"lookups": [{"table": "items", "ids": "x"}]}),  # 422
        b"POST /v1/lookup HTTP/1.1\r\nHost: x\r\n" + AUTH.encode() + b"Content-Type: application/json\r\nContent-Length: 1\r\n\r\n{",  # 400
        json_post({"lookups": [{"table": "items", "ids": [1, 2], "offsets": [1], "pooling": "sum"}]}),  # 422 offsets
    ]
    before = fast_count(fast)
    got, want = both(servers, requests)
    assert got == want
    statuses = [int(r.split(b" ", 2)[1]) for r in got]
    assert statuses == [401, 403, 401, 413, 404, 406, 415, 400, 422, 400, 422]
    assert b"www-authenticate: Bearer\r\n" in got[0]
    assert fast_count(fast) - before == len(requests) - 1  # every other refusal answered by the fast path itself


def test_what_the_fast_path_leaves_to_asgi_matches(servers: tuple[str, str]) -> None:
    fast, _ = servers
    body = encode_binary_request([ParsedLookup("items", np.arange(4, dtype=np.int64), None, "none")])
    head = f"POST /v1/lookup HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Type: {BINARY_REQUEST_TYPE}\r\nAccept: {BINARY_RESPONSE_TYPE}\r\n"
    chunked = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    requests = [
        chunked,
        (head + f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body,
        (head.replace("/v1/lookup", "/v1/lookup?x=1") + f"Content-Length: {len(body)}\r\n\r\n").encode() + body,
        (head + f"Content-Length: {len(body) + 70_000}\r\n\r\n").encode() + body + b"\0" * 70_000,  # over the inline size: thread pool
        json_post({"lookups": [{"table": "items", "ids": list(range(2900))}]}),  # 413: estimated over EMBSERVE_MAX_RESPONSE_BYTES
    ]
    before = fast_count(fast)
    got, want = both(servers, requests)
    assert got == want
    assert [int(r.split(b" ", 2)[1]) for r in got] == [200, 100, 200, 400, 413]
    assert fast_count(fast) - before == 1  # the 413: refused on its checks; the rest went through ASGI


def test_http_1_0_and_connection_close_end_the_connection_the_same_way(servers: tuple[str, str]) -> None:
    for request in (binary_post([1], extra="Connection: close\r\n"), binary_post([1]).replace(b"HTTP/1.1", b"HTTP/1.0", 1)):
        answers = []
        for base in servers:
            conn = Conn(base)
            conn.send(request)
            answers.append(conn.response())
            assert conn.closed_by_server()
            conn.close()
        assert answers[0] == answers[1]
        assert b"\r\nconnection: close\r\n" in answers[0]


def test_request_metrics_move_the_same(servers: tuple[str, str]) -> None:
    requests = [binary_post([1, 2, 10**9]), binary_post([1], auth=""), binary_post([9], table="nope"),
                json_post({"lookups": [{"table": "items", "ids": [4]}]}), binary_post(list(range(3001)))]
    before = [lookup_metrics(base) for base in servers]
    both(servers, requests, pipelined=True)
    deltas = []
    for base, was in zip(servers, before, strict=True):
        now = lookup_metrics(base)
        deltas.append({k: v - was.get(k, 0.0) for k, v in now.items() if v != was.get(k, 0.0)})
    assert deltas[0] == deltas[1]
    assert deltas[0]['embserve_http_requests_total{method="POST",route="/v1/lookup",status="200"}'] == 2
    assert deltas[0]['embserve_lookup_unknown_ids_total{table="items"}'] == 1


def test_a_client_gone_mid_body_is_counted_the_same(servers: tuple[str, str]) -> None:
    key = 'embserve_http_requests_total{method="POST",route="/v1/lookup",status="400"}'
    for base in servers:
        before = lookup_metrics(base).get(key, 0.0)
        conn = Conn(base)
        conn.send(binary_post([1, 2, 3])[:-5])
        conn.close()
        deadline = time.monotonic() + 10
        while lookup_metrics(base).get(key, 0.0) == before:  # polling the server's own count until it sees the close
            assert time.monotonic() < deadline, f"{base} did not count the abandoned request"
            time.sleep(0.02)
        assert lookup_metrics(base).get(key, 0.0) == before + 1


def test_a_request_arriving_in_pieces_is_answered_the_same(servers: tuple[str, str]) -> None:
    fast, _ = servers
    request = binary_post([1, 2, 3])
    head_end = request.index(b"\r\n\r\n") + 4
    pieces = [request[:20], request[20:head_end], request[head_end : head_end + 7], request[head_end + 7 :]]
    before = fast_count(fast)
    answers = []
    for base in servers:
        conn = Conn(base)
        for piece in pieces:  # separate writes: the server may see each in its own read
            conn.send(piece)
        answers.append(conn.response())
        conn.send(request)  # and the connection is still good for the next one
        answers.append(conn.response())
        conn.close()
    assert answers[0] == answers[1] == answers[2] == answers[3]
    assert fast_count(fast) - before == 2


def test_a_repeated_head_is_answered_as_a_parsed_one(servers: tuple[str, str]) -> None:
    """The lean protocol does not re-parse a head identical to the last one it took (same bytes:
    same checks, and its parser stays at the message boundary): whatever follows such a head -
    other IDs, another table, a body it cannot read - and the heads around it are answered as
    the ASGI path answers them, one by one and pipelined, with the same metrics.  A read token
    that passed is remembered: one that differs from it is still checked (403)."""
    fast, _ = servers
    first = binary_post([1])
    head = first[: first.index(b"\r\n\r\n") + 4]
    other_table = binary_post([1], table="nopex")  # a name as long as "items": the very same head
    garbage = head + b"\xff" * (len(first) - len(head))
    assert other_table.startswith(head) and other_table != first
    near_token = f"Authorization: Bearer {TOKEN[:-1]}{chr(ord(TOKEN[-1]) + 1)}\r\n"  # a token granted a moment ago, but its last byte
    requests = [first, binary_post([2]), binary_post([10**9]), other_table, garbage, binary_post([3], auth=""),
                binary_post([4]), binary_post([5, 6]), binary_post([7]), json_post({"lookups": [{"table": "items", "ids": [8]}]}), binary_post([9]),
                binary_post([10], auth=near_token), binary_post([11])]
    for pipelined in (False, True):
        before = [lookup_metrics(base) for base in servers]
        count_before = fast_count(fast)
        got, want = both(servers, requests, pipelined)
        assert got == want
        assert [int(r.split(b" ", 2)[1]) for r in got] == [200, 200, 200, 404, 400, 401, 200, 200, 200, 200, 200, 403, 200]
        assert fast_count(fast) - count_before == len(requests)
        deltas = [{k: v - was.get(k, 0.0) for k, v in lookup_metrics(base).items() if v != was.get(k, 0.0)}
                  for base, was in zip(servers, before, strict=True)]
        assert deltas[0] == deltas[1]
        assert deltas[0]['embserve_lookup_unknown_ids_total{table="items"}'] == 1
