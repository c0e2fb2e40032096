"""The reconciler thread brings back a job whose worker stopped renewing its lease."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services.jobs import repository
from services.jobs.states import JobStatus
from tests.worker.conftest import create_job, tiny_request
from worker.celery_app import GPU_QUEUE, TRAIN_TASK
from worker.reconcile import start_reconciler


def test_reconciler_requeues_an_expired_lease_once(session_factory: sessionmaker[Session]) -> None:
    job_id = create_job(session_factory, tiny_request("file:///data/images"))
    with session_factory() as session:
        assert repository.mark_running(session, job_id, owner="dead-worker", lease_seconds=0.3)
    sent: list[tuple[str, dict[str, Any]]] = []
    stop = threading.Event()

    thread = start_reconciler(
        session_factory, lambda name, **kwargs: sent.append((name, kwargs)), every_seconds=0.05, stop=stop
    )
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    stop.set()
    thread.join(timeout=5)

    assert sent == [(TRAIN_TASK, {"kwargs": {"msg": {"job_id": job_id}}, "queue": GPU_QUEUE})]
    with session_factory() as session:
        job = repository.get_job(session, job_id)
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.QUEUED, None, 1)
    assert not thread.is_alive()
