"""A real Celery worker process takes a job from Redis and trains it to success."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.shapes import write_folder
from services.config import BrokerSettings, DatabaseSettings, Settings, StorageSettings
from services.db.migrate import upgrade
from services.db.session import make_engine, make_session_factory
from services.jobs import repository
from services.jobs.states import TERMINAL_STATUSES, JobStatus
from services.launcher import stop_process
from tests.worker.conftest import create_job, tiny_request
from worker.celery_app import GPU_QUEUE, TRAIN_TASK, make_celery

# A Redis database of its own (the API tests use 15), so the test never touches a platform's queues.
BROKER_URL = "redis://127.0.0.1:6379/14"
REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


@pytest.fixture
def broker() -> Iterator[str]:
    """The test broker URL, with its Redis database flushed before and after."""
    client = redis.Redis.from_url(BROKER_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.skip(f"Redis is unreachable at {BROKER_URL}: {exc}")
    client.flushdb()
    yield BROKER_URL
    client.flushdb()
    client.close()


def _start_worker(settings: Settings, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = os.environ | {
        "MUST_DATABASE__URL": settings.database.url,
        "MUST_BROKER__URL": settings.broker.url,
        "MUST_STORAGE__ARTIFACTS_URI": settings.storage.artifacts_uri,
        # The pipeline's image cache and checkpoints go under the system temp folder.
        "TMPDIR": str(tmp_path),
    }
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", GPU_QUEUE]
    command += ["--concurrency", "1", "--pool", "solo", "--loglevel", "INFO"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def test_worker_process_runs_a_queued_job(broker: str, sqlite_url: str, tmp_path: Path) -> None:
    settings = Settings(
        database=DatabaseSettings(url=sqlite_url),
        broker=BrokerSettings(url=broker),
        storage=StorageSettings(artifacts_uri=(tmp_path / "artifacts").as_uri()),
    )
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    write_folder("target", 16, seed=5, out=tmp_path / "images")
    request = tiny_request((tmp_path / "images").as_uri()) | {
        "hparams": {"total_steps": 2, "batch_size": 4, "checkpoint_every": 2}
    }
    job_id = create_job(factory, request)
    proc, log_path = _start_worker(settings, tmp_path)
    try:
        make_celery(settings).send_task(TRAIN_TASK, kwargs={"msg": {"job_id": job_id}}, queue=GPU_QUEUE)
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            with factory() as session:
                job = repository.get_job(session, job_id)
            if job.status in TERMINAL_STATUSES:
                break
            time.sleep(0.5)
    finally:
        stop_process(proc)
        engine.dispose()
    log_tail = log_path.read_text(errors="replace")[-3000:]
    assert job.status == JobStatus.SUCCEEDED, f"{job.status} {job.error_message}\n{log_tail}"
    assert (tmp_path / "artifacts" / "adaptations" / job_id / "classifier" / "manifest.json").is_file()
