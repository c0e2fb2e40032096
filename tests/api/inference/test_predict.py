"""Predictions over HTTP: stored images, uploads, the zero-shot baseline, the artifact cache, batching."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from api.inference.main import ServingOptions, create_app
from bench.shapes import CLASS_NAMES, png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import Settings
from services.must.export import load_classifier
from services.storage.base import ObjectStore
from services.storage.s3 import S3ObjectStore
from tests.api.inference.conftest import (
    Export,
    as_dict,
    by_label,
    republish,
    succeeded_job,
)

K = len(CLASS_NAMES)
ZERO_SHOT_FIELDS = {
    "config": str(CONFIG_PATH),
    "checkpoint": str(CHECKPOINT_PATH),
    "class_names": "cat,dog,bird",
}


def expected(export: Export, images: list[Image.Image]) -> list[dict[str, float]]:
    """What the exported classifier itself predicts for `images`."""
    probs = load_classifier(export.folder).predict(images)
    return [as_dict(row) for row in probs]


def upload(images: list[Image.Image]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart `files` entries for PNG-encoded images."""
    return [("files", (f"img-{i}.png", png_bytes(image), "image/png")) for i, image in enumerate(images)]


def test_get_classifies_an_s3_image(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    bucket: str,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])
    store.write_bytes("inputs/a.png", png_bytes(images[0]))

    answer = client.get(
        "/predict", params={"adaptation_id": job_id, "image_url": f"s3://{bucket}/inputs/a.png"}
    )

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["adaptation_id"] == job_id
    assert body["artifact_sha256"] == exports[0].manifest.weights_sha256
    assert body["model"]["kind"] == "adapted"
    assert body["model"]["class_names"] == list(CLASS_NAMES)
    assert len(body["predictions"]) == min(5, K)
    want = expected(exports[0], images[:1])[0]
    for label, probability in by_label(body["predictions"]).items():
        assert probability == pytest.approx(want[label], abs=1e-5)


def test_post_three_files_matches_the_exported_classifier(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])

    answer = client.post(
        "/predict", data={"adaptation_id": job_id, "top_k": str(K)}, files=upload(images[:3])
    )

    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["filename"] for r in results] == ["img-0.png", "img-1.png", "img-2.png"]
    for result, want in zip(results, expected(exports[0], images[:3]), strict=True):
        got = by_label(result["predictions"])
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-5)
        assert got == pytest.approx(want, abs=1e-5)


def test_zero_shot_baseline_by_upload_and_by_url(
    client: TestClient, tmp_path: Path, images: list[Image.Image]
) -> None:
    answer = client.post("/predict", data=ZERO_SHOT_FIELDS, files=upload(images[:2]))
    stored = tmp_path / "a.png"
    stored.write_bytes(png_bytes(images[0]))
    model = f'{{"config": "{CONFIG_PATH}", "checkpoint": "{CHECKPOINT_PATH}"}}'
    params = {"model": model, "class_names": "cat,dog,bird", "image_url": stored.as_uri()}
    by_url = client.get("/predict", params=params)

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["adaptation_id"] is None
    assert body["artifact_sha256"] is None
    assert body["model"]["kind"] == "zero_shot"
    assert body["model"]["class_names"] == ["cat", "dog", "bird"]
    assert sum(by_label(body["results"][0]["predictions"]).values()) == pytest.approx(1.0, abs=1e-5)
    assert by_url.status_code == 200, by_url.text
    assert by_label(by_url.json()["predictions"]) == pytest.approx(
        by_label(body["results"][0]["predictions"])
    )


class CountingStore:
    """An object store that counts downloads and passes everything else through."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.downloads: list[str] = []

    def download_file(self, key: str, path: Path) -> None:
        self.downloads.append(key)
        self.inner.download_file(key, path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_artifact_is_downloaded_once_and_reloaded_when_republished(
    settings: Settings,
    options: ServingOptions,
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    counting = CountingStore(store)
    # The job row read on every request, so the republished version is served at once.
    every_request = replace(options, artifact_recheck_s=0.0)
    app = create_app(settings, options=every_request, artifacts_store=counting)  # type: ignore[arg-type]
    with TestClient(app) as client:
        job_id = succeeded_job(app.state.session_factory, store, exports[0])
        fields = {"adaptation_id": job_id, "top_k": str(K)}
        first = client.post("/predict", data=fields, files=upload(images[:1]))
        second = client.post("/predict", data=fields, files=upload(images[:1]))
        assert len(counting.downloads) == 2
        republish(app.state.session_factory, store, job_id, exports[1])
        third = client.post("/predict", data=fields, files=upload(images[:1]))

    assert [r.status_code for r in (first, second, third)] == [200, 200, 200]
    assert second.json() == first.json()
    assert len(counting.downloads) == 4
    assert third.json()["artifact_sha256"] == exports[1].manifest.weights_sha256
    got = by_label(third.json()["results"][0]["predictions"])
    assert got == pytest.approx(expected(exports[1], images[:1])[0], abs=1e-5)


class CountingSessions:
    """A session factory that counts the sessions opened (each job lookup opens one)."""

    def __init__(self, inner: sessionmaker[Session]) -> None:
        self.inner = inner
        self.opened = 0

    def __call__(self) -> Session:
        self.opened += 1
        return self.inner()


def test_job_is_read_at_most_once_per_recheck_interval_and_a_republish_is_then_served(
    settings: Settings,
    options: ServingOptions,
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    recheck_s = 4.0
    app = create_app(settings, options=replace(options, artifact_recheck_s=recheck_s))
    with TestClient(app) as client:
        job_id = succeeded_job(app.state.session_factory, store, exports[0])
        sessions = CountingSessions(app.state.session_factory)
        app.state.predictor.cache.session_factory = sessions
        fields = {"adaptation_id": job_id, "top_k": str(K)}
        started = time.monotonic()
        first = client.post("/predict", data=fields, files=upload(images[:1]))
        looked_up_by = time.monotonic()
        republish(app.state.session_factory, store, job_id, exports[1])
        within = [client.post("/predict", data=fields, files=upload(images[:1])) for _ in range(3)]
        within_s = time.monotonic() - started
        lookups_within = sessions.opened
        time.sleep(max(0.0, looked_up_by + recheck_s - time.monotonic()))
        after = client.post("/predict", data=fields, files=upload(images[:1]))

    assert within_s < recheck_s, "the machine was too slow to stay inside the interval"
    assert lookups_within == 1
    assert [a.json()["artifact_sha256"] for a in (first, *within)] == [exports[0].manifest.weights_sha256] * 4
    assert after.status_code == 200
    assert after.json()["artifact_sha256"] == exports[1].manifest.weights_sha256
    assert sessions.opened == 2


def test_concurrent_requests_are_micro_batched(
    settings: Settings,
    tmp_path: Path,
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    # A wider wait budget than production's keeps the test independent of the machine's speed.
    app: FastAPI = create_app(
        settings, options=ServingOptions(device="cpu", cache_dir=tmp_path, max_wait_s=0.2)
    )
    with TestClient(app) as client:
        job_id = succeeded_job(app.state.session_factory, store, exports[0])
        predictor = app.state.predictor
        forward, calls = predictor.forward, []

        def counted(classifier: Any, pixels: torch.Tensor) -> torch.Tensor:
            calls.append(len(pixels))
            return forward(classifier, pixels)

        predictor.batcher.forward = counted
        fields = {"adaptation_id": job_id, "top_k": str(K)}
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(
                pool.map(lambda im: client.post("/predict", data=fields, files=upload([im])), images)
            )

    assert [a.status_code for a in answers] == [200] * 16
    assert sum(calls) == 16
    assert len(calls) < 16
    for answer, want in zip(answers, expected(exports[0], images), strict=True):
        assert by_label(answer.json()["results"][0]["predictions"]) == pytest.approx(want, abs=1e-5)


def test_a_lone_small_request_runs_on_its_event_loop_once_the_model_is_timed(
    client: TestClient,
    session_factory: sessionmaker[Session],
    store: S3ObjectStore,
    exports: tuple[Export, Export],
    images: list[Image.Image],
) -> None:
    job_id = succeeded_job(session_factory, store, exports[0])
    predictor = client.app.state.predictor  # type: ignore[attr-defined]
    forward, threads = predictor.batcher.forward, []

    def observed(classifier: Any, pixels: torch.Tensor) -> torch.Tensor:
        threads.append((threading.current_thread().name, len(pixels)))
        return forward(classifier, pixels)

    predictor.batcher.forward = observed
    fields = {"adaptation_id": job_id, "top_k": str(K)}
    answers = [client.post("/predict", data=fields, files=upload([image])) for image in images[:3]]
    answers.append(client.post("/predict", data=fields, files=upload(images[3:5])))

    # The first forward of a model goes to the forward thread and times it; a later lone
    # one-image request skips the threads; a request of two images takes them again.
    assert [name == "forward" for name, _ in threads] == [True, False, False, True]
    assert [size for _, size in threads] == [1, 1, 1, 2]
    wanted = expected(exports[0], images[:5])
    got = [result["predictions"] for answer in answers for result in answer.json()["results"]]
    for predictions, want in zip(got, wanted, strict=True):
        assert by_label(predictions) == pytest.approx(want, abs=1e-5)
