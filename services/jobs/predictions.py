"""Batch prediction runs in the job database: keyword-only functions taking a Session; each mutation commits.

A run restarts from the beginning when it runs again, so it keeps no checkpoint; like a training
job it holds a lease that its worker renews, so that a run whose worker died goes back to the
queue (the reconciler sends it again) and a duplicate message never runs it twice at once.
Status changes are conditional UPDATEs; a finished run is never started again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Update, func, or_, select, update
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


def set_task_id(session: Session, run_id: str, *, task_id: str, now: datetime | None = None) -> None:
    """Record the broker's task id of the run's message and when it was sent."""
    stmt = update(PredictionRun).where(PredictionRun.id == run_id)
    _update(session, stmt.values(celery_task_id=task_id, enqueued_at=now or utcnow()))


def _running(run_id: str, owner: str | None) -> tuple[ColumnElement[bool], ...]:
    held = () if owner is None else (PredictionRun.lease_owner == owner,)
    return (PredictionRun.id == run_id, PredictionRun.status == JobStatus.RUNNING, *held)


def start_run(
    session: Session, run_id: str, *, owner: str, lease_seconds: float, now: datetime | None = None
) -> bool:
    """Take the run's lease and start it from scratch (counts reset): wins if it is queued, or running
    with an expired lease (its worker died) or one `owner` holds; False otherwise (finished, or alive)."""
    now = now or utcnow()
    takeover = or_(
        PredictionRun.lease_expires_at.is_(None),
        PredictionRun.lease_expires_at < now,
        PredictionRun.lease_owner == owner,
    )
    startable = or_(
        PredictionRun.status == JobStatus.QUEUED, (PredictionRun.status == JobStatus.RUNNING) & takeover
    )
    stmt = (
        update(PredictionRun)
        .where(PredictionRun.id == run_id, startable)
        .values(
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            attempts=PredictionRun.attempts + 1,
            images_done=0,
            images_failed=0,
            images_abstained=0,
        )
    )
    return _update(session, stmt)


def heartbeat(session: Session, run_id: str, *, owner: str, lease_seconds: float) -> bool:
    """Extend the lease `owner` holds; False if the run was taken over, requeued or finished."""
    expires = utcnow() + timedelta(seconds=lease_seconds)
    return _update(
        session, update(PredictionRun).where(*_running(run_id, owner)).values(lease_expires_at=expires)
    )


def record_progress(
    session: Session, run_id: str, *, owner: str, done: int, failed: int, abstained: int
) -> bool:
    """The counts so far of a run `owner` runs."""
    stmt = update(PredictionRun).where(*_running(run_id, owner))
    return _update(session, stmt.values(images_done=done, images_failed=failed, images_abstained=abstained))


def finish_run(
    session: Session,
    run_id: str,
    *,
    owner: str | None,
    results_key: str,
    sha256: str,
    size: int,
    done: int,
    failed: int,
    abstained: int,
) -> bool:
    """Mark a running run succeeded with its results file and final counts (if `owner` still holds it)."""
    values = {
        "status": JobStatus.SUCCEEDED,
        "finished_at": utcnow(),
        "lease_owner": None,
        "lease_expires_at": None,
        "results_key": results_key,
        "results_sha256": sha256,
        "results_bytes": size,
        "images_done": done,
        "images_failed": failed,
        "images_abstained": abstained,
    }
    return _update(session, update(PredictionRun).where(*_running(run_id, owner)).values(**values))


def fail_run(
    session: Session, run_id: str, *, error_type: str, message: str, owner: str | None = None
) -> bool:
    """Mark a queued run, or a running one (held by `owner` when given), failed with a message a user
    can act on."""
    active = or_(PredictionRun.status == JobStatus.QUEUED, _running_held(owner))
    values = {
        "status": JobStatus.FAILED,
        "finished_at": utcnow(),
        "lease_owner": None,
        "lease_expires_at": None,
        "error_type": error_type[:255],
        "error_message": message[:MAX_ERROR_MESSAGE_CHARS],
    }
    return _update(session, update(PredictionRun).where(PredictionRun.id == run_id, active).values(**values))


def _running_held(owner: str | None) -> ColumnElement[bool]:
    """Running, and held by `owner` when given."""
    running = PredictionRun.status == JobStatus.RUNNING
    return running if owner is None else running & (PredictionRun.lease_owner == owner)


def requeue_stale(session: Session, *, now: datetime | None = None) -> list[str]:
    """Put running runs whose lease expired (their worker died) back in the queue; return their ids."""
    now = now or utcnow()
    stale = select(PredictionRun.id).where(
        PredictionRun.status == JobStatus.RUNNING, PredictionRun.lease_expires_at < now
    )
    requeued = []
    for run_id in list(session.scalars(stale)):
        stmt = update(PredictionRun).where(*_running(run_id, None), PredictionRun.lease_expires_at < now)
        if _update(session, stmt.values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None)):
            requeued.append(run_id)
    return requeued


def queued_before(session: Session, cutoff: datetime) -> list[tuple[str, str | None]]:
    """(id, task id) of the queued runs whose message was last sent (or which were made) before `cutoff`."""
    sent_before = or_(
        PredictionRun.enqueued_at < cutoff,
        PredictionRun.enqueued_at.is_(None) & (PredictionRun.created_at < cutoff),
    )
    stmt = select(PredictionRun.id, PredictionRun.celery_task_id).where(
        PredictionRun.status == JobStatus.QUEUED, sent_before
    )
    return [(run_id, task_id) for run_id, task_id in session.execute(stmt.order_by(PredictionRun.created_at))]


def claim_resend(session: Session, run_id: str, *, cutoff: datetime, now: datetime | None = None) -> bool:
    """Mark a still-queued run's message as sent now, if nobody did since `cutoff`; True if this call won."""
    sent_before = or_(PredictionRun.enqueued_at < cutoff, PredictionRun.enqueued_at.is_(None))
    stmt = update(PredictionRun).where(
        PredictionRun.id == run_id, PredictionRun.status == JobStatus.QUEUED, sent_before
    )
    return _update(session, stmt.values(enqueued_at=now or utcnow()))
