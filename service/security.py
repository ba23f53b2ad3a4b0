"""Who may read and who may write.

Two bearer tokens, both optional, both compared in constant time:

* the **write token** (``EMBSERVE_TOKEN`` / ``EMBSERVE_TOKEN_FILE``) guards every endpoint that
  changes state: updates and all of ``/v1/admin``.  With no write token configured the service
  is in development mode: it takes writes from loopback clients only, so a service published on
  a network interface without a token cannot be written to by anyone;
* the **read token** (``EMBSERVE_READ_TOKEN`` / ``..._FILE``) guards lookups and table metadata
  (v1 and v2) when set; the write token is accepted for reads too.

Health probes and ``/metrics`` stay open: orchestrators and Prometheus call them without secrets,
and they expose no embedding values.

No token missing or wrong ever says which token exists or what it looks like: 401 when the
header is absent or malformed (with ``WWW-Authenticate: Bearer``), 403 when the token is wrong.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Depends, Request
from pydantic import SecretStr

from .errors import ApiError
from .state import AppState, get_state


def _bearer(request: Request) -> str | None:
    return _bearer_value(request.headers.get("authorization"))


def _bearer_value(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def _matches(given: str, *tokens: SecretStr | None) -> bool:
    # compare against every configured token (no early exit) so timing says nothing about which matched
    ok = False
    for token in tokens:
        if token is not None:
            ok |= hmac.compare_digest(given.encode(), token.get_secret_value().encode())
    return ok


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


async def require_writer(request: Request, state: AppState = Depends(get_state)) -> None:
    """FastAPI dependency for every state-changing endpoint."""
    token = state.settings.token
    if token is None:
        if is_loopback(request):
            return
        raise _unauthorized("writes need a token: the server has none configured (EMBSERVE_TOKEN), so it takes writes from loopback only")
    given = _bearer(request)
    if given is None:
        raise _unauthorized("this endpoint needs 'Authorization: Bearer <token>'")
    if not _matches(given, token):
        raise ApiError(403, "forbidden", "the token does not grant writes")


async def require_reader(request: Request, state: AppState = Depends(get_state)) -> None:
    """FastAPI dependency for lookups and metadata: open unless a read token is configured."""
    check_reader(state, request.headers.get("authorization"))


def check_reader(state: AppState, authorization: str | None) -> None:
    """The read check on a raw ``Authorization`` value: the lookup fast path and the gRPC
    endpoint (metadata ``authorization``) call it without a Request object."""
    read_token = state.settings.read_token
    if read_token is None:
        return
    given = _bearer_value(authorization)
    if given is None:
        raise _unauthorized("reads need 'Authorization: Bearer <token>'")
    if not _matches(given, read_token, state.settings.token):
        raise ApiError(403, "forbidden", "the token does not grant reads")
