"""Tenants: each key sees and acts on its own tenant's jobs only; admin keys see all; stored keys.

Runs on PostgreSQL (the deployed database) with datasets on the moto S3 server, in the
development environment, where keys are required.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from api.control.main import create_app
from services.auth import cli as keys_cli
from services.db.migrate import upgrade
from services.db.session import make_engine, make_session_factory
from services.jobs import repository
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue

ALPHA, BETA, ADMIN, PLAIN = "alpha-key-0123456789", "beta-key-0123456789", "admin-key-0123456789", "plain-k1"


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def db_url(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


@pytest.fixture
def client(db_url: str, tmp_path: Path, moto_s3: str) -> Iterator[TestClient]:
    """A control API with keys of two tenants, an env key without a tenant, and an admin key."""
    settings = make_settings(
        db_url,
        tmp_path,
        environment="development",
        api_keys=[f"alpha:{ALPHA}", f"beta:{BETA}", PLAIN],
        admin_api_keys=[ADMIN],
        # Every request reads the stored keys afresh, so a revocation shows at once.
        api_key_cache_seconds=0,
        storage={
            "artifacts_uri": "s3://must-artifacts",
            "s3_endpoint_url": moto_s3,
        },
    )
    with TestClient(create_app(settings, queue=RecordingJobQueue())) as test_client:
        yield test_client


@pytest.fixture
def body(s3_client: Any, bucket: str) -> dict[str, Any]:
    s3_client.put_object(Bucket=bucket, Key="unlabeled/0001.jpg", Body=b"jpeg")
    return {"class_names": ["cat", "dog"], "dataset": {"uri": f"s3://{bucket}/unlabeled/"}}


def _submit(client: TestClient, key: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    answer = client.post("/adaptations", json=body, headers=_as(key) | headers)
    assert answer.status_code == 202, answer.text
    created: dict[str, Any] = answer.json()
    return created


def test_another_tenants_job_is_404_for_every_action(client: TestClient, body: dict[str, Any]) -> None:
    job = _submit(client, ALPHA, body)
    job_id = job["id"]

    assert job["tenant"] == "alpha"
    for method, path in [
        ("GET", f"/adaptations/{job_id}"),
        ("GET", f"/adaptations/{job_id}/metrics"),
        ("GET", f"/adaptations/{job_id}/logs"),
        ("POST", f"/adaptations/{job_id}/cancel"),
        ("DELETE", f"/adaptations/{job_id}"),
    ]:
        answer = client.request(method, path, headers=_as(BETA))
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"] == "JobNotFound"
    listed = client.get("/adaptations", headers=_as(BETA)).json()
    assert listed["items"] == []
    assert listed["total"] == 0
    # Beta's attempt left the job alone; its owner still sees it queued.
    own = client.get(f"/adaptations/{job_id}", headers=_as(ALPHA)).json()
    assert own["status"] == "queued"
    assert own["cancel_requested"] is False


def test_an_admin_key_sees_and_cancels_every_tenants_jobs(client: TestClient, body: dict[str, Any]) -> None:
    alpha = _submit(client, ALPHA, body)["id"]
    beta = _submit(client, BETA, body)["id"]

    listed = client.get("/adaptations", headers=_as(ADMIN)).json()
    cancelled = client.post(f"/adaptations/{beta}/cancel", headers=_as(ADMIN))

    assert {item["id"] for item in listed["items"]} == {alpha, beta}
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert [item["id"] for item in client.get("/adaptations", headers=_as(ALPHA)).json()["items"]] == [alpha]


def test_idempotency_keys_are_per_tenant(client: TestClient, body: dict[str, Any]) -> None:
    first = _submit(client, ALPHA, body, **{"Idempotency-Key": "same-key"})
    again = _submit(client, ALPHA, body, **{"Idempotency-Key": "same-key"})
    other = _submit(client, BETA, body, **{"Idempotency-Key": "same-key"})

    assert again["id"] == first["id"]
    assert other["id"] != first["id"]
    assert other["tenant"] == "beta"
    # Beta cannot learn about alpha's job through the key, not even through a different body.
    changed = client.post(
        "/adaptations", json=body | {"class_names": ["x", "y"]}, headers=_as(BETA) | {"Idempotency-Key": "k2"}
    )
    assert changed.status_code == 202


def test_an_env_key_without_a_tenant_belongs_to_the_default_tenant(
    client: TestClient, body: dict[str, Any]
) -> None:
    job = _submit(client, PLAIN, body)

    assert job["tenant"] == "default"
    assert client.get(f"/adaptations/{job['id']}", headers=_as(ALPHA)).status_code == 404


def _keys(db_url: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, Any]]]:
    code = keys_cli.main(["--database-url", db_url, *args])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return code, lines


def test_stored_keys_are_created_listed_and_revoked_without_a_restart(
    client: TestClient, body: dict[str, Any], db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, [created] = _keys(db_url, "create", "--tenant", "gamma", "--name", "gamma CI", capsys=capsys)
    assert code == 0
    key = created["key"]
    job = _submit(client, key, body)
    assert job["tenant"] == "gamma"
    assert client.get(f"/adaptations/{job['id']}", headers=_as(ALPHA)).status_code == 404

    _, listed = _keys(db_url, "list", "--tenant", "gamma", capsys=capsys)
    assert [row["id"] for row in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert key.startswith(listed[0]["prefix"])

    code, _ = _keys(db_url, "revoke", created["id"], capsys=capsys)
    assert code == 0
    answer = client.get("/adaptations", headers=_as(key))
    assert answer.status_code == 401
    assert _keys(db_url, "revoke", created["id"], capsys=capsys)[0] == 1
    assert _keys(db_url, "list", "--tenant", "gamma", capsys=capsys)[1] == []


def test_keys_are_stored_hashed(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, [created] = _keys(db_url, "create", "--tenant", "delta", "--admin", capsys=capsys)

    from sqlalchemy import create_engine

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = [dict(row._mapping) for row in conn.execute(text("SELECT * FROM api_keys"))]
    finally:
        engine.dispose()
    assert len(rows) == 1
    assert created["key"] not in json.dumps(rows, default=str)
    assert rows[0]["admin"] is True
    assert len(rows[0]["key_hash"]) == 64


def test_a_bad_tenant_name_is_refused_by_the_cli(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = keys_cli.main(["--database-url", db_url, "create", "--tenant", "Not A Tenant"])

    assert code == 2
    assert "not a valid name" in capsys.readouterr().err


def test_prediction_runs_belong_to_the_adaptations_tenant(
    client: TestClient, body: dict[str, Any], db_url: str
) -> None:
    job_id = _submit(client, ALPHA, body)["id"]
    engine = make_engine(db_url)
    with make_session_factory(engine)() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        repository.mark_succeeded(session, job_id, artifact_uri="x", artifact_sha256="0" * 64, owner="w")
    engine.dispose()
    request = {"adaptation_id": job_id, "source": body["dataset"]["uri"]}

    refused = client.post("/predictions", json=request, headers=_as(BETA))
    run = client.post("/predictions", json=request, headers=_as(ALPHA))

    assert (refused.status_code, refused.json()["error"]) == (404, "JobNotFound")
    assert run.status_code == 202, run.text
    run_id = run.json()["id"]
    for path in (f"/predictions/{run_id}", f"/predictions/{run_id}/results"):
        answer = client.get(path, headers=_as(BETA))
        assert (answer.status_code, answer.json()["error"]) == (404, "PredictionNotFound")
    assert client.get("/predictions", headers=_as(BETA)).json()["total"] == 0
    assert client.get("/predictions", headers=_as(ADMIN)).json()["total"] == 1
    assert client.get(f"/predictions/{run_id}", headers=_as(ALPHA)).json()["status"] == "queued"
