"""POST /predict through its fast path: the same answers, errors and documentation as a FastAPI route."""

from __future__ import annotations

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.inference.routes import FAST_PREDICT, BatchPredictResponse
from bench.shapes import png_bytes
from services.storage.s3 import S3ObjectStore
from tests.api.inference.conftest import Export, succeeded_job


def test_the_fast_route_answers_post_and_the_documented_route_stays_in_openapi(client: TestClient) -> None:
    app = client.app
    assert app.router.routes[0] is FAST_PREDICT  # type: ignore[attr-defined]
    operation = app.openapi()["paths"]["/predict"]["post"]  # type: ignore[attr-defined]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]

    assert schema["required"] == ["files"]
    assert schema["properties"]["files"]["items"] == {"type": "string", "format": "binary"}
    assert {"adaptation_id", "top_k", "min_probability", "class_names"} <= set(schema["properties"])
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/BatchPredictResponse"
    )


def test_a_batch_answer_validates_against_its_documented_model(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])
    uploads = [
        ("files", ("a.png", png_bytes(images[0]), "image/png")),
        ("files", ("b.txt", b"text", "text/plain")),
    ]

    answer = client.post("/predict", data={"adaptation_id": job_id, "top_k": "2"}, files=uploads)

    assert answer.status_code == 200, answer.text
    body = BatchPredictResponse.model_validate(answer.json())
    assert [r.filename for r in body.results] == ["a.png", "b.txt"]
    assert len(body.results[0].predictions) == 2
    assert body.results[0].error is None
    assert body.results[1].error is not None
    assert body.results[1].error.reason == "not_an_image"


def test_unknown_fields_misnamed_files_and_other_bodies_are_422(
    client: TestClient, images: list[Image.Image]
) -> None:
    image = ("files", ("a.png", png_bytes(images[0]), "image/png"))

    unknown = client.post("/predict", data={"adaptation_id": "x", "topk": "3"}, files=[image])
    misnamed = client.post("/predict", data={"adaptation_id": "x"}, files=[("image", image[1])])
    no_files = client.post(
        "/predict", data={"adaptation_id": "x"}, files=[("dummy", ("", b"", "text/plain"))]
    )
    as_json = client.post("/predict", json={"adaptation_id": "x"})
    bad_value = client.post("/predict", data={"adaptation_id": "x", "top_k": "many"}, files=[image])

    assert unknown.status_code == 422
    assert "'topk'" in unknown.json()["detail"]
    assert misnamed.status_code == 422
    assert "named 'files'" in misnamed.json()["detail"]
    assert no_files.status_code == 422
    assert as_json.status_code == 422
    assert "multipart/form-data" in as_json.json()["detail"]
    assert bad_value.status_code == 422
    assert bad_value.json()["detail"][0]["field"] == "body.top_k"
