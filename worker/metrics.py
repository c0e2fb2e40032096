"""Prometheus metrics of a worker process, served by prometheus_client's own HTTP server.

The process that runs jobs (the Celery pool child; with `--concurrency 1`, one per GPU) starts
the server, so the metrics it updates are the ones it serves. Scrape each worker at
`http://<host>:<settings.metrics.worker_port>/metrics`.
https://prometheus.github.io/client_python/exporting/http/
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    # Only for annotations: the control API imports this module (through worker.celery_app) without torch.
    from services.must.trainer import StepMetrics

log = logging.getLogger(__name__)

# Jobs last minutes to a day; the default buckets (5 ms .. 10 s) are for requests.
JOB_DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600)
# Weight of the newest step in the smoothed steps/s: about the last 10 steps count.
RATE_SMOOTHING = 0.1

TRAINING_STEPS = Counter("must_worker_training_steps", "Optimizer steps completed (rate() gives steps/s)")
STEPS_PER_SECOND = Gauge("must_worker_training_steps_per_second", "Smoothed optimizer steps per second")
IMAGES_PER_SECOND = Gauge("must_worker_training_images_per_second", "Training images per second")
JOB_DURATION = Histogram(
    "must_worker_job_duration_seconds",
    "Wall time of one attempt at a job, by the job's status when it ended",
    ["outcome"],
    buckets=JOB_DURATION_BUCKETS,
)
JOBS_RUNNING = Gauge("must_worker_jobs_running", "Jobs this process is running now")


class StepRate:
    """Steps per second from the time between consecutive steps, exponentially smoothed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        """Forget the last step (a new job starts; the time between jobs is not a step)."""
        self._last: float | None = None
        self.rate: float | None = None

    def observe(self) -> float | None:
        """Note one step now; the smoothed rate, or None until two steps were seen."""
        now = self.clock()
        if self._last is not None and now > self._last:
            current = 1.0 / (now - self._last)
            self.rate = current if self.rate is None else self.rate + RATE_SMOOTHING * (current - self.rate)
        self._last = now
        return self.rate


_step_rate = StepRate()


def observe_step(metrics: StepMetrics) -> None:
    """Record one optimizer step of the running job."""
    TRAINING_STEPS.inc()
    IMAGES_PER_SECOND.set(metrics.images_per_sec)
    rate = _step_rate.observe()
    if rate is not None:
        STEPS_PER_SECOND.set(rate)


def job_started() -> None:
    """A job attempt begins in this process."""
    JOBS_RUNNING.inc()
    _step_rate.reset()


def job_finished(outcome: str, seconds: float) -> None:
    """A job attempt ended after `seconds`, leaving the job `outcome` (its status, or `unfinished`)."""
    JOBS_RUNNING.dec()
    JOB_DURATION.labels(outcome=outcome).observe(seconds)
    STEPS_PER_SECOND.set(0)
    IMAGES_PER_SECOND.set(0)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> bool:
    """Serve this process's metrics on `host:port`; False (logged) if the port is taken."""
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        # A second pool process on the same machine, or a leftover process: run the jobs anyway.
        log.warning("worker metrics not served: cannot listen on %s:%s (%s)", host, port, exc)
        return False
    log.info("worker metrics at http://%s:%s/metrics", host, port)
    return True
