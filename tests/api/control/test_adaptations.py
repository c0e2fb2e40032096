"""The adaptation routes on SQLite and on PostgreSQL, with a recording queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.jobs import repository
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Embedded settings on a fresh SQLite file, then on a fresh PostgreSQL database."""
    url = str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
    return make_settings(url, tmp_path)


def _submit(client: TestClient, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    response = client.post("/adaptations", json=body, headers=headers)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def test_submit_records_a_queued_job_and_enqueues_its_id(
    client: TestClient, queue: RecordingJobQueue, body: dict[str, Any]
) -> None:
    job = _submit(client, body | {"class_names": [" cat ", "dog"], "hparams": {"batch_size": 32}})

    assert job["status"] == "queued"
    assert job["progress"] == {
        "step": 0,
        "total_steps": None,
        "epoch": None,
        "images_per_sec": None,
        "eta_seconds": None,
        "fraction": None,
    }
    assert job["request"]["class_names"] == ["cat", "dog"]
    assert job["request"]["model"] == {
        "arch": "ViT-B-32",
        "pretrained": "openai",
        "checkpoint": None,
        "config": None,
    }
    assert queue.job_ids == [job["id"]]
    fetched = client.get(f"/adaptations/{job['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == job


def test_list_filters_by_status_and_pages_newest_first(client: TestClient, body: dict[str, Any]) -> None:
    ids = [_submit(client, body)["id"] for _ in range(3)]
    assert client.post(f"/adaptations/{ids[0]}/cancel").status_code == 202

    queued = client.get("/adaptations", params={"status": "queued"}).json()
    assert (queued["total"], [item["id"] for item in queued["items"]]) == (2, [ids[2], ids[1]])
    page = client.get("/adaptations", params={"limit": 1, "offset": 1}).json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)
    assert [item["id"] for item in page["items"]] == [ids[1]]
    cancelled = client.get("/adaptations", params={"status": "cancelled"}).json()
    assert [item["id"] for item in cancelled["items"]] == [ids[0]]


def test_same_idempotency_key_returns_the_same_job(
    client: TestClient, queue: RecordingJobQueue, body: dict[str, Any]
) -> None:
    first = _submit(client, body, key="retry-1")
    again = _submit(client, body, key="retry-1")

    assert again["id"] == first["id"]
    assert queue.job_ids == [first["id"]]
    assert client.get("/adaptations").json()["total"] == 1
    changed = client.post(
        "/adaptations", json=body | {"class_names": ["cat", "dog"]}, headers={"Idempotency-Key": "retry-1"}
    )
    assert changed.status_code == 422
    assert "Idempotency-Key" in changed.json()["detail"]


def test_cancel_queued_job_then_refuse_to_cancel_a_finished_one(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job_id = _submit(client, body)["id"]

    cancelled = client.post(f"/adaptations/{job_id}/cancel")
    assert (cancelled.status_code, cancelled.json()["status"]) == (202, "cancelled")
    assert client.post(f"/adaptations/{job_id}/cancel").status_code == 202

    failed_id = _submit(client, body)["id"]
    with session_factory() as session:
        repository.mark_failed(session, failed_id, error_type="DatasetError", message="no images")
    refused = client.post(f"/adaptations/{failed_id}/cancel")
    assert refused.status_code == 409
    assert "cannot go from 'failed' to 'cancelled'" in refused.json()["detail"]
    assert client.get(f"/adaptations/{failed_id}").json()["error"] == {
        "type": "DatasetError",
        "message": "no images",
    }


def test_metrics_come_back_in_step_order(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job_id = _submit(client, body)["id"]
    with session_factory() as session:
        for step in (20, 5, 10):
            repository.append_metrics(session, job_id, step=step, values={"loss": 1.0 / step})

    history = client.get(f"/adaptations/{job_id}/metrics").json()
    assert history["adaptation_id"] == job_id
    assert [point["step"] for point in history["items"]] == [5, 10, 20]
    assert history["items"][0]["values"] == {"loss": 0.2}
    later = client.get(f"/adaptations/{job_id}/metrics", params={"since_step": 10, "limit": 1}).json()
    assert [point["step"] for point in later["items"]] == [10]
    assert client.get(f"/adaptations/{job_id}").json()["latest_metrics"] == {"loss": 0.1}
