"""Domain errors map to status codes in one place; anything unexpected is a logged, generic 500."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.common.errors import register_exception_handlers, status_for
from services.errors import (
    BucketNotFound,
    DomainError,
    InvalidJobTransition,
    JobNotFound,
    ObjectNotFound,
    ObjectTooLarge,
    StorageError,
)


class _OddStorageError(StorageError):
    """A subclass with no entry of its own."""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (JobNotFound("x"), 404),
        (InvalidJobTransition("succeeded", "cancelled"), 409),
        (BucketNotFound("b"), 422),
        (ObjectNotFound("s3://b/k"), 404),
        (ObjectTooLarge("s3://b/k", 10), 413),
        (_OddStorageError("flaky"), 503),
        (DomainError("anything else"), 400),
    ],
)
def test_status_for_follows_the_class_hierarchy(error: DomainError, code: int) -> None:
    assert status_for(error) == code


def test_unexpected_error_is_a_logged_generic_500(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    register_exception_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal state")

    with caplog.at_level(logging.ERROR, logger="api.common.errors"):
        response = TestClient(app, raise_server_exceptions=False).get("/boom")

    assert response.status_code == 500
    assert "secret" not in response.text
    assert "internal server error" in response.json()["detail"]
    assert any(
        record.exc_info and "secret internal state" in str(record.exc_info[1]) for record in caplog.records
    )
