"""Throttled progress reports, cancellation checks and the background lease on a SQLite job database."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from services.db.types import utcnow
from services.jobs import repository
from services.must.trainer import StepMetrics
from tests.worker.conftest import create_job, tiny_request
from worker.progress import keep_lease, make_cancel_check, make_progress_reporter


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _metrics(step: int, total: int) -> StepMetrics:
    losses = {"loss": 1.0, "self_training": 0.5, "fairness": 0.1, "mim": 0.3, "align": 0.1}
    return StepMetrics(step, total, 80.0, 1e-4, 0.99, losses, {"confident_fraction": 0.4}, float(step))


def _running_job(session_factory: sessionmaker[Session], owner: str = "w") -> str:
    job_id = create_job(session_factory, tiny_request("s3://some-bucket/images/"))
    with session_factory() as session:
        assert repository.mark_running(session, job_id, owner=owner, lease_seconds=60)
    return job_id


def test_progress_is_written_first_then_throttled_and_always_at_the_end(
    session_factory: sessionmaker[Session],
) -> None:
    job_id = _running_job(session_factory)
    clock = FakeClock()
    report = make_progress_reporter(job_id, session_factory, 2.5, owner="w", lease_seconds=60, clock=clock)

    for step in range(1, 7):
        report(_metrics(step, 6))
        clock.now += 1.0

    with session_factory() as session:
        job = repository.get_job(session, job_id)
        steps = [point.step for point in repository.list_metrics(session, job_id)]
    assert steps == [1, 4, 6]
    assert (job.step, job.total_steps, job.images_per_sec) == (6, 6, 80.0)
    assert job.eta_seconds == 0.0
    assert job.latest_metrics is not None
    assert job.latest_metrics["loss"] == 1.0


def test_cancel_flag_is_read_at_most_once_a_second(session_factory: sessionmaker[Session]) -> None:
    job_id = _running_job(session_factory)
    clock = FakeClock()
    should_cancel = make_cancel_check(job_id, session_factory, clock=clock)
    assert not should_cancel()

    with session_factory() as session:
        repository.request_cancel(session, job_id)
    clock.now += 0.5
    assert not should_cancel()
    clock.now += 0.6
    assert should_cancel()


def test_lease_is_renewed_and_its_loss_noticed(session_factory: sessionmaker[Session]) -> None:
    job_id = _running_job(session_factory)
    with session_factory() as session:
        before = repository.get_job(session, job_id).lease_expires_at
    assert before is not None

    with keep_lease(job_id, session_factory, owner="w", heartbeat_seconds=0.05, lease_seconds=60) as lost:
        assert not lost.wait(0.3)
        with session_factory() as session:
            renewed = repository.get_job(session, job_id).lease_expires_at
            assert renewed is not None
            assert renewed > before
            # The reconciler believes the worker dead and requeues the job.
            repository.requeue_stale(session, now=utcnow() + timedelta(minutes=5))
        assert lost.wait(5)
