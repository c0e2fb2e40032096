"""A user adapts the tiny CLIP to unlabeled target images in S3 and predicts with the result.

Everything goes through the public HTTP APIs and the S3 server; labels are used only to score.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from bench.shapes import CLASS_NAMES, iter_domain, png_bytes
from bench.tiny_clip import TARGET_TEST_SEED
from tests.stack import Stack

pytestmark = pytest.mark.e2e

TRAIN_IMAGES = 600
TEST_IMAGES = 300
# The defaults, on a schedule short enough for a test (the default for 600 images is 563 steps).
HPARAMS: dict[str, Any] = {"total_steps": 120, "batch_size": 32, "lr": 1e-4, "checkpoint_every": 40}


def _top1(stack: Stack, fields: dict[str, str], images: list[tuple[bytes, int]]) -> float:
    """Top-1 accuracy (%) of POST /predict over labelled images, sent in batches of 50."""
    correct = 0
    with stack.inference() as http:
        for start in range(0, len(images), 50):
            batch = images[start : start + 50]
            files = [("files", (f"{start + i}.png", data, "image/png")) for i, (data, _) in enumerate(batch)]
            answer = http.post("/predict", data=fields | {"top_k": "1"}, files=files)
            assert answer.status_code == 200, answer.text
            for result, (_, label) in zip(answer.json()["results"], batch, strict=True):
                correct += result["predictions"][0]["label"] == CLASS_NAMES[label]
    return 100.0 * correct / len(images)


def test_adapt_from_s3_then_predict_better_than_zero_shot(stack: Stack) -> None:
    dataset = stack.put_images("happy/", (image for image, _ in iter_domain("target", TRAIN_IMAGES, seed=21)))
    stack.put("happy/corrupt.png", b"\x89PNG\r\n\x1a\n not really")
    stack.put("happy/notes.txt", b"not an image")
    model = stack.tiny_clip()
    body = {"class_names": list(CLASS_NAMES), "dataset": {"uri": dataset}, "model": model}
    body |= {"hparams": HPARAMS}

    started = time.monotonic()
    with stack.control() as http:
        created = http.post("/adaptations", json=body, headers={"Idempotency-Key": "happy-path"})
        again = http.post("/adaptations", json=body, headers={"Idempotency-Key": "happy-path"})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert again.json()["id"] == job_id

    phases: list[str] = []

    def finished(job: dict[str, Any]) -> bool:
        if job["phase"] and job["phase"] not in phases:
            phases.append(job["phase"])
        return job["status"] in {"succeeded", "failed", "cancelled"}

    job = stack.wait(job_id, finished, timeout=600)
    elapsed = time.monotonic() - started
    assert job["status"] == "succeeded", job["error"]
    print(f"\ne2e happy path: job succeeded in {elapsed:.1f} s; phases {phases}")
    assert phases[-1] == "done"
    assert "training" in phases
    assert [span["phase"] for span in job["phases"]] == [
        "queued",
        "listing",
        "staging",
        "scoring_zero_shot",
        "training",
        "exporting",
        "done",
    ]
    assert (job["images_used"], job["images_skipped"]) == (TRAIN_IMAGES, 2)
    # The label-free guard's choice and its evidence come back with the job.
    outcome = job["outcome"]
    assert job["served"] == outcome["served"]
    assert {c["name"] for c in outcome["candidates"]} >= {"zero_shot", "teacher", "student"}
    assert outcome["views"]["sample_images"] == 512
    assert job["progress"]["step"] == job["progress"]["total_steps"] == HPARAMS["total_steps"]

    stored = stack.keys(f"artifacts/adaptations/{job_id}/")
    expected = {f"checkpoints/step-{s:06d}.safetensors" for s in (40, 80, 120)}
    expected |= {"checkpoints/latest.json", "classifier/model.safetensors", "classifier/manifest.json"}
    assert expected | {"metrics.jsonl"} <= stored
    with stack.control() as http:
        metrics = http.get(f"/adaptations/{job_id}/metrics").raise_for_status().json()
    assert metrics["items"], metrics

    labelled = iter_domain("target", TEST_IMAGES, seed=TARGET_TEST_SEED)
    held_out = [(png_bytes(image), label) for image, label in labelled]
    adapted = _top1(stack, {"adaptation_id": job_id}, held_out)
    zero_shot_fields = {"model": json.dumps(model), "class_names": ",".join(CLASS_NAMES)}
    zero_shot = _top1(stack, zero_shot_fields, held_out)
    print(
        f"target top-1 on {TEST_IMAGES} held-out images: zero-shot {zero_shot:.1f}%, adapted {adapted:.1f}%"
    )
    assert adapted > zero_shot

    image_url = stack.put("happy-test/one.png", held_out[0][0])
    with stack.inference() as http:
        answer = http.get("/predict", params={"adaptation_id": job_id, "image_url": image_url, "top_k": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["artifact_sha256"] == job["artifact"]["sha256"]
    assert len(answer.json()["predictions"]) == 3
