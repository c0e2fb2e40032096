"""Jobs carry a name and tags, and GET /adaptations filters by them, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.config import Settings
from tests.api.conftest import make_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Embedded settings on a fresh SQLite file, then on a fresh PostgreSQL database."""
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
    return make_settings(url, tmp_path)


def _submit(client: TestClient, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response = client.post("/adaptations", json=body | extra)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def _ids(client: TestClient, **params: str) -> list[str]:
    answer = client.get("/adaptations", params=params)
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["total"] == len(page["items"])
    return [item["id"] for item in page["items"]]


def test_jobs_are_listed_by_exact_name_and_by_tag(client: TestClient, body: dict[str, Any]) -> None:
    parts = _submit(client, body, name="parts v1", tags=["factory:b", "parts", "parts"])
    again = _submit(client, body, name="parts v1", tags=["a_b"])
    other = _submit(client, body, name="parts v10", tags=["axb"])
    plain = _submit(client, body)

    assert (parts["name"], parts["tags"]) == ("parts v1", ["factory:b", "parts"])
    assert (plain["name"], plain["tags"]) == (None, [])
    assert client.get(f"/adaptations/{parts['id']}").json()["tags"] == ["factory:b", "parts"]
    assert _ids(client, name="parts v1") == [again["id"], parts["id"]]
    assert _ids(client, tag="parts") == [parts["id"]]
    assert _ids(client, tag="factory:b") == [parts["id"]]
    # `_` in a tag is itself, not a wildcard; a tag matches whole, not as a prefix.
    assert _ids(client, tag="a_b") == [again["id"]]
    assert _ids(client, tag="part") == []
    assert _ids(client, name="parts v1", tag="a_b") == [again["id"]]
    assert _ids(client, name="parts v1", status="succeeded") == []
    assert len(_ids(client)) == 4
    assert other["id"] not in _ids(client, name="parts v1")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"name": ""}, "body.name"),
        ({"name": "   "}, "body.name"),
        ({"name": "a\nb"}, "body.name"),
        ({"name": "x" * 256}, "body.name"),
        ({"tags": ["has,comma"]}, "body.tags.0"),
        ({"tags": ["has space"]}, "body.tags.0"),
        ({"tags": ["t"] * 21}, "body.tags"),
        ({"tags": "parts"}, "body.tags"),
    ],
)
def test_bad_names_and_tags_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], extra: dict[str, Any], field: str
) -> None:
    answer = client.post("/adaptations", json=body | extra)

    assert answer.status_code == 422
    assert field in [error["field"] for error in answer.json()["detail"]]


def test_bad_filters_are_422(client: TestClient) -> None:
    assert client.get("/adaptations", params={"tag": "a,b"}).status_code == 422
    assert client.get("/adaptations", params={"name": ""}).status_code == 422
