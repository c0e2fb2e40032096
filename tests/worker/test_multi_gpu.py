"""Multi-GPU jobs: queue routing by GPU count, and the worker running one job on two torchrun ranks.

On this CPU machine `MUST_WORKER__GPUS=2` (settings.worker.gpus) stands in for a machine with two
GPUs: the ranks train with gloo on the CPU, through the same pipeline, torchrun and DDP code a
GPU machine runs with nccl. The job database (SQLite) and the artifacts store (moto) are real.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.config import DatabaseSettings, Settings, StorageSettings, WorkerSettings
from services.db.models import Job
from services.jobs import repository
from services.jobs.states import JobStatus
from tests.worker.conftest import NUM_IMAGES, create_job, tiny_request
from worker.celery_app import make_celery, queue_for, queues_served
from worker.pipeline import run_training_job
from worker.reconcile import send_job
from worker.tasks import _serve_gpu_queues

DATASET = "target/"
# Fixed views (no fitting pass) keep the ranks' start short.
HPARAMS = {
    "total_steps": 6,
    "batch_size": 8,
    "checkpoint_every": 2,
    "strong_crop_min": 0.5,
    "rand_augment": "rand-m9-mstd0.5-inc1",
    "hflip": True,
}


def _settings(sqlite_url: str, moto_s3: str, bucket: str, **worker: Any) -> Settings:
    return Settings(
        database=DatabaseSettings(url=sqlite_url),
        storage=StorageSettings(artifacts_uri=f"s3://{bucket}/artifacts", s3_endpoint_url=moto_s3),
        worker=WorkerSettings(**worker),
    )


@pytest.fixture
def dataset_uri(s3_client: Any, bucket: str, target_pngs: list[bytes]) -> str:
    for i, data in enumerate(target_pngs):
        s3_client.put_object(Bucket=bucket, Key=f"{DATASET}img-{i:03d}.png", Body=data)
    return f"s3://{bucket}/{DATASET}"


def _two_gpu_job(session_factory: sessionmaker[Session], dataset_uri: str, **hparams: Any) -> str:
    request = tiny_request(dataset_uri, resources={"gpus": 2}, hparams={**HPARAMS, **hparams})
    return create_job(session_factory, request)


def _run(job_id: str, session_factory: sessionmaker[Session], settings: Settings, tmp_path: Path) -> bool:
    return run_training_job(
        job_id, session_factory=session_factory, settings=settings, worker_id="w", work_dir=tmp_path / "work"
    )


def _job(session_factory: sessionmaker[Session], job_id: str) -> Job:
    with session_factory() as session:
        return repository.get_job(session, job_id)


def _latest_step(s3_client: Any, bucket: str, job_id: str) -> int:
    key = f"artifacts/adaptations/{job_id}/checkpoints/latest.json"
    return int(json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())["step"])


def test_queues_by_gpu_count() -> None:
    assert [queue_for(n) for n in (1, 2, 8)] == ["gpu", "gpu.2", "gpu.8"]
    assert queues_served(0) == queues_served(1) == ["gpu"]
    assert queues_served(3) == ["gpu", "gpu.2", "gpu.3"]


def test_worker_consumes_the_queues_its_gpus_serve(monkeypatch: pytest.MonkeyPatch, sqlite_url: str) -> None:
    monkeypatch.setenv("MUST_WORKER__GPUS", "2")
    # get_settings() is read once per process (cached); this test's environment comes later.
    monkeypatch.setattr("worker.tasks.get_settings", lambda: Settings())
    app = make_celery(Settings(database=DatabaseSettings(url=sqlite_url)))
    # As `celery worker -Q gpu,gpu.4` selects them: gpu.4 is more than this worker can serve.
    app.amqp.queues.select(["gpu", "gpu.4"])
    _serve_gpu_queues(instance=SimpleNamespace(app=app))
    assert sorted(app.amqp.queues.consume_from) == ["gpu", "gpu.2"]


def test_reconciler_sends_a_job_to_its_gpu_queue(
    session_factory: sessionmaker[Session], dataset_uri: str
) -> None:
    job_id = _two_gpu_job(session_factory, dataset_uri)
    sent: list[tuple[str, dict]] = []
    send_job(session_factory, lambda name, **kw: sent.append((name, kw)), job_id)
    assert sent[0][1] == {"kwargs": {"msg": {"job_id": job_id, "gpus": 2}}, "queue": "gpu.2"}


def test_worker_with_fewer_gpus_does_not_take_the_job(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    moto_s3: str,
    bucket: str,
    dataset_uri: str,
    tmp_path: Path,
) -> None:
    job_id = _two_gpu_job(session_factory, dataset_uri)
    settings = _settings(sqlite_url, moto_s3, bucket, gpus=1)
    assert _run(job_id, session_factory, settings, tmp_path) is True  # the caller sends it to gpu.2
    job = _job(session_factory, job_id)
    assert job.status == JobStatus.QUEUED
    assert job.lease_owner is None


@pytest.mark.distributed
def test_two_rank_job_trains_and_publishes(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    moto_s3: str,
    bucket: str,
    dataset_uri: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    job_id = _two_gpu_job(session_factory, dataset_uri)
    settings = _settings(sqlite_url, moto_s3, bucket, gpus=2, progress_every_seconds=0.1)
    assert _run(job_id, session_factory, settings, tmp_path) is False
    job = _job(session_factory, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert (job.step, job.total_steps, job.images_used) == (6, 6, NUM_IMAGES)
    assert job.served
    assert job.artifact_sha256
    assert _latest_step(s3_client, bucket, job_id) == 6
    with session_factory() as session:
        history = repository.list_metrics(session, job_id)
        phases = [span.phase for span in repository.list_phases(session, job_id)]
    # Progress came from rank 0 only: one row per reported step, in order.
    steps = [point.step for point in history]
    assert steps == sorted(set(steps))
    assert steps[-1] == 6
    assert phases[-3:] == ["training", "exporting", "done"]
    assert not (tmp_path / "work" / job_id).exists()  # the worker cleaned up after the ranks


@pytest.mark.distributed
def test_cancel_stops_every_rank_with_a_checkpoint(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    moto_s3: str,
    bucket: str,
    dataset_uri: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    job_id = _two_gpu_job(session_factory, dataset_uri)
    with session_factory() as session:
        repository.get_job(session, job_id).cancel_requested = True
        session.commit()
    settings = _settings(sqlite_url, moto_s3, bucket, gpus=2)
    assert _run(job_id, session_factory, settings, tmp_path) is False
    job = _job(session_factory, job_id)
    assert job.status == JobStatus.CANCELLED, job.error_message
    assert _latest_step(s3_client, bucket, job_id) == 0
    assert job.checkpoint_uri is not None


def _rank_pid(plan_dir: Path, local_rank: int, deadline: float) -> int:
    """The pid of the process torchrun started as `local_rank` for the plan in `plan_dir`."""
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            plan = str(plan_dir / "plan.json").encode()
            if (
                b"worker.ranks" in cmdline
                and plan in cmdline
                and f"LOCAL_RANK={local_rank}".encode() in environ
            ):
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError("rank process not found")


def _kill_rank_once_training(session_factory: sessionmaker[Session], job_id: str, plan_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (_job(session_factory, job_id).step or 0) < 1:
        time.sleep(0.1)
    os.kill(_rank_pid(plan_dir, 1, deadline), 9)


def _run_and_kill(
    session_factory: sessionmaker[Session], settings: Settings, job_id: str, tmp_path: Path
) -> None:
    worker = threading.Thread(target=_run, args=(job_id, session_factory, settings, tmp_path))
    worker.start()
    _kill_rank_once_training(session_factory, job_id, tmp_path / "work" / job_id / "ranks")
    worker.join(timeout=180)
    assert not worker.is_alive()


@pytest.mark.distributed
def test_killed_rank_without_restarts_fails_the_job(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    moto_s3: str,
    bucket: str,
    dataset_uri: str,
    tmp_path: Path,
) -> None:
    job_id = _two_gpu_job(session_factory, dataset_uri, total_steps=40)
    settings = _settings(sqlite_url, moto_s3, bucket, gpus=2, rank_restarts=0, progress_every_seconds=0.1)
    _run_and_kill(session_factory, settings, job_id, tmp_path)
    job = _job(session_factory, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error_type == "DistributedRunError"
    assert "2 training processes stopped" in (job.error_message or "")


@pytest.mark.distributed
def test_killed_rank_is_restarted_and_the_job_resumes(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    moto_s3: str,
    bucket: str,
    dataset_uri: str,
    tmp_path: Path,
) -> None:
    job_id = _two_gpu_job(session_factory, dataset_uri, total_steps=40)
    settings = _settings(sqlite_url, moto_s3, bucket, gpus=2, rank_restarts=1, progress_every_seconds=0.1)
    _run_and_kill(session_factory, settings, job_id, tmp_path)
    job = _job(session_factory, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.step == 40
