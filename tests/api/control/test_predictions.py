"""POST /predictions and friends: checks at submit time, the queue message, listing, results stream."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.jobs import predictions, repository
from services.storage import keys
from services.storage.object_store import open_store
from tests.api.fakes import RecordingJobQueue


@pytest.fixture
def photos(tmp_path: Path) -> str:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG not checked by the API")
    return folder.as_uri()


def _succeeded(client: TestClient, session_factory: sessionmaker[Session], body: dict[str, Any]) -> str:
    job_id: str = client.post("/adaptations", json=body | {"min_probability": 0.4}).json()["id"]
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        repository.mark_succeeded(
            session, job_id, artifact_uri="x", artifact_sha256="0" * 64, owner="w", served="student"
        )
    return job_id


def test_a_run_is_queued_with_its_request_and_listed(
    client: TestClient,
    session_factory: sessionmaker[Session],
    queue: RecordingJobQueue,
    body: dict[str, Any],
    photos: str,
) -> None:
    job_id = _succeeded(client, session_factory, body)
    answer = client.post("/predictions", json={"adaptation_id": job_id, "source": photos, "top_k": 2})

    assert answer.status_code == 202, answer.text
    run = answer.json()
    assert (run["status"], run["adaptation_id"], run["results_url"]) == ("queued", job_id, None)
    assert run["request"] == {
        "adaptation_id": job_id,
        "source": photos,
        "top_k": 2,
        "min_probability": None,
        "max_images": None,
    }
    assert [m.run_id for m in queue.predictions] == [run["id"]]
    assert client.get(f"/predictions/{run['id']}").json()["id"] == run["id"]
    other = _succeeded(client, session_factory, body)
    client.post("/predictions", json={"adaptation_id": other, "source": photos})
    assert client.get("/predictions").json()["total"] == 2
    page = client.get("/predictions", params={"adaptation_id": job_id}).json()
    assert [item["id"] for item in page["items"]] == [run["id"]]


def test_submit_time_refusals_are_clear(
    client: TestClient,
    session_factory: sessionmaker[Session],
    body: dict[str, Any],
    photos: str,
    tmp_path: Path,
) -> None:
    unknown = client.post(
        "/predictions", json={"adaptation_id": "0" * 8 + "-0000-4000-8000-" + "0" * 12, "source": photos}
    )
    assert (unknown.status_code, unknown.json()["error"]) == (404, "JobNotFound")
    queued = client.post("/adaptations", json=body).json()["id"]
    not_ready = client.post("/predictions", json={"adaptation_id": queued, "source": photos})
    assert (not_ready.status_code, not_ready.json()["error"]) == (409, "ArtifactNotReady")
    job_id = _succeeded(client, session_factory, body)
    (tmp_path / "empty").mkdir()
    for source, status in [
        ((tmp_path / "nowhere").as_uri(), 422),
        ("http://example.com/images/", 422),
        ("s3://", 422),
    ]:
        refused = client.post("/predictions", json={"adaptation_id": job_id, "source": source})
        assert refused.status_code == status, (source, refused.text)
    bad_k = client.post("/predictions", json={"adaptation_id": job_id, "source": photos, "top_k": 0})
    assert bad_k.status_code == 422
    extra = client.post("/predictions", json={"adaptation_id": job_id, "source": photos, "model": "x"})
    assert extra.status_code == 422
    assert client.get("/predictions/not-a-uuid").status_code == 404
    assert (
        client.get("/predictions/0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10").json()["error"]
        == "PredictionNotFound"
    )


def test_an_unreachable_queue_fails_the_run_and_answers_503(
    client: TestClient,
    session_factory: sessionmaker[Session],
    queue: RecordingJobQueue,
    body: dict[str, Any],
    photos: str,
) -> None:
    job_id = _succeeded(client, session_factory, body)
    queue.error = ConnectionError("redis://:secret@broker:6379")
    answer = client.post("/predictions", json={"adaptation_id": job_id, "source": photos})
    assert answer.status_code == 503
    assert "secret" not in answer.text
    (run,) = client.get("/predictions").json()["items"]
    assert (run["status"], run["error_type"]) == ("failed", "QueueUnavailable")


def test_results_stream_once_succeeded_and_go_with_the_adaptation(
    client: TestClient,
    session_factory: sessionmaker[Session],
    settings: Settings,
    body: dict[str, Any],
    photos: str,
) -> None:
    job_id = _succeeded(client, session_factory, body)
    run_id = client.post("/predictions", json={"adaptation_id": job_id, "source": photos}).json()["id"]
    early = client.get(f"/predictions/{run_id}/results")
    assert (early.status_code, early.json()["error"]) == (409, "ArtifactNotReady")

    lines = b'{"key": "a.png", "label": "cat"}\n'
    store, prefix = open_store(settings.storage.artifacts_uri, settings)
    key = keys.join_key(prefix, keys.prediction_results_key(job_id, run_id))
    store.write_bytes(key, lines)
    digest = hashlib.sha256(lines).hexdigest()
    with session_factory() as session:
        assert predictions.start_run(session, run_id, owner="w", lease_seconds=60)
        predictions.finish_run(
            session,
            run_id,
            owner="w",
            results_key=key,
            sha256=digest,
            size=len(lines),
            done=1,
            failed=0,
            abstained=0,
        )
    run = client.get(f"/predictions/{run_id}").json()
    assert (run["status"], run["results_sha256"], run["results_bytes"]) == ("succeeded", digest, len(lines))
    streamed = client.get(run["results_url"])
    assert streamed.status_code == 200
    assert streamed.content == lines
    assert streamed.headers["x-must-sha256"] == digest
    assert streamed.headers["content-type"].startswith("application/x-ndjson")

    assert client.delete(f"/adaptations/{job_id}").status_code == 204
    assert client.get(f"/predictions/{run_id}").status_code == 404
    assert not store.exists(key)


def test_the_list_filter_takes_only_an_adaptation_id(client: TestClient) -> None:
    assert client.get("/predictions", params={"adaptation_id": "not-a-uuid"}).status_code == 422
    empty = client.get("/predictions", params={"adaptation_id": "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10"})
    assert empty.json()["total"] == 0
