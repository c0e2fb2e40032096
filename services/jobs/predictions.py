"""Batch prediction runs in the job database: keyword-only functions taking a Session; each mutation commits.

A run is short-lived next to a training job and restarts from the beginning when its message is
delivered again (a worker died mid-run), so it needs no lease: status changes are conditional
UPDATEs, and a finished run is never started again.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Update, func, select, update
from sqlalchemy.orm import Session

from services.db.models import PredictionRun
from services.db.types import utcnow
from services.errors import PredictionNotFound
from services.jobs.repository import MAX_ERROR_MESSAGE_CHARS
from services.jobs.states import JobStatus

_ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def create_run(session: Session, *, job_id: str, tenant: str, request: dict[str, Any]) -> PredictionRun:
    """Insert a queued run of adaptation `job_id`."""
    run = PredictionRun(job_id=job_id, tenant=tenant, request=request, status=JobStatus.QUEUED)
    session.add(run)
    session.commit()
    return run


def get_run(session: Session, run_id: str, *, tenant: str | None = None) -> PredictionRun:
    """The run `run_id` (of `tenant`; None: any tenant's), or PredictionNotFound."""
    run = session.get(PredictionRun, run_id, populate_existing=True)
    if run is None or (tenant is not None and run.tenant != tenant):
        raise PredictionNotFound(run_id)
    return run


def list_runs(
    session: Session,
    *,
    tenant: str | None,
    adaptation_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[PredictionRun], int]:
    """One page of runs (of `tenant`, or all; of one adaptation if given), newest first, and the total."""
    where = []
    if tenant is not None:
        where.append(PredictionRun.tenant == tenant)
    if adaptation_id is not None:
        where.append(PredictionRun.job_id == adaptation_id)
    total = session.scalar(select(func.count()).select_from(PredictionRun).where(*where)) or 0
    page = (
        select(PredictionRun).where(*where).order_by(PredictionRun.created_at.desc(), PredictionRun.id.desc())
    )
    return list(session.scalars(page.limit(limit).offset(offset))), total


def _update(session: Session, stmt: Update) -> bool:
    result = cast(CursorResult[Any], session.execute(stmt.execution_options(synchronize_session=False)))
    session.commit()
    return result.rowcount == 1


def set_task_id(session: Session, run_id: str, *, task_id: str) -> None:
    """Record the broker's task id of the run's message."""
    _update(session, update(PredictionRun).where(PredictionRun.id == run_id).values(celery_task_id=task_id))


def start_run(session: Session, run_id: str) -> bool:
    """Mark the run running from scratch (counts reset); False if it has finished already (a duplicate)."""
    stmt = (
        update(PredictionRun)
        .where(PredictionRun.id == run_id, PredictionRun.status.in_(_ACTIVE))
        .values(
            status=JobStatus.RUNNING,
            started_at=utcnow(),
            attempts=PredictionRun.attempts + 1,
            images_done=0,
            images_failed=0,
            images_abstained=0,
        )
    )
    return _update(session, stmt)


def record_progress(session: Session, run_id: str, *, done: int, failed: int, abstained: int) -> None:
    """The counts so far of a running run."""
    stmt = update(PredictionRun).where(PredictionRun.id == run_id, PredictionRun.status == JobStatus.RUNNING)
    _update(session, stmt.values(images_done=done, images_failed=failed, images_abstained=abstained))


def finish_run(
    session: Session,
    run_id: str,
    *,
    results_key: str,
    sha256: str,
    size: int,
    done: int,
    failed: int,
    abstained: int,
) -> bool:
    """Mark a running run succeeded with its results file and final counts."""
    stmt = update(PredictionRun).where(PredictionRun.id == run_id, PredictionRun.status == JobStatus.RUNNING)
    values = {
        "status": JobStatus.SUCCEEDED,
        "finished_at": utcnow(),
        "results_key": results_key,
        "results_sha256": sha256,
        "results_bytes": size,
        "images_done": done,
        "images_failed": failed,
        "images_abstained": abstained,
    }
    return _update(session, stmt.values(**values))


def fail_run(session: Session, run_id: str, *, error_type: str, message: str) -> bool:
    """Mark a queued or running run failed with a message a user can act on."""
    stmt = update(PredictionRun).where(PredictionRun.id == run_id, PredictionRun.status.in_(_ACTIVE))
    values = {
        "status": JobStatus.FAILED,
        "finished_at": utcnow(),
        "error_type": error_type[:255],
        "error_message": message[:MAX_ERROR_MESSAGE_CHARS],
    }
    return _update(session, stmt.values(**values))
