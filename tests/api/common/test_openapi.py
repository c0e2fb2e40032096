"""The OpenAPI documents say what the services really answer: 401, 413, 422 (list or text), 503."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.common.errors import ErrorBody, ValidationErrorBody
from api.control.main import create_app as create_control
from api.inference.main import ServingOptions
from api.inference.main import create_app as create_inference
from services.config import Settings
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue

OPEN = {"/healthz", "/readyz", "/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"}


@pytest.fixture(params=["control", "inference"])
def app(request: pytest.FixtureRequest, sqlite_url: str, tmp_path: Path) -> FastAPI:
    settings = make_settings(sqlite_url, tmp_path)
    if request.param == "control":
        return create_control(settings, queue=RecordingJobQueue())
    return create_inference(Settings(**settings.model_dump()), options=ServingOptions(device="cpu"))


def _operations(app: FastAPI) -> list[tuple[str, str, dict[str, Any]]]:
    spec = app.openapi()
    return [
        (path, method, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
        if path not in OPEN
    ]


def test_every_secured_operation_documents_401_413_422_and_503(app: FastAPI) -> None:
    operations = _operations(app)

    assert operations
    for path, method, operation in operations:
        missing = {"401", "413", "422", "503"} - set(operation["responses"])
        assert not missing, f"{method.upper()} {path} does not document {missing}"


def test_the_documented_422_body_allows_field_lists_and_text(app: FastAPI) -> None:
    spec = app.openapi()
    body = spec["components"]["schemas"]["ValidationErrorBody"]
    kinds = {option.get("type") for option in body["properties"]["detail"]["anyOf"]}

    assert kinds == {"array", "string"}
    for path, method, operation in _operations(app):
        ref = operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ValidationErrorBody"), f"{method.upper()} {path}"
    assert "HTTPValidationError" not in spec["components"]["schemas"]


def test_a_body_that_is_not_utf8_is_422_in_the_documented_shape(tmp_path: Path, sqlite_url: str) -> None:
    app = create_control(make_settings(sqlite_url, tmp_path), queue=RecordingJobQueue())
    with TestClient(app) as client:
        answer = client.post(
            "/adaptations", content=b"\xc3\x28\xff{", headers={"Content-Type": "application/json"}
        )

    assert answer.status_code == 422, answer.text
    ValidationErrorBody.model_validate(answer.json())
    assert answer.json()["detail"][0]["field"] == "body"


def test_domain_and_auth_errors_match_their_documented_bodies(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, tmp_path, environment="development", api_keys=["k"])
    from services.db.migrate import upgrade

    upgrade(sqlite_url)
    with TestClient(create_control(settings, queue=RecordingJobQueue())) as client:
        unauthorized = client.get("/adaptations")
        local = client.post(
            "/adaptations",
            json={"class_names": ["a", "b"], "dataset": {"uri": "file:///tmp"}},
            headers={"X-API-Key": "k"},
        )

    assert unauthorized.status_code == 401
    ErrorBody.model_validate(unauthorized.json())
    assert local.status_code == 422
    assert isinstance(ValidationErrorBody.model_validate(local.json()).detail, str)


def test_method_not_allowed_lists_every_method_of_the_path(tmp_path: Path, sqlite_url: str) -> None:
    with TestClient(create_control(make_settings(sqlite_url, tmp_path), queue=RecordingJobQueue())) as client:
        answer = client.request("OPTIONS", "/adaptations")
        put = client.put("/adaptations/0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10")

    assert answer.status_code == 405
    assert answer.headers["allow"] == "GET, POST"
    assert put.status_code == 405
    assert put.headers["allow"] == "DELETE, GET"
