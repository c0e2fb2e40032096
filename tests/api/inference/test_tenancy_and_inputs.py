"""The inference service outside the embedded mode: tenants, and inputs that name no server file or host."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.inference.main import ServingOptions, create_app
from bench.shapes import png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import Settings
from services.db.models import Job
from services.storage.s3 import S3ObjectStore
from tests.api.inference.conftest import Export, succeeded_job

ALPHA, BETA, ADMIN = "alpha-key-0123456789", "beta-key-0123456789", "admin-key-0123456789"


def _as(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture
def development(settings: Settings) -> Settings:
    values = settings.model_dump() | {
        "environment": "development",
        "api_keys": [f"alpha:{ALPHA}", f"beta:{BETA}"],
        "admin_api_keys": [ADMIN],
    }
    return Settings(**values)


@pytest.fixture
def client(development: Settings, options: ServingOptions) -> Iterator[TestClient]:
    with TestClient(create_app(development, options=options)) as test_client:
        yield test_client


@pytest.fixture
def session_factory(client: TestClient) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = client.app.state.session_factory  # type: ignore[attr-defined]
    return factory


@pytest.fixture
def alpha_job(
    session_factory: sessionmaker[Session], store: S3ObjectStore, exports: tuple[Export, Export]
) -> str:
    """A succeeded adaptation of tenant alpha."""
    job_id = succeeded_job(session_factory, store, exports[0])
    with session_factory() as session:
        session.execute(update(Job).where(Job.id == job_id).values(tenant="alpha"))
        session.commit()
    return job_id


def test_another_tenants_adaptation_is_404_on_both_routes(
    client: TestClient, alpha_job: str, store: S3ObjectStore, bucket: str, images: list[Image.Image]
) -> None:
    store.write_bytes("inputs/a.png", png_bytes(images[0]))
    url = f"s3://{bucket}/inputs/a.png"
    upload = {"files": ("a.png", png_bytes(images[0]), "image/png")}

    # The owner's request loads the classifier; the other tenant's, right after, must not reuse it.
    own = client.get("/predict", params={"adaptation_id": alpha_job, "image_url": url}, headers=_as(ALPHA))
    other_get = client.get(
        "/predict", params={"adaptation_id": alpha_job, "image_url": url}, headers=_as(BETA)
    )
    other_post = client.post("/predict", data={"adaptation_id": alpha_job}, files=upload, headers=_as(BETA))
    admin = client.post("/predict", data={"adaptation_id": alpha_job}, files=upload, headers=_as(ADMIN))

    assert own.status_code == 200, own.text
    assert other_get.status_code == 404, other_get.text
    assert other_post.status_code == 404, other_post.text
    assert admin.status_code == 200, admin.text


def test_image_urls_cannot_reach_the_artifacts_of_any_job(
    client: TestClient, alpha_job: str, bucket: str
) -> None:
    for url in [
        f"s3://{bucket}/adaptations/{alpha_job}/classifier/model.safetensors",
        f"s3://{bucket}/./adaptations/{alpha_job}/classifier/manifest.json",
        f"s3://{bucket}/inputs/../adaptations/{alpha_job}/metrics.jsonl",
    ]:
        answer = client.get(
            "/predict", params={"adaptation_id": alpha_job, "image_url": url}, headers=_as(ALPHA)
        )
        assert answer.status_code == 422, (url, answer.text)
        assert "artifacts store" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"arch": "ViT-B-32", "pretrained": "/etc/passwd"}, "not an open_clip name"),
        ({"arch": "hf-hub:timm/vit_base_patch32_clip_224.openai"}, "not an open_clip name"),
        ({"arch": "local-dir:/etc"}, "not an open_clip name"),
        ({"config": str(CONFIG_PATH), "checkpoint": str(CHECKPOINT_PATH)}, "embedded mode"),
        ({"config": CONFIG_PATH.as_uri(), "checkpoint": CHECKPOINT_PATH.as_uri()}, "embedded mode"),
        # Downloads are off unless the operator turns them on: no request reaches the hub.
        ({"arch": "ViT-B-32", "pretrained": "openai"}, "downloads are turned off"),
    ],
)
def test_zero_shot_models_cannot_name_server_files_or_other_hosts(
    client: TestClient, model: dict[str, str], needle: str, images: list[Image.Image]
) -> None:
    import json

    fields = {"model": json.dumps(model), "class_names": "cat,dog"}
    start = time.monotonic()
    answer = client.post(
        "/predict", data=fields, files={"files": ("a.png", png_bytes(images[0]))}, headers=_as(ALPHA)
    )

    assert answer.status_code == 422, answer.text
    assert needle in answer.json()["detail"]
    assert time.monotonic() - start < 5


def test_an_operator_folder_of_models_is_allowed(
    settings: Settings, options: ServingOptions, images: list[Image.Image]
) -> None:
    values: dict[str, Any] = settings.model_dump() | {"environment": "development", "api_keys": [ALPHA]}
    values["models"] = {"local_dirs": [str(CONFIG_PATH.parent)]}
    fields = {"config": str(CONFIG_PATH), "checkpoint": str(CHECKPOINT_PATH), "class_names": "cat,dog"}
    with TestClient(create_app(Settings(**values), options=options)) as client:
        answer = client.post(
            "/predict", data=fields, files={"files": ("a.png", png_bytes(images[0]))}, headers=_as(ALPHA)
        )

    assert answer.status_code == 200, answer.text
