"""A real worker process logs JSON lines carrying the job id and serves Prometheus metrics."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings
from services.jobs import repository
from services.jobs.states import TERMINAL_STATUSES, JobStatus
from services.launcher import REPO_ROOT, free_port, stop_process
from services.must.trainer import StepMetrics
from tests.worker.conftest import create_job, tiny_request
from worker import metrics
from worker.celery_app import GPU_QUEUE, TRAIN_TASK, make_celery
from worker.logs import configure_logging, set_current_job
from worker.signals import job_id_of

# A Redis database of its own (API tests 15, worker tests 14, the e2e stack 13).
BROKER_URL = "redis://127.0.0.1:6379/11"
STEPS = 2
# The worker command of docker-compose.yml: the prefork pool, whose child process runs the job.
WORKER_COMMAND = [
    sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
    "-Q", "gpu", "--concurrency", "1", "--loglevel", "INFO", "--hostname", "observed@%h",
]  # fmt: skip


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger's output as JSON lines in a buffer; logging restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    configure_logging(logging.INFO, "json", buffer)
    yield buffer
    root.handlers[:], _ = saved
    root.setLevel(saved[1])
    set_current_job(None)


def test_every_line_carries_the_running_job_id_even_from_other_threads(json_log: io.StringIO) -> None:
    log = logging.getLogger("worker.test")
    log.info("before any job")
    set_current_job("job-1")
    log.info("in the job")
    thread = threading.Thread(target=lambda: log.warning("from a heartbeat thread"))
    thread.start()
    thread.join()
    set_current_job(None)

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]

    assert [(line["message"], line["job_id"]) for line in lines] == [
        ("before any job", None),
        ("in the job", "job-1"),
        ("from a heartbeat thread", "job-1"),
    ]
    assert {"time", "level", "logger", "process", "thread"} <= set(lines[0])


def test_the_job_id_is_read_from_a_dict_or_a_message() -> None:
    from services.schemas.jobs import TrainJobMessage

    assert job_id_of({"msg": {"job_id": "a"}}) == "a"
    assert job_id_of({"msg": TrainJobMessage(job_id="b")}) == "b"
    assert job_id_of({}) is None
    assert job_id_of(None) is None


def test_step_rate_is_smoothed_and_reset_between_jobs() -> None:
    now = [0.0]
    rate = metrics.StepRate(clock=lambda: now[0])

    assert rate.observe() is None
    now[0] = 0.5
    assert rate.observe() == pytest.approx(2.0)
    now[0] = 1.5
    assert rate.observe() == pytest.approx(2.0 + metrics.RATE_SMOOTHING * (1.0 - 2.0))
    rate.reset()
    assert rate.observe() is None


def _value(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, labels)
    return value or 0.0


def test_steps_and_jobs_update_the_process_metrics() -> None:
    step = StepMetrics(
        step=1, total_steps=3, images_per_sec=12.5, lr=1e-5, ema_decay=0.99, losses={}, stats={}, elapsed_s=1
    )
    steps_before = _value("must_worker_training_steps_total")
    failed_before = _value("must_worker_job_duration_seconds_count", outcome="failed")

    metrics.job_started()
    metrics.observe_step(step)
    running = _value("must_worker_jobs_running")
    metrics.job_finished("failed", 12.0)

    assert _value("must_worker_training_steps_total") == steps_before + 1
    assert running >= 1
    assert _value("must_worker_job_duration_seconds_count", outcome="failed") == failed_before + 1


@dataclass
class WorkerProcess:
    """A Celery worker started with the platform's worker command; stderr kept apart from the banner."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    metrics_url: str

    def stderr_lines(self) -> list[str]:
        return self.stderr_path.read_text().splitlines()


def _wait_for(predicate: Any, timeout: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if worker.proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = "\n".join(worker.stderr_lines()[-30:])
    raise AssertionError(f"{what} within {timeout} s; worker stderr:\n{tail}")


@pytest.fixture
def worker_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    """Embedded settings on the test database, a Redis broker database of this test's own."""
    redis.Redis.from_url(BROKER_URL).flushdb()
    return Settings(
        database={"url": sqlite_url},
        broker={"url": BROKER_URL},
        storage={"artifacts_uri": (tmp_path / "artifacts").as_uri()},
        metrics={"worker_port": free_port(), "worker_host": "127.0.0.1"},
    )


@pytest.fixture
def worker(
    worker_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> Iterator[WorkerProcess]:
    """A real worker process on `worker_settings`, stopped (warm shutdown) after the test."""
    env = {
        **os.environ,
        "MUST_DATABASE__URL": worker_settings.database.url,
        "MUST_BROKER__URL": BROKER_URL,
        "MUST_STORAGE__ARTIFACTS_URI": worker_settings.storage.artifacts_uri,
        "MUST_METRICS__WORKER_PORT": str(worker_settings.metrics.worker_port),
        "MUST_METRICS__WORKER_HOST": "127.0.0.1",
        "MUST_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    stderr_path = tmp_path / "worker.stderr"
    with stderr_path.open("wb") as stderr, (tmp_path / "worker.stdout").open("wb") as stdout:
        proc = subprocess.Popen(WORKER_COMMAND, cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr)
    handle = WorkerProcess(
        proc, stderr_path, f"http://127.0.0.1:{worker_settings.metrics.worker_port}/metrics"
    )
    try:
        _wait_for(lambda: " ready." in stderr_path.read_text(), 120, "the worker did not get ready", handle)
        yield handle
    finally:
        stop_process(proc)


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.slow
def test_a_job_run_by_a_worker_process_is_logged_and_measured(
    worker: WorkerProcess,
    worker_settings: Settings,
    session_factory: sessionmaker[Session],
    target_pngs: list[bytes],
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(target_pngs[:16]):
        (images / f"{i:03d}.png").write_bytes(data)
    hparams = {"total_steps": STEPS, "batch_size": 8, "checkpoint_every": STEPS}
    job_id = create_job(session_factory, tiny_request(images.as_uri(), hparams=hparams))

    make_celery(worker_settings).send_task(TRAIN_TASK, kwargs={"msg": {"job_id": job_id}}, queue=GPU_QUEUE)

    def finished() -> bool:
        with session_factory() as session:
            return repository.get_job(session, job_id).status in TERMINAL_STATUSES

    _wait_for(finished, 120, "the job did not finish", worker)
    with session_factory() as session:
        assert repository.get_job(session, job_id).status == JobStatus.SUCCEEDED
    # The end of the attempt is recorded just after the job row is written.
    _wait_for(
        lambda: any("job attempt ended" in line for line in worker.stderr_lines()),
        30,
        "the attempt's end was not logged",
        worker,
    )
    samples = _scrape(worker.metrics_url)

    lines = [json.loads(line) for line in worker.stderr_lines()]  # every stderr line is one JSON object
    started = next(i for i, line in enumerate(lines) if line["message"].startswith("job received"))
    ended = next(i for i, line in enumerate(lines) if line["message"].startswith("job attempt ended"))
    during = lines[started : ended + 1]
    assert len(during) >= 6  # received, started, phases (listing ... exporting), success, end
    assert {line["job_id"] for line in during} == {job_id}
    assert any(line["logger"] == "worker.pipeline" and "succeeded" in line["message"] for line in during)
    assert any(line["logger"].startswith("celery") for line in lines)  # Celery's own lines are JSON too
    # No plain-text banner on stdout: its facts are one JSON line on stderr.
    assert (tmp_path / "worker.stdout").read_text().strip() == ""
    assert any(line["message"].startswith("celery worker") and "gpu" in line["startup"] for line in lines)
    assert samples[("must_worker_training_steps_total", ())] == STEPS
    assert samples[("must_worker_job_duration_seconds_count", (("outcome", "succeeded"),))] == 1
    assert samples[("must_worker_jobs_running", ())] == 0
    assert ("process_resident_memory_bytes", ()) in samples
