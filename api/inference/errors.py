"""Errors of the inference service and their HTTP answers, on top of the shared domain mapping."""

from __future__ import annotations

import re
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
        self.filename, self.reason, self.detail = filename, reason, message


class NoUsableImages(DomainError):
    """Every file of a multi-file request was rejected: nothing to classify."""

    def __init__(self, rejected: list[ImageRejected]) -> None:
        super().__init__(
            f"none of the {len(rejected)} files is a usable image; each file's reason is in `files`"
        )
        self.rejected = rejected


# What each decode_image reason means, in words for the caller.
_REASONS = {
    "not_an_image": "not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)",
    "unreadable": "an image file that cannot be decoded (truncated or corrupt)",
    "too_large": "larger than the per-image byte limit (MUST_LIMITS__MAX_OBJECT_BYTES)",
    "too_many_pixels": "more pixels than the per-image limit (MUST_LIMITS__MAX_IMAGE_PIXELS)",
}
# Python object reprs (`<_io.BytesIO object at 0x7f...>`) that library messages quote.
_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def public_reason(error: Exception) -> str:
    """A decode failure as a sentence for clients: the reason in words, plus the library's detail
    when it carries one, with any Python object repr taken out."""
    reason = str(getattr(error, "reason", "unreadable"))
    words = _REASONS.get(reason, reason.replace("_", " "))
    detail = str(error).removeprefix(f"{reason}: ").removeprefix(reason)
    detail = _OBJECT_REPR.sub("the file", detail).strip()
    if not detail or reason == "not_an_image":
        return words
    return f"{words} ({detail[:200]})"


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


def _no_usable_images(request: Request, exc: Exception) -> JSONResponse:
    """422, or 413 when every file was only too large."""
    assert isinstance(exc, NoUsableImages)
    too_large = all(error.reason in TOO_LARGE_REASONS for error in exc.rejected)
    code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if too_large else HTTPStatus.UNPROCESSABLE_ENTITY
    files = [{"filename": e.filename, "reason": e.reason, "message": e.detail} for e in exc.rejected]
    content = {"detail": exc.message, "error": type(exc).__name__, "files": files}
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
    app.add_exception_handler(NoUsableImages, _no_usable_images)
    app.add_exception_handler(RequestValidationError, _validation_error)
