"""API keys: required outside the embedded environment, compared in constant time, probes left open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.common.auth import key_matches
from api.control.main import create_app
from services.config import Settings
from services.db.migrate import upgrade
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue

KEYS = ["first-key-0123456789", "second-key-abcdefghij"]


@pytest.fixture
def protected(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    """A control API in the development environment, which requires one of KEYS."""
    upgrade(sqlite_url)  # development runs no migration at start (the compose file's migrate step does)
    (tmp_path / "artifacts").mkdir()
    settings = make_settings(sqlite_url, tmp_path, environment="development", api_keys=KEYS)
    with TestClient(create_app(settings, queue=RecordingJobQueue())) as client:
        yield client


def test_a_request_without_a_key_is_401_and_says_how_to_send_one(protected: TestClient) -> None:
    answer = protected.get("/adaptations")

    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    body = answer.json()
    assert body["error"] == "Unauthorized"
    assert "requires an API key" in body["detail"]
    assert "Authorization: Bearer" in body["detail"]
    assert "X-API-Key" in body["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer not-a-key"},
        {"X-API-Key": "not-a-key"},
        {"X-API-Key": KEYS[0][:-1]},
        {"Authorization": f"Basic {KEYS[0]}"},
    ],
)
def test_a_wrong_key_is_401(protected: TestClient, headers: dict[str, str]) -> None:
    answer = protected.get("/adaptations", headers=headers)

    assert answer.status_code == 401
    assert answer.json()["error"] == "Unauthorized"


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Bearer {KEYS[0]}"}, {"authorization": f"bearer {KEYS[1]}"}, {"X-API-Key": KEYS[1]}],
)
def test_any_configured_key_in_either_header_is_accepted(
    protected: TestClient, headers: dict[str, str]
) -> None:
    listed = protected.get("/adaptations", headers=headers)
    # Past authentication, a request is judged on its content: a local dataset is refused here.
    body = {"class_names": ["cat", "dog"], "dataset": {"uri": "file:///tmp"}}
    created = protected.post("/adaptations", json=body, headers=headers)

    assert listed.status_code == 200, listed.text
    assert created.status_code == 422, created.text


def test_every_job_route_and_metrics_are_protected(protected: TestClient) -> None:
    job = "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10"
    calls = [
        ("POST", "/adaptations", {"json": {}}),
        ("GET", "/adaptations", {}),
        ("GET", f"/adaptations/{job}", {}),
        ("POST", f"/adaptations/{job}/cancel", {}),
        ("GET", f"/adaptations/{job}/metrics", {}),
        ("GET", "/metrics", {}),
    ]
    for method, path, extra in calls:
        kwargs: dict[str, Any] = dict(extra)
        assert protected.request(method, path, **kwargs).status_code == 401, (method, path)


def test_health_probes_need_no_key(protected: TestClient) -> None:
    assert protected.get("/healthz").status_code == 200
    assert protected.get("/readyz").status_code == 200


def test_the_openapi_page_documents_both_ways_of_sending_a_key(protected: TestClient) -> None:
    spec = protected.get("/openapi.json").json()

    schemes = spec["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"http", "apiKey"}
    assert spec["paths"]["/adaptations"]["get"]["security"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_embedded_environment_needs_no_key(client: TestClient) -> None:
    assert client.get("/adaptations").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_development_without_keys_is_refused_at_start(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="MUST_API_KEYS"):
        Settings(environment="development", database={"url": sqlite_url})


def test_key_matches_compares_every_configured_key() -> None:
    assert key_matches(KEYS[1], KEYS)
    assert not key_matches("", KEYS)
    assert not key_matches(KEYS[0] + "x", KEYS)
    assert not key_matches(KEYS[0], [])
    assert key_matches("clé-ünïcode", ["clé-ünïcode"])
