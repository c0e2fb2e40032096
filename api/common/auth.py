"""API-key authentication and tenancy, shared by the control API and the inference service.

A request carries its key as `Authorization: Bearer <key>` (what Prometheus and most HTTP
clients send) or `X-API-Key: <key>`. A key is either an env-var key (`MUST_API_KEYS`,
`MUST_ADMIN_API_KEYS`: every one compared with `hmac.compare_digest`, so the answer time does not
say how much of a guess was right, nor which key matched) or a key stored hashed in the job
database (`must-keys`; looked up by its SHA-256, remembered for `api_key_cache_seconds`, so a new
or revoked key takes effect without a restart). Each key belongs to a tenant; the routes scope
jobs to the request's `Principal`. Authentication is off only in the embedded environment (one
machine, loopback), where every request acts as an admin of the default tenant. The health
probes are mounted without this dependency, so load balancers and orchestrators need no key.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.common.errors import ServiceUnavailable
from services.auth.keys import Principal, find_principal, hash_key
from services.config import DEFAULT_TENANT, Settings
from services.errors import DomainError

API_KEY_HEADER = "X-API-Key"
HOW_TO_SEND = f"send 'Authorization: Bearer <key>' or '{API_KEY_HEADER}: <key>'"
# Longer strings are not keys; refusing them early keeps hashing and comparing cheap.
MAX_KEY_CHARS = 512
EMBEDDED_PRINCIPAL = Principal(tenant=DEFAULT_TENANT, admin=True)


class Unauthorized(DomainError):
    """The request has no API key, or one that is not configured on this service."""


class KeyStoreUnavailable(ServiceUnavailable):
    """The database holding the stored keys cannot be read, so a key cannot be checked."""


def auth_required(settings: Settings) -> bool:
    """Whether requests need an API key: everywhere but the embedded environment."""
    return settings.environment != "embedded"


def key_matches(candidate: str, keys: Sequence[str]) -> bool:
    """Whether `candidate` is one of `keys`, comparing against every key in constant time."""
    return env_principal(candidate, [(DEFAULT_TENANT, key, False) for key in keys]) is not None


def env_principal(candidate: str, keys: Sequence[tuple[str, str, bool]]) -> Principal | None:
    """The principal of the env-var key equal to `candidate`, comparing against every key."""
    given = candidate.encode()
    found = None
    for tenant, key, admin in keys:
        # No early exit: the time taken does not depend on which key (if any) matched.
        if hmac.compare_digest(given, key.encode()):
            found = Principal(tenant=tenant, admin=admin)
    return found


class KeyLookup:
    """Stored keys by hash, remembered for `ttl` seconds (a miss too, so guessing costs no query)."""

    MAX_ENTRIES = 10_000

    def __init__(self, session_factory: sessionmaker[Session], ttl: float) -> None:
        self.session_factory = session_factory
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()

    def remembered(self, key: str) -> tuple[bool, Principal | None]:
        """(True, the principal) when the key's lookup is remembered and fresh; no I/O."""
        with self._lock:
            entry = self._cache.get(hash_key(key))
        if entry is not None and time.monotonic() - entry[0] < self.ttl:
            return True, entry[1]
        return False, None

    def __call__(self, key: str) -> Principal | None:
        known, remembered = self.remembered(key)
        if known:
            return remembered
        digest, now = hash_key(key), time.monotonic()
        try:
            with self.session_factory() as session:
                principal = find_principal(session, key)
        except SQLAlchemyError as exc:
            raise KeyStoreUnavailable(
                "the API key store (the job database) cannot be reached; retry later"
            ) from exc
        with self._lock:
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        return principal


# Declared as security schemes so the OpenAPI page documents them and offers "Authorize".
_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token")
_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="An API key")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
HeaderKey = Annotated[str | None, Security(_key_header)]


async def require_api_key(request: Request, bearer: BearerCredentials, header_key: HeaderKey) -> Principal:
    """Route dependency: the request's principal; 401 without a valid key (auth off: embedded admin)."""
    return await principal_of(request, bearer.credentials if bearer else None, header_key)


async def authenticate(request: Request) -> Principal:
    """The request's principal read from its headers as the security schemes above read them.

    For an endpoint that runs outside FastAPI's dependency handling (POST /predict's fast path).
    """
    bearer = None
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        bearer = credentials
    return await principal_of(request, bearer, request.headers.get(API_KEY_HEADER) or None)


async def principal_of(request: Request, bearer: str | None, header_key: str | None) -> Principal:
    """The principal of a bearer token or X-API-Key; 401 without a valid key (auth off: embedded admin).

    Runs on the event loop: only a stored key that is not remembered costs a database lookup,
    in a thread (a sync dependency would take a thread hop on every request).
    """
    settings: Settings = request.app.state.settings
    if not auth_required(settings):
        return EMBEDDED_PRINCIPAL
    key = (bearer.strip() if bearer else None) or header_key
    if not key:
        raise Unauthorized(f"this service requires an API key: {HOW_TO_SEND}")
    principal = None
    if len(key) <= MAX_KEY_CHARS:
        principal = env_principal(key, settings.env_keys())
        if principal is None:
            lookup: KeyLookup = request.app.state.key_lookup
            known, principal = lookup.remembered(key)
            if not known:
                principal = await asyncio.to_thread(lookup, key)
    if principal is None:
        raise Unauthorized(f"the API key is not valid for this service: {HOW_TO_SEND} with a valid key")
    return principal


def _unauthorized(_: Request, exc: Exception) -> JSONResponse:
    """401 with the reason and the `WWW-Authenticate` challenge RFC 9110 asks of a 401."""
    assert isinstance(exc, Unauthorized)
    return JSONResponse(
        status_code=HTTPStatus.UNAUTHORIZED,
        content={"detail": exc.message, "error": "Unauthorized"},
        headers={"WWW-Authenticate": 'Bearer realm="must"'},
    )


def install_auth(app: FastAPI, session_factory: sessionmaker[Session]) -> None:
    """Answer `Unauthorized` with a 401 and look stored keys up in the job database."""
    settings: Settings = app.state.settings
    app.state.key_lookup = KeyLookup(session_factory, settings.api_key_cache_seconds)
    app.exception_handler(Unauthorized)(_unauthorized)


# Mount every router but the health probes with `app.include_router(router, dependencies=[API_KEY])`;
# routes that scope jobs take `principal: PrincipalDep` (FastAPI runs the dependency once per request).
API_KEY = Depends(require_api_key)
PrincipalDep = Annotated[Principal, Depends(require_api_key)]
