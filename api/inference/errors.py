"""Errors of the inference service and their HTTP answers, on top of the shared domain mapping."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.common.errors import ServiceUnavailable, register_exception_handlers
from services.errors import DomainError

# decode_image reasons that mean "too big" rather than "not a usable image".
TOO_LARGE_REASONS = frozenset({"too_large", "too_many_pixels"})


class AdaptationNotReady(DomainError):
    """The adaptation exists but has not succeeded, so it has no classifier to serve."""

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"adaptation {job_id!r} is {status}; only succeeded adaptations can be served")
        self.job_id, self.status = job_id, status


class WeightsNotAvailable(ServiceUnavailable):
    """A zero-shot model's pretrained weights are neither cached here nor downloadable (off or too slow)."""


class ImageRejected(DomainError):
    """One input image cannot be used; `reason` is decode_image's machine-readable code."""

    def __init__(self, filename: str, reason: str, message: str) -> None:
        super().__init__(f"image {filename!r} was rejected ({reason}): {message}")
        self.filename, self.reason = filename, reason


def _not_ready(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdaptationNotReady)
    content = {"detail": exc.message, "error": type(exc).__name__, "status": exc.status}
    return JSONResponse(status_code=HTTPStatus.CONFLICT, content=content)


def _image_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImageRejected)
    too_large = exc.reason in TOO_LARGE_REASONS
    code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if too_large else HTTPStatus.UNPROCESSABLE_ENTITY
    content = {
        "detail": exc.message,
        "error": type(exc).__name__,
        "filename": exc.filename,
        "reason": exc.reason,
    }
    return JSONResponse(status_code=code, content=content)


def _field_error(error: dict[str, Any]) -> dict[str, str]:
    loc = ".".join(str(part) for part in error.get("loc", ()))
    return {"field": loc, "msg": str(error.get("msg", "")), "type": str(error.get("type", ""))}


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """Always 422: the shared handler's "send JSON" hint is wrong for multipart uploads."""
    assert isinstance(exc, RequestValidationError)
    content = {"detail": [_field_error(error) for error in exc.errors()]}
    return JSONResponse(status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content=content)


def register_inference_errors(app: FastAPI) -> None:
    """The shared handlers, plus the inference-only errors (starlette picks the closest class)."""
    register_exception_handlers(app)
    app.add_exception_handler(AdaptationNotReady, _not_ready)
    app.add_exception_handler(ImageRejected, _image_rejected)
    app.add_exception_handler(RequestValidationError, _validation_error)
