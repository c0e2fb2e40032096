"""The Celery task: a thin shell that hands the job id to the training pipeline."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from functools import cache, partial
from typing import Any

from celery import Task
from celery.signals import celeryd_after_setup, worker_ready
from sqlalchemy.orm import Session, sessionmaker

from services.config import Settings, get_settings
from services.db.session import make_engine, make_session_factory
from services.schemas.jobs import TrainJobMessage
from services.schemas.predictions import PredictionMessage
from services.storage.object_store import open_store
from worker.batch_predictions import run_prediction
from worker.celery_app import GPU_QUEUE, PREDICT_TASK, TRAIN_TASK, all_gpu_queues, celery_app, queues_served
from worker.launch import count_gpus
from worker.pipeline import available_gpus, run_training_job
from worker.reconcile import broker_contents, send_job, start_reconciler
from worker.store_care import expire_checkpoints


@cache
def session_factory() -> sessionmaker[Session]:
    """One engine per worker process, made on first use (after Celery forks, never before)."""
    return make_session_factory(make_engine(get_settings().database.url))


@celery_app.task(name=TRAIN_TASK, pydantic=True, bind=True)
def train_must(self: Task, msg: TrainJobMessage) -> None:
    """Run the adaptation job `msg.job_id` (resuming it if an earlier attempt left a checkpoint)."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    requeued = run_training_job(
        msg.job_id, session_factory=session_factory(), settings=get_settings(), worker_id=worker_id
    )
    if requeued:  # the object store stayed away: the job resumes from its checkpoint on a later attempt
        send_job(session_factory(), celery_app.send_task, msg.job_id)


@celery_app.task(name=PREDICT_TASK, pydantic=True, bind=True)
def predict_batch(self: Task, msg: PredictionMessage) -> None:
    """Classify every image under a prefix with an adaptation (batch prediction run `msg.run_id`)."""
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    run_prediction(
        msg.run_id, session_factory=session_factory(), settings=get_settings(), worker_id=worker_id
    )


@celeryd_after_setup.connect
def _serve_gpu_queues(instance: Any, **_: object) -> None:
    """A worker on the `gpu` queue also takes the multi-GPU jobs it has the GPUs for (`gpu.2` ..
    `gpu.<its GPUs>`), and never consumes a queue of larger jobs, even when `-Q` names one.
    https://docs.celeryq.dev/en/stable/userguide/signals.html#celeryd-after-setup"""
    queues = instance.app.amqp.queues
    if GPU_QUEUE not in queues.consume_from:
        return
    served = queues_served(available_gpus(get_settings(), count=count_gpus))
    for name in served:
        queues.select_add(name)
    queues.deselect([name for name in all_gpu_queues() if name not in served])


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    """Each worker brings back jobs whose worker died or whose message was lost (see worker.reconcile)."""
    settings = get_settings()
    after = settings.worker.requeue_queued_after_seconds
    start_reconciler(
        session_factory(),
        celery_app.send_task,
        settings.worker.reconcile_every_seconds,
        resend_after_seconds=after,
        in_broker=broker_contents(settings.broker.url, after),
        housekeeping=_housekeeping(settings),
    )


def _housekeeping(settings: Settings) -> list[Callable[[], object]]:
    """The reconciler's extra passes: expiring finished jobs' checkpoints when a retention is set."""
    days = settings.worker.checkpoint_retention_days
    if days is None:
        return []
    store, prefix = open_store(settings.storage.artifacts_uri, settings, create=True)
    return [partial(expire_checkpoints, session_factory(), store, prefix, retention_days=days)]
