"""Domain errors and request validation errors to HTTP responses, in one place.

Known errors answer with their safe message in `detail`; anything unexpected is logged with its
traceback and answers a generic 500 (the pattern of LitServe's `_handle_error_response`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.errors import (
    ArtifactMissing,
    ArtifactNotReady,
    BucketNotFound,
    DomainError,
    EvalSetError,
    InvalidJobTransition,
    InvalidRequest,
    JobBusy,
    JobNotFound,
    ObjectNotFound,
    ObjectTooLarge,
    PredictionNotFound,
    RequestTooLarge,
    StorageError,
)

logger = logging.getLogger(__name__)


class ServiceUnavailable(DomainError):
    """Something the request needs (the queue, the database, a store) cannot be reached right now."""


# Looked up along the error's class hierarchy, so a subclass without an entry gets its parent's code.
STATUS_BY_ERROR: dict[type[DomainError], HTTPStatus] = {
    JobNotFound: HTTPStatus.NOT_FOUND,
    PredictionNotFound: HTTPStatus.NOT_FOUND,
    ArtifactMissing: HTTPStatus.NOT_FOUND,
    ObjectNotFound: HTTPStatus.NOT_FOUND,
    InvalidJobTransition: HTTPStatus.CONFLICT,
    JobBusy: HTTPStatus.CONFLICT,
    ArtifactNotReady: HTTPStatus.CONFLICT,
    ObjectTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    RequestTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    InvalidRequest: HTTPStatus.UNPROCESSABLE_ENTITY,
    # Unknown labels, an empty set, a missing manifest: the request must name another eval set.
    EvalSetError: HTTPStatus.UNPROCESSABLE_ENTITY,
    # A bucket named in a request (a dataset, a checkpoint) that does not exist is the caller's to fix.
    BucketNotFound: HTTPStatus.UNPROCESSABLE_ENTITY,
    StorageError: HTTPStatus.SERVICE_UNAVAILABLE,
    ServiceUnavailable: HTTPStatus.SERVICE_UNAVAILABLE,
}


class ErrorBody(BaseModel):
    """The body of every error answer but validation errors."""

    detail: str
    error: str | None = None


class FieldError(BaseModel):
    """One problem with the request, and where it is (`body.class_names`, `query.limit`, ...)."""

    field: str
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """The body of a 422 answer: the fields that do not match the schema (a list), or, for a request
    that matches it but cannot be accepted (a bucket that does not exist, a local file outside the
    embedded mode), the reason as text with the error's name."""

    detail: list[FieldError] | str
    error: str | None = None


# What every route behind an API key can answer besides its own codes: no or a bad key, a body over
# the size limit, an invalid request, and a key store (the database) that cannot be read.
SECURED_ERRORS = (401, 413, 422, 503)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error status codes, with the bodies they really have."""
    return {
        code: {
            "model": ValidationErrorBody if code == HTTPStatus.UNPROCESSABLE_ENTITY else ErrorBody,
            "description": HTTPStatus(code).phrase,
        }
        for code in codes
    }


_JSON_TYPES = ("application/json", "application/problem+json")


def status_for(error: DomainError) -> HTTPStatus:
    """The HTTP status code of a domain error (400 for a DomainError with no closer entry)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return HTTPStatus.BAD_REQUEST


def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
    code = status_for(exc)
    if code >= HTTPStatus.INTERNAL_SERVER_ERROR:
        logger.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    return JSONResponse(status_code=code, content={"detail": exc.message, "error": type(exc).__name__})


def _readable(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error as {field, msg, type}, without echoing the input back (it can be huge)."""
    loc = [str(part) for part in error.get("loc", ())]
    kind = str(error.get("type", ""))
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        msg = f"the request body is not valid JSON: {reason} (at character {loc[-1] if loc else '?'})"
        loc = ["body"]
    elif kind == "missing" and loc == ["body"]:
        msg = "a JSON request body is required"
    return {"field": ".".join(loc), "msg": msg, "type": kind}


def _sent_other_than_json(request: Request, errors: Sequence[Any]) -> bool:
    """A body error on a request whose Content-Type is not JSON: the fix is the header, not the body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body_errors = any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors)
    return body_errors and bool(content_type) and content_type not in _JSON_TYPES


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if _sent_other_than_json(request, errors):
        detail = "send the request body as JSON with the header 'Content-Type: application/json'"
        return JSONResponse(status_code=HTTPStatus.UNSUPPORTED_MEDIA_TYPE, content={"detail": detail})
    content = {"detail": [_readable(error) for error in errors]}
    return JSONResponse(status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content=content)


def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors as they are, but a body that cannot be parsed at all (bytes that are not
    UTF-8, a broken multipart body) is a 422 like any other invalid body, not a bare 400."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        return _method_not_allowed(request, exc)
    if exc.status_code != HTTPStatus.BAD_REQUEST:
        return _default_http_error(exc)
    error = {
        "field": "body",
        "msg": f"the request body cannot be parsed: {exc.detail}",
        "type": "body_unparsable",
    }
    return JSONResponse(status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content={"detail": [error]})


def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
    """405 whose `Allow` lists every method the OpenAPI document gives the path (starlette names the
    first matching route's only, so `OPTIONS /adaptations` said `Allow: POST` where GET is served too)."""
    allowed = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if _template_regex(template).match(request.url.path):
            allowed |= {method.upper() for method in operations}
    headers = {"Allow": ", ".join(sorted(allowed))} if allowed else exc.headers
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)


@lru_cache(maxsize=256)
def _template_regex(template: str) -> re.Pattern[str]:
    """`/adaptations/{adaptation_id}` as a regex matching one concrete path."""
    parts = re.split(r"(\{[^/}]+\})", template)
    return re.compile(
        "^" + "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts) + "$"
    )


def _default_http_error(exc: StarletteHTTPException) -> Response:
    """FastAPI's default answer to an HTTPException (status, `detail`, headers), built synchronously."""
    if exc.status_code in {HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED}:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    content = {"detail": "internal server error; it was logged, please report it if it persists"}
    return JSONResponse(status_code=HTTPStatus.INTERNAL_SERVER_ERROR, content=content)


def register_exception_handlers(app: FastAPI) -> None:
    """Install the handlers: domain errors, request validation errors, and a logged 500 for the rest."""
    app.exception_handler(DomainError)(_domain_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_unexpected)
