"""Bring back jobs the queue lost track of: a dead worker's job, and a queued job whose message is gone.

Every worker process runs `reconcile` in a background thread:

- `requeue_stale_jobs`: a running job whose lease expired (its worker died) goes back to queued
  and its message is sent again. Redis redelivers an unacknowledged message only after the
  broker's visibility timeout (hours, since it must outlast the longest job) and the
  `filesystem://` broker never does, so this is what brings a crashed job back within a lease.
- `resend_lost_messages`: a queued job whose message was sent more than
  `worker.requeue_queued_after_seconds` ago and that the broker no longer holds (a Redis restart
  without persistence loses every queued message) gets its message again.
- the same two for batch prediction runs (`services.jobs.predictions`), which hold leases too.
- housekeeping passes given by the caller, such as `worker.store_care.expire_checkpoints`.

No job runs twice: several workers reconciling at once each claim a job with a conditional
update that only one wins, a duplicate message finds the job's lease held (or the job finished)
and returns at once, and a worker only ever runs a job it holds the lease of.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial

from kombu.exceptions import KombuError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.db.types import utcnow
from services.errors import StorageError
from services.jobs import predictions, repository
from services.schemas.jobs import requested_gpus
from worker.broker import task_ids_in_broker
from worker.celery_app import GPU_QUEUE, PREDICT_TASK, TRAIN_TASK, all_gpu_queues, queue_for

log = logging.getLogger(__name__)

# Called like `celery_app.send_task(name, kwargs=..., queue=...)`; its result's `id` is the task id.
QueueSend = Callable[..., object]
# The task ids the broker holds now, or None when it cannot tell.
BrokerContents = Callable[[], set[str] | None]


def send_job(session_factory: sessionmaker[Session], queue_send: QueueSend, job_id: str) -> None:
    """Send the job's message to the queue of its GPU count, and record its task id and when it was sent."""
    with session_factory() as session:
        gpus = requested_gpus(repository.get_job(session, job_id).request)
    msg: dict[str, object] = {"job_id": job_id} if gpus == 1 else {"job_id": job_id, "gpus": gpus}
    result = queue_send(TRAIN_TASK, kwargs={"msg": msg}, queue=queue_for(gpus))
    task_id = getattr(result, "id", None)
    with session_factory() as session:
        repository.set_celery_task_id(session, job_id, task_id=str(task_id) if task_id else "")


def requeue_stale_jobs(session_factory: sessionmaker[Session], queue_send: QueueSend) -> list[str]:
    """Put running jobs with an expired lease back to queued and send each again; return their ids."""
    with session_factory() as session:
        job_ids = repository.requeue_stale(session)
    for job_id in job_ids:
        send_job(session_factory, queue_send, job_id)
        log.info("re-enqueued stale job %s", job_id)
    return job_ids


def _resend_lost(
    session_factory: sessionmaker[Session],
    waiting: list[tuple[str, str | None]],
    in_broker: BrokerContents,
    claim: Callable[[Session, str], bool],
    send: Callable[[str], None],
) -> list[str]:
    """Send again each of `waiting` (id, task id) whose message the broker no longer holds and that
    this call claims (another worker's reconciler, or a worker taking it, wins otherwise)."""
    if not waiting:
        return []
    present = in_broker()
    resent = []
    for item_id, task_id in waiting:
        if present is not None and task_id and task_id in present:
            continue  # still waiting for a free worker
        with session_factory() as session:
            if not claim(session, item_id):
                continue
        send(item_id)
        resent.append(item_id)
    return resent


def resend_lost_messages(
    session_factory: sessionmaker[Session],
    queue_send: QueueSend,
    *,
    after_seconds: float,
    in_broker: BrokerContents,
) -> list[str]:
    """Send again the message of every job queued for over `after_seconds` whose message is gone."""
    cutoff = utcnow() - timedelta(seconds=after_seconds)
    with session_factory() as session:
        waiting = repository.queued_before(session, cutoff)

    def send(job_id: str) -> None:
        send_job(session_factory, queue_send, job_id)
        log.warning("job %s was queued without a message in the broker; sent it again", job_id)

    claim = partial(_claim, repository.claim_resend, cutoff)
    return _resend_lost(session_factory, waiting, in_broker, claim, send)


def _claim(claim_resend: Callable[..., bool], cutoff: datetime, session: Session, item_id: str) -> bool:
    return claim_resend(session, item_id, cutoff=cutoff)


def send_run(session_factory: sessionmaker[Session], queue_send: QueueSend, run_id: str) -> None:
    """Send a prediction run's message and record its task id and when it was sent."""
    result = queue_send(PREDICT_TASK, kwargs={"msg": {"run_id": run_id}}, queue=GPU_QUEUE)
    task_id = getattr(result, "id", None)
    with session_factory() as session:
        predictions.set_task_id(session, run_id, task_id=str(task_id) if task_id else "")


def requeue_stale_runs(session_factory: sessionmaker[Session], queue_send: QueueSend) -> list[str]:
    """Put prediction runs whose worker died (lease expired) back to queued and send each again."""
    with session_factory() as session:
        run_ids = predictions.requeue_stale(session)
    for run_id in run_ids:
        send_run(session_factory, queue_send, run_id)
        log.info("re-enqueued stale prediction run %s", run_id)
    return run_ids


def resend_lost_runs(
    session_factory: sessionmaker[Session],
    queue_send: QueueSend,
    *,
    after_seconds: float,
    in_broker: BrokerContents,
) -> list[str]:
    """Send again the message of every prediction run queued for over `after_seconds` whose message
    the broker no longer holds."""
    cutoff = utcnow() - timedelta(seconds=after_seconds)
    with session_factory() as session:
        waiting = predictions.queued_before(session, cutoff)

    def send(run_id: str) -> None:
        send_run(session_factory, queue_send, run_id)
        log.warning("prediction run %s was queued without a message in the broker; sent it again", run_id)

    claim = partial(_claim, predictions.claim_resend, cutoff)
    return _resend_lost(session_factory, waiting, in_broker, claim, send)


def broker_contents(broker_url: str, delivered_within_s: float) -> BrokerContents:
    """A `BrokerContents` for the configured broker (Redis can be listed; others say None)."""
    return lambda: task_ids_in_broker(broker_url, all_gpu_queues(), delivered_within_s=delivered_within_s)


def start_reconciler(
    session_factory: sessionmaker[Session],
    queue_send: QueueSend,
    every_seconds: float,
    stop: threading.Event | None = None,
    *,
    resend_after_seconds: float | None = None,
    in_broker: BrokerContents = lambda: None,
    housekeeping: Sequence[Callable[[], object]] = (),
) -> threading.Thread:
    """Reconcile now and then every `every_seconds` in a daemon thread until `stop`.

    With `resend_after_seconds`, lost messages of queued jobs are sent again too; each of
    `housekeeping` (e.g. expiring old checkpoints) runs once per pass after that.
    """
    stop = stop or threading.Event()

    def loop() -> None:
        while True:
            try:
                requeue_stale_jobs(session_factory, queue_send)
                requeue_stale_runs(session_factory, queue_send)
                if resend_after_seconds is not None:
                    resend_lost_messages(
                        session_factory, queue_send, after_seconds=resend_after_seconds, in_broker=in_broker
                    )
                    resend_lost_runs(
                        session_factory, queue_send, after_seconds=resend_after_seconds, in_broker=in_broker
                    )
                for chore in housekeeping:
                    chore()
            except (SQLAlchemyError, KombuError, RedisError, OSError, StorageError) as exc:
                # The database or broker may be briefly away; the next pass tries again.
                log.warning("reconciler pass failed: %s", exc)
            if stop.wait(every_seconds):
                return

    thread = threading.Thread(target=loop, name="must-reconciler", daemon=True)
    thread.start()
    return thread
