"""Re-enqueue jobs whose worker died, so a job outlives a killed worker even without redelivery.

Every worker process runs `requeue_stale_jobs` in a background thread. Redis redelivers an
unacknowledged message only after the broker's visibility timeout (hours, since it must outlast
the longest job) and the `filesystem://` broker never does, so the reconciler is what brings a
crashed job back within about a lease. Several workers reconciling at once is safe: moving a job
from running back to queued is a conditional update that only one of them wins.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kombu.exceptions import KombuError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.jobs import repository
from worker.celery_app import GPU_QUEUE, TRAIN_TASK

log = logging.getLogger(__name__)


def requeue_stale_jobs(
    session_factory: sessionmaker[Session], queue_send: Callable[..., object]
) -> list[str]:
    """Put running jobs with an expired lease back to queued and send each again; return their ids.

    `queue_send` is called like `celery_app.send_task(name, kwargs=..., queue=...)`.
    """
    with session_factory() as session:
        job_ids = repository.requeue_stale(session)
    for job_id in job_ids:
        queue_send(TRAIN_TASK, kwargs={"msg": {"job_id": job_id}}, queue=GPU_QUEUE)
        log.info("re-enqueued stale job %s", job_id)
    return job_ids


def start_reconciler(
    session_factory: sessionmaker[Session],
    queue_send: Callable[..., object],
    every_seconds: float,
    stop: threading.Event | None = None,
) -> threading.Thread:
    """Run `requeue_stale_jobs` now and then every `every_seconds` in a daemon thread until `stop`."""
    stop = stop or threading.Event()

    def loop() -> None:
        while True:
            try:
                requeue_stale_jobs(session_factory, queue_send)
            except (SQLAlchemyError, KombuError, OSError) as exc:
                # The database or broker may be briefly away; the next pass tries again.
                log.warning("reconciler pass failed: %s", exc)
            if stop.wait(every_seconds):
                return

    thread = threading.Thread(target=loop, name="must-reconciler", daemon=True)
    thread.start()
    return thread
