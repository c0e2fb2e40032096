"""Bad input through the live services: a clear 4xx, or a failed job with a clear message; no 500s."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bench.shapes import CLASS_NAMES, iter_domain, png_bytes
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def _detail(answer: Any) -> str:
    detail = answer.json()["detail"]
    return detail if isinstance(detail, str) else " | ".join(f"{e['field']}: {e['msg']}" for e in detail)


@pytest.fixture(scope="module")
def body(stack: Stack) -> dict[str, Any]:
    """A valid request on a small image prefix; each case changes one thing."""
    dataset = stack.put_images("bad-input/good/", (image for image, _ in iter_domain("target", 8, seed=41)))
    return {
        "class_names": list(CLASS_NAMES),
        "dataset": {"uri": dataset},
        "model": stack.tiny_clip(),
        "hparams": {"total_steps": 2, "batch_size": 4},
    }


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"dataset": {"uri": "s3://no-such-bucket-e2e/images/"}}, 422, "'no-such-bucket-e2e' does not exist"),
        ({"dataset": {"uri": "s3://{bucket}/nothing/here/"}}, 422, "holds no objects"),
        ({"class_names": ["cat"]}, 422, "between 2 and 10000 class names are needed"),
        ({"class_names": ["cat", "dog", "cat"]}, 422, "repeated: 'cat'"),
        ({"class_names": [f"c{i}" for i in range(20_000)]}, 422, "got 20000"),
        ({"model": {"arch": "ViT-B-32", "checkpoint": "weights.pt"}}, 422, "absolute path"),
    ],
)
def test_bad_requests_are_422_naming_the_problem(
    stack: Stack, body: dict[str, Any], change: dict[str, Any], status: int, needle: str
) -> None:
    if "dataset" in change:
        change = {"dataset": {"uri": change["dataset"]["uri"].format(bucket=stack.bucket)}}
    with stack.control() as http:
        answer = http.post("/adaptations", json=body | change)
    assert answer.status_code == status, answer.text
    assert needle in _detail(answer)


def test_malformed_json_is_422(stack: Stack) -> None:
    with stack.control() as http:
        answer = http.post(
            "/adaptations", content=b'{"class_names": [', headers={"Content-Type": "application/json"}
        )
    assert answer.status_code == 422
    assert "not valid JSON" in _detail(answer)


def _failed(stack: Stack, request: dict[str, Any]) -> dict[str, Any]:
    with stack.control() as http:
        answer = http.post("/adaptations", json=request)
    assert answer.status_code == 202, answer.text
    job = stack.wait(answer.json()["id"], timeout=300)
    assert job["status"] == "failed", job
    return job


def test_prefix_of_only_corrupt_and_non_image_files_fails_the_job_saying_so(
    stack: Stack, body: dict[str, Any]
) -> None:
    stack.put("bad-input/junk/a.png", b"not a png at all")
    stack.put("bad-input/junk/b.jpg", png_bytes(next(iter_domain("target", 1, seed=1))[0])[:40])
    stack.put("bad-input/junk/c.txt", b"text")

    job = _failed(stack, body | {"dataset": {"uri": stack.uri("bad-input/junk/")}})

    assert job["error"]["type"] == "DatasetError"
    assert stack.uri("bad-input/junk/") in job["error"]["message"]
    assert "no usable images" in job["error"]["message"]


def test_unknown_architecture_fails_the_job_naming_it(stack: Stack, body: dict[str, Any]) -> None:
    job = _failed(stack, body | {"model": {"arch": "ViT-Nope-99", "pretrained": "openai"}})

    assert job["error"]["type"] == "ModelLoadError"
    assert "ViT-Nope-99" in job["error"]["message"]


def test_predict_for_unknown_unfinished_or_non_image_input_is_4xx(stack: Stack, body: dict[str, Any]) -> None:
    with stack.control() as http:
        queued = http.post(
            "/adaptations", json=body | {"hparams": {"total_steps": 500, "batch_size": 4}}
        ).json()
    image = ("files", ("x.png", png_bytes(next(iter_domain("target", 1, seed=2))[0]), "image/png"))
    with stack.inference() as http:
        unknown = http.post("/predict", data={"adaptation_id": str(uuid.uuid4())}, files=[image])
        unfinished = http.post("/predict", data={"adaptation_id": queued["id"]}, files=[image])
        text = http.post(
            "/predict",
            data={"model": '{"arch": "ViT-B-32"}', "class_names": "a,b"},
            files=[("files", ("notes.txt", b"hello", "text/plain"))],
        )
    with stack.control() as http:
        http.post(f"/adaptations/{queued['id']}/cancel")
    stack.wait(queued["id"], timeout=120)

    assert unknown.status_code == 404, unknown.text
    assert unfinished.status_code == 409, unfinished.text
    assert queued["id"] in _detail(unfinished)
    assert text.status_code == 422, text.text
    assert "notes.txt" in _detail(text)
