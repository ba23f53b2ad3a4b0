"""Small ``POST /v1/lookup`` requests answered in uvicorn's HTTP protocol, below ASGI.

Why: with the lookup already in front of Starlette (``LookupFastPath``), a batch-1 lookup still
cost ~4x what uvicorn needs to answer the same request from an empty ASGI app, and the profile
(bench/results/profile_batch1.md) put half of it in uvicorn's ``RequestResponseCycle.send``
(header checks, two socket writes: head, then body) and most of the rest in building the scope,
the per-request task and ``receive``/``send`` hand-offs.  A lookup whose whole body is in hand
needs none of that: :class:`LookupProtocol` (a subclass of uvicorn's httptools protocol,
installed with ``Config(http=...)``) collects the body itself, runs the lookup with the very
checks, error bodies and metrics of ``LookupFastPath`` (:meth:`LookupFastPath.answer_now`), and
writes status line, headers and body with one ``transport.write``.

It takes a request only when it can answer exactly as the ASGI path would; everything else
goes to uvicorn's normal handling, unchanged:

* the request: ``POST`` to exactly ``/v1/lookup`` (no query, no escapes, no ``root_path``),
  HTTP/1.1, a ``Content-Length`` of at most the inline body limit (so no chunked bodies), no
  ``Expect: 100-continue``, no upgrade;
* the connection: no request of it still in the ASGI path (pipelined requests stay in order),
  none queued, the transport open and its writes not paused (a client that does not read gets
  the ASGI path's back-pressure), no access log and no concurrency limit configured (both
  live in uvicorn's cycle);
* the answer: computed on the event loop (not batched, not for the thread pool) and estimated
  small enough for one write; a bigger one is handed over after the checks, before any lookup
  ran, with its body, as if this class had never looked at it.

The bytes written are the ASGI path's: uvicorn's status line and default headers (``date``,
``server``), then ``content-type``, ``content-length``, any error header, and ``connection:
close`` when the connection is not kept alive (tests/test_fasthttp.py compares both paths
byte for byte).  ``EMBSERVE_HTTP_FAST_PATH=false`` turns it off.

A connection starts on :class:`LeanLookupProtocol`, which answers whole lookups with even less
(no per-request callbacks, cycle or timer: 52 -> 47 us of server CPU per batch-1 lookup, same
run) and hands the connection to :class:`LookupProtocol` at the first request it would not take.
On a kept-alive connection it does less again for the common request: a head byte-identical to
the last one it took is not parsed again (same bytes, same checks); a head asking exactly for a
binary answer to a binary body goes to :meth:`LookupFastPath.answer_binary_now` (no header dict,
no negotiation), whose checks and sizes are planned once per request head; the 200 head's fixed
part is built once a second; metrics go to lock-free loop-side series (service/metrics.py); the
sketch gets the IDs' bytes.  Together: 24 -> 5 us of Python per batch-1 lookup in process, and
0.59x (0.55..0.65) the server CPU of the commit before, same run (bench/batch1_cpu.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httptools

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .errors import ApiError
from .routers.lookup import LookupFastPath, Reply, is_large
from .wire import BINARY_REQUEST_TYPE, BINARY_RESPONSE_TYPE

# uvicorn releases the byte-for-byte tests (tests/test_fasthttp.py) ran against: this class
# subclasses uvicorn's protocol internals, so another release gets the plain ASGI path
# (service/serving.py) until the tests are run on it and it is added here
TESTED_UVICORN: tuple[str, ...] = ("0.54.", "0.55.")

_PATH = LookupFastPath.PATH.encode()
# below this the head and the body are joined into one bytes (one copy of a small body); above
# it they go to writelines, which uvloop sends with one writev and no copy
_JOIN_BELOW = 16 * 1024


def write_reply(transport: asyncio.Transport, default_headers: list[tuple[bytes, bytes]], reply: Reply, keep_alive: bool) -> None:
    """Status line, headers and body in one write, the bytes uvicorn writes for the ASGI
    path's ``http.response.start`` + ``http.response.body``."""
    status, payload, media_type, extra = reply
    head = [STATUS_LINE[status]]
    for name, value in default_headers:  # date, server
        head += (name, b": ", value, b"\r\n")
    content_type = b"content-type: " + media_type.encode("latin-1") + b"\r\n"
    content_length = b"content-length: %d\r\n" % len(payload)
    if status == 200 and is_large(payload):
        # over the slicing threshold though its estimate was not: the ASGI path sends it as a
        # BufferResponse, whose headers come length first
        head += (content_length, content_type)
    else:
        head += (content_type, content_length)
    for name, value in extra:  # e.g. www-authenticate on a 401
        head += (name, b": ", value, b"\r\n")
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    if len(payload) < _JOIN_BELOW:
        head.append(payload)  # type: ignore[arg-type]  # bytes or bytearray: join takes both
        transport.write(b"".join(head))
    else:
        transport.writelines((b"".join(head), payload))


_BINARY_REQUEST = BINARY_REQUEST_TYPE.encode()
_BINARY_RESPONSE = BINARY_RESPONSE_TYPE.encode()


class OkBinaryHead:
    """The head of a kept-alive 200 binary answer up to its ``Content-Length`` value: what
    :func:`write_reply` writes before the length, built once per ``default_headers`` list.
    uvicorn assigns a new list when its ``date`` changes (once a second), and this holds the list
    it was built from, so an ``is`` test says whether it is still current."""

    __slots__ = ("headers", "prefix")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.prefix = b""

    def get(self, default_headers: list[tuple[bytes, bytes]]) -> bytes:
        if default_headers is not self.headers:
            head = [STATUS_LINE[200]]
            for name, value in default_headers:  # date, server: as write_reply
                head += (name, b": ", value, b"\r\n")
            head += (b"content-type: ", _BINARY_RESPONSE, b"\r\ncontent-length: ")
            self.prefix = b"".join(head)
            self.headers = default_headers
        return self.prefix


def abandoned_status(responder: LookupFastPath, headers: dict[bytes, bytes]) -> int:
    """The status the ASGI path counts for a lookup whose client left mid-body: its head's
    refusal, else 400 "client disconnected"."""
    try:
        responder.check_head(headers)
    except ApiError as refused:
        return refused.status
    return 400


class LookupProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering small lookups itself (module docstring)."""

    responder: LookupFastPath  # set on the subclass :func:`protocol_class` builds
    body_limit: int  # largest Content-Length taken
    fast_counter: Any  # embserve_http_fast_path_requests_total

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # the request being received on the fast path: its body so far, headers, whether to keep alive
        self._fast_body: bytearray | None = None
        self._fast_headers: dict[bytes, bytes] = {}
        self._fast_keep_alive = True
        self._fast_started = 0.0
        self._close_after = False  # shutdown() came while a fast request was being received

    def on_headers_complete(self) -> None:
        if self._takes():
            self._fast_body = bytearray()
            self._fast_headers = dict(self.headers)  # last value wins, as in LookupFastPath
            self._fast_keep_alive = self.parser.should_keep_alive()
            self._fast_started = time.perf_counter()  # the ASGI path times from here too (its task starts)
            return
        super().on_headers_complete()

    def _takes(self) -> bool:
        """This request can be answered here exactly as the ASGI path would (module docstring)."""
        parser = self.parser
        if self.url != _PATH or parser.get_method() != b"POST" or parser.get_http_version() != "1.1":
            return False
        if self.expect_100_continue or parser.should_upgrade() or self.root_path or self.access_log or self.limit_concurrency is not None:
            return False
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline or self.transport.is_closing() or self.flow.write_paused:
            return False
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return False  # repeated or odd: the ASGI path's answer
                length = int(value)
            elif name == b"transfer-encoding":
                return False
        return length is not None and length <= self.body_limit

    def on_body(self, body: bytes) -> None:
        if self._fast_body is None:
            super().on_body(body)
            return
        self._fast_body += body

    def on_message_complete(self) -> None:
        body = self._fast_body
        if body is None:
            super().on_message_complete()
            return
        self._fast_body = None
        reply = self.responder.answer_now(self._fast_headers, bytes(body), self._fast_started)
        if reply is None:
            self._hand_over(body)
            return
        self.fast_counter.inc()
        keep_alive = self._fast_keep_alive and not self._close_after
        self._write(reply, keep_alive)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()  # request count, keep-alive timer, as after any response

    def _hand_over(self, body: bytearray) -> None:
        """Give a request this class took at its headers to uvicorn's normal path, body complete:
        the same cycle and task ``on_headers_complete``, ``on_body`` and ``on_message_complete``
        would have made.  (The parser still holds this message's method, version and keep-alive
        flags: the message-complete callback runs before it resets them.)"""
        super().on_headers_complete()
        cycle = self.cycle
        if self._close_after:
            cycle.keep_alive = False
        cycle.body += body
        cycle.more_body = False
        cycle.message_event.set()

    def _write(self, reply: Reply, keep_alive: bool) -> None:
        write_reply(self.transport, self.server_state.default_headers, reply, keep_alive)

    def shutdown(self) -> None:
        if self._fast_body is not None:
            self._close_after = True  # answer it, then close: what uvicorn does for a request in flight
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._fast_body is not None:
            # gone mid-body: the ASGI path counts this request too, with the status it would have
            # answered (its head's checks, else 400 "client disconnected"), though nothing is sent
            self._fast_body = None
            self.responder.record(abandoned_status(self.responder, self._fast_headers), self._fast_started)
        super().connection_lost(exc)


# a head longer than this, still without its blank line, is left to uvicorn (which refuses it)
_HEAD_MAX = 16 * 1024


class LeanLookupProtocol(asyncio.Protocol):
    """The connection's protocol until a request needs more than a lookup: each whole
    ``POST /v1/lookup`` is parsed (httptools, as uvicorn does), checked with
    :meth:`LookupProtocol._takes`'s rules and answered with the same ``answer_now`` and the same
    bytes, without uvicorn's per-request machinery (its callbacks, cycle state, keep-alive timer
    re-armed per request): at batch 1 that machinery was half the server's CPU, and a protocol
    that parses a request and writes a constant costs 8 us against uvicorn's 33-41.

    Pipelined lookups are answered in order, one after another.  Anything else - another route
    or method, a request it would not take, an answer ``answer_now`` leaves to ASGI - hands the
    connection over for good to :class:`LookupProtocol` (uvicorn's protocol), which gets the
    bytes from that request's first byte on, as if it had had the connection all along.  A
    lookup still arriving (head or body in pieces, at most a 16 KiB head and the inline body
    limit) is kept until it is whole; a client gone meanwhile is counted as the ASGI path
    counts it."""

    fallback: type[LookupProtocol]  # set on the subclass protocol_class builds, with:
    responder: LookupFastPath
    body_limit: int
    fast_counter: Any
    ok_head: OkBinaryHead

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._args = (config, server_state, app_state, _loop)
        self.server_state = server_state
        self.loop = _loop or asyncio.get_event_loop()
        self.timeout_keep_alive = config.timeout_keep_alive
        # what LookupProtocol._takes refuses for a whole server: then every connection is uvicorn's
        self._eligible = not (config.root_path or config.limit_concurrency is not None
                              or logging.getLogger("uvicorn.access").hasHandlers())
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets it
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass
        self._pending = b""  # bytes of a request not yet whole, from its first byte
        self._want = 0  # its full length, once its head is in and taken (0: head not yet in)
        self._body_at = 0  # where its body starts
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        # the head asks exactly for a binary answer to a binary body (then answer_binary_now
        # answers it), and its Authorization value: found in _take_head's pass over the headers
        self._binary = False
        self._authorization: bytes | None = None
        # the last head taken (parsed and checked) and its Content-Length; whether the request
        # being answered was fed to the parser (a repeat of that head is not: see data_received)
        self._head = b""
        self._length = 0
        self._parsed = False
        self._keep_alive = True
        self._started = 0.0
        self._write_paused = False
        self._close_after = False
        self._last_answer = 0.0
        self._idle: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._eligible:
            self._hand_over(b"")
            return
        self.server_state.connections.add(self)  # type: ignore[arg-type]  # shutdown() reaches it there

    def data_received(self, data: bytes) -> None:
        if self._pending:
            data = self._pending + data
            self._pending = b""
        while data:
            want = self._want
            if not want:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if len(data) > _HEAD_MAX:
                        self._hand_over(data)
                    else:
                        self._pending = data
                    return
                head_end = end + 4
                head = self._head
                if head_end == len(head) and data.startswith(head) and not self._write_paused and not self.transport.is_closing():
                    # the same head as the last request taken: the same answer to every check,
                    # and the parser, not fed it, stays at the message boundary it is at
                    self._started = time.perf_counter()
                    self._parsed = False
                    want = head_end + self._length
                else:
                    want = self._take_head(data, head_end)
                if not want:
                    self._hand_over(data)
                    return
            if len(data) < want:
                self._want = want
                self._pending = data
                return
            self._want = 0
            if not self._answer(data, want):
                return
            data = data[want:]

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    def shutdown(self) -> None:
        """Server shutdown: as uvicorn, close now unless a taken request is still arriving."""
        if self._want:
            self._close_after = True
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)  # type: ignore[arg-type]
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._want:  # taken at its head, gone mid-body: counted as the ASGI path counts it
            self._want = 0
            self.responder.record(abandoned_status(self.responder, dict(self._headers)), self._started)

    # ---- httptools callbacks (the head only)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))  # as uvicorn keeps them

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()
        self._started = time.perf_counter()  # LookupProtocol times from here too

    # ---- the request

    def _take_head(self, data: bytes, head_end: int) -> int:
        """Parse the head at ``data[:head_end]``; the request's whole length when it is taken,
        0 when it is not (then the parser is left mid-message: the connection is handed over)."""
        self._url = b""
        self._headers = []
        self._head = b""
        parser = self.parser
        head = data[:head_end]
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return 0
        if self._url != _PATH or parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or parser.should_upgrade():
            return 0
        if self._write_paused or self.transport.is_closing():
            return 0
        length = None
        content_type = accept = authorization = None  # last value wins, as in dict(headers)
        for name, value in self._headers:
            if name == b"content-length":
                if length is not None or not value.isdigit():
                    return 0
                length = int(value)
            elif name == b"content-type":
                content_type = value
            elif name == b"accept":
                accept = value
            elif name == b"authorization":
                authorization = value
            elif name in (b"transfer-encoding", b"expect"):
                return 0
        if length is None or length > self.body_limit:
            return 0
        self._binary = content_type == _BINARY_REQUEST and accept == _BINARY_RESPONSE
        self._authorization = authorization
        self._body_at = head_end
        self._head = head
        self._length = length
        self._parsed = True
        return head_end + length

    def _answer(self, data: bytes, end: int) -> bool:
        """Answer the whole request ``data[:end]`` (its head already parsed); False when the
        connection was handed over or closed instead."""
        body = data[self._body_at : end]
        if body and self._parsed:
            try:
                self.parser.feed_data(body)  # back to a message boundary for the next request
            except httptools.HttpParserError:
                self._hand_over(data)
                return False
        keep_alive = self._keep_alive and not self._close_after
        payload = self.responder.answer_binary_now(self._authorization, body, self._started) if self._binary else None
        if payload is not None and keep_alive:
            # the common answer: write_reply's bytes, its head's fixed part built once a second
            # (payload: at most STREAM_MIN_BYTES, so content-type comes before content-length)
            head = self.ok_head.get(self.server_state.default_headers)
            if len(payload) < _JOIN_BELOW:
                self.transport.write(b"".join((head, b"%d\r\n\r\n" % len(payload), payload)))
            else:
                self.transport.writelines((head + b"%d\r\n\r\n" % len(payload), payload))
        else:
            if payload is not None:
                reply: Reply | None = (200, payload, BINARY_RESPONSE_TYPE, [])
            else:
                headers = dict(self._headers)  # last value wins, as in LookupFastPath
                reply = self.responder.answer_now(headers, body, self._started)
                if reply is None:  # for the ASGI path: uvicorn gets the request from its first byte
                    self._hand_over(data)
                    return False
            write_reply(self.transport, self.server_state.default_headers, reply, keep_alive)
        self.fast_counter.inc()
        self.server_state.total_requests += 1
        if not keep_alive:
            self.transport.close()
            return False
        self._last_answer = self.loop.time()
        if self._idle is None:
            self._idle = self.loop.call_later(self.timeout_keep_alive, self._idle_check)
        return True

    def _idle_check(self) -> None:
        """uvicorn's keep-alive timeout, armed once rather than per request: close a connection
        idle for ``timeout_keep_alive`` seconds since its last answer."""
        self._idle = None
        if self.transport.is_closing() or self._pending:
            return  # a request is arriving: uvicorn's timer is off meanwhile too
        left = self._last_answer + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self._idle = self.loop.call_later(left, self._idle_check)
        else:
            self.transport.close()

    def _hand_over(self, data: bytes) -> None:
        """From now on this connection is uvicorn's (:class:`LookupProtocol`), starting with
        ``data``: the bytes from the first byte of the request this protocol did not answer."""
        self.server_state.connections.discard(self)  # type: ignore[arg-type]
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._pending = b""
        self._want = 0
        config, server_state, app_state, loop = self._args
        protocol = self.fallback(config, server_state, app_state, loop)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if self._write_paused:
            protocol.pause_writing()
        if self._close_after:
            protocol.shutdown()
        if data:
            protocol.data_received(data)


def protocol_class(app: Any) -> type[LeanLookupProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` serving ``app`` (built by
    :func:`service.app.create_app`): its lookups answered with the app's state and metrics."""
    state = app.state.embserve
    settings = state.settings
    metrics = state.metrics
    attrs = {
        # both protocols run on the event loop's thread only: lock-free metric series
        "responder": LookupFastPath(app, state, loop_thread=True),
        "fast_counter": metrics.loop_series(metrics.http_fast_path),
        # bodies the ASGI path would take inline and uvicorn would buffer without pausing reads
        "body_limit": min(settings.inline_max_body_bytes, settings.max_body_bytes, HIGH_WATER_LIMIT),
    }
    fallback = type("EmbserveLookupProtocol", (LookupProtocol,), attrs)
    return type("EmbserveLeanLookupProtocol", (LeanLookupProtocol,), {**attrs, "fallback": fallback, "ok_head": OkBinaryHead()})  # type: ignore[return-value]
