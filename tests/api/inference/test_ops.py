"""Operations on the inference service: API keys outside the embedded mode, and `/metrics`."""

from __future__ import annotations

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.inference.main import ServingOptions, create_app
from bench.shapes import png_bytes
from services.config import Settings
from services.storage.s3 import S3ObjectStore
from tests.api.common.test_metrics import requests, scrape
from tests.api.inference.conftest import Export, succeeded_job

KEY = "inference-key-0123456789"


def test_predictions_and_requests_are_counted(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    bucket: str,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])
    store.write_bytes("inputs/a.png", png_bytes(images[0]))
    uploads = [("files", (f"{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images[:3])]

    one = client.get("/predict", params={"adaptation_id": job_id, "image_url": f"s3://{bucket}/inputs/a.png"})
    many = client.post("/predict", data={"adaptation_id": job_id}, files=uploads)
    client.get("/predict", params={"image_url": f"s3://{bucket}/inputs/a.png"})  # names no classifier
    samples = scrape(client)

    assert one.status_code == many.status_code == 200
    assert samples[("must_predictions_total", (("source", "adaptation"),))] == 4
    assert requests(samples, "/predict", "200") == 1
    assert requests(samples, "/predict", "200", "POST") == 1
    assert requests(samples, "/predict", "422") == 1


def test_keys_are_required_outside_the_embedded_mode(settings: Settings, options: ServingOptions) -> None:
    development = Settings(**(settings.model_dump() | {"environment": "development", "api_keys": [KEY]}))

    with TestClient(create_app(development, options=options)) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        missing = client.get("/predict", params={"image_url": "s3://x/y.png"})
        wrong = client.post("/predict", headers={"X-API-Key": "nope"})
        metrics = client.get("/metrics")
        allowed = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})

    assert missing.status_code == wrong.status_code == metrics.status_code == 401
    assert "requires an API key" in missing.json()["detail"]
    assert "not valid" in wrong.json()["detail"]
    assert allowed.status_code == 200
