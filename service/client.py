"""Python client for ranking services: sync and async, binary on the wire, numpy out.

    from service.client import EmbeddingClient
    with EmbeddingClient("http://127.0.0.1:8080") as client:
        emb = client.lookup("items", np.array([1, 2, 3]))        # emb.values: float32 [3, dim]
        users, items = client.lookup_many({"users": u, "items": i})
        client.update("items", upsert_ids=ids, vectors=vecs, wait=True)

``AsyncEmbeddingClient`` has the same methods as coroutines.  Both keep one HTTP connection pool
(keep-alive), send the binary request body and ask for the binary answer, so no per-ID Python
work happens on either side; ``binary=False`` switches to JSON (for debugging).

It needs numpy, orjson, pydantic (the wire models) and httptools (answers are parsed by llhttp);
neither torch nor FastAPI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import threading
from urllib.parse import quote, urlsplit

import numpy as np
import orjson

from .client_http import AsyncHttpPool, ClosedBeforeAnswer, HttpConnection
from .wire import (
    BINARY_REQUEST_TYPE,
    BINARY_RESPONSE_TYPE,
    BINARY_UPDATE_TYPE,
    DTYPE_CODES,
    DType,
    ParsedLookup,
    STATUS_FOUND,
    STATUS_PRUNED,
    decode_binary_statuses,
    encode_binary_request,
    encode_binary_updates,
)

Pooling = Literal["none", "sum", "mean"]
LookupSpec = tuple[str, "np.ndarray | Sequence[int]"]


class EmbservError(Exception):
    """A non-2xx answer: HTTP status plus the service's error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Embeddings:
    # float32 [n, dim] ([bags, dim] when pooled), read-only view of the response; float16 with
    # dtype="f16"; with dtype="bf16" float32 holding the bf16-rounded values (numpy has no bf16)
    values: np.ndarray
    found: np.ndarray  # bool [n]: the table served the ID's own row
    unknown: int  # IDs the table does not hold (filled by its unknown-ID policy)
    # uint8 [n]: 0 = unknown, 1 = found, 2 = pruned (the ID's row was pruned to dim 0 and the
    # unknown-ID policy filled it); pruned: how many IDs had status 2
    status: np.ndarray | None = None
    pruned: int = 0


@dataclass
class UpdateAck:
    position: str  # update-log position, opaque
    applied: bool  # with wait=True: visible to lookups
    upserts: int
    deletes: int


# ---- what the two clients share: building requests, reading answers (no I/O here) ----


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def _lookup_request(lookups: Sequence[ParsedLookup], binary: bool) -> tuple[bytes, dict[str, str]]:
    if binary:
        return encode_binary_request(list(lookups)), {"content-type": BINARY_REQUEST_TYPE, "accept": BINARY_RESPONSE_TYPE}
    body = {
        "lookups": [
            {"table": item.table, "ids": item.ids.tolist(), "pooling": item.pooling}
            | ({"offsets": item.offsets.tolist()} if item.offsets is not None else {})
            | ({"dtype": item.dtype} if item.dtype is not None else {})
            for item in lookups
        ]
    }
    return orjson.dumps(body), {"content-type": "application/json", "accept": "application/json"}


def _raise_for(status: int, content: bytes | memoryview) -> None:
    if 200 <= status < 300:
        return
    try:
        err = orjson.loads(content)["error"]
        code, message = err.get("code", "error"), err.get("message", "")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        code, message = "error", bytes(content[:200]).decode("utf-8", "replace")
    raise EmbservError(status, code, message)


def _lookup_answer(status: int, content: bytes | memoryview, binary: bool, dtypes: Sequence[str | None]) -> list[Embeddings]:
    _raise_for(status, content)
    if binary:
        return [_embeddings(values, status, unknown) for values, status, unknown in decode_binary_statuses(content)]
    out = []
    for r, dtype in zip(orjson.loads(content)["results"], dtypes, strict=True):
        values = np.asarray(r["embeddings"], dtype=np.float16 if dtype == "f16" else np.float32).reshape(r["shape"])
        found = np.asarray(r["found"], dtype=bool)
        pruned = int(r.get("pruned", 0))
        # JSON carries counts, not per-ID statuses: unknown and pruned IDs both read found=false
        out.append(Embeddings(values, found, int(r["unknown"]), None, pruned))
    return out


def _embeddings(values: np.ndarray, status: np.ndarray, unknown: int) -> Embeddings:
    found = status == STATUS_FOUND
    # every ID found (the common case): none pruned, without a second pass over the statuses
    pruned = 0 if np.count_nonzero(found) == found.size else int(np.count_nonzero(status == STATUS_PRUNED))
    return Embeddings(values, found, unknown, status, pruned)


def _as_lookups(specs: Mapping[str, Any] | Sequence[LookupSpec], dtype: DType | None) -> list[ParsedLookup]:
    pairs = specs.items() if isinstance(specs, Mapping) else specs
    return [ParsedLookup(table, np.asarray(ids, dtype=np.int64).reshape(-1), None, "none", dtype) for table, ids in pairs]


def _one(table: str, ids: Any, offsets: Any, pooling: Pooling, dtype: DType | None) -> ParsedLookup:
    if dtype is not None and dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CODES)}, not {dtype!r}")
    return ParsedLookup(
        table,
        np.asarray(ids, dtype=np.int64).reshape(-1),
        None if offsets is None else np.asarray(offsets, dtype=np.int64).reshape(-1),
        pooling,
        dtype,
    )


def _update_request(upsert_ids: Any, vectors: Any, delete_ids: Any) -> bytes:
    ids = np.asarray(upsert_ids if upsert_ids is not None else [], dtype=np.int64).reshape(-1)
    vecs = np.asarray(vectors if vectors is not None else np.empty((0, 0)), dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[0] != ids.shape[0]:
        raise ValueError(f"vectors must be [len(upsert_ids), dim]; got {vecs.shape} for {ids.shape[0]} IDs")
    deletes = np.asarray(delete_ids if delete_ids is not None else [], dtype=np.int64).reshape(-1)
    return encode_binary_updates(ids, vecs, deletes)


def _update_answer(status: int, content: bytes | memoryview) -> UpdateAck:
    _raise_for(status, content)
    body = orjson.loads(content)
    return UpdateAck(body["position"], bool(body["applied"]), int(body["upserts"]), int(body["deletes"]))


def _split_base_url(base_url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of ``http(s)://host[:port][/prefix]``."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), parts.path.rstrip("/")


class _HeaderLines:
    """Request header lines (CRLF-ended bytes), the client's own (auth) first: a client sends a
    handful of header sets, each formatted once."""

    def __init__(self, base: dict[str, str]) -> None:
        self._base = "".join(f"{k}: {v}\r\n" for k, v in base.items()).encode("latin-1")
        self._cache: dict[tuple[tuple[str, str], ...], bytes] = {}

    def get(self, headers: dict[str, str] | None) -> bytes:
        key = tuple(headers.items()) if headers else ()
        lines = self._cache.get(key)
        if lines is None:
            if len(self._cache) >= 64:
                self._cache.clear()
            lines = self._cache[key] = self._base + "".join(f"{k}: {v}\r\n" for k, v in key).encode("latin-1")
        return lines


class EmbeddingClient:
    """Blocking client, safe to share between threads: each thread keeps its own keep-alive
    connection (:class:`service.client_http.HttpConnection`: one write per request, answers
    parsed by httptools; a tenth of ``http.client``'s client CPU per batch-1 lookup, which was a
    quarter of httpx's; bench/service.py reports client CPU per request)."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0, binary: bool = True,
                 dtype: DType | None = None) -> None:
        """``dtype``: precision of the values the service sends (f32 default; f16 or bf16 halve
        the bytes), for every lookup that does not name its own."""
        if dtype is not None and dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CODES)}, not {dtype!r}")
        self.dtype = dtype
        self.binary = binary
        self._scheme, self._host, self._port, self._prefix = _split_base_url(base_url)
        self._timeout = timeout
        self._lines = _HeaderLines(_headers(token))
        self._local = threading.local()
        self._connections: list[HttpConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> HttpConnection:
        conn: HttpConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = HttpConnection(self._scheme, self._host, self._port, self._timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes | memoryview]:
        lines = self._lines.get(headers)
        for attempt in (0, 1):
            conn = self._connection()
            reused = conn.sock is not None
            try:
                return conn.request(method, self._prefix + path, body, lines)
            except (ClosedBeforeAnswer, BrokenPipeError, ConnectionResetError):
                # a keep-alive connection the server closed meanwhile: send once more on a new
                # one (lookups are reads; an update re-sent after no answer applies the same rows)
                if not reused or attempt:
                    raise
        raise AssertionError("unreachable")

    def lookup(self, table: str, ids: Any, *, offsets: Any = None, pooling: Pooling = "none", dtype: DType | None = None) -> Embeddings:
        return self._lookup([_one(table, ids, offsets, pooling, dtype or self.dtype)])[0]

    def lookup_many(self, specs: Mapping[str, Any] | Sequence[LookupSpec], *, dtype: DType | None = None) -> list[Embeddings]:
        """Several tables in one request (one round trip), answers in request order."""
        return self._lookup(_as_lookups(specs, dtype or self.dtype))

    def _lookup(self, lookups: list[ParsedLookup]) -> list[Embeddings]:
        body, headers = _lookup_request(lookups, self.binary)
        return _lookup_answer(*self._request("POST", "/v1/lookup", body, headers), self.binary, [item.dtype for item in lookups])

    def update(self, table: str, *, upsert_ids: Any = None, vectors: Any = None, delete_ids: Any = None, wait: bool = False) -> UpdateAck:
        body = _update_request(upsert_ids, vectors, delete_ids)
        path = f"/v1/tables/{quote(table, safe='')}/updates?wait={str(wait).lower()}"
        return _update_answer(*self._request("POST", path, body, {"content-type": BINARY_UPDATE_TYPE}))

    def tables(self) -> list[dict[str, Any]]:
        status, content = self._request("GET", "/v1/tables")
        _raise_for(status, content)
        return list(orjson.loads(content)["tables"])

    def ready(self) -> bool:
        """True once the server answers ``/readyz`` with 200; False while it is down, starting or
        not ready, so it can be polled to wait for a server to come up."""
        try:
            return self._request("GET", "/readyz")[0] == 200
        except OSError:  # refused, reset, timed out, or not HTTP (ResponseError)
            return False

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    def __enter__(self) -> "EmbeddingClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbeddingClient:
    """asyncio client with the same methods as :class:`EmbeddingClient`: a pool of at most
    ``max_connections`` keep-alive connections (:class:`service.client_http.AsyncHttpPool`:
    answers parsed by httptools; it replaced httpx, whose per-request Python was several times
    the service's own CPU for a small lookup)."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0, binary: bool = True,
                 max_connections: int = 64, dtype: DType | None = None) -> None:
        if dtype is not None and dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CODES)}, not {dtype!r}")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.dtype = dtype
        self.binary = binary
        scheme, host, port, self._prefix = _split_base_url(base_url)
        self._pool = AsyncHttpPool(scheme, host, port, timeout, max_connections)
        self._lines = _HeaderLines(_headers(token))

    async def _request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes | memoryview]:
        lines = self._lines.get(headers)
        for attempt in (0, 1):
            try:
                return await self._pool.request(method, self._prefix + path, body, lines)
            except ClosedBeforeAnswer as exc:
                # a kept-alive connection the server closed meanwhile: once more on a new one
                if not getattr(exc, "reused", False) or attempt:
                    raise
        raise AssertionError("unreachable")

    async def lookup(self, table: str, ids: Any, *, offsets: Any = None, pooling: Pooling = "none",
                     dtype: DType | None = None) -> Embeddings:
        return (await self._lookup([_one(table, ids, offsets, pooling, dtype or self.dtype)]))[0]

    async def lookup_many(self, specs: Mapping[str, Any] | Sequence[LookupSpec], *, dtype: DType | None = None) -> list[Embeddings]:
        return await self._lookup(_as_lookups(specs, dtype or self.dtype))

    async def _lookup(self, lookups: list[ParsedLookup]) -> list[Embeddings]:
        body, headers = _lookup_request(lookups, self.binary)
        return _lookup_answer(*(await self._request("POST", "/v1/lookup", body, headers)), self.binary, [item.dtype for item in lookups])

    async def update(self, table: str, *, upsert_ids: Any = None, vectors: Any = None, delete_ids: Any = None,
                     wait: bool = False) -> UpdateAck:
        body = _update_request(upsert_ids, vectors, delete_ids)
        path = f"/v1/tables/{quote(table, safe='')}/updates?wait={str(wait).lower()}"
        return _update_answer(*(await self._request("POST", path, body, {"content-type": BINARY_UPDATE_TYPE})))

    async def tables(self) -> list[dict[str, Any]]:
        status, content = await self._request("GET", "/v1/tables")
        _raise_for(status, content)
        return list(orjson.loads(content)["tables"])

    async def ready(self) -> bool:
        try:
            return (await self._request("GET", "/readyz"))[0] == 200
        except OSError:  # refused, reset, timed out, or not HTTP (ResponseError)
            return False

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def __aenter__(self) -> "AsyncEmbeddingClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
