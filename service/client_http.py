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

import socket
import ssl

import httptools

_RECV_BYTES = 256 * 1024
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
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in Host
        self._host_line = b"Host: " + (name if port == (443 if scheme == "https" else 80) else f"{name}:{port}").encode("idna") + b"\r\n"
        # the answer being parsed (httptools calls these methods back)
        self._chunks: list[bytes] = []
        self._complete = False

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write: do not wait for an ACK
        if self.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, target: str, body: bytes | None, headers: bytes) -> tuple[int, bytes]:
        """Send one request and read its whole answer: ``(status, body)``.  ``headers``: header
        lines, each ending in CRLF, without Host and Content-Length.  Raises
        :class:`ClosedBeforeAnswer` when the server closed the connection before answering,
        :class:`ResponseError` for an unreadable answer, ``OSError`` (timeouts included) for the
        rest; after any of them the connection is closed."""
        if self.sock is None:
            self.connect()
        sock = self.sock
        assert sock is not None
        head = method.encode("ascii") + b" " + target.encode("ascii") + b" HTTP/1.1\r\n" + self._host_line + headers
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        head += b"\r\n"
        try:
            if body is None:
                sock.sendall(head)
            elif len(body) < _JOIN_BELOW:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
            status, content, keep_alive = self._read_answer(sock)
        except BaseException:
            self.close()  # a request cut anywhere leaves the connection mid-message
            raise
        if not keep_alive:
            self.close()
        return status, content

    def _read_answer(self, sock: socket.socket) -> tuple[int, bytes, bool]:
        parser = httptools.HttpResponseParser(self)
        self._chunks = []
        self._complete = False
        received = False
        while not self._complete:
            data = sock.recv(_RECV_BYTES)
            if not data:
                if not received:
                    raise ClosedBeforeAnswer("the server closed the connection before answering")
                raise ResponseError("the server closed the connection in the middle of its answer")
            received = True
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                raise ResponseError(f"unreadable answer: {exc}") from exc
        content = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        return parser.get_status_code(), content, parser.should_keep_alive()

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
