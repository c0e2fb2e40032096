"""A job with a labelled eval set, end to end on SQLite, moto S3 and the tiny CLIP: the scores,
the phase history and the stored log lines; and a bad eval set failing the job before training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from bench.shapes import CLASS_NAMES, iter_domain, png_bytes
from bench.tiny_clip import CHECKPOINT_PATH, CONFIG_PATH
from services.config import DatabaseSettings, Settings, StorageSettings
from services.db.models import Job
from services.jobs import repository
from services.jobs.states import JobPhase, JobStatus
from services.must.adapt import prepare
from services.must.evaluation import score_classifier
from services.must.loading import ModelSpec
from tests.worker.conftest import create_job, tiny_request
from worker.pipeline import run_training_job

EVAL_IMAGES = 12
DESCRIPTIONS = {"circle": "a round shape with no corners"}


@pytest.fixture
def settings(sqlite_url: str, moto_s3: str, bucket: str) -> Settings:
    return Settings(
        database=DatabaseSettings(url=sqlite_url),
        storage=StorageSettings(artifacts_uri=f"s3://{bucket}/artifacts", s3_endpoint_url=moto_s3),
    )


@pytest.fixture
def dataset_uri(s3_client: Any, bucket: str, target_pngs: list[bytes]) -> str:
    for i, data in enumerate(target_pngs):
        s3_client.put_object(Bucket=bucket, Key=f"target/img-{i:03d}.png", Body=data)
    return f"s3://{bucket}/target/"


@pytest.fixture
def eval_set(s3_client: Any, bucket: str, tmp_path: Path) -> tuple[str, list[Path], list[int]]:
    """A CSV manifest of labelled target images on S3, and local copies of the same images."""
    rows, paths, labels = ["key,label"], [], []
    local = tmp_path / "eval-copy"
    local.mkdir()
    for i, (image, label) in enumerate(iter_domain("target", EVAL_IMAGES, seed=11)):
        data = png_bytes(image)
        s3_client.put_object(Bucket=bucket, Key=f"labelled/images/{i}.png", Body=data)
        rows.append(f"images/{i}.png,{CLASS_NAMES[label]}")
        (local / f"{i}.png").write_bytes(data)
        paths.append(local / f"{i}.png")
        labels.append(label)
    s3_client.put_object(Bucket=bucket, Key="labelled/eval.csv", Body="\n".join(rows).encode())
    return f"s3://{bucket}/labelled/eval.csv", paths, labels


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


def test_a_job_with_an_eval_set_reports_scores_phases_and_logs(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    eval_set: tuple[str, list[Path], list[int]],
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    eval_uri, local_paths, labels = eval_set
    request = tiny_request(dataset_uri, eval={"uri": eval_uri}, class_descriptions=DESCRIPTIONS)
    job_id = create_job(session_factory, request)

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.SUCCEEDED, job.error_message
    report = job.evaluation
    assert report is not None
    assert (report["images"], report["class_names"], report["served"]) == (
        EVAL_IMAGES,
        list(CLASS_NAMES),
        job.served,
    )
    assert set(report["candidates"]) == {"zero_shot", "teacher", "student", "served"}
    for score in report["candidates"].values():
        confusion = torch.tensor(score["confusion"])
        assert confusion.shape == (len(CLASS_NAMES), len(CLASS_NAMES))
        assert confusion.sum(1).tolist() == torch.bincount(torch.tensor(labels), minlength=10).tolist()
        assert score["top1"] == pytest.approx(100 * confusion.trace().item() / EVAL_IMAGES)
    if job.served in report["candidates"]:
        assert report["candidates"]["served"] == report["candidates"][job.served]
    # Zero-shot scored here, independently, with the same prompts (descriptions included).
    spec = ModelSpec(config=str(CONFIG_PATH), checkpoint=str(CHECKPOINT_PATH))
    zero_shot = prepare(spec, CLASS_NAMES, ["a photo of a {}."], descriptions=DESCRIPTIONS).classifier()
    assert report["candidates"]["zero_shot"] == score_classifier(zero_shot, local_paths, labels)
    # The published manifest carries the same scores.
    key = f"artifacts/adaptations/{job_id}/classifier/manifest.json"
    manifest = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert manifest["metrics"]["evaluation"] == report
    assert manifest["metrics"]["class_descriptions"] == DESCRIPTIONS
    assert manifest["weights_sha256"] == job.artifact_sha256

    assert [span.phase for span in job.phases] == [
        JobPhase.QUEUED,
        JobPhase.LISTING,
        JobPhase.STAGING,
        JobPhase.SCORING_ZERO_SHOT,
        JobPhase.TRAINING,
        JobPhase.EXPORTING,
        JobPhase.EVALUATING,
        JobPhase.DONE,
    ]
    assert all(span.ended_at is not None for span in job.phases)
    assert job.phase == JobPhase.DONE

    with session_factory() as session:
        messages = [line.message for line in repository.list_log_lines(session, job_id)]
    assert f"job {job_id}: training" in messages
    assert any(m.startswith(f"job {job_id}: eval set top-1: zero_shot ") for m in messages)
    assert any(m.startswith(f"job {job_id} succeeded: serves") for m in messages)


def test_a_missing_eval_image_fails_the_job_before_training(
    session_factory: sessionmaker[Session],
    settings: Settings,
    dataset_uri: str,
    eval_set: tuple[str, list[Path], list[int]],
    s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    s3_client.delete_object(Bucket=bucket, Key="labelled/images/3.png")
    job_id = create_job(session_factory, tiny_request(dataset_uri, eval={"uri": eval_set[0]}))

    job = _run(job_id, session_factory, settings, tmp_path)

    assert job.status == JobStatus.FAILED
    assert job.error_type == "DatasetError"
    assert job.error_message == (
        "eval set: 1 image(s) of the eval set cannot be used: 'labelled/images/3.png' (missing)"
    )
    assert (job.phase, job.step, job.checkpoint_uri) == (JobPhase.STAGING, 0, None)
    assert [span.phase for span in job.phases][-1] == JobPhase.STAGING
