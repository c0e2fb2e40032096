"""DELETE /adaptations/{id}: files, metrics and row go; a queued job is cancelled first, a running one 409.

Run on SQLite with a local-folder store, and on PostgreSQL with the moto S3 server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.db.models import JobMetric, JobPhaseSpan
from services.jobs import repository
from services.storage import keys
from services.storage.base import ObjectStore
from services.storage.object_store import open_store
from tests.api.conftest import make_settings


@pytest.fixture(params=["sqlite+local", "postgresql+s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """SQLite with a local artifacts folder, then PostgreSQL with an artifacts bucket on moto."""
    if request.param == "sqlite+local":
        return make_settings(str(request.getfixturevalue("sqlite_url")), tmp_path)
    storage = {
        "artifacts_uri": f"s3://{request.getfixturevalue('bucket')}/platform",
        "s3_endpoint_url": request.getfixturevalue("moto_s3"),
    }
    return make_settings(str(request.getfixturevalue("pg_url")), tmp_path, storage=storage)


@pytest.fixture
def artifacts(settings: Settings, client: TestClient) -> tuple[ObjectStore, str]:
    """The artifacts store and its key prefix."""
    return open_store(settings.storage.artifacts_uri, settings)


def _submit(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/adaptations", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def _job_files(store: ObjectStore, prefix: str, job_id: str) -> list[str]:
    """Checkpoints, classifier and metrics of a job, as the worker writes them."""
    names = [
        keys.checkpoint_key(job_id, "step-000002.safetensors"),
        keys.checkpoint_key(job_id, "step-000002.state.json"),
        keys.latest_checkpoint_key(job_id),
        keys.classifier_weights_key(job_id),
        keys.classifier_manifest_key(job_id),
        keys.metrics_key(job_id),
    ]
    for name in names:
        store.write_bytes(keys.join_key(prefix, name), b"x")
    return [keys.join_key(prefix, name) for name in names]


def _stored(store: ObjectStore, prefix: str, job_id: str) -> set[str]:
    return {info.key for info in store.iter_keys(keys.join_key(prefix, keys.adaptation_prefix(job_id)))}


def _succeed(session_factory: sessionmaker[Session], job_id: str) -> None:
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        repository.append_metrics(session, job_id, step=1, values={"loss": 1.0})
        repository.mark_succeeded(
            session, job_id, artifact_uri="s3://b/c", artifact_sha256="0" * 64, owner="w"
        )


def test_delete_removes_files_metrics_and_row_and_a_second_delete_is_404(
    client: TestClient,
    session_factory: sessionmaker[Session],
    artifacts: tuple[ObjectStore, str],
    body: dict[str, Any],
) -> None:
    store, prefix = artifacts
    job_id, other_id = _submit(client, body), _submit(client, body)
    _succeed(session_factory, job_id)
    _succeed(session_factory, other_id)
    files = _job_files(store, prefix, job_id)
    other_files = _job_files(store, prefix, other_id)
    assert _stored(store, prefix, job_id) == set(files)

    deleted = client.delete(f"/adaptations/{job_id}")

    assert (deleted.status_code, deleted.content) == (204, b"")
    assert _stored(store, prefix, job_id) == set()
    assert client.get(f"/adaptations/{job_id}").status_code == 404
    assert client.get(f"/adaptations/{job_id}/metrics").status_code == 404
    with session_factory() as session:
        rows = session.scalar(select(func.count()).select_from(JobMetric).where(JobMetric.job_id == job_id))
        phases = session.scalar(
            select(func.count()).select_from(JobPhaseSpan).where(JobPhaseSpan.job_id == job_id)
        )
    assert rows == 0
    assert phases == 0  # gone with the row (ON DELETE CASCADE, on SQLite too)
    again = client.delete(f"/adaptations/{job_id}")
    assert again.status_code == 404
    assert "does not exist" in again.json()["detail"]
    # The other job is untouched.
    assert _stored(store, prefix, other_id) == set(other_files)
    assert client.get(f"/adaptations/{other_id}/metrics").json()["items"][0]["values"] == {"loss": 1.0}
    assert [item["id"] for item in client.get("/adaptations").json()["items"]] == [other_id]


def test_a_queued_job_is_cancelled_then_deleted(client: TestClient, body: dict[str, Any]) -> None:
    job_id = _submit(client, body)

    assert client.delete(f"/adaptations/{job_id}").status_code == 204
    assert client.get(f"/adaptations/{job_id}").status_code == 404


def test_a_running_job_is_refused_with_409_and_kept(
    client: TestClient,
    session_factory: sessionmaker[Session],
    artifacts: tuple[ObjectStore, str],
    body: dict[str, Any],
) -> None:
    store, prefix = artifacts
    job_id = _submit(client, body)
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
    files = _job_files(store, prefix, job_id)

    refused = client.delete(f"/adaptations/{job_id}")

    assert refused.status_code == 409
    assert refused.json()["error"] == "JobBusy"
    assert "cancel it first" in refused.json()["detail"]
    assert _stored(store, prefix, job_id) == set(files)
    assert client.get(f"/adaptations/{job_id}").json()["status"] == "running"
    # Once cancelled and stopped, it can go.
    client.post(f"/adaptations/{job_id}/cancel")
    with session_factory() as session:
        repository.mark_cancelled(session, job_id, owner="w")
    assert client.delete(f"/adaptations/{job_id}").status_code == 204
    assert _stored(store, prefix, job_id) == set()


def test_an_id_that_is_not_a_uuid_is_404(client: TestClient) -> None:
    assert client.delete("/adaptations/not-a-uuid").status_code == 404
