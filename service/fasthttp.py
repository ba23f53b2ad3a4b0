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
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .errors import ApiError
from .routers.lookup import LookupFastPath, Reply, is_large

# uvicorn releases the byte-for-byte tests (tests/test_fasthttp.py) ran against: this class
# subclasses uvicorn's protocol internals, so another release gets the plain ASGI path
# (service/serving.py) until the tests are run on it and it is added here
TESTED_UVICORN: tuple[str, ...] = ("0.54.",)

_PATH = LookupFastPath.PATH.encode()
# below this the head and the body are joined into one bytes (one copy of a small body); above
# it they go to writelines, which uvloop sends with one writev and no copy
_JOIN_BELOW = 16 * 1024


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
        """Status line, headers and body in one write, the bytes uvicorn writes for the ASGI
        path's ``http.response.start`` + ``http.response.body``."""
        status, payload, media_type, extra = reply
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:  # date, server
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
            self.transport.write(b"".join(head))
        else:
            self.transport.writelines((b"".join(head), payload))

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
            status = 400
            try:
                self.responder.check_head(self._fast_headers)
            except ApiError as refused:
                status = refused.status
            self.responder.record(status, self._fast_started)
        super().connection_lost(exc)


def protocol_class(app: Any) -> type[LookupProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` serving ``app`` (built by
    :func:`service.app.create_app`): its lookups answered with the app's state and metrics."""
    state = app.state.embserve
    settings = state.settings
    attrs = {
        "responder": LookupFastPath(app, state),
        "fast_counter": state.metrics.http_fast_path,
        # bodies the ASGI path would take inline and uvicorn would buffer without pausing reads
        "body_limit": min(settings.inline_max_body_bytes, settings.max_body_bytes, HIGH_WATER_LIMIT),
    }
    return type("EmbserveLookupProtocol", (LookupProtocol,), attrs)
