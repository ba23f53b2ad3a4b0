"""The blocking client's HTTP/1.1 connection: one ``sendall`` per request, answers parsed by
``httptools`` (llhttp, the C parser uvicorn serves with).

Why not the standard library's ``http.client``: it parses every answer's headers through
``email.parser`` and builds a message object, about 75 us of client CPU per batch-1 lookup on
the CI machine against 7 us here (same server, same requests, thread CPU time).  A ranker calls
the service from its own request path, and on a box whose cores the ranker shares, the client's
CPU is throughput: bench/service.py reports it per request.

What it does and does not do: keep-alive connections (closed when the server says
``Connection: close``), fixed-length and chunked answers, TLS through ``ssl``, a timeout on
every socket operation.  No proxies, no redirects, no compression: the service sends none.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import sys

import httptools
import numpy as np

# an answer's first read: its head and, up to about batch 120 at 64 dims, its whole body
_HEAD_READ = 32 * 1024
# plain connections time out through SO_RCVTIMEO / SO_SNDTIMEO (struct timeval: two C longs
# on Linux; elsewhere, Python's own timeouts)
_KERNEL_TIMEOUTS = sys.platform == "linux"
# bodies of a known length from this size are received straight into their own buffer
_DIRECT_MIN = 64 * 1024
_JOIN_BELOW = 64 * 1024  # smaller bodies go out in the same buffer as the head: one send


class ResponseError(ConnectionError):
    """The server's answer could not be read as HTTP/1.1 (or ended before it was complete)."""


class ClosedBeforeAnswer(ConnectionResetError):
    """The server closed the connection before any byte of the answer: a kept-alive connection
    it had closed meanwhile, so the request can be sent again on a new one."""


class HttpConnection:
    """One keep-alive connection to ``host:port``; not thread-safe (the client keeps one per
    thread).  :meth:`request` opens it when needed."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._host_line = _host_line(scheme, host, port)
        # the answer being parsed (httptools calls these methods back)
        self._parser: httptools.HttpResponseParser | None = None
        self._chunks: list[bytes] = []
        self._complete = False
        self._keep_alive = False
        self._length: int | None = None  # the answer's Content-Length
        self._chunked = False  # it came with a Transfer-Encoding
        # where each answer's head (and a small body) is received: reused, the body leaves it as bytes
        self._scratch = bytearray(_HEAD_READ)
        self._scratch_view = memoryview(self._scratch)

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write: do not wait for an ACK
        if self.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        elif _KERNEL_TIMEOUTS:
            # a blocking socket whose sends and receives time out in the kernel: with Python's own
            # timeout every send and receive is preceded by a poll(), one system call and one GIL
            # hand-off more per call (three per lookup); an expired one raises BlockingIOError,
            # which request() turns into the TimeoutError a timed-out socket raises
            whole = int(self.timeout)
            timeval = struct.pack("ll", whole, int((self.timeout - whole) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            sock.settimeout(None)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, target: str, body: bytes | None, headers: bytes) -> tuple[int, bytes | memoryview]:
        """Send one request and read its whole answer: ``(status, body)``; a large body of known
        length comes as a read-only memoryview of its own buffer, others as bytes.  ``headers``: header
        lines, each ending in CRLF, without Host and Content-Length.  Raises
        :class:`ClosedBeforeAnswer` when the server closed the connection before answering,
        :class:`ResponseError` for an unreadable answer, ``OSError`` (timeouts included) for the
        rest; after any of them the connection is closed."""
        if self.sock is None:
            self.connect()
        sock = self.sock
        assert sock is not None
        try:
            head = _request_head(method, target, self._host_line, headers, body)
            if body is None:
                sock.sendall(head)
            elif len(body) < _JOIN_BELOW:
                sock.sendall(head + body)
            else:  # a large body is not copied into one buffer with its head
                sock.sendall(head)
                sock.sendall(body)
            status, content, keep_alive = self._read_answer(sock)
        except BlockingIOError as exc:  # a kernel timeout ran out (connect)
            self.close()
            raise TimeoutError(f"timed out ({self.timeout:g} s)") from exc
        except BaseException:
            self.close()  # a request cut anywhere leaves the connection mid-message
            raise
        if not keep_alive:
            self.close()
        return status, content

    def _read_answer(self, sock: socket.socket) -> tuple[int, bytes | memoryview, bool]:
        """Receive one answer.  The head (and a small body with it) is read into the connection's
        scratch buffer and parsed by httptools; a body of known length from ``_DIRECT_MIN`` bytes
        is then received straight into a buffer of its own, never passing the parser: a 256 KiB
        answer was copied twice more before (httptools hands each chunk over as a new bytes, and
        the chunks were joined), two of the three copies a batch-1024 answer cost the client."""
        parser = self._parser = httptools.HttpResponseParser(self)
        self._chunks = []
        self._complete = self._keep_alive = False
        self._length = None
        self._chunked = False
        scratch, view = self._scratch, self._scratch_view
        got = 0
        end = -1
        while end < 0 and got < len(scratch):  # until the head's blank line is in (one read, normally)
            n = sock.recv_into(view[got:])
            if not n:
                if not got:
                    raise ClosedBeforeAnswer("the server closed the connection before answering")
                raise ResponseError("the server closed the connection in the middle of its answer")
            end = scratch.find(b"\r\n\r\n", max(0, got - 3), got + n)
            got += n
        head_end = end + 4 if end >= 0 else got  # no blank line in the first 32 KiB: the parser decides
        self._feed(parser, view[:head_end])
        length = self._length
        if not self._complete and length is not None and length >= _DIRECT_MIN and not self._chunked:
            body = memoryview(np.empty(length, dtype=np.uint8))  # no zero-fill: every byte is received over
            have = min(got - head_end, length)
            body[:have] = view[head_end : head_end + have]
            while have < length:
                n = sock.recv_into(body[have:])
                if not n:
                    raise ResponseError("the server closed the connection in the middle of its answer")
                have += n
            # bytes past the answer are no answer to anything this client sent: not kept alive
            return parser.get_status_code(), body.toreadonly(), self._keep_alive and got - head_end <= length
        if got > head_end:
            self._feed(parser, view[head_end:got])
        while not self._complete:
            n = sock.recv_into(view)
            if not n:
                raise ResponseError("the server closed the connection in the middle of its answer")
            self._feed(parser, view[:n])
        content = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        return parser.get_status_code(), content, self._keep_alive

    @staticmethod
    def _feed(parser: httptools.HttpResponseParser, data: memoryview) -> None:
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise ResponseError(f"unreadable answer: {exc}") from exc

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" and value.isdigit():  # llhttp itself refuses duplicates and odd values
            self._length = int(value)
        elif name == b"transfer-encoding":
            self._chunked = True

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        # read now: once the callback returns, llhttp resets the message's flags and
        # should_keep_alive() says False for every answer (httptools 0.9)
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()


# ------------------------------------------------------------------ asyncio


class _AnswerProtocol(asyncio.Protocol):
    """One pooled connection of :class:`AsyncHttpPool`: writes a request, parses its answer with
    httptools as it arrives and hands it to the waiting coroutine."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self._chunks: list[bytes] = []
        self._received = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        """Write one request; the future resolves to ``(status, body, keep_alive)``."""
        assert self.transport is not None and self._waiter is None
        self._parser = httptools.HttpResponseParser(self)
        self._chunks = []
        self._received = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ResponseError(f"unreadable answer: {exc}"))
            self.close()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            waiter.set_result((self._parser.get_status_code(), body, self._parser.should_keep_alive()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._received:
            self._fail(ResponseError("the server closed the connection in the middle of its answer"))
        else:
            self._fail(ClosedBeforeAnswer("the server closed the connection before answering"))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class AsyncHttpPool:
    """Keep-alive connections to ``host:port`` for coroutines: at most ``max_connections`` open
    (a request waits for a free one), each carrying one request at a time.  The asyncio twin of
    :class:`HttpConnection`, with the same errors and the same one retry of a kept-alive
    connection the server closed (``request`` raises, the caller retries: see
    ``AsyncEmbeddingClient``).  Why not httpx: its per-request Python (request and response
    models, header objects, the connection pool's state machine) cost several times the service's
    own CPU for a small lookup."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float, max_connections: int) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.timeout = timeout
        self._limit = asyncio.Semaphore(max_connections)
        self._idle: list[_AnswerProtocol] = []
        self._open: set[_AnswerProtocol] = set()
        self._host_line = _host_line(scheme, host, port)

    async def _connect(self) -> _AnswerProtocol:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self.scheme == "https" else None
        _, protocol = await loop.create_connection(_AnswerProtocol, self.host, self.port, ssl=context,
                                                   server_hostname=self.host if context is not None else None)
        sock = protocol.transport.get_extra_info("socket") if protocol.transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(protocol)
        return protocol

    async def request(self, method: str, target: str, body: bytes | None, headers: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of one request on an idle connection (or a new one).  A
        :class:`ClosedBeforeAnswer` carries ``reused``: whether the connection had carried a
        request before (then it may be retried on a fresh one)."""
        head = _request_head(method, target, self._host_line, headers, body)
        data = head if body is None else head + body
        async with self._limit:
            protocol = None
            while self._idle:
                candidate = self._idle.pop()
                if not candidate.closed:
                    protocol = candidate
                    break
                self._open.discard(candidate)
            reused = protocol is not None
            try:
                async with asyncio.timeout(self.timeout):
                    if protocol is None:
                        protocol = await self._connect()
                    status, content, keep_alive = await protocol.send(data)
            except BaseException as exc:
                if protocol is not None:
                    protocol.close()
                    self._open.discard(protocol)
                if isinstance(exc, ClosedBeforeAnswer):
                    exc.reused = reused  # type: ignore[attr-defined]
                raise
            if keep_alive and not protocol.closed:
                self._idle.append(protocol)
            else:
                protocol.close()
                self._open.discard(protocol)
            return status, content

    async def aclose(self) -> None:
        for protocol in list(self._open):
            protocol.close()
        self._open.clear()
        self._idle.clear()


def _host_line(scheme: str, host: str, port: int) -> bytes:
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in Host
    return b"Host: " + (name if port == (443 if scheme == "https" else 80) else f"{name}:{port}").encode("idna") + b"\r\n"


def _request_head(method: str, target: str, host_line: bytes, headers: bytes, body: bytes | None) -> bytes:
    """Request line and headers, ending in the blank line; Content-Length when there is a body."""
    head = method.encode("ascii") + b" " + target.encode("ascii") + b" HTTP/1.1\r\n" + host_line + headers
    if body is None:
        return head + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body)
