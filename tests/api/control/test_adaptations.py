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


def test_a_succeeded_job_says_what_it_serves_and_why(
    client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]
) -> None:
    job_id = _submit(client, body)["id"]
    assert client.get(f"/adaptations/{job_id}").json()["served"] is None
    candidate = {
        "name": "teacher",
        "step": 600,
        "margin": -0.012,
        "gain_zs_space": 0.41,
        "gain_own_space": 0.52,
        "zero_shot_in_own_space": 0.55,
        "balance": 0.97,
        "agreement_with_zero_shot": 0.8,
        "mean_confidence": 0.9,
    }
    zero_shot = candidate | {"name": "zero_shot", "step": 0, "margin": 0.0}
    outcome = {
        "served": "zero_shot",
        "reason": "no adapted classifier beat zero-shot by the guard's criterion",
        "candidates": [zero_shot, candidate],
        "views": {"crop_min": 0.85, "rand_augment": "rand-n1-m3-mstd0.5-inc1", "hflip": False},
        "threshold": [0.61],
    }
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        repository.mark_succeeded(
            session,
            job_id,
            artifact_uri="s3://b/adaptations/x/classifier",
            artifact_sha256="0" * 64,
            owner="w",
            served="zero_shot",
            outcome=outcome,
        )
    job = client.get(f"/adaptations/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["served"] == "zero_shot"
    assert job["outcome"]["reason"] == outcome["reason"]
    assert [c["name"] for c in job["outcome"]["candidates"]] == ["zero_shot", "teacher"]
    assert job["outcome"]["candidates"][1]["margin"] == -0.012
    assert job["outcome"]["views"]["hflip"] is False


def test_method_is_recorded_and_fields_it_cannot_use_are_a_422(
    client: TestClient, queue: RecordingJobQueue, body: dict[str, Any]
) -> None:
    instant = _submit(client, body | {"method": "instant", "hparams": {"guard_images": 512}})
    assert (instant["request"]["method"], instant["request"]["warm_start"]) == ("instant", None)
    warm = _submit(client, body | {"warm_start": "instant"})
    assert (warm["request"]["method"], warm["request"]["warm_start"]) == ("must", "instant")
    assert queue.job_ids == [instant["id"], warm["id"]]

    refused = client.post("/adaptations", json=body | {"method": "instant", "hparams": {"total_steps": 9}})
    assert refused.status_code == 422
    assert "do not apply to method 'instant'" in refused.text
    assert client.post("/adaptations", json=body | {"method": "linear-probe"}).status_code == 422
