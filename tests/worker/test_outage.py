"""S3 outages during training: short ones are ridden out, long ones requeue the job to resume, then fail.

The pipeline talks to the moto S3 server through a TCP proxy that the test takes down (new
connections refused, open ones cut) and brings back; the data behind it stays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from sqlalchemy.orm import Session, sessionmaker

from bench.outage import TcpProxy
from services.config import Settings
from services.db.models import Job
from services.db.types import utcnow
from services.jobs import repository
from services.jobs.states import JobStatus
from tests.worker.conftest import create_job, tiny_request
from worker.pipeline import run_training_job

HPARAMS = {"total_steps": 24, "batch_size": 8, "checkpoint_every": 3}


@pytest.fixture
def proxy(moto_s3: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target_port=int(urlparse(moto_s3).port or 0)).up()
    yield proxy
    proxy.down()


def _settings(sqlite_url: str, proxy: TcpProxy, bucket: str, **worker: Any) -> Settings:
    return Settings(
        database={"url": sqlite_url},
        storage={"artifacts_uri": f"s3://{bucket}/artifacts", "s3_endpoint_url": proxy.url},
        worker={"storage_retry_seconds": 4, "max_storage_requeues": 1, "keep_checkpoints": 2} | worker,
    )


@pytest.fixture
def dataset_uri(s3_client: Any, bucket: str, target_pngs: list[bytes]) -> str:
    for i, data in enumerate(target_pngs):
        s3_client.put_object(Bucket=bucket, Key=f"target/img-{i:03d}.png", Body=data)
    return f"s3://{bucket}/target/"


def _job(session_factory: sessionmaker[Session], job_id: str) -> Job:
    with session_factory() as session:
        return repository.get_job(session, job_id)


class _Run:
    """run_training_job in a thread, as a worker process runs it."""

    def __init__(
        self, job_id: str, session_factory: sessionmaker[Session], settings: Settings, tmp: Path
    ) -> None:
        self.requeued: bool | None = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.requeued = run_training_job(
                    job_id,
                    session_factory=session_factory,
                    settings=settings,
                    device="cpu",
                    worker_id=f"worker-{time.monotonic()}",
                    work_dir=tmp,
                )
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target)
        self.thread.start()

    def join(self) -> bool | None:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.requeued


def _wait_checkpointed(session_factory: sessionmaker[Session], job_id: str) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = _job(session_factory, job_id)
        if job.checkpoint_uri:
            return job.step
        time.sleep(0.05)
    raise AssertionError("no checkpoint was published")


def test_a_short_outage_is_ridden_out(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    proxy: TcpProxy,
    bucket: str,
    dataset_uri: str,
    s3_client: Any,
    tmp_path: Path,
) -> None:
    settings = _settings(sqlite_url, proxy, bucket, storage_retry_seconds=30)
    job_id = create_job(session_factory, tiny_request(dataset_uri, hparams=HPARAMS))

    run = _Run(job_id, session_factory, settings, tmp_path / "w1")
    _wait_checkpointed(session_factory, job_id)
    with proxy.outage():
        during = _job(session_factory, job_id)
        time.sleep(4)
        ended = utcnow()
    requeued = run.join()

    job = _job(session_factory, job_id)
    assert during.status == JobStatus.RUNNING
    assert requeued is False
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.finished_at is not None
    assert job.finished_at > ended  # it waited for the store to come back
    assert job.storage_requeues == 0
    # Only the newest two checkpoints are kept in the store.
    prefix = f"artifacts/adaptations/{job_id}/checkpoints/"
    stored = {
        obj["Key"][len(prefix) :]
        for obj in s3_client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    }
    assert stored == {f"step-{s:06d}{ext}" for s in (21, 24) for ext in (".safetensors", ".state.json")} | {
        "latest.json"
    }


def test_a_long_outage_requeues_the_job_which_resumes_from_its_checkpoint(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    proxy: TcpProxy,
    bucket: str,
    dataset_uri: str,
    tmp_path: Path,
) -> None:
    settings = _settings(sqlite_url, proxy, bucket)
    job_id = create_job(session_factory, tiny_request(dataset_uri, hparams=HPARAMS))

    run = _Run(job_id, session_factory, settings, tmp_path / "w1")
    _wait_checkpointed(session_factory, job_id)
    proxy.down()
    assert _job(session_factory, job_id).status == JobStatus.RUNNING
    requeued = run.join()
    held = _job(session_factory, job_id)
    proxy.up()
    again = _Run(job_id, session_factory, settings, tmp_path / "w2").join()

    assert requeued is True
    assert (held.status, held.storage_requeues, held.lease_owner) == (JobStatus.QUEUED, 1, None)
    assert held.checkpoint_uri
    assert again is False
    job = _job(session_factory, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.step == 24


def test_past_the_requeue_limit_the_job_fails_with_a_clear_message(
    session_factory: sessionmaker[Session],
    sqlite_url: str,
    proxy: TcpProxy,
    bucket: str,
    dataset_uri: str,
    tmp_path: Path,
) -> None:
    settings = _settings(sqlite_url, proxy, bucket, max_storage_requeues=0, storage_retry_seconds=2)
    job_id = create_job(session_factory, tiny_request(dataset_uri, hparams=HPARAMS))

    run = _Run(job_id, session_factory, settings, tmp_path / "w1")
    _wait_checkpointed(session_factory, job_id)
    proxy.down()
    requeued = run.join()

    job = _job(session_factory, job_id)
    assert requeued is False
    assert job.status == JobStatus.FAILED
    assert job.error_type == "StorageUnavailable"
    assert "object store" in (job.error_message or "")
    # The endpoint's address (an internal URL) is not in what clients see.
    assert proxy.url not in (job.error_message or "")
    assert str(proxy.port) not in (job.error_message or "")
