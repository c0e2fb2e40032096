"""The training pipeline end to end on SQLite, a real S3-compatible server (moto) and the tiny CLIP."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

import worker.pipeline
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import DatabaseSettings, Settings, StorageSettings
from services.db.models import Job
from services.db.types import utcnow
from services.jobs import repository
from services.jobs.states import JobPhase, JobStatus
from services.must.trainer import StepMetrics
from tests.worker.conftest import NUM_IMAGES, create_job, tiny_request
from worker.pipeline import run_training_job
from worker.reconcile import requeue_stale_jobs
from worker.samples import SAMPLES_PER_CLASS

DATASET = "target/"


class _Crash(BaseException):
    """Stands in for a worker process dying mid-training (nothing catches a BaseException)."""


@pytest.fixture
def settings(sqlite_url: str, moto_s3: str, bucket: str) -> Settings:
    """Settings with the artifacts under a prefix of the test bucket on the moto server."""
    return Settings(
        database=DatabaseSettings(url=sqlite_url),
        storage=StorageSettings(artifacts_uri=f"s3://{bucket}/artifacts", s3_endpoint_url=moto_s3),
    )


@pytest.fixture
def dataset_uri(s3_client: Any, bucket: str, target_pngs: list[bytes]) -> str:
    """The target images plus two corrupt images and a text file, under one prefix of the bucket."""
    for i, data in enumerate(target_pngs):
        s3_client.put_object(Bucket=bucket, Key=f"{DATASET}img-{i:03d}.png", Body=data)
    s3_client.put_object(Bucket=bucket, Key=f"{DATASET}broken.png", Body=b"this is not a png")
    s3_client.put_object(Bucket=bucket, Key=f"{DATASET}truncated.png", Body=target_pngs[0][:60])
    s3_client.put_object(Bucket=bucket, Key=f"{DATASET}README.txt", Body=b"notes")
    return f"s3://{bucket}/{DATASET}"


def _run(job_id: str, session_factory: sessionmaker[Session], settings: Settings, tmp_path: Path) -> Job:
    run_training_job(
        job_id,
        session_factory=session_factory,
        settings=settings,
        device="cpu",
        worker_id="worker-a",
        work_dir=tmp_path / "work",
    )
    with session_factory() as session:
        return repository.get_job(session, job_id)


def _keys(s3_client: Any, bucket: str, prefix: str) -> set[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {obj["Key"][len(prefix) :] for page in pages for obj in page.get("Contents", ())}


def _latest_step(s3_client: Any, bucket: str, job_id: str) -> int:
    key = f"artifacts/adaptations/{job_id}/checkpoints/latest.json"
    return int(json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())["step"])


def test_job_trains_and_publishes_classifier(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    job_id = create_job(session_factory, tiny_request(dataset_uri))

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert (job.images_used, job.images_skipped) == (NUM_IMAGES, 3)
    assert job.skipped_reasons is not None
    assert job.skipped_reasons.pop("not_an_image_extension") == 1
    assert sum(job.skipped_reasons.values()) == 2
    assert (job.step, job.total_steps) == (6, 6)
    stored = _keys(s3_client, bucket, f"artifacts/adaptations/{job_id}/")
    checkpoints = {
        f"checkpoints/step-{s:06d}{ext}" for s in (2, 4, 6) for ext in (".safetensors", ".state.json")
    }
    classifier = {"classifier/model.safetensors", "classifier/manifest.json"}
    assert checkpoints | classifier | {"checkpoints/latest.json", "metrics.jsonl"} <= stored
    assert _latest_step(s3_client, bucket, job_id) == 6
    manifest_key = f"artifacts/adaptations/{job_id}/classifier/manifest.json"
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    assert job.artifact_sha256 == manifest["weights_sha256"]
    # What the guard chose is recorded on the job, as in the manifest, with every candidate's score.
    assert job.served == manifest["network"] == manifest["metrics"]["guard"]["served"]
    assert job.outcome is not None
    assert job.outcome["served"] == job.served
    assert job.outcome["reason"]
    assert job.outcome["candidates"] == manifest["metrics"]["guard"]["candidates"]
    assert {c["name"] for c in job.outcome["candidates"]} >= {"zero_shot", "teacher", "student"}
    assert job.outcome["views"]["target"] == 0.8
    assert job.outcome["threshold"] == manifest["metrics"]["threshold"]
    assert job.outcome["predictions"] == manifest["metrics"]["predictions"]
    assert sum(job.outcome["predictions"]["class_counts"]["zero_shot"]) == NUM_IMAGES
    # A few dataset keys per class the served classifier predicted, for the dashboard's thumbnails.
    samples = job.outcome["samples"]
    counts = job.outcome["predictions"]["class_counts"]
    served_counts = counts.get(job.served, counts["zero_shot"])
    assert samples["classifier"] == job.served
    assert samples["images"] == NUM_IMAGES
    assert [len(keys) for keys in samples["keys"]] == [min(n, SAMPLES_PER_CLASS) for n in served_counts]
    listed = {f"{DATASET}img-{i:03d}.png" for i in range(NUM_IMAGES)}
    assert {key for keys in samples["keys"] for key in keys} <= listed
    assert [len(z) for z in samples["zero_shot"]] == [len(keys) for keys in samples["keys"]]
    assert all(0 < p <= 1 for row in samples["confidence"] for p in row)
    assert job.artifact_uri == f"s3://{bucket}/artifacts/adaptations/{job_id}/classifier"
    assert job.checkpoint_uri == f"s3://{bucket}/artifacts/adaptations/{job_id}/checkpoints/latest.json"
    with session_factory() as session:
        history = repository.list_metrics(session, job_id)
    assert [point.step for point in history][-1] == 6
    assert {"loss", "lr", "images_per_sec"} <= set(history[-1].values)
    metrics_key = f"artifacts/adaptations/{job_id}/metrics.jsonl"
    lines = s3_client.get_object(Bucket=bucket, Key=metrics_key)["Body"].read().decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [point.step for point in history]
    assert not (tmp_path / "work" / job_id).exists()


def test_empty_dataset_fails_naming_the_prefix(
    session_factory: sessionmaker[Session], settings: Settings, bucket: str, tmp_path: Path
) -> None:
    job_id = create_job(session_factory, tiny_request(f"s3://{bucket}/nothing-here/"))

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.FAILED
    assert job.error_type == "DatasetError"
    assert f"s3://{bucket}/nothing-here/" in (job.error_message or "")


@pytest.mark.parametrize(
    ("override", "error_type", "needle"),
    [
        ({"class_names": ["cat"]}, "ConfigError", "class_names"),
        ({"class_names": ["cat", "cat"]}, "ConfigError", "repeated"),
        ({"model": {"arch": "ViT-Nope-99"}}, "ModelLoadError", "ViT-Nope-99"),
    ],
)
def test_bad_request_fails_with_a_clear_message(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    tmp_path: Path,
    override: dict[str, Any],
    error_type: str,
    needle: str,
) -> None:
    job_id = create_job(session_factory, tiny_request(dataset_uri, **override))

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.FAILED
    assert job.error_type == error_type
    assert needle in (job.error_message or "")
    assert job.error_traceback is None


def test_cancel_requested_before_training_keeps_a_checkpoint(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    # The model files come from the bucket too, to cover the download of s3:// model URIs.
    s3_client.upload_file(str(CONFIG_PATH), bucket, "models/tiny.json")
    s3_client.upload_file(str(CHECKPOINT_PATH), bucket, "models/tiny.safetensors")
    model = {
        "config": f"s3://{bucket}/models/tiny.json",
        "checkpoint": f"s3://{bucket}/models/tiny.safetensors",
    }
    job_id = create_job(session_factory, tiny_request(dataset_uri, model=model))
    with session_factory() as session:
        # Set directly: request_cancel would cancel a queued job at once, before any worker saw it.
        repository.get_job(session, job_id).cancel_requested = True
        session.commit()

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.CANCELLED
    assert _latest_step(s3_client, bucket, job_id) == 0
    assert job.checkpoint_uri is not None


def _recording_reporter(steps: list[int]) -> Callable[..., Callable[[StepMetrics], None]]:
    real = worker.pipeline.make_progress_reporter

    def make(*args: Any, **kwargs: Any) -> Callable[[StepMetrics], None]:
        report = real(*args, **kwargs)

        def on_step(metrics: StepMetrics) -> None:
            steps.append(metrics.step)
            report(metrics)

        return on_step

    return make


def _crash_on_check(calls: int) -> Callable[..., Callable[[], bool]]:
    def make(*_args: Any, **_kwargs: Any) -> Callable[[], bool]:
        seen = 0

        def should_cancel() -> bool:
            nonlocal seen
            seen += 1
            if seen == calls:
                raise _Crash
            return False

        return should_cancel

    return make


def test_crashed_job_resumes_from_its_stored_checkpoint(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = create_job(session_factory, tiny_request(dataset_uri))
    first: list[int] = []
    monkeypatch.setattr(worker.pipeline, "make_progress_reporter", _recording_reporter(first))
    # The check before step index 2 runs right after the step-2 checkpoint was published.
    monkeypatch.setattr(worker.pipeline, "make_cancel_check", _crash_on_check(3))
    with pytest.raises(_Crash):
        _run(job_id, session_factory, settings, tmp_path)
    assert first == [1, 2]
    assert _latest_step(s3_client, bucket, job_id) == 2
    assert not (tmp_path / "work" / job_id).exists(), "the resume must come from the store"

    monkeypatch.undo()
    second: list[int] = []
    monkeypatch.setattr(worker.pipeline, "make_progress_reporter", _recording_reporter(second))
    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert second == [3, 4, 5, 6]


def test_job_held_by_a_live_lease_is_left_alone(
    session_factory: sessionmaker[Session], settings: Settings, dataset_uri: str, tmp_path: Path
) -> None:
    job_id = create_job(session_factory, tiny_request(dataset_uri))
    with session_factory() as session:
        assert repository.mark_running(session, job_id, owner="worker-b", lease_seconds=600)

    job = _run(job_id, session_factory, settings, tmp_path)

    assert (job.status, job.lease_owner, job.phase) == (JobStatus.RUNNING, "worker-b", JobPhase.QUEUED)


def test_reconciler_requeues_and_resends_stale_jobs(session_factory: sessionmaker[Session]) -> None:
    stale = create_job(session_factory, tiny_request("s3://some-bucket/x/"))
    live = create_job(session_factory, tiny_request("s3://some-bucket/y/"))
    with session_factory() as session:
        past = utcnow() - timedelta(minutes=10)
        repository.mark_running(session, stale, owner="dead", lease_seconds=60, now=past)
        repository.mark_running(session, live, owner="alive", lease_seconds=600)
    sent: list[tuple[str, dict[str, Any]]] = []

    requeued = requeue_stale_jobs(session_factory, lambda name, **kwargs: sent.append((name, kwargs)))

    assert requeued == [stale]
    assert sent == [("must.train", {"kwargs": {"msg": {"job_id": stale}}, "queue": "gpu"})]
    with session_factory() as session:
        assert repository.get_job(session, stale).status == JobStatus.QUEUED
        assert repository.get_job(session, live).status == JobStatus.RUNNING
