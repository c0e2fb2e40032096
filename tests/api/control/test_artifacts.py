"""GET /adaptations/{id}/artifact: presigned S3 URLs (moto) or streams of a local store, with sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.jobs import repository
from services.storage import keys
from services.storage.object_store import open_store
from tests.api.conftest import make_settings

WEIGHTS = b"\x00weights" * 1000
MANIFEST = b'{"class_names": ["cat", "dog", "bird"]}'


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, sqlite_url: str, tmp_path: Path) -> Settings:
    """A local artifacts folder, then a bucket on moto signed for another address of the same server."""
    if request.param == "local":
        return make_settings(sqlite_url, tmp_path)
    endpoint = str(request.getfixturevalue("moto_s3"))
    storage = {
        "artifacts_uri": f"s3://{request.getfixturevalue('bucket')}/platform",
        "s3_endpoint_url": endpoint,
        # The address clients reach; the services use the other one.
        "s3_public_endpoint_url": endpoint.replace("127.0.0.1", "localhost"),
        "download_url_seconds": 600,
    }
    return make_settings(sqlite_url, tmp_path, storage=storage)


def _succeeded_job(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings, body: dict[str, Any]
) -> str:
    job_id: str = client.post("/adaptations", json=body).json()["id"]
    store, prefix = open_store(settings.storage.artifacts_uri, settings)
    store.write_bytes(keys.join_key(prefix, keys.classifier_weights_key(job_id)), WEIGHTS)
    store.write_bytes(keys.join_key(prefix, keys.classifier_manifest_key(job_id)), MANIFEST)
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        sha = hashlib.sha256(WEIGHTS).hexdigest()
        repository.mark_succeeded(
            session, job_id, artifact_uri="x", artifact_sha256=sha, owner="w", served="teacher"
        )
    return job_id


def _fetch(client: TestClient, url: str) -> bytes:
    # A presigned URL is fetched without the API key; a path of the API with it.
    response = httpx.get(url) if url.startswith("http") else client.get(url)
    assert response.status_code == 200, response.text
    return response.content


def test_the_artifact_lists_both_files_with_sizes_and_sha256_and_they_download(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings, body: dict[str, Any]
) -> None:
    job_id = _succeeded_job(client, session_factory, settings, body)

    answer = client.get(f"/adaptations/{job_id}/artifact")

    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert info["adaptation_id"] == job_id
    assert info["sha256"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert info["served"] == "teacher"
    files = {f["name"]: f for f in info["files"]}
    assert list(files) == ["model.safetensors", "manifest.json"]
    for name, data in (("model.safetensors", WEIGHTS), ("manifest.json", MANIFEST)):
        assert (files[name]["size"], files[name]["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert _fetch(client, files[name]["url"]) == data
        # The stream route works whatever the store is.
        streamed = client.get(f"/adaptations/{job_id}/artifact/{name}")
        assert streamed.content == data
        assert streamed.headers["content-length"] == str(len(data))
    if settings.storage.artifacts_uri.startswith("s3://"):
        assert files["model.safetensors"]["url"].startswith(str(settings.storage.s3_public_endpoint_url))
        assert info["expires_in_seconds"] == 600
    else:
        assert files["model.safetensors"]["url"] == f"/adaptations/{job_id}/artifact/model.safetensors"
        assert info["expires_in_seconds"] is None


def test_unfinished_missing_and_unknown_files_are_clear_4xx(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings, body: dict[str, Any]
) -> None:
    queued: str = client.post("/adaptations", json=body).json()["id"]
    not_ready = client.get(f"/adaptations/{queued}/artifact")
    assert (not_ready.status_code, not_ready.json()["error"]) == (409, "ArtifactNotReady")
    assert "is queued" in not_ready.json()["detail"]
    assert client.get(f"/adaptations/{queued}/artifact/model.safetensors").status_code == 409

    job_id = _succeeded_job(client, session_factory, settings, body)
    assert client.get(f"/adaptations/{job_id}/artifact/..%2F..%2Fmetrics.jsonl").status_code in {404, 422}
    assert client.get(f"/adaptations/{job_id}/artifact/metrics.jsonl").status_code == 422
    store, prefix = open_store(settings.storage.artifacts_uri, settings)
    store.delete_keys([keys.join_key(prefix, keys.classifier_weights_key(job_id))])
    gone = client.get(f"/adaptations/{job_id}/artifact")
    assert (gone.status_code, gone.json()["error"]) == (404, "ArtifactMissing")
    assert client.get(f"/adaptations/{job_id}/artifact/model.safetensors").status_code == 404
    assert client.get("/adaptations/not-a-uuid/artifact").status_code == 404
