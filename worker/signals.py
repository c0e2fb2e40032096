"""Celery signal receivers that give the worker JSON logs tagged with the job id, and its metrics.

`worker.celery_app` imports this module, so the receivers are connected before the worker sets
up logging. Nothing here runs in the control API, which imports the Celery app only to send
tasks: these signals fire in worker processes alone. The per-task receivers are connected in
each pool process at start, so tests that run a task eagerly with `apply()` do not fire them.
https://docs.celeryq.dev/en/stable/userguide/signals.html
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    celeryd_init,
    setup_logging,
    task_postrun,
    task_prerun,
    task_received,
    worker_process_init,
)
from sqlalchemy.exc import SQLAlchemyError

from services.config import get_settings
from services.errors import JobNotFound
from services.jobs import repository
from services.jobs.states import TERMINAL_STATUSES
from worker import metrics
from worker.logs import configure_logging, set_current_job

log = logging.getLogger(__name__)

# task id -> monotonic start time of the job attempt it runs.
_started: dict[str, float] = {}


def job_id_of(kwargs: dict[str, Any] | None) -> str | None:
    """The job id in a training task's keyword arguments (`msg` as a dict or a TrainJobMessage)."""
    msg = (kwargs or {}).get("msg")
    job_id = msg.get("job_id") if isinstance(msg, dict) else getattr(msg, "job_id", None)
    return str(job_id) if job_id else None


def job_outcome(job_id: str) -> str:
    """The job's status if the attempt finished it, `unfinished` if not, `unknown` if unreadable."""
    # Imported here: worker.tasks loads the pipeline and torch, which only the worker needs.
    from worker.tasks import session_factory

    try:
        with session_factory()() as session:
            status = repository.get_job(session, job_id).status
    except (JobNotFound, SQLAlchemyError) as exc:
        log.warning("could not read the outcome of job %s: %s", job_id, exc)
        return "unknown"
    return status.value if status in TERMINAL_STATUSES else "unfinished"


@celeryd_init.connect
def _configure_logging_early(options: dict[str, Any] | None = None, instance: Any = None, **_: Any) -> None:
    """The `celery worker` command's first hook: from here on, even start-up warnings are log lines.

    With JSON logs, the worker's start-up banner (plain text on stdout, which breaks `jq`) is turned
    off, as `--quiet` would; `_log_banner` logs what it says as one JSON line instead.
    """
    log_format = get_settings().log_format
    configure_logging((options or {}).get("loglevel") or logging.INFO, log_format)
    if log_format == "json" and instance is not None:
        instance.quiet = True


@celeryd_after_setup.connect
def _log_banner(sender: str | None = None, instance: Any = None, **_: Any) -> None:
    """The banner's facts (broker, queues, concurrency) as one log line when the banner is off."""
    if instance is not None and getattr(instance, "quiet", False):
        try:
            info = instance.startup_info(artlines=False)
        except Exception as exc:  # informational only: never stop a worker over it
            info = f"(startup info unavailable: {type(exc).__name__})"
        log.info("celery worker %s starting", sender, extra={"startup": " ".join(str(info).split())})


@setup_logging.connect
def _configure_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Replace Celery's log setup (a connected receiver makes Celery skip its own) with ours."""
    configure_logging(loglevel or logging.INFO, get_settings().log_format)


@task_received.connect
def _job_received(request: Any = None, **_: Any) -> None:
    """In the consuming process: note which job a message carries, before a pool process runs it."""
    job_id = job_id_of(getattr(request, "kwargs", None))
    if job_id is not None:
        log.info("job received (task %s)", getattr(request, "id", "?"), extra={"job_id": job_id})


@worker_process_init.connect
def _start_pool_process(**_: Any) -> None:
    """In the process that runs jobs: serve its metrics and follow the jobs it runs."""
    settings = get_settings().metrics
    if settings.worker_port:
        metrics.start_metrics_server(settings.worker_port, settings.worker_host)
    task_prerun.connect(_job_started)
    task_postrun.connect(_job_finished)


def _job_started(task_id: str, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    job_id = job_id_of(kwargs)
    if job_id is None:
        return
    set_current_job(job_id)
    _started[task_id] = time.monotonic()
    metrics.job_started()
    log.info("job attempt started (task %s)", task_id)


def _job_finished(task_id: str, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    job_id = job_id_of(kwargs)
    start = _started.pop(task_id, None)
    if job_id is None or start is None:
        return
    seconds = time.monotonic() - start
    outcome = job_outcome(job_id)
    metrics.job_finished(outcome, seconds)
    log.info("job attempt ended: %s after %.1f s", outcome, seconds, extra={"outcome": outcome})
    set_current_job(None)
