"""Submitting adaptation jobs to the workers, by task name so that the API never imports task code."""

from __future__ import annotations

from typing import Protocol

from celery import Celery

from services.schemas.jobs import TrainJobMessage
from services.schemas.predictions import PredictionMessage
from worker.celery_app import GPU_QUEUE, PREDICT_TASK, TRAIN_TASK, queue_for


class JobQueue(Protocol):
    """Where the API sends job ids for the workers to run."""

    def submit(self, msg: TrainJobMessage) -> str:
        """Enqueue one job message and return the broker's task id; raise if it cannot be enqueued."""
        ...

    def submit_prediction(self, msg: PredictionMessage) -> str:
        """Enqueue one batch prediction run and return the broker's task id."""
        ...


class CeleryJobQueue:
    """A JobQueue on Celery: the training task receives the message as its `msg` keyword argument."""

    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def submit(self, msg: TrainJobMessage) -> str:
        """Send `TRAIN_TASK(msg={"job_id": ...})` to the queue of its GPU count (`gpu`, `gpu.2`, ...)."""
        # send_task needs no task code here; task_always_eager would not apply to it anyway.
        # https://docs.celeryq.dev/en/stable/reference/celery.html#celery.Celery.send_task
        result = self.celery.send_task(
            TRAIN_TASK,
            kwargs={"msg": msg.model_dump(mode="json", exclude_defaults=True)},
            queue=queue_for(msg.gpus),
        )
        return str(result.id)

    def submit_prediction(self, msg: PredictionMessage) -> str:
        """Send `PREDICT_TASK(msg={"run_id": ...})` to the `gpu` queue."""
        result = self.celery.send_task(
            PREDICT_TASK, kwargs={"msg": msg.model_dump(mode="json")}, queue=GPU_QUEUE
        )
        return str(result.id)
