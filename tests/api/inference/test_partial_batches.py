"""POST /predict with some unusable files answers for the rest; min_probability abstains."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from bench.shapes import CLASS_NAMES, png_bytes
from services.db.models import Job
from services.storage.s3 import S3ObjectStore
from tests.api.inference.conftest import Export, succeeded_job


def _files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", item) for item in items]


def test_one_bad_file_gets_an_error_and_the_others_their_labels(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])
    files = _files(
        ("a.png", png_bytes(images[0])),
        ("notes.txt", b"this is not an image"),
        ("broken.png", png_bytes(images[1])[:60]),
        ("b.png", png_bytes(images[1])),
    )

    answer = client.post("/predict", data={"adaptation_id": job_id, "top_k": "2"}, files=files)

    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "notes.txt", "broken.png", "b.png"]
    for good in (results[0], results[3]):
        assert good["error"] is None
        assert good["label"] == good["predictions"][0]["label"] in CLASS_NAMES
        assert len(good["predictions"]) == 2
        assert good["abstained"] is False
    assert results[1]["error"]["reason"] == "not_an_image"
    assert results[2]["error"]["reason"] == "unreadable"
    for bad in (results[1], results[2]):
        assert (bad["label"], bad["predictions"]) == (None, [])
        assert "object at 0x" not in bad["error"]["message"]
        assert "<" not in bad["error"]["message"]
    assert "supported format" in results[1]["error"]["message"]


def test_only_when_no_file_is_usable_does_the_request_fail(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    exports: tuple[Export, Export],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])

    both = client.post(
        "/predict", data={"adaptation_id": job_id}, files=_files(("x.txt", b"nope"), ("y.bin", b"\x00" * 10))
    )
    one = client.post("/predict", data={"adaptation_id": job_id}, files=_files(("x.txt", b"nope")))

    assert both.status_code == 422
    body: dict[str, Any] = both.json()
    assert body["error"] == "NoUsableImages"
    assert [(f["filename"], f["reason"]) for f in body["files"]] == [
        ("x.txt", "not_an_image"),
        ("y.bin", "not_an_image"),
    ]
    assert "0x" not in both.text
    assert (one.status_code, one.json()["error"]) == (422, "ImageRejected")


def test_min_probability_abstains_and_the_job_default_applies_unless_overridden(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])
    files = _files(("a.png", png_bytes(images[0])), ("b.png", png_bytes(images[2])))

    def post(**fields: str) -> dict[str, Any]:
        answer = client.post("/predict", data={"adaptation_id": job_id, **fields}, files=files)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    plain = post()
    assert plain["min_probability"] is None
    assert all(r["label"] is not None and not r["abstained"] for r in plain["results"])
    tops = [r["predictions"][0]["probability"] for r in plain["results"]]
    threshold = (tops[0] + tops[1]) / 2 if tops[0] != tops[1] else 1.0
    strict = post(min_probability=str(threshold))
    assert strict["min_probability"] == threshold
    for result, top in zip(strict["results"], tops, strict=True):
        assert result["abstained"] is (top < threshold)
        assert result["label"] == (None if top < threshold else result["predictions"][0]["label"])
    assert strict["results"][0]["predictions"] == plain["results"][0]["predictions"]

    # A job whose request set a default threshold (a request is fixed once the job is made).
    job_id = succeeded_job(session_factory, store, exports[1])
    with session_factory() as session:
        request = {"class_names": list(CLASS_NAMES), "min_probability": 1.0}
        session.execute(update(Job).where(Job.id == job_id).values(request=request))
        session.commit()
    by_default = post()
    assert by_default["min_probability"] == 1.0
    assert all(r["abstained"] is (r["predictions"][0]["probability"] < 1.0) for r in by_default["results"])
    assert any(r["abstained"] for r in by_default["results"])
    overridden = post(min_probability="0")
    assert overridden["min_probability"] == 0.0
    assert all(not r["abstained"] for r in overridden["results"])
    assert (
        client.post(
            "/predict", data={"adaptation_id": job_id, "min_probability": "2"}, files=files
        ).status_code
        == 422
    )
