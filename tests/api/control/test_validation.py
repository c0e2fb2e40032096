"""Bad requests get a 4xx whose message says what to fix, never a 500."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.control.main import create_app
from services.jobs.states import JobStatus
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue


def _messages(response: Any) -> str:
    """Every message of an error answer as one string (a plain detail or a list of field errors)."""
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else " | ".join(f"{e['field']}: {e['msg']}" for e in detail)


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        ({"class_names": ["cat"]}, "body.class_names", "between 2 and 10000 class names are needed, got 1"),
        ({"class_names": ["cat", "dog", "cat "]}, "body.class_names", "repeated: 'cat'"),
        ({"class_names": [f"c{i}" for i in range(20_000)]}, "body.class_names", "got 20000"),
        ({"class_names": ["cat", "  "]}, "body.class_names", "blank at positions 1"),
        (
            {"hparams": {"epochs": 3}},
            "body.hparams",
            "unknown hyperparameter(s) 'epochs'; known: align_weight",
        ),
        ({"hparams": {"mask_ratio": 1.5}}, "body.hparams", "mask_ratio: Input should be less than 1"),
        (
            {"hparams": {"batch_size": 1}},
            "body.hparams",
            "batch_size: Input should be greater than or equal to 2",
        ),
        ({"hparams": {"lr": 0}}, "body.hparams", "lr: Input should be greater than 0"),
        ({"templates": ["a photo of a cat."]}, "body.templates", "exactly one '{}'"),
        ({"dataset": {"uri": "ftp://host/images/"}}, "body.dataset.uri", "unsupported storage scheme 'ftp'"),
        ({"class_descriptions": {"cow": "a cow"}}, "body", "not class names: 'cow'"),
        ({"model": {"config": "/models/custom.json"}}, "body.model", "model.config needs model.checkpoint"),
        (
            {"model": {"arch": "ViT-B-32", "checkpoint": "weights.pt"}},
            "body.model.checkpoint",
            "absolute path",
        ),
        ({"class_name": ["cat", "dog"]}, "body.class_name", "Extra inputs are not permitted"),
        ({"resources": {"gpus": 0}}, "body.resources.gpus", "greater than or equal to 1"),
        ({"resources": {"gpus": 17}}, "body.resources.gpus", "less than or equal to 16"),
        ({"resources": {"gpu": 2}}, "body.resources.gpu", "Extra inputs are not permitted"),
        (
            {"resources": {"gpus": 3}, "hparams": {"batch_size": 64}},
            "body",
            "batch_size 64 is the global batch: it must be divisible by resources.gpus 3",
        ),
        ({"resources": {"gpus": 2}, "method": "instant"}, "body", "method 'instant' runs on one GPU"),
        ({"resources": {"gpus": 2}, "warm_start": "instant"}, "body", "warm_start run on one GPU"),
        (
            {"resources": {"gpus": 2}, "labelled": {"uri": "s3://my-bucket/labelled/"}},
            "body",
            "few-label mode (labelled) and warm_start run on one GPU",
        ),
    ],
)
def test_bad_body_is_422_naming_the_field_and_the_fix(
    client: TestClient, body: dict[str, Any], change: dict[str, Any], field: str, hint: str
) -> None:
    response = client.post("/adaptations", json=body | change)

    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(e["field"] == field and hint in e["msg"] for e in errors), errors
    assert all("input" not in e for e in errors)


def test_malformed_json_is_422_saying_so(client: TestClient) -> None:
    response = client.post(
        "/adaptations", content=b'{"class_names": [', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert "the request body is not valid JSON" in _messages(response)


def test_wrong_content_type_is_415_asking_for_json(client: TestClient) -> None:
    response = client.post("/adaptations", content=b"class_names=cat", headers={"Content-Type": "text/plain"})

    assert response.status_code == 415
    assert "Content-Type: application/json" in _messages(response)


def test_missing_dataset_folder_is_422_naming_it(
    client: TestClient, body: dict[str, Any], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-folder"
    response = client.post("/adaptations", json=body | {"dataset": {"uri": missing.as_uri()}})

    assert response.status_code == 422
    assert f"dataset folder '{missing}' does not exist" in _messages(response)


@pytest.mark.parametrize("path", ["/adaptations/{}", "/adaptations/{}/metrics"])
@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-job-id", "x" * 500])
def test_unknown_or_malformed_job_id_is_404(client: TestClient, path: str, job_id: str) -> None:
    response = client.get(path.format(job_id))

    assert response.status_code == 404
    assert "does not exist" in _messages(response)
    assert len(_messages(response)) < 200


def test_cancel_unknown_job_is_404(client: TestClient) -> None:
    assert client.post(f"/adaptations/{uuid.uuid4()}/cancel").status_code == 404


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 201}, {"offset": -1}, {"status": "sleeping"}, {"limit": "many"}]
)
def test_bad_list_query_is_422(client: TestClient, params: dict[str, Any]) -> None:
    response = client.get("/adaptations", params=params)

    assert response.status_code == 422
    assert _messages(response).startswith("query.")


def test_enqueue_failure_fails_the_job_and_answers_503(
    client: TestClient, queue: RecordingJobQueue, body: dict[str, Any]
) -> None:
    queue.error = ConnectionError("Error 111 connecting to redis://:s3cret@10.0.0.5:6379/0")

    response = client.post("/adaptations", json=body)

    assert response.status_code == 503
    assert "job queue is unreachable" in _messages(response)
    [job] = client.get("/adaptations").json()["items"]
    assert job["status"] == JobStatus.FAILED
    assert job["error"]["type"] == "QueueUnavailable"
    assert "ConnectionError" in job["error"]["message"]
    # The broker's address and password stay out of what clients see.
    assert "s3cret" not in job["error"]["message"]
    assert "10.0.0.5" not in job["error"]["message"]


class TestS3Dataset:
    """Datasets on a real S3-compatible server (moto_server)."""

    @pytest.fixture
    def client(
        self, sqlite_url: str, tmp_path: Path, moto_s3: str, queue: RecordingJobQueue
    ) -> Iterator[TestClient]:
        """An app whose S3 client points at the moto server."""
        settings = make_settings(
            sqlite_url,
            tmp_path,
            storage={"artifacts_uri": (tmp_path / "artifacts").as_uri(), "s3_endpoint_url": moto_s3},
        )
        with TestClient(create_app(settings, queue=queue)) as test_client:
            yield test_client

    def test_prefix_with_objects_is_accepted(
        self, client: TestClient, body: dict[str, Any], s3_client: Any, bucket: str
    ) -> None:
        s3_client.put_object(Bucket=bucket, Key="unlabeled/a/0001.jpg", Body=b"jpeg")

        response = client.post("/adaptations", json=body | {"dataset": {"uri": f"s3://{bucket}/unlabeled/"}})

        assert response.status_code == 202, response.text

    def test_missing_bucket_is_422_naming_it(
        self, client: TestClient, body: dict[str, Any], moto_s3: str
    ) -> None:
        response = client.post(
            "/adaptations", json=body | {"dataset": {"uri": "s3://no-such-bucket-42/images/"}}
        )

        assert response.status_code == 422
        assert "'no-such-bucket-42' does not exist" in _messages(response)

    def test_empty_prefix_is_422_naming_it(
        self, client: TestClient, body: dict[str, Any], bucket: str
    ) -> None:
        response = client.post("/adaptations", json=body | {"dataset": {"uri": f"s3://{bucket}/empty/"}})

        assert response.status_code == 422
        assert f"dataset prefix 'empty/' in bucket '{bucket}' holds no objects" in _messages(response)
