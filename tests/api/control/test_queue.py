"""The real Celery queue puts the job message on the `gpu` list of a real Redis."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.control.main import create_app
from tests.api.conftest import TEST_REDIS_URL, make_settings
from worker.celery_app import GPU_QUEUE, TRAIN_TASK

TWO_GPU_QUEUE = "gpu.2"


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """The test Redis database; the keys the test adds are deleted afterwards."""
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"Redis is unreachable at {TEST_REDIS_URL}: {exc}")
    client.delete(GPU_QUEUE, TWO_GPU_QUEUE)
    before = set(client.keys("*"))
    yield client
    added = set(client.keys("*")) - before
    client.delete(*(added | {GPU_QUEUE.encode(), TWO_GPU_QUEUE.encode()}))
    client.close()


def test_submitted_job_lands_on_the_gpu_queue(
    redis_db: redis.Redis, sqlite_url: str, tmp_path: Path, body: dict[str, Any]
) -> None:
    with TestClient(create_app(make_settings(sqlite_url, tmp_path))) as client:
        response = client.post("/adaptations", json=body)

    assert response.status_code == 202, response.text
    assert redis_db.llen(GPU_QUEUE) == 1
    message = json.loads(redis_db.lindex(GPU_QUEUE, 0) or b"{}")
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert message["headers"]["task"] == TRAIN_TASK
    assert (args, kwargs) == ([], {"msg": {"job_id": response.json()["id"]}})
    assert message["content-type"] == "application/json"


def test_a_two_gpu_job_lands_on_its_own_queue(
    redis_db: redis.Redis, sqlite_url: str, tmp_path: Path, body: dict[str, Any]
) -> None:
    with TestClient(create_app(make_settings(sqlite_url, tmp_path))) as client:
        response = client.post("/adaptations", json=body | {"resources": {"gpus": 2}})

    assert response.status_code == 202, response.text
    assert redis_db.llen(GPU_QUEUE) == 0  # a one-GPU worker never sees it
    assert redis_db.llen(TWO_GPU_QUEUE) == 1
    message = json.loads(redis_db.lindex(TWO_GPU_QUEUE, 0) or b"{}")
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {"msg": {"job_id": response.json()["id"], "gpus": 2}}
