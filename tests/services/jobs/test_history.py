"""A job's phase history and stored log lines, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.orm import Session

from services.errors import JobNotFound
from services.jobs import repository as repo
from services.jobs.states import JobPhase, JobStatus

REQUEST: dict[str, Any] = {"class_names": ["cat", "dog"], "dataset": {"uri": "s3://data/cats/"}}
LEASE = 60.0


def _spans(session: Session, job_id: str) -> list[tuple[JobPhase, bool]]:
    """(phase, ended?) of each span, oldest first."""
    return [(span.phase, span.ended_at is not None) for span in repo.list_phases(session, job_id)]


def _running(session: Session, owner: str = "w1") -> str:
    job_id = repo.create_job(session, request=REQUEST, idempotency_key=None).id
    assert repo.mark_running(session, job_id, owner=owner, lease_seconds=LEASE)
    return job_id


def test_a_new_job_is_queued_with_an_open_span(session: Session) -> None:
    job = repo.create_job(session, request=REQUEST, idempotency_key=None)
    job = repo.get_job(session, job.id)
    assert job.phase is JobPhase.QUEUED
    assert [(s.phase, s.started_at, s.ended_at) for s in job.phases] == [
        (JobPhase.QUEUED, job.created_at, None)
    ]


def test_each_phase_ends_when_the_next_starts_and_success_adds_done(session: Session) -> None:
    job_id = _running(session)
    for phase in (JobPhase.LISTING, JobPhase.STAGING, JobPhase.TRAINING, JobPhase.EVALUATING):
        assert repo.set_phase(session, job_id, phase=phase, owner="w1")
    assert _spans(session, job_id)[-1] == (JobPhase.EVALUATING, False)

    report = {"images": 2, "class_names": ["cat", "dog"], "served": "teacher", "candidates": {}}
    assert repo.mark_succeeded(
        session, job_id, artifact_uri="s3://a/b", artifact_sha256="0" * 64, owner="w1", evaluation=report
    )

    job = repo.get_job(session, job_id)
    assert (job.status, job.phase, job.evaluation) == (JobStatus.SUCCEEDED, JobPhase.DONE, report)
    spans = job.phases
    assert [s.phase for s in spans] == [
        JobPhase.QUEUED,
        JobPhase.LISTING,
        JobPhase.STAGING,
        JobPhase.TRAINING,
        JobPhase.EVALUATING,
        JobPhase.DONE,
    ]
    # Contiguous: each span ends exactly when the next one starts; DONE is an instant.
    for before, after in zip(spans, spans[1:], strict=False):
        assert before.ended_at == after.started_at
    assert spans[-1].started_at == spans[-1].ended_at == job.finished_at


def test_a_phase_of_a_job_held_by_another_worker_is_not_recorded(session: Session) -> None:
    job_id = _running(session, owner="w1")
    assert not repo.set_phase(session, job_id, phase=JobPhase.LISTING, owner="someone-else")
    assert _spans(session, job_id) == [(JobPhase.QUEUED, False)]


def test_failure_ends_the_phase_it_failed_in(session: Session) -> None:
    job_id = _running(session)
    repo.set_phase(session, job_id, phase=JobPhase.STAGING, owner="w1")
    assert repo.mark_failed(session, job_id, error_type="DatasetError", message="eval set: ...", owner="w1")
    job = repo.get_job(session, job_id)
    assert job.phase is JobPhase.STAGING  # where it failed
    assert _spans(session, job_id) == [(JobPhase.QUEUED, True), (JobPhase.STAGING, True)]


def test_a_requeued_job_is_queued_again(session: Session) -> None:
    job_id = _running(session)
    repo.set_phase(session, job_id, phase=JobPhase.TRAINING, owner="w1")
    assert repo.requeue_running(session, job_id, owner="w1")
    assert repo.get_job(session, job_id).phase is JobPhase.QUEUED
    assert _spans(session, job_id) == [
        (JobPhase.QUEUED, True),
        (JobPhase.TRAINING, True),
        (JobPhase.QUEUED, False),
    ]


def test_cancelling_a_queued_job_ends_its_span(session: Session) -> None:
    job_id = repo.create_job(session, request=REQUEST, idempotency_key=None).id
    repo.request_cancel(session, job_id)
    assert _spans(session, job_id) == [(JobPhase.QUEUED, True)]


def test_log_lines_are_stored_in_order_and_paged(session: Session) -> None:
    job_id = _running(session)
    other = _running(session)
    when = datetime(2026, 12, 30, 12, 0, tzinfo=UTC)
    lines = [
        {"created_at": when, "level": "INFO", "logger": "worker", "message": f"line {i}"} for i in range(5)
    ]
    repo.append_log_lines(session, job_id, lines)
    repo.append_log_lines(session, other, lines[:1])

    first = repo.list_log_lines(session, job_id, limit=3)
    rest = repo.list_log_lines(session, job_id, after=first[-1].id)
    assert [row.message for row in first + rest] == [f"line {i}" for i in range(5)]
    assert first[0].created_at == when
    assert repo.count_log_lines(session, job_id) == 5
    with pytest.raises(JobNotFound):
        repo.list_log_lines(session, job_id, tenant="another-tenant")
