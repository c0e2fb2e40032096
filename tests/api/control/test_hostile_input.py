"""Input that used to reach the database or the worker raw: refused at submit with a clear 4xx.

On PostgreSQL, whose 32- and 64-bit integers overflow where SQLite's do not, and in the
development environment, where local files are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.control.main import create_app
from services.db.migrate import upgrade
from tests.api.conftest import make_settings
from tests.api.fakes import RecordingJobQueue

KEY = "hostile-key-0123456789"
JOB = "0b6f3c1e-5a52-4c3c-9d0e-2f4f3f2d9a10"


@pytest.fixture
def client(pg_url: str, tmp_path: Path, moto_s3: str) -> Iterator[TestClient]:
    upgrade(pg_url)
    settings = make_settings(
        pg_url,
        tmp_path,
        environment="development",
        api_keys=[KEY],
        storage={"artifacts_uri": "s3://must-artifacts/platform", "s3_endpoint_url": moto_s3},
    )
    headers = {"X-API-Key": KEY}
    with TestClient(create_app(settings, queue=RecordingJobQueue()), headers=headers) as test_client:
        yield test_client


@pytest.fixture
def body(s3_client: Any, bucket: str) -> dict[str, Any]:
    s3_client.put_object(Bucket=bucket, Key="unlabeled/0001.jpg", Body=b"jpeg")
    return {"class_names": ["cat", "dog"], "dataset": {"uri": f"s3://{bucket}/unlabeled/"}}


def _detail(answer: httpx.Response) -> str:
    detail = answer.json()["detail"]
    return detail if isinstance(detail, str) else " | ".join(f"{e['field']}: {e['msg']}" for e in detail)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        (f"/adaptations/{JOB}/metrics", {"since_step": "2147483648"}),
        ("/adaptations", {"offset": "9223372036854775808"}),
        ("/adaptations", {"offset": "2147483648"}),
    ],
)
def test_integers_past_the_database_columns_are_422(
    client: TestClient, path: str, params: dict[str, str]
) -> None:
    answer = client.get(path, params=params)

    assert answer.status_code == 422, answer.text
    assert "less than or equal to 2147483647" in _detail(answer)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"templates": ["a {x} {}"]}, "no other '{...}' field"),
        ({"templates": ["a {0} {}"]}, "no other '{...}' field"),
        ({"templates": ["a {} and {}"]}, "exactly one '{}'"),
        ({"templates": ["{"]}, "exactly one '{}'"),
        ({"hparams": {"total_steps": 2**31}}, "less than or equal to 2147483647"),
        ({"hparams": {"seed": 2**40}}, "less than or equal to 2147483647"),
        ({"dataset": {"uri": "s3://b-b-b/x/", "max_images": 2**31}}, "less than or equal to 2147483647"),
    ],
)
def test_requests_that_used_to_fail_late_are_422_at_submit(
    client: TestClient, body: dict[str, Any], change: dict[str, Any], needle: str
) -> None:
    answer = client.post("/adaptations", json=body | change)

    assert answer.status_code == 422, answer.text
    assert needle in _detail(answer)


def test_literal_braces_in_templates_are_accepted(client: TestClient, body: dict[str, Any]) -> None:
    answer = client.post("/adaptations", json=body | {"templates": ["a {{sketch}} of a {}."]})

    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"arch": "ViT-B-32", "pretrained": "/etc/passwd"}, "body.model.pretrained"),
        ({"arch": "hf-hub:timm/vit_base_patch32_clip_224.openai"}, "body.model.arch"),
        ({"arch": "local-dir:/etc"}, "body.model.arch"),
        ({"arch": "ViT-B-32", "checkpoint": "/etc/passwd"}, "model.checkpoint must be an s3:// URI"),
        ({"arch": "ViT-B-32", "checkpoint": "file:///etc/passwd"}, "model.checkpoint must be an s3:// URI"),
        ({"config": "/etc/hosts", "checkpoint": "s3://b-b-b/w.pt"}, "model.config must be an s3:// URI"),
        (
            {"arch": "ViT-B-32", "checkpoint": "s3://must-artifacts/platform/adaptations/x/checkpoints/a"},
            "artifacts store",
        ),
    ],
)
def test_models_cannot_name_server_files_or_hub_repositories(
    client: TestClient, body: dict[str, Any], model: dict[str, str], needle: str
) -> None:
    answer = client.post("/adaptations", json=body | {"model": model})

    assert answer.status_code == 422, answer.text
    assert needle in _detail(answer)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"dataset": {"uri": "file:///etc"}}, "dataset.uri must be an s3:// URI"),
        ({"eval": {"uri": "file:///etc/"}}, "eval.uri must be an s3:// URI"),
        ({"dataset": {"uri": "s3://must-artifacts/platform/adaptations/"}}, "artifacts store"),
        ({"eval": {"uri": "s3://must-artifacts/platform//adaptations/x/"}}, "artifacts store"),
        ({"labelled": {"uri": "file:///etc/"}}, "labelled.uri must be an s3:// URI"),
        ({"labelled": {"uri": "s3://must-artifacts/platform/adaptations/x/"}}, "artifacts store"),
    ],
)
def test_data_locations_are_s3_outside_the_artifacts_store(
    client: TestClient, body: dict[str, Any], change: dict[str, Any], needle: str
) -> None:
    answer = client.post("/adaptations", json=body | change)

    assert answer.status_code == 422, answer.text
    assert needle in _detail(answer)


def test_a_body_over_the_limit_is_413_before_it_is_parsed(client: TestClient, body: dict[str, Any]) -> None:
    huge = json.dumps(body | {"class_names": ["x" * 200] * 300_000}).encode()  # 60 MB
    assert len(huge) > 60_000_000

    declared = client.post("/adaptations", content=huge, headers={"Content-Type": "application/json"})

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(huge), 1 << 20):
            yield huge[start : start + (1 << 20)]

    streamed = client.post("/adaptations", content=chunks(), headers={"Content-Type": "application/json"})

    for answer in (declared, streamed):
        assert answer.status_code == 413, answer.text[:300]
        assert "MUST_LIMITS__MAX_BODY_BYTES" in answer.json()["detail"]
