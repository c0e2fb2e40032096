"""Re-enqueue jobs whose worker died: run periodically (e.g. from cron or celery beat)."""

from __future__ import annotations

import logging
from collections.abc import Callable

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
