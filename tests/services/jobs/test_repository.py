"""The job repository on SQLite and PostgreSQL: idempotency, listing, transitions, leases, cancel, metrics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from services.db.types import utcnow
from services.errors import InvalidJobTransition, InvalidRequest, JobNotFound
from services.jobs import repository as repo
from services.jobs.states import JobPhase, JobStatus

REQUEST: dict[str, Any] = {"class_names": ["cat", "dog"], "dataset": {"uri": "s3://data/cats/"}}
LEASE = 60.0


def _new(session: Session, key: str | None = None) -> str:
    return repo.create_job(session, request=REQUEST, idempotency_key=key).id


def _running(session: Session, owner: str = "w1") -> str:
    job_id = _new(session)
    assert repo.mark_running(session, job_id, owner=owner, lease_seconds=LEASE)
    return job_id


def test_create_job_is_queued(session: Session) -> None:
    job = repo.create_job(session, request=REQUEST, idempotency_key=None)
    assert job.status is JobStatus.QUEUED
    assert job.num_classes == 2
    assert job.created_at.tzinfo is not None
    assert repo.get_job(session, job.id).request == REQUEST


def test_idempotency_key_returns_same_job(session: Session) -> None:
    first = _new(session, key="abc")
    assert _new(session, key="abc") == first
    assert _new(session, key=None) != _new(session, key=None)
    with pytest.raises(InvalidRequest, match="Idempotency-Key"):
        repo.create_job(session, request={"class_names": ["x", "y"]}, idempotency_key="abc")


def test_get_missing_job(session: Session) -> None:
    with pytest.raises(JobNotFound):
        repo.get_job(session, "00000000-0000-0000-0000-000000000000")


def test_list_filter_and_pagination(session: Session) -> None:
    ids = [_new(session) for _ in range(5)]
    for job_id in ids[:2]:
        repo.mark_running(session, job_id, owner="w", lease_seconds=LEASE)
    running, total = repo.list_jobs(session, status=JobStatus.RUNNING, limit=10)
    assert total == 2
    assert {j.id for j in running} == set(ids[:2])
    pages = [repo.list_jobs(session, limit=2, offset=offset) for offset in (0, 2, 4)]
    assert [total for _, total in pages] == [5, 5, 5]
    listed = [job.id for items, _ in pages for job in items]
    assert sorted(listed) == sorted(ids)
    assert len(listed) == 5
    created = [job.created_at for items, _ in pages for job in items]
    assert created == sorted(created, reverse=True)


def test_transitions_are_enforced(session: Session) -> None:
    job_id = _new(session)
    with pytest.raises(InvalidJobTransition, match="'queued' to 'succeeded'"):
        repo.mark_succeeded(session, job_id, artifact_uri="s3://a/b", artifact_sha256="0" * 64)
    assert repo.mark_running(session, job_id, owner="w1", lease_seconds=LEASE)
    assert repo.mark_succeeded(session, job_id, artifact_uri="s3://a/b", artifact_sha256="0" * 64, owner="w1")
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.SUCCEEDED
    assert job.finished_at is not None
    assert job.lease_owner is None
    with pytest.raises(InvalidJobTransition):
        repo.mark_running(session, job_id, owner="w2", lease_seconds=LEASE)
    with pytest.raises(InvalidJobTransition):
        repo.mark_failed(session, job_id, error_type="X", message="late")


def test_mark_failed_keeps_traceback_tail(session: Session) -> None:
    job_id = _running(session)
    traceback = "x" * 50_000 + "RAISED_HERE"
    assert repo.mark_failed(
        session, job_id, error_type="DatasetError", message="no images", traceback=traceback
    )
    job = repo.get_job(session, job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_type == "DatasetError"
    assert job.error_traceback is not None
    assert job.error_traceback.endswith("RAISED_HERE")
    assert len(job.error_traceback) == repo.MAX_TRACEBACK_CHARS


def test_lease_takeover_and_heartbeat(session: Session) -> None:
    job_id = _running(session, owner="w1")
    assert not repo.mark_running(session, job_id, owner="w2", lease_seconds=LEASE)
    assert repo.mark_running(session, job_id, owner="w1", lease_seconds=LEASE)
    assert repo.heartbeat(session, job_id, owner="w1", lease_seconds=LEASE)
    started = repo.get_job(session, job_id).started_at
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert repo.mark_running(session, job_id, owner="w2", lease_seconds=LEASE, now=later)
    assert repo.get_job(session, job_id).started_at == started
    assert not repo.heartbeat(session, job_id, owner="w1", lease_seconds=LEASE)
    assert not repo.update_progress(session, job_id, owner="w1", step=5)
    assert not repo.mark_succeeded(session, job_id, artifact_uri="s3://a/b", artifact_sha256="0", owner="w1")
    assert repo.heartbeat(session, job_id, owner="w2", lease_seconds=LEASE, now=later)
    assert repo.get_job(session, job_id).lease_owner == "w2"


def test_progress_and_phase(session: Session) -> None:
    job_id = _running(session)
    assert repo.set_phase(session, job_id, phase=JobPhase.TRAINING, owner="w1")
    assert repo.update_progress(
        session,
        job_id,
        owner="w1",
        step=10,
        total_steps=100,
        images_per_sec=55.5,
        skipped_reasons={"corrupt": 1},
    )
    assert repo.update_progress(session, job_id, eta_seconds=12.0)
    job = repo.get_job(session, job_id)
    assert (job.phase, job.step, job.total_steps, job.eta_seconds) == (JobPhase.TRAINING, 10, 100, 12.0)
    assert job.skipped_reasons == {"corrupt": 1}
    assert not repo.update_progress(session, _new(session), step=1)


def test_requeue_stale(session: Session) -> None:
    stale, live, cancelling = _running(session), _running(session), _running(session)
    repo.request_cancel(session, cancelling)
    repo.heartbeat(session, live, owner="w1", lease_seconds=10 * LEASE)
    later = utcnow() + timedelta(seconds=LEASE + 1)
    assert repo.requeue_stale(session, now=later) == [stale]
    job = repo.get_job(session, stale)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 1, None)
    assert repo.get_job(session, live).status is JobStatus.RUNNING
    assert repo.get_job(session, cancelling).status is JobStatus.CANCELLED
    assert repo.mark_running(session, stale, owner="w9", lease_seconds=LEASE, now=later)


def test_cancel_paths(session: Session) -> None:
    queued = _new(session)
    assert repo.request_cancel(session, queued).status is JobStatus.CANCELLED
    assert repo.request_cancel(session, queued).status is JobStatus.CANCELLED
    running = _running(session)
    job = repo.request_cancel(session, running)
    assert job.status is JobStatus.RUNNING
    assert job.cancel_requested
    assert repo.mark_cancelled(session, running, owner="w1")
    assert repo.get_job(session, running).finished_at is not None
    done = _running(session)
    repo.mark_succeeded(session, done, artifact_uri="s3://a/b", artifact_sha256="0")
    with pytest.raises(InvalidJobTransition, match="'succeeded' to 'cancelled'"):
        repo.request_cancel(session, done)


def test_metrics_history(session: Session) -> None:
    job_id = _running(session)
    for step in (30, 10, 20, 20):
        repo.append_metrics(session, job_id, step=step, values={"loss": float(step)})
    history = repo.list_metrics(session, job_id)
    assert [m.step for m in history] == [10, 20, 20, 30]
    assert [m.step for m in repo.list_metrics(session, job_id, since_step=20, limit=2)] == [20, 20]
    assert repo.get_job(session, job_id).latest_metrics == {"loss": 20.0}
    with pytest.raises(JobNotFound):
        repo.list_metrics(session, "missing")


def _race(factory: sessionmaker[Session], n: int, work: Callable[[Session, int], Any]) -> list[Any]:
    """Run `work(session, i)` in n threads released together by a barrier; return the results."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        with factory() as session:
            barrier.wait()
            results[i] = work(session, i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_only_one_worker_wins_the_lease_on_postgres(pg_session_factory: sessionmaker[Session]) -> None:
    for _ in range(8):
        with pg_session_factory() as session:
            job_id = _new(session)
        won = _race(
            pg_session_factory,
            4,
            lambda s, i: repo.mark_running(s, job_id, owner=f"worker-{i}", lease_seconds=LEASE),  # noqa: B023
        )
        assert won.count(True) == 1, won
        with pg_session_factory() as session:
            assert repo.get_job(session, job_id).lease_owner == f"worker-{won.index(True)}"


def test_concurrent_idempotent_creates_return_one_job_on_postgres(
    pg_session_factory: sessionmaker[Session],
) -> None:
    for attempt in range(4):
        ids = _race(pg_session_factory, 4, lambda s, _i: _new(s, key=f"key-{attempt}"))  # noqa: B023
        assert len(set(ids)) == 1
