"""API-key authentication shared by the control API and the inference service.

A request carries its key as `Authorization: Bearer <key>` (what Prometheus and most HTTP
clients send) or `X-API-Key: <key>`. Keys come from `settings.api_keys`; every configured key is
compared with `hmac.compare_digest`, so the answer time does not say how much of a guess was
right, nor which key matched. Authentication is off only in the embedded environment (one
machine, loopback); everywhere else a request without a valid key is answered 401. The health
probes are mounted without this dependency, so load balancers and orchestrators need no key.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from services.config import Settings
from services.errors import DomainError

API_KEY_HEADER = "X-API-Key"
HOW_TO_SEND = f"send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'"


class Unauthorized(DomainError):
    """The request has no API key, or one that is not configured on this service."""


def auth_required(settings: Settings) -> bool:
    """Whether requests need an API key: everywhere but the embedded environment."""
    return settings.environment != "embedded"


def key_matches(candidate: str, keys: Sequence[str]) -> bool:
    """Whether `candidate` is one of `keys`, comparing against every key in constant time."""
    given = candidate.encode()
    matched = False
    for key in keys:
        # No early exit: the time taken does not depend on which key (if any) matched.
        matched |= hmac.compare_digest(given, key.encode())
    return matched


# Declared as security schemes so the OpenAPI page documents them and offers "Authorize".
_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token")
_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An API key")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
HeaderKey = Annotated[str | None, Security(_key_header)]


def require_api_key(request: Request, bearer: BearerCredentials, header_key: HeaderKey) -> None:
    """Route dependency: pass when auth is off or the request's key is configured; 401 otherwise."""
    settings: Settings = request.app.state.settings
    if not auth_required(settings):
        return
    key = (bearer.credentials.strip() if bearer else None) or header_key
    if not key:
        raise Unauthorized(f"this service requires an API key: {HOW_TO_SEND}")
    if not settings.api_keys:
        raise Unauthorized("this service has no API keys configured (MUST_API_KEYS), so it accepts none")
    if not key_matches(key, settings.api_keys):
        raise Unauthorized(f"the API key is not valid for this service: {HOW_TO_SEND} with a configured key")


def _unauthorized(_: Request, exc: Exception) -> JSONResponse:
    """401 with the reason and the `WWW-Authenticate` challenge RFC 9110 asks of a 401."""
    assert isinstance(exc, Unauthorized)
    return JSONResponse(
        status_code=HTTPStatus.UNAUTHORIZED,
        content={"detail": exc.message, "error": "Unauthorized"},
        headers={"WWW-Authenticate": 'Bearer realm="must"'},
    )


def install_auth(app: FastAPI) -> None:
    """Answer `Unauthorized` with a 401; routers opt in with `dependencies=[API_KEY]`."""
    app.exception_handler(Unauthorized)(_unauthorized)


# Mount every router but the health probes with `app.include_router(router, dependencies=[API_KEY])`.
API_KEY = Depends(require_api_key)
