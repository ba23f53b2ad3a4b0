"""One JSON shape for every error the service returns:

    {"error": {"status": 422, "code": "invalid_request", "message": "...", "details": [...]}}

Handlers here turn validation errors, HTTP errors and our own :class:`ApiError` into that shape;
anything unexpected becomes a 500 whose body says nothing about the internals."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("embserve")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def error_body(status: int, code: str, message: str, details: list[Any] | None = None) -> bytes:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details:
        body["details"] = details
    return orjson.dumps({"error": body})


def error_response(
    status: int, code: str, message: str, details: list[Any] | None = None, headers: dict[str, str] | None = None
) -> Response:
    return Response(error_body(status, code, message, details), status_code=status, media_type="application/json", headers=headers)


_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          406: "not_acceptable", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request"}


def _clean(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # drop the echoed input: it can be huge (a million IDs) and says nothing the location doesn't
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors[:20]]


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_json_body(body: bytes, model: type[ModelT]) -> ModelT:
    """A JSON request body validated into ``model``: 400 when it is not JSON, 422 with the
    validation errors when it does not match."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_body", f"body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", "request does not match the schema", _clean(list(exc.errors()))) from exc


def v2_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The inference protocol's error shape, ``{"error": "<message>"}``: Triton and KServe clients
    read the message from that string."""
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json", headers=headers)


def _render(request: Request, status: int, code: str, message: str, details: list[Any] | None = None,
            headers: dict[str, str] | None = None) -> Response:
    if request.url.path.startswith("/v2"):
        return v2_error_response(status, message, headers)
    return error_response(status, code, message, details, headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _render(request, exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _render(request, 422, "invalid_request", "request does not match the schema", _clean(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return _render(request, exc.status_code, _CODES.get(exc.status_code, "error"), str(exc.detail), None, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _render(request, 500, "internal", "internal server error")
