"""Bad input answers 4xx naming the problem, never 500."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from bench.shapes import png_bytes
from tests.api.inference.conftest import queued_job


def test_unknown_adaptation_is_404(client: TestClient) -> None:
    for adaptation_id in (str(uuid.uuid4()), "not-a-uuid"):
        answer = client.post(
            "/predict", data={"adaptation_id": adaptation_id}, files={"files": ("a.png", b"x")}
        )
        assert answer.status_code == 404, answer.text


def test_unfinished_adaptation_is_409_with_its_status(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    job_id = queued_job(session_factory)
    answer = client.get("/predict", params={"adaptation_id": job_id, "image_url": "s3://some-bucket/a.png"})
    assert answer.status_code == 409
    assert answer.json()["status"] == "queued"


@pytest.fixture
def zero_shot_fields() -> dict[str, str]:
    """Fields of a zero-shot baseline on the tiny CLIP."""
    from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH

    return {"config": str(CONFIG_PATH), "checkpoint": str(CHECKPOINT_PATH), "class_names": "cat,dog"}


def test_non_image_and_corrupt_uploads_are_named_alone_422_or_per_file_beside_good_ones(
    client: TestClient, zero_shot_fields: dict[str, str], images: list[Image.Image]
) -> None:
    good = png_bytes(images[0])
    for name, data, reason in [("notes.txt", b"hello", "not_an_image"), ("cut.png", good[:60], "unreadable")]:
        alone = client.post("/predict", data=zero_shot_fields, files=[("files", (name, data))])
        assert alone.status_code == 422, alone.text
        assert alone.json()["filename"] == name
        assert alone.json()["reason"] == reason
        assert name in alone.json()["detail"]
        files = [("files", ("ok.png", good)), ("files", (name, data))]
        beside = client.post("/predict", data=zero_shot_fields, files=files)
        assert beside.status_code == 200, beside.text
        ok, bad = beside.json()["results"]
        assert (ok["error"], bad["error"]["reason"], bad["filename"]) == (None, reason, name)


def test_too_large_image_is_413(client: TestClient, zero_shot_fields: dict[str, str]) -> None:
    big = png_bytes(Image.new("RGB", (100, 100)))
    answer = client.post("/predict", data=zero_shot_fields, files={"files": ("big.png", big)})
    assert answer.status_code == 413, answer.text
    assert answer.json()["filename"] == "big.png"


def test_missing_image_url_object_is_404(
    client: TestClient, bucket: str, zero_shot_fields: dict[str, str]
) -> None:
    answer = client.get("/predict", params={**zero_shot_fields, "image_url": f"s3://{bucket}/missing.png"})
    assert answer.status_code == 404, answer.text


@pytest.mark.parametrize("top_k", ["0", "-1", "many", "100000"])
def test_bad_top_k_is_422(client: TestClient, zero_shot_fields: dict[str, str], top_k: str) -> None:
    answer = client.post(
        "/predict", data={**zero_shot_fields, "top_k": top_k}, files={"files": ("a.png", b"x")}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["field"].endswith("top_k")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"class_names": "a,b"},
        {"arch": "ViT-B-32"},
        {"model": "{not json", "class_names": "a,b"},
        {"model": '{"weights": "x"}', "class_names": "a,b"},
        {"config": "/nowhere/config.json", "class_names": "a,b"},
        {"arch": "no-such-arch", "class_names": "a,b"},
    ],
)
def test_no_usable_classifier_is_422(client: TestClient, fields: dict[str, str]) -> None:
    answer = client.post("/predict", data=fields, files={"files": ("a.png", b"x")})
    assert answer.status_code == 422, answer.text


def test_bad_image_url_is_422_and_missing_files_is_422(
    client: TestClient, zero_shot_fields: dict[str, str]
) -> None:
    assert (
        client.get("/predict", params={**zero_shot_fields, "image_url": "http://x/a.png"}).status_code == 422
    )
    assert client.post("/predict", data=zero_shot_fields).status_code == 422


def test_local_files_are_refused_outside_the_embedded_mode(
    settings, options, tmp_path, zero_shot_fields: dict[str, str]
) -> None:
    from api.inference.deps import ImageReader
    from api.inference.main import create_app
    from services.errors import InvalidRequest

    stored = tmp_path / "a.png"
    stored.write_bytes(png_bytes(Image.new("RGB", (32, 32))))
    development = settings.model_copy(update={"environment": "development", "api_keys": ["test-key"]})
    assert ImageReader(settings).read(stored.as_uri()) == stored.read_bytes()
    with pytest.raises(InvalidRequest, match="embedded mode"):
        ImageReader(development).read(stored.as_uri())
    with TestClient(create_app(development, options=options)) as client:
        answer = client.post(
            "/predict",
            data=zero_shot_fields,
            files={"files": ("a.png", stored.read_bytes())},
            headers={"X-API-Key": "test-key"},
        )
    assert answer.status_code == 422
    assert "local files are accepted only in the embedded mode" in answer.text
