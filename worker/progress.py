"""Training callbacks that talk to the job database: throttled progress, cancellation checks, the lease."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy.orm import Session, sessionmaker

from services.jobs import repository
from services.must.trainer import StepMetrics, describe
from worker.metrics import observe_step

log = logging.getLogger(__name__)

# How often the cancellation flag is read: often enough to feel immediate, rare enough to cost nothing.
CANCEL_CHECK_SECONDS = 1.0


def make_progress_reporter(
    job_id: str,
    session_factory: sessionmaker[Session],
    every_seconds: float,
    *,
    owner: str,
    lease_seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[StepMetrics], None]:
    """An `on_step` callback writing progress, metrics and a heartbeat: first, last, every `every_seconds`."""
    last_report: float | None = None

    def on_step(metrics: StepMetrics) -> None:
        nonlocal last_report
        observe_step(metrics)
        now = clock()
        due = last_report is None or now - last_report >= every_seconds
        if not due and metrics.step < metrics.total_steps:
            return
        last_report = now
        with session_factory() as session:
            repository.update_progress(
                session,
                job_id,
                owner=owner,
                step=metrics.step,
                total_steps=metrics.total_steps,
                images_per_sec=round(metrics.images_per_sec, 2),
                eta_seconds=round(metrics.eta_s, 1),
            )
            repository.append_metrics(session, job_id, step=metrics.step, values=describe(metrics))
            repository.heartbeat(session, job_id, owner=owner, lease_seconds=lease_seconds)

    return on_step


def make_cancel_check(
    job_id: str,
    session_factory: sessionmaker[Session],
    *,
    every_seconds: float = CANCEL_CHECK_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[], bool]:
    """A `should_cancel` callback reading the job's `cancel_requested` flag at most every `every_seconds`."""
    last_check: float | None = None
    cancelled = False

    def should_cancel() -> bool:
        nonlocal last_check, cancelled
        now = clock()
        if cancelled or (last_check is not None and now - last_check < every_seconds):
            return cancelled
        last_check = now
        with session_factory() as session:
            cancelled = repository.get_job(session, job_id).cancel_requested
        return cancelled

    return should_cancel


@contextlib.contextmanager
def keep_lease(
    job_id: str,
    session_factory: sessionmaker[Session],
    *,
    owner: str,
    heartbeat_seconds: float,
    lease_seconds: float,
) -> Iterator[threading.Event]:
    """Renew the lease from a background thread for the whole job, not only between training steps.

    Listing a large bucket or scoring the zero-shot teacher can outlast the lease, and the
    reconciler would then requeue a job that is still running. The yielded event is set once
    the lease is lost (taken over, requeued or finished elsewhere).
    """

    def beat() -> bool:
        with session_factory() as session:
            return repository.heartbeat(session, job_id, owner=owner, lease_seconds=lease_seconds)

    with renewing(beat, heartbeat_seconds, f"job {job_id}") as lost:
        yield lost


@contextlib.contextmanager
def renewing(beat: Callable[[], bool], every_seconds: float, what: str) -> Iterator[threading.Event]:
    """Call `beat` every `every_seconds` from a background thread while the block runs; the yielded
    event is set (and the beats stop) once `beat` returns False: the lease is no longer held."""
    stop, lost = threading.Event(), threading.Event()

    def renew() -> None:
        while not stop.wait(every_seconds):
            try:
                held = beat()
            except Exception:  # a database hiccup must not kill the thread; the next beat retries
                log.exception("heartbeat of %s failed", what)
                continue
            if not held:
                lost.set()
                return

    thread = threading.Thread(target=renew, name=f"lease-{what}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        stop.set()
        thread.join()
