"""The one Celery app of the platform, built from Settings.

It imports no task code and no torch: the control API imports this module to enqueue jobs by
task name (`send_task(TRAIN_TASK, ...)`), and only the worker loads `worker.tasks` (via `include`).

Start a worker with `celery -A worker.celery_app worker -Q gpu --concurrency 1` (one job per process).
A job asking for N > 1 GPUs goes to the queue `gpu.N`; a worker with G GPUs adds `gpu.2` .. `gpu.G`
to the queues it consumes when it starts (worker.tasks), so only a worker with enough GPUs takes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from services.config import Settings, get_settings

# Connects the worker's log and metrics receivers before a worker sets up logging; no torch.
from worker import signals  # noqa: F401

# Idle OpenMP threads sleep instead of spinning, so the decode and augmentation work beside
# training gets the cores; only effective before torch loads, which this module never does.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The name the worker registers its training task under; the API sends to this name.
TRAIN_TASK = "must.train"
# Batch prediction over a bucket prefix (`POST /predictions`); it needs the model, so a GPU worker runs it.
PREDICT_TASK = "must.predict"
# Training runs on the GPU workers' queue; Redis keeps its messages in a list of the same name.
GPU_QUEUE = "gpu"
# The largest GPU count a job may ask for (services.schemas.jobs.MAX_GPUS) has a queue of its own.
GPU_QUEUE_SIZES = range(2, 17)


def queue_for(gpus: int) -> str:
    """The queue of jobs that train on `gpus` GPUs of one machine: `gpu`, `gpu.2`, `gpu.3`, ..."""
    return GPU_QUEUE if gpus <= 1 else f"{GPU_QUEUE}.{gpus}"


def queues_served(gpus: int) -> list[str]:
    """Every queue a worker with `gpus` GPUs can serve (it runs one job at a time, of any size up to it)."""
    return [queue_for(n) for n in range(1, max(gpus, 1) + 1)]


def all_gpu_queues() -> list[str]:
    return [GPU_QUEUE, *(queue_for(n) for n in GPU_QUEUE_SIZES)]


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options for the configured broker (visibility timeout; folders of `filesystem://`)."""
    options: dict[str, Any] = {"visibility_timeout": settings.broker.visibility_timeout_seconds}
    if settings.broker.url.startswith("filesystem://"):
        # Producer (API) and consumer (worker) share one folder: what one writes, the other reads.
        # https://docs.celeryq.dev/projects/kombu/en/stable/reference/kombu.transport.filesystem.html
        folder = settings.broker.filesystem_folder
        options |= {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
        }
    return options


def _make_broker_folders(options: dict[str, Any]) -> None:
    """The filesystem transport lists its folders without creating them, so create them first."""
    for key in ("data_folder_in", "processed_folder", "control_folder"):
        if key in options:
            Path(options[key]).mkdir(parents=True, exist_ok=True)


def make_celery(settings: Settings) -> Celery:
    """A Celery app for these settings: JSON only, late acks, one task at a time, `gpu` queue."""
    options = broker_transport_options(settings)
    _make_broker_folders(options)
    app = Celery("must", broker=settings.broker.url, include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Job state, progress and results live in the job database, not in a result backend.
        task_ignore_result=True,
        # Acknowledge after the task returns, and give the message back if the worker process
        # dies mid-task, so a crash leads to a resume instead of a lost job; the pipeline's
        # DB lease keeps a redelivered job from running twice at once.
        # https://docs.celeryq.dev/en/stable/userguide/tasks.html#Task.acks_late
        # https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-reject-on-worker-lost
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A worker reserves only the task it runs: a long GPU job must not hold others back.
        # https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits
        worker_prefetch_multiplier=1,
        task_default_queue=GPU_QUEUE,
        task_routes={TRAIN_TASK: {"queue": GPU_QUEUE}, PREDICT_TASK: {"queue": GPU_QUEUE}},
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
    )
    return app


celery_app = make_celery(get_settings())
