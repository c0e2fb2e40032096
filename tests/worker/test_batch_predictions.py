"""Batch prediction runs on SQLite, a real S3-compatible server (moto) and the tiny CLIP's classifier."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from bench.shapes import CLASS_NAMES
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import DatabaseSettings, Settings, StorageSettings
from services.db.models import PredictionRun
from services.db.types import utcnow
from services.jobs import predictions, repository
from services.jobs.states import JobStatus
from services.must.adapt import prepare
from services.must.export import MANIFEST, WEIGHTS, export_classifier, load_classifier
from services.must.loading import ModelSpec
from services.storage import keys
from services.storage.object_store import open_store
from tests.worker.conftest import create_job, tiny_request
from worker.batch_predictions import run_prediction
from worker.celery_app import GPU_QUEUE, PREDICT_TASK
from worker.reconcile import resend_lost_runs, start_reconciler

SOURCE = "incoming/"


@pytest.fixture
def settings(sqlite_url: str, moto_s3: str, bucket: str) -> Settings:
    return Settings(
        database=DatabaseSettings(url=sqlite_url),
        storage=StorageSettings(artifacts_uri=f"s3://{bucket}/artifacts", s3_endpoint_url=moto_s3),
    )


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP's zero-shot classifier, exported as a job would publish it."""
    prepared = prepare(ModelSpec(config=str(CONFIG_PATH), checkpoint=str(CHECKPOINT_PATH)), list(CLASS_NAMES))
    out = tmp_path_factory.mktemp("classifier")
    export_classifier(
        prepared.classifier(),
        out,
        model_cfg=prepared.clip.model_cfg,
        templates=prepared.templates,
        source_model=prepared.source_model(),
    )
    return out


def _succeeded_job(
    session_factory: sessionmaker[Session], settings: Settings, classifier_dir: Path, **request: Any
) -> str:
    job_id = create_job(session_factory, tiny_request("s3://elsewhere/x/") | request)
    store, prefix = open_store(settings.storage.artifacts_uri, settings)
    store.upload_file(keys.join_key(prefix, keys.classifier_weights_key(job_id)), classifier_dir / WEIGHTS)
    store.upload_file(keys.join_key(prefix, keys.classifier_manifest_key(job_id)), classifier_dir / MANIFEST)
    sha = hashlib.sha256((classifier_dir / WEIGHTS).read_bytes()).hexdigest()
    with session_factory() as session:
        repository.mark_running(session, job_id, owner="w", lease_seconds=60)
        repository.mark_succeeded(session, job_id, artifact_uri="x", artifact_sha256=sha, owner="w")
    return job_id


@pytest.fixture
def source(s3_client: Any, bucket: str, target_pngs: list[bytes]) -> str:
    """Twelve images (one in a sub-folder), a corrupt one, a text file, and a look-alike prefix."""
    for i, data in enumerate(target_pngs[:11]):
        s3_client.put_object(Bucket=bucket, Key=f"{SOURCE}img-{i:03d}.png", Body=data)
    s3_client.put_object(Bucket=bucket, Key=f"{SOURCE}sub/deep.png", Body=target_pngs[11])
    s3_client.put_object(Bucket=bucket, Key=f"{SOURCE}broken.png", Body=b"this is not a png")
    s3_client.put_object(Bucket=bucket, Key=f"{SOURCE}notes.txt", Body=b"not listed")
    s3_client.put_object(Bucket=bucket, Key="incoming-other/x.png", Body=target_pngs[0])
    return f"s3://{bucket}/{SOURCE.rstrip('/')}"


def _submit(session_factory: sessionmaker[Session], job_id: str, source: str, **fields: Any) -> str:
    request = {
        "adaptation_id": job_id,
        "source": source,
        "top_k": 3,
        "min_probability": None,
        "max_images": None,
    }
    with session_factory() as session:
        return predictions.create_run(session, job_id=job_id, tenant="default", request=request | fields).id


def _results(settings: Settings, run: PredictionRun) -> list[dict[str, Any]]:
    store, _ = open_store(settings.storage.artifacts_uri, settings)
    assert run.results_key is not None
    data = store.read_bytes(run.results_key, max_bytes=1 << 24)
    assert hashlib.sha256(data).hexdigest() == run.results_sha256
    assert len(data) == run.results_bytes
    return [json.loads(line) for line in data.decode().splitlines()]


def _finished(session_factory: sessionmaker[Session], run_id: str) -> PredictionRun:
    with session_factory() as session:
        return predictions.get_run(session, run_id)


def test_every_image_under_the_prefix_gets_a_line(
    session_factory: sessionmaker[Session],
    settings: Settings,
    classifier_dir: Path,
    source: str,
    bucket: str,
    target_pngs: list[bytes],
) -> None:
    job_id = _succeeded_job(session_factory, settings, classifier_dir)
    run_id = _submit(session_factory, job_id, source)

    run_prediction(run_id, session_factory=session_factory, settings=settings, worker_id="w1", device="cpu")

    run = _finished(session_factory, run_id)
    assert run.status == JobStatus.SUCCEEDED, run.error_message
    assert (run.images_done, run.images_failed, run.images_abstained) == (13, 1, 0)
    assert run.results_key == f"artifacts/{keys.prediction_results_key(job_id, run_id)}"
    lines = _results(settings, run)
    by_key = {line["key"]: line for line in lines}
    assert sorted(by_key) == sorted(
        [f"{SOURCE}img-{i:03d}.png" for i in range(11)] + [f"{SOURCE}sub/deep.png", f"{SOURCE}broken.png"]
    )
    assert by_key[f"{SOURCE}broken.png"]["error"]["reason"] == "not_an_image"
    # The same probabilities as the classifier gives these images directly.
    classifier = load_classifier(classifier_dir)
    images = [Image.open(io.BytesIO(data)) for data in target_pngs[:11]]
    expected = classifier.top_k(classifier.predict(images), 3)
    for i, top in enumerate(expected):
        line = by_key[f"{SOURCE}img-{i:03d}.png"]
        assert [p["label"] for p in line["predictions"]] == [p["label"] for p in top]
        assert [p["probability"] for p in line["predictions"]] == pytest.approx(
            [p["probability"] for p in top], abs=1e-5
        )
        assert line["label"] == top[0]["label"]

    # A duplicate delivery of the finished run's message changes nothing.
    run_prediction(run_id, session_factory=session_factory, settings=settings, worker_id="w1", device="cpu")
    assert _finished(session_factory, run_id).attempts == 1


def test_the_jobs_abstain_threshold_and_max_images_apply(
    session_factory: sessionmaker[Session], settings: Settings, classifier_dir: Path, source: str
) -> None:
    job_id = _succeeded_job(session_factory, settings, classifier_dir, min_probability=0.99)
    run_id = _submit(session_factory, job_id, source, max_images=5, top_k=1)
    run_prediction(run_id, session_factory=session_factory, settings=settings, worker_id="w1", device="cpu")
    run = _finished(session_factory, run_id)
    lines = _results(settings, run)
    assert len(lines) == 5
    # The tiny CLIP is never 99% sure on these images: every usable one abstains.
    usable = [line for line in lines if "error" not in line]
    assert usable
    assert all(line["abstained"] and line["label"] is None for line in usable)
    assert run.images_abstained == len(usable)
    assert all(len(line["predictions"]) == 1 for line in usable)


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("empty_prefix", "no images found under the source prefix"),
        ("missing_bucket", "does not exist"),
        ("classifier_gone", "does not exist"),
        ("tampered", "does not match its sha256"),
    ],
)
def test_failures_are_clear(
    session_factory: sessionmaker[Session],
    settings: Settings,
    classifier_dir: Path,
    source: str,
    bucket: str,
    problem: str,
    message: str,
) -> None:
    job_id = _succeeded_job(session_factory, settings, classifier_dir)
    store, prefix = open_store(settings.storage.artifacts_uri, settings)
    weights = keys.join_key(prefix, keys.classifier_weights_key(job_id))
    uri = {"empty_prefix": f"s3://{bucket}/nothing-here/", "missing_bucket": "s3://no-such-bucket-x/a/"}.get(
        problem, source
    )
    if problem == "classifier_gone":
        store.delete_keys([weights])
    if problem == "tampered":
        store.write_bytes(weights, b"other weights")
    run_id = _submit(session_factory, job_id, uri)
    run_prediction(run_id, session_factory=session_factory, settings=settings, worker_id="w1", device="cpu")
    run = _finished(session_factory, run_id)
    assert run.status == JobStatus.FAILED
    assert message in (run.error_message or ""), run.error_message
    assert "object at 0x" not in (run.error_message or "")


def test_a_run_whose_worker_died_is_requeued_and_completes_elsewhere(
    session_factory: sessionmaker[Session], settings: Settings, classifier_dir: Path, source: str
) -> None:
    job_id = _succeeded_job(session_factory, settings, classifier_dir)
    run_id = _submit(session_factory, job_id, source)
    with session_factory() as session:
        assert predictions.start_run(session, run_id, owner="dead-worker", lease_seconds=0.2)
    # A duplicate message while the lease is alive does nothing.
    with session_factory() as session:
        assert not predictions.start_run(session, run_id, owner="other", lease_seconds=60)
    sent: list[tuple[str, dict[str, Any]]] = []
    stop = threading.Event()
    thread = start_reconciler(
        session_factory, lambda name, **kwargs: sent.append((name, kwargs)), every_seconds=0.05, stop=stop
    )
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)

    assert sent == [(PREDICT_TASK, {"kwargs": {"msg": {"run_id": run_id}}, "queue": GPU_QUEUE})]
    assert _finished(session_factory, run_id).status == JobStatus.QUEUED
    run_prediction(run_id, session_factory=session_factory, settings=settings, worker_id="w2", device="cpu")
    run = _finished(session_factory, run_id)
    assert (run.status, run.attempts, run.images_done) == (JobStatus.SUCCEEDED, 2, 13)
    # The dead worker, were it to come back, could no longer write the run.
    with session_factory() as session:
        assert not predictions.record_progress(
            session, run_id, owner="dead-worker", done=1, failed=0, abstained=0
        )


def test_a_queued_run_whose_message_was_lost_is_sent_again_once(
    session_factory: sessionmaker[Session], settings: Settings, classifier_dir: Path, source: str
) -> None:
    job_id = _succeeded_job(session_factory, settings, classifier_dir)
    run_id = _submit(session_factory, job_id, source)
    with session_factory() as session:
        predictions.set_task_id(session, run_id, task_id="lost-task", now=utcnow() - timedelta(seconds=600))
    sent: list[str] = []

    def send(name: str, **kwargs: Any) -> object:
        sent.append(kwargs["kwargs"]["msg"]["run_id"])
        return SimpleNamespace(id="new-task")

    # The broker holds the message: nothing to do; it does not: sent again, and only once.
    assert resend_lost_runs(session_factory, send, after_seconds=300, in_broker=lambda: {"lost-task"}) == []
    assert resend_lost_runs(session_factory, send, after_seconds=300, in_broker=set) == [run_id]
    assert resend_lost_runs(session_factory, send, after_seconds=300, in_broker=set) == []
    assert sent == [run_id]
    assert _finished(session_factory, run_id).celery_task_id == "new-task"
